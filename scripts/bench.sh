#!/usr/bin/env bash
# One loopback benchmark run of redis-proxy against its reference points:
#
#   (a) proxy, cache hits          (b) proxy, CACHE_CAPACITY=0 (every GET goes to Redis)
#   (c) webdis (GET/key.txt)       (d) examples/bare_http (the may_minihttp floor)
#   (e) proxy, hits, CACHE_INVALIDATION=tracking
#   (f) proxy, hits, CACHE_MAX_BYTES set (large enough to hold every key): the byte bound's cost
#   RESP: redis-benchmark -t get at -P 1 and -P 16 against the proxy (hits), the proxy
#       (all-miss, CACHE_CAPACITY=0), twemproxy (nutcracker, one server entry: the same
#       redis-server) and redis-server itself
#   hot key at expiry: wrk -c 64 on 10 keys for BENCH_HOT_DURATION, CACHE_TTL_MS=1000,
#       with and without CACHE_STALE_WHILE_REVALIDATE_MS: p99 and max latency side by side
#   idle: 10,000 idle keep-alive connections held open: others still served? proxy RSS?
#   TLS rows: all-miss and hits over rediss:// beside plain TCP (tls_rows; BENCH_TLS=0 skips)
#   cluster rows: all-miss and hits through a 3-master cluster beside one redis-server
#       (cluster_rows; BENCH_CLUSTER=0 skips)
#
# (a)-(f) run with wrk --latency, a Lua script rotating over the hot key set, in
# BENCH_ROUNDS alternating rounds (a b c d e f a b c d e f ...); the table shows the
# mean over rounds (BENCH_AGG=best: the round with the most requests/s).
# Every target also gets CPU microseconds per request of its server process (and
# of redis-server) over the measured windows: utime+stime from /proc/PID/stat,
# summed over rounds, over the requests served. Ratios of CPU per request within
# one run hold best on a shared machine; req/s moves by tens of percent.
# Everything binds 127.0.0.1 and free ports; nothing else on the machine is touched.
#
# Settings (environment):
#   BENCH_DURATION=5s    wrk duration of one measurement
#   BENCH_CONNS=64       wrk connections        BENCH_THREADS=<nproc, at most 4> wrk threads
#   BENCH_ROUNDS=2       alternating rounds     BENCH_AGG=mean|best
#   BENCH_KEYS=1000      hot keys key:0..N-1    BENCH_VALUE_BYTES=100
#   BENCH_RB_REQUESTS=200000  redis-benchmark requests at -P 1 (x10 at -P 16)
#   BENCH_RB_CONNS=50    redis-benchmark clients
#   BENCH_HOT_DURATION=10s  each run of the hot-key scenario
#   BENCH_IDLE_CONNS=10000  idle connections   BENCH_IDLE_HOLD=20 seconds held at most
#   BENCH_SKIP_BUILD=1   use the binaries already in target/release
#   PROXY_WORKERS        passed to every proxy and to bare_http (default: number of CPUs)
#   BENCH_KEEP=1         keep the temporary directory (logs, raw wrk output)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

DURATION=${BENCH_DURATION:-5s}
CONNS=${BENCH_CONNS:-64}
NPROC=$(nproc)
THREADS=${BENCH_THREADS:-$((NPROC < 4 ? NPROC : 4))}
ROUNDS=${BENCH_ROUNDS:-2}
AGG=${BENCH_AGG:-mean}
NKEYS=${BENCH_KEYS:-1000}
VBYTES=${BENCH_VALUE_BYTES:-100}
RB_N=${BENCH_RB_REQUESTS:-200000}
RB_C=${BENCH_RB_CONNS:-50}
IDLE_CONNS=${BENCH_IDLE_CONNS:-10000}
IDLE_HOLD=${BENCH_IDLE_HOLD:-20}
HOT_DURATION=${BENCH_HOT_DURATION:-10s}
case "$AGG" in mean | best) ;; *)
  echo "bench: BENCH_AGG must be mean or best" >&2
  exit 2
  ;;
esac

say() { echo "bench: $*" >&2; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/redis-proxy-bench.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    # Bounded: a process that ignores SIGTERM gets SIGKILL after ~3 s.
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ "${BENCH_KEEP:-}" = 1 ]; then
    say "kept $tmp"
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setup
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

"$root/scripts/deps.sh" wrk webdis nutcracker
# Debian installs nutcracker (twemproxy) in /usr/sbin.
PATH="$PATH:/usr/sbin"
for tool in wrk webdis nutcracker redis-server redis-cli redis-benchmark python3 curl; do
  command -v "$tool" >/dev/null 2>&1 || {
    say "$tool not found"
    exit 1
  }
done

if [ "${BENCH_SKIP_BUILD:-}" != 1 ]; then
  say "cargo build --release --examples --bins"
  cargo build --release --examples --bins 2>"$tmp/build.log" || {
    tail -30 "$tmp/build.log" >&2
    exit 1
  }
fi
PROXY="$root/target/release/redis-proxy"
BARE="$root/target/release/examples/bare_http"
[ -x "$PROXY" ] && [ -x "$BARE" ] || {
  say "missing $PROXY or $BARE"
  exit 1
}

# Distinct free loopback ports, all reserved at once so they differ.
read -r P_REDIS P_HIT P_HIT_RESP P_MISS P_TRACK P_BARE P_WEBDIS P_IDLE P_MISS_RESP P_TWEM \
  P_BYTES P_HOT P_SWR < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(13):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

# Waits until `probe` succeeds; fails naming the process and its log otherwise.
wait_up() {
  local name=$1 pid=$2 log=$3
  shift 3
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      say "$name exited during start; log:"
      tail -20 "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  say "$name did not come up; log:"
  tail -20 "$log" >&2
  exit 1
}

# --- redis-server, no persistence
redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no \
  --daemonize no --maxclients 20000 --logfile "$tmp/redis.log" &
REDIS_PID=$!
PID_redis=$REDIS_PID
pids+=("$REDIS_PID")
wait_up redis-server "$REDIS_PID" "$tmp/redis.log" redis-cli -p "$P_REDIS" ping
RCLI=(redis-cli -h 127.0.0.1 -p "$P_REDIS")

# --- seed key:0..N-1 with VBYTES-byte values, plus redis-benchmark's literal key
python3 - "$NKEYS" "$VBYTES" >"$tmp/seed.resp" <<'EOF'
import sys
n, size = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout.buffer
def cmd(*args):
    out.write(b"*%d\r\n" % len(args))
    for a in args:
        out.write(b"$%d\r\n%s\r\n" % (len(a), a))
for i in range(n):
    key = b"key:%d" % i
    cmd(b"SET", key, (key + b"=").ljust(size, b"v")[:size])
cmd(b"SET", b"key:__rand_int__", b"r" * size)
for i in range(10):
    cmd(b"SET", b"hot:%d" % i, b"h" * size)
