//! In-place elementwise add, `acc += x` (the residual add when it is not fused into a matmul).

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, check_u32};

const SOURCE: &str = include_str!("../../shaders/add.wgsl");

/// Uniform of `shaders/add.wgsl` (`struct Params` there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AddParams {
    /// Elements to add.
    pub n: u32,
    /// Padding to 16 bytes.
    pub _pad0: u32,
    /// Padding to 16 bytes.
    pub _pad1: u32,
    /// Padding to 16 bytes.
    pub _pad2: u32,
}

/// `acc[i] += x[i]` for the first `n` elements (both f32).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when acc or x is not f32 or has fewer than `n`
/// elements, or `n` does not fit in u32.
pub fn add_inplace(ctx: &GpuContext, label: &str, acc: &GpuTensor, x: &GpuTensor, n: usize) -> Result<Dispatch, GpuError> {
    check_f32(label, acc, n, "acc")?;
    check_f32(label, x, n, "x")?;
    check_u32(label, n, "n")?;
    let pipeline = ctx.pipeline(&ShaderVariant::new("add", SOURCE, "add_inplace"))?;
    let u = uniform(ctx, label, &AddParams { n: n as u32, _pad0: 0, _pad1: 0, _pad2: 0 });
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), acc.buffer.as_entire_binding(), x.buffer.as_entire_binding()],
        grid((n as u32).div_ceil(256)),
        Cost { flops: n as u64, bytes: (12 * n) as u64 },
    ))
}

/// CPU reference: `acc + x` elementwise.
pub fn add_ref(acc: &[f32], x: &[f32]) -> Vec<f32> {
    acc.iter().zip(x).map(|(a, b)| a + b).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::testing::{assert_close, random_vec};

    #[test]
    fn add_matches_reference() {
        let ctx = test_context();
        for (i, n) in [1usize, 7, 257, 1757, 1 << 20].into_iter().enumerate() {
            let a = random_vec(n, 100 + i as u64);
            let b = random_vec(n, 200 + i as u64);
            let ga = GpuTensor::from_f32(&ctx, "acc", &[n], &a).unwrap();
            let gb = GpuTensor::from_f32(&ctx, "x", &[n], &b).unwrap();
            let d = add_inplace(&ctx, "add", &ga, &gb, n).unwrap();
            ctx.run("test", &[&d]).unwrap();
            assert_close(&ga.read_f32(&ctx).unwrap(), &add_ref(&a, &b), 0.0, 0.0, &format!("add n={n}"));
        }
    }

    #[test]
    fn add_of_a_prefix_leaves_the_rest() {
        let ctx = test_context();
        let a = random_vec(100, 1);
        let b = random_vec(100, 2);
        let ga = GpuTensor::from_f32(&ctx, "acc", &[100], &a).unwrap();
        let gb = GpuTensor::from_f32(&ctx, "x", &[100], &b).unwrap();
        let d = add_inplace(&ctx, "add", &ga, &gb, 37).unwrap();
        ctx.run("test", &[&d]).unwrap();
        let mut want = add_ref(&a[..37], &b[..37]);
        want.extend_from_slice(&a[37..]);
        assert_close(&ga.read_f32(&ctx).unwrap(), &want, 0.0, 0.0, "add prefix");
        assert!(add_inplace(&ctx, "add", &ga, &gb, 101).is_err());
    }
}
