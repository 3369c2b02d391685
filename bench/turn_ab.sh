#!/usr/bin/env bash
# Two or more kinlink builds side by side (and coturn), for one change to the data path: each
# server in turn, ROUNDS rounds, at one fixed rate under every server's capacity, between
# network namespaces (bench/netns.sh), server on CPU 0 and generator on CPU 1, so CPU per
# packet is compared on the same load. Root. Build each binary first and name it
# /tmp/kinlink-VARIANT, e.g.:
#   git stash; cargo build --release; cp target/release/kinlink /tmp/kinlink-base; git stash pop
#   cargo build --release --bins --examples; cp target/release/kinlink /tmp/kinlink-new
#   VARIANTS="base new coturn" bench/turn_ab.sh | tee bench/results/turn-ab-$(date +%F).log
# Prints the RESULT lines, then the medians and coturn's CPU per packet over each build's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5} ALLOCS=${ALLOCS:-"100 1000"} SIZE=${SIZE:-1200} RATE=${RATE:-25000}
VARIANTS=${VARIANTS:-"base new coturn"}
B=./target/release/examples/turn_bench
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r); variants: $VARIANTS"
source bench/netns.sh
raw=$(mktemp)
for round in $(seq "$ROUNDS"); do
  for alloc in $ALLOCS; do
    for v in $VARIANTS; do
      if [ "$v" = coturn ]; then srv=(--server coturn); else srv=(--server kinlink --bin "/tmp/kinlink-$v"); fi
      "${GEN[@]}" taskset -c 1 "$B" "${srv[@]}" --peer echo --threads 1 --server-cpus 0 --allocations "$alloc" \
        --size "$SIZE" --rate "$RATE" --seconds 4 "${NS_FLAGS[@]}" | grep '^RESULT' | sed "s/^RESULT/RESULT round=$round variant=$v/" \
        || echo "FAILED $v $alloc"
    done
  done
done > "$raw"
cat "$raw"
python3 - "$raw" <<'PY'

import collections, statistics as st, sys
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    if l.startswith("RESULT"):
        f = dict(kv.split("=", 1) for kv in l.split()[1:] if "=" in kv)
        d[(int(f["allocations"]), f["variant"])].append((float(f["cpu_s_per_mpkt"]), float(f["sys_s_per_mpkt"]), float(f["loss_pct"])))
print("| allocations | variant | CPU µs/pkt, median (kernel) | per round | worst loss % | coturn / it |")
print("|---|---|---|---|---|---|")
for (a, v), rows in sorted(d.items()):
    cpu = st.median(r[0] for r in rows)
    c = d.get((a, "coturn"))
    ratio = f"{st.median(r[0] for r in c) / cpu:.2f}" if c else "-"
    print(f"| {a} | {v} | {cpu:.2f} ({st.median(r[1] for r in rows):.2f}) | {', '.join(f'{r[0]:.2f}' for r in rows)} | {max(r[2] for r in rows):.3f} | {ratio} |")
PY
rm -f "$raw"
