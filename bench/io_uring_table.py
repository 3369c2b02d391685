#!/usr/bin/env python3
"""Medians from bench/io_uring.sh's log: CPU per packet at the fixed rates, and each
variant's capacity (the highest relayed rate under 0.1% loss), epoll forwarder against the
io_uring one."""
import re
import statistics
import sys
from collections import defaultdict


def fields(line):
    return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)


fixed = defaultdict(list)  # (allocations, rate, variant) -> [(cpu, sys, loss)]
cap = defaultdict(dict)  # (allocations, variant) -> {round: capacity}
for line in open(sys.argv[1]):
    if not line.startswith("RESULT"):
        continue
    f = fields(line)
    key_a, v = int(f["allocations"]), f["variant"]
    if f["mode"] == "fixed":
        fixed[(key_a, int(f["offered_pps"]), v)].append((float(f["cpu_s_per_mpkt"]), float(f["sys_s_per_mpkt"]), float(f["loss_pct"])))
    elif f["mode"] == "ladder" and float(f["loss_pct"]) < 0.1:
        r = f["round"]
        cap[(key_a, v)][r] = max(cap[(key_a, v)].get(r, 0), float(f["relayed_pps"]))

med = statistics.median
print("| allocations | offered pkt/s | variant | CPU µs/pkt (kernel) | vs epoll | loss % | rounds |")
print("|---|---|---|---|---|---|---|")
for (a, rate, v) in sorted(fixed, key=lambda k: (k[0], k[1], ["epoll", "uring-defer", "uring-coop"].index(k[2]))):
    rows = fixed[(a, rate, v)]
    cpu, sys_ = med(r[0] for r in rows), med(r[1] for r in rows)
    base = med(r[0] for r in fixed[(a, rate, "epoll")])
    print(f"| {a} | {rate:,} | {v} | {cpu:.2f} ({sys_:.2f}) | {cpu / base:.2f} | {med(r[2] for r in rows):.3f} | {len(rows)} |")
print()
print("| allocations | variant | capacity pkt/s, <0.1% loss (median) | per round | vs epoll |")
print("|---|---|---|---|---|")
for (a, v) in sorted(cap, key=lambda k: (k[0], ["epoll", "uring-defer", "uring-coop"].index(k[1]))):
    c = cap[(a, v)]
    base = med(cap[(a, "epoll")].values()) if cap.get((a, "epoll")) else float("nan")
    print(f"| {a} | {v} | {med(c.values()):,.0f} | {', '.join(f'{x:,.0f}' for _, x in sorted(c.items()))} | {med(c.values()) / base:.2f} |")
