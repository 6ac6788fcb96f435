//! Model files: GGUF and Hugging Face folders, configuration, weights, tokenizer, chat template.

pub mod config;
pub mod dequant;
pub mod error;
pub mod gguf;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::ModelError;
pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, MetaValue};

#[cfg(test)]
pub(crate) mod gguf_test_writer;
