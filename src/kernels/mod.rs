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
pub mod matvec_windows;
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

/// WGSL that several kernels share, written once in `shaders/` and pasted into the `{{NAME}}`
/// placeholder of each kernel that holds it ([`snippet_variant`]):
/// - `TREE_SUM` (`tree_sum.wgsl`): the one-workgroup sum `red`, `tree_sum(lane)` of the kernels
///   reducing within a workgroup of 256 (gate, grad_clip, router, router_backward);
/// - `SIGMOID` (`sigmoid.wgsl`): the overflow-free `sigmoid(x)` (swiglu, router,
///   router_backward);
/// - `ROUTER_GROUPS` (`router_groups.wgsl`): `LANES` and `GROUPS`, the router kernels' split of a
///   workgroup into one group of lanes per hidden unit (router, router_backward);
/// - `ROPE_INDEX` (`rope_index.wgsl`): `rope_item(idx)`, the (t, pos, head slot, pair) of one
///   invocation and whether it writes, and `rope_slots()` (rope, rope_backward);
/// - `ROPE_WRITE` (`rope_write.wgsl`): `rope_write(..)`, one pair rotated and written to q_out or
///   the KV cache (rope, and the decode GEMV's RoPE epilogue, `matvec::MatvecEpilogue::Rope`).
/// - `STEP_PARAMS` (`step_params.wgsl`): `struct StepParams`, the WGSL mirror of
///   [`step::StepParams`] (attention, rope, rope_backward, and the RoPE epilogue);
/// - `MATVEC_STORE` (`matvec_store.wgsl`): the decode GEMV's `MatvecParams`, its bindings 0, 3
///   and 4 and `store(n, v)` (matvec, matvec_windows).
const SNIPPETS: [(&str, &str); 7] = [
    ("TREE_SUM", include_str!("../../shaders/tree_sum.wgsl")),
    ("SIGMOID", include_str!("../../shaders/sigmoid.wgsl")),
    ("ROUTER_GROUPS", include_str!("../../shaders/router_groups.wgsl")),
    ("ROPE_INDEX", include_str!("../../shaders/rope_index.wgsl")),
    ("ROPE_WRITE", rope::ROPE_WRITE),
    ("STEP_PARAMS", step::STEP_PARAMS_WGSL),
    ("MATVEC_STORE", include_str!("../../shaders/matvec_store.wgsl")),
];

/// `entry` of `source` (family `family`) with every shared snippet whose placeholder `source`
/// holds filled in.
fn snippet_variant(family: &'static str, source: &'static str, entry: &'static str) -> crate::gpu::ShaderVariant {
    SNIPPETS
        .iter()
        .filter(|(name, _)| source.contains(&format!("{{{{{name}}}}}")))
        .fold(crate::gpu::ShaderVariant::new(family, source, entry), |variant, (name, text)| variant.define(name, text))
}
