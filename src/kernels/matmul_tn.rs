//! Transpose-first product of two f32 activations, `C (+)= scale · Pᵀ · Q` with the reduction
//! over their T rows (tokens): LoRA's weight gradients. For the unmerged adapter's
//! `a = x · Aᵀ` `[T, r]` and `y += s · a · Bᵀ` `[T, N]`: `dB` `[N, r]` = `s · dYᵀ · a` and `dA`
//! `[r, K]` = `daᵀ · x` with `da = s · dY · B` (a [`crate::kernels::linear::LinearForm::XW`]
//! product).
//!
//! A dedicated kernel rather than a [`crate::kernels::linear::LinearForm`]: a `LinearOp` reads a
//! weight matrix (a [`crate::gpu::GpuMatrix`] in row chunks, of a [`crate::gpu::WeightKind`])
//! against activations and reduces over W's columns or rows; here both operands are f32
//! activation buffers (the session's `lora.a`, a slice of `dY`) read through column offsets and
//! row strides, and the reduction runs over tokens, the row index of both. Column offsets let a
//! caller take one block of the stacked q/k/v (or gate/up) adapter at a time: the diagonal
//! block `j` of the block-diagonal B gets `s · dY[:, cols of j]ᵀ · a[:, j r .. (j + 1) r]`.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, check_u32, invalid};
use crate::kernels::linear::{FLAG_ACCUMULATE, FLAG_SCALE};

const SOURCE: &str = include_str!("../../shaders/matmul_tn.wgsl");

/// Workgroup size of `matmul_tn` (each invocation computes a 4 x 4 block of C).
pub const TN_WG: u32 = 64;

/// Uniform of `shaders/matmul_tn.wgsl` (`struct MatmulTnParams` there, same fields in the same
/// order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatmulTnParams {
    /// Rows of P and Q (tokens): the reduction length T.
    pub t: u32,
    /// Columns of P read: rows of C.
    pub m: u32,
    /// Columns of Q read: columns of C.
    pub n: u32,
    /// Row stride of P in elements.
    pub p_stride: u32,
    /// First column of P read.
    pub p_col0: u32,
    /// Row stride of Q in elements.
    pub q_stride: u32,
    /// First column of Q read.
    pub q_col0: u32,
    /// Row stride of C in elements.
    pub c_stride: u32,
    /// Element of C where `C[0, 0]` is.
    pub c_offset: u32,
    /// Bits of [`crate::kernels::linear`]: `FLAG_ACCUMULATE`, `FLAG_SCALE`.
    pub flags: u32,
    /// Multiplies the product when `flags` has `FLAG_SCALE` (before accumulation).
    pub scale: f32,
    /// Padding to 48 bytes.
    pub _pad0: u32,
}

/// One product `C[m, n] (+)= scale · sum_t P[t, m] · Q[t, n]` for `m < M`, `n < N`, `t < T`,
/// with every operand and option named: `P[t, m]` is `p[t * p_stride + p_col0 + m]`, `Q[t, n]`
/// is `q[t * q_stride + q_col0 + n]` and `C[m, n]` is `c[c_offset + m * c_stride + n]`, all f32.
///
/// Build it with [`MatmulTnOp::new`] (packed operands, overwrite, no scale) and the builder
/// methods, then pass it to [`matmul_tn`].
#[derive(Debug, Clone, Copy)]
pub struct MatmulTnOp<'a> {
    /// P, `[T, p_stride]` f32 (e.g. dY, or LoRA's `da`).
    pub p: &'a GpuTensor,
    /// Row stride of P in elements; at least `p_col0 + M`.
    pub p_stride: usize,
    /// First column of P read.
    pub p_col0: usize,
    /// Q, `[T, q_stride]` f32 (e.g. LoRA's `a`, or the layer input x).
    pub q: &'a GpuTensor,
    /// Row stride of Q in elements; at least `q_col0 + N`.
    pub q_stride: usize,
    /// First column of Q read.
    pub q_col0: usize,
    /// Rows of P and Q (tokens) T: the reduction length; at least 1.
    pub rows: usize,
    /// Rows of C (columns of P read) M.
    pub m: usize,
    /// Columns of C (columns of Q read) N.
    pub n: usize,
    /// The output, f32: `C[m, n]` is `c[c_offset + m * c_stride + n]`.
    pub c: &'a GpuTensor,
    /// Row stride of C in elements; at least N.
    pub c_stride: usize,
    /// Element of c where `C[0, 0]` is (a block of a stacked gradient).
    pub c_offset: usize,
    /// Add into C instead of overwriting it (gradients summed over several sequences or blocks).
    pub accumulate: bool,
    /// Multiply the product by this before accumulation (LoRA's `s`).
    pub scale: Option<f32>,
}

