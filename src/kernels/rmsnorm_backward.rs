//! Backward of RMSNorm ([`rmsnorm`](crate::kernels::rmsnorm::rmsnorm)):
//! `y[r, :] = x[r, :] * s_r * w` with `s_r = 1 / sqrt(mean(x[r, :]^2) + eps)`. With
//! `g = dy ⊙ w`, differentiating `s_r` (`∂s_r/∂x[r, j] = -s_r^3 x[r, j] / d`) gives
//!
//! ```text
//! dx[r, i] = s_r g[r, i] - x[r, i] s_r^3 (Σ_j g[r, j] x[r, j]) / d
//! dw[i]    = Σ_r dy[r, i] x[r, i] s_r
//! ```
//!
//! (the gradient of Zhang and Sennrich 2019's RMSNorm, eq. 4 there). `s_r` is recomputed from x:
//! the forward saves nothing.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, check_rows, check_u32, invalid};

const SOURCE: &str = include_str!("../../shaders/rmsnorm_backward.wgsl");

/// Uniform of `shaders/rmsnorm_backward.wgsl` (`struct RmsNormBackwardParams` there, same fields
/// in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RmsNormBackwardParams {
    /// Rows.
    pub rows: u32,
    /// Row width d.
    pub dim: u32,
    /// The epsilon added to the mean square (the forward's).
    pub eps: f32,
    /// 1: `dx += ...`; 0: `dx = ...`.
    pub accumulate_dx: u32,
    /// 1: `dw += ...`; 0: `dw = ...`.
    pub accumulate_dw: u32,
    /// First row of x and dx (dy starts at row 0).
    pub x_row0: u32,
    /// Padding to 32 bytes.
    pub _pad1: u32,
    /// Padding to 32 bytes.
    pub _pad2: u32,
}

/// The operands of one RMSNorm backward (see [`rmsnorm_backward`]).
#[derive(Debug, Clone, Copy)]
pub struct RmsNormBackwardOp<'a> {
    /// The forward's input, `[x_row0 + rows, d]` f32 (d = `weight.numel()`): rows `x_row0..`.
    pub x: &'a GpuTensor,
    /// First row of x and of dx that the op covers (the forward's [`crate::kernels::rmsnorm::RmsNormOp::x_row0`]:
    /// a norm over the last rows only); dy is packed from row 0.
    pub x_row0: usize,
    /// Gradient of the loss w.r.t. the forward's output, `[rows, d]` f32.
    pub dy: &'a GpuTensor,
    /// The norm's weight, `[d]` f32.
    pub weight: &'a GpuTensor,
    /// Rows; at least 1.
    pub rows: usize,
    /// Gradient w.r.t. x, laid out like x (`[x_row0 + rows, d]`, rows `x_row0..` written or
    /// added to as `accumulate_dx` says, the others untouched).
    pub dx: &'a GpuTensor,
    /// Add to dx (the residual stream's gradient, which already holds the skip path's part)
    /// instead of overwriting it.
    pub accumulate_dx: bool,
    /// Gradient w.r.t. the weight, `[d]` f32, summed over the rows; None for a frozen norm (the
    /// model's), Some for a trained one (the router's).
    pub dw: Option<&'a GpuTensor>,
    /// Add to dw (several sequences of a batch) instead of overwriting it.
    pub accumulate_dw: bool,
    /// The forward's epsilon.
    pub eps: f32,
}

