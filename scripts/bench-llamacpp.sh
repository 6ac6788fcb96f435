#!/usr/bin/env bash
# firstrt side by side with llama.cpp on the same machine, in one sitting.
#
# 1. Builds llama.cpp's CPU backend and its Vulkan backend (llama-bench and llama-quantize only)
#    from the copy vendored in the PyPI sdist llama-cpp-python==0.3.36, into
#    ${XDG_CACHE_HOME:-~/.cache}/firstrt/llama.cpp-0.3.36/{cpu,vulkan}; a finished build is not
#    built again. The Vulkan build takes trixie's libvulkan-dev headers (bookworm's are too old),
#    unpacked into the same cache without installing them; cmake, g++, ccache, glslc and
#    spirv-headers come from apt when missing. Builds run at the lowest priority (autogroup nice 19 + nice 19) in a
#    session of their own, so the timed runs afterwards keep the normal priority.
# 2. Converts the test model (SmolLM2-135M-Instruct Q4_1, fetched by fetch-test-model.sh) to F32
#    and F16 GGUFs with `llama-quantize --allow-requantize` (cached too).
# 3. Builds firstrt (cargo build --release) and runs, for --rounds rounds, `firstrt bench` (the
#    Q4_1 file, dequantised at load to --dtype f32 / f16) and `llama-bench` on the F32 / F16 files
#    (CPU backend with one thread; Vulkan backend with every layer offloaded), all on lavapipe
#    where a GPU is involved. The order of the runs is reversed every other round, so that a
#    drift of the machine's speed hits every engine alike.
# 4. Prints one Markdown table (medians over the rounds, the range in brackets when there are
#    several) with the ratios firstrt / llama.cpp, under a header giving the date, the load
#    average before and after, the CPU, the Vulkan driver, the llama.cpp commit and the commands.
#
# Usage: scripts/bench-llamacpp.sh [--rounds N] [--skip-vulkan] [--only-build]
# Run as root or as a user with sudo (apt-get), like scripts/setup.sh.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"

rounds=2
skip_vulkan=0
only_build=0
usage() {
    echo "usage: $0 [--rounds N] [--skip-vulkan] [--only-build]" >&2
    echo "  --rounds N     timed rounds, each running every engine and dtype once (default 2)" >&2
    echo "  --skip-vulkan  neither build nor run llama.cpp's Vulkan backend (a quicker run)" >&2
    echo "  --only-build   build llama.cpp and firstrt and convert the model, time nothing" >&2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds)
            [ $# -ge 2 ] || { usage; exit 2; }
            rounds="$2"
            shift 2
            ;;
        --rounds=*)
            rounds="${1#--rounds=}"
            shift
            ;;
        --skip-vulkan) skip_vulkan=1; shift ;;
        --only-build) only_build=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done
case "$rounds" in
    '' | *[!0-9]* | 0) echo "bench-llamacpp: --rounds takes a positive integer, not '$rounds'" >&2; exit 2 ;;
esac

llama_py_version="0.3.36"
sdist_name="llama_cpp_python-$llama_py_version.tar.gz"
sdist_sha="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/firstrt/llama.cpp-$llama_py_version"
src="$cache/sdist/vendor/llama.cpp"
# llama.cpp's CMake compiles through ccache when it finds it: the Vulkan build then takes the CPU
# build's ggml objects (same flags) from the cache instead of compiling them again.
export CCACHE_DIR="$cache/ccache"

die() {
    echo "bench-llamacpp: $*" >&2
    exit 1
}
log() { echo "bench-llamacpp: $*" >&2; }

# Runs "$@" at the lowest priority in a new session (so a new autogroup: `echo 19` there leaves
# the caller's session alone), and stops it when this script is interrupted.
lowprio() {
    setsid bash -c 'echo 19 > /proc/self/autogroup 2>/dev/null || true; exec nice -n 19 "$@"' lowprio "$@" &
    local pid=$!
    trap 'kill -- "-$pid" 2>/dev/null; exit 130' INT TERM
    local rc=0
    wait "$pid" || rc=$?
    trap - INT TERM
    return "$rc"
}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=0
# apt_install PACKAGE...: installs the packages with apt-get (updating the index once).
apt_install() {
    command -v apt-get >/dev/null || die "step 'install $*': no apt-get; install $* by hand"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" -eq 0 ]; then
        $sudo apt-get update -qq >&2 || die "step 'apt-get update' failed"
        apt_updated=1
    fi
    log "installing $* (apt-get)"
    $sudo apt-get install -y -qq "$@" >/dev/null || die "step 'apt-get install $*' failed"
}

