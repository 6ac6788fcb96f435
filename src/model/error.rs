//! Errors of the model-loading layer. Every variant names the file, tensor, key
//! or limit involved so that a message alone is enough to find the problem.

use std::path::PathBuf;

/// Everything that can go wrong while reading model files.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the GGUF magic.
    #[error("{path}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file involved.
        path: PathBuf,
        /// What the file holds.
        found: Vec<u8>,
    },

    /// A GGUF version other than 2 or 3.
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The file involved.
        path: PathBuf,
        /// The version in the header.
        version: u32,
    },

    /// The file ends inside a header, metadata value or tensor.
    #[error("{path}: file truncated while reading {what}")]
    Truncated {
        /// The file involved.
        path: PathBuf,
        /// What was being read or what is wrong.
        what: String,
    },

    /// A count or size in the file is over a sanity limit (guards allocations).
    #[error("{path}: {what} is {value}, over the limit of {limit}")]
    LimitExceeded {
        /// The file involved.
        path: PathBuf,
        /// What was being read or what is wrong.
        what: String,
        /// The value in the file.
        value: u64,
        /// The largest accepted value.
        limit: u64,
    },

    /// A structural error in the file (bad offsets, alignment, duplicate names, ...).
    #[error("{path}: malformed file: {what}")]
    Malformed {
        /// The file involved.
        path: PathBuf,
        /// What was being read or what is wrong.
        what: String,
    },

    /// A required metadata key is absent.
    #[error("{path}: missing metadata key '{key}'")]
    MissingKey {
        /// The file involved.
        path: PathBuf,
        /// The metadata key.
        key: String,
    },

    /// A metadata key holds a value of the wrong type.
    #[error("{path}: metadata key '{key}' should be {expected}, found {found}")]
    WrongKeyType {
        /// The file involved.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What was expected.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },

    /// A tensor the model needs is absent.
    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor {
        /// The file involved.
        path: PathBuf,
        /// The tensor (canonical name, and the file's own name where it differs).
        tensor: String,
    },

    /// A tensor's shape differs from what the configuration implies.
    #[error("tensor '{tensor}': expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor (canonical name, and the file's own name where it differs).
        tensor: String,
        /// What was expected.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },

    /// A tensor data type this runtime cannot read.
    #[error("tensor '{tensor}': unsupported data type {ty}")]
    UnsupportedType {
        /// The tensor (canonical name, and the file's own name where it differs).
        tensor: String,
        /// The data type in the file.
        ty: String,
    },

    /// A tensor's data is unusable (size, layout or values).
    #[error("tensor '{tensor}': {what}")]
    BadTensor {
        /// The tensor (canonical name, and the file's own name where it differs).
        tensor: String,
        /// What was being read or what is wrong.
        what: String,
    },

    /// A model architecture other than llama, mistral or qwen2.
    #[error("unsupported architecture '{arch}' (supported: llama, mistral, qwen2)")]
    UnsupportedArch {
        /// The architecture named by the file.
        arch: String,
    },

    /// A RoPE scaling type other than llama3.
    #[error("{path}: unsupported rope scaling type '{kind}' (supported: llama3)")]
    UnsupportedRopeScaling {
        /// The file involved.
        path: PathBuf,
        /// The scaling type named by the file.
        kind: String,
    },

    /// The configuration is inconsistent or out of range.
    #[error("{path}: invalid configuration: {what}")]
    BadConfig {
        /// The file involved.
        path: PathBuf,
        /// What was being read or what is wrong.
        what: String,
    },

    /// A JSON file (config.json, index) does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// A safetensors file does not parse.
    #[error("{path}: invalid safetensors file: {source}")]
    SafeTensors {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: safetensors::SafeTensorError,
    },

    /// A file a Hugging Face folder needs is absent.
    #[error("{path}: missing {what}")]
    MissingFile {
        /// The file involved.
        path: PathBuf,
        /// What was being read or what is wrong.
        what: String,
    },

    /// The path is neither a GGUF file nor a Hugging Face model folder.
    #[error("{path}: not a .gguf file nor a Hugging Face model folder")]
    UnknownModelFormat {
        /// The file involved.
        path: PathBuf,
    },
}