EOF
"${RCLI[@]}" --pipe <"$tmp/seed.resp" >"$tmp/seed.log"
seeded=$("${RCLI[@]}" dbsize)
say "redis-server pid $REDIS_PID on 127.0.0.1:$P_REDIS, $seeded keys of $VBYTES bytes"

# --- the proxies
start_proxy() { # name port [VAR=value...]
  local name=$1 port=$2
  shift 2
  env REDIS_URL="redis://127.0.0.1:$P_REDIS/0" PROXY_HOST=127.0.0.1 PROXY_PORT="$port" \
    PROXY_SHUTDOWN_GRACE_MS=200 "$@" "$PROXY" >"$tmp/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_up "$name" "$pid" "$tmp/$name.log" curl -sf "http://127.0.0.1:$port/-/healthy"
  eval "PID_${name}=$pid"
}
# The hit targets keep their keys for the whole run (the default TTL of 60 s
# would expire them between the warm-up and the last round).
LONG_TTL=CACHE_TTL_MS=86400000
start_proxy hit "$P_HIT" RESP_PORT="$P_HIT_RESP" CACHE_CAPACITY=1000000 "$LONG_TTL"
start_proxy miss "$P_MISS" RESP_PORT="$P_MISS_RESP" CACHE_CAPACITY=0
start_proxy track "$P_TRACK" CACHE_CAPACITY=1000000 CACHE_INVALIDATION=tracking "$LONG_TTL"
# Room for every hot key several times over: the bound is on, nothing is evicted.
BYTES_BOUND=$((NKEYS * (VBYTES + 64) * 4 + 1048576))
start_proxy bytes "$P_BYTES" CACHE_CAPACITY=1000000 CACHE_MAX_BYTES="$BYTES_BOUND" "$LONG_TTL"
start_proxy hot "$P_HOT" CACHE_TTL_MS=1000
start_proxy swr "$P_SWR" CACHE_TTL_MS=1000 CACHE_STALE_WHILE_REVALIDATE_MS=5000

# --- twemproxy: one pool, one server entry (the same redis-server), no ejection
cat >"$tmp/nutcracker.yml" <<EOF
bench:
  listen: 127.0.0.1:$P_TWEM
  redis: true
  hash: fnv1a_64
  distribution: ketama
  auto_eject_hosts: false
  timeout: 1000
  servers:
   - 127.0.0.1:$P_REDIS:1
EOF
nutcracker -c "$tmp/nutcracker.yml" -o "$tmp/twem-own.log" >"$tmp/twem.log" 2>&1 &
PID_twem=$!
pids+=("$PID_twem")
wait_up nutcracker "$PID_twem" "$tmp/twem.log" sh -c "redis-cli -p $P_TWEM get key:0 | grep -q ."

# --- the bare responder, answering with a hit's exact bytes for key:0
"${RCLI[@]}" --raw get key:0 | head -c "$VBYTES" >"$tmp/value.bin"
BARE_PORT="$P_BARE" BARE_VALUE_FILE="$tmp/value.bin" "$BARE" >"$tmp/bare.log" 2>&1 &
PID_bare=$!
pids+=("$PID_bare")
wait_up bare_http "$PID_bare" "$tmp/bare.log" curl -sf "http://127.0.0.1:$P_BARE/x"

# --- webdis (foreground, no log file, no ACL: a plain HTTP->GET path)
cat >"$tmp/webdis.json" <<EOF
{
  "redis_host": "127.0.0.1",
  "redis_port": $P_REDIS,
  "redis_auth": null,
  "http_host": "127.0.0.1",
  "http_port": $P_WEBDIS,
  "threads": 2,
  "pool_size": 20,
  "daemonize": false,
  "database": 0,
  "verbosity": 0,
  "logfile": "$tmp/webdis-own.log"
}
EOF
webdis "$tmp/webdis.json" >"$tmp/webdis.log" 2>&1 &
PID_webdis=$!
pids+=("$PID_webdis")
wait_up webdis "$PID_webdis" "$tmp/webdis.log" curl -sf "http://127.0.0.1:$P_WEBDIS/GET/key:0.txt"

# Sanity: every HTTP target answers key:0 with the same body.
want=$(cat "$tmp/value.bin")
for url in "http://127.0.0.1:$P_HIT/key:0" "http://127.0.0.1:$P_MISS/key:0" \
  "http://127.0.0.1:$P_TRACK/key:0" "http://127.0.0.1:$P_BARE/key:0" \
  "http://127.0.0.1:$P_WEBDIS/GET/key:0.txt"; do
  got=$(curl -s "$url")
  if [ "$got" != "$want" ]; then
    say "WARNING: $url answered a different body: ${got:0:120}"
  fi
done

# ---------------------------------------------------------------- wrk
cat >"$tmp/rotate.lua" <<'EOF'
-- Rotates over key:0..N-1, each wrk thread from its own offset; the request
-- strings are built once per thread. BENCH_PREFIX/BENCH_SUFFIX shape the path.
local n = tonumber(os.getenv("BENCH_KEYS") or "1000")
local prefix = os.getenv("BENCH_PREFIX") or "/"
local suffix = os.getenv("BENCH_SUFFIX") or ""
local threads = 0
local reqs = {}
local i = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  for k = 0, n - 1 do
    reqs[k + 1] = wrk.format("GET", prefix .. "key:" .. k .. suffix)
  end
  i = ((tid or 0) * 7919) % n
end

function request()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d sockerr=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.requests,
    e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

dur_secs() { # wrk duration (5, 5s, 2m, 1h) -> seconds
  case "$1" in
    *h) echo $((${1%h} * 3600)) ;;
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}

# run_wrk out-file base-url prefix suffix duration conns
run_wrk() {
  local out=$1 url=$2 prefix=$3 suffix=$4 dur=$5 conns=$6
  BENCH_KEYS=$NKEYS BENCH_PREFIX=$prefix BENCH_SUFFIX=$suffix \
    timeout $(($(dur_secs "$dur") + 30)) \
    wrk -t "$THREADS" -c "$conns" -d "$dur" --latency -s "$tmp/rotate.lua" "$url" >"$out" 2>&1 || true
  grep '^BENCH ' "$out" || echo "BENCH rps=0 p50_us=0 p99_us=0 requests=0 non2xx=0 sockerr=-1"
}

metric() { # port name -> value of an unlabelled counter, or 0
  { curl -s "http://127.0.0.1:$1/-/metrics" || true; } | awk -v n="redis_proxy_$2" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }'
}

