#!/usr/bin/env bash
# keygate load benchmark: keygate vs nginx doing the same job, in front of the
# same single-threaded hyper upstream, pinned, interleaved, several rounds.
# Writes the results into BENCHMARKS.md (between the load:begin/end markers).
#
#   bash benches/load/run.sh                 # ROUNDS=3 DURATION=10s, all targets, memory
#   ROUNDS=1 DURATION=3s MEMORY=0 bash benches/load/run.sh   # quick look, BENCHMARKS.md untouched
#   MODE=tls bash benches/load/run.sh        # the same over TLS (one table per mode in BENCHMARKS.md)
#
# Environment (defaults):
#   MODE=plain          plain: cleartext HTTP/1.1 GET (wrk); tls: HTTP/1.1 over TLS (wrk https,
#                       nginx `listen ssl`, keygate [listen.tls], one self-signed RSA-2048 certificate);
#                       post: cleartext POST with a 1 KiB body (wrk + post_1k.lua); h2c: HTTP/2 with
#                       prior knowledge (h2load -m STREAMS, nginx `listen http2`); h2: HTTP/2 over TLS via
#                       ALPN (h2load, nginx `listen ssl http2`). Cache misses are the memory part (MEMORY=1,
#                       plain mode only): one request per key for CACHED_KEYS keys, the cache cold once.
#   STREAMS=10          h2c/h2: concurrent streams per connection (h2load -m)
#   ROUNDS=3            interleaved rounds
#   DURATION=10s        wrk duration per run
#   WARMUP=2s           one unrecorded run per target before round 1
#   CONNS=64            wrk keep-alive connections
#   TARGETS="direct nginx keygate nginx-log keygate-log"
#   MEMORY=1            measure keygate RSS (idle, IDLE_CONNS idle connections, CACHED_KEYS cached keys)
#   IDLE_CONNS=10000    CACHED_KEYS=100000
#   PROFILE=0           1: perf-record keygate under load after the rounds, print the top symbols
#   PERF_CALLGRAPH="-g" perf record call-graph option ("--call-graph dwarf" for user-space callers)
#   WRITE=auto          1: write BENCHMARKS.md; 0: don't; auto: only for ROUNDS>=3 and DURATION=10s
#   CLIENT_CPU=0 PROXY_CPU=1    taskset CPUs for wrk (and redis) / proxy + upstream
#   KEEP=0              1: keep the work dir (configs, logs, wrk outputs)
#   KEY_ROLE=           the bench key's role (§8: admin, editor, reader; GETs pass all three)
#   KEY_RATE_LIMIT=     the bench key's rate limit (§11), e.g. 10000000/s: a limit well above the load
#   CARGO_TARGET_DIR    respected (default: the repo's target/)
#
# Everything runs on 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/benches/load"
MODE=${MODE:-plain}
STREAMS=${STREAMS:-10}
KEY_ROLE=${KEY_ROLE:-}
KEY_RATE_LIMIT=${KEY_RATE_LIMIT:-}
case "$MODE" in
    plain | post) TLS=0 DEFAULT_TARGETS="direct nginx keygate nginx-log keygate-log" ;;
    tls) TLS=1 DEFAULT_TARGETS="direct nginx keygate" ;;
    h2c) TLS=0 DEFAULT_TARGETS="nginx keygate" ;;
    h2) TLS=1 DEFAULT_TARGETS="nginx keygate" ;;
    *) printf 'error: MODE=%s: use plain, tls, post, h2c or h2\n' "$MODE" >&2; exit 2 ;;
esac
case "$MODE" in h2c | h2) H2=1 ;; *) H2=0 ;; esac
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-64}
TARGETS=${TARGETS:-$DEFAULT_TARGETS}
# The idle-connection and cache measurements use cleartext HTTP/1.1 clients.
if [ "$MODE" = plain ]; then MEMORY=${MEMORY:-1}; else MEMORY=0; fi
IDLE_CONNS=${IDLE_CONNS:-10000}
CACHED_KEYS=${CACHED_KEYS:-100000}
PROFILE=${PROFILE:-0}
WRITE=${WRITE:-auto}
CLIENT_CPU=${CLIENT_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
KEEP=${KEEP:-0}
HOST_HEADER=acme.moleculesai.app
SLUG=acme
DOMAIN=moleculesai.app

if [ "$WRITE" = auto ]; then
    if [ "$ROUNDS" -ge 3 ] && [ "$DURATION" = 10s ]; then WRITE=1; else WRITE=0; fi
fi

log() { printf '[load] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

secs() { # "10s" / "2m" / "500ms" -> whole seconds (at least 1)
    case "$1" in
        *ms) echo 1 ;;
        *s) echo "${1%s}" ;;
        *m) echo $(( ${1%m} * 60 )) ;;
        *) echo "$1" ;;
    esac
}

