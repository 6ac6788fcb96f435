#!/usr/bin/env bash
# The main job on a fresh machine: set-up, then ask the test model a chat question.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/setup.sh | tail -n 1)"
cargo run --release --quiet -- run --model "$model" --chat --temperature 0 --max-tokens 64 \
    --prompt "${1:-What is the capital of France?}"
