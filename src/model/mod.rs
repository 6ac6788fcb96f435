//! Model files: GGUF and Hugging Face folders, configuration, weights, tokenizer, chat template.
