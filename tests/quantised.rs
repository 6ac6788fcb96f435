//! Quantised weights on the GPU end to end (SmolLM2-135M-Instruct, Q4_1 layers and a Q8_0
//! embedding table): `--dtype native` keeps the blocks and must give what `--dtype f32` of the
//! same file gives (the same dequantised values); `--dtype q8_0` / `q4_0` of an f32 source must
//! give what f32 weights holding its own quantise-then-dequantise values give; LoRA works on a
//! quantised base, unmerged and merged.

mod common;

use std::sync::Arc;

use common::{cases, greedy_with_logits, model};
use firstrt::gpu::{DType, test_context};
use firstrt::kernels::testing::max_abs_diff;
use firstrt::model::quant::quantize;
use firstrt::model::{HostBlocks, HostTensor, ModelConfig, ModelError, QuantType, WeightSource, open_model};
use firstrt::runtime::{GpuLora, GpuWeights, LayerPlan, LoadedModel, MergedLora, Session, SessionOptions, WeightDtype, matrix_names};
use firstrt::testdata::{fixtures_dir, model_path};

/// Relative logit tolerance: max |diff| over the largest |logit|.
const REL_TOL: f32 = 1e-3;
/// Greedy tokens compared per case.
const GEN: usize = 8;

fn session(weights: &Arc<GpuWeights>, skip: &[usize]) -> Session {
    let plan = LayerPlan::skipping(weights.config.n_layers, skip).unwrap();
    Session::new(weights, SessionOptions { ctx_len: 256, candidates: 1 }, plan).unwrap()
}

/// Runs every fixture case (prompt, skipped layers) on both weight sets and compares the last
/// prompt position's logits (relative) and the greedy ids; `what` names the pair in failures.
fn compare(got: &Arc<GpuWeights>, want: &Arc<GpuWeights>, what: &str, lora: Option<&Arc<GpuLora>>) {
    let mut failures = Vec::new();
    for case in cases().into_iter().filter(|c| c.lora == lora.is_some()) {
        let run = |w: &Arc<GpuWeights>| {
            let mut s = session(w, &case.skip_layers);
            if let Some(l) = lora {
                s.set_lora(Some(l.clone()), 1.0).unwrap();
            }
            greedy_with_logits(&mut s, &case.prompt_ids, GEN)
        };
        let (gl, gi) = run(got);
        let (wl, wi) = run(want);
        let scale = wl.iter().fold(0f32, |a, v| a.max(v.abs()));
        let rel = max_abs_diff(&gl, &wl) / scale;
        eprintln!("{what} {}: max relative logit diff {rel:.2e}, greedy equal {}", case.name, gi == wi);
        if rel > REL_TOL {
            failures.push(format!("{}: relative logit diff {rel:.2e} > {REL_TOL}", case.name));
        }
        if gi != wi {
            failures.push(format!("{}: greedy {gi:?} != {wi:?}", case.name));
        }
    }
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
}

fn native() -> Arc<GpuWeights> {
    let m = LoadedModel::load(&test_context(), &model_path(), WeightDtype::Native, &mut |_, _| {}).unwrap();
    Arc::new(Arc::into_inner(m.weights).expect("one owner"))
}

#[test]
fn native_keeps_the_blocks_and_matches_f32() {
    let native = native();
    assert_eq!(native.format_summary(), "q4_1 x120, q8_0 x1");
    let source = open_model(&model_path()).unwrap();
    // Within 1.1x the file's tensor data (which also holds the f32 norms).
    let ratio = native.byte_len() as f64 / source.total_param_bytes() as f64;
    assert!(ratio <= 1.1, "native weights {} bytes = {ratio:.3}x the file's tensor data", native.byte_len());
    assert!((native.bits_per_weight() - 5.0).abs() < 0.9, "{} bits per weight", native.bits_per_weight());
    compare(&native, &model(DType::F32).weights, "native vs f32", None);
}

/// The GGUF seen as an f32 source: every tensor dequantised, no blocks. With `round_trip`, the
/// matrices are quantised to that type and dequantised again (what the GPU must then read).
struct F32View {
    inner: Box<dyn WeightSource>,
    round_trip: Option<QuantType>,
    matrices: Vec<String>,
}

impl WeightSource for F32View {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn get(&self, name: &str) -> Result<HostTensor, ModelError> {
        let mut t = self.inner.get(name)?;
        if let Some(q) = self.round_trip.filter(|_| self.matrices.iter().any(|m| m == name)) {
            t.data = quantize(name, q, &t.data, t.shape[0], t.shape[1])?.dequantize()?;
        }
        Ok(t)
    }
    fn get_blocks(&self, _: &str) -> Result<Option<HostBlocks>, ModelError> {
        Ok(None)
    }
    fn storage_type(&self, name: &str) -> Option<String> {
        self.inner.has(name).then(|| "F32".to_string())
    }
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
    fn describe_dtypes(&self) -> String {
        "F32".into()
    }
    fn total_param_bytes(&self) -> u64 {
        self.inner.total_param_bytes()
    }
}

fn f32_view(round_trip: Option<QuantType>) -> F32View {
    let inner = open_model(&model_path()).unwrap();
    let matrices = matrix_names(inner.config());
    F32View { inner, round_trip, matrices }
}

#[test]
fn quantised_at_load_matches_its_own_dequantised_values() {
    let ctx = test_context();
    for q in [QuantType::Q8_0, QuantType::Q4_0] {
        let view = f32_view(None);
        assert_eq!(WeightDtype::default_for(&view), WeightDtype::Dense(DType::F32));
        let got = Arc::new(GpuWeights::load(&ctx, &view, WeightDtype::Quant(q), &mut |_, _| {}).unwrap());
        assert_eq!(got.format_summary(), format!("{q} x121"));
        let want = Arc::new(GpuWeights::load(&ctx, &f32_view(Some(q)), DType::F32, &mut |_, _| {}).unwrap());
        compare(&got, &want, &format!("{q} at load vs f32 of its dequantised values"), None);
    }
}

#[test]
fn k_quants_cannot_be_made_at_load() {
    let e =
        GpuWeights::load(&test_context(), &f32_view(None), WeightDtype::Quant(QuantType::Q4_K), &mut |_, _| {}).err().unwrap().to_string();
    assert!(e.contains("model.embed_tokens.weight") && e.contains("q4_k") && e.contains("native"), "{e}");
}

#[test]
fn lora_on_a_quantised_base() {
    let ctx = test_context();
    let case = cases().into_iter().find(|c| c.lora).expect("a LoRA case");
    let dir = fixtures_dir().join(case.lora_dir.as_deref().unwrap_or("lora"));
    // Unmerged: the adapter runs beside the blocks.
    let native = native();
    let f32_base = model(DType::F32);
    let adapter = f32_base.load_lora(&dir).unwrap();
    compare(&native, &f32_base.weights, "unmerged LoRA on native vs on f32", Some(&adapter));
    // Merged: only the targeted projections (all seven here) are dequantised; the embedding
    // table keeps its Q8_0 blocks.
    let m = MergedLora { dir: dir.clone(), scale: 1.0 };
    let merged_native = LoadedModel::load_merged(&ctx, &model_path(), WeightDtype::Native, Some(&m), &mut |_, _| {}).unwrap();
    assert_eq!(merged_native.weights.format_summary(), "f32 x120, q8_0 x1");
    let merged_f32 = LoadedModel::load_merged(&ctx, &model_path(), DType::F32, Some(&m), &mut |_, _| {}).unwrap();
    compare(&merged_native.weights, &merged_f32.weights, "merged LoRA on native vs on f32", None);
}
