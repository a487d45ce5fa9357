#!/usr/bin/env bash
# A cluster on this machine: N `shira serve` replicas on loopback sharing one Redis, behind the gateway of
# deploy/gateway run by Debian's nginx as this user (`make nginx-test` installs it).
#
#   deploy/local-cluster.sh up       start what is not running, wait until every replica is ready
#   deploy/local-cluster.sh down     stop the gateway and every replica
#   deploy/local-cluster.sh status   one line each; exit 1 unless all of them answer
#
# Settings, from the environment (`up` records them in the state dir, so `down` and `status` need none):
#   SHIRA_REPLICAS=3          number of replicas
#   CLUSTER_PORT=8100         the gateway's port; replica i (1..N) listens on CLUSTER_PORT + i
#   CLUSTER_DIR=.cluster      state: each replica's data dir, log and pid file; the gateway's config and logs
#   GATEWAY_POLICY=affinity   or least_conn: both upstreams balance by least connections (for measurements)
#   SHIRA_REDIS_URL           default redis://127.0.0.1:6379/0; it must answer (`make redis-test` starts one)
#   SHIRA_ADMIN_TOKEN         default: one made at the first `up`, kept in CLUSTER_DIR/admin-token
#   SHIRA_THREADS             default: this machine's CPUs shared among the replicas
#   SHIRA_MODEL_CACHE_DIR     default: the repository's data/models (`make install` converts the model there),
#                             so each replica loads in seconds
#   CLUSTER_TIMEOUT=300       seconds `up` waits for the replicas
#   NGINX                     default: nginx on PATH, else /usr/sbin/nginx
# Other SHIRA_* variables (SHIRA_NAMESPACE, SHIRA_DEVICE, ...) pass on to every replica.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$REPO/.venv/bin/python
SHIRA=$REPO/.venv/bin/shira
STATE=${CLUSTER_DIR:-$REPO/.cluster}
[[ ! -d $STATE ]] || STATE=$(cd "$STATE" && pwd)  # nginx -p and the pid files want absolute paths
NJS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so

die() { echo "local-cluster: $*" >&2; exit 1; }

alive() {  # alive PIDFILE WHAT: the process in PIDFILE runs and its command line holds WHAT (no reused pid)
    [[ -f $1 ]] && ps -p "$(cat "$1")" -o args= 2>/dev/null | grep -q -- "$2"
}

http_status() {  # http_status URL: the status code, 0 when nothing answers
    "$PY" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
EOF
}

nginx_binary() {
    local found=${NGINX:-$(command -v nginx || true)}
    [[ -n $found ]] || found=/usr/sbin/nginx
    [[ -x $found ]] || die "no nginx: run \`make nginx-test\` (installs Debian's nginx and libnginx-mod-http-js)"
    echo "$found"
}

gateway() {  # gateway ARGS...: nginx with the cluster's prefix, config, pid file and error log
    "$(nginx_binary)" -p "$STATE/gateway" -c "$STATE/gateway/nginx.conf" -e "$STATE/gateway/error.log" \
        -g "pid $STATE/gateway/nginx.pid;" "$@"
}

load_recorded() {  # the settings of the last `up`, for down and status
    if [[ -f $STATE/cluster.env ]]; then
        # shellcheck disable=SC1091
        source "$STATE/cluster.env"
    fi
    REPLICAS=${REPLICAS:-${SHIRA_REPLICAS:-3}}
    PORT=${PORT:-${CLUSTER_PORT:-8100}}
}

