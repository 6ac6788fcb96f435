#!/usr/bin/env bash
# The test command: set-up (Vulkan driver where missing, test model, OpenAI's Python client for the
# server's tests, torch + transformers + PEFT for the adapter's PEFT test), then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
scripts/setup-openai-client.sh >/dev/null
scripts/setup-peft.sh >/dev/null
cargo test --release "$@"
