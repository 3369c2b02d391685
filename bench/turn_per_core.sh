#!/usr/bin/env bash
# TURN per-core benchmark (issue 12), on 2 cores: the server pinned to CPU 0 (taskset), the
# load generator to CPU 1. Every allocation binds a channel to one echoing UDP peer of the
# generator (turn_bench --peer echo), so the generator's work per relayed packet is about
# the server's and one generator core can drive one server core.
#
# Part 1 (per core): for kinlink (turn.data_threads=1), coturn with one relay thread
# (--relay-threads 1; its listener and auth threads share the same CPU) and the minimal
# forwarder (examples/udp_forwarder: kinlink's batch syscalls, no TURN), at 2, 100 and 1000
# allocations and 100- and 1200-byte packets, the offered rate goes up RATES until loss
# reaches 0.1%: the last rate under it is the point's capacity. ROUNDS rounds (default 3),
# servers alternating.
# Part 2 (spread): the server on both CPUs (kinlink: 2 shards; coturn: default threads), the
# generator beside it; per-shard packet counts show every shard carries traffic.
# Part 3: 10,000 allocations (user-space RSS per allocation) and the allocation rate.
#   bench/turn_per_core.sh | tee bench/results/turn-per-core-$(date +%F).log
#   python3 bench/turn_per_core_table.py bench/results/turn-per-core-$(date +%F).log
#
# NETNS=1 (root; part 1 only): the server in a network namespace of its own, the generator in
# another, joined by a veth pair, each side's receive processing steered to its own CPU (RPS:
# the server's to CPU 0, the generator's to CPU 1), as between two hosts. Over loopback a
# send also runs the receiver's whole receive path on the sender's CPU, so the server's core
# pays for the generator's kernel work too, the same for every server, which compresses the
# differences between them. ALLOCATIONS and SIZES pick the points (default all);
# PER_CORE_ONLY=1 runs part 1 alone on loopback too.
#   NETNS=1 RATES="10000 15000 20000 25000 30000 35000 40000 45000 50000" \
#     bench/turn_per_core.sh | tee bench/results/turn-per-core-netns-$(date +%F).log
#
# SERVER_NICE=N runs every server at that priority (`nice -n N`). Measured at -10, interleaved
# with 0: no difference in kinlink's capacity (BENCHMARKS.md, the per-core targets).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} SECONDS_=${SECONDS_:-2}
RATES=${RATES:-"20000 30000 40000 50000 60000 70000 80000 100000 120000"}
ALLOCATIONS=${ALLOCATIONS:-"2 100 1000"} SIZES=${SIZES:-"100 1200"} NETNS=${NETNS:-0}
# PER_CORE_ONLY=1: part 1 alone (always so with NETNS=1).
PER_CORE_ONLY=${PER_CORE_ONLY:-$NETNS}
command -v turnserver >/dev/null || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo; $sudo apt-get update -qq; $sudo apt-get install -y -qq coturn >/dev/null; }
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs" >&2; exit 1; }
cargo build --release --bins --examples
B=./target/release/examples/turn_bench
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); $(turnserver --version 2>/dev/null | head -1 || true)"
NS_FLAGS=() GEN=()
[ -n "${SERVER_NICE:-}" ] && echo "servers at nice ${SERVER_NICE}"
[ "$NETNS" = 1 ] && source bench/netns.sh
source bench/ladder.sh
run() { # label, then turn_bench flags
  local label=$1; shift
  "${GEN[@]}" taskset -c 1 "$B" "$@" "${NS_FLAGS[@]}" ${SERVER_NICE:+--server-nice "$SERVER_NICE"} | grep '^RESULT' | sed "s/^RESULT/RESULT $label/" || echo "FAILED $label $*"
}
# SPLIT_ONLY=1: part 1b alone.
[ "${SPLIT_ONLY:-0}" = 1 ] || for round in $(seq "$ROUNDS"); do
  for allocations in $ALLOCATIONS; do
    for size in $SIZES; do
      for server in kinlink coturn forwarder; do
        ladder run "mode=per_core round=$round" --server "$server" --peer echo --threads 1 --server-cpus 0 \
          --allocations "$allocations" --size "$size" --seconds "$SECONDS_"
      done
    done
  done
done
# Part 1b (kernel share): each point once more at SPLIT_RATE packets/s (under every server's
# capacity), servers alternating, for the server's CPU per packet split into user and system
# time: system time is the kernel's work for the packet (system calls, copies, routing, the
# loopback delivery), which no user-space change removes, so coturn's CPU per packet over
# kinlink's system time per packet bounds the per-core ratio kinlink could reach.
for round in $(seq "$ROUNDS"); do
  for allocations in $ALLOCATIONS; do
    for size in $SIZES; do
      for server in kinlink coturn forwarder; do
        run "mode=split round=$round" --server "$server" --peer echo --threads 1 --server-cpus 0 \
          --allocations "$allocations" --size "$size" --rate "${SPLIT_RATE:-25000}" --seconds 4
      done
    done
  done
done
[ "$PER_CORE_ONLY" = 1 ] && exit 0
for round in $(seq "$ROUNDS"); do
  for rate in 40000 80000; do
    for server in kinlink coturn; do
      "$B" --server "$server" --peer echo --allocations 100 --size 1200 --rate "$rate" --seconds "$SECONDS_" \
        | grep '^RESULT' | sed "s/^RESULT/RESULT mode=spread round=$round/" || echo "FAILED spread $server $rate"
    done
  done
done
for server in kinlink coturn; do
  taskset -c 1 "$B" --server "$server" --peer echo --threads 1 --server-cpus 0 --allocations 10000 --size 200 --rate 10000 --seconds 3 \
    | grep '^RESULT' | sed "s/^RESULT/RESULT mode=memory round=1/" || echo "FAILED memory $server"
done