impl<'a> MatmulTnOp<'a> {
    /// `C = Pᵀ · Q` over `rows` tokens with P `[rows, m]`, Q `[rows, n]` and C `[m, n]`, all
    /// packed, overwriting C, no scale.
    pub fn new(p: &'a GpuTensor, q: &'a GpuTensor, rows: usize, m: usize, n: usize, c: &'a GpuTensor) -> MatmulTnOp<'a> {
        MatmulTnOp {
            p,
            p_stride: m,
            p_col0: 0,
            q,
            q_stride: n,
            q_col0: 0,
            rows,
            m,
            n,
            c,
            c_stride: n,
            c_offset: 0,
            accumulate: false,
            scale: None,
        }
    }

    /// Reads P's columns `col0 .. col0 + M` of rows `stride` elements apart.
    pub fn p_layout(self, stride: usize, col0: usize) -> Self {
        MatmulTnOp { p_stride: stride, p_col0: col0, ..self }
    }

    /// Reads Q's columns `col0 .. col0 + N` of rows `stride` elements apart.
    pub fn q_layout(self, stride: usize, col0: usize) -> Self {
        MatmulTnOp { q_stride: stride, q_col0: col0, ..self }
    }

    /// Writes C's rows `stride` elements apart, `C[0, 0]` at element `offset` of c.
    pub fn c_layout(self, stride: usize, offset: usize) -> Self {
        MatmulTnOp { c_stride: stride, c_offset: offset, ..self }
    }

    /// Adds into C when `accumulate` is true.
    pub fn accumulate(self, accumulate: bool) -> Self {
        MatmulTnOp { accumulate, ..self }
    }

    /// Multiplies the product by `scale` (before accumulation).
    pub fn scale(self, scale: f32) -> Self {
        MatmulTnOp { scale: Some(scale), ..self }
    }

    /// Checks every operand of the op `label`.
    ///
    /// # Errors
    /// [`GpuError::InvalidArgument`] naming `label` when: the product is empty (T, M or N of 0);
    /// a stride is below its column offset plus the columns read (C: below N); P, Q or C is not
    /// f32 or too small for its rows; an index does not fit in u32.
    pub fn check(&self, label: &str) -> Result<(), GpuError> {
        let (t, m, n) = (self.rows, self.m, self.n);
        if t == 0 || m == 0 || n == 0 {
            return Err(invalid(label, format!("empty product: [{t}, {m}]ᵀ times [{t}, {n}]")));
        }
        for (what, stride, col0, cols) in
            [("P", self.p_stride, self.p_col0, m), ("Q", self.q_stride, self.q_col0, n), ("C", self.c_stride, 0, n)]
        {
            if stride < col0 + cols {
                return Err(invalid(label, format!("{what} stride {stride} < column offset {col0} + {cols} columns")));
            }
        }
        let p_end = (t - 1) * self.p_stride + self.p_col0 + m;
        let q_end = (t - 1) * self.q_stride + self.q_col0 + n;
        let c_end = self.c_offset + (m - 1) * self.c_stride + n;
        check_f32(label, self.p, p_end, "P")?;
        check_f32(label, self.q, q_end, "Q")?;
        check_f32(label, self.c, c_end, "C")?;
        for (what, end) in [("P", p_end), ("Q", q_end), ("C", c_end)] {
            check_u32(label, end, what)?;
        }
        Ok(())
    }
}

/// Prepares `op`: `C[m, n] (+)= scale · sum_t P[t, m] · Q[t, n]` (f32, accumulated in f32), one
/// dispatch named `label`.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when [`MatmulTnOp::check`] rejects the op; a
/// pipeline build error as [`GpuError::Device`].
pub fn matmul_tn(ctx: &GpuContext, label: &str, op: &MatmulTnOp) -> Result<Dispatch, GpuError> {
    op.check(label)?;
    let pipeline = ctx.pipeline(&ShaderVariant::new("matmul_tn", SOURCE, "matmul_tn").define("WG", TN_WG))?;
    let flags = (if op.accumulate { FLAG_ACCUMULATE } else { 0 }) | if op.scale.is_some() { FLAG_SCALE } else { 0 };
    let params = MatmulTnParams {
        t: op.rows as u32,
        m: op.m as u32,
        n: op.n as u32,
        p_stride: op.p_stride as u32,
        p_col0: op.p_col0 as u32,
        q_stride: op.q_stride as u32,
        q_col0: op.q_col0 as u32,
        c_stride: op.c_stride as u32,
        c_offset: op.c_offset as u32,
        flags,
        scale: op.scale.unwrap_or(1.0),
        _pad0: 0,
    };
    let u = uniform(ctx, label, &params);
    let outputs = (op.m * op.n) as u64;
    let cost = Cost {
        flops: 2 * outputs * op.rows as u64,
        bytes: 4 * (op.rows * (op.m + op.n)) as u64 + outputs * if op.accumulate { 8 } else { 4 },
    };
    let invocations = (op.m as u32).div_ceil(4) * (op.n as u32).div_ceil(4);
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), op.p.buffer.as_entire_binding(), op.q.buffer.as_entire_binding(), op.c.buffer.as_entire_binding()],
        grid(invocations.div_ceil(TN_WG)),
        cost,
    ))
}

