//! The WGSL kernel library. Each family pairs `shaders/NAME.wgsl` with `src/kernels/NAME.rs`:
//! the parameter struct, a typed function that prepares a [`Dispatch`](crate::gpu::Dispatch)
//! for a pass the caller owns, a CPU reference of the same maths, and its tests.

pub mod attention;
pub mod rmsnorm;
pub mod rope;
pub mod step;
#[doc(hidden)]
pub mod testing;
