//! Training FiRST routers and LoRA adapters on the GPU (`firstrt train`).
//!
//! - [`engine`]: one sequence's forward and backward pass on the GPU with the model's own
//!   kernels and their backward kernels, gradients summed over a batch, the AdamW step.
//! - [`data`]: training sequences from task files: the chat-templated prompt, the completion
//!   and the token that ends the assistant's turn, fitted to the context, with the positions
//!   the loss is taken over.
//! - [`checkpoint`]: checkpoint files (parameters, AdamW moments, step, options, model
//!   identity, loss history) written atomically and checked on load, for `--resume`.
//!
//! This module sits above [`crate::runtime`] and [`crate::eval`] (it builds prompts exactly as
//! evaluation does); nothing below depends on it.

pub mod checkpoint;
pub mod data;
pub mod engine;