/// CPU reference: `[m, n]` = pᵀ (p `[rows, m]`) times q (`[rows, n]`), both packed, in f64.
/// LoRA's `dB = s · dYᵀ · a` is `s ·` this of (dY, a) and `dA = daᵀ · x` this of (da, x):
/// `∂/∂B[j, i] sum_{t, j'} dY[t, j'] · s · sum_i' a[t, i'] · B[j', i'] = s · sum_t dY[t, j] ·
/// a[t, i]`, and likewise for A through `a = x · Aᵀ`.
pub fn matmul_tn_ref(p: &[f32], q: &[f32], rows: usize, m: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f64; m * n];
    for t in 0..rows {
        let qr = &q[t * n..(t + 1) * n];
        for (i, &pv) in p[t * m..(t + 1) * m].iter().enumerate() {
            for (o, &qv) in c[i * n..(i + 1) * n].iter_mut().zip(qr) {
                *o += pv as f64 * qv as f64;
            }
        }
    }
    c.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, test_context};
    use crate::kernels::testing::{assert_close, random_vec};

    /// One product with P's columns `p_col0..` of rows `p_extra` wider than needed (likewise Q),
    /// C at `c_offset` with rows `c_extra` wider, against [`matmul_tn_ref`] of the packed slices.
    #[allow(clippy::too_many_arguments)]
    fn check(
        t: usize,
        m: usize,
        n: usize,
        p_col0: usize,
        q_col0: usize,
        c_offset: usize,
        extra: usize,
        accumulate: bool,
        scale: Option<f32>,
    ) {
        let ctx = test_context();
        let (ps, qs, cs) = (p_col0 + m + extra, q_col0 + n + extra, n + extra);
        let seed = (t * 100 + m * 10 + n) as u64;
        let p = random_vec(t * ps, seed);
        let q = random_vec(t * qs, seed + 1);
        let c0 = random_vec(c_offset + m * cs, seed + 2);
        let gp = GpuTensor::from_f32(&ctx, "p", &[t, ps], &p).unwrap();
        let gq = GpuTensor::from_f32(&ctx, "q", &[t, qs], &q).unwrap();
        let gc = GpuTensor::from_f32(&ctx, "c", &[c0.len()], &c0).unwrap();
        let mut op =
            MatmulTnOp::new(&gp, &gq, t, m, n, &gc).p_layout(ps, p_col0).q_layout(qs, q_col0).c_layout(cs, c_offset).accumulate(accumulate);
        if let Some(s) = scale {
            op = op.scale(s);
        }
        let d = matmul_tn(&ctx, "tn", &op).unwrap();
        ctx.run("test", &[&d]).unwrap();
        let slice = |v: &[f32], stride: usize, col0: usize, cols: usize| -> Vec<f32> {
            (0..t).flat_map(|r| v[r * stride + col0..r * stride + col0 + cols].to_vec()).collect()
        };
        let r = matmul_tn_ref(&slice(&p, ps, p_col0, m), &slice(&q, qs, q_col0, n), t, m, n);
        let s = scale.unwrap_or(1.0);
        let mut want = c0.clone();
        for i in 0..m {
            for j in 0..n {
                let e = c_offset + i * cs + j;
                want[e] = if accumulate { want[e] + s * r[i * n + j] } else { s * r[i * n + j] };
            }
        }
        let what = format!("matmul_tn t={t} m={m} n={n} p_col0={p_col0} q_col0={q_col0} c_offset={c_offset} acc={accumulate}");
        assert_close(&gc.read_f32(&ctx).unwrap(), &want, 4e-5 * (t as f32).sqrt(), 1e-5, &what);
    }

    #[test]
    fn matmul_tn_matches_reference() {
        for (t, m, n) in [(3, 41, 5), (17, 5, 37), (1, 1, 1), (9, 5, 576), (130, 7, 3)] {
            check(t, m, n, 0, 0, 0, 0, false, None);
            check(t, m, n, 2, 5, 3, 1, true, Some(-0.5));
            check(t, m, n, 1, 0, 0, 3, false, Some(2.0));
        }
    }

    #[test]
    fn matmul_tn_rejects_bad_operands() {
        let ctx = test_context();
        let p = GpuTensor::zeros(&ctx, "p", DType::F32, &[3, 4]).unwrap();
        let q = GpuTensor::zeros(&ctx, "q", DType::F32, &[3, 5]).unwrap();
        let c = GpuTensor::zeros(&ctx, "c", DType::F32, &[4, 5]).unwrap();
        let h = GpuTensor::zeros(&ctx, "h", DType::F16, &[4, 5]).unwrap();
        let err = |op: MatmulTnOp| matmul_tn(&ctx, "grad/lora.db", &op).unwrap_err().to_string();
        matmul_tn(&ctx, "ok", &MatmulTnOp::new(&p, &q, 3, 4, 5, &c)).unwrap();
        assert!(err(MatmulTnOp::new(&p, &q, 4, 4, 5, &c)).starts_with("invalid kernel arguments: grad/lora.db: P (p) needs at least 16"));
        assert!(err(MatmulTnOp::new(&p, &q, 3, 4, 5, &c).p_layout(4, 1)).contains("P stride 4 < column offset 1 + 4 columns"));
        assert!(err(MatmulTnOp::new(&p, &q, 3, 4, 5, &c).c_layout(5, 1)).contains("C (c) needs at least 21"));
        assert!(err(MatmulTnOp::new(&p, &q, 3, 4, 5, &h)).contains("C (h) needs at least 20 f32 values"));
        assert!(err(MatmulTnOp::new(&p, &q, 0, 4, 5, &c)).contains("empty product"));
    }
}
