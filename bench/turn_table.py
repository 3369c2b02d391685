#!/usr/bin/env python3
"""Medians of bench/turn.sh RESULT lines as a Markdown table, kinlink beside coturn.

    bench/turn.sh | tee turn.log; python3 bench/turn_table.py turn.log
"""
import re
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    if not line.startswith("RESULT"):
        continue
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    key = (int(kv["allocations"]), int(kv["size"]), kv.get("transport", "udp"), int(kv["offered_pps"]))
    runs[key, kv["server"]].append({k: float(v) for k, v in kv.items() if re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?|nan|inf", v)})


def med(key, server, field):
    vals = [r[field] for r in runs.get((key, server), []) if r[field] == r[field]]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


print("| allocations | bytes | client leg | offered pkt/s | relayed pkt/s kinlink / coturn (ratio) | Mbit/s kinlink / coturn | loss % kinlink / coturn "
      "| RTT p50 ms kinlink / coturn | RTT p99 ms kinlink / coturn | CPU s per M pkt kinlink / coturn (ratio) | rounds |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for key in sorted({k for k, _ in runs}):
    k, c = "kinlink", "coturn"
    rp = (med(key, k, "relayed_pps"), med(key, c, "relayed_pps"))
    cpu = (med(key, k, "cpu_s_per_mpkt"), med(key, c, "cpu_s_per_mpkt"))
    n = min(len(runs[key, k]), len(runs[key, c]))
    print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:,} | {rp[0]:,.0f} / {rp[1]:,.0f} ({rp[0] / rp[1]:.2f}) "
          f"| {med(key, k, 'mbit_s'):.1f} / {med(key, c, 'mbit_s'):.1f} "
          f"| {med(key, k, 'loss_pct'):.2f} / {med(key, c, 'loss_pct'):.2f} "
          f"| {med(key, k, 'rtt_p50_ms'):.2f} / {med(key, c, 'rtt_p50_ms'):.2f} "
          f"| {med(key, k, 'rtt_p99_ms'):.2f} / {med(key, c, 'rtt_p99_ms'):.2f} "
          f"| {cpu[0]:.2f} / {cpu[1]:.2f} ({cpu[0] / cpu[1]:.2f}) | {n} |")
