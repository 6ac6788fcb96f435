//! RMSNorm: `y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w` (LLaMA's norm, no mean
//! subtraction, no bias).

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, check_rows, check_u32};

const SOURCE: &str = include_str!("../../shaders/rmsnorm.wgsl");

/// Uniform of `shaders/rmsnorm.wgsl` (`struct Params` there, same fields in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RmsNormParams {
    /// Rows to normalise.
    pub rows: u32,
    /// Row width d.
    pub dim: u32,
    /// The epsilon added to the mean square.
    pub eps: f32,
    /// Element offset of the first row read from x (`x_row0 * dim`).
    pub x_offset: u32,
}

/// The operands of one RMSNorm (see [`rmsnorm`]).
#[derive(Debug, Clone, Copy)]
pub struct RmsNormOp<'a> {
    /// Input, f32 rows of width d (d = `weight.numel()`).
    pub x: &'a GpuTensor,
    /// First row of x to normalise (the last row only, for the LM head).
    pub x_row0: usize,
    /// Rows to normalise; at least 1.
    pub rows: usize,
    /// The norm's weight, `[d]` f32.
    pub weight: &'a GpuTensor,
    /// Output, `[rows, d]` f32.
    pub y: &'a GpuTensor,
    /// The epsilon added to the mean square (`rms_norm_eps` of config.json).
    pub eps: f32,
}

/// Normalises `op.rows` rows of `op.x` from row `op.x_row0` into `op.y`:
/// `y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight` (Zhang and Sennrich 2019, as Hugging
/// Face's `LlamaRMSNorm`).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows or d is 0, x, y or the weight is not
/// f32 or too small, or an index does not fit in u32.
pub fn rmsnorm(ctx: &GpuContext, label: &str, op: &RmsNormOp) -> Result<Dispatch, GpuError> {
    let RmsNormOp { x, x_row0, rows, weight, y, eps } = *op;
    let dim = weight.numel();
    check_rows(label, rows)?;
    check_f32(label, weight, dim.max(1), "weight")?;
    check_f32(label, x, (x_row0 + rows) * dim, "x")?;
    check_f32(label, y, rows * dim, "y")?;
    check_u32(label, (x_row0 + rows) * dim, "x elements")?;
    let pipeline = ctx.pipeline(&ShaderVariant::new("rmsnorm", SOURCE, "rmsnorm"))?;
    let params = RmsNormParams { rows: rows as u32, dim: dim as u32, eps, x_offset: (x_row0 * dim) as u32 };
    let u = uniform(ctx, label, &params);
    let cost = Cost { flops: (4 * rows * dim) as u64, bytes: (4 * (2 * rows * dim + dim)) as u64 };
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), x.buffer.as_entire_binding(), weight.buffer.as_entire_binding(), y.buffer.as_entire_binding()],
        grid((rows as u32).div_ceil(64)),
        cost,
    ))
}

/// CPU reference of the same maths.
pub fn rmsnorm_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(dim).zip(y.chunks_mut(dim)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / dim as f64) as f32 + eps).sqrt();
        for i in 0..dim {
            yr[i] = xr[i] * scale * w[i];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::testing::{assert_close, random_vec};

    #[test]
    fn rmsnorm_matches_reference() {
        let ctx = test_context();
        for (rows, dim) in [(1, 7), (7, 257), (3, 576), (257, 64), (1757, 13)] {
            let x = random_vec(rows * dim, 1);
            let w = random_vec(dim, 2);
            let gx = GpuTensor::from_f32(&ctx, "x", &[rows, dim], &x).unwrap();
            let gw = GpuTensor::from_f32(&ctx, "w", &[dim], &w).unwrap();
            let gy = GpuTensor::zeros(&ctx, "y", crate::gpu::DType::F32, &[rows, dim]).unwrap();
            let d = rmsnorm(&ctx, "rmsnorm", &RmsNormOp { x: &gx, x_row0: 0, rows, weight: &gw, y: &gy, eps: 1e-5 }).unwrap();
            ctx.run("test", &[&d]).unwrap();
            assert_close(&gy.read_f32(&ctx).unwrap(), &rmsnorm_ref(&x, &w, 1e-5), 1e-5, 1e-4, "rmsnorm");
        }
    }

    #[test]
    fn rmsnorm_of_one_row_inside_a_block() {
        let ctx = test_context();
        let (rows, dim) = (5, 33);
        let x = random_vec(rows * dim, 3);
        let w = random_vec(dim, 4);
        let gx = GpuTensor::from_f32(&ctx, "x", &[rows, dim], &x).unwrap();
        let gw = GpuTensor::from_f32(&ctx, "w", &[dim], &w).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", crate::gpu::DType::F32, &[1, dim]).unwrap();
        let d = rmsnorm(&ctx, "rmsnorm", &RmsNormOp { x: &gx, x_row0: 4, rows: 1, weight: &gw, y: &gy, eps: 1e-5 }).unwrap();
        ctx.run("test", &[&d]).unwrap();
        assert_close(&gy.read_f32(&ctx).unwrap(), &rmsnorm_ref(&x[4 * dim..], &w, 1e-5), 1e-5, 1e-4, "rmsnorm last row");
    }
}
