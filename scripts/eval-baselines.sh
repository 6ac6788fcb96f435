#!/usr/bin/env bash
# The baselines that trained FiRST routers must beat (BENCHMARKS.md, "Task quality against
# speed"): SmolLM2-135M-Instruct on E2E NLG (all 46 test inputs) and XSum (the first 30), the full
# model and static block-influence plans of 3, 6 and 9 layers, greedy, at most 64 tokens.
#
#   scripts/eval-baselines.sh [OUT_DIR]      (default: eval-baselines/)
#
# Writes OUT_DIR/e2e_nlg/ and OUT_DIR/xsum/ (results.json, results.md, plot.svg, plot.png) and
# prints both tables. On a 2-core machine with lavapipe it takes about 35 minutes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${1:-eval-baselines}"
data="${FIRSTRT_DATA:-$root/../shared/data}"
"$here/setup.sh"
model="${FIRSTRT_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/firstrt/SmolLM2-135M-Instruct.Q4_1.gguf}"
(cd "$root" && cargo build --release --quiet)
bin="$root/target/release/firstrt"
mkdir -p "$out"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load average before: $(cut -d' ' -f1-3 /proc/loadavg), firstrt $(git -C "$root" rev-parse --short HEAD)"
"$bin" eval -m "$model" --data "$data/e2e_nlg/test.jsonl" --static-skip 3,6,9 \
    --calibration "$data/e2e_nlg/train.jsonl" --out "$out/e2e_nlg"
"$bin" eval -m "$model" --data "$data/xsum/test.jsonl" --limit 30 --static-skip 3,6,9 \
    --calibration "$data/xsum/train.jsonl" --out "$out/xsum"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
