//! The backward form of the linear product, [`LinearForm::XW`]: `y[t, y_col0 + k] (+)= scale ·
//! sum_n x[t, n] · W[n, k]` with W `[N, K]` (Hugging Face `[out, in]`) read as stored. With x =
//! dY and y = dX it is the input gradient `dX = dY · W` of the forward `Y = X · Wᵀ` (and LoRA's
//! `da = s · dY · B`). Reached through [`crate::kernels::matmul::matmul`] and
//! [`crate::kernels::matvec::matvec`] with an op built by [`LinearOp::new_xw`]; one kernel for
//! every weight kind the forward reads (f32, f16 and its read modes, quantised blocks), since a
//! backward pass runs once per training step, not per decoded token.

use bytemuck::{Pod, Zeroable};

use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, ShaderVariant, WeightKind};
use crate::kernels::linear::{FLAG_ACCUMULATE, LinearForm, LinearOp};

const SOURCE: &str = include_str!("../../shaders/matmul_xw.wgsl");

/// Workgroup size of `matmul_xw`.
pub const XW_WG: u32 = 64;
/// Rows of x per invocation of `matmul_xw` (each invocation computes `XW_TM` x 4 outputs).
pub const XW_TM: u32 = 4;

/// Uniform of `shaders/matmul_xw.wgsl` (`struct MatmulXwParams` there, same fields in the same
/// order), one per chunk of W.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatmulXwParams {
    /// Rows of x and y (tokens) T.
    pub t: u32,
    /// Rows of W in this chunk: the reduction length of this dispatch.
    pub n: u32,
    /// Columns of W (`w.cols`): outputs per row of y.
    pub k: u32,
    /// Index of the chunk's first row in W: the first column of x it reads.
    pub row0: u32,
    /// Row stride of x in elements (`w.rows`, the whole matrix's N).
    pub x_stride: u32,
    /// Row stride of y in elements.
    pub y_stride: u32,
    /// First output column of y.
    pub y_col0: u32,
    /// Bits of [`crate::kernels::linear`]: `FLAG_ACCUMULATE` (always set after the first
    /// chunk), `FLAG_SCALE`.
    pub flags: u32,
    /// Multiplies the product when `flags` has `FLAG_SCALE` (before accumulation).
    pub scale: f32,
    /// Padding to 48 bytes.
    pub _pad0: u32,
    /// Padding to 48 bytes.
    pub _pad1: u32,
    /// Padding to 48 bytes.
    pub _pad2: u32,
}

/// Prepares the backward product `op` (form [`LinearForm::XW`]: `y[t, y_col0 + k] (+)= scale ·
/// sum_n x[t, n] · W[n, k]` for `t < op.rows`, `k < K`): one dispatch per chunk of W, named
/// `label` (`label[row0]` when W is split). The first chunk overwrites or accumulates as
/// `op.accumulate` says; every later chunk adds its rows' share into y, so the result is the
/// same whatever the split.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when [`LinearOp::check`] rejects the op or its
/// form is not [`LinearForm::XW`]; a pipeline build error as [`GpuError::Device`].
pub(crate) fn matmul_xw(ctx: &GpuContext, label: &str, op: &LinearOp) -> Result<Vec<Dispatch>, GpuError> {
    if op.form != LinearForm::XW {
        return Err(crate::kernels::checks::invalid(label, "matmul_xw computes the x · W form only"));
    }
    let kind = op.check(ctx, label)?;
    let (n_total, k) = op.k_n();
    let rows = op.rows;
    // x read four values of n per load where every chunk's first column of x is on a group of 4.
    let xvec = n_total.is_multiple_of(4) && op.w.chunks.iter().all(|c| c.row0.is_multiple_of(4));
    let pipeline = |kind: WeightKind| {
        let shader = ShaderVariant::new("matmul_xw", SOURCE, "matmul_xw")
            .weights("X_DECL", WeightKind::F32, 1, "x")
            .weights("W_DECL", kind, 2, "w")
            .define("ALIGNED", k.is_multiple_of(4))
            .define("XVEC", xvec)
            .define("WG", XW_WG);
        ctx.pipeline(&shader)
    };
    let flags = op.flags();
    let y_stride = op.y_row_stride();
    op.chunk_dispatches(ctx, label, kind, pipeline, |c, _| {
        let params = MatmulXwParams {
            t: rows as u32,
            n: c.rows as u32,
            k: k as u32,
            row0: c.row0 as u32,
            x_stride: n_total as u32,
            y_stride: y_stride as u32,
            y_col0: op.y_col0 as u32,
            flags: if c.row0 == 0 { flags } else { flags | FLAG_ACCUMULATE },
            scale: op.scale.unwrap_or(1.0),
            ..Zeroable::zeroed()
        };
        let invocations = (rows as u32).div_ceil(XW_TM) * (k as u32).div_ceil(4);
        let outputs = (rows * k) as u64;
        let accumulates = op.accumulate || c.row0 > 0;
        let cost = Cost {
            flops: 2 * outputs * c.rows as u64,
            bytes: c.tensor.byte_len() as u64 + 4 * (rows * c.rows) as u64 + outputs * if accumulates { 8 } else { 4 },
        };
        (params, grid(invocations.div_ceil(XW_WG)), cost)
    })
}