# --- tools -------------------------------------------------------------------------------------
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v make >/dev/null || need+=(make)
command -v g++ >/dev/null || need+=(g++)
command -v setsid >/dev/null || need+=(util-linux)
command -v xz >/dev/null || need+=(xz-utils)
command -v curl >/dev/null || need+=(curl)
command -v ccache >/dev/null || need+=(ccache)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ "$skip_vulkan" -eq 0 ]; then
    command -v glslc >/dev/null || need+=(glslc)
    [ -d /usr/include/spirv ] || need+=(spirv-headers)
fi
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
command -v cargo >/dev/null || die "step 'build firstrt': cargo not found; install Rust (https://rustup.rs)"

# A Vulkan driver (lavapipe where none is installed) and the test model, as for the README.
model="$("$here/setup.sh" | tail -n 1)" || die "step 'setup (Vulkan driver, test model)' failed"
[ -f "$model" ] || die "step 'fetch the test model' failed: no file at '$model'"

# --- llama.cpp sources -------------------------------------------------------------------------
mkdir -p "$cache"
if [ ! -f "$src/CMakeLists.txt" ]; then
    if ! { [ -f "$cache/$sdist_name" ] && echo "$sdist_sha  $cache/$sdist_name" | sha256sum -c --status; }; then
        log "downloading the sdist llama-cpp-python==$llama_py_version (PyPI, 77 MB)"
        tmp="$(mktemp -d "$cache/download.XXXXXX")"
        python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" \
            "llama-cpp-python==$llama_py_version" >&2 ||
            die "step 'download llama-cpp-python==$llama_py_version sdist (pip download)' failed"
        echo "$sdist_sha  $tmp/$sdist_name" | sha256sum -c --status ||
            die "step 'download llama-cpp-python sdist': checksum mismatch (expected $sdist_sha)"
        mv "$tmp/$sdist_name" "$cache/$sdist_name"
        rm -rf "$tmp"
    fi
    log "unpacking the sdist"
    tmp="$(mktemp -d "$cache/unpack.XXXXXX")"
    tar -xzf "$cache/$sdist_name" -C "$tmp" || die "step 'unpack $sdist_name' failed"
    rm -rf "$cache/sdist"
    mv "$tmp/llama_cpp_python-$llama_py_version" "$cache/sdist"
    rm -rf "$tmp"
fi
# The sdist carries the submodule's git directory: its HEAD is the vendored llama.cpp commit.
llama_commit="$(cat "$cache/sdist/.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null || echo unknown)"

# --- trixie's Vulkan headers (Vulkan build only) -----------------------------------------------
vk_headers="$cache/libvulkan-dev-trixie"
fetch_vulkan_headers() {
    [ -f "$vk_headers/usr/include/vulkan/vulkan.h" ] && return 0
    local arch index filename sha tmp
    arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    index="http://deb.debian.org/debian/dists/trixie/main/binary-$arch/Packages.xz"
    log "looking up libvulkan-dev in trixie's package index ($arch)"
    read -r filename sha < <(curl -fsSL "$index" | xz -d |
        awk '/^Package: /{p=($2=="libvulkan-dev")} p&&/^Filename: /{f=$2} p&&/^SHA256: /{s=$2} /^$/{if(p&&f!=""&&!done){print f, s; done=1}; p=0}') ||
        true
    [ -n "${filename:-}" ] || die "step 'find trixie libvulkan-dev in $index' failed"
    tmp="$(mktemp -d "$cache/vkdeb.XXXXXX")"
    log "downloading $filename"
    curl -fsSL -o "$tmp/libvulkan-dev.deb" "http://deb.debian.org/debian/$filename" ||
        die "step 'download http://deb.debian.org/debian/$filename' failed"
    echo "$sha  $tmp/libvulkan-dev.deb" | sha256sum -c --status ||
        die "step 'download $filename': checksum mismatch (expected $sha)"
    dpkg-deb -x "$tmp/libvulkan-dev.deb" "$tmp/root" || die "step 'unpack $filename (dpkg-deb -x)' failed"
    rm -rf "$vk_headers"
    mv "$tmp/root" "$vk_headers"
    basename "$filename" >"$vk_headers/FROM"
    rm -rf "$tmp"
}

