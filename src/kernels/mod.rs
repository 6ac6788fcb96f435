//! The WGSL kernel library. Each family pairs `shaders/NAME.wgsl` with `src/kernels/NAME.rs`:
//! the parameter struct, a typed function that prepares a [`Dispatch`](crate::gpu::Dispatch)
//! for a pass the caller owns, a CPU reference of the same maths, and its tests.

pub mod choice;
pub mod copy;
pub mod matmul;
pub mod matvec;
pub mod rmsnorm;
#[doc(hidden)]
pub mod testing;
