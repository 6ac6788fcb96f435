//! Shared by the end-to-end tests: where the test model and the transformers fixtures are, and
//! the model loaded once per test binary.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use firstrt::gpu::{DType, test_context};
use firstrt::runtime::LoadedModel;

pub use firstrt::testdata::{fixtures_dir, model_path};

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub skip_layers: Vec<usize>,
    pub lora: bool,
    pub greedy_ids: Vec<u32>,
    pub logits_key: String,
    pub lora_dir: Option<String>,
    pub hidden_key: Option<String>,
    pub greedy_margins: Vec<f32>,
}

pub fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures_dir().join("cases.json")).expect("reading cases.json");
    serde_json::from_str(&text).expect("parsing cases.json")
}

/// A float32 tensor of logits.safetensors.
pub fn fixture_tensor(key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixtures_dir().join("logits.safetensors")).expect("reading logits.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parsing logits.safetensors");
    let t = st.tensor(key).unwrap_or_else(|e| panic!("fixture tensor {key}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    (t.shape().to_vec(), bytemuck::pod_collect_to_vec(t.data()))
}

/// The test model loaded once per test binary and dtype.
pub fn model(dtype: DType) -> Arc<LoadedModel> {
    static F32: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    static F16: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    let cell = if dtype == DType::F16 { &F16 } else { &F32 };
    cell.get_or_init(|| {
        let ctx = test_context();
        Arc::new(LoadedModel::load(&ctx, &model_path(), dtype, &mut |_, _| {}).expect("loading the test model"))
    })
    .clone()
}

/// Greedy generation of `n` tokens after `prompt` (no end token); returns the logits of the last
/// prompt position and the generated ids.
pub fn greedy_with_logits(session: &mut firstrt::runtime::Session, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let options =
        firstrt::generate::GenerateOptions { max_tokens: n, sampler: firstrt::generate::SamplerConfig::greedy(), end_ids: vec![] };
    let mut stream = firstrt::generate::TokenStream::start(session, prompt, &options, None).expect("prefill");
    let logits = stream.session().read_logits().expect("reading the logits");
    for event in &mut stream {
        event.expect("greedy generation");
    }
    (logits, stream.into_generation().generated_ids)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
