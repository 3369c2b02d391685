#!/usr/bin/env bash
# What sharing the HTTP port costs TURN: the same TURN-over-TLS and TURN-over-TCP load through a
# dedicated TURN port and through the port HTTP(S) shares with it (http.listen =
# turn.tls_listen / tcp_listen, src/demux.rs: the first bytes are classified once, then the
# connection is TURN's). 3 rounds, medians.
#   bench/oneport.sh        raw log to bench/results/oneport-<date>.log
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin kinlink --example turn_bench
log=bench/results/oneport-$(date +%F).log
mkdir -p bench/results
{
  echo "# bench/oneport.sh $(date -u +%FT%TZ) $(git rev-parse --short HEAD); $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  for round in 1 2 3; do
    for transport in tls tcp; do
      for share in no yes; do
        for rate in 10000 40000; do
          target/release/examples/turn_bench --transport "$transport" --allocations 100 --size 1200 --rate "$rate" --seconds 5 --share-http "$share" | grep '^RESULT'
        done
      done
    done
  done
} | tee "$log"
python3 - "$log" <<'PY'
import sys, statistics, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if not line.startswith("RESULT"):
        continue
    kv = dict(f.split("=", 1) for f in line.split()[1:])
    runs[(kv["transport"], kv["offered_pps"], kv["shared_port"])].append(kv)
print("| TURN over | offered pkt/s | port | relayed pkt/s | loss % | RTT p50 ms | RTT p99 ms | CPU s/Mpkt |")
print("|---|---|---|---|---|---|---|---|")
for (transport, rate, shared), rs in sorted(runs.items(), key=lambda k: (k[0][0], int(k[0][1]), k[0][2])):
    m = lambda k: statistics.median(float(r[k]) for r in rs)
    print(f"| {transport} | {rate} | {'shared with HTTP' if shared == 'true' else 'dedicated'} | {m('relayed_pps'):.0f} | {m('loss_pct'):.3f} | {m('rtt_p50_ms'):.3f} | {m('rtt_p99_ms'):.3f} | {m('cpu_s_per_mpkt'):.2f} |")
PY