declare -A URL PREFIX SUFFIX PORT
URL[a]="http://127.0.0.1:$P_HIT"
URL[b]="http://127.0.0.1:$P_MISS"
URL[c]="http://127.0.0.1:$P_WEBDIS"
URL[d]="http://127.0.0.1:$P_BARE"
URL[e]="http://127.0.0.1:$P_TRACK"
URL[f]="http://127.0.0.1:$P_BYTES"
for t in a b d e f; do PREFIX[$t]="/" SUFFIX[$t]=""; done
PREFIX[c]="/GET/"
SUFFIX[c]=".txt"
PORT[a]=$P_HIT PORT[b]=$P_MISS PORT[e]=$P_TRACK PORT[f]=$P_BYTES
declare -A TPID=([a]=$PID_hit [b]=$PID_miss [c]=$PID_webdis [d]=$PID_bare [e]=$PID_track [f]=$PID_bytes)
alive() { kill -0 "$1" 2>/dev/null; }
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# us_per_req ticks requests -> CPU microseconds per request
us_per_req() { awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else printf "n/a" }'; }
# A measurement of a dead target is skipped (and reported) rather than timed out.
DEAD="BENCH rps=0 p50_us=0 p99_us=0 requests=0 non2xx=0 sockerr=0 dead=1"
declare -A NAME=([a]="proxy hits" [b]="proxy all-miss" [c]="webdis" [d]="bare may_minihttp" [e]="proxy hits, tracking"
  [f]="proxy hits, byte bound")

# Warm-up: fills the two caching proxies with every hot key and warms every target.
say "warm-up (1s each)"
for t in a b c d e f; do
  alive "${TPID[$t]}" || continue
  run_wrk "$tmp/warm-$t.txt" "${URL[$t]}" "${PREFIX[$t]}" "${SUFFIX[$t]}" 1s "$CONNS" >/dev/null
done

declare -A SAMPLES HITS MISSES CPU RCPU REQS
for t in a b c d e f; do
  CPU[$t]=0 RCPU[$t]=0 REQS[$t]=0
done
for t in a e f; do
  HITS[$t]=0 MISSES[$t]=0
done
for r in $(seq 1 "$ROUNDS"); do
  for t in a b c d e f; do
    if ! alive "${TPID[$t]}"; then
      SAMPLES[$t]+="$DEAD"$'\n'
      say "round $r ${NAME[$t]}: not running any more, skipped"
      continue
    fi
    if [ -n "${PORT[$t]:-}" ]; then
      h0=$(metric "${PORT[$t]}" cache_hits_total)
      m0=$(metric "${PORT[$t]}" cache_misses_total)
    fi
    c0=$(cpu_ticks "${TPID[$t]}") rc0=$(cpu_ticks "$PID_redis")
    line=$(run_wrk "$tmp/wrk-$t-$r.txt" "${URL[$t]}" "${PREFIX[$t]}" "${SUFFIX[$t]}" "$DURATION" "$CONNS")
    c1=$(cpu_ticks "${TPID[$t]}") rc1=$(cpu_ticks "$PID_redis")
    n=$(printf '%s' "$line" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
    CPU[$t]=$((CPU[$t] + c1 - c0)) RCPU[$t]=$((RCPU[$t] + rc1 - rc0)) REQS[$t]=$((REQS[$t] + ${n:-0}))
    if [ -n "${PORT[$t]:-}" ] && [ -n "${HITS[$t]:-}" ]; then
      h1=$(metric "${PORT[$t]}" cache_hits_total)
      m1=$(metric "${PORT[$t]}" cache_misses_total)
      HITS[$t]=$((HITS[$t] + h1 - h0))
      MISSES[$t]=$((MISSES[$t] + m1 - m0))
    fi
    SAMPLES[$t]+="$line"$'\n'
    say "round $r ${NAME[$t]}: ${line#BENCH }"
  done
done

# agg t -> "rps p50_ms p99_ms rps_min rps_max non2xx sockerr"
agg() {
  printf '%s' "${SAMPLES[$1]}" | awk -v agg="$AGG" '
    /dead=1/ { dead++; next }
    /^BENCH/ {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      n++; rps += v["rps"]; p50 += v["p50_us"]; p99 += v["p99_us"]
      non += v["non2xx"]; err += v["sockerr"]
      if (n == 1 || v["rps"] > best) { best = v["rps"]; b50 = v["p50_us"]; b99 = v["p99_us"] }
      if (n == 1 || v["rps"] < lo) lo = v["rps"]
    }
    END {
      if (n == 0) { print "0 0 0 0 0 0 0", dead + 0; exit }
      if (agg == "best") printf "%.0f %.3f %.3f %.0f %.0f %d %d %d\n", best, b50/1000, b99/1000, lo, best, non, err, dead
      else printf "%.0f %.3f %.3f %.0f %.0f %d %d %d\n", rps/n, p50/n/1000, p99/n/1000, lo, best, non, err, dead
    }'
}
declare -A RPS P50 P99 LO HI NON ERR SKIP
for t in a b c d e f; do
  read -r RPS[$t] P50[$t] P99[$t] LO[$t] HI[$t] NON[$t] ERR[$t] SKIP[$t] < <(agg "$t")
done

# ---------------------------------------------------------------- redis-benchmark (RESP)
LOAD_MID=$(cut -d' ' -f1-3 /proc/loadavg)
"${RCLI[@]}" -p "$P_HIT_RESP" get key:__rand_int__ >/dev/null # warm the proxy's cache
rb() { # port pipeline requests -> "rps p50_ms p99_ms"
  timeout 120 redis-benchmark -h 127.0.0.1 -p "$1" -t get -P "$2" -n "$3" -c "$RB_C" --csv 2>>"$tmp/rb.err" |
    awk -F, '/^"GET/ { gsub(/"/, ""); print $2, $5, $7; f = 1 } END { if (!f) print "0 0 0" }'
}
RB_SIDES="hit miss twem redis"
declare -A RBPORT=([hit]=$P_HIT_RESP [miss]=$P_MISS_RESP [twem]=$P_TWEM [redis]=$P_REDIS)
declare -A RBPID=([hit]=$PID_hit [miss]=$PID_miss [twem]=$PID_twem [redis]=$PID_redis)
declare -A RBNAME=([hit]="proxy RESP, hits" [miss]="proxy RESP, all-miss" [twem]="twemproxy" [redis]="redis-server")
rb_h0=$(metric "$P_HIT" cache_hits_total)
rb_m0=$(metric "$P_HIT" cache_misses_total)
declare -A RB RBCPU RBRCPU RBREQS
for p in 1 16; do
  n=$RB_N
  [ "$p" = 16 ] && n=$((RB_N * 10))
  for r in $(seq 1 "$ROUNDS"); do
    for side in $RB_SIDES; do
      port=${RBPORT[$side]} pid=${RBPID[$side]}
      if ! alive "$pid"; then
        say "round $r redis-benchmark -P $p ${RBNAME[$side]}: not running any more, skipped"
        continue
      fi
      c0=$(cpu_ticks "$pid") rc0=$(cpu_ticks "$PID_redis")
      read -r rps p50 p99 < <(rb "$port" "$p" "$n")
      c1=$(cpu_ticks "$pid") rc1=$(cpu_ticks "$PID_redis")
      if [ "$rps" != 0 ]; then
        RBCPU[$side.$p]=$((${RBCPU[$side.$p]:-0} + c1 - c0))
        RBRCPU[$side.$p]=$((${RBRCPU[$side.$p]:-0} + rc1 - rc0))
        RBREQS[$side.$p]=$((${RBREQS[$side.$p]:-0} + n))
      fi
      say "round $r redis-benchmark -P $p ${RBNAME[$side]}: rps=$rps p50=${p50}ms p99=${p99}ms"
      RB[$side.$p]+="$rps $p50 $p99"$'\n'
    done
  done
done
rbagg() {
  printf '%s' "${RB[$1]:-}" | awk -v agg="$AGG" '
    NF == 3 && $1 > 0 { n++; s += $1; a += $2; b += $3; if ($1 > best) { best = $1; ba = $2; bb = $3 } }
    END {
      if (n == 0) { print "0 0 0"; exit }
      if (agg == "best") printf "%.0f %.3f %.3f\n", best, ba, bb
      else printf "%.0f %.3f %.3f\n", s/n, a/n, b/n
    }'
}
rb_hits=$(($(metric "$P_HIT" cache_hits_total) - rb_h0))
rb_misses=$(($(metric "$P_HIT" cache_misses_total) - rb_m0))

# ---------------------------------------------------------------- hot key at expiry
# 64 clients on 10 keys with a 1 s TTL: every second each key expires under
# load. Without stale-while-revalidate its clients wait for the refill; with
# it they are answered the old value while one background GET refreshes it.
cat >"$tmp/hot.lua" <<'EOF'
local reqs = {}
function init(args)
  for k = 0, 9 do reqs[k + 1] = wrk.format("GET", "/hot:" .. k) end
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0))
end
function request() return reqs[math.random(1, 10)] end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH rps=%.1f p50_us=%d p99_us=%d max_us=%d requests=%d non2xx=%d sockerr=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), latency.max, summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout))
end
EOF
declare -A HOTURL=([hot]="http://127.0.0.1:$P_HOT" [swr]="http://127.0.0.1:$P_SWR")
declare -A HOTPID=([hot]=$PID_hot [swr]=$PID_swr)
declare -A HOTS HOTREFRESH HOTGETS
for r in $(seq 1 "$ROUNDS"); do
  for v in hot swr; do
    if ! alive "${HOTPID[$v]}"; then
      say "round $r hot key ($v): not running any more, skipped"
      continue
    fi
    port=$P_HOT
    [ "$v" = swr ] && port=$P_SWR
    g0=$(metric "$port" redis_requests_total)
    out="$tmp/wrk-hot-$v-$r.txt"
    timeout $(($(dur_secs "$HOT_DURATION") + 30)) wrk -t "$THREADS" -c 64 -d "$HOT_DURATION" --latency \
      -s "$tmp/hot.lua" "${HOTURL[$v]}" >"$out" 2>&1 || true
    line=$(grep '^BENCH ' "$out" || echo "BENCH rps=0 p50_us=0 p99_us=0 max_us=0 requests=0 non2xx=0 sockerr=-1")
    HOTGETS[$v]=$((${HOTGETS[$v]:-0} + $(metric "$port" redis_requests_total) - g0))
    HOTS[$v]+="$line"$'\n'
    say "round $r hot key ($v): ${line#BENCH }"
  done
