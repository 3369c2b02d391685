#!/usr/bin/env bash
# Signaling across nodes (issue 13): three kinlink nodes sharing one redis-server on loopback,
# device i on node i mod 3 (families of 4, so most pairs are cross-node), against the same
# load on one node, alternating, ROUNDS rounds (default 3); then one node holding DEVICES/3
# devices, as many as each cluster node holds, for memory per device at the same count (a
# node's fixed costs spread over fewer devices otherwise). Loopback only; bounded.
#   bench/signal_cluster.sh [DEVICES] [RATE] [SECONDS] | tee bench/results/signal-cluster-$(date +%F).log
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-3000} RATE=${2:-10000} SECONDS_=${3:-10} ROUNDS=${ROUNDS:-3}
command -v redis-server >/dev/null || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo; $sudo apt-get update -qq; $sudo apt-get install -y -qq redis-server >/dev/null; }
cargo build --release --bins --examples
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(redis-server --version | cut -d' ' -f1-3)"
for round in $(seq "$ROUNDS"); do
  for nodes in 3 1; do
    echo "== round $round: $nodes node(s)"
    ./target/release/examples/signal_bench --nodes "$nodes" --devices "$DEVICES" --rate "$RATE" --seconds "$SECONDS_"
  done
  echo "== round $round: 1 node(s), $((DEVICES / 3)) devices (as many as one of the 3 nodes holds)"
  ./target/release/examples/signal_bench --nodes 1 --devices "$((DEVICES / 3 / 4 * 4))" --rate "$RATE" --seconds "$SECONDS_"
done
