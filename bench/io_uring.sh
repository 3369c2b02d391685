#!/usr/bin/env bash
# What io_uring would save kinlink's TURN shards (issue 12): the minimal forwarder
# (examples/udp_forwarder: kinlink's epoll loop and recvmmsg/sendmmsg batches, no TURN)
# against the same forwarder on io_uring (bench/io_uring_forwarder: multishot recvmsg into a
# provided buffer ring, a send SQE per datagram from the buffer it arrived in, one
# io_uring_enter per loop turn; with DEFER_TASKRUN and with COOP_TASKRUN), between network
# namespaces (bench/netns.sh), server on CPU 0, generator on CPU 1, servers alternating.
# Part 1: CPU per packet at fixed rates under every variant's capacity. Part 2: the rate
# ladder to each one's capacity (the last rate under 0.1% loss). Root; about 12 minutes.
#   bench/io_uring.sh | tee bench/results/turn-io-uring-$(date +%F).log
#   python3 bench/io_uring_table.py bench/results/turn-io-uring-$(date +%F).log
# VARIANTS picks what runs (default "epoll uring-defer uring-coop"); "kinlink" and "coturn"
# (one relay thread) put the servers beside the forwarders in the same rounds, so the
# forwarders' capacity can be set against coturn's without drift between runs. FIXED=""
# skips part 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} ALLOCATIONS=${ALLOCATIONS:-"100 1000"} SIZE=${SIZE:-1200}
FIXED=${FIXED-"20000 30000"} VARIANTS=${VARIANTS:-"epoll uring-defer uring-coop"} RATES=${RATES:-"30000 35000 40000 45000 50000 55000 60000"}
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
cargo build --release --bins --examples
cargo build --release --manifest-path bench/io_uring_forwarder/Cargo.toml
B=./target/release/examples/turn_bench URING=bench/io_uring_forwarder/target/release/io_uring_forwarder
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); commit $(git rev-parse --short HEAD)"
source bench/netns.sh
source bench/ladder.sh
run() { # label, variant, then turn_bench flags
  local label=$1 variant=$2; shift 2
  local fwd=() taskrun="" server=forwarder
  case $variant in
    kinlink|coturn) server=$variant ;;
    epoll) ;;
    uring-defer) fwd=(--forwarder "$URING") taskrun=defer ;;
    uring-coop) fwd=(--forwarder "$URING") taskrun=coop ;;
  esac
  URING_TASKRUN=$taskrun "${GEN[@]}" taskset -c 1 "$B" --server "$server" --peer echo --threads 1 --server-cpus 0 \
    "${fwd[@]}" "$@" "${NS_FLAGS[@]}" | grep '^RESULT' | sed "s/^RESULT/RESULT $label variant=$variant/" || echo "FAILED $label $variant $*"
}
for round in $(seq "$ROUNDS"); do
  for allocations in $ALLOCATIONS; do
    for rate in $FIXED; do
      for variant in $VARIANTS; do
        run "mode=fixed round=$round" $variant --allocations "$allocations" --size "$SIZE" --rate "$rate" --seconds 4
      done
    done
  done
done
for round in $(seq "$ROUNDS"); do
  for allocations in $ALLOCATIONS; do
    for variant in $VARIANTS; do
      ladder run "mode=ladder round=$round" $variant --allocations "$allocations" --size "$SIZE" --seconds 2
    done
  done
done