done
HOTREFRESH[swr]=$(metric "$P_SWR" cache_refreshes_total)
# hotagg v -> "rps p50_ms p99_ms max_ms non2xx sockerr": means over rounds, max of the maxima
hotagg() {
  printf '%s' "${HOTS[$1]:-}" | awk '
    /^BENCH/ {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      n++; rps += v["rps"]; p50 += v["p50_us"]; p99 += v["p99_us"]
      if (v["max_us"] > mx) mx = v["max_us"]
      non += v["non2xx"]; err += v["sockerr"]
    }
    END {
      if (n == 0) { print "0 0 0 0 0 0"; exit }
      printf "%.0f %.3f %.3f %.3f %d %d\n", rps/n, p50/n/1000, p99/n/1000, mx/1000, non, err
    }'
}

# ---------------------------------------------------------------- idle connections
say "idle test: $IDLE_CONNS keep-alive connections (nofile limit $NOFILE)"
start_proxy idle "$P_IDLE" PROXY_MAX_CLIENTS=20000 PROXY_IDLE_TIMEOUT_MS=300000 CACHE_CAPACITY=1000000
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
curl -s "http://127.0.0.1:$P_IDLE/key:0" >/dev/null
IDLE_RSS0=$(rss_kb "$PID_idle")

cat >"$tmp/idle.py" <<'EOF'
# Opens N keep-alive connections in batches, sends one GET on each and reads
# its answer, then holds them all idle until `release` appears (or HOLD s),
# and finally counts how many the server kept open.
import os, selectors, socket, sys, time
port, n, hold, release = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.time() + 90
socks, codes, fails = [], {}, 0
sel = selectors.DefaultSelector()
batch = 500
i = 0
while i < n and time.time() < deadline:
    fresh = []
    for _ in range(min(batch, n - i)):
        i += 1
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /key:%d HTTP/1.1\r\nHost: bench\r\n\r\n" % (i % 1000))
            s.setblocking(False)
            fresh.append(s)
        except OSError:
            fails += 1
            s.close()
    pending = {}
    for s in fresh:
        sel.register(s, selectors.EVENT_READ)
        pending[s] = b""
    until = time.time() + 10
    while pending and time.time() < until:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                codes["closed"] = codes.get("closed", 0) + 1
                sel.unregister(s); s.close(); del pending[s]
                continue
            pending[s] += data
            head, sep, _ = pending[s].partition(b"\r\n\r\n")
            if sep:
                code = head.split(b" ", 2)[1].decode() if b" " in head else "?"
                codes[code] = codes.get(code, 0) + 1
                sel.unregister(s); socks.append(s); del pending[s]
    for s in pending:
        codes["noanswer"] = codes.get("noanswer", 0) + 1
        sel.unregister(s); socks.append(s)
print("READY opened=%d answered=%s connect_failures=%d" % (len(socks), codes, fails), flush=True)
end = time.time() + hold
while time.time() < end and not os.path.exists(release):
    time.sleep(0.2)
alive = 0
for s in socks:
    try:
        data = s.recv(1)
        alive += 0 if data == b"" else 1
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print("HELD still_open=%d of %d" % (alive, len(socks)), flush=True)
EOF
python3 "$tmp/idle.py" "$P_IDLE" "$IDLE_CONNS" "$IDLE_HOLD" "$tmp/idle.release" >"$tmp/idle.out" 2>&1 &
PID_py=$!
pids+=("$PID_py")
for _ in $(seq 1 1000); do
  grep -q '^READY' "$tmp/idle.out" 2>/dev/null && break
  kill -0 "$PID_py" 2>/dev/null || break
  sleep 0.1
