#!/usr/bin/env bash
# scripts/check-peft.py (and the test that runs it, tests/train.rs) loads firstrt's adapters in
# Hugging Face PEFT. Installs what it needs, pinned, and prints the environment's python:
# - torch from Debian's python3-torch (1.13, CPU only: about 190 MB, where PyPI's torch wheel
#   brings gigabytes of CUDA libraries), for the system's python3;
# - a virtual environment under $FIRSTRT_CACHE (default ~/.cache/firstrt) that sees it, with
#   transformers, PEFT, accelerate and gguf of versions that still support torch 1.13, installed
#   with every dependency listed here (--no-deps: pip would otherwise replace Debian's torch,
#   whose version 1.13.0a0 it does not count as >= 1.13).
# Does nothing when it is there already.
set -euo pipefail
cache="${FIRSTRT_CACHE:-$HOME/.cache/firstrt}"
venv="$cache/venv-peft"
python="$venv/bin/python"
packages=(
    transformers==4.46.3 peft==0.14.0 accelerate==0.34.2 gguf==0.10.0 tokenizers==0.20.3
    huggingface-hub==0.26.5 safetensors==0.4.5 numpy==1.26.4 sentencepiece==0.2.0
    packaging==24.2 filelock==3.16.1 fsspec==2024.10.0 regex==2024.11.6 pyyaml==6.0.2
    requests==2.32.3 tqdm==4.67.1 psutil==6.1.0 typing-extensions==4.12.2 urllib3==2.2.3
    idna==3.10 certifi==2024.8.30 charset-normalizer==3.4.0
)
stamp="$venv/firstrt-packages.txt"

if [ -x "$python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${packages[*]}" ] && "$python" -c 'import torch, peft, transformers, gguf' 2>/dev/null; then
    echo "$python"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! /usr/bin/python3 -c 'import torch, venv, ensurepip' 2>/dev/null; then
    command -v apt-get >/dev/null || { echo "setup-peft: Debian's python3-torch and python3-venv are needed" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    echo "setup-peft: installing python3-torch and python3-venv" >&2
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq --no-install-recommends python3-torch python3-venv >/dev/null
fi
rm -rf "$venv"
mkdir -p "$cache"
/usr/bin/python3 -m venv --system-site-packages "$venv" >&2
echo "setup-peft: installing ${packages[*]} into $venv" >&2
"$python" -m pip install --quiet --disable-pip-version-check --no-deps "${packages[@]}" >&2
echo "${packages[*]}" >"$stamp"
echo "$python"
