//! Model files: GGUF and Hugging Face folders, configuration, weights, tokenizer, chat template.

pub mod atomic;
pub mod chat;
pub mod config;
pub mod dequant;
pub mod error;
pub mod gguf;
pub mod lora;
pub mod names;
pub mod quant;
pub mod routers;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::ModelError;
pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, MetaValue};
pub use quant::{HostBlocks, QuantType};
pub use weights::{GgufWeights, HfWeights, HostTensor, WeightSource, open_model};

/// Hidden from the docs: a GGUF writer for tests and the fuzz harness's seeds (`examples/fuzz`),
/// not part of the library's API.
#[doc(hidden)]
pub mod gguf_test_writer;