# ---------------------------------------------------------------- tools
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
missing_pkgs() {
    local p=()
    [ -x "$NGINX" ] || p+=(nginx-light)
    command -v wrk >/dev/null || p+=(wrk)
    command -v redis-server >/dev/null || p+=(redis-server)
    command -v redis-cli >/dev/null || p+=(redis-tools)
    command -v taskset >/dev/null || p+=(util-linux)
    command -v curl >/dev/null || p+=(curl)
    command -v python3 >/dev/null || p+=(python3)
    if [ "$PROFILE" = 1 ]; then command -v perf >/dev/null || p+=(linux-perf); fi
    if [ "$H2" = 1 ]; then command -v h2load >/dev/null || p+=(nghttp2-client); fi
    if [ "$TLS" = 1 ]; then command -v openssl >/dev/null || p+=(openssl); fi
    echo "${p[@]:-}"
}
need=$(missing_pkgs)
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing: $need"
        apt-get update -qq >/dev/null
        # shellcheck disable=SC2086
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null; then
            # Debian 13 dropped nginx-light: the plain package is the same server.
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${need/nginx-light/nginx} >/dev/null
        fi
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        need=$(missing_pkgs)
        [ -z "$need" ] || die "still missing after apt-get: $need"
    else
        die "missing tools; install them with: sudo apt-get install -y $need"
    fi
fi
# nginx as installed also starts a system instance on :80; we use our own config only.

# ---------------------------------------------------------------- work dir, cleanup
WORK=$(mktemp -d /tmp/keygate-load.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 10))
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] || continue
        while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge $((IDLE_CONNS + 1024)) ] || log "warning: ulimit -n is $(ulimit -n); the idle-connection test may fail"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_until() { # DESCRIPTION SECONDS COMMAND...
    local what=$1 limit=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out waiting for $what"
        sleep 0.05
    done
}

# How curl and the load tools reach a proxy under test in this MODE (the
# upstream itself, `direct`, is always cleartext HTTP/1.1).
SCHEME=http
CURL_MODE=(--http1.1)
case "$MODE" in
    tls) SCHEME=https CURL_MODE=(-k --http1.1) ;;
    h2) SCHEME=https CURL_MODE=(-k --http2) ;;
    h2c) CURL_MODE=(--http2-prior-knowledge) ;;
esac
http_status() { # PORT PATH [curl args...]   (a proxy under test, in this MODE)
    local port=$1 path=$2; shift 2
    curl -s -o /dev/null -m 5 -w '%{http_code}' "${CURL_MODE[@]}" "$@" "$SCHEME://127.0.0.1:$port$path"
}

