#!/usr/bin/env bash
# The test command: set-up (Vulkan driver where missing, test model), then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo test --release "$@"
