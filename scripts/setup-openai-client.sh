#!/usr/bin/env bash
# The server's tests (tests/server.rs) drive `firstrt serve` with OpenAI's own Python client:
# install it, pinned, into a virtual environment under $FIRSTRT_CACHE (default ~/.cache/firstrt).
# Does nothing when it is there already. Prints the environment's python.
set -euo pipefail
cache="${FIRSTRT_CACHE:-$HOME/.cache/firstrt}"
venv="$cache/venv-openai"
version="1.109.1"
python="$venv/bin/python"

if [ -x "$python" ] && "$python" -c "import openai, sys; sys.exit(openai.__version__ != '$version')" 2>/dev/null; then
    echo "$python"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    command -v apt-get >/dev/null || { echo "setup-openai-client: python3 with venv is needed (install python3-venv)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq python3 python3-venv >/dev/null
fi
rm -rf "$venv"
mkdir -p "$cache"
python3 -m venv "$venv" >&2
echo "setup-openai-client: installing openai==$version into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$version" >&2
echo "$python"
