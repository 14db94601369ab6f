#!/usr/bin/env bash
# `make docker-test`: build the image and run it as a user would, against a real Docker daemon.
#
#   make docker-test                                             # the Dockerfile's CUDA base
#   make docker-test BASE_IMAGE=proxy-serve-base:bookworm        # a stand-in base (scripts/docker_base.sh)
#   SKIP_BUILD=1 IMAGE=proxy-serve:test scripts/docker_test.sh   # an image already built
#
# Checks: the build (time and size printed); the container started with a flag after the image name
# (--api-key) still serves the trained demo as `proxy-tuned`; /health and Docker's own health check turn
# healthy; a key is required; a chat answers the demo's held-out question correctly; a stream arrives as
# several SSE events ending in [DONE]; the server runs as uid 10001; `docker stop` during a stream drains
# (the stream still ends with [DONE]) and the container exits 0 before Docker's 10 s SIGKILL.
# Not part of `make test`: the build downloads GBs (the CUDA torch wheel). Loopback only (127.0.0.1).
set -euo pipefail

IMAGE=${IMAGE:-proxy-serve:test}
BASE_IMAGE=${BASE_IMAGE:-}
TORCH_SPEC=${TORCH_SPEC:-}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
PORT=${PORT:-18000}
KEY=sk-docker-test
NAME=proxy-serve-test-$$
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d)

cleanup() {
    docker rm -f "$NAME" > /dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
    echo "docker-test: FAIL: $*" >&2
    echo "--- container log (last 40 lines)" >&2
    docker logs --tail 40 "$NAME" >&2 2>&1 || true
    exit 1
}
ok() { echo "docker-test: ok: $*"; }

# A JSON field of a file, read with the host's python3 (no jq needed).
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}))" "$@"; }

cd "$(dirname "$0")/.."

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    args=()
    [ -n "$BASE_IMAGE" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    [ -n "$TORCH_SPEC" ] && args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
    [ -n "$TORCH_INDEX_URL" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    start=$(date +%s)
    docker build "${args[@]}" -t "$IMAGE" . || fail "docker build"
    ok "built $IMAGE in $(( $(date +%s) - start )) s${BASE_IMAGE:+ on $BASE_IMAGE}"
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
ok "image size $(( size / 1000000 )) MB"
[ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = "10001:10001" ] || fail "image USER is not 10001"

# A flag after the image name must add to the default configuration, not replace it.
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" "$IMAGE" --api-key "$KEY" > /dev/null

deadline=$(( $(date +%s) + 300 ))
until curl -fs "$URL/health" > /dev/null; do
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "the container exited"
    [ "$(date +%s)" -lt "$deadline" ] || fail "/health not 200 within 300 s"
    sleep 1
done
ok "/health 200"
deadline=$(( $(date +%s) + 120 ))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "Docker's HEALTHCHECK not healthy within 120 s"
    sleep 2
done
ok "docker health: healthy"

[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/models")" = 401 ] || fail "no key: expected 401"
curl -fs -H "Authorization: Bearer $KEY" "$URL/v1/models" > "$WORK/models.json" || fail "/v1/models"
[ "$(field "$WORK/models.json" "[m['id'] for m in d['data']][0]")" = proxy-tuned ] || fail "model id is not proxy-tuned"
ok "/v1/models lists proxy-tuned (with the key; 401 without)"

curl -fs "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"model": "proxy-tuned", "messages": [{"role": "user", "content": "Where does Anouk Brenner live?"}],
         "max_tokens": 16, "temperature": 0}' > "$WORK/chat.json" || fail "chat request"
answer=$(field "$WORK/chat.json" "d['choices'][0]['message']['content']")
case "$answer" in
    *Islebrook*) ok "chat: the trained demo answers '$answer'" ;;
    *) fail "chat: expected the trained demo's answer (Islebrook), got '$answer'" ;;
esac

curl -fsN "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"model": "proxy-tuned", "messages": [{"role": "user", "content": "Tell me about Anouk Brenner."}],
         "max_tokens": 32, "stream": true}' > "$WORK/stream.txt" || fail "stream request"
events=$(grep -c '^data: ' "$WORK/stream.txt" || true)
[ "$(grep '^data: ' "$WORK/stream.txt" | tail -1)" = "data: [DONE]" ] || fail "the stream does not end with [DONE]"
[ "$events" -ge 3 ] || fail "the stream has $events events"
ok "stream: $events SSE events, ending with [DONE]"

[ "$(docker exec "$NAME" id -u)" = 10001 ] || fail "exec user is not 10001"
[ "$(docker exec "$NAME" stat -c %u /proc/1)" = 10001 ] || fail "the server (pid 1) does not run as uid 10001"
ok "the server runs as uid 10001 (non-root)"

# Drain: a stream is running when `docker stop` sends SIGTERM; it must still end with [DONE], and the
# container must exit 0 before Docker's default 10 s SIGKILL.
curl -sN "$URL/v1/completions" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"model": "proxy-tuned", "prompt": "Anouk Brenner", "max_tokens": 200, "n": 8, "stream": true,
         "ignore_eos": true}' > "$WORK/drain.txt" 2>&1 &
streamer=$!
until grep -q '^data: {' "$WORK/drain.txt" 2>/dev/null; do
    kill -0 "$streamer" 2> /dev/null || fail "the drain stream ended early: $(head -c 300 "$WORK/drain.txt")"
    sleep 0.2
done
start=$(date +%s.%N)
docker stop "$NAME" > /dev/null
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
wait "$streamer" || true
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "docker stop: exit code $code after $elapsed s (137 = killed: the drain outlasted the stop timeout)"
drained=$(docker logs "$NAME" 2>&1 | grep -o "SIGTERM: draining.*" | head -1)
[ -n "$drained" ] || fail "no drain in the log"
ok "log: $drained"
[ "$(grep '^data: ' "$WORK/drain.txt" | tail -1)" = "data: [DONE]" ] || fail "the drained stream did not end with [DONE]"
ok "docker stop: drained and exited 0 in $elapsed s; the running stream ended with [DONE]"
echo "docker-test: PASS"