done
IDLE_READY=$(grep '^READY' "$tmp/idle.out" || echo "READY not reached: $(tail -3 "$tmp/idle.out")")
say "idle: ${IDLE_READY}"
IDLE_CONNECTED=$(metric "$P_IDLE" clients_connected)
IDLE_RSS1=$(rss_kb "$PID_idle")
IDLE_FDS=$(ls "/proc/$PID_idle/fd" 2>/dev/null | wc -l)
IDLE_WRK=$(run_wrk "$tmp/wrk-idle.txt" "http://127.0.0.1:$P_IDLE" / "" 3s "$CONNS")
IDLE_RSS2=$(rss_kb "$PID_idle")
IDLE_HWM=$(awk '/^VmHWM:/ { print $2 }' "/proc/$PID_idle/status" 2>/dev/null || echo 0)
touch "$tmp/idle.release"
for _ in $(seq 1 100); do
  kill -0 "$PID_py" 2>/dev/null || break
  sleep 0.1
done
IDLE_HELD=$(grep '^HELD' "$tmp/idle.out" || echo "HELD: no report")
IDLE_ALIVE=$(kill -0 "$PID_idle" 2>/dev/null && echo yes || echo NO)

# ---------------------------------------------------------------- health after the run
problems=()
for name in redis bare webdis twem; do
  pidvar="PID_$name"
  alive "${!pidvar}" || problems+=("$name is not running any more; log tail: $(tail -3 "$tmp/$name.log" | tr '\n' ' ')")
done
for name in hit miss track bytes hot swr idle; do
  pidvar="PID_$name"
  if ! alive "${!pidvar}"; then
    if grep -q 'shutting down' "$tmp/$name.log"; then
      problems+=("proxy '$name' was stopped by a signal from outside this script: $(grep -m1 'shutting down' "$tmp/$name.log")")
    else
      problems+=("proxy '$name' is not running any more (crashed?); log tail: $(tail -5 "$tmp/$name.log" | tr '\n' ' ')")
    fi
  fi
  # Log lines are "[time LEVEL target] message": count them by level, target and message.
  if grep -qE 'panick|ERROR|WARN' "$tmp/$name.log"; then
    problems+=("proxy '$name' log: $(grep -E 'panick|ERROR|WARN' "$tmp/$name.log" | sed -E 's/^\[[^ ]+ //' | sort | uniq -c | sort -rn | head -3 | tr -s ' \n' ' ')")
  fi
done
for t in a b c d e f; do
  if [ "${SKIP[$t]}" != 0 ]; then
    problems+=("${NAME[$t]}: ${SKIP[$t]} of $ROUNDS rounds skipped (target not running); figures are over the rest")
  fi
  if [ "${NON[$t]}" != 0 ] || [ "${ERR[$t]}" != 0 ]; then
    problems+=("${NAME[$t]}: wrk saw ${NON[$t]} non-2xx/3xx responses and ${ERR[$t]} socket errors")
  fi
done
if [ "${MISSES[a]}" != 0 ]; then problems+=("proxy hits: ${MISSES[a]} cache misses during the measured runs (expected 0)"); fi
if [ "${MISSES[e]}" != 0 ]; then problems+=("proxy hits, tracking: ${MISSES[e]} cache misses during the measured runs (tracking may bypass the cache)"); fi
if [ "${MISSES[f]}" != 0 ]; then problems+=("proxy hits, byte bound: ${MISSES[f]} cache misses during the measured runs (the bound evicted?)"); fi
for v in hot swr; do
  read -r _ _ _ _ hnon herr < <(hotagg "$v")
  if [ "${hnon:-0}" != 0 ] || [ "${herr:-0}" != 0 ]; then problems+=("hot key ($v): wrk saw $hnon non-2xx and $herr socket errors"); fi
done
read -r _ inon ierr < <(echo "$IDLE_WRK" | sed -E 's/.*requests=([0-9]+) non2xx=([0-9-]+) sockerr=([0-9-]+).*/\1 \2 \3/')
if [ "${inon:-0}" != 0 ] || [ "${ierr:-0}" != 0 ]; then problems+=("idle test wrk: $inon non-2xx, $ierr socket errors"); fi


