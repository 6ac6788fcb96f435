//! FiRST layer skipping end to end: router files with known weights give the expected plans
//! (threshold, budgets, first/last rule), a router for another model is rejected, routers that
//! keep every layer change nothing, a decode step encodes only the kept layers, and a static
//! plan's router file runs as that static plan.

mod common;

use std::path::{Path, PathBuf};

use common::{cases, greedy, model};
use firstrt::gpu::DType;
use firstrt::kernels::choice::matvec_variant;
use firstrt::kernels::matvec::MatvecVariant;
use firstrt::model::routers::{RouterFile, model_identity};
use firstrt::runtime::plan::{PlanPolicy, decide_plan};
use firstrt::runtime::{LayerPlan, LoadedModel, PlanChoice, PlanPolicyArgs, RuntimeError, Session, SessionOptions};
use firstrt::testdata::TempDir;

const OPTIONS: SessionOptions = SessionOptions { ctx_len: 256, candidates: 1 };

/// A linear router file (r = 0) whose layer l has zero weights and bias `biases[l]`, so that
/// p_l = sigmoid(biases[l]) whatever the input; written into `dir`.
fn router_file(model: &LoadedModel, biases: &[f32], dir: &TempDir) -> PathBuf {
    let identity = model_identity(model.source.as_ref()).unwrap();
    let mut file = RouterFile::init(&identity, 0, 0.0, 1e-5, 0.5);
    for (layer, &b) in file.layers.iter_mut().zip(biases) {
        layer.as_mut().unwrap().b1 = vec![b];
    }
    let path = dir.join("routers.safetensors");
    file.save(&path).unwrap();
    path
}

