//! A plain buffer copy (`dst = src`, vec4 at a time): the memory-bandwidth reference that the
//! kernel bench compares matvec against, and how block influence (`runtime::calibration`) keeps
//! a layer's input. Works on any dtype; copies whole 16-byte groups. [`copy_words`] copies a
//! range of 32-bit words between offsets (a row of a batch to a sequence's buffer and back).

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

const WORDS_SOURCE: &str = include_str!("../../shaders/copy_words.wgsl");

/// Uniform of `shaders/copy_words.wgsl` (`struct CopyWordsParams` there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct CopyWordsParams {
    /// 32-bit words to copy.
    pub n: u32,
    /// First word read in src.
    pub src_off: u32,
    /// First word written in dst.
    pub dst_off: u32,
    /// Padding to 16 bytes.
    pub _pad: u32,
}

/// Copy `n` 32-bit words from word `src_off` of `src` to word `dst_off` of `dst` (any 4-byte
/// dtype, bit for bit): e.g. row `i` of a `[rows, cols]` tensor is `src_off = i * cols`,
/// `n = cols`.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when a range runs past its tensor, a tensor's
/// dtype is not 4 bytes wide, or an offset does not fit the kernel's u32 counters.
pub fn copy_words(
    ctx: &GpuContext,
    label: &str,
    src: &GpuTensor,
    src_off: usize,
    dst: &GpuTensor,
    dst_off: usize,
    n: usize,
) -> Result<Dispatch, GpuError> {
    for (name, t, off) in [("src", src, src_off), ("dst", dst, dst_off)] {
        if t.dtype.size() != 4 {
            return Err(invalid(label, format!("{name} is {:?}, not a 4-byte dtype", t.dtype)));
        }
        let end = off.checked_add(n).filter(|&e| e <= t.numel() && e <= u32::MAX as usize);
        if end.is_none() {
            return Err(invalid(label, format!("{name} words {off}..{off}+{n} run past its {} words", t.numel())));
        }
    }
    let pipeline = ctx.pipeline(&ShaderVariant::new("copy_words", WORDS_SOURCE, "copy_words"))?;
    let params = CopyWordsParams { n: n as u32, src_off: src_off as u32, dst_off: dst_off as u32, _pad: 0 };
    let u = uniform(ctx, label, &params);
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), src.buffer.as_entire_binding(), dst.buffer.as_entire_binding()],
        grid((n as u32).div_ceil(64)),
        Cost { flops: 0, bytes: 8 * n as u64 },
    ))
}

/// CPU reference of [`copy_words`]: `dst` with `dst[dst_off..][..n]` replaced by
/// `src[src_off..][..n]`.
pub fn copy_words_ref(src: &[f32], src_off: usize, dst: &[f32], dst_off: usize, n: usize) -> Vec<f32> {
    let mut out = dst.to_vec();
    out[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
    out
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

    /// Rows at odd offsets, bit for bit, and ranges past a tensor refused.
    #[test]
    fn copy_words_matches_reference() {
        let ctx = test_context();
        for (ns, nd, so, d_o, n) in [(10, 10, 0, 0, 10), (37, 50, 3, 11, 29), (3 * 961, 2 * 961, 961, 961, 961), (5, 5, 4, 0, 1)] {
            let src_v = random_vec(ns, ns as u64);
            let dst_v = random_vec(nd, 7 + nd as u64);
            let src = GpuTensor::from_f32(&ctx, "src", &[ns], &src_v).unwrap();
            let dst = GpuTensor::from_f32(&ctx, "dst", &[nd], &dst_v).unwrap();
            let d = copy_words(&ctx, "copy_words", &src, so, &dst, d_o, n).unwrap();
            ctx.run("test", &[&d]).unwrap();
            assert_close(&dst.read_f32(&ctx).unwrap(), &copy_words_ref(&src_v, so, &dst_v, d_o, n), 0.0, 0.0, "copy_words");
        }
        let t = GpuTensor::zeros(&ctx, "t", DType::F32, &[8]).unwrap();
        assert!(copy_words(&ctx, "c", &t, 4, &t, 0, 5).is_err());
        assert!(copy_words(&ctx, "c", &t, 0, &t, 7, 2).is_err());
        assert!(copy_words(&ctx, "c", &t, usize::MAX, &t, 0, 2).is_err());
    }
}
