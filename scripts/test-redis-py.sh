#!/usr/bin/env bash
# redis-py 8 against the real proxy binary and a redis-server of its own,
# each on a free loopback port (tests/redis_py/test_clients.py). redis-py
# comes from PyPI into a venv under target/; when PyPI cannot be reached the
# run is skipped with a loud line (and exit 0), which CI's log then shows.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${PROXY_BIN:-target/debug/redis-proxy}
VENV=target/venv-redis-py
PY=$VENV/bin/python

if ! "$PY" -c 'import redis, sys; sys.exit(0 if redis.__version__.startswith("8.") else 1)' 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check 'redis>=8,<9'; then
        echo "=================================================================="
        echo "SKIPPED: redis-py tests (cannot install redis>=8,<9 from PyPI)"
        echo "=================================================================="
        rm -rf "$VENV"
        exit 0
    fi
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(free_port)
RESP_PORT=$(free_port)
HTTP_PORT=$(free_port)
DIR=$(mktemp -d)
cleanup() {
    [ -n "${PROXY_PID:-}" ] && kill "$PROXY_PID" 2>/dev/null || true
    [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR" --appendonly no \
    --daemonize no --loglevel warning --save "" >"$DIR/redis.log" 2>&1 &
REDIS_PID=$!
env -u REDIS_HOST -u REDIS_PORT -u REDIS_DB \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" PROXY_PORT="$HTTP_PORT" RESP_PORT="$RESP_PORT" \
    PROXY_ALLOW_WRITES=1 RUST_LOG=warn "$BIN" >"$DIR/proxy.log" 2>&1 &
PROXY_PID=$!
for _ in $(seq 100); do
    if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && redis-cli -p "$RESP_PORT" ping >/dev/null 2>&1; then
        break
    fi
    sleep 0.1
done

echo "redis-py $("$PY" -c 'import redis; print(redis.__version__)') against redis-proxy on $RESP_PORT (redis-server on $REDIS_PORT)"
if ! REDIS_PORT=$REDIS_PORT RESP_PORT=$RESP_PORT "$PY" tests/redis_py/test_clients.py; then
    echo "--- proxy log"; cat "$DIR/proxy.log"
    exit 1
fi