# ---------------------------------------------------------------- TLS rows
# tls_rows: the proxy over rediss:// beside plain TCP, all-miss and hits, in
# alternating rounds against one redis-server that serves both a plain and a
# TLS port (certificates made here with openssl). Prints its own table and
# the miss cost of TLS. BENCH_TLS=0 skips it.
tls_rows() {
  if [ "${BENCH_TLS:-1}" = 0 ]; then return 0; fi
  if ! command -v openssl >/dev/null 2>&1; then
    echo "TLS rows: openssl not found, skipped"
    return 0
  fi
  local d="$tmp/tls" t r line n c0 c1 rc0 rc1 pid port
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=bench-ca \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>>"$d/openssl.log"
  openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
    -keyout "$d/server.key" -out "$d/server.csr" 2>>"$d/openssl.log"
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$d/san.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 1 -extfile "$d/san.ext" -out "$d/server.pem" 2>>"$d/openssl.log"
  local ports
  read -r -a ports < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
  local p_redis=${ports[0]} p_tls=${ports[1]}
  redis-server --bind 127.0.0.1 --port "$p_redis" --tls-port "$p_tls" \
    --tls-cert-file "$d/server.pem" --tls-key-file "$d/server.key" --tls-ca-cert-file "$d/ca.pem" \
    --tls-auth-clients no --maxclients 20000 --daemonize no --logfile "$d/redis.log" --save "" \
    >/dev/null 2>&1 &
  local rpid=$!
  pids+=("$rpid")
  wait_up "redis-server (TLS)" "$rpid" "$d/redis.log" redis-cli -p "$p_redis" ping
  redis-cli -h 127.0.0.1 -p "$p_redis" --pipe <"$tmp/seed.resp" >"$d/seed.log"
  # plain miss, TLS miss, plain hits, TLS hits: same redis-server, same settings.
  local names=(tcp-miss tls-miss tcp-hit tls-hit)
  local -A TP TPID_ TS TCPU TRCPU TREQ
  local i=2
  for t in "${names[@]}"; do
    TP[$t]=${ports[$i]}
    i=$((i + 1))
    local url="redis://127.0.0.1:$p_redis/0" cap=1000000 extra=()
    case $t in tls-*) url="rediss://127.0.0.1:$p_tls/0" extra=(REDIS_TLS_CA_FILE="$d/ca.pem") ;; esac
    case $t in *-miss) cap=0 ;; esac
    env REDIS_URL="$url" PROXY_HOST=127.0.0.1 PROXY_PORT="${TP[$t]}" CACHE_CAPACITY=$cap \
      PROXY_SHUTDOWN_GRACE_MS=200 "${extra[@]}" "$PROXY" >"$d/$t.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    TPID_[$t]=$pid
    wait_up "proxy $t" "$pid" "$d/$t.log" curl -sf "http://127.0.0.1:${TP[$t]}/key:0"
    TCPU[$t]=0 TRCPU[$t]=0 TREQ[$t]=0
    run_wrk "$d/warm-$t.txt" "http://127.0.0.1:${TP[$t]}" / "" 1s "$CONNS" >/dev/null
  done
  for r in $(seq 1 "$ROUNDS"); do
    for t in "${names[@]}"; do
      pid=${TPID_[$t]}
      alive "$pid" || { say "TLS round $r $t: not running, skipped"; continue; }
      c0=$(cpu_ticks "$pid") rc0=$(cpu_ticks "$rpid")
      line=$(run_wrk "$d/wrk-$t-$r.txt" "http://127.0.0.1:${TP[$t]}" / "" "$DURATION" "$CONNS")
      c1=$(cpu_ticks "$pid") rc1=$(cpu_ticks "$rpid")
      n=$(printf '%s' "$line" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
      TCPU[$t]=$((TCPU[$t] + c1 - c0)) TRCPU[$t]=$((TRCPU[$t] + rc1 - rc0)) TREQ[$t]=$((TREQ[$t] + ${n:-0}))
      TS[$t]+="$line"$'\n'
      say "TLS round $r $t: ${line#BENCH }"
    done
  done
  echo
  echo "TLS to Redis (rediss://, rustls, TLS 1.3) beside plain TCP; one redis-server, $ROUNDS alternating rounds, mean shown:"
  printf '%-24s %10s %9s %9s %8s %10s %10s\n' target "req/s" "p50 ms" "p99 ms" non2xx "cpu us/req" "redis us/r"
  local -A TR
  for t in "${names[@]}"; do
    local rps p50 p99 non
    read -r rps p50 p99 non < <(printf '%s' "${TS[$t]:-}" | awk '/^BENCH/ {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        k++; a += v["rps"]; b += v["p50_us"]; c += v["p99_us"]; e += v["non2xx"] + v["sockerr"] }
      END { if (k) printf "%.0f %.3f %.3f %d\n", a/k, b/k/1000, c/k/1000, e; else print "0 0 0 0" }')
    TR[$t]=$rps
    TR[$t.cpu]=$(us_per_req "${TCPU[$t]}" "${TREQ[$t]}")
    printf '%-24s %10s %9s %9s %8s %10s %10s\n' "proxy $t" "$rps" "$p50" "$p99" "$non" "${TR[$t.cpu]}" \
      "$(us_per_req "${TRCPU[$t]}" "${TREQ[$t]}")"
  done
  awk -v tm="${TR[tcp-miss]}" -v sm="${TR[tls-miss]}" -v th="${TR[tcp-hit]}" -v sh="${TR[tls-hit]}" \
    -v tc="${TR[tcp-miss.cpu]}" -v sc="${TR[tls-miss.cpu]}" 'BEGIN {
      if (tm > 0 && th > 0) printf "   TLS miss cost: %.1f%% fewer req/s all-miss (%+.2f us proxy CPU per request); hits %.2fx of plain (should be ~1)\n",
        (1 - sm / tm) * 100, sc - tc, sh / th }'
  for t in "${names[@]}"; do
    if grep -qE 'panick|ERROR|WARN' "$d/$t.log"; then
      echo "   proxy $t log: $(grep -E 'panick|ERROR|WARN' "$d/$t.log" | head -2 | tr '\n' ' ')"
    fi
  done
}