cpu_ticks() { # PIDS... -> "utime stime" summed, in clock ticks
    local user=0 sys=0 p f
    for p in "$@"; do
        # comm (field 2) may hold spaces: cut at the last ')'.
        f=$(sed 's/.*) //' "/proc/$p/stat")
        # shellcheck disable=SC2086
        set -- $f
        user=$((user + ${12}))
        sys=$((sys + ${13}))
    done
    echo "$user $sys"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

# ---------------------------------------------------------------- build
cd "$REPO"
log "building release keygate and the upstream (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}) unless KEYGATE_BIN/UPSTREAM_BIN are set"
# KEYGATE_BIN / UPSTREAM_BIN: use these binaries instead (e.g. to compare two builds).
if [ -n "${KEYGATE_BIN:-}" ]; then
    KEYGATE=$KEYGATE_BIN
else
    KEYGATE=$(cargo build --release --bin keygate --message-format=json-render-diagnostics \
        | python3 "$HERE/report.py" exe keygate)
fi
if [ -n "${UPSTREAM_BIN:-}" ]; then
    UPSTREAM=$UPSTREAM_BIN
else
    UPSTREAM=$(cargo bench --no-run --bench upstream --message-format=json-render-diagnostics \
        | python3 "$HERE/report.py" exe upstream)
fi
[ -x "$KEYGATE" ] && [ -x "$UPSTREAM" ] || die "build produced no binaries"

# ---------------------------------------------------------------- certificate (tls, h2)
if [ "$TLS" = 1 ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$HOST_HEADER" \
        -addext "subjectAltName=DNS:$HOST_HEADER" -keyout "$WORK/tls.key" -out "$WORK/tls.crt" \
        >"$WORK/openssl.out" 2>&1 || die "openssl could not make a certificate: $(tail -2 "$WORK/openssl.out")"
fi

# ---------------------------------------------------------------- redis
REDIS_PORT=$(free_port)
taskset -c "$CLIENT_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$WORK" --logfile "$WORK/redis.log" &
PIDS+=($!)
wait_until "redis-server" 10 redis-cli -p "$REDIS_PORT" ping

# ---------------------------------------------------------------- upstream
taskset -c "$PROXY_CPU" "$UPSTREAM" 127.0.0.1:0 >"$WORK/upstream.out" 2>&1 &
UPSTREAM_PID=$!
PIDS+=($UPSTREAM_PID)
wait_until "the upstream" 10 grep -q '^listening on' "$WORK/upstream.out"
UPSTREAM_PORT=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$WORK/upstream.out")
[ -n "$UPSTREAM_PORT" ] || die "cannot read the upstream's port"

# ---------------------------------------------------------------- keygate
# write_keygate_config FILE PORT ADMIN_PORT ACCESS_LOG(true|false)
write_keygate_config() {
    cat >"$1" <<EOF
[listen]
addr = "127.0.0.1:$2"
max_connections = $((IDLE_CONNS + 1024))
idle_timeout = "60s"

[admin]
addr = "127.0.0.1:$3"

[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"

[tenant]
slug = "$SLUG"
domain = "$DOMAIN"

[auth]
cache_capacity = $((CACHED_KEYS * 2))

[store]
backend = "redis"
url = "redis://127.0.0.1:$REDIS_PORT/0"

[log]
format = "json"
level = "info"
access = $4

[runtime]
worker_threads = 1
EOF
    if [ "$TLS" = 1 ]; then
        printf '\n[listen.tls]\ncert = "%s"\nkey = "%s"\n' "$WORK/tls.crt" "$WORK/tls.key" >>"$1"
    fi
}

# start_keygate NAME ACCESS_LOG -> sets KG_PID KG_PORT KG_ADMIN KG_CONFIG
start_keygate() {
    KG_PORT=$(free_port)
    KG_ADMIN=$(free_port)
    KG_CONFIG="$WORK/$1.toml"
    write_keygate_config "$KG_CONFIG" "$KG_PORT" "$KG_ADMIN" "$2"
    # Access-log lines go to a file, as nginx's do.
    taskset -c "$PROXY_CPU" "$KEYGATE" serve --config "$KG_CONFIG" >"$WORK/$1.log" 2>&1 &
    KG_PID=$!
    PIDS+=($KG_PID)
    wait_until "keygate $1 (see $WORK/$1.log)" 20 curl -sf -m 2 "http://127.0.0.1:$KG_ADMIN/readyz"
}

start_keygate keygate false
KG1_PID=$KG_PID KG1_PORT=$KG_PORT KG1_ADMIN=$KG_ADMIN KG1_CONFIG=$KG_CONFIG
start_keygate keygate-log true
KG2_PID=$KG_PID KG2_PORT=$KG_PORT

log "minting a key with keygate keys mint"
MINT_ARGS=(--name load-bench --json)
[ -n "$KEY_ROLE" ] && MINT_ARGS+=(--role "$KEY_ROLE")
[ -n "$KEY_RATE_LIMIT" ] && MINT_ARGS+=(--rate-limit "$KEY_RATE_LIMIT")
MINT_JSON=$("$KEYGATE" keys mint --config "$KG1_CONFIG" "${MINT_ARGS[@]}" 2>"$WORK/mint.err") \
    || die "keygate keys mint failed: $(cat "$WORK/mint.err")"
TOKEN=$(printf '%s' "$MINT_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["auth_token"])')
KEY_ID=$(printf '%s' "$MINT_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

# ---------------------------------------------------------------- nginx
if [ "$H2" = 1 ]; then NGINX_KEEPALIVE=$((CONNS * STREAMS)); else NGINX_KEEPALIVE=$CONNS; fi
NGINX_PORT=$(free_port)
NGINX_LOG_PORT=$(free_port)
mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
case "$MODE" in
    tls) NGINX_LISTEN=" ssl" ;;
    h2) NGINX_LISTEN=" ssl http2" ;;
    h2c) NGINX_LISTEN=" http2" ;;
    *) NGINX_LISTEN="" ;;
esac
NGINX_TLS=""
if [ "$TLS" = 1 ]; then
    NGINX_TLS="ssl_certificate $WORK/tls.crt; ssl_certificate_key $WORK/tls.key; ssl_protocols TLSv1.2 TLSv1.3;"
fi
# nginx_server PORT ACCESS_LOG_DIRECTIVE
nginx_server() {
    cat <<EOF
    # Host check: anything but the tenant's host -> 421.
    server {
        listen 127.0.0.1:$1$NGINX_LISTEN default_server;
        server_name _;
        $2
        default_type application/json;
        return 421 '{"error":"misdirected request: host not served by this tenant"}';
    }
    server {
        listen 127.0.0.1:$1$NGINX_LISTEN;
        server_name $HOST_HEADER;
        $2
        default_type application/json;
        add_header X-Request-Id \$req_id always;

        location ~* ^/cp/admin {
            return 403 '{"error":"forbidden"}';
        }
        location / {
            if (\$org_key = "!") {
                add_header WWW-Authenticate 'Bearer realm="$SLUG", error="invalid_token"' always;
                add_header X-Request-Id \$req_id always;
                return 401 '{"error":"invalid or revoked org API key"}';
            }
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header Authorization \$fwd_authorization;
            proxy_set_header X-Molecule-Principal \$org_key;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header X-Request-Id \$req_id;
            proxy_set_header Forwarded "";
            proxy_set_header X-Forwarded-Uri "";
            proxy_set_header X-Forwarded-Prefix "";
            proxy_set_header X-Original-URL "";
            proxy_set_header X-Rewrite-URL "";
        }
    }
EOF
}
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
worker_rlimit_nofile 65536;
events {
    worker_connections $((IDLE_CONNS * 2 + 1024));
}
http {
    access_log off;
    $NGINX_TLS
    map_hash_bucket_size 128;   # the map key is "Bearer <60-character token>"
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    # keygate keeps a client connection for any number of requests; so does this.
    keepalive_requests 1000000000;
    keepalive_timeout 60s;
    log_format kg '\$remote_addr [\$time_iso8601] "\$request" \$status \$body_bytes_sent \$request_time \$req_id \$upstream_status';

    upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        # Idle app connections kept: one per request in flight (HTTP/2: connections x
        # streams), as keygate's pool keeps them, so neither side reconnects under load.
        keepalive $NGINX_KEEPALIVE;
        keepalive_requests 1000000000;
    }
    # The one real org key -> principal; anything else that looks like an org key -> "!" (401);
    # no Authorization or another scheme -> "" (forwarded as is, no principal).
    map \$http_authorization \$org_key {
        default "";
        "Bearer $TOKEN" "org-key:$KEY_ID";
        "~mok_" "!";
    }
    # Authorization is removed on key-authenticated requests, kept otherwise.
    map \$org_key \$fwd_authorization {
        "" \$http_authorization;
        default "";
    }
    # X-Request-Id kept or generated.
    map \$http_x_request_id \$req_id {
        "" \$request_id;
        default \$http_x_request_id;
    }
$(nginx_server "$NGINX_PORT" "access_log off;")
$(nginx_server "$NGINX_LOG_PORT" "access_log $WORK/nginx/logs/access.log kg;")
}
EOF
"$NGINX" -t -q -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx/test.err" \
    || die "nginx config invalid: $(cat "$WORK/nginx/test.err")"
