//! A plain buffer copy (`dst = src`, vec4 at a time): the memory-bandwidth reference that the
//! kernel bench compares matvec against, and how block influence (`runtime::calibration`) keeps
//! a layer's input. Works on any dtype; copies whole 16-byte groups.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::invalid;

const SOURCE: &str = include_str!("../../shaders/copy.wgsl");
const WG: u32 = 64;
const PER: u32 = 8;

/// Uniform of `shaders/copy.wgsl` (`struct Params` there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct CopyParams {
    /// 16-byte groups to copy.
    pub n4: u32,
    /// Padding to 16 bytes.
    pub _pad0: u32,
    /// Padding to 16 bytes.
    pub _pad1: u32,
    /// Padding to 16 bytes.
    pub _pad2: u32,
}

/// Copy the bytes of `src` (rounded up to 16, i.e. its padded buffer) to the start of `dst`.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when dst's buffer is smaller than that.
pub fn copy(ctx: &GpuContext, label: &str, src: &GpuTensor, dst: &GpuTensor) -> Result<Dispatch, GpuError> {
    let bytes = src.byte_len().div_ceil(16) * 16;
    if (dst.buffer.size() as usize) < bytes {
        return Err(invalid(label, format!("dst holds {} bytes, src needs {bytes}", dst.buffer.size())));
    }
    let n4 = (bytes / 16) as u32;
    let pipeline = ctx.pipeline(&ShaderVariant::new("copy", SOURCE, "copy"))?;
    let u = uniform(ctx, label, &CopyParams { n4, ..Zeroable::zeroed() });
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), src.buffer.as_entire_binding(), dst.buffer.as_entire_binding()],
        grid(n4.div_ceil(WG * PER)),
        Cost { flops: 0, bytes: 2 * bytes as u64 },
    ))
}

/// CPU reference.
pub fn copy_ref(src: &[f32]) -> Vec<f32> {
    src.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, test_context};
    use crate::kernels::testing::{assert_close, random_vec};

    #[test]
    fn copy_matches_reference() {
        let ctx = test_context();
        for n in [1, 7, 257, 1757, 300_001] {
            let v = random_vec(n, n as u64);
            let src = GpuTensor::from_f32(&ctx, "src", &[n], &v).unwrap();
            let dst = GpuTensor::from_f32(&ctx, "dst", &[n], &vec![f32::NAN; n]).unwrap();
            let d = copy(&ctx, "copy", &src, &dst).unwrap();
            ctx.run("test", &[&d]).unwrap();
            assert_close(&dst.read_f32(&ctx).unwrap(), &copy_ref(&v), 0.0, 0.0, "copy");
        }
        let small = GpuTensor::zeros(&ctx, "small", DType::F32, &[4]).unwrap();
        let big = GpuTensor::zeros(&ctx, "big", DType::F32, &[8]).unwrap();
        assert!(copy(&ctx, "copy", &big, &small).is_err());
    }
}
