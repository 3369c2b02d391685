#!/usr/bin/env python3
"""Medians from bench/io_uring.sh's log: CPU per packet at the fixed rates, and each
variant's capacity (the highest relayed rate under 0.1% loss), epoll forwarder against the
io_uring one, and against kinlink and coturn where the run had them (VARIANTS)."""
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
ORDER = ["kinlink", "coturn", "epoll", "uring-defer", "uring-coop"]


def base(table, key):
    """The median of `key`'s values in `table`, NaN when the run did not have it."""
    return med(table[key]) if table.get(key) else float("nan")


print("| allocations | offered pkt/s | variant | CPU µs/pkt (kernel) | vs epoll | loss % | rounds |")
print("|---|---|---|---|---|---|---|")
cpus = {k: [r[0] for r in rs] for k, rs in fixed.items()}
for (a, rate, v) in sorted(fixed, key=lambda k: (k[0], k[1], ORDER.index(k[2]))):
    rows = fixed[(a, rate, v)]
    cpu, sys_ = med(r[0] for r in rows), med(r[1] for r in rows)
    epoll = base(cpus, (a, rate, "epoll"))
    print(f"| {a} | {rate:,} | {v} | {cpu:.2f} ({sys_:.2f}) | {cpu / epoll:.2f} | {med(r[2] for r in rows):.3f} | {len(rows)} |")
print()
print("| allocations | variant | capacity pkt/s, <0.1% loss (median) | per round | vs epoll | vs coturn |")
print("|---|---|---|---|---|---|")
caps = {k: list(c.values()) for k, c in cap.items()}
for (a, v) in sorted(cap, key=lambda k: (k[0], ORDER.index(k[1]))):
    c = cap[(a, v)]
    m = med(c.values())
    per_round = ", ".join(f"{x:,.0f}" for _, x in sorted(c.items()))
    print(f"| {a} | {v} | {m:,.0f} | {per_round} | {m / base(caps, (a, 'epoll')):.2f} | {m / base(caps, (a, 'coturn')):.2f} |")
