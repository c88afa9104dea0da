#!/usr/bin/env bash
# keygate-healthcheck [HOST:PORT]
#
# Exit 0 when `GET /healthz` on keygate's admin listener answers 200, else 1
# with one line on stderr saying why (`docker inspect` shows it).
#
# Pure bash (/dev/tcp), so the runtime image needs neither curl nor wget.
# The address comes from the argument, else $KEYGATE_ADMIN_ADDR, else
# 127.0.0.1:9090 (contract default for [admin] addr). A healthcheck runs in
# the container's own network namespace, so 127.0.0.1 reaches the admin
# listener whether it is bound to 127.0.0.1 or 0.0.0.0.
set -u

addr=${1:-${KEYGATE_ADMIN_ADDR:-127.0.0.1:9090}}
path=${KEYGATE_HEALTHCHECK_PATH:-/healthz}
wait_s=${KEYGATE_HEALTHCHECK_TIMEOUT:-2}

host=${addr%:*}
port=${addr##*:}
host=${host#[}
host=${host%]}

if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
    echo "keygate-healthcheck: cannot connect to $addr" >&2
    exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$addr" >&3

status=
if ! IFS= read -r -t "$wait_s" status <&3; then
    echo "keygate-healthcheck: no answer from $addr$path within ${wait_s}s" >&2
    exit 1
fi
status=${status%$'\r'}
case $status in
    "HTTP/1."?" 200"*) exit 0 ;;
esac
echo "keygate-healthcheck: $addr$path answered: ${status:-nothing}" >&2
exit 1
