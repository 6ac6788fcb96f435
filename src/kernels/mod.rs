//! The WGSL kernel library. Each family pairs `shaders/NAME.wgsl` with `src/kernels/NAME.rs`:
//! the parameter struct, a typed function that prepares a [`Dispatch`](crate::gpu::Dispatch)
//! for a pass the caller owns, a CPU reference of the same maths, and its tests.

pub mod adamw;
pub mod add;
pub mod attention;
pub mod attention_backward;
mod checks;
pub mod choice;
pub mod copy;
pub mod cosine;
pub mod cross_entropy;
pub mod embedding;
pub mod gate;
pub mod grad_clip;
pub mod linear;
pub mod matmul;
pub mod matmul_tn;
pub mod matmul_xw;
pub mod matvec;
pub mod rmsnorm;
pub mod rmsnorm_backward;
pub mod rope;
pub mod rope_backward;
pub mod router;
pub mod router_backward;
pub mod sample;
pub mod step;
pub mod swiglu;
#[doc(hidden)]
pub mod testing;

#[cfg(test)]
mod linear_grad_tests;
#[cfg(test)]
mod quant_tests;

/// The one-workgroup sum (`shaders/tree_sum.wgsl`: `red`, `tree_sum(lane)`) that the kernels
/// reducing within a workgroup of 256 paste into their `{{TREE_SUM}}` placeholder.
const TREE_SUM: &str = include_str!("../../shaders/tree_sum.wgsl");

/// `entry` of `source` (family `family`) with the shared workgroup sum filled in.
fn tree_sum_variant(family: &'static str, source: &'static str, entry: &'static str) -> crate::gpu::ShaderVariant {
    crate::gpu::ShaderVariant::new(family, source, entry).define("TREE_SUM", TREE_SUM)
}
