#!/usr/bin/env bash
# The FiRST result (BENCHMARKS.md, "FiRST: trained routers against static plans"): SmolLM2-135M-
# Instruct trained on E2E NLG's training rows and evaluated with `firstrt eval` on all 46 test
# inputs (greedy, ROUGE-Lsum):
#   1. routers   `train --stage routers` (model frozen, GATE gates, λ, --keep-target KEEP);
#   2. plans     each threshold τ of TAUS is evaluated without an adapter, which gives its mean
#                number of skipped layers N(τ); static block-influence plans skip the same
#                round(N(τ)) layers (`static-plan`);
#   3. LoRA      one adapter per plan, trained the same way (`train --stage lora`): on the full
#                model (base + LoRA), under the routers at each τ, and under each static plan;
#   4. eval      each plan with its own adapter, then `eval-merge` puts every row (and the
#                plans of step 2) in one table and plot (OUT_DIR/merged/).
#
#   scripts/first-result.sh [OUT_DIR]     (default: first-result/)
#
# Sizes (environment): ROUTER_STEPS (200), LORA_STEPS (200), BATCH (8), LR_ROUTERS (1e-2),
# LR_LORA (1e-3), KEEP (0.75), KEEP_WEIGHT (1: μ), GATE (hard; or soft, or score), ROUTERS_FROM
# (none: new routers; else the router file the routers stage starts from), TAUS ("0.3 0.5 0.7": evaluated without
# LoRA), LORA_TAUS (TAUS: those also given an adapter and a static plan of their size),
# MAX_SKIP (none: every routers plan, trained and evaluated, skips at most that many layers, as
# `run --max-skip`), MIN_SKIP (likewise, at least), LORA_TARGETS (q_proj,k_proj,v_proj,o_proj), LIMIT (46 test rows), SEED (0);
# FIRSTRT_BIN runs that binary instead of building the checkout's. Steps already done (their
# output files exist) are not run again, so an interrupted run continues. Every
# training run writes its --json log beside its files (OUT_DIR/*/train.jsonl) with tokens/s; the
# wall time of each stage is printed. On a 2-core machine with lavapipe a training sequence of
# ~100 tokens takes ~5-8 s, so the defaults take many hours: see BENCHMARKS.md for the sizes
# used there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${1:-first-result}"
data="${FIRSTRT_DATA:-$root/../shared/data}"
"$here/setup.sh"
model="${FIRSTRT_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/firstrt/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ -n "${FIRSTRT_BIN:-}" ]; then bin="$FIRSTRT_BIN"; else (cd "$root" && cargo build --release --quiet); bin="$root/target/release/firstrt"; fi
router_steps="${ROUTER_STEPS:-200}" lora_steps="${LORA_STEPS:-200}" batch="${BATCH:-8}"
lr_routers="${LR_ROUTERS:-1e-2}" lr_lora="${LR_LORA:-1e-3}" keep="${KEEP:-0.75}" taus="${TAUS:-0.3 0.5 0.7}" lora_taus="${LORA_TAUS:-$taus}"
limit="${LIMIT:-46}" seed="${SEED:-0}" gate="${GATE:-hard}" targets="${LORA_TARGETS:-q_proj,k_proj,v_proj,o_proj}"
budget=() suffix="" from=()
if [ -n "${MIN_SKIP:-}" ]; then budget+=(--min-skip "$MIN_SKIP"); suffix=" skip≥$MIN_SKIP"; fi
if [ -n "${MAX_SKIP:-}" ]; then budget+=(--max-skip "$MAX_SKIP"); suffix="$suffix skip≤$MAX_SKIP"; fi
if [ -n "${ROUTERS_FROM:-}" ]; then from=(--routers "$ROUTERS_FROM"); fi
keep_weight="${KEEP_WEIGHT:-1}"
train="$data/e2e_nlg/train.jsonl" test="$data/e2e_nlg/test.jsonl"
mkdir -p "$out"
stamp() { echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg): $*"; }
timed() { # LABEL LOG CMD...: runs CMD (stdout into LOG, or the terminal for -) and prints its wall time
    local label="$1" log="$2" t0; shift 2
    t0=$(date +%s)
    if [ "$log" = - ]; then "$@"; else "$@" > "$log"; fi
    stamp "$label took $(( $(date +%s) - t0 )) s"
}
stamp "firstrt $(git -C "$root" rev-parse --short HEAD), routers $router_steps steps ($gate gates), LoRA $lora_steps steps ($targets), batch $batch${MIN_SKIP:+, at least $MIN_SKIP layers skipped}${MAX_SKIP:+, at most $MAX_SKIP layers skipped}"

