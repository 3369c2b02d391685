#!/usr/bin/env bash
# Where the server core's time goes (issue 12): runs turn_bench between network namespaces
# (bench/netns.sh; server on CPU 0, generator on CPU 1) and samples /proc/stat's cpu0 line
# over WINDOW seconds in the middle of the traffic: user, system, softirq and idle shares of
# CPU 0. The kernel charges a whole tick to softirq when it lands in one (no IRQ time
# accounting here), so the shares are samples at 250 Hz, not exact times. Root.
#   bench/cpu_split.sh "forwarder kinlink coturn" "30000 33750" --allocations 1000 --size 1200
set -euo pipefail
cd "$(dirname "$0")/.."
SERVERS=$1 RATES=$2; shift 2
ROUNDS=${ROUNDS:-3} SECONDS_=${SECONDS_:-7} WINDOW=${WINDOW:-3}
cargo build --release --bins --examples
B=./target/release/examples/turn_bench
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r); commit $(git rev-parse --short HEAD)"
source bench/netns.sh
cpu0() { awk '$1 == "cpu0" { print $2 + $3, $4, $5, $6, $7, $8, $9 }' /proc/stat; }
for round in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    for server in $SERVERS; do
      out=$(mktemp)
      "${GEN[@]}" taskset -c 1 "$B" --server "$server" --peer echo --threads 1 --server-cpus 0 \
        --rate "$rate" --seconds "$SECONDS_" "$@" "${NS_FLAGS[@]}" >"$out" &
      pid=$!
      # Allocations are up well within 2 s (1,000 take about 0.1 s); the window ends before
      # the traffic does.
      sleep $(( (SECONDS_ - WINDOW) / 2 + 1 ))
      read -r u0 s0 i0 w0 q0 sq0 st0 < <(cpu0)
      sleep "$WINDOW"
      read -r u1 s1 i1 w1 q1 sq1 st1 < <(cpu0)
      wait "$pid" || true
      result=$(grep '^RESULT' "$out" | grep -o 'loss_pct=[^ ]*\|relayed_pps=[^ ]*\|server_cpu_util=[^ ]*' | tr '\n' ' ')
      rm -f "$out"
      awk -v r="$round" -v rate="$rate" -v srv="$server" -v res="$result" \
        -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v i=$((i1 - i0)) -v w=$((w1 - w0)) -v q=$((q1 - q0)) -v sq=$((sq1 - sq0)) -v st=$((st1 - st0)) \
        'BEGIN { t = u + s + i + w + q + sq + st; if (t == 0) t = 1;
                 printf "SPLIT round=%s server=%s offered_pps=%s cpu0_user=%.2f cpu0_system=%.2f cpu0_softirq=%.2f cpu0_irq=%.2f cpu0_idle=%.2f cpu0_steal=%.2f %s\n",
                        r, srv, rate, u / t, s / t, sq / t, q / t, (i + w) / t, st / t, res }'
    done
  done
done
