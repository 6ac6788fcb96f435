//! ShortGPT block influence on the GPU against the same quantity computed on the CPU from
//! Hugging Face transformers' hidden states (fixture `short8_raw.hidden`, float32).

mod common;

use common::{cases, fixture_tensor, model};
use firstrt::gpu::DType;
use firstrt::kernels::cosine::cosine_ref;
use firstrt::runtime::calibration::block_influence;

/// f32 weights: the hidden states agree with transformers' up to summation order; measured
/// 5.6e-7 on lavapipe.
const BI_TOL: f64 = 1e-5;

#[test]
fn block_influence_matches_transformers_hidden_states() {
    let model = model(DType::F32);
    let case = cases().into_iter().find(|c| c.name == "short8_raw").unwrap();
    let (shape, hidden) = fixture_tensor(case.hidden_key.as_deref().unwrap());
    let (n, t, d) = (model.weights.config.n_layers, case.prompt_ids.len(), model.weights.config.d_model);
    assert_eq!(shape, vec![n + 1, t, d]);
    // hidden[l] enters layer l, hidden[l + 1] leaves it.
    let state = |l: usize| &hidden[l * t * d..(l + 1) * t * d];
    let want: Vec<f64> = (0..n).map(|l| 1.0 - cosine_ref(state(l), state(l + 1), d).iter().sum::<f64>() / t as f64).collect();

    let mut calls = Vec::new();
    let got = block_influence(&model.weights, std::slice::from_ref(&case.prompt_ids), &mut |done, all| calls.push((done, all))).unwrap();
    assert_eq!((got.tokens, got.sequences), (t, 1));
    assert_eq!(calls, vec![(1, 1)]);
    let bi = got.bi();
    let worst = bi.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
    eprintln!("max |BI - transformers' BI| = {worst:.2e}; BI = {bi:.4?}");
    assert!(worst < BI_TOL, "GPU BI {bi:?}\nCPU BI {want:?}");
    // the BI of a real model is a spread of positive values, not a constant
    assert!(bi.iter().all(|&b| b > 0.0 && b < 1.0));
}

/// Two sequences: the sums are the sums of each sequence's, weighted by its token count.
#[test]
fn block_influence_sums_over_sequences() {
    let model = model(DType::F32);
    let all = cases();
    let a = all.iter().find(|c| c.name == "short8_raw").unwrap().prompt_ids.clone();
    let b = all.iter().find(|c| c.name == "chat_user_only").unwrap().prompt_ids.clone();
    let one = |seqs: &[Vec<u32>]| block_influence(&model.weights, seqs, &mut |_, _| {}).unwrap();
    let (ba, bb, both) = (one(std::slice::from_ref(&a)), one(std::slice::from_ref(&b)), one(&[a.clone(), b.clone()]));
    assert_eq!((both.tokens, both.sequences), (a.len() + b.len(), 2));
    for l in 0..ba.cos_sum.len() {
        let sum = ba.cos_sum[l] + bb.cos_sum[l];
        assert!((both.cos_sum[l] - sum).abs() < 1e-9 * both.tokens as f64, "layer {l}: {} vs {sum}", both.cos_sum[l]);
    }
    let err = block_influence(&model.weights, &[a, vec![]], &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
}