# The system's Vulkan loader (libvulkan1), which the Vulkan build links against. The linker
# cache is read whole first: an awk that exits at its first match would end ldconfig with
# SIGPIPE, which pipefail turns into a failure.
system_libvulkan() {
    local lib cache path
    cache="$(ldconfig -p 2>/dev/null || true)"
    for lib in libvulkan.so libvulkan.so.1; do
        path="$(awk -v n="$lib" '$1 == n && !found { print $NF; found = 1 }' <<<"$cache")"
        if [ -n "$path" ]; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

# --- llama.cpp builds --------------------------------------------------------------------------
# build_llama NAME CMAKE_ARG...: configures and builds llama-bench and llama-quantize into
# $cache/NAME, unless a build with the same arguments finished there before.
build_llama() {
    local name="$1"
    shift
    local dir="$cache/$name"
    local args=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
        "-DLLAMA_BUILD_COMMIT=${llama_commit:0:7}" "$@")
    local stamp="$dir/.firstrt-built"
    if [ -x "$dir/bin/llama-bench" ] && [ -x "$dir/bin/llama-quantize" ] && [ -f "$stamp" ] &&
        [ "$(cat "$stamp")" = "${args[*]}" ]; then
        log "llama.cpp $name build: already built in $dir"
        return 0
    fi
    rm -f "$stamp"
    mkdir -p "$dir"
    local start=$SECONDS
    log "building llama.cpp $name (llama-bench, llama-quantize) in $dir at the lowest priority, -j2; log: $dir/build.log"
    if ! lowprio cmake -S "$src" -B "$dir" "${args[@]}" >"$dir/build.log" 2>&1; then
        tail -n 20 "$dir/build.log" >&2
        die "step 'configure llama.cpp $name (cmake)' failed; log: $dir/build.log"
    fi
    if ! lowprio cmake --build "$dir" --config Release -j2 --target llama-bench llama-quantize >>"$dir/build.log" 2>&1; then
        tail -n 20 "$dir/build.log" >&2
        die "step 'build llama.cpp $name' failed; log: $dir/build.log"
    fi
    echo "${args[*]}" >"$stamp"
    log "llama.cpp $name build: done in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
}

build_llama cpu
if [ "$skip_vulkan" -eq 0 ]; then
    fetch_vulkan_headers
    libvulkan="$(system_libvulkan)" || die "step 'build llama.cpp vulkan': no libvulkan.so.1 (install libvulkan1)"
    build_llama vulkan -DGGML_VULKAN=ON "-DVulkan_INCLUDE_DIR=$vk_headers/usr/include" "-DVulkan_LIBRARY=$libvulkan"
fi

# --- F32 and F16 GGUFs -------------------------------------------------------------------------
stem="$(basename "$model" .gguf)"
stem="${stem%.Q4_1}"
declare -A gguf
for dt in F32 F16; do
    out="$cache/$stem.$dt.gguf"
    gguf[$dt]="$out"
    [ -s "$out" ] && continue
    log "converting $(basename "$model") to $dt"
    if ! "$cache/cpu/bin/llama-quantize" --allow-requantize "$model" "$out.tmp" "$dt" >"$cache/quantize-$dt.log" 2>&1; then
        rm -f "$out.tmp"
        die "step 'llama-quantize to $dt' failed; log: $cache/quantize-$dt.log"
    fi
    mv "$out.tmp" "$out"
done

# --- firstrt -----------------------------------------------------------------------------------
log "building firstrt (cargo build --release)"
(cd "$repo" && cargo build --release --quiet) || die "step 'build firstrt (cargo build --release)' failed"
firstrt="$repo/target/release/firstrt"

if [ "$only_build" -eq 1 ]; then
    log "built: $cache/cpu/bin/llama-bench$([ "$skip_vulkan" -eq 1 ] || echo ", $cache/vulkan/bin/llama-bench"), $firstrt; models: ${gguf[F32]}, ${gguf[F16]}"
    exit 0
