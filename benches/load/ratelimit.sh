#!/usr/bin/env bash
# Rate-limit load test (contract §11): 3 keygates on one Redis, one key limited
# to 1000/s, wrk on all three at once for DURATION. Reports let-through per
# one-second window (max, p99; from each window's Redis reservation counter,
# which bounds what was let through, and from the forwarded totals) and the
# Redis commands per second the coordination cost.
#
#   bash benches/load/ratelimit.sh          # DURATION=10s CONNS=32 LIMIT=1000/s
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/benches/load"
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
LIMIT=${LIMIT:-1000/s}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_until() { local what=$1 t=$2; shift 2; for _ in $(seq $((t * 20))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "timed out: $what" >&2; exit 1; }

cd "$REPO"
KEYGATE=${KEYGATE_BIN:-$(cargo build --release --bin keygate --message-format=json-render-diagnostics | python3 "$HERE/report.py" exe keygate)}
UPSTREAM=${UPSTREAM_BIN:-$(cargo bench --no-run --bench upstream --message-format=json-render-diagnostics | python3 "$HERE/report.py" exe upstream)}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >/dev/null &
PIDS+=($!)
wait_until redis 10 redis-cli -p "$REDIS_PORT" ping
"$UPSTREAM" 127.0.0.1:0 >"$WORK/upstream.out" 2>&1 &
PIDS+=($!)
wait_until upstream 10 grep -q '^listening on' "$WORK/upstream.out"
UP_PORT=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$WORK/upstream.out")

PORTS=() ADMINS=()
for i in 1 2 3; do
    P=$(free_port) A=$(free_port)
    cat >"$WORK/kg$i.toml" <<EOF
[listen]
addr = "127.0.0.1:$P"
[admin]
addr = "127.0.0.1:$A"
[upstream]
url = "http://127.0.0.1:$UP_PORT"
[tenant]
slug = "acme"
domain = "moleculesai.app"
[store]
backend = "redis"
url = "redis://127.0.0.1:$REDIS_PORT/0"
[log]
access = false
[runtime]
worker_threads = 1
EOF
    "$KEYGATE" serve --config "$WORK/kg$i.toml" >"$WORK/kg$i.log" 2>&1 &
    PIDS+=($!)
    wait_until "keygate $i" 20 curl -sf -m 2 "http://127.0.0.1:$A/readyz"
    PORTS+=("$P") ADMINS+=("$A")
done
MINT=$("$KEYGATE" keys mint --config "$WORK/kg1.toml" --name rl-load --rate-limit "$LIMIT" --json)
TOKEN=$(printf '%s' "$MINT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["auth_token"])')
KEY_ID=$(printf '%s' "$MINT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

cmds() { redis-cli -p "$REDIS_PORT" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p' | tr -d '\r'; }
fwd() { local s=0; for a in "${ADMINS[@]}"; do v=$(curl -s "http://127.0.0.1:$a/metrics" | sed -n 's/^keygate_requests_total{outcome="forwarded"} \([0-9]*\)/\1/p'); s=$((s + ${v:-0})); done; echo $s; }
C0=$(cmds) F0=$(fwd) T0=$(date +%s)
for p in "${PORTS[@]}"; do
    wrk -t1 -c"$CONNS" -d"$DURATION" -H "Host: acme.moleculesai.app" -H "Authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$p/api/x" >"$WORK/wrk$p.txt" 2>&1 &
    WRK+=($!)
done
wait "${WRK[@]}"
T1=$(date +%s) C1=$(cmds) F1=$(fwd)
echo "== 3 keygates, one key $LIMIT, wrk -c$CONNS x3 for $DURATION"
for p in "${PORTS[@]}"; do grep -E "Requests/sec|Non-2xx" "$WORK/wrk$p.txt" | sed "s/^/kg:$p /"; done
redis-cli -p "$REDIS_PORT" --scan --pattern "keygate:{acme}:rl:$KEY_ID:*" | while read -r k; do redis-cli -p "$REDIS_PORT" get "$k"; done \
    | python3 -c '
import sys
v = sorted(int(x) for x in sys.stdin if x.strip())
if v:
    p99 = v[min(len(v) - 1, int(len(v) * 0.99))]
    print(f"reserved per window (>= let through): windows={len(v)} max={v[-1]} p99={p99} min={v[0]}")'
echo "forwarded in total: $((F1 - F0)) over $((T1 - T0)) s (avg $(( (F1 - F0) / (T1 - T0 > 0 ? T1 - T0 : 1) ))/s)"
echo "redis commands/s during the run: $(( (C1 - C0) / (T1 - T0 > 0 ? T1 - T0 : 1) ))"
