//! firstrt: LLM inference on wgpu compute shaders with FiRST layer skipping.
//!
//! # Layering
//! The folders depend on each other in one direction only (no import cycle):
//! ```text
//!            generate         text generation: the token loop, sampler, stop strings, chats
//!               |
//!            runtime          joins them: weights on the GPU, sessions, the layer plan,
//!           /       \         routers on the GPU, profiling
//!      kernels     model      model: file formats (GGUF, safetensors, router files, PEFT
//!         |                   adapters), configuration, tokenizer, chat template, tensor
//!        gpu                  names and CPU maths; depends on neither gpu nor kernels
//! ```
//! - [`gpu`] (device, buffers, pipelines, dispatches, errors) uses only itself.
//! - [`kernels`] (one compute shader each, with its argument checks and a CPU reference) uses
//!   [`gpu`] and never [`model`] or [`runtime`]: a kernel takes GPU tensors and sizes, not model
//!   types.
//! - [`model`] uses neither [`gpu`], [`kernels`] nor [`runtime`]: it reads files into host
//!   tensors and defines the CPU maths of the model (e.g. a router's probability).
//! - [`runtime`] uses all three: it uploads [`model`] data into the GPU structures that
//!   [`kernels`] take (weights, LoRA pairs, routers) and wraps their errors in
//!   [`runtime::RuntimeError`]. Tests that compare a kernel with a CPU definition from
//!   [`model`] live in [`runtime`] for the same reason.
//! - [`generate`] uses [`runtime`] (a session's prefill and decode steps) and [`model`]
//!   (tokenizer, chat template): sampling, stop strings, conversations and the token loop that
//!   the command line and a server drive. Nothing below depends on it.
//!
//! [`server`] (`firstrt serve`: the OpenAI-compatible HTTP API, its scheduler of sequences)
//! sits above [`generate`] and [`runtime`].
//!
//! [`eval`] (task data, ROUGE, the runs that compare plans) sits above [`generate`];
//! [`train`] (FiRST routers and LoRA trained on the GPU: the engine, training sequences,
//! checkpoints) sits above [`eval`], whose task files and prompts it uses, and [`runtime`].
//!
//! `testdata` (test model and fixture paths) is a leaf any test may use.

#![warn(missing_docs)]

pub mod eval;
pub mod generate;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod runtime;
pub mod server;
#[doc(hidden)]
pub mod testdata;
pub mod train;
