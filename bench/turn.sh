#!/usr/bin/env bash
# TURN relay benchmark: kinlink and Debian's coturn side by side, alternating, ROUNDS rounds
# (default 3) of every point: 2, 100 and 1000 allocations; 100- and 1200-byte packets; UDP and
# TCP client legs; an offered rate both should carry without loss (RATE, default 20000
# packets/s) and one past saturation on 2 shared cores (HIGH, default 80000). Then one run
# each holding 10,000 allocations. Loopback only; every run is bounded.
#   bench/turn.sh | tee turn.log; python3 bench/turn_table.py turn.log
# Per-core capacity against coturn with one relay thread and a minimal forwarder:
# bench/turn_per_core.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} RATE=${RATE:-20000} HIGH=${HIGH:-80000} SECONDS_=${SECONDS_:-3}
command -v turnserver >/dev/null || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo; $sudo apt-get update -qq; $sudo apt-get install -y -qq coturn >/dev/null; }
cargo build --release --bins --examples
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); $(turnserver --version 2>/dev/null | head -1 || true)"
for round in $(seq "$ROUNDS"); do
  for allocations in 2 100 1000; do
    for size in 100 1200; do
      for transport in udp tcp; do
        for rate in "$RATE" "$HIGH"; do
          for server in kinlink coturn; do
            ./target/release/examples/turn_bench --server "$server" --transport "$transport" --allocations "$allocations" \
              --size "$size" --rate "$rate" --seconds "$SECONDS_" | grep '^RESULT' | sed "s/^RESULT/RESULT round=$round/" \
              || echo "FAILED round=$round server=$server transport=$transport allocations=$allocations size=$size rate=$rate"
          done
        done
      done
    done
  done
done
for server in kinlink coturn; do
  ./target/release/examples/turn_bench --server "$server" --allocations 10000 --size 200 --rate 10000 --seconds 5 \
    | grep '^RESULT' | sed "s/^RESULT/RESULT round=1/" || echo "FAILED 10000 allocations server=$server"
done
