//! Cosine similarity of matching rows of two `[rows, d]` matrices, one value per row: the
//! measure of ShortGPT's block influence (`runtime::calibration`).

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, check_rows, check_u32, invalid};

const SOURCE: &str = include_str!("../../shaders/cosine.wgsl");

/// The norm floor of `torch.nn.functional.cosine_similarity` (its `eps`), as the shader uses it.
pub const COSINE_EPS: f64 = 1e-8;

/// Uniform of `shaders/cosine.wgsl` (`struct CosineParams` there, same fields in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct CosineParams {
    /// Rows to compare.
    pub rows: u32,
    /// Row width d.
    pub dim: u32,
    /// Element of `out` that row 0's cosine goes to.
    pub out_offset: u32,
    /// Padding to 16 bytes.
    pub _pad0: u32,
}

/// The operands of one [`cosine`] dispatch.
#[derive(Debug, Clone, Copy)]
pub struct CosineOp<'a> {
    /// First operand, `[rows, d]` f32 (at least that many values).
    pub a: &'a GpuTensor,
    /// Second operand, `[rows, d]` f32.
    pub b: &'a GpuTensor,
    /// Rows to compare; at least 1.
    pub rows: usize,
    /// Row width d; at least 1.
    pub dim: usize,
    /// Output, f32 with at least `out_offset + rows` values.
    pub out: &'a GpuTensor,
    /// Where row 0's cosine goes in `out` (e.g. `layer * rows` for a `[n_layers, rows]` table).
    pub out_offset: usize,
}

/// `out[out_offset + r] = a[r] · b[r] / (max(|a[r]|, 1e-8) · max(|b[r]|, 1e-8))` for each row
/// `r < rows`: the cosine similarity as `torch.nn.functional.cosine_similarity` defines it.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows or d is 0, an operand is not f32 or
/// too small, or an index does not fit in u32.
pub fn cosine(ctx: &GpuContext, label: &str, op: &CosineOp) -> Result<Dispatch, GpuError> {
    let CosineOp { a, b, rows, dim, out, out_offset } = *op;
    check_rows(label, rows)?;
    if dim == 0 {
        return Err(invalid(label, "row width d must be at least 1"));
    }
    let n = rows.checked_mul(dim).ok_or_else(|| invalid(label, format!("{rows} x {dim} elements overflow")))?;
    check_f32(label, a, n, "a")?;
    check_f32(label, b, n, "b")?;
    check_f32(label, out, out_offset.saturating_add(rows), "out")?;
    check_u32(label, n, "a elements")?;
    check_u32(label, out_offset + rows, "out elements")?;
    let pipeline = ctx.pipeline(&ShaderVariant::new("cosine", SOURCE, "cosine"))?;
    let params = CosineParams { rows: rows as u32, dim: dim as u32, out_offset: out_offset as u32, _pad0: 0 };
    let u = uniform(ctx, label, &params);
    let cost = Cost { flops: (6 * n) as u64, bytes: (4 * (2 * n + rows)) as u64 };
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), a.buffer.as_entire_binding(), b.buffer.as_entire_binding(), out.buffer.as_entire_binding()],
        grid((rows as u32).div_ceil(64)),
        cost,
    ))
}

/// CPU reference (f64 accumulation) of the same maths: one cosine per row of `a` and `b`
/// (`[rows, dim]` each, the same length, a whole number of rows).
pub fn cosine_ref(a: &[f32], b: &[f32], dim: usize) -> Vec<f64> {
    a.chunks(dim)
        .zip(b.chunks(dim))
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(&u, &v)| u as f64 * v as f64).sum();
            let norm = |v: &[f32]| v.iter().map(|&u| u as f64 * u as f64).sum::<f64>().sqrt().max(COSINE_EPS);
            dot / (norm(x) * norm(y))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, test_context};
    use crate::kernels::testing::random_vec;

    #[test]
    fn cosine_matches_reference() {
        let ctx = test_context();
        for (rows, dim, offset) in [(1, 7, 0), (7, 257, 3), (3, 576, 9), (130, 64, 130), (1757, 13, 1)] {
            let mut a = random_vec(rows * dim, 1);
            let mut b = random_vec(rows * dim, 2);
            // Row 0 parallel to a (cos 1), row 1 opposite (-1) where there are rows enough; a
            // zero row gives 0 as torch does.
            if rows > 2 {
                b[..dim].iter_mut().zip(&a[..dim]).for_each(|(y, x)| *y = 3.0 * x);
                b[dim..2 * dim].iter_mut().zip(&a[dim..2 * dim]).for_each(|(y, x)| *y = -0.5 * x);
                a[2 * dim..3 * dim].fill(0.0);
            }
            let ga = GpuTensor::from_f32(&ctx, "a", &[rows, dim], &a).unwrap();
            let gb = GpuTensor::from_f32(&ctx, "b", &[rows, dim], &b).unwrap();
            let out = GpuTensor::from_f32(&ctx, "out", &[offset + rows], &vec![f32::NAN; offset + rows]).unwrap();
            let op = CosineOp { a: &ga, b: &gb, rows, dim, out: &out, out_offset: offset };
            let d = cosine(&ctx, "cosine", &op).unwrap();
            ctx.run("test", &[&d]).unwrap();
            let got = out.read_f32(&ctx).unwrap();
            assert!(got[..offset].iter().all(|v| v.is_nan()), "wrote before out_offset");
            let want = cosine_ref(&a, &b, dim);
            for (r, (g, w)) in got[offset..].iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-5, "rows {rows} dim {dim}: row {r} cos {g}, CPU {w}");
            }
            if rows > 2 {
                assert!((want[0] - 1.0).abs() < 1e-12 && (want[1] + 1.0).abs() < 1e-12 && want[2] == 0.0);
            }
        }
    }

    #[test]
    fn cosine_rejects_bad_operands() {
        let ctx = test_context();
        let a = GpuTensor::zeros(&ctx, "a", DType::F32, &[4, 8]).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[4]).unwrap();
        let ids = GpuTensor::zeros(&ctx, "ids", DType::U32, &[32]).unwrap();
        let op = CosineOp { a: &a, b: &a, rows: 4, dim: 8, out: &out, out_offset: 0 };
        assert!(cosine(&ctx, "cos", &op).is_ok());
        for (bad, what) in [
            (CosineOp { rows: 0, ..op }, "rows"),
            (CosineOp { dim: 0, ..op }, "row width"),
            (CosineOp { rows: 5, ..op }, "a ("),
            (CosineOp { out_offset: 1, ..op }, "out ("),
            (CosineOp { b: &ids, ..op }, "b ("),
        ] {
            let err = cosine(&ctx, "bi/cos", &bad).err().unwrap().to_string();
            assert!(err.contains("bi/cos") && err.contains(what), "{err}");
        }
    }
}
