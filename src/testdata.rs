//! Where the test model and the transformers fixtures live; shared by the unit tests, the
//! integration tests and the benches. Missing files are a panic that says how to get them: tests
//! must not pass without them.

use std::path::PathBuf;

/// File name of the test model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The fixture set for that model.
pub const FIXTURE_SET: &str = "smollm2-135m-instruct";

/// `$FIRSTRT_CACHE`, default `~/.cache/firstrt`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("FIRSTRT_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/firstrt"),
    }
}

/// The test model: `$FIRSTRT_MODEL`, else `cache_dir()/MODEL_FILE`.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("FIRSTRT_MODEL").map_or_else(|| cache_dir().join(MODEL_FILE), PathBuf::from);
    assert!(path.is_file(), "test model {} is missing: run scripts/fetch-test-model.sh", path.display());
    path
}

/// The fixture set: `$FIRSTRT_FIXTURES/FIXTURE_SET`, else `../shared/fixtures/FIXTURE_SET` beside
/// the checkout.
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