/// Prepares the RMSNorm backward: the dispatch `{label}.dx` (one invocation per row: dx and the
/// row's `s_r` into a `[rows]` scratch buffer the dispatches own) and, when `op.dw` is given,
/// `{label}.dw` (one invocation per column, reading the scratch). Record them in this order.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows or d is 0, an operand is not f32 or
/// too small, or `rows * d` does not fit in u32; a buffer error for the scratch.
pub fn rmsnorm_backward(ctx: &GpuContext, label: &str, op: &RmsNormBackwardOp) -> Result<Vec<Dispatch>, GpuError> {
    let RmsNormBackwardOp { x, x_row0, dy, weight, rows, dx, accumulate_dx, dw, accumulate_dw, eps } = *op;
    let dim = weight.numel();
    check_rows(label, rows)?;
    if dim == 0 {
        return Err(invalid(label, "weight must have at least 1 value (the row width d)"));
    }
    let n = rows.checked_mul(dim).ok_or_else(|| invalid(label, format!("{rows} x {dim} elements overflow")))?;
    let x_end = x_row0.checked_add(rows).and_then(|r| r.checked_mul(dim)).ok_or_else(|| invalid(label, "x_row0 + rows overflows"))?;
    check_u32(label, x_end, "x elements")?;
    check_f32(label, weight, dim, "weight")?;
    check_f32(label, x, x_end, "x")?;
    check_f32(label, dy, n, "dy")?;
    check_f32(label, dx, x_end, "dx")?;
    if let Some(dw) = dw {
        check_f32(label, dw, dim, "dw")?;
    }
    let params = RmsNormBackwardParams {
        rows: rows as u32,
        dim: dim as u32,
        eps,
        accumulate_dx: accumulate_dx as u32,
        accumulate_dw: accumulate_dw as u32,
        x_row0: x_row0 as u32,
        _pad1: 0,
        _pad2: 0,
    };
    let u = uniform(ctx, label, &params);
    let rstd = GpuTensor::zeros(ctx, &format!("{label}.rstd"), DType::F32, &[rows])?;
    let pipeline = ctx.pipeline(&ShaderVariant::new("rmsnorm_backward", SOURCE, "rmsnorm_backward_dx"))?;
    let mut dispatches = vec![Dispatch::new(
        ctx,
        &pipeline,
        format!("{label}.dx"),
        &[
            u.as_entire_binding(),
            x.buffer.as_entire_binding(),
            dy.buffer.as_entire_binding(),
            rstd.buffer.as_entire_binding(),
            dx.buffer.as_entire_binding(),
            weight.buffer.as_entire_binding(),
        ],
        grid((rows as u32).div_ceil(64)),
        Cost { flops: (10 * n) as u64, bytes: (4 * (4 * n + dim + rows)) as u64 },
    )];
    if let Some(dw) = dw {
        let pipeline = ctx.pipeline(&ShaderVariant::new("rmsnorm_backward", SOURCE, "rmsnorm_backward_dw"))?;
        dispatches.push(Dispatch::new(
            ctx,
            &pipeline,
            format!("{label}.dw"),
            &[
                u.as_entire_binding(),
                x.buffer.as_entire_binding(),
                dy.buffer.as_entire_binding(),
                rstd.buffer.as_entire_binding(),
                dw.buffer.as_entire_binding(),
            ],
            grid((dim as u32).div_ceil(64)),
            Cost { flops: (3 * n) as u64, bytes: (4 * (2 * n + rows * dim.div_ceil(64) + 2 * dim)) as u64 },
        ));
    }
    Ok(dispatches)
}

/// CPU reference of the forward in f64: `x` `[rows, d]`, `w` `[d]`, the result `[rows, d]`.
pub fn rmsnorm_f64(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let dim = w.len();
    let mut y = Vec::with_capacity(x.len());
    for xr in x.chunks(dim) {
        let s = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
        y.extend(xr.iter().zip(w).map(|(v, wi)| v * s * wi));
    }
    y
}