fi

# --- lavapipe ----------------------------------------------------------------------------------
# Restrict the Vulkan loader to lavapipe's driver for llama.cpp, so that device 0 is lavapipe even
# where a GPU is installed; firstrt picks it by name.
lvp_icd=""
for f in /usr/share/vulkan/icd.d/lvp_icd*.json /etc/vulkan/icd.d/lvp_icd*.json; do
    if [ -f "$f" ]; then
        lvp_icd="$f"
        break
    fi
done
[ -n "$lvp_icd" ] || die "step 'find lavapipe': no lvp_icd*.json in /usr/share/vulkan/icd.d (install mesa-vulkan-drivers)"
vk_env=(env "VK_DRIVER_FILES=$lvp_icd" "VK_ICD_FILENAMES=$lvp_icd" GGML_VK_VISIBLE_DEVICES=0)

# --- timed runs --------------------------------------------------------------------------------
runs="$cache/runs/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$runs"
firstrt_cmd=("$firstrt" bench --backend vulkan --adapter llvmpipe --prompt-len 128 --gen 64 --repeat 3 --json)
llama_args=(-p 128 -n 64 -r 3 -o json)
cpu_cmd=("$cache/cpu/bin/llama-bench" -t 1 "${llama_args[@]}")
vk_cmd=("${vk_env[@]}" "$cache/vulkan/bin/llama-bench" -ngl 99 "${llama_args[@]}")

# run_one ENGINE DTYPE ROUND: one timed run, its JSON in $runs/ROUND-ENGINE-DTYPE.json.
run_one() {
    local engine="$1" dt="$2" round="$3" cmd
    local out="$runs/$round-$engine-$dt"
    case "$engine" in
        firstrt) cmd=("${firstrt_cmd[@]}" -m "$model" --dtype "$dt") ;;
        cpu) cmd=("${cpu_cmd[@]}" -m "${gguf[${dt^^}]}") ;;
        vulkan) cmd=("${vk_cmd[@]}" -m "${gguf[${dt^^}]}") ;;
    esac
    log "round $round: $engine $dt"
    "${cmd[@]}" >"$out.json" 2>"$out.log" ||
        die "step 'round $round, $engine $dt' failed; log: $out.log"
}

engines=(firstrt cpu)
[ "$skip_vulkan" -eq 1 ] || engines+=(vulkan)
jobs=()
for dt in f32 f16; do
    for e in "${engines[@]}"; do jobs+=("$e:$dt"); done
done

