//! Errors of the model-loading layer. Every variant names the file, tensor, key
//! or limit involved so that a message alone is enough to find the problem.

use std::path::PathBuf;

/// Everything that can go wrong while reading model files.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: Vec<u8> },

    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },

    #[error("{path}: file truncated while reading {what}")]
    Truncated { path: PathBuf, what: String },

    #[error("{path}: {what} is {value}, over the limit of {limit}")]
    LimitExceeded { path: PathBuf, what: String, value: u64, limit: u64 },

    #[error("{path}: malformed file: {what}")]
    Malformed { path: PathBuf, what: String },

    #[error("{path}: missing metadata key '{key}'")]
    MissingKey { path: PathBuf, key: String },

    #[error("{path}: metadata key '{key}' should be {expected}, found {found}")]
    WrongKeyType { path: PathBuf, key: String, expected: &'static str, found: String },

    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("tensor '{tensor}': expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { tensor: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("tensor '{tensor}': unsupported data type {ty}")]
    UnsupportedType { tensor: String, ty: String },

    #[error("tensor '{tensor}': {what}")]
    BadTensor { tensor: String, what: String },

    #[error("unsupported architecture '{arch}' (supported: llama, mistral, qwen2)")]
    UnsupportedArch { arch: String },

    #[error("{path}: unsupported rope scaling type '{kind}' (supported: llama3)")]
    UnsupportedRopeScaling { path: PathBuf, kind: String },

    #[error("{path}: invalid configuration: {what}")]
    BadConfig { path: PathBuf, what: String },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: invalid safetensors file: {source}")]
    SafeTensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },

    #[error("{path}: missing {what}")]
    MissingFile { path: PathBuf, what: String },

    #[error("{path}: not a .gguf file nor a Hugging Face model folder")]
    UnknownModelFormat { path: PathBuf },
}
