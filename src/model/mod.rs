//! Model files: GGUF and Hugging Face folders, configuration, weights, tokenizer, chat template.

pub mod chat;
pub mod gguf_meta;
pub mod tokenizer;