load_before="$(uptime)"
started="$(date -u '+%Y-%m-%d %H:%M')"
for ((r = 1; r <= rounds; r++)); do
    order=("${jobs[@]}")
    if [ $((r % 2)) -eq 0 ]; then
        order=()
        for ((i = ${#jobs[@]} - 1; i >= 0; i--)); do order+=("${jobs[$i]}"); done
    fi
    for j in "${order[@]}"; do run_one "${j%%:*}" "${j#*:}" "$r"; done
done
load_after="$(uptime)"

# --- report ------------------------------------------------------------------------------------
cpu_model="$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)"
driver="$("$firstrt" devices 2>/dev/null | awk '/^\[[0-9]+\] llvmpipe/{p=1} p&&/driver:/{sub(/^ *driver: */,""); print; exit}')"
firstrt_rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ] || firstrt_rev="$firstrt_rev (with local changes)"
show_cmd() {
    local s="" a
    for a in "$@"; do
        a="${a/#"$repo"\//}"
        a="${a/#"$HOME"/\~}"
        s+="${s:+ }$a"
    done
    echo "$s"
}

cat <<EOF

## firstrt vs llama.cpp, $started–$(date -u '+%H:%M') UTC

- Machine: $cpu_model, $(nproc) logical CPUs; Vulkan driver: ${driver:-unknown}
- Load average before: ${load_before#*load average: }; after: ${load_after#*load average: }
- firstrt $firstrt_rev; llama.cpp ${llama_commit:0:7} (vendored in llama-cpp-python $llama_py_version), built with -DGGML_NATIVE=ON
- $rounds round(s), the order reversed every other round; each figure is the median over rounds of each run's median of 3 repeats
- Model: $(basename "$model") (firstrt dequantises it at load to --dtype); llama.cpp reads $(basename "${gguf[F32]}") / $(basename "${gguf[F16]}") (llama-quantize --allow-requantize)
- Commands:
  - \`$(show_cmd "${firstrt_cmd[@]}") -m $(show_cmd "$model") --dtype f32|f16\`
  - \`$(show_cmd "${cpu_cmd[@]}") -m $(show_cmd "$cache/$stem").F32|F16.gguf\`
EOF
[ "$skip_vulkan" -eq 1 ] || echo "  - \`$(show_cmd "${vk_cmd[@]}") -m $(show_cmd "$cache/$stem").F32|F16.gguf\`"
echo

python3 - "$runs" "$rounds" "$skip_vulkan" "${gguf[F32]}" "${gguf[F16]}" <<'PY'
import json, os, statistics, sys

runs, rounds, skip_vulkan = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
sizes = {"f32": os.path.getsize(sys.argv[4]), "f16": os.path.getsize(sys.argv[5])}
engines = ["firstrt", "cpu"] + ([] if skip_vulkan else ["vulkan"])
label = {"firstrt": "firstrt, lavapipe", "cpu": "llama.cpp CPU, 1 thread", "vulkan": "llama.cpp Vulkan, lavapipe"}

def fail(msg):
    sys.exit(f"bench-llamacpp: step 'read the results in {runs}': {msg}")

def one(engine, dt, r):
    path = f"{runs}/{r}-{engine}-{dt}.json"
    with open(path) as f:
        d = json.load(f)
    if engine == "firstrt":
        if d.get("dtype") != dt:
            fail(f"{path} ran dtype {d.get('dtype')!r}, not {dt!r}")
        # The weights as loaded, without the windows GEMV's interleaved copies (a second copy).
        w = d["memory"]["weights_bytes"] - d["memory"].get("interleaved_bytes", 0)
        if not 0.8 * sizes[dt] < w < 1.25 * sizes[dt]:
            fail(f"{path}: {w} weight bytes on the GPU, not about the {dt} GGUF's {sizes[dt]}")
        if "llvmpipe" not in d.get("adapter", ""):
            fail(f"{path} ran on {d.get('adapter')!r}, not lavapipe")
        return d["prefill_tok_s"]["median"], d["decode_tok_s"]["median"]
    pp = [x for x in d if x["n_prompt"] > 0 and x["n_gen"] == 0]
    tg = [x for x in d if x["n_gen"] > 0 and x["n_prompt"] == 0]
    if len(pp) != 1 or len(tg) != 1:
        fail(f"{path}: expected one prompt and one generation test")
    if engine == "vulkan" and "llvmpipe" not in pp[0].get("gpu_info", ""):
        fail(f"{path} ran on {pp[0].get('gpu_info')!r}, not lavapipe")
    return statistics.median(pp[0]["samples_ts"]), statistics.median(tg[0]["samples_ts"])

res = {}
for e in engines:
    for dt in ("f32", "f16"):
        per_round = [one(e, dt, r) for r in range(1, rounds + 1)]
        res[e, dt] = [[p for p, _ in per_round], [g for _, g in per_round]]

def cell(xs):
    m = statistics.median(xs)
    s = f"{m:.1f}" if m >= 10 else f"{m:.2f}"
    if len(xs) > 1:
        s += f" ({min(xs):.1f}–{max(xs):.1f})"
    return s

print("| engine | dtype | prefill tok/s (128) | decode tok/s (64) |")
print("|---|---|---:|---:|")
for e in engines:
    for dt in ("f32", "f16"):
        pp, tg = res[e, dt]
        print(f"| {label[e]} | {dt if e == 'firstrt' else dt.upper()} | {cell(pp)} | {cell(tg)} |")
for e in engines[1:]:
    for dt in ("f32", "f16"):
        ratio = [statistics.median(res["firstrt", dt][k]) / statistics.median(res[e, dt][k]) for k in (0, 1)]
        print(f"| firstrt / {label[e]} | {dt} | {ratio[0]:.2f}× | {ratio[1]:.2f}× |")
PY
echo
log "raw results: $runs"
