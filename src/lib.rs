//! firstrt: LLM inference on wgpu compute shaders with FiRST layer skipping.

pub mod generate;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod runtime;
#[doc(hidden)]
pub mod testdata;