/// CPU reference of the backward form: `[rows, k]` = x (`[rows, n]`) times w (`[n, k]`), in
/// f64. With x = dY it is the input gradient `dX = dY · W` of `Y = X · Wᵀ`
/// ([`crate::kernels::matmul::matmul_ref`]): `∂/∂X[t, k] sum_{t', j} dY[t', j] · sum_k' X[t', k']
/// · W[j, k'] = sum_j dY[t, j] · W[j, k]`.
pub fn matmul_xw_ref(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0; rows * k];
    for t in 0..rows {
        let mut acc = vec![0.0f64; k];
        for j in 0..n {
            let xv = x[t * n + j] as f64;
            for (a, &wv) in acc.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                *a += xv * wv as f64;
            }
        }
        for (o, a) in y[t * k..(t + 1) * k].iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, GpuMatrix, GpuOptions, GpuTensor, MatrixPart, test_context};
    use crate::kernels::matmul::{MatmulVariant, matmul};
    use crate::kernels::matvec::{MatvecVariant, matvec};
    use crate::kernels::testing::{assert_close, random_blocks, random_vec, round_f16, weight_kinds};
    use crate::model::QuantType;

    /// Options of one check: y from column `y_col0` of rows `y_col0 + K + y_extra` wide.
    #[derive(Clone, Copy)]
    struct Opts {
        accumulate: bool,
        scale: Option<f32>,
        y_col0: usize,
        y_extra: usize,
    }

    const PLAIN: Opts = Opts { accumulate: false, scale: None, y_col0: 0, y_extra: 0 };

    /// `y (+)= scale · x · W` on the GPU (through `matmul`, or `matvec` for one row) against
    /// [`matmul_xw_ref`] of `wv`, the values W holds (after f16 rounding or dequantisation).
    fn check(ctx: &GpuContext, w: &GpuMatrix, wv: &[f32], kind: Option<WeightKind>, t: usize, o: Opts, what: &str) {
        let (n, k) = (w.rows, w.cols);
        let seed = (t * 1000 + n * 31 + k) as u64;
        let x = random_vec(t * n, seed);
        let stride = o.y_col0 + k + o.y_extra;
        let y0 = random_vec(t * stride, seed + 1);
        let gx = GpuTensor::from_f32(ctx, "dy", &[t, n], &x).unwrap();
        let gy = GpuTensor::from_f32(ctx, "dx", &[t, stride], &y0).unwrap();
        let mut op = LinearOp::new_xw(&gx, t, w, &gy).y_stride(stride).y_col0(o.y_col0).accumulate(o.accumulate);
        if let Some(s) = o.scale {
            op = op.scale(s);
        }
        if let Some(kind) = kind {
            op = op.kind(kind);
        }
        let ds = if t == 1 {
            matvec(ctx, "dx", &op, MatvecVariant::Rows).unwrap()
        } else {
            matmul(ctx, "dx", &op, MatmulVariant::RegBlock).unwrap()
        };
        assert_eq!(ds.len(), w.chunks.len());
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let r = matmul_xw_ref(&x, t, wv, n, k);
        let s = o.scale.unwrap_or(1.0);
        let mut want = y0.clone();
        for row in 0..t {
            for c in 0..k {
                let i = row * stride + o.y_col0 + c;
                want[i] = if o.accumulate { want[i] + s * r[row * k + c] } else { s * r[row * k + c] };
            }
        }
        let wmax = wv.iter().fold(0f32, |a, v| a.max(v.abs()));
        let atol = 4e-5 * (n as f32).sqrt() * wmax.max(1.0);
        assert_close(&gy.read_f32(ctx).unwrap(), &want, atol, 1e-5, &format!("{what} t={t} n={n} k={k}"));
    }

    #[test]
    fn xw_matches_reference_every_dense_kind() {
        let ctx = test_context();
        for kind in weight_kinds(&ctx) {
            for (t, n, k) in [(3, 41, 37), (17, 41, 576), (5, 1, 1), (1, 41, 37), (1, 9, 576), (70, 13, 20), (6, 44, 37), (17, 64, 576)] {
                let mut wv = random_vec(n * k, (n * k) as u64);
                let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, kind.dtype()).unwrap();
                if kind.dtype() == DType::F16 {
                    wv = round_f16(&wv);
                }
                check(&ctx, &w, &wv, Some(kind), t, PLAIN, &format!("xw {}", kind.name()));
                let o = Opts { accumulate: true, scale: Some(-1.5), y_col0: 3, y_extra: 2 };
                check(&ctx, &w, &wv, Some(kind), t, o, &format!("xw {} acc scale strided", kind.name()));
            }
        }
    }

    #[test]
    fn xw_matches_dequantised_reference_every_block_type() {
        let ctx = test_context();
        for q in QuantType::ALL {
            let k = if q.block_elems() == 256 { 768 } else { 576 };
            let blocks = random_blocks(q, 44, k, 5);
            let wv = blocks.dequantize().unwrap();
            let w = GpuMatrix::upload_parts(&ctx, "w", k, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
            for t in [1, 3, 17] {
                check(&ctx, &w, &wv, Some(WeightKind::Quant(q)), t, PLAIN, &format!("xw {q}"));
                let o = Opts { accumulate: true, scale: Some(0.75), y_col0: 1, y_extra: 0 };
                check(&ctx, &w, &wv, None, t, o, &format!("xw {q} acc scale strided"));
            }
        }
    }

    /// W split into row chunks (a small binding limit): the reduction runs over the chunks, the
    /// first overwriting (or accumulating) and the rest adding; also a stack of block types
    /// and f16.
    #[test]
    fn xw_sums_over_chunks() {
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        for (kind, n) in [(WeightKind::F32, 301), (WeightKind::F16Packed, 301), (WeightKind::F32, 300), (WeightKind::F16Packed, 300)] {
            let k = 36;
            let mut wv = random_vec(n * k, 9);
            let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, kind.dtype()).unwrap();
            assert!(w.chunks.len() > 1);
            if kind.dtype() == DType::F16 {
                wv = round_f16(&wv);
            }
            for o in [PLAIN, Opts { accumulate: true, scale: Some(2.0), y_col0: 2, y_extra: 1 }] {
                check(&ctx, &w, &wv, Some(kind), 5, o, &format!("xw split {}", kind.name()));
            }
        }
        let k = 256;
        let a = random_blocks(QuantType::Q4_K, 40, k, 1);
        let b = random_blocks(QuantType::Q6_K, 24, k, 2);
        let c = random_vec(9 * k, 3);
        let parts = [MatrixPart::Blocks(&a), MatrixPart::Blocks(&b), MatrixPart::Dense { rows: 9, data: &c }];
        let w = GpuMatrix::upload_parts(&ctx, "w", k, &parts, DType::F16).unwrap();
        assert!(w.chunks.len() > 3, "{} chunks", w.chunks.len());
        let mut wv = a.dequantize().unwrap();
        wv.extend(b.dequantize().unwrap());
        wv.extend(round_f16(&c));
        check(&ctx, &w, &wv, None, 3, PLAIN, "xw mixed stack");
        check(&ctx, &w, &wv, None, 1, Opts { accumulate: true, scale: None, y_col0: 0, y_extra: 0 }, "xw mixed stack acc");
    }

    #[test]
    fn xw_rejects_bad_operands() {
        let ctx = test_context();
        let w = GpuMatrix::upload(&ctx, "w", 8, 16, &random_vec(128, 1), DType::F32).unwrap();
        let dy = GpuTensor::from_f32(&ctx, "dy", &[2, 8], &random_vec(16, 2)).unwrap();
        let dx = GpuTensor::zeros(&ctx, "dx", DType::F32, &[2, 16]).unwrap();
        let bias = GpuTensor::zeros(&ctx, "b", DType::F32, &[16]).unwrap();
        let err = |op: LinearOp| matmul(&ctx, "grad/dx", &op, MatmulVariant::RegBlock).unwrap_err().to_string();
        assert!(err(LinearOp::new_xw(&dy, 2, &w, &dx).bias(Some(&bias))).contains("grad/dx: the x · W form takes no bias"));
        assert!(err(LinearOp::new_xw(&dy, 3, &w, &dx)).contains("x has 16 elements, needs 3 x 8"));
        assert!(err(LinearOp::new_xw(&dy, 2, &w, &dx).y_col0(1)).contains("grad/dx: y has 32 elements"));
        assert!(err(LinearOp::new_xw(&dy, 0, &w, &dx)).contains("empty product"));
        assert!(matvec(&ctx, "grad/dx", &LinearOp::new_xw(&dy, 2, &w, &dx), MatvecVariant::Rows).is_err());
        assert!(matmul_xw(&ctx, "grad/dx", &LinearOp::new(&dx, 2, &w, &dy)).unwrap_err().to_string().contains("x · W form only"));
    }
}
