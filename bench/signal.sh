#!/usr/bin/env bash
# Signaling benchmark, kinlink and the seed's Node `ws` server side by side, alternating,
# ROUNDS rounds each (default 3). Loopback only; bounded by --devices/--rate/--seconds.
#   bench/signal.sh [DEVICES] [RATE] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-19900} RATE=${2:-10000} SECONDS_=${3:-10} ROUNDS=${ROUNDS:-3}
cargo build --release --bins --examples
(cd bench/peer && npm install --no-audit --no-fund --silent)
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), open files $(ulimit -n)"
for round in $(seq "$ROUNDS"); do
  for server in kinlink node; do
    echo "== round $round: $server"
    ./target/release/examples/signal_bench --server "$server" --devices "$DEVICES" --rate "$RATE" --seconds "$SECONDS_"
  done
done
