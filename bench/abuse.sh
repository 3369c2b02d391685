#!/usr/bin/env bash
# Abuse benchmark: a legitimate client's register and TURN Allocate latency, and kinlink's RSS
# and CPU, with no attack and during slowloris, idle TURN streams and an Allocate flood
# (examples/abuse_bench.rs). Loopback only; every phase is bounded (SECONDS, default 10).
#   bench/abuse.sh | tee bench/results/abuse-$(date +%F).log
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_=${SECONDS_:-10} ROUNDS=${ROUNDS:-3}
cargo build --release --bins --examples
ulimit -n 65536 2>/dev/null || true
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); kinlink $(git rev-parse --short HEAD)"
for round in $(seq "$ROUNDS"); do
  ./target/release/examples/abuse_bench --seconds "$SECONDS_" | sed "s/^RESULT/RESULT round=$round/"
done