fn routed(model: &LoadedModel, path: &Path, policy: PlanPolicyArgs) -> Session {
    let (_, plan) = model.load_routers(path, &policy).unwrap();
    assert!(!plan.is_static());
    plan.session(&model.weights, OPTIONS).unwrap()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn routers_that_keep_every_layer_change_nothing() {
    let model = model(DType::F32);
    let case = cases().into_iter().find(|c| c.name == "short8_raw").unwrap();
    let dir = TempDir::new("routers-keep");
    let path = router_file(&model, &[8.0; 30], &dir);
    let mut s = routed(&model, &path, PlanPolicyArgs::default());
    let ids = greedy(&mut s, &case.prompt_ids, 12);
    assert_eq!(ids, case.greedy_ids[..12]);
    assert_eq!(s.plan().kept(), 30);
    assert!(s.router_probs().iter().all(|p| (p.unwrap() - sigmoid(8.0)).abs() < 1e-6));
}

#[test]
fn plan_follows_threshold_budgets_and_the_first_last_rule() {
    let model = model(DType::F32);
    let case = cases().into_iter().find(|c| c.name == "long_story_skip_12_13_14").unwrap();
    // Layers 12, 13, 14 and 0 and 29 are "below tau"; 0 and 29 are protected.
    let mut biases = [6.0f32; 30];
    for (l, b) in [(0, -8.0), (12, -3.0), (13, -5.0), (14, -4.0), (29, -8.0), (20, 0.5)] {
        biases[l] = b;
    }
    let dir = TempDir::new("routers-pattern");
    let path = router_file(&model, &biases, &dir);

    // Threshold only: exactly the fixture's skip set, so its greedy ids and logits must match.
    let mut s = routed(&model, &path, PlanPolicyArgs::default());
    let ids = greedy(&mut s, &case.prompt_ids, case.greedy_ids.len());
    assert_eq!(s.plan().skipped_layers(), vec![12, 13, 14]);
    assert_eq!(ids, case.greedy_ids, "routed skip of 12,13,14 reproduces transformers");
    let per_layer_kv = s.kv_bytes() / 27;
    assert_eq!(s.kv_bytes(), 27 * per_layer_kv, "KV cache only for the 27 kept layers");

    // --max-skip 2: the two lowest p below tau (13 then 14).
    let mut s = routed(&model, &path, PlanPolicyArgs { max_skip: Some(2), ..Default::default() });
    let ids = greedy(&mut s, &case.prompt_ids, 6);
    assert_eq!(s.plan().skipped_layers(), vec![13, 14]);
    let mut fixed = Session::new(&model.weights, OPTIONS, LayerPlan::skipping(30, &[13, 14]).unwrap()).unwrap();
    assert_eq!(ids, greedy(&mut fixed, &case.prompt_ids, 6), "budgeted plan prefilled under the final plan");

    // --min-skip 4: the four lowest p among the skippable layers (13, 14, 12, then 20).
    let s = {
        let mut s = routed(&model, &path, PlanPolicyArgs { min_skip: Some(4), ..Default::default() });
        s.prefill(&case.prompt_ids).unwrap();
        s
    };
    assert_eq!(s.plan().skipped_layers(), vec![12, 13, 14, 20]);

    // A threshold above sigmoid(0.5) also skips layer 20.
    let mut s = routed(&model, &path, PlanPolicyArgs { threshold: Some(0.7), ..Default::default() });
    s.prefill(&case.prompt_ids).unwrap();
    assert_eq!(s.plan().skipped_layers(), vec![12, 13, 14, 20]);

    // The CPU rule agrees.
    let probs: Vec<Option<f32>> = biases.iter().map(|&b| Some(sigmoid(b))).collect();
    let policy = PlanPolicy { threshold: 0.5, max_skip: Some(2), min_skip: None, skip_first_last: false };
    let run = decide_plan(&probs, &policy);
    assert_eq!(run.iter().filter(|r| !**r).count(), 2);
}

/// Layer 0's router reads the embedding output: a router whose weight reads one hidden
/// coordinate gives the probability the CPU computes from the embedding table.
#[test]
fn router_reading_one_coordinate_matches_the_cpu() {
    let model = model(DType::F32);
    let identity = model_identity(model.source.as_ref()).unwrap();
    let d = identity.d_model;
    let mut file = RouterFile::init(&identity, 0, 0.0, 1e-5, 0.5);
    let j = 17;
    let layer0 = file.layers[0].as_mut().unwrap();
    layer0.w1 = vec![0.0; d];
    layer0.w1[j] = 3.0;
    let dir = TempDir::new("routers-coord");
    let path = dir.join("coord.safetensors");
    file.save(&path).unwrap();

    let prompt = [1u32, 9690, 25, 1352, 314, 253];
    let mut s = routed(&model, &path, PlanPolicyArgs::default());
    s.prefill(&prompt).unwrap();
    let embed = model.source.get("model.embed_tokens.weight").unwrap();
    let mut mean = vec![0.0f64; d];
    for &id in &prompt {
        for (m, v) in mean.iter_mut().zip(&embed.data[id as usize * d..(id as usize + 1) * d]) {
            *m += *v as f64 / prompt.len() as f64;
        }
    }
    let rms = (mean.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-5).sqrt();
    let want = sigmoid((3.0 * mean[j] / rms) as f32);
    let got = s.router_probs()[0].unwrap();
    assert!((got - want).abs() < 1e-4, "p_0 = {got}, CPU {want}");
}

#[test]
fn a_router_file_for_another_model_is_rejected() {
    let model = model(DType::F32);
    let mut identity = model_identity(model.source.as_ref()).unwrap();
    identity.weight_hash = "0123456789abcdef".into();
    let dir = TempDir::new("routers-identity");
    let path = dir.join("other.safetensors");
    RouterFile::init(&identity, 4, 3.0, 1e-5, 0.5).save(&path).unwrap();
    let Err(err) = model.load_routers(&path, &PlanPolicyArgs::default()) else { panic!("must be rejected") };
    let err = err.to_string();
    assert!(err.contains("weight") && err.contains("0123456789abcdef"), "{err}");

    let mut identity = model_identity(model.source.as_ref()).unwrap();
    identity.n_layers = 24;
    let path = dir.join("layers.safetensors");
    RouterFile::init(&identity, 4, 3.0, 1e-5, 0.5).save(&path).unwrap();
    let Err(err) = model.load_routers(&path, &PlanPolicyArgs::default()) else { panic!("must be rejected") };
    let err = err.to_string();
    assert!(err.contains("24") && err.contains("30"), "{err}");
}

/// A decode step records the fixed dispatches plus one layer's dispatches per kept layer, and
/// none for a skipped layer.
#[test]
fn decode_encodes_only_kept_layers() {
    let model = model(DType::F32);
    let prompt = [1u32, 9690, 25];
    let labels_for = |skip: &[usize]| -> Vec<String> {
        let mut s = Session::new(&model.weights, OPTIONS, LayerPlan::skipping(30, skip).unwrap()).unwrap();
        let out = s.prefill(&prompt).unwrap();
        s.decode(out.candidates[0].0).unwrap();
        let labels: Vec<String> = s.decode_labels().unwrap().iter().map(|l| l.to_string()).collect();
        assert_eq!(labels.len(), s.last_dispatch_count);
        labels
    };
    let full = labels_for(&[]);
    let fixed = full.iter().filter(|l| !l.contains("/layer.")).count();
    let per_layer = full.iter().filter(|l| l.contains("/layer.3/")).count();
    // A layer's decode: norm, qkv, RoPE, attention (split and combine), o, norm, gate_up,
    // SwiGLU, down; through the rows or windows GEMV, RoPE and SwiGLU are epilogues of qkv and gate_up, and
    // on a CPU adapter the norms are epilogues of o and down, but for the first layer's input norm
    // (the last layer's down writes the final norm).
    let rows_gemv = matches!(matvec_variant(&model.weights.ctx), MatvecVariant::Rows | MatvecVariant::Windows);
    let norms_fused = rows_gemv && model.weights.ctx.is_cpu();
    let want_per_layer = match (rows_gemv, norms_fused) {
        (true, true) => 6,
        (true, false) => 8,
        _ => 10,
    };
    assert!(fixed >= 3 && per_layer == want_per_layer, "fixed {fixed}, per layer {per_layer}");
    let first_norm = usize::from(norms_fused);
    assert_eq!(full.iter().filter(|l| l.contains("/layer.0/")).count(), per_layer + first_norm);
    assert_eq!(full.len(), fixed + 30 * per_layer + first_norm);
    for skip in [vec![12, 13, 14], (5..20).collect::<Vec<_>>()] {
        let labels = labels_for(&skip);
        assert_eq!(labels.len(), fixed + (30 - skip.len()) * per_layer + first_norm, "skipping {skip:?}");
        for l in &skip {
            assert!(!labels.iter().any(|x| x.contains(&format!("/layer.{l}/"))), "layer {l} was encoded");
        }
    }
}

/// Two sequences with different plans in one process, sharing the weights.
#[test]
fn sessions_with_different_plans_coexist() {
    let model = model(DType::F32);
    let all = cases();
    let a = all.iter().find(|c| c.name == "code_skip_20_to_27").unwrap();
    let b = all.iter().find(|c| c.name == "short8_raw").unwrap();
    let mut sa = Session::new(&model.weights, OPTIONS, LayerPlan::skipping(30, &a.skip_layers).unwrap()).unwrap();
    let mut sb = Session::new(&model.weights, OPTIONS, LayerPlan::full(30)).unwrap();
    let oa = sa.prefill(&a.prompt_ids).unwrap();
    let ob = sb.prefill(&b.prompt_ids).unwrap();
    let (mut ia, mut ib) = (vec![oa.candidates[0].0], vec![ob.candidates[0].0]);
    for _ in 0..5 {
        ia.push(sa.decode(*ia.last().unwrap()).unwrap().candidates[0].0);
        ib.push(sb.decode(*ib.last().unwrap()).unwrap().candidates[0].0);
    }
    assert_eq!(ia, a.greedy_ids[..6]);
    assert_eq!(ib, b.greedy_ids[..6]);
}

/// A static plan's router file (`static-plan --out`) runs as that plan: nothing skipped gives
/// the full model's greedy tokens, 12,13,14 those of `--skip-layers 12,13,14` (both equal to
/// transformers'), with no router run and the KV cache of the kept layers only.
#[test]
fn a_static_plan_file_runs_as_its_plan() {
    let model = model(DType::F32);
    let identity = model_identity(model.source.as_ref()).unwrap();
    let dir = TempDir::new("routers-static");
    let all = cases();
    for (skip, case) in [(vec![], "short8_raw"), (vec![12, 13, 14], "long_story_skip_12_13_14")] {
        let case = all.iter().find(|c| c.name == case).unwrap();
        assert_eq!(case.skip_layers, skip);
        let path = dir.join("static.safetensors");
        RouterFile::static_plan(&identity, &skip).unwrap().save(&path).unwrap();
        let (file, choice) = model.load_routers(&path, &PlanPolicyArgs::default()).unwrap();
        assert_eq!(file.static_skip.as_deref(), Some(&skip[..]));
        let PlanChoice::Static(plan) = &choice else { panic!("a static file must give a static plan") };
        assert_eq!(plan.skipped_layers(), skip);
        let mut s = choice.session(&model.weights, OPTIONS).unwrap();
        let ids = greedy(&mut s, &case.prompt_ids, case.greedy_ids.len());
        assert_eq!(ids, case.greedy_ids, "static file skipping {skip:?}");
        assert!(s.router_probs().iter().all(Option::is_none), "no router ran");
        let mut fixed = Session::new(&model.weights, OPTIONS, LayerPlan::skipping(30, &skip).unwrap()).unwrap();
        greedy(&mut fixed, &case.prompt_ids, 1);
        assert_eq!(s.kv_bytes(), fixed.kv_bytes(), "the KV cache of the kept layers only");
    }
}

/// A threshold or budget with a static plan's file is refused, naming the file and the option.
#[test]
fn a_static_plan_file_refuses_thresholds_and_budgets() {
    let model = model(DType::F32);
    let identity = model_identity(model.source.as_ref()).unwrap();
    let dir = TempDir::new("routers-static-policy");
    let path = dir.join("static.safetensors");
    RouterFile::static_plan(&identity, &[3, 6, 9]).unwrap().save(&path).unwrap();
    let policies = [
        (PlanPolicyArgs { threshold: Some(0.5), ..Default::default() }, "--router-threshold"),
        (PlanPolicyArgs { min_skip: Some(1), ..Default::default() }, "--min-skip"),
        (PlanPolicyArgs { max_skip: Some(9), ..Default::default() }, "--max-skip"),
    ];
    for (policy, flag) in policies {
        let Err(err) = model.load_routers(&path, &policy) else { panic!("{flag} must be refused") };
        assert!(matches!(err, RuntimeError::StaticRouterFile { option, .. } if option == flag), "{err}");
        let text = err.to_string();
        assert!(text.contains("static.safetensors") && text.contains("3,6,9") && text.contains(flag), "{text}");
    }
}
