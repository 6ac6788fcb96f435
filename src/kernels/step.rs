//! The per-step uniform: values that change every forward step (positions, token count), written
//! with `queue.write_buffer` before each submit so that one prepared pipeline and bind group
//! serves every step.

use bytemuck::{Pod, Zeroable};

use crate::gpu::GpuContext;
use crate::gpu::buffer::uniform;

/// The WGSL declaration of [`StepParams`], the `STEP_PARAMS` snippet.
pub const STEP_PARAMS_WGSL: &str = include_str!("../../shaders/step_params.wgsl");

/// Mirrored by `struct StepParams` in `shaders/step_params.wgsl` ([`STEP_PARAMS_WGSL`]), which
/// every kernel that reads the step uniform pastes in.
#[repr(C)]
#[derive(Pod, Zeroable, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepParams {
    /// Position of the first token of this step.
    pub pos0: u32,
    /// Number of tokens T of this step.
    pub n_tokens: u32,
    /// `pos0 + n_tokens`: cache rows valid after this step.
    pub kv_len: u32,
    /// Padding to 16 bytes.
    pub _pad: u32,
}

impl StepParams {
    /// The parameters of a step of `n_tokens` tokens starting at position `pos0`.
    pub fn new(pos0: usize, n_tokens: usize) -> StepParams {
        StepParams { pos0: pos0 as u32, n_tokens: n_tokens as u32, kv_len: (pos0 + n_tokens) as u32, _pad: 0 }
    }
}

/// A 16-byte `UNIFORM | COPY_DST` buffer holding one [`StepParams`].
#[derive(Debug, Clone)]
pub struct StepBuffer {
    /// The uniform buffer (16 bytes), bound by the kernels that read the step.
    pub buffer: wgpu::Buffer,
}

impl StepBuffer {
    /// A step buffer holding zeros.
    pub fn new(ctx: &GpuContext) -> StepBuffer {
        let buffer = uniform(ctx, "step", &StepParams::default());
        StepBuffer { buffer }
    }

    /// Queue a write of `p`; it is visible to the next submission.
    pub fn write(&self, ctx: &GpuContext, p: &StepParams) {
        ctx.queue.write_buffer(&self.buffer, 0, bytemuck::bytes_of(p));
    }
}