taskset -c "$PROXY_CPU" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
NGINX_PID=$!
PIDS+=($NGINX_PID)
wait_until "nginx" 10 http_status "$NGINX_PORT" /
NGINX_PIDS="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"

# ---------------------------------------------------------------- same job: check
port_of() {
    case "$1" in
        direct) echo "$UPSTREAM_PORT" ;;
        nginx) echo "$NGINX_PORT" ;;
        nginx-log) echo "$NGINX_LOG_PORT" ;;
        keygate) echo "$KG1_PORT" ;;
        keygate-log) echo "$KG2_PORT" ;;
        *) die "unknown target $1" ;;
    esac
}
pids_of() {
    case "$1" in
        direct) echo "$UPSTREAM_PID" ;;
        nginx | nginx-log) echo "$NGINX_PIDS" ;;
        keygate) echo "$KG1_PID" ;;
        keygate-log) echo "$KG2_PID" ;;
    esac
}

log "checking that nginx and keygate do the same job (and warming keygate's cache)"
BAD_TOKEN="mok_$(printf 'A%.0s' $(seq 43))000000"
printf '%-12s %-5s %-5s %-5s %-5s %-5s\n' target ok badkey admin host anon >"$WORK/check.txt"
for t in nginx keygate nginx-log keygate-log; do
    p=$(port_of "$t")
    ok=$(http_status "$p" /api/x -H "Host: $HOST_HEADER" -H "Authorization: Bearer $TOKEN")
    bad=$(http_status "$p" /api/x -H "Host: $HOST_HEADER" -H "Authorization: Bearer $BAD_TOKEN")
    adm=$(http_status "$p" /cp/admin/x -H "Host: $HOST_HEADER" -H "Authorization: Bearer $TOKEN")
    host=$(http_status "$p" /api/x -H "Host: evil.example" -H "Authorization: Bearer $TOKEN")
    anon=$(http_status "$p" /api/x -H "Host: $HOST_HEADER")
    printf '%-12s %-5s %-5s %-5s %-5s %-5s\n' "$t" "$ok" "$bad" "$adm" "$host" "$anon" >>"$WORK/check.txt"
    [ "$ok $bad $adm $host $anon" = "200 401 403 421 200" ] \
        || die "$t answered ok=$ok badkey=$bad admin=$adm host=$host anon=$anon (want 200 401 403 421 200)"
done
cat "$WORK/check.txt" >&2
# What the app receives (the upstream echoes the headers on /__headers).
for t in nginx keygate; do
    curl -s -m 5 "${CURL_MODE[@]}" -H "Host: $HOST_HEADER" -H "Authorization: Bearer $TOKEN" -H "X-Molecule-Principal: forged" \
        -H "X-Forwarded-For: 203.0.113.9" "$SCHEME://127.0.0.1:$(port_of "$t")/__headers" \
        | sed -e "s/$KEY_ID/<key id>/" -e 's/^\(x-request-id:\) .*/\1 <generated>/' >"$WORK/headers-$t.txt"
done

