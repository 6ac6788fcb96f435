#!/usr/bin/env bash
# Set-up shared by the README's two commands: a Vulkan driver where none is installed (Mesa's
# lavapipe, from bookworm-backports when the machine is Debian bookworm: Mesa 25 runs 2-4x faster
# than bookworm's 22.3), a TrueType font for `firstrt eval`'s plots where none is installed, then
# the test model.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

have_vulkan() {
    ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || return 1
    for icd in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json; do
        [ -e "$icd" ] && return 0
    done
    return 1
}

if ! have_vulkan; then
    if ! command -v apt-get >/dev/null; then
        echo "setup: no Vulkan driver found and no apt-get; install your GPU's Vulkan driver (or Mesa's lavapipe)" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    codename="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")"
    if [ "$codename" = "bookworm" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee /etc/apt/sources.list.d/firstrt-backports.list >/dev/null
    fi
    $sudo apt-get update -qq >&2
    if [ "$codename" = "bookworm" ] && $sudo apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null; then
        echo "setup: installed mesa-vulkan-drivers from bookworm-backports" >&2
    else
        $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
        echo "setup: installed mesa-vulkan-drivers" >&2
    fi
fi

# The plot of `firstrt eval` lays out its text with a system TrueType font (src/eval/plot.rs).
have_font() {
    [ -n "${FIRSTRT_FONT:-}" ] && return 0
    for f in /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf /usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf \
        /usr/share/fonts/TTF/DejaVuSans.ttf /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf; do
        [ -e "$f" ] && return 0
    done
    return 1
}
if ! have_font && command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fonts-dejavu-core >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fonts-dejavu-core >/dev/null; }
    echo "setup: installed fonts-dejavu-core (text of firstrt eval's plots)" >&2
fi

"$here/fetch-test-model.sh"
