#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (SECONDS_PER_TARGET, default 60) with cargo fuzz
# (libFuzzer). Stable Rust: RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags. A crash leaves
# its input under fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${SECONDS_PER_TARGET:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in stun_message channel_data turn_server signal_message; do
  echo "== $target (${SECS}s)"
  cargo fuzz run --sanitizer none "$target" -- -max_total_time="$SECS" -rss_limit_mb=2048
done
