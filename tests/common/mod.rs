//! Shared by the end-to-end tests: the transformers fixture cases and tensors, the test model
//! loaded once per test binary, and greedy generation. Paths, temp folders and `max_abs_diff`
//! come from the library's hidden test modules (`firstrt::testdata`, `firstrt::kernels::testing`),
//! which the unit tests and benches use too: import them from there.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use firstrt::generate::{GenerateOptions, SamplerConfig, TokenStream, generate};
use firstrt::gpu::{DType, test_context};
use firstrt::runtime::{LoadedModel, Session};
use firstrt::testdata::{fixtures_dir, load_model};

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
    cell.get_or_init(|| Arc::new(load_model(&test_context(), dtype))).clone()
}

/// Generation options for `n` greedy tokens that never stop early (no end token).
pub fn greedy_options(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, sampler: SamplerConfig::greedy(), end_ids: vec![] }
}

/// Greedy generation of `n` tokens after `prompt` (no end token); returns the generated ids.
pub fn greedy(session: &mut Session, prompt: &[u32], n: usize) -> Vec<u32> {
    generate(session, prompt, &greedy_options(n)).expect("greedy generation").generated_ids
}

/// Greedy generation of `n` tokens after `prompt` (no end token); returns the logits of the last
/// prompt position and the generated ids.
pub fn greedy_with_logits(session: &mut Session, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let options = greedy_options(n);
    let mut stream = TokenStream::start(session, prompt, &options, None).expect("prefill");
    let logits = stream.session().read_logits().expect("reading the logits");
    for event in &mut stream {
        event.expect("greedy generation");
    }
    (logits, stream.into_generation().generated_ids)
}
