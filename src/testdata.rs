//! Test support shared by the unit tests, the integration tests and the benches: where the test
//! model and the transformers fixtures live, loading the model, temporary folders, and the median. Missing
//! files are a panic that says how to get them: tests must not pass without them.
//!
//! Hidden from the docs: not part of the library's API, but a public module so that `tests/` and
//! `benches/` (separate crates) reach the same helpers as the `#[cfg(test)]` modules.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::gpu::{DType, GpuContext};
use crate::model::{Arch, ModelConfig};
use crate::runtime::LoadedModel;

/// File name of the test model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The fixture set for that model (a folder name under the fixtures root).
pub const FIXTURE_SET: &str = "smollm2-135m-instruct";

/// `$FIRSTRT_CACHE`, default `~/.cache/firstrt` ([`crate::gpu::notice::cache_dir`]), and
/// `/root/.cache/firstrt` without `HOME`.
pub fn cache_dir() -> PathBuf {
    crate::gpu::notice::cache_dir().unwrap_or_else(|| PathBuf::from("/root/.cache/firstrt"))
}

/// The test model: `$FIRSTRT_MODEL`, else `cache_dir()/MODEL_FILE`. Panics, naming the fetch
/// script, when the file is missing.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("FIRSTRT_MODEL").map_or_else(|| cache_dir().join(MODEL_FILE), PathBuf::from);
    assert!(path.is_file(), "test model {} is missing: run scripts/fetch-test-model.sh", path.display());
    path
}

/// The test model ([`model_path`]) loaded onto `ctx` with `dtype` weights (f32 or f16), without
/// progress display. Panics, with the loader's error, when it cannot be loaded.
pub fn load_model(ctx: &Arc<GpuContext>, dtype: DType) -> LoadedModel {
    LoadedModel::load(ctx, &model_path(), dtype, &mut |_, _| {}).unwrap_or_else(|e| panic!("loading the test model: {e}"))
}

/// The fixture set: `$FIRSTRT_FIXTURES/FIXTURE_SET`, else `../shared/fixtures/FIXTURE_SET` beside
/// the checkout. Panics when its `SOURCE.md` is not there.
pub fn fixtures_dir() -> PathBuf {
    let root = std::env::var_os("FIRSTRT_FIXTURES")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"), PathBuf::from);
    let dir = root.join(FIXTURE_SET);
    assert!(
        dir.join("SOURCE.md").is_file(),
        "fixtures not found at {} (set FIRSTRT_FIXTURES to the folder holding {FIXTURE_SET}/)",
        dir.display()
    );
    dir
}

/// The task data (`e2e_nlg/`, `xsum/`, `rouge_cases.json`): `$FIRSTRT_DATA`, else
/// `../shared/data` beside the checkout. Panics when its `SOURCE.md` is not there.
pub fn data_dir() -> PathBuf {
    let dir =
        std::env::var_os("FIRSTRT_DATA").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"), PathBuf::from);
    assert!(dir.join("SOURCE.md").is_file(), "task data not found at {} (set FIRSTRT_DATA to it)", dir.display());
    dir
}

/// A folder under the system temp dir, removed with its contents when dropped. Its name,
/// `firstrt-test-{pid}-{tag}-{n}`, is unique to the process and the call, so that tests running
/// at the same time (threads of one test binary, or several binaries) never share one.
#[derive(Debug)]
pub struct TempDir {
    /// The folder (it exists from `new` until drop).
    pub path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, empty folder whose name contains `tag`. Panics when it cannot be
    /// created: a test cannot go on without it.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("firstrt-test-{}-{tag}-{n}", std::process::id()));
        // Left over from an earlier process with the same id: start empty.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating the temp folder {}: {e}", path.display()));
        TempDir { path }
    }

    /// `path/name`: a path inside the folder (nothing is created).
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The median of `v` (sorted in place by `f64::total_cmp`): the middle value, or the mean of the
/// two middle values for an even length. Panics when `v` is empty.
pub fn median(v: &mut [f64]) -> f64 {
    assert!(!v.is_empty(), "median of no values");
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// A tiny LLaMA configuration for unit tests and fuzz seeds: 2 layers, d_model 8, 2 heads of
/// head_dim 4, 1 KV head, d_ff 12, vocab 5, tied embeddings, named `tiny`.
pub fn tiny_llama_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        n_layers: 2,
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        d_ff: 12,
        vocab_size: 5,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position: 64,
        tied_embeddings: true,
        qkv_bias: false,
        name: "tiny".into(),
    }
}
