#!/usr/bin/env bash
# Starts (or stops) a throwaway loopback redis-server for `make run`:
#   scripts/redis-local.sh start [port]   # default 6379; no-op if something listens
#   scripts/redis-local.sh stop [port]
# No persistence; its pid and log live under target/redis-local/.
set -euo pipefail
cmd=${1:-start}
port=${2:-6379}
dir="$(cd "$(dirname "$0")/.." && pwd)/target/redis-local"
mkdir -p "$dir"
pidfile="$dir/redis-$port.pid"

case "$cmd" in
  start)
    if redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
      echo "redis-local: something already answers on 127.0.0.1:$port; using it" >&2
      exit 0
    fi
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --daemonize yes --pidfile "$pidfile" --logfile "$dir/redis-$port.log"
    for _ in $(seq 1 100); do
      if redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
        echo "redis-local: redis-server on 127.0.0.1:$port (pid $(cat "$pidfile"))" >&2
        exit 0
      fi
      sleep 0.05
    done
    echo "redis-local: redis-server did not start; see $dir/redis-$port.log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
    ;;
  *)
    echo "usage: $0 start|stop [port]" >&2
    exit 2
    ;;
esac
