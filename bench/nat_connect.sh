#!/usr/bin/env bash
# Time to connected for each NAT testbed case (tests/nat.rs), several rounds, medians.
#   bench/nat_connect.sh [rounds=5]      raw log to bench/results/nat-connect-<date>.log
# Root (network namespaces); the suite's tools (scripts/test installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
log=bench/results/nat-connect-$(date +%F).log
mkdir -p bench/results
{
  echo "# bench/nat_connect.sh rounds=$rounds $(date -u +%FT%TZ) $(git rev-parse --short HEAD)"
  echo "# $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); node $(node --version); chromium $(chromium --version 2>/dev/null | awk '{print $2}')"
  NAT_ROUNDS=$rounds cargo test --release --locked --test nat -- --nocapture --test-threads=1 2>&1 | grep -oE 'nat-connect .*|test result.*'
} | tee "$log"
python3 - "$log" <<'PY'
import re, statistics, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r'nat-connect case=(\S+) reporters=\S+ a="?([^" ]+)"? b="?([^" ]+)"? a_ms=(\d+) b_ms=(\d+)', line)
    if m:
        case, a, b, ams, bms = m.groups()
        runs[case].append((a, b, max(int(ams), int(bms))))
print("| case | runs | routes (A / B) | time to connected, median (min–max) |")
print("|---|---|---|---|")
for case, rs in runs.items():
    routes = ", ".join(sorted({f"{a} / {b}" for a, b, _ in rs}))
    ms = [t for _, _, t in rs]
    print(f"| {case} | {len(rs)} | {routes} | {statistics.median(ms):.0f} ms ({min(ms)}–{max(ms)}) |")
PY
