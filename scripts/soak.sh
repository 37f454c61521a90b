#!/usr/bin/env bash
# Soak test: mixed HTTP load against the proxy for SOAK_SECONDS (default 600)
# while Redis is restarted twice; prints requests, non-2xx by cause and
# window, and the proxy's RSS at start, middle and end.
#
#   scripts/soak.sh                 # 10 minutes
#   SOAK_SECONDS=60 scripts/soak.sh # a quick one
#
# Load (wrk, loopback only): hits on a hot set, misses over a key space far
# larger than the cache, absent keys (404), and a second wrk whose requests
# carry `Connection: close` (a new connection per request).
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECONDS=${SOAK_SECONDS:-600}
CONNS=${SOAK_CONNS:-32}
DOWN_SECONDS=${SOAK_DOWN_SECONDS:-3}

scripts/deps.sh wrk >/dev/null
cargo build --release --quiet

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
redis_port=$(free_port)
proxy_port=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_redis() {
  redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --daemonize yes --logfile "$work/redis.log" --dir "$work"
  for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "soak: redis did not start" >&2; exit 1
}
# 20,000 keys of 100 bytes, written with one pipelined redis-cli.
seed() {
  python3 -c '
v = "v" * 100
for i in range(20000):
    k = f"key:{i}"
    print(f"*3\r\n$3\r\nSET\r\n${len(k)}\r\n{k}\r\n${len(v)}\r\n{v}\r")
' | redis-cli -p "$redis_port" --pipe >/dev/null
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start_redis
# The cache holds 2,000 of the 20,000 keys.
seed

REDIS_URL="redis://127.0.0.1:$redis_port/0" PROXY_PORT=$proxy_port CACHE_CAPACITY=2000 \
  CACHE_TTL_MS=5000 REDIS_TIMEOUT_MS=500 RUST_LOG=warn \
  ./target/release/redis-proxy 2>"$work/proxy.log" &
proxy=$!
pids+=("$proxy")
for _ in $(seq 1 100); do curl -sf "localhost:$proxy_port/-/healthy" >/dev/null && break; sleep 0.05; done

cat >"$work/mix.lua" <<'LUA'
-- 60 % hot hits, 30 % misses over 20k keys, 10 % absent keys.
local counter = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 1000)
  statuses = {}
  errsec = {}
end
function request()
  counter = counter + 1
  local r = math.random(100)
  local path
  if r <= 60 then path = "/key:" .. math.random(0, 199)
  elseif r <= 90 then path = "/key:" .. math.random(200, 19999)
  else path = "/absent:" .. math.random(0, 100000) end
  return wrk.format("GET", path)
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 500 then
    local s = os.time()
    errsec[s] = (errsec[s] or 0) + 1
  end
end
function done(summary, latency, requests)
  local total = {}
  local secs = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
    for k, v in pairs(t:get("errsec")) do secs[k] = (secs[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("status %d %d\n", k, v)) end
  for k, v in pairs(secs) do io.write(string.format("errsec %d %d\n", k, v)) end
  io.write(string.format("errors connect=%d read=%d write=%d timeout=%d status=%d\n",
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, summary.errors.status))
  io.write(string.format("latency p50=%.2fms p99=%.2fms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA

rss_start=$(rss_kb "$proxy")
start_s=$(date +%s)
wrk -t2 -c"$CONNS" -d"${SOAK_SECONDS}s" --timeout 5s -s "$work/mix.lua" \
  "http://127.0.0.1:$proxy_port" >"$work/wrk-main.txt" 2>&1 &
w1=$!
wrk -t1 -c4 -d"${SOAK_SECONDS}s" --timeout 5s -H "Connection: close" -s "$work/mix.lua" \
  "http://127.0.0.1:$proxy_port" >"$work/wrk-close.txt" 2>&1 &
w2=$!
pids+=("$w1" "$w2")

windows=()
restart_at() {
  local at=$1
  local wait_s=$((start_s + at - $(date +%s)))
  if [ "$wait_s" -gt 0 ]; then sleep "$wait_s"; fi
  local down=$(date +%s)
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  sleep "$DOWN_SECONDS"
  start_redis
  seed
  # Service must be back within 1 s of Redis returning: allow 2 s of slack.
  windows+=("$down:$(( $(date +%s) + 2 ))")
}
restart_at $((SOAK_SECONDS / 3))
rss_mid=$(rss_kb "$proxy")
restart_at $((2 * SOAK_SECONDS / 3))
wait "$w1" "$w2" || true
rss_end=$(rss_kb "$proxy")

in_window() {
  local s=$1
  for w in "${windows[@]}"; do
    local a=${w%%:*} b=${w##*:}
    if [ "$s" -ge "$a" ] && [ "$s" -le "$b" ]; then return 0; fi
  done
  return 1
}
echo "== soak: ${SOAK_SECONDS}s, $CONNS keep-alive + 4 reconnecting connections, redis restarted twice ($DOWN_SECONDS s down each)"
for f in wrk-main wrk-close; do
  reqs=$(awk '/requests in/ {print $1}' "$work/$f.txt")
  echo "-- $f: $reqs requests; $(grep -h '^latency' "$work/$f.txt")"
  grep -h '^status' "$work/$f.txt" | sort -k2n | awk '{printf "   HTTP %s: %s\n", $2, $3}'
  grep -h '^errors' "$work/$f.txt" | sed 's/^/   socket /'
done
outside=0
inside=0
while read -r _ sec n; do
  if in_window "$sec"; then inside=$((inside + n)); else outside=$((outside + n)); fi
done < <(grep -h '^errsec' "$work/wrk-main.txt" "$work/wrk-close.txt" || true)
echo "5xx inside Redis-down windows: $inside; outside: $outside"
echo "RSS kB: start $rss_start, middle $rss_mid, end $rss_end"
awk -v a="$rss_mid" -v b="$rss_end" 'BEGIN { d = (b - a) / a * 100; printf "RSS change middle->end: %.1f %%\n", d }'
if [ "$outside" -gt 0 ]; then
  echo "soak: FAILED: $outside server errors outside the Redis-down windows" >&2
  exit 1
fi
