//! Model files: GGUF and Hugging Face folders, configuration, weights, tokenizer, chat template.

pub mod dequant;
pub mod error;
pub mod gguf;

pub use error::ModelError;
pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, MetaValue};

#[cfg(test)]
pub(crate) mod gguf_test_writer;