write_gateway_config() {
    local dir=$STATE/gateway balance=$1 i
    mkdir -p "$dir/temp"
    cp "$REPO/deploy/gateway/nginx.conf" "$REPO/deploy/gateway/affinity.js" "$dir/"
    echo "listen 127.0.0.1:$PORT;" >"$dir/listen.conf"
    {
        echo "# Written by deploy/local-cluster.sh (GATEWAY_POLICY=$POLICY)."
        echo "access_log $dir/access.log shira;"
        # Debian's compiled-in temp paths are under /var/lib/nginx, which only root may write.
        for kind in client_body proxy fastcgi uwsgi scgi; do
            echo "${kind}_temp_path $dir/temp/$kind;"
        done
        for upstream in shira_affinity shira_spread; do
            echo "upstream $upstream {"
            echo "    zone $upstream 64k;"
            if [[ $upstream == shira_affinity ]]; then echo "    $balance"; else echo "    least_conn;"; fi
            for ((i = 1; i <= REPLICAS; i++)); do
                echo "    server 127.0.0.1:$((PORT + i)) max_fails=1 fail_timeout=10s;"
            done
            echo "    keepalive 16;"
            echo "}"
        done
    } >"$dir/environment.conf"
}

start_replica() {  # start_replica I
    local i=$1 dir=$STATE/replica-$1 port=$((PORT + $1))
    mkdir -p "$dir/data"
    if alive "$dir/pid" "shira serve"; then
        echo "replica $i: already running (pid $(cat "$dir/pid"), port $port)"
        return
    fi
    echo "$port" >"$dir/port"
    # Started from its own directory so that no .env file of the caller's is read.
    (
        cd "$dir"
        SHIRA_DATA_DIR="$dir/data" SHIRA_HOST=127.0.0.1 SHIRA_PORT=$port PYTHONUNBUFFERED=1 \
            nohup "$SHIRA" serve --port "$port" >"$dir/serve.log" 2>&1 &
        echo $! >"$dir/pid"  # nohup execs the server: this is the server's pid
    )
    echo "replica $i: started (pid $(cat "$dir/pid"), port $port, log $dir/serve.log)"
}

wait_ready() {  # wait_ready I: until the replica's /ready answers 200
    local i=$1 dir=$STATE/replica-$1 port=$((PORT + $1)) deadline=$((SECONDS + ${CLUSTER_TIMEOUT:-300}))
    until [[ $(http_status "http://127.0.0.1:$port/ready") == 200 ]]; do
        if ! alive "$dir/pid" "shira serve"; then
            tail -n 30 "$dir/serve.log" >&2
            die "replica $i (port $port) exited; its log is $dir/serve.log"
        fi
        ((SECONDS < deadline)) || die "replica $i (port $port) not ready after ${CLUSTER_TIMEOUT:-300} s; see $dir/serve.log"
        sleep 0.5
    done
}

