#!/usr/bin/env bash
# A/B of two redis-proxy binaries in one run, for "before/after" figures on a
# shared, noisy machine: both run side by side against one redis-server and
# are measured in alternating rounds (A B A B ...), so host drift hits both.
#
#   scripts/ab.sh OLD_BINARY NEW_BINARY
#
# Scenarios (wrk -t2, one hot key set, HTTP): hits (large cache) and all-miss
# (CACHE_CAPACITY=0); plus redis-benchmark -t get at -P 1 and -P 16 on RESP.
# For each: requests/s, p99, and CPU microseconds per request of the proxy
# process (utime+stime from /proc/PID/stat over the measured window; CPU per
# request holds better across runs than requests/s). Prints medians over
# rounds and the NEW/OLD ratio of each.
#
# Settings: AB_ROUNDS=3  AB_DURATION=5s  AB_CONNS=64  AB_KEYS=1000  AB_VALUE_BYTES=100
#           AB_RB_REQUESTS=200000 (redis-benchmark requests at -P 1, x10 at -P 16)
set -euo pipefail
[ $# -eq 2 ] || {
  echo "usage: $0 OLD_BINARY NEW_BINARY" >&2
  exit 2
}
OLD=$(realpath "$1")
NEW=$(realpath "$2")
ROUNDS=${AB_ROUNDS:-3}
DURATION=${AB_DURATION:-5s}
CONNS=${AB_CONNS:-64}
NKEYS=${AB_KEYS:-1000}
VBYTES=${AB_VALUE_BYTES:-100}
RB_N=${AB_RB_REQUESTS:-200000}
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/deps.sh" wrk >/dev/null

tmp=$(mktemp -d "${TMPDIR:-/tmp}/redis-proxy-ab.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
say() { echo "ab: $*" >&2; }

read -r P_REDIS P1 P1R P2 P2R P3 P3R P4 P4R < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(9):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
redis-server --bind 127.0.0.1 --port "$P_REDIS" --daemonize no --logfile "$tmp/redis.log" --save "" &
pids+=($!)
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$P_REDIS" ping >/dev/null 2>&1 && break; sleep 0.05; done
python3 - "$NKEYS" "$VBYTES" <<'EOF' | redis-cli -p "$P_REDIS" --pipe >/dev/null
import sys
n, size = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout.buffer
def cmd(*a):
    out.write(b"*%d\r\n" % len(a))
    for x in a: out.write(b"$%d\r\n%s\r\n" % (len(x), x))
for i in range(n):
    k = b"key:%d" % i
    cmd(b"SET", k, (k + b"=").ljust(size, b"v")[:size])
cmd(b"SET", b"key:__rand_int__", b"r" * size)
EOF

start() { # name binary http-port resp-port capacity; sets PID[name]
  REDIS_URL="redis://127.0.0.1:$P_REDIS/0" PROXY_PORT=$3 RESP_PORT=$4 CACHE_CAPACITY=$5 \
    "$2" >"$tmp/proxy-$3.log" 2>&1 &
  PID[$1]=$!
  pids+=("${PID[$1]}")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$3/-/healthy" >/dev/null && break; sleep 0.05; done
}
declare -A PID HPORT RPORT
# Not in a $(...) subshell: the pids must reach the cleanup trap.
start old_hit "$OLD" "$P1" "$P1R" 1000000
start new_hit "$NEW" "$P2" "$P2R" 1000000
start old_miss "$OLD" "$P3" "$P3R" 0
start new_miss "$NEW" "$P4" "$P4R" 0
HPORT[old_hit]=$P1 HPORT[new_hit]=$P2 HPORT[old_miss]=$P3 HPORT[new_miss]=$P4
RPORT[old_hit]=$P1R RPORT[new_hit]=$P2R RPORT[old_miss]=$P3R RPORT[new_miss]=$P4R

cat >"$tmp/rotate.lua" <<EOF
local n = $NKEYS
local reqs, i = {}, 0
function init(args)
  for k = 0, n - 1 do reqs[k + 1] = wrk.format("GET", "/key:" .. k) end
  i = math.random(n) - 1
end
function request() i = i % n + 1 return reqs[i] end
function done(s, lat, r)
  io.write(string.format("AB %d %.1f %d\n", s.requests, s.requests / (s.duration / 1e6), lat:percentile(99)))
end
EOF

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

# measure name kind -> "rps p99_us cpu_us_per_req redis_cpu_us_per_req"
measure() {
  local name=$1 kind=$2 pid=${PID[$1]} c0 c1 r0 r1 n rps p99
  c0=$(cpu_ticks "$pid")
  r0=$(cpu_ticks "$REDIS_PID")
  case "$kind" in
    http)
      read -r _ n rps p99 < <(wrk -t2 -c "$CONNS" -d "$DURATION" --latency -s "$tmp/rotate.lua" \
        "http://127.0.0.1:${HPORT[$name]}" 2>/dev/null | grep '^AB ')
      ;;
    p1 | p16)
      local p=${kind#p} reqs=$RB_N
      [ "$p" = 16 ] && reqs=$((RB_N * 10))
      rps=$(redis-benchmark -h 127.0.0.1 -p "${RPORT[$name]}" -t get -c 50 -n "$reqs" -P "$p" -q 2>/dev/null |
        awk '/GET/ { for (i = 1; i <= NF; i++) if ($i ~ /requests/) print $(i - 1) }' | tail -1)
      n=$reqs p99=0
      ;;
  esac
  c1=$(cpu_ticks "$pid")
  r1=$(cpu_ticks "$REDIS_PID")
  awk -v n="$n" -v rps="$rps" -v p99="$p99" -v c=$((c1 - c0)) -v r=$((r1 - r0)) -v t="$TCK" \
    'BEGIN { printf "%s %s %.2f %.2f\n", rps, p99, c * 1e6 / t / n, r * 1e6 / t / n }'
}

declare -A S
for r in $(seq "$ROUNDS"); do
  for kind in http p1 p16; do
    for pair in hit miss; do
      for side in old new; do
        name=${side}_$pair
        line=$(measure "$name" "$kind")
        S[$name.$kind]+="$line"$'\n'
        say "round $r $kind $name: $line"
      done
    done
  done
done

median() { # field-number samples
  printf '%s' "$2" | awk -v f="$1" '{ print $f }' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
printf '\n%-22s %12s %12s %8s %10s %10s %8s %12s\n' scenario "old req/s" "new req/s" "new/old" "old µs/req" "new µs/req" "new/old" "new p99 µs"
for kind in http p1 p16; do
  for pair in hit miss; do
    o=${S[old_$pair.$kind]} n=${S[new_$pair.$kind]}
    or=$(median 1 "$o") nr=$(median 1 "$n") oc=$(median 3 "$o") nc=$(median 3 "$n") np=$(median 2 "$n")
    awk -v k="$kind $pair" -v or="$or" -v nr="$nr" -v oc="$oc" -v nc="$nc" -v np="$np" 'BEGIN {
      printf "%-22s %12.0f %12.0f %8.2f %10.2f %10.2f %8.2f %12s\n", k, or, nr, (or > 0 ? nr / or : 0), oc, nc, (oc > 0 ? nc / oc : 0), np }'
  done
done
echo "(medians of $ROUNDS alternating rounds; http = wrk -t2 -c$CONNS -d$DURATION, p1/p16 = redis-benchmark -t get -c 50 -P 1/16)"