# ---------------------------------------------------------------- load rounds
WRK_ARGS=(-t1 -c"$CONNS" --latency -H "Host: $HOST_HEADER" -H "Authorization: Bearer $TOKEN")
if [ "$MODE" = post ]; then WRK_ARGS+=(-s "$HERE/post_1k.lua"); fi
H2LOAD_ARGS=(-t1 -c"$CONNS" -m"$STREAMS" -H ":authority: $HOST_HEADER" -H "Authorization: Bearer $TOKEN")
WRK_TIMEOUT=$(( $(secs "$DURATION") + 30 ))
: >"$WORK/results.tsv"

# run_wrk TARGET DURATION OUTFILE -> prints "user_ticks sys_ticks" used meanwhile
run_wrk() {
    local t=$1 d=$2 out=$3 port pids u0 s0 u1 s1
    port=$(port_of "$t")
    pids=$(pids_of "$t")
    # shellcheck disable=SC2086
    read -r u0 s0 < <(cpu_ticks $pids)
    if [ "$H2" = 1 ]; then
        timeout "$WRK_TIMEOUT" taskset -c "$CLIENT_CPU" h2load "${H2LOAD_ARGS[@]}" -D"$(secs "$d")" \
            "$SCHEME://127.0.0.1:$port/api/x" >"$out" 2>&1 || log "h2load exited non-zero for $t (see $out)"
    else
        local scheme=$SCHEME
        [ "$t" = direct ] && scheme=http
        timeout "$WRK_TIMEOUT" taskset -c "$CLIENT_CPU" wrk "${WRK_ARGS[@]}" -d"$d" \
            "$scheme://127.0.0.1:$port/api/x" >"$out" 2>&1 || log "wrk exited non-zero for $t (see $out)"
    fi
    # shellcheck disable=SC2086
    read -r u1 s1 < <(cpu_ticks $pids)
    echo "$((u1 - u0)) $((s1 - s0))"
}

read -r -a TARGET_LIST <<<"$TARGETS"
CLK_TCK=$(getconf CLK_TCK)
UPTIME_BEFORE=$(uptime | sed 's/^ *//')
# CPU steal over the rounds, from /proc/stat (field 9 of the "cpu" line).
proc_steal() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t }' /proc/stat; }
read -r STEAL0 TOTAL0 < <(proc_steal)
log "load before: $UPTIME_BEFORE"
for t in "${TARGET_LIST[@]}"; do
    run_wrk "$t" "$WARMUP" "$WORK/warmup-$t.txt" >/dev/null