# ---------------------------------------------------------------- summary
# cluster_rows: the proxy in front of a 3-master Redis Cluster beside the
# proxy in front of one redis-server, all-miss and hits, alternating rounds
# (issue 15 item 8). BENCH_CLUSTER=0 skips them.
cluster_rows() {
  if [ "${BENCH_CLUSTER:-1}" = 0 ]; then return 0; fi
  local d="$tmp/cluster" t r line n c0 c1 pid
  mkdir -p "$d"
  local ports
  read -r -a ports < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(11)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
  # ports: 0 single redis, 1-3 cluster nodes, 4-6 their bus ports, 7-10 proxies.
  local p_single=${ports[0]} i node
  redis-server --bind 127.0.0.1 --port "$p_single" --maxclients 20000 --daemonize no \
    --logfile "$d/single.log" --save "" >/dev/null 2>&1 &
  pids+=("$!")
  wait_up "redis-server (single)" "$!" "$d/single.log" redis-cli -p "$p_single" ping
  local nodes=()
  for i in 1 2 3; do
    node=${ports[$i]}
    mkdir -p "$d/n$node"
    (cd "$d/n$node" && exec redis-server --bind 127.0.0.1 --port "$node" \
      --cluster-port "${ports[$((i + 3))]}" --cluster-enabled yes \
      --cluster-config-file nodes.conf --maxclients 20000 --daemonize no \
      --logfile "$d/n$node/redis.log" --appendonly no --save "") >/dev/null 2>&1 &
    pids+=("$!")
    wait_up "cluster node $node" "$!" "$d/n$node/redis.log" redis-cli -p "$node" ping
    nodes+=("127.0.0.1:$node")
  done
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-yes >"$d/create.log" 2>&1; then
    echo "cluster rows: redis-cli --cluster create failed (see $d/create.log), skipped"
    return 0
  fi
  local deadline=$((SECONDS + 30))
  until redis-cli -p "${ports[1]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; do
    if [ $SECONDS -ge $deadline ]; then echo "cluster rows: cluster not ok in 30 s, skipped"; return 0; fi
    sleep 0.2
  done
  # The same keys as the single redis-server: each node gets its own slots'.
  redis-cli -h 127.0.0.1 -p "$p_single" --pipe <"$tmp/seed.resp" >"$d/seed-single.log"
  python3 - "$NKEYS" "$VBYTES" "$d" "${ports[1]}" "${ports[2]}" "${ports[3]}" <<'PY'
import subprocess, sys
nkeys, vbytes, d = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ports = sys.argv[4:]
def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc
owner = {}
for port in ports:
    out = subprocess.run(["redis-cli", "-p", port, "cluster", "myid"], capture_output=True, text=True).stdout.strip()
    owner[out] = port
slots = {}
for line in subprocess.run(["redis-cli", "-p", ports[0], "cluster", "nodes"], capture_output=True, text=True).stdout.splitlines():
    parts = line.split()
    for rng in parts[8:]:
        lo, _, hi = rng.partition("-")
        for s in range(int(lo), int(hi or lo) + 1):
            slots[s] = owner[parts[0]]
files = {p: open(f"{d}/seed-{p}.resp", "wb") for p in ports}
value = b"v" * vbytes
for i in range(nkeys):
    key = b"key:%d" % i
    f = files[slots[crc16(key) % 16384]]
    f.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
for f in files.values():
    f.close()
PY
  for i in 1 2 3; do
    redis-cli -h 127.0.0.1 -p "${ports[$i]}" --pipe <"$d/seed-${ports[$i]}.resp" >>"$d/seed-cluster.log"
  done
  local names=(single-miss cluster-miss single-hit cluster-hit)
  local -A CP CPID CS CCPU CREQ
  i=7
  for t in "${names[@]}"; do
    CP[$t]=${ports[$i]}
    i=$((i + 1))
    local url="redis://127.0.0.1:$p_single/0" cap=1000000
    case $t in cluster-*) url="redis://127.0.0.1:${ports[1]}/0,redis://127.0.0.1:${ports[2]}/0" ;; esac
    case $t in *-miss) cap=0 ;; esac
    env REDIS_URL="$url" PROXY_HOST=127.0.0.1 PROXY_PORT="${CP[$t]}" CACHE_CAPACITY=$cap \
      CACHE_TTL_MS=86400000 PROXY_SHUTDOWN_GRACE_MS=200 "$PROXY" >"$d/$t.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    CPID[$t]=$pid
    wait_up "proxy $t" "$pid" "$d/$t.log" curl -sf "http://127.0.0.1:${CP[$t]}/key:0"
    CCPU[$t]=0 CREQ[$t]=0
    run_wrk "$d/warm-$t.txt" "http://127.0.0.1:${CP[$t]}" / "" 1s "$CONNS" >/dev/null
  done
  for r in $(seq 1 "$ROUNDS"); do
    for t in "${names[@]}"; do
      pid=${CPID[$t]}
      alive "$pid" || { say "cluster round $r $t: not running, skipped"; continue; }
      c0=$(cpu_ticks "$pid")
      line=$(run_wrk "$d/wrk-$t-$r.txt" "http://127.0.0.1:${CP[$t]}" / "" "$DURATION" "$CONNS")
      c1=$(cpu_ticks "$pid")
      n=$(printf '%s' "$line" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
      CCPU[$t]=$((CCPU[$t] + c1 - c0)) CREQ[$t]=$((CREQ[$t] + ${n:-0}))
      CS[$t]+="$line"$'\n'
      say "cluster round $r $t: ${line#BENCH }"
    done
  done
  echo
  echo "Redis Cluster (3 masters, no replicas) beside one redis-server; $ROUNDS alternating rounds, mean shown:"
  printf '%-24s %10s %9s %9s %8s %10s\n' target "req/s" "p50 ms" "p99 ms" non2xx "cpu us/req"
  local -A CR
  for t in "${names[@]}"; do
    local rps p50 p99 non
    read -r rps p50 p99 non < <(printf '%s' "${CS[$t]:-}" | awk '/^BENCH/ {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        k++; a += v["rps"]; b += v["p50_us"]; c += v["p99_us"]; e += v["non2xx"] + v["sockerr"] }
      END { if (k) printf "%.0f %.3f %.3f %d\n", a/k, b/k/1000, c/k/1000, e; else print "0 0 0 0" }')
    CR[$t]=$rps
    printf '%-24s %10s %9s %9s %8s %10s\n' "proxy $t" "$rps" "$p50" "$p99" "$non" \
      "$(us_per_req "${CCPU[$t]}" "${CREQ[$t]}")"
  done
  local hit miss
  hit=$(ratio "${CR[cluster-hit]}" "${CR[single-hit]}")
  miss=$(ratio "${CR[cluster-miss]}" "${CR[single-miss]}")
  echo "   cluster / single, hits: $hit (target >= 0.95: $(verdict "$hit" '>=' 0.95))"
  echo "   cluster / single, all-miss: $miss (target >= 1.0: $(verdict "$miss" '>=' 1.0))"
  for t in "${names[@]}"; do
    if grep -qE 'panick|ERROR|WARN' "$d/$t.log"; then
      echo "   proxy $t log: $(grep -E 'panick|ERROR|WARN' "$d/$t.log" | head -2 | tr '\n' ' ')"
    fi
  done
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
verdict() { # value op target
  awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
    if (v == "n/a") { print "n/a"; exit }
    ok = (op == ">=") ? (v + 0 >= t + 0) : (v + 0 <= t + 0)
    print ok ? "ok" : "MISS" }'
}

{
  echo
  echo "== redis-proxy bench: $(date -u '+%Y-%m-%d %H:%M:%SZ') on $(hostname), nproc=$NPROC, $(uname -sr)"
  echo "   $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  echo "   wrk -t$THREADS -c$CONNS -d$DURATION --latency, $ROUNDS alternating rounds, $AGG shown;" \
    "$NKEYS keys x ${VBYTES} B; PROXY_WORKERS=${PROXY_WORKERS:-default($NPROC)}; redis $(redis-server --version | awk '{print $3}' | tr -d 'v=')"
  echo "   load average (1/5/15 min) at start: $LOAD_START; after wrk runs: $LOAD_MID; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  printf '%-24s %10s %19s %9s %9s %8s %7s %10s %10s\n' target "req/s" "(min..max)" "p50 ms" "p99 ms" non2xx sockerr \
    "cpu us/req" "redis us/r"
  declare -A USR RUSR
  for t in a b c d e f; do
    USR[$t]=$(us_per_req "${CPU[$t]}" "${REQS[$t]}")
    RUSR[$t]=$(us_per_req "${RCPU[$t]}" "${REQS[$t]}")
    printf '%-24s %10s %19s %9s %9s %8s %7s %10s %10s\n' "(${t}) ${NAME[$t]}" "${RPS[$t]}" "(${LO[$t]}..${HI[$t]})" \
      "${P50[$t]}" "${P99[$t]}" "${NON[$t]}" "${ERR[$t]}" "${USR[$t]}" "${RUSR[$t]}"
  done
  echo "   cache during measured runs: hits ${HITS[a]} misses ${MISSES[a]} (a); hits ${HITS[e]} misses ${MISSES[e]} (e);" \
    "hits ${HITS[f]} misses ${MISSES[f]} (f, CACHE_MAX_BYTES=$BYTES_BOUND)"
  echo
  r1=$(ratio "${RPS[a]}" "${RPS[c]}")
  r2=$(ratio "${RPS[a]}" "${RPS[d]}")
  r3=$(ratio "${RPS[b]}" "${RPS[c]}")
  r4=$(ratio "${P99[a]}" "${P99[c]}")
  r5=$(ratio "${RPS[e]}" "${RPS[a]}")
  printf '%-40s %7s  %-8s %s\n' ratio value target verdict
  printf '%-40s %7s  %-8s %s\n' "hits / webdis (req/s)" "$r1" ">= 1.3" "$(verdict "$r1" '>=' 1.3)"
  printf '%-40s %7s  %-8s %s\n' "hits / bare (req/s)" "$r2" ">= 0.9" "$(verdict "$r2" '>=' 0.9)"
  printf '%-40s %7s  %-8s %s\n' "all-miss / webdis (req/s)" "$r3" ">= 1.2" "$(verdict "$r3" '>=' 1.2)"
  printf '%-40s %7s  %-8s %s\n' "p99 hits / p99 webdis at $CONNS conns" "$r4" "<= 1.0" "$(verdict "$r4" '<=' 1.0)"
  printf '%-40s %7s  %-8s %s\n' "tracking / off, hits (req/s)" "$r5" ">= 0.97" "$(verdict "$r5" '>=' 0.97)"
  r8=$(ratio "${RPS[f]}" "${RPS[a]}")
  printf '%-40s %7s  %-8s %s\n' "byte bound on / off, hits (req/s)" "$r8" ">= 0.97" "$(verdict "$r8" '>=' 0.97)"
  r6=$(ratio "${USR[b]}" "${USR[a]}")
  r7=$(ratio "${USR[a]}" "${USR[d]}")
  printf '%-40s %7s  %-8s %s\n' "all-miss / hits (cpu us/req)" "$r6" "<= 1.6" "$(verdict "$r6" '<=' 1.6)"
  printf '%-40s %7s  %-8s %s\n' "hits / bare (cpu us/req)" "$r7" "<= 1.1" "$(verdict "$r7" '<=' 1.1)"
  echo
  rbu() { us_per_req "${RBCPU[$1]:-0}" "${RBREQS[$1]:-0}"; }
  rbru() { us_per_req "${RBRCPU[$1]:-0}" "${RBREQS[$1]:-0}"; }
  printf '%-36s %10s %9s %9s %10s %10s\n' "redis-benchmark -t get -c $RB_C" "req/s" "p50 ms" "p99 ms" "cpu us/req" "redis us/r"
  declare -A RBR RBU
  for p in 1 16; do
    n=$RB_N
    [ "$p" = 16 ] && n=$((RB_N * 10))
    for side in $RB_SIDES; do
      read -r rps p50 p99 < <(rbagg "$side.$p")
      RBR[$side.$p]=$rps RBU[$side.$p]=$(rbu "$side.$p")
      printf '%-36s %10s %9s %9s %10s %10s\n' "${RBNAME[$side]}, -P $p (-n $n)" "$rps" "$p50" "$p99" \
        "${RBU[$side.$p]}" "$(rbru "$side.$p")"
    done
  done
  echo "   cpu us/req: the server process named (for redis-server, itself); redis us/r: redis-server's share"
  for p in 1 16; do
    q=$(ratio "${RBR[miss.$p]}" "${RBR[twem.$p]}")
    printf '%-40s %7s  %-8s %s\n' "all-miss / twemproxy, -P $p (req/s)" "$q" ">= 1.3" "$(verdict "$q" '>=' 1.3)"
  done
  q=$(ratio "${RBU[hit.16]}" "${RBU[redis.16]}")
  printf '%-40s %7s  %-8s %s\n' "hits / redis-server, -P 16 (cpu us/req)" "$q" "<= 1.0" "$(verdict "$q" '<=' 1.0)"
  q=$(ratio "${RBU[hit.1]}" "${RBU[redis.1]}")
  printf '%-40s %7s  %-8s %s\n' "hits / redis-server, -P 1 (cpu us/req)" "$q" "-" "reported"
  q1=$(ratio "${RBR[hit.1]}" "${RBR[redis.1]}")
  q16=$(ratio "${RBR[hit.16]}" "${RBR[redis.16]}")
  printf '%-40s %7s  %-8s %s\n' "hits / redis-server, -P 1 (req/s)" "$q1" ">= 1.0" "$(verdict "$q1" '>=' 1.0)"
  printf '%-40s %7s  %-8s %s\n' "hits / redis-server, -P 16 (req/s)" "$q16" ">= 0.8" "$(verdict "$q16" '>=' 0.8)"
  echo "   proxy cache during redis-benchmark: hits $rb_hits misses $rb_misses"
  echo
  echo "hot key at expiry: wrk -t$THREADS -c64 -d$HOT_DURATION, 10 keys, CACHE_TTL_MS=1000, $ROUNDS rounds (means; max of maxima)"
  printf '%-36s %10s %9s %9s %9s %10s\n' variant "req/s" "p50 ms" "p99 ms" "max ms" "redis GETs"
  read -r hr h50 h99 hmx _ _ < <(hotagg hot)
  read -r sr s50 s99 smx _ _ < <(hotagg swr)
  printf '%-36s %10s %9s %9s %9s %10s\n' "no stale serving" "$hr" "$h50" "$h99" "$hmx" "${HOTGETS[hot]:-0}"
  printf '%-36s %10s %9s %9s %9s %10s\n' "STALE_WHILE_REVALIDATE_MS=5000" "$sr" "$s50" "$s99" "$smx" "${HOTGETS[swr]:-0}"
  echo "   background refreshes (swr): ${HOTREFRESH[swr]:-0}"
  q=$(ratio "$s99" "$h99")
  printf '%-40s %7s  %-8s %s\n' "p99 with / without stale serving" "$q" "-" "reported"
  q=$(ratio "$smx" "$hmx")
  printf '%-40s %7s  %-8s %s\n' "max with / without stale serving" "$q" "-" "reported"
  echo
  echo "idle connections (PROXY_MAX_CLIENTS=20000, nofile $NOFILE):"
  echo "   client: $IDLE_READY"
  echo "   proxy clients_connected=$IDLE_CONNECTED fds=$IDLE_FDS"
  echo "   while held, wrk -c$CONNS 3s: ${IDLE_WRK#BENCH }"
  echo "   after: $IDLE_HELD; proxy alive: $IDLE_ALIVE"
  rss_mb=$(awk -v k="$IDLE_RSS2" -v k1="$IDLE_RSS1" 'BEGIN { m = (k > k1 ? k : k1); printf "%.1f", m / 1024 }')
  printf '   proxy RSS: %.1f MB idle before, %.1f MB with connections, %.1f MB after wrk (peak %.1f MB); target <= 400 MB: %s\n' \
    "$(awk -v k="$IDLE_RSS0" 'BEGIN { print k / 1024 }')" "$(awk -v k="$IDLE_RSS1" 'BEGIN { print k / 1024 }')" \
    "$(awk -v k="$IDLE_RSS2" 'BEGIN { print k / 1024 }')" "$(awk -v k="$IDLE_HWM" 'BEGIN { print k / 1024 }')" \
    "$(verdict "$rss_mb" '<=' 400)"
  echo
  if [ ${#problems[@]} -eq 0 ]; then
    echo "problems: none seen"
  else
    echo "problems:"
    printf '   - %s\n' "${problems[@]}"
  fi
} | tee "$tmp/summary.txt"
# In this shell, not a pipeline's subshell: the servers they start join
# `pids` (so cleanup stops them), and tee does not wait on their stdout.
tls_rows >"$tmp/tls.txt"
tee -a "$tmp/summary.txt" <"$tmp/tls.txt"
cluster_rows >"$tmp/cluster.txt"
tee -a "$tmp/summary.txt" <"$tmp/cluster.txt"
