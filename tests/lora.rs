//! LoRA end to end on SmolLM2-135M-Instruct (f32 weights) against the PEFT fixture (r = 8,
//! alpha = 16, all seven projections; transformers' unmerged forward): both modes, scale 0, merged
//! vs unmerged, swapping adapters over one upload of the base weights, and rejected adapters.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Case, cases, fixture_tensor, model};
use firstrt::gpu::DType;
use firstrt::kernels::testing::max_abs_diff;
use firstrt::runtime::{GpuLora, LayerPlan, LoadedModel, MergedLora, Session, SessionOptions};
use firstrt::testdata::{TempDir, fixtures_dir, model_path};

const LOGIT_TOL: f32 = 1e-3;

fn lora_cases() -> Vec<Case> {
    let c: Vec<Case> = cases().into_iter().filter(|c| c.lora).collect();
    assert_eq!(c.len(), 2, "the fixture has two LoRA cases");
    c
}

fn adapter_dir(case: &Case) -> PathBuf {
    fixtures_dir().join(case.lora_dir.as_deref().unwrap_or("lora"))
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The fixture adapter's config text and tensors (f32).
fn read_adapter(dir: &Path) -> (String, Tensors) {
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for name in st.names() {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        out.push((name.to_string(), t.shape().to_vec(), bytemuck::pod_collect_to_vec(t.data())));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (config, out)
}

fn write_adapter(dir: &Path, config: &str, tensors: &Tensors) {
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytemuck::cast_slice(d)).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
}

/// Adapter B: the fixture's with every lora_B scaled by 1.5 and lora_A negated in even layers,
/// so that it is not the fixture adapter at another scale.
fn write_adapter_b(dir: &Path) {
    let (config, mut tensors) = read_adapter(&fixtures_dir().join("lora"));
    for (name, _, data) in &mut tensors {
        let layer: usize = name.split('.').nth(4).unwrap().parse().unwrap();
        let f = if name.contains("lora_B") {
            1.5
        } else if layer.is_multiple_of(2) {
            -1.0
        } else {
            1.0
        };
        data.iter_mut().for_each(|v| *v *= f);
    }
    write_adapter(dir, &config, &tensors);
}

fn session(weights: &Arc<firstrt::runtime::GpuWeights>, skip: &[usize], lora: Option<(&Arc<GpuLora>, f32)>) -> Session {
    let plan = LayerPlan::skipping(weights.config.n_layers, skip).unwrap();
    let mut s = Session::new(weights, SessionOptions { ctx_len: 256, candidates: 1 }, plan).unwrap();
    if let Some((g, scale)) = lora {
        s.set_lora(Some(g.clone()), scale).unwrap();
    }
    s
}

/// Last-prompt-position logits and the greedy ids (`n` tokens).
fn greedy(mut s: Session, ids: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    common::greedy_with_logits(&mut s, ids, n)
}

fn prompt_logits(mut s: Session, ids: &[u32]) -> Vec<f32> {
    s.prefill(ids).unwrap();
    s.read_logits().unwrap()
}

fn merged_model(dir: &Path, scale: f32) -> LoadedModel {
    let ctx = firstrt::gpu::test_context();
    let m = MergedLora { dir: dir.to_path_buf(), scale };
    LoadedModel::load_merged(&ctx, &model_path(), DType::F32, Some(&m), &mut |_, _| {}).unwrap()
}

#[test]
fn unmerged_matches_transformers() {
    let model = model(DType::F32);
    let mut failures = Vec::new();
    for case in lora_cases() {
        let lora = model.load_lora(&adapter_dir(&case)).unwrap();
        let s = session(&model.weights, &case.skip_layers, Some((&lora, 1.0)));
        let (logits, ids) = greedy(s, &case.prompt_ids, case.greedy_ids.len());
        let (_, want) = fixture_tensor(&case.logits_key);
        let diff = max_abs_diff(&logits, &want);
        eprintln!("{} unmerged: max |logit diff| {diff:.2e}, greedy equal {}", case.name, ids == case.greedy_ids);
        if diff > LOGIT_TOL {
            failures.push(format!("{}: unmerged max |logit diff| {diff} > {LOGIT_TOL}", case.name));
        }
        if ids != case.greedy_ids {
            failures.push(format!("{}: unmerged greedy {ids:?} != {:?}", case.name, case.greedy_ids));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn merged_matches_transformers_and_unmerged() {
    let base = model(DType::F32);
    let merged = merged_model(&fixtures_dir().join("lora"), 1.0);
    assert!(merged.merged_lora.is_some());
    let mut failures = Vec::new();
    for case in lora_cases() {
        let (logits, ids) = greedy(session(&merged.weights, &case.skip_layers, None), &case.prompt_ids, case.greedy_ids.len());
        let (_, want) = fixture_tensor(&case.logits_key);
        let diff = max_abs_diff(&logits, &want);
        let lora = base.load_lora(&adapter_dir(&case)).unwrap();
        let unmerged = prompt_logits(session(&base.weights, &case.skip_layers, Some((&lora, 1.0))), &case.prompt_ids);
        let vs = max_abs_diff(&logits, &unmerged);
        eprintln!(
            "{} merged: max |logit diff| {diff:.2e} vs transformers, {vs:.2e} vs unmerged, greedy equal {}",
            case.name,
            ids == case.greedy_ids
        );
        if diff > LOGIT_TOL || vs > LOGIT_TOL {
            failures.push(format!("{}: merged max |logit diff| {diff} (vs unmerged {vs}) > {LOGIT_TOL}", case.name));
        }
        if ids != case.greedy_ids {
            failures.push(format!("{}: merged greedy {ids:?} != {:?}", case.name, case.greedy_ids));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Scale 0 is the base model; adapters A, then B, then none over one upload of the base weights
/// each give their own results, also when swapped in the middle of a sequence.
#[test]
fn scale_zero_and_swapping_adapters() {
    let model = model(DType::F32);
    let weights = &model.weights;
    let case = lora_cases().into_iter().find(|c| c.name == "lora_chat_system").unwrap();
    let ids = &case.prompt_ids;
    let a = model.load_lora(&fixtures_dir().join("lora")).unwrap();
    let dir_b = TempDir::new("adapter-b");
    write_adapter_b(&dir_b.path);
    let b = model.load_lora(&dir_b.path).unwrap();

    let base = prompt_logits(session(weights, &[], None), ids);
    let zero = prompt_logits(session(weights, &[], Some((&a, 0.0))), ids);
    let d_zero = max_abs_diff(&base, &zero);
    eprintln!("scale 0 vs base: max |logit diff| {d_zero:.2e}");
    assert!(d_zero < 1e-6, "scale 0 differs from the base model by {d_zero}");

    // One session object per sequence, all over the same uploaded weights.
    let mut s = session(weights, &[], Some((&a, 1.0)));
    s.prefill(ids).unwrap();
    let la = s.read_logits().unwrap();
    let (_, want_a) = fixture_tensor(&case.logits_key);
    let d_a = max_abs_diff(&la, &want_a);
    let mut s = session(weights, &[], None);
    s.set_lora(Some(a.clone()), 1.0).unwrap();
    s.set_lora(Some(b.clone()), 1.0).unwrap();
    let lb = prompt_logits(s, ids);
    let mut s = session(weights, &[], Some((&b, 1.0)));
    s.set_lora(None, 1.0).unwrap();
    let l0 = prompt_logits(s, ids);
    // References: B uploaded afresh on its own, and B merged into a freshly loaded model.
    let b_fresh = model.load_lora(&dir_b.path).unwrap();
    let lb_fresh = prompt_logits(session(weights, &[], Some((&b_fresh, 1.0))), ids);
    let b_merged = merged_model(&dir_b.path, 1.0);
    let lb_merged = prompt_logits(session(&b_merged.weights, &[], None), ids);
    let (d_b, d_bm, d_0, d_ab) =
        (max_abs_diff(&lb, &lb_fresh), max_abs_diff(&lb, &lb_merged), max_abs_diff(&l0, &base), max_abs_diff(&la, &lb));
    eprintln!("A vs transformers {d_a:.2e}; B vs B alone {d_b:.2e}, vs B merged {d_bm:.2e}; none vs base {d_0:.2e}; A vs B {d_ab:.2e}");
    assert!(d_a < LOGIT_TOL, "adapter A: {d_a}");
    assert!(d_b < 1e-6 && d_bm < LOGIT_TOL, "adapter B after a swap: {d_b} / {d_bm}");
    assert!(d_0 < 1e-6, "no adapter after a swap: {d_0}");
    assert!(d_ab > 0.05, "adapters A and B should give different logits (diff {d_ab})");

    // Mid-sequence: decode under A, then B, then none; the reference prefills the same tokens
    // one step at a time under the same adapters.
    let t = &case.greedy_ids[..3];
    let mut s = session(weights, &[], Some((&a, 1.0)));
    let mut r = session(weights, &[], Some((&a, 1.0)));
    s.prefill(ids).unwrap();
    r.prefill(ids).unwrap();
    s.decode(t[0]).unwrap();
    r.prefill(&t[..1]).unwrap();
    let lora_dispatches = |s: &Session| s.decode_labels().unwrap().iter().filter(|l| l.contains(".lora_")).count();
    assert_eq!(lora_dispatches(&s), 8 * weights.config.n_layers, "2 per projection group per layer");
    s.set_lora(Some(b.clone()), 0.5).unwrap();
    r.set_lora(Some(b.clone()), 0.5).unwrap();
    assert!(s.decode_labels().is_none(), "set_lora must drop the prepared decode program");
    s.decode(t[1]).unwrap();
    r.prefill(&t[1..2]).unwrap();
    let d1 = max_abs_diff(&s.read_logits().unwrap(), &r.read_logits().unwrap());
    s.set_lora(None, 1.0).unwrap();
    r.set_lora(None, 1.0).unwrap();
    s.decode(t[2]).unwrap();
    r.prefill(&t[2..3]).unwrap();
    let d2 = max_abs_diff(&s.read_logits().unwrap(), &r.read_logits().unwrap());
    assert_eq!(lora_dispatches(&s), 0);
    eprintln!("mid-sequence swap, decode vs prefill: under B {d1:.2e}, after off {d2:.2e}");
    assert!(d1 < LOGIT_TOL && d2 < LOGIT_TOL, "mid-sequence swaps: {d1} / {d2}");
}

/// A skipped layer's LoRA dispatches are skipped too.
#[test]
fn skipped_layers_have_no_lora_dispatches() {
    let model = model(DType::F32);
    let a = model.load_lora(&fixtures_dir().join("lora")).unwrap();
    let mut s = session(&model.weights, &[12, 13, 14], Some((&a, 1.0)));
    let out = s.prefill(&[1, 504, 6783]).unwrap();
    s.decode(out.candidates[0].0).unwrap();
    let labels = s.decode_labels().unwrap();
    let lora: Vec<&&str> = labels.iter().filter(|l| l.contains(".lora_")).collect();
    assert_eq!(lora.len(), 8 * (model.weights.config.n_layers - 3));
    assert!(!lora.iter().any(|l| l.contains("layer.12/") || l.contains("layer.13/") || l.contains("layer.14/")));
}

#[test]
fn adapter_for_another_model_is_rejected() {
    let model = model(DType::F32);
    let (config, mut tensors) = read_adapter(&fixtures_dir().join("lora"));
    let name = "base_model.model.model.layers.5.self_attn.k_proj.lora_A.weight";
    let t = tensors.iter_mut().find(|t| t.0 == name).unwrap();
    assert_eq!(t.1, [8, 576]);
    t.1 = vec![8, 512];
    t.2.truncate(8 * 512);
    let dir = TempDir::new("wrong-shape");
    write_adapter(&dir.path, &config, &tensors);
    let e = model.load_lora(&dir.path).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(e.contains(name) && e.contains("[8, 512]") && e.contains("[8, 576]"), "{e}");
    let ctx = firstrt::gpu::test_context();
    let m = MergedLora { dir: dir.path.clone(), scale: 1.0 };
    let e = LoadedModel::load_merged(&ctx, &model_path(), DType::F32, Some(&m), &mut |_, _| {}).err().unwrap().to_string();
    assert!(e.contains(name), "{e}");
}

#[test]
fn unsupported_options_are_rejected() {
    let model = model(DType::F32);
    let (config, tensors) = read_adapter(&fixtures_dir().join("lora"));
    let dir = TempDir::new("options");
    for (key, value, expect) in [
        ("use_dora", serde_json::json!(true), "use_dora"),
        ("bias", serde_json::json!("all"), "bias = \"all\""),
        ("layers_to_transform", serde_json::json!([0, 1]), "layers_to_transform"),
        ("target_modules", serde_json::json!(".*proj"), "regular expression"),
        ("target_modules", serde_json::json!(["q_proj", "embed_tokens"]), "'embed_tokens'"),
    ] {
        let mut c: serde_json::Value = serde_json::from_str(&config).unwrap();
        c[key] = value;
        write_adapter(&dir.path, &c.to_string(), &tensors);
        let e = model.load_lora(&dir.path).unwrap_err().to_string();
        eprintln!("{key}: {e}");
        assert!(e.contains(expect) && e.contains("adapter_config.json"), "{key}: {e}");
    }
    let mut s =
        Session::new(&model.weights, SessionOptions { ctx_len: 8, candidates: 1 }, LayerPlan::full(model.weights.config.n_layers)).unwrap();
    let a = model.load_lora(&fixtures_dir().join("lora")).unwrap();
    assert!(s.set_lora(Some(a), f32::NAN).is_err());
}