done
n=${#TARGET_LIST[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
        t=${TARGET_LIST[$(((i + r - 1) % n))]}
        out="$WORK/wrk-$r-$t.txt"
        read -r uticks sticks < <(run_wrk "$t" "$DURATION" "$out")
        read -r requests rps p50 p99 non2xx errors < <(python3 "$HERE/report.py" load "$out")
        per_req() { awk -v t="$1" -v hz="$CLK_TCK" -v n="$requests" \
            'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print "nan" }'; }
        cpu_us=$(per_req $((uticks + sticks)))
        user_us=$(per_req "$uticks")
        sys_us=$(per_req "$sticks")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$rps" "$p50" "$p99" "$cpu_us" \
            "$requests" "$non2xx" "$errors" "$user_us" "$sys_us" >>"$WORK/results.tsv"
        log "round $r $t: $rps req/s, p50 ${p50} ms, p99 ${p99} ms, ${cpu_us} µs CPU/req (user $user_us, sys $sys_us), non-2xx $non2xx, socket errors $errors"
    done
done

# ---------------------------------------------------------------- profile (optional)
# Sampling (cpu-clock: works without hardware counters, e.g. in a VM), then
# syscalls and context switches per request for nginx and keygate (tracepoints).
SYSCALL_EVENTS="raw_syscalls:sys_enter,context-switches,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_readv,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_futex"
if [ "$PROFILE" = 1 ]; then
    set +o pipefail # `perf report | head` ends perf report with SIGPIPE
    log "profiling keygate under load (perf record -e cpu-clock -g)"
    # PERF_CALLGRAPH="--call-graph dwarf" attributes user-space time to callers
    # (release builds have no frame pointers); the default keeps perf.data small.
    # shellcheck disable=SC2086
    perf record -e cpu-clock ${PERF_CALLGRAPH:--g} -o "$WORK/perf.data" -p "$KG1_PID" -- sleep "$(secs "$DURATION")" \
        >"$WORK/perf.out" 2>&1 &
    PERF_PID=$!
    run_wrk keygate "$DURATION" "$WORK/wrk-profile.txt" >/dev/null
    wait "$PERF_PID" || log "perf record failed: $(tail -3 "$WORK/perf.out")"
    {
        echo "keygate samples by binary (perf record -e cpu-clock -g -p PID, $DURATION under the same wrk load; [k] = kernel):"
        echo
        echo '```text'
        perf report -i "$WORK/perf.data" --no-children --sort dso -g none --stdio 2>/dev/null \
            | grep '%' | grep -v '^#' | head -6
        echo '```'
        echo
        echo "Top 20 user-space symbols (self time, % of all keygate samples):"
        echo
        echo '```text'
        perf report -i "$WORK/perf.data" --no-children --sort symbol -g none --stdio 2>/dev/null \
            | grep -v '^#' | grep -F '[.]' | head -20 | cut -c1-150 | sed 's/ *$//'
        echo '```'
        echo
        echo "Top 8 kernel symbols:"
        echo
        echo '```text'
        perf report -i "$WORK/perf.data" --no-children --sort symbol -g none --stdio 2>/dev/null \
            | grep -v '^#' | grep -F '[k]' | head -8 | cut -c1-150 | sed 's/ *$//'
        echo '```'
        echo
    } >"$WORK/profile.md"
    printf '| per request | %s |\n| --- | %s |\n' "nginx | keygate" "---: | ---:" >"$WORK/syscalls.tmp"
    for t in nginx keygate; do
        pids=$(pids_of "$t" | xargs | tr ' ' ',')
        perf stat -x, -e "$SYSCALL_EVENTS" -p "$pids" -o "$WORK/stat-$t.csv" -- sleep "$(secs "$DURATION")" \
            >/dev/null 2>&1 &
        PERF_PID=$!
        run_wrk "$t" "$DURATION" "$WORK/wrk-stat-$t.txt" >/dev/null
        wait "$PERF_PID" || log "perf stat failed for $t"
    done
    nreq=$(python3 "$HERE/report.py" wrk "$WORK/wrk-stat-nginx.txt" | awk '{print $1}')
    kreq=$(python3 "$HERE/report.py" wrk "$WORK/wrk-stat-keygate.txt" | awk '{print $1}')
    for ev in ${SYSCALL_EVENTS//,/ }; do
        n=$(awk -F, -v e="$ev" '$3 == e { print $1 }' "$WORK/stat-nginx.csv")
        k=$(awk -F, -v e="$ev" '$3 == e { print $1 }' "$WORK/stat-keygate.csv")
        name=${ev#*:}
        name=${name#sys_enter_}
        [ "$ev" = raw_syscalls:sys_enter ] && name="all syscalls"
        awk -v n="$n" -v k="$k" -v rn="$nreq" -v rk="$kreq" -v name="$name" \
            'BEGIN { printf "| %s | %.2f | %.2f |\n", name, (rn > 0 ? n / rn : 0), (rk > 0 ? k / rk : 0) }' \
            >>"$WORK/syscalls.tmp"
    done
    {
        echo "Syscalls and context switches per request (perf stat tracepoints on the proxy's processes, $DURATION each, same wrk load):"
        echo
        cat "$WORK/syscalls.tmp"
        echo
    } >>"$WORK/profile.md"
    cp "$WORK/profile.md" "${PROFILE_OUT:-/tmp/keygate-load-profile.md}"
    log "profile written to ${PROFILE_OUT:-/tmp/keygate-load-profile.md}"
    cat "$WORK/profile.md" >&2
    set -o pipefail
fi

# ---------------------------------------------------------------- memory
: >"$WORK/memory.tsv"
mem_row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$WORK/memory.tsv"; log "memory: $1: $2"; }
stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while kill -0 "$1" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
}
if [ "$MEMORY" = 1 ]; then
    mem_row "keygate after the load rounds, idle" "$(mib "$(rss_kib "$KG1_PID")")" \
        "the \`keygate\` instance above (peak VmHWM $(mib "$(hwm_kib "$KG1_PID")"))"

    # Idle connections, on a fresh instance.
    start_keygate keygate-conns false
    http_status "$KG_PORT" /api/x -H "Host: $HOST_HEADER" -H "Authorization: Bearer $TOKEN" >/dev/null
    idle=$(rss_kib "$KG_PID")
    mem_row "keygate idle (fresh, one request served)" "$(mib "$idle")" "fresh process, cache warm with one key"
    mkfifo "$WORK/hold"
    timeout 300 python3 "$HERE/idle_conns.py" "$KG_PORT" "$IDLE_CONNS" --host-header "$HOST_HEADER" \
        --token "$TOKEN" --hold 240 <"$WORK/hold" >"$WORK/idle.out" 2>&1 &
    IDLE_PID=$!
    PIDS+=($IDLE_PID)
    exec 7>"$WORK/hold"
    wait_until "$IDLE_CONNS idle connections" 180 grep -q '^ready' "$WORK/idle.out"
    held=$(rss_kib "$KG_PID")
    mem_row "keygate with $IDLE_CONNS idle keep-alive connections" "$(mib "$held")" \
        "each connection served one keyed request, then held open ($(sed -n 's/^ready //p' "$WORK/idle.out")); RSS read as soon as the last one was served; +$(awk -v a="$held" -v b="$idle" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f KiB", (a - b) / n }') per connection"
    # Idle HTTP/1 connections are parked after 100 ms (listener::PARK_AFTER):
    # the same connections a few seconds later.
    sleep 3
    parked=$({ curl -s -m 5 "http://127.0.0.1:$KG_ADMIN/metrics" || true; } \
        | awk '$1 == "keygate_parked_connections" { print $2 }')
    settled=$(rss_kib "$KG_PID")
    mem_row "… the same, 3 s later" "$(mib "$settled")" \
        "${parked:-?} of them parked (\`keygate_parked_connections\`); +$(awk -v a="$settled" -v b="$idle" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f KiB", (a - b) / n }') per connection"
    # Same for nginx's worker, for comparison.
    exec 7>&-
    wait "$IDLE_PID" 2>/dev/null || true
    NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -1)
    ngx_idle=$(rss_kib "$NGINX_WORKER")
    rm -f "$WORK/hold"
    mkfifo "$WORK/hold"
    timeout 300 python3 "$HERE/idle_conns.py" "$NGINX_PORT" "$IDLE_CONNS" --host-header "$HOST_HEADER" \
        --token "$TOKEN" --hold 240 <"$WORK/hold" >"$WORK/idle-nginx.out" 2>&1 &
    IDLE_PID=$!
    PIDS+=($IDLE_PID)
    exec 7>"$WORK/hold"
    wait_until "$IDLE_CONNS idle connections to nginx" 180 grep -q '^ready' "$WORK/idle-nginx.out"
    ngx_held=$(rss_kib "$NGINX_WORKER")
    mem_row "for comparison: nginx worker, idle → $IDLE_CONNS idle connections" \
        "$(mib "$ngx_idle") → $(mib "$ngx_held")" "same client ($(sed -n 's/^ready //p' "$WORK/idle-nginx.out"))"
    exec 7>&-
    wait "$IDLE_PID" 2>/dev/null || true
    stop_pid "$KG_PID"

    # Cached keys, on a fresh instance.
    log "seeding $CACHED_KEYS keys into redis"
    t0=$SECONDS
    python3 "$HERE/seed_keys.py" "$CACHED_KEYS" "$WORK/tokens.txt" --slug "$SLUG" \
        | redis-cli -p "$REDIS_PORT" --pipe >"$WORK/seed.out" 2>&1 || die "seeding failed: $(tail -3 "$WORK/seed.out")"
    seed_secs=$((SECONDS - t0))
    start_keygate keygate-keys false
    http_status "$KG_PORT" /api/x -H "Host: $HOST_HEADER" -H "Authorization: Bearer $TOKEN" >/dev/null
    before=$(rss_kib "$KG_PID")
    cache_misses() {
        { curl -s -m 5 "http://127.0.0.1:$KG_ADMIN/metrics" || true; } \
            | awk '/^keygate_auth_cache_misses_total/ && !seen { print $2; seen = 1 }'
    }
    misses0=$(cache_misses)
    t0=$SECONDS
    # The Lua script stops sending after one request per key, but wrk itself
    # only ends at -d: stop it (SIGINT: it prints its summary) once keygate
    # has looked every key up.
    TOKENS_FILE="$WORK/tokens.txt" STOP_AFTER="$CACHED_KEYS" taskset -c "$CLIENT_CPU" \
        wrk -t1 -c"$CONNS" -d240s -H "Host: $HOST_HEADER" -s "$HERE/cycle_tokens.lua" \
        "http://127.0.0.1:$KG_PORT/api/x" >"$WORK/wrk-keys.txt" 2>&1 &
    WRK_PID=$!
    PIDS+=($WRK_PID)
    deadline=$((SECONDS + 240))
    while kill -0 "$WRK_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
        m=$(cache_misses)
        [ "${m:-0}" -ge $(( ${misses0:-0} + CACHED_KEYS )) ] && break
        sleep 0.2
    done
    fill_secs=$((SECONDS - t0))
    kill -INT "$WRK_PID" 2>/dev/null || true
    wait "$WRK_PID" 2>/dev/null || true
    after=$(rss_kib "$KG_PID")
    misses=$(( $(cache_misses) - ${misses0:-0} ))
    read -r kreq _ _ _ knon2xx kerr < <(python3 "$HERE/report.py" wrk "$WORK/wrk-keys.txt")
    note="$CACHED_KEYS keys seeded with seed_keys.py piped into redis-cli --pipe (${seed_secs}s), then one request per key (wrk + cycle_tokens.lua, ${fill_secs}s: $kreq requests, non-2xx $knon2xx, socket errors $kerr; cache misses ${misses:-?})"
    if [ "$CACHED_KEYS" -ne 100000 ]; then
        note="$note; extrapolated to 100k keys: $(mib "$(awk -v a="$after" -v b="$before" -v n="$CACHED_KEYS" 'BEGIN { printf "%d", b + (a - b) * 100000 / n }')")"
    fi
    mem_row "keygate idle (fresh) → with $CACHED_KEYS cached keys" "$(mib "$before") → $(mib "$after")" \
        "$note; +$(awk -v a="$after" -v b="$before" -v n="$CACHED_KEYS" 'BEGIN { printf "%.0f B", (a - b) * 1024 / n }') per key"
    stop_pid "$KG_PID"
