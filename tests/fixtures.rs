//! End-to-end against Hugging Face transformers (float32) on SmolLM2-135M-Instruct: last-position
//! logits and 24 greedy tokens for every fixture case without LoRA, with and without skipped
//! layers, in f32 and f16 weights.

mod common;

use common::{Case, cases, fixture_tensor, greedy_with_logits, model};
use firstrt::gpu::DType;
use firstrt::kernels::sample::argmax_ref;
use firstrt::kernels::testing::max_abs_diff;
use firstrt::runtime::{LayerPlan, Session, SessionOptions};

/// f32 weights: the dequantised values are exact, only summation order differs.
const F32_LOGIT_TOL: f32 = 1e-3;
/// f16 weights round every weight to 11 significant bits.
const F16_LOGIT_TOL: f32 = 0.1;

struct Outcome {
    logits_diff: f32,
    top1_equal: bool,
    greedy: Vec<u32>,
}

fn run_case(case: &Case, dtype: DType) -> Outcome {
    let model = model(dtype);
    let plan = LayerPlan::skipping(model.weights.config.n_layers, &case.skip_layers).unwrap();
    let mut session = Session::new(&model.weights, SessionOptions { ctx_len: 512, candidates: 1 }, plan).unwrap();
    let (logits, greedy) = greedy_with_logits(&mut session, &case.prompt_ids, case.greedy_ids.len());
    let (_, want) = fixture_tensor(&case.logits_key);
    Outcome { logits_diff: max_abs_diff(&logits, &want), top1_equal: argmax_ref(&logits).0 == argmax_ref(&want).0, greedy }
}

fn base_cases() -> Vec<Case> {
    cases().into_iter().filter(|c| !c.lora).collect()
}

#[test]
fn f32_logits_and_greedy_ids_match_transformers() {
    let mut failures = Vec::new();
    for case in base_cases() {
        let o = run_case(&case, DType::F32);
        eprintln!("{}: f32 max |logit diff| {:.2e}, greedy equal {}", case.name, o.logits_diff, o.greedy == case.greedy_ids);
        if o.logits_diff > F32_LOGIT_TOL {
            failures.push(format!("{}: max |logit diff| {} > {F32_LOGIT_TOL}", case.name, o.logits_diff));
        }
        if o.greedy != case.greedy_ids {
            failures.push(format!("{}: greedy ids {:?} != {:?}", case.name, o.greedy, case.greedy_ids));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn f16_top1_matches_transformers() {
    let mut failures = Vec::new();
    for case in base_cases() {
        let o = run_case(&case, DType::F16);
        eprintln!("{}: f16 max |logit diff| {:.2e}, top-1 equal {}", case.name, o.logits_diff, o.top1_equal);
        if !o.top1_equal {
            failures.push(format!("{}: f16 top-1 differs", case.name));
        }
        if o.logits_diff > F16_LOGIT_TOL {
            failures.push(format!("{}: f16 max |logit diff| {} > {F16_LOGIT_TOL}", case.name, o.logits_diff));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Decoding with the KV cache gives the same logits as prefilling the whole sequence.
#[test]
fn decode_with_cache_equals_full_prefill() {
    let model = model(DType::F32);
    let case = base_cases().into_iter().find(|c| c.name == "short8_raw").unwrap();
    let n = model.weights.config.n_layers;
    let mut seq = case.prompt_ids.clone();
    seq.extend_from_slice(&case.greedy_ids[..4]);
    let mut a = Session::new(&model.weights, SessionOptions { ctx_len: 64, candidates: 1 }, LayerPlan::full(n)).unwrap();
    a.prefill(&case.prompt_ids).unwrap();
    for &id in &case.greedy_ids[..4] {
        a.decode(id).unwrap();
    }
    let mut b = Session::new(&model.weights, SessionOptions { ctx_len: 64, candidates: 1 }, LayerPlan::full(n)).unwrap();
    b.prefill(&seq).unwrap();
    let diff = max_abs_diff(&a.read_logits().unwrap(), &b.read_logits().unwrap());
    assert!(diff < 1e-3, "decode vs prefill logits differ by {diff}");
}
