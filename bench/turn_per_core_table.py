#!/usr/bin/env python3
"""Tables for BENCHMARKS.md from bench/turn_per_core.sh logs.

Per core: for each round, server, allocation count and size, the highest relayed packets/s
whose run lost under 0.1% (the capacity), and the server CPU per relayed packet at that
point; medians over rounds, and kinlink's ratios to coturn and to the forwarder. Capacity
per CPU-second (1e6 / cpu_s_per_mpkt) is shown beside it: when the generator's core, not
the server's, is what runs out, the server is below 100% and that column says what its core
could carry.

Kernel share (part 1b, mode=split): CPU per packet at one fixed rate, split into user and
system time; coturn's CPU per packet over kinlink's system time per packet is the per-core
ratio kinlink would reach if its own code cost nothing.
"""
import re
import statistics
import sys
from collections import defaultdict


def parse(path):
    rows = []
    for line in open(path):
        if not line.startswith("RESULT"):
            continue
        rows.append(dict(re.findall(r"(\w+)=(\S+)", line)))
    return rows


def num(r, k):
    return float(r[k])


# The benchmark's points, in table order, and the servers it compares.
POINTS = [(allocations, size) for allocations in (2, 100, 1000) for size in (100, 1200)]
SERVERS = ("kinlink", "coturn", "forwarder")


def trio(table, allocations, size):
    """The three servers' entries at one point (None where a server has none)."""
    return (table.get((s, allocations, size)) for s in SERVERS)


def main(paths):
    rows = [r for p in paths for r in parse(p)]
    best = defaultdict(dict)  # (server, allocations, size) -> round -> row
    for r in rows:
        if r.get("mode") != "per_core":
            continue
        key = (r["server"], int(r["allocations"]), int(r["size"]))
        if num(r, "loss_pct") < 0.1:
            cur = best[key].get(r["round"])
            if cur is None or num(r, "relayed_pps") > num(cur, "relayed_pps"):
                best[key][r["round"]] = r
    med = {}
    for key, by_round in best.items():
        rs = list(by_round.values())
        med[key] = (
            statistics.median(num(r, "relayed_pps") for r in rs),
            statistics.median(num(r, "cpu_s_per_mpkt") for r in rs),
            statistics.median(num(r, "server_cpu_util") for r in rs),
            statistics.median(num(r, "rtt_p50_ms") for r in rs),
            len(rs),
            # Kernel (system) CPU per packet at the capacity point, when the log has it.
            statistics.median(num(r, "sys_s_per_mpkt") for r in rs) if all("sys_s_per_mpkt" in r for r in rs) else None,
        )
    print("## Per server core (server on CPU 0, generator on CPU 1), medians of rounds\n")
    print("| allocations | size | server | relayed pkt/s, <0.1% loss | server CPU util | CPU µs/pkt | pkt per CPU-second | RTT p50 ms | rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for allocations, size in POINTS:
        for server in SERVERS:
            m = med.get((server, allocations, size))
            if not m:
                continue
            print(f"| {allocations} | {size} | {server} | {m[0]:,.0f} | {m[2]:.2f} | {m[1]:.2f} | {1e6 / m[1]:,.0f} | {m[3]:.2f} | {m[4]} |")
    print("\n| allocations | size | kinlink / coturn (pkt/s) | kinlink / forwarder (pkt/s) | kinlink / coturn (per CPU-s) | kinlink / forwarder (per CPU-s) |")
    print("|---|---|---|---|---|---|")
    for allocations, size in POINTS:
        k, c, f = trio(med, allocations, size)
        if not (k and c and f):
            continue
        print(f"| {allocations} | {size} | {k[0] / c[0]:.2f} | {k[0] / f[0]:.2f} | {c[1] / k[1]:.2f} | {f[1] / k[1]:.2f} |")
    if any(m[5] is not None for m in med.values()):
        print("\n### Kernel CPU per packet at each server's capacity point\n")
        print("| allocations | size | kinlink kernel µs/pkt | forwarder kernel µs/pkt | coturn CPU µs/pkt (kernel) | ceiling: coturn CPU / kinlink kernel |")
        print("|---|---|---|---|---|---|")
        for allocations, size in POINTS:
            k, c, f = trio(med, allocations, size)
            if not (k and c and f) or None in (k[5], c[5], f[5]):
                continue
            print(f"| {allocations} | {size} | {k[5]:.2f} | {f[5]:.2f} | {c[1]:.2f} ({c[5]:.2f}) | {c[1] / k[5]:.2f} |")
    split = defaultdict(list)  # (server, allocations, size) -> rows
    for r in rows:
        if r.get("mode") == "split" and "sys_s_per_mpkt" in r and num(r, "loss_pct") < 0.1:
            split[(r["server"], int(r["allocations"]), int(r["size"]))].append(r)
    if split:
        print("\n## CPU per packet, user and kernel (fixed rate under every server's capacity), medians of rounds\n")
        print("| allocations | size | server | offered pkt/s | CPU µs/pkt | kernel µs/pkt | user µs/pkt | rounds |")
        print("|---|---|---|---|---|---|---|---|")
        sm = {}
        for allocations, size in POINTS:
            for server in SERVERS:
                rs = split.get((server, allocations, size))
                if not rs:
                    continue
                cpu = statistics.median(num(r, "cpu_s_per_mpkt") for r in rs)
                sys_ = statistics.median(num(r, "sys_s_per_mpkt") for r in rs)
                user = statistics.median(num(r, "cpu_s_per_mpkt") - num(r, "sys_s_per_mpkt") for r in rs)
                sm[(server, allocations, size)] = (cpu, sys_)
                print(f"| {allocations} | {size} | {server} | {rs[0]['offered_pps']} | {cpu:.2f} | {sys_:.2f} | {user:.2f} | {len(rs)} |")
        print("\n| allocations | size | kinlink / coturn (per CPU-s) | ceiling: coturn CPU / kinlink kernel | forwarder / coturn (per CPU-s) |")
        print("|---|---|---|---|---|")
        for allocations, size in POINTS:
            k, c, f = trio(sm, allocations, size)
            if not (k and c and f):
                continue
            print(f"| {allocations} | {size} | {c[0] / k[0]:.2f} | {c[0] / k[1]:.2f} | {c[0] / f[0]:.2f} |")
    spread = [r for r in rows if r.get("mode") == "spread"]
    if spread:
        print("\n## Both CPUs for the server, generator beside it\n")
        print("| round | server | offered pkt/s | relayed pkt/s | loss % | RTT p50 ms | server CPU util | packets per shard |")
        print("|---|---|---|---|---|---|---|---|")
        for r in spread:
            print(f"| {r['round']} | {r['server']} | {r['offered_pps']} | {num(r, 'relayed_pps'):,.0f} | {r['loss_pct']} | {r['rtt_p50_ms']} | {r['server_cpu_util']} | {r['shard_packets']} |")
    memory = [r for r in rows if r.get("mode") == "memory"]
    if memory:
        print("\n## 10,000 allocations\n")
        print("| server | allocations/s (401 leg included, 64 at a time) | user-space RSS before → after, KiB | bytes per allocation | loss % |")
        print("|---|---|---|---|---|")
        for r in memory:
            print(f"| {r['server']} | {num(r, 'allocations_per_sec'):,.0f} | {r['rss_kib_before']} → {r['rss_kib_after']} | {num(r, 'rss_bytes_per_allocation'):,.0f} | {r['loss_pct']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