fi
UPTIME_AFTER=$(uptime | sed 's/^ *//')
read -r STEAL1 TOTAL1 < <(proc_steal)
STEAL=$(awk -v s="$((STEAL1 - STEAL0))" -v t="$((TOTAL1 - TOTAL0))" 'BEGIN { if (t > 0) printf "%.1f%%", 100 * s / t; else print "?" }')

# ---------------------------------------------------------------- report
{
    echo "date=$(date -u '+%Y-%m-%d %H:%M')"
    echo "nproc=$(nproc)"
    echo "cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)"
    echo "kernel=$(uname -r)"
    echo "uptime_before=$UPTIME_BEFORE"
    echo "uptime_after=$UPTIME_AFTER"
    echo "nginx=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
    echo "wrk=wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "redis=redis $(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')"
    echo "rustc=$(rustc --version | awk '{print $1, $2}')"
    echo "commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+uncommitted changes')"
    echo "client_cpu=$CLIENT_CPU"
    echo "proxy_cpu=$PROXY_CPU"
    echo "conns=$CONNS"
    echo "duration=$DURATION"
    echo "rounds=$ROUNDS"
    echo "warmup=$WARMUP"
    echo "mode=$MODE"
    echo "streams=$STREAMS"
    echo "h2load=$(if [ "$H2" = 1 ]; then h2load --version 2>/dev/null | head -1; else echo 'not used'; fi)"
    echo "steal=$STEAL"
} >"$WORK/meta.env"
{
    echo '```sh'
    echo "MODE=$MODE ROUNDS=$ROUNDS DURATION=$DURATION bash benches/load/run.sh   # builds, starts everything, writes this section"
    echo "# per run (TARGET port differs; the token is a real key minted with \`keygate keys mint --json\`):"
    if [ "$H2" = 1 ]; then
        echo "taskset -c $CLIENT_CPU h2load -t1 -c$CONNS -m$STREAMS -D$(secs "$DURATION") -H ':authority: $HOST_HEADER' -H 'Authorization: Bearer <token>' $SCHEME://127.0.0.1:<port>/api/x"
    else
        echo "taskset -c $CLIENT_CPU wrk -t1 -c$CONNS -d$DURATION --latency -H 'Host: $HOST_HEADER' -H 'Authorization: Bearer <token>'$(if [ "$MODE" = post ]; then echo " -s benches/load/post_1k.lua"; fi) $SCHEME://127.0.0.1:<port>/api/x"
    fi
    echo "taskset -c $PROXY_CPU <upstream> 127.0.0.1:0      # benches/load/upstream.rs: current_thread hyper, answers 200 \"ok\""
    echo "taskset -c $PROXY_CPU keygate serve --config keygate.toml"
    echo "taskset -c $PROXY_CPU nginx -p <dir> -c nginx.conf   # 1 worker"
    echo "taskset -c $CLIENT_CPU redis-server --port <port> --save '' --appendonly no"
    echo '```'
    echo
    echo "keygate config (ports filled in by the script; \`keygate-log\` has \`access = true\`):"
    echo
    echo '```toml'
    sed -e "s/$KG1_PORT/<port>/; s/$KG1_ADMIN/<admin port>/; s/$UPSTREAM_PORT/<upstream port>/; s/$REDIS_PORT/<redis port>/" "$KG1_CONFIG"
    echo '```'
    echo
    echo "nginx config (\`nginx\` on <port>, \`nginx-log\` on <log port>):"
    echo
    echo '```nginx'
    sed -e "s/$TOKEN/<token>/; s/$KEY_ID/<key id>/; s/$UPSTREAM_PORT/<upstream port>/" \
        -e "s/:$NGINX_PORT/:<port>/; s/:$NGINX_LOG_PORT/:<log port>/; s#$WORK#<dir>#g" "$WORK/nginx/nginx.conf"
    echo '```'
    echo
    echo "What the app receives for \`GET /__headers\` with the key, a forged \`X-Molecule-Principal: forged\` and \`X-Forwarded-For: 203.0.113.9\` (the upstream echoes its request headers on that path):"
    echo
    echo '| via nginx | via keygate |'
    echo '| --- | --- |'
    paste -d '|' "$WORK/headers-nginx.txt" "$WORK/headers-keygate.txt" | sed -e 's/^/| `/' -e 's/|/` | `/2' -e 's/$/` |/' -e 's/``//g'
    echo
    echo "Same-job check before the rounds (status codes; ok = the minted key, badkey = a well-formed unknown key, admin = \`/cp/admin/x\`, host = \`Host: evil.example\`, anon = no Authorization):"
    echo
    echo '```text'
    cat "$WORK/check.txt"
    echo '```'
} >"$WORK/commands.md"
python3 "$HERE/report.py" markdown "$WORK" >"$WORK/section.md"
cat "$WORK/section.md"
if [ "$WRITE" = 1 ]; then
    python3 "$HERE/report.py" splice "$REPO/BENCHMARKS.md" "$WORK/section.md" "$MODE"
    log "BENCHMARKS.md updated"
else
    log "BENCHMARKS.md not written (WRITE=$WRITE; set WRITE=1 to force)"
fi