# 1. Routers.
[ -f "$out/routers/routers.safetensors" ] || timed "stage routers" "$out/routers.train.jsonl" \
    "$bin" train -m "$model" --data "$train" --stage routers --steps "$router_steps" --batch "$batch" \
    --lr "$lr_routers" --keep-target "$keep" --keep-weight "$keep_weight" "${from[@]}" --gate "$gate" --seed "$seed" --json --out "$out/routers"
routers="$out/routers/routers.safetensors"

# 2. The routers' plans without an adapter, and static plans of the same sizes.
tau_list="$(echo "$taus" | tr ' ' ',')"
[ -f "$out/eval-routers/results.json" ] || timed "eval routers" - \
    "$bin" eval -m "$model" --data "$test" --limit "$limit" --routers "$routers" --thresholds "$tau_list" "${budget[@]}" --out "$out/eval-routers"
counts=""
for tau in $lora_taus; do
    n="$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(next(c for c in r['configurations'] if c['label']=='routers $tau$suffix')['layers_skipped']['mean']))" "$out/eval-routers/results.json")"
    echo "τ = $tau skips $n layers on average"
    [ "$n" -gt 0 ] && counts="$counts $n"
done
counts="$(echo "$counts" | tr ' ' '\n' | sort -nu | tr '\n' ' ')"
for n in $counts; do
    [ -f "$out/static-$n.safetensors" ] || "$bin" static-plan -m "$model" --calibration "$train" --skip "$n" --out "$out/static-$n.safetensors"
done

# 3. One adapter per plan, trained alike.
lora() { # NAME [ROUTER ARGS...]
    local name="$1"; shift
    [ -f "$out/$name/adapter/adapter_model.safetensors" ] || timed "stage lora ($name)" "$out/$name.train.jsonl" \
        "$bin" train -m "$model" --data "$train" --stage lora "$@" --steps "$lora_steps" --batch "$batch" --lr "$lr_lora" \
        --lora-targets "$targets" --seed "$seed" --json --out "$out/$name"
}
lora lora-full
for tau in $lora_taus; do lora "lora-routers-$tau" --routers "$routers" --threshold "$tau" "${budget[@]}"; done
for n in $counts; do lora "lora-static-$n" --routers "$out/static-$n.safetensors"; done

# 4. Each plan with its own adapter (--lora-only: not again without it), then one table.
ev() { # NAME EVAL ARGS...
    local name="$1"; shift
    [ -f "$out/eval-$name/results.json" ] || timed "eval $name" - "$bin" eval -m "$model" --data "$test" --limit "$limit" "$@" --out "$out/eval-$name"
}
ev lora-full --lora "$out/lora-full/adapter" --lora-only
inputs=("without LoRA=$out/eval-routers/results.json" "full + LoRA=$out/eval-lora-full/results.json")
for tau in $lora_taus; do
    ev "lora-routers-$tau" --no-full --routers "$routers" --thresholds "$tau" "${budget[@]}" --lora "$out/lora-routers-$tau/adapter" --lora-only
    inputs+=("FiRST τ $tau$suffix + LoRA=$out/eval-lora-routers-$tau/results.json")
done
for n in $counts; do
    ev "lora-static-$n" --no-full --routers "$out/static-$n.safetensors" --lora "$out/lora-static-$n/adapter" --lora-only
    inputs+=("static $n + LoRA=$out/eval-lora-static-$n/results.json")
done
"$bin" eval-merge --title "E2E NLG · $limit examples · FiRST vs static" --out "$out/merged" "${inputs[@]}"
stamp "done"