/// CPU reference of the backward in f64 (the module's formulas): `(dx [rows, d], dw [d])` from
/// `x`, `dy` `[rows, d]` and `w` `[d]`.
pub fn rmsnorm_backward_ref(x: &[f64], w: &[f64], dy: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
    let dim = w.len();
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0.0; dim];
    for (xr, dyr) in x.chunks(dim).zip(dy.chunks(dim)) {
        let s = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
        let dot: f64 = (0..dim).map(|i| dyr[i] * w[i] * xr[i]).sum();
        let c = s * s * s * dot / dim as f64;
        dx.extend((0..dim).map(|i| s * dyr[i] * w[i] - c * xr[i]));
        for i in 0..dim {
            dw[i] += dyr[i] * xr[i] * s;
        }
    }
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::testing::{assert_close, assert_close_f64, central_differences, random_vec, to_f64};

    /// L = Σ dy ⊙ y(x, w): its gradients are the backward's dx and dw.
    fn loss(x: &[f64], w: &[f64], dy: &[f64], eps: f64) -> f64 {
        rmsnorm_f64(x, w, eps).iter().zip(dy).map(|(y, d)| y * d).sum()
    }

    #[test]
    fn rmsnorm_backward_ref_matches_finite_differences() {
        for (rows, dim, eps) in [(3, 37, 1e-5), (1, 5, 1e-6), (4, 9, 0.5)] {
            let x = to_f64(&random_vec(rows * dim, 1));
            let w = to_f64(&random_vec(dim, 2));
            let dy = to_f64(&random_vec(rows * dim, 3));
            let (dx, dw) = rmsnorm_backward_ref(&x, &w, &dy, eps);
            let num_dx = central_differences(&x, 1e-5, |x| loss(x, &w, &dy, eps));
            let num_dw = central_differences(&w, 1e-5, |w| loss(&x, w, &dy, eps));
            assert_close_f64(&dx, &num_dx, 1e-7, &format!("dx [{rows}, {dim}]"));
            assert_close_f64(&dw, &num_dw, 1e-7, &format!("dw [{rows}, {dim}]"));
        }
    }

    fn run_gpu(rows: usize, dim: usize, accumulate: bool, with_dw: bool, seed: u64) {
        let ctx = test_context();
        let eps = 1e-5f32;
        let (x, w, dy) = (random_vec(rows * dim, seed), random_vec(dim, seed + 1), random_vec(rows * dim, seed + 2));
        let (dx0, dw0) = (random_vec(rows * dim, seed + 3), random_vec(dim, seed + 4));
        let t = |name: &str, v: &[f32]| GpuTensor::from_f32(&ctx, name, &[v.len()], v).unwrap();
        let (gx, gw, gdy, gdx, gdw) = (t("x", &x), t("w", &w), t("dy", &dy), t("dx", &dx0), t("dw", &dw0));
        let op = RmsNormBackwardOp {
            x: &gx,
            x_row0: 0,
            dy: &gdy,
            weight: &gw,
            rows,
            dx: &gdx,
            accumulate_dx: accumulate,
            dw: with_dw.then_some(&gdw),
            accumulate_dw: accumulate,
            eps,
        };
        let ds = rmsnorm_backward(&ctx, "bwd", &op).unwrap();
        assert_eq!(ds.len(), 1 + with_dw as usize);
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let (dx, dw) = rmsnorm_backward_ref(&to_f64(&x), &to_f64(&w), &to_f64(&dy), eps as f64);
        let plus = |base: &[f32], g: Vec<f64>| -> Vec<f32> {
            g.iter().zip(base).map(|(g, b)| (g + if accumulate { *b as f64 } else { 0.0 }) as f32).collect()
        };
        let what = format!("[{rows}, {dim}] accumulate {accumulate}");
        assert_close(&gdx.read_f32(&ctx).unwrap(), &plus(&dx0, dx), 1e-5, 1e-4, &format!("dx {what}"));
        let want_dw = if with_dw { plus(&dw0, dw) } else { dw0 };
        assert_close(&gdw.read_f32(&ctx).unwrap(), &want_dw, 1e-4, 1e-4, &format!("dw {what}"));
    }

    #[test]
    fn rmsnorm_backward_matches_reference() {
        for (i, (rows, dim)) in [(3, 37), (1, 7), (7, 257), (65, 576), (130, 13)].into_iter().enumerate() {
            run_gpu(rows, dim, false, true, 10 * i as u64);
            run_gpu(rows, dim, true, true, 10 * i as u64 + 5);
        }
        // A frozen norm: dw untouched.
        run_gpu(5, 33, false, false, 90);
    }

    #[test]
    fn rmsnorm_backward_from_a_row_offset_leaves_earlier_rows_alone() {
        let ctx = test_context();
        let (row0, rows, dim, eps) = (5, 3, 37, 1e-5f32);
        let (x, w, dy, dx0) =
            (random_vec((row0 + rows) * dim, 1), random_vec(dim, 2), random_vec(rows * dim, 3), random_vec((row0 + rows) * dim, 4));
        let t = |name: &str, v: &[f32]| GpuTensor::from_f32(&ctx, name, &[v.len()], v).unwrap();
        let (gx, gw, gdy, gdx, gdw) = (t("x", &x), t("w", &w), t("dy", &dy), t("dx", &dx0), t("dw", &[0.0; 37]));
        let op = RmsNormBackwardOp {
            x: &gx,
            x_row0: row0,
            dy: &gdy,
            weight: &gw,
            rows,
            dx: &gdx,
            accumulate_dx: false,
            dw: Some(&gdw),
            accumulate_dw: false,
            eps,
        };
        ctx.run("test", &rmsnorm_backward(&ctx, "bwd", &op).unwrap().iter().collect::<Vec<_>>()).unwrap();
        let (dx, dw) = rmsnorm_backward_ref(&to_f64(&x[row0 * dim..]), &to_f64(&w), &to_f64(&dy), eps as f64);
        let got = gdx.read_f32(&ctx).unwrap();
        assert_eq!(&got[..row0 * dim], &dx0[..row0 * dim], "rows before x_row0 changed");
        assert_close(&got[row0 * dim..], &dx.iter().map(|&v| v as f32).collect::<Vec<_>>(), 1e-5, 1e-4, "dx from x_row0");
        assert_close(&gdw.read_f32(&ctx).unwrap(), &dw.iter().map(|&v| v as f32).collect::<Vec<_>>(), 1e-4, 1e-4, "dw from x_row0");
        // x (and dx) must hold x_row0 + rows rows.
        let err = rmsnorm_backward(&ctx, "bwd", &RmsNormBackwardOp { x_row0: row0 + 1, ..op }).err().unwrap().to_string();
        assert!(err.contains("bwd: ") && err.contains("x ("), "{err}");
    }

    #[test]
    fn rmsnorm_backward_rejects_bad_operands() {
        let ctx = test_context();
        let z = |n: usize| GpuTensor::zeros(&ctx, "t", DType::F32, &[n]).unwrap();
        let (x, dy, dx, w, dw, small) = (z(12), z(12), z(12), z(4), z(4), z(3));
        let ids = GpuTensor::zeros(&ctx, "ids", DType::U32, &[12]).unwrap();
        let op = RmsNormBackwardOp {
            x: &x,
            x_row0: 0,
            dy: &dy,
            weight: &w,
            rows: 3,
            dx: &dx,
            accumulate_dx: false,
            dw: Some(&dw),
            accumulate_dw: false,
            eps: 1e-5,
        };
        assert!(rmsnorm_backward(&ctx, "n.bwd", &op).is_ok());
        for (bad, what) in [
            (RmsNormBackwardOp { rows: 0, ..op }, "rows"),
            (RmsNormBackwardOp { rows: 4, ..op }, "x ("),
            (RmsNormBackwardOp { dy: &ids, ..op }, "dy ("),
            (RmsNormBackwardOp { dw: Some(&small), ..op }, "dw ("),
        ] {
            let err = rmsnorm_backward(&ctx, "n.bwd", &bad).err().unwrap().to_string();
            assert!(err.contains("n.bwd: ") && err.contains(what), "{err}");
        }
    }
}