up() {
    [[ -x $SHIRA ]] || die "no $SHIRA: run \`make install\` first"
    [[ -f $NJS_MODULE ]] || die "no njs module ($NJS_MODULE): run \`make nginx-test\`"
    REPLICAS=${SHIRA_REPLICAS:-3}
    PORT=${CLUSTER_PORT:-8100}
    POLICY=${GATEWAY_POLICY:-affinity}
    local balance
    # shellcheck disable=SC2016  # $shira_adapter is nginx's variable, not the shell's
    case $POLICY in
        affinity) balance='hash $shira_adapter consistent;' ;;
        least_conn) balance='least_conn;' ;;
        *) die "GATEWAY_POLICY is affinity or least_conn, not '$POLICY'" ;;
    esac
    mkdir -p "$STATE"
    STATE=$(cd "$STATE" && pwd)

    export SHIRA_REDIS_URL=${SHIRA_REDIS_URL:-redis://127.0.0.1:6379/0}
    "$PY" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2).ping()' \
        "$SHIRA_REDIS_URL" 2>/dev/null \
        || die "no Redis answers at $SHIRA_REDIS_URL: start one (\`make redis-test\`) or set SHIRA_REDIS_URL"
    if [[ -z ${SHIRA_ADMIN_TOKEN:-} ]]; then
        if [[ ! -f $STATE/admin-token ]]; then
            (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' >"$STATE/admin-token")
        fi
        SHIRA_ADMIN_TOKEN=$(cat "$STATE/admin-token")
    fi
    export SHIRA_ADMIN_TOKEN
    export SHIRA_MODEL_CACHE_DIR=${SHIRA_MODEL_CACHE_DIR:-$REPO/data/models}
    # Replicas on one machine share its cores: one torch thread pool each of the machine's size would thrash.
    export SHIRA_THREADS=${SHIRA_THREADS:-$(( $(nproc) / REPLICAS > 0 ? $(nproc) / REPLICAS : 1 ))}
    printf 'REPLICAS=%s\nPORT=%s\nPOLICY=%s\n' "$REPLICAS" "$PORT" "$POLICY" >"$STATE/cluster.env"

    local i
    for ((i = 1; i <= REPLICAS; i++)); do start_replica "$i"; done

    write_gateway_config "$balance"
    gateway -t -q || die "the gateway config does not load; see $STATE/gateway/error.log"
    if alive "$STATE/gateway/nginx.pid" nginx; then
        gateway -s reload
        echo "gateway: reloaded (port $PORT)"
    else
        gateway
        echo "gateway: started (port $PORT, policy $POLICY)"
    fi

    for ((i = 1; i <= REPLICAS; i++)); do wait_ready "$i"; done
    local deadline=$((SECONDS + 30))
    until [[ $(http_status "http://127.0.0.1:$PORT/ready") == 200 ]]; do
        ((SECONDS < deadline)) || die "the gateway on port $PORT does not answer; see $STATE/gateway/error.log"
        sleep 0.2
    done
    echo "ready: http://127.0.0.1:$PORT ($REPLICAS replicas, ports $((PORT + 1))-$((PORT + REPLICAS)))"
    if [[ -f $STATE/admin-token && $(cat "$STATE/admin-token") == "$SHIRA_ADMIN_TOKEN" ]]; then
        echo "admin token: in $STATE/admin-token"
    else
        echo "admin token: SHIRA_ADMIN_TOKEN"
    fi
}

stop() {  # stop PIDFILE NAME WHAT: TERM, then KILL after 30 s
    local pidfile=$1 name=$2 what=$3 pid waited=0
    alive "$pidfile" "$what" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pidfile" "$what" && ((waited < 300)); do sleep 0.1; waited=$((waited + 1)); done
    if alive "$pidfile" "$what"; then
        kill -KILL "$pid" 2>/dev/null || true
        echo "$name: killed (pid $pid did not stop in 30 s)"
    else
        echo "$name: stopped"
    fi
    rm -f "$pidfile"
}

down() {
    [[ -d $STATE ]] || { echo "nothing to stop: no $STATE"; return; }
    stop "$STATE/gateway/nginx.pid" gateway nginx
    local dir
    # Every replica gets TERM first, so they drain side by side.
    for dir in "$STATE"/replica-*; do
        if alive "$dir/pid" "shira serve"; then kill -TERM "$(cat "$dir/pid")" 2>/dev/null || true; fi
    done
    for dir in "$STATE"/replica-*; do
        [[ -d $dir ]] && stop "$dir/pid" "$(basename "$dir")" "shira serve"
    done
    return 0
}

status() {
    load_recorded
    local ok=0 dir port state
    for dir in "$STATE"/replica-*; do
        [[ -d $dir ]] || continue
        port=$(cat "$dir/port" 2>/dev/null || echo "?")
        if alive "$dir/pid" "shira serve"; then
            state="pid $(cat "$dir/pid"), /ready $(http_status "http://127.0.0.1:$port/ready")"
            [[ $state == *"/ready 200" ]] || ok=1
        else
            state="stopped"; ok=1
        fi
        echo "$(basename "$dir"): port $port, $state"
    done
    if alive "$STATE/gateway/nginx.pid" nginx; then
        echo "gateway: port $PORT, pid $(cat "$STATE/gateway/nginx.pid"), policy ${POLICY:-?}"
    else
        echo "gateway: stopped"; ok=1
    fi
    return $ok
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
