//! Backward of the fused RoPE + KV-cache write ([`rope_qkv_write`](crate::kernels::rope::rope_qkv_write)).
//!
//! The forward rotates each pair `(x1, x2) = (x[i], x[i + hd/2])` of every q and k head by the
//! angle `a = pos · inv_freq[i]` (Hugging Face's rotate-half `apply_rotary_pos_emb`):
//! `o1 = x1 cos a - x2 sin a`, `o2 = x2 cos a + x1 sin a`. A rotation's Jacobian is the rotation
//! itself, so the gradient w.r.t. the un-rotated pair is the output gradient rotated by `-a`
//! (the transpose): `dx1 = do1 cos a + do2 sin a`, `dx2 = do2 cos a - do1 sin a`, with the same
//! cos/sin tables ([`RopeTables`]). v is not rotated: its gradient passes through unchanged.
//!
//! Layout: the forward reads the stacked `qkv` `[T, q + 2kv]` and writes q `[T, q]` and the K
//! and V cache rows `pos0 + t`. The backward takes the gradients w.r.t. those outputs by row t
//! of the step (dq `[T, q]`, dk and dv `[T, kv]`: the attention backward's gradients of the
//! cache rows `pos0..pos0 + T`, already summed over the query heads that share a KV head) and
//! writes the whole of `d_qkv` `[T, q + 2kv]`, the gradient w.r.t. the QKV projection's output:
//! the q and k columns rotated back, the v columns copied from dv. This dispatch is the one
//! writer of `d_qkv` (overwritten, not accumulated).

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor};
use crate::kernels::attention::AttnShape;
use crate::kernels::checks::check_f32;
use crate::kernels::rope::{RopeParams, RopeTables};
use crate::kernels::step::StepBuffer;

const SOURCE: &str = include_str!("../../shaders/rope_backward.wgsl");

/// The operands of one RoPE backward (see [`rope_qkv_backward`]).
#[derive(Debug, Clone, Copy)]
pub struct RopeBackwardOp<'a> {
    /// Gradient w.r.t. the rotated queries (the forward's `q_out`), `[rows, n_heads head_dim]` f32.
    pub dq: &'a GpuTensor,
    /// Gradient w.r.t. the rotated keys the forward wrote to cache rows `pos0 + t`, by step row t:
    /// `[rows, n_kv_heads head_dim]` f32.
    pub dk: &'a GpuTensor,
    /// Gradient w.r.t. the values the forward wrote to cache rows `pos0 + t`, by step row t:
    /// `[rows, n_kv_heads head_dim]` f32.
    pub dv: &'a GpuTensor,
    /// Rows the dispatch is sized for (the step's `n_tokens` may be fewer); at least 1.
    pub rows: usize,
    /// Heads and head size (head_dim even, equal to the tables').
    pub shape: AttnShape,
    /// The forward's cos/sin tables.
    pub tables: &'a RopeTables,
    /// The per-step uniform (`pos0`, `n_tokens`) of the forward step, read at run time.
    pub step: &'a StepBuffer,
    /// Gradient w.r.t. the forward's `qkv`, `[rows, (n_heads + 2 n_kv_heads) head_dim]` f32,
    /// overwritten (q | k | v per row, as `qkv`).
    pub d_qkv: &'a GpuTensor,
}

/// For t < T (the step's `n_tokens`, at most `op.rows`) at position `pos = pos0 + t`:
/// `d_qkv[t] = [rope⁻¹(dq[t]) | rope⁻¹(dk[t]) | dv[t]]`, where `rope⁻¹` rotates each head's
/// pairs by `-pos · inv_freq[i]` (see the module docs). Rows past T and rows at positions at or
/// beyond the tables' length are left untouched, as the forward skips them.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when the shape is invalid, head_dim is odd or
/// differs from the tables', rows is 0, an operand is not f32 or too small, or the dispatch
/// would need more than 2^32 invocations.
pub fn rope_qkv_backward(ctx: &GpuContext, label: &str, op: &RopeBackwardOp) -> Result<Dispatch, GpuError> {
    let RopeBackwardOp { dq, dk, dv, rows, shape, tables, step, d_qkv } = *op;
    let (params, invocations) = RopeParams::checked(label, shape, tables, rows)?;
    check_f32(label, dq, rows * shape.q_dim(), "dq")?;
    check_f32(label, dk, rows * shape.kv_dim(), "dk")?;
    check_f32(label, dv, rows * shape.kv_dim(), "dv")?;
    check_f32(label, d_qkv, rows * shape.qkv_dim(), "d_qkv")?;
    let hd = shape.head_dim;
    let pipeline = ctx.pipeline(&super::snippet_variant("rope_backward", SOURCE, "rope_qkv_backward"))?;
    let u = uniform(ctx, label, &params);
    let rotated = rows * (shape.n_heads + shape.n_kv_heads) * hd;
    let cost = Cost { flops: (3 * rotated) as u64, bytes: (4 * (2 * rows * shape.qkv_dim() + rotated)) as u64 };
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[
            u.as_entire_binding(),
            step.buffer.as_entire_binding(),
            tables.cos.buffer.as_entire_binding(),
            tables.sin.buffer.as_entire_binding(),
            dq.buffer.as_entire_binding(),
            dk.buffer.as_entire_binding(),
            dv.buffer.as_entire_binding(),
            d_qkv.buffer.as_entire_binding(),
        ],
        grid(invocations.div_ceil(64)),
        cost,
    ))
}

/// Rotates every head of `x` (`[T, heads * head_dim]`, row t at `positions[t]`) in place by
/// `sign · pos · inv_freq[i]` in f64, with `cos`/`sin` the `[max_pos, head_dim / 2]` tables.
fn rotate_f64(x: &mut [f64], positions: &[usize], head_dim: usize, cos: &[f64], sin: &[f64], sign: f64) {
    let half = head_dim / 2;
    let heads_width = x.len() / positions.len().max(1);
    for (row, &pos) in x.chunks_mut(heads_width).zip(positions) {
        for head in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (c, s) = (cos[pos * half + i], sign * sin[pos * half + i]);
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * c - x2 * s;
                head[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

/// Splits `qkv` `[T, q + 2kv]` into its q, k and v columns.
fn split_qkv(qkv: &[f64], shape: AttnShape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (qd, kvd) = (shape.q_dim(), shape.kv_dim());
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for row in qkv.chunks(shape.qkv_dim()) {
        q.extend_from_slice(&row[..qd]);
        k.extend_from_slice(&row[qd..qd + kvd]);
        v.extend_from_slice(&row[qd + kvd..]);
    }
    (q, k, v)
}

/// CPU reference of the forward in f64: `(q, k, v)` (`[T, q]`, `[T, kv]`, `[T, kv]`) from `qkv`
/// `[T, q + 2kv]` with row t at `positions[t]`, q and k rotated with the `[max_pos, head_dim / 2]`
/// tables `cos`, `sin` (those of [`rope_tables_ref`](crate::kernels::rope::rope_tables_ref)).
pub fn rope_qkv_f64(qkv: &[f64], positions: &[usize], shape: AttnShape, cos: &[f64], sin: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut q, mut k, v) = split_qkv(qkv, shape);
    rotate_f64(&mut q, positions, shape.head_dim, cos, sin, 1.0);
    rotate_f64(&mut k, positions, shape.head_dim, cos, sin, 1.0);
    (q, k, v)
}

/// CPU reference of [`rope_qkv_backward`] in f64: `d_qkv` `[T, q + 2kv]` from dq `[T, q]`, dk and
/// dv `[T, kv]`, row t at `positions[t]`, with the tables of [`rope_qkv_f64`].
pub fn rope_qkv_backward_ref(
    dq: &[f64],
    dk: &[f64],
    dv: &[f64],
    positions: &[usize],
    shape: AttnShape,
    cos: &[f64],
    sin: &[f64],
) -> Vec<f64> {
    let (mut dq, mut dk) = (dq.to_vec(), dk.to_vec());
    rotate_f64(&mut dq, positions, shape.head_dim, cos, sin, -1.0);
    rotate_f64(&mut dk, positions, shape.head_dim, cos, sin, -1.0);
    let (qd, kvd) = (shape.q_dim(), shape.kv_dim());
    let mut out = Vec::with_capacity(positions.len() * shape.qkv_dim());
    for t in 0..positions.len() {
        out.extend_from_slice(&dq[t * qd..][..qd]);
        out.extend_from_slice(&dk[t * kvd..][..kvd]);
        out.extend_from_slice(&dv[t * kvd..][..kvd]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, test_context};
    use crate::kernels::rope::{rope_inv_freq, rope_tables_ref};
    use crate::kernels::step::StepParams;
    use crate::kernels::testing::{assert_close, assert_close_f64, central_differences, random_vec, to_f64};

    fn tables_f64(head_dim: usize, max_pos: usize) -> (Vec<f64>, Vec<f64>) {
        let (cos, sin) = rope_tables_ref(&rope_inv_freq(head_dim, 10000.0, None), max_pos);
        (to_f64(&cos), to_f64(&sin))
    }

    #[test]
    fn rope_backward_ref_matches_finite_differences() {
        for (shape, t_rows, pos0) in [
            (AttnShape { n_heads: 3, n_kv_heads: 1, head_dim: 6 }, 3, 5),
            (AttnShape { n_heads: 2, n_kv_heads: 2, head_dim: 2 }, 1, 0),
            (AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 10 }, 5, 37),
        ] {
            let (cos, sin) = tables_f64(shape.head_dim, pos0 + t_rows);
            let positions: Vec<usize> = (pos0..pos0 + t_rows).collect();
            let qkv = to_f64(&random_vec(t_rows * shape.qkv_dim(), 1));
            let dq = to_f64(&random_vec(t_rows * shape.q_dim(), 2));
            let dk = to_f64(&random_vec(t_rows * shape.kv_dim(), 3));
            let dv = to_f64(&random_vec(t_rows * shape.kv_dim(), 4));
            let loss = |qkv: &[f64]| {
                let (q, k, v) = rope_qkv_f64(qkv, &positions, shape, &cos, &sin);
                let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
                dot(&q, &dq) + dot(&k, &dk) + dot(&v, &dv)
            };
            let num = central_differences(&qkv, 1e-5, loss);
            let got = rope_qkv_backward_ref(&dq, &dk, &dv, &positions, shape, &cos, &sin);
            assert_close_f64(&got, &num, 1e-8, &format!("d_qkv {shape:?} T={t_rows} pos0={pos0}"));
        }
    }

    /// Runs the backward prepared for `rows` rows with a step of `n_tokens` at `pos0` and checks
    /// d_qkv (rows past the step or past the tables keep their old contents).
    fn check_gpu(shape: AttnShape, rows: usize, n_tokens: usize, pos0: usize, max_pos: usize, seed: u64) {
        let ctx = test_context();
        let (qd, kvd, qkvd, hd) = (shape.q_dim(), shape.kv_dim(), shape.qkv_dim(), shape.head_dim);
        let (dq, dk, dv) = (random_vec(rows * qd, seed), random_vec(rows * kvd, seed + 1), random_vec(rows * kvd, seed + 2));
        let old = random_vec(rows * qkvd, seed + 3);
        let tables = RopeTables::new(&ctx, hd, 10000.0, None, max_pos).unwrap();
        let t = |name: &str, v: &[f32]| GpuTensor::from_f32(&ctx, name, &[v.len()], v).unwrap();
        let (g_dq, g_dk, g_dv, g_out) = (t("dq", &dq), t("dk", &dk), t("dv", &dv), t("d_qkv", &old));
        let step = StepBuffer::new(&ctx);
        step.write(&ctx, &StepParams::new(pos0, n_tokens));
        let op = RopeBackwardOp { dq: &g_dq, dk: &g_dk, dv: &g_dv, rows, shape, tables: &tables, step: &step, d_qkv: &g_out };
        let d = rope_qkv_backward(&ctx, "rope.bwd", &op).unwrap();
        ctx.run("test", &[&d]).unwrap();

        let done = n_tokens.min(rows).min(max_pos.saturating_sub(pos0));
        let positions: Vec<usize> = (pos0..pos0 + done).collect();
        let (cos, sin) = tables_f64(hd, max_pos);
        let want = rope_qkv_backward_ref(
            &to_f64(&dq[..done * qd]),
            &to_f64(&dk[..done * kvd]),
            &to_f64(&dv[..done * kvd]),
            &positions,
            shape,
            &cos,
            &sin,
        );
        let mut want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        want.extend_from_slice(&old[done * qkvd..]);
        assert_close(&g_out.read_f32(&ctx).unwrap(), &want, 1e-6, 1e-5, &format!("d_qkv {shape:?} rows {rows} T={n_tokens} pos0={pos0}"));
    }

    #[test]
    fn rope_backward_matches_reference() {
        let gqa = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
        let odd = AttnShape { n_heads: 3, n_kv_heads: 1, head_dim: 14 };
        let tiny = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 2 };
        for (i, &(rows, pos0)) in [(1, 0), (3, 0), (37, 5), (300, 57)].iter().enumerate() {
            check_gpu(gqa, rows, rows, pos0, 400, 10 + 10 * i as u64);
            check_gpu(odd, rows, rows, pos0, 400, 15 + 10 * i as u64);
        }
        check_gpu(tiny, 7, 7, 3, 10, 60);
        // A dispatch sized for 7 rows run with a 4-token step; a step running past the tables.
        check_gpu(odd, 7, 4, 2, 400, 70);
        check_gpu(odd, 7, 7, 5, 9, 80);
    }

    #[test]
    fn rope_backward_undoes_the_forward_rotation() {
        // The rotation is orthogonal: its transpose applied to the forward's output gives back
        // the input, so d_qkv = qkv when dq, dk, dv are the forward's q, k, v (up to the f32
        // rounding of the tables: cos² + sin² = 1 within ~1e-7).
        let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 8 };
        let (cos, sin) = tables_f64(8, 20);
        let positions: Vec<usize> = (11..16).collect();
        let qkv = to_f64(&random_vec(5 * shape.qkv_dim(), 9));
        let (q, k, v) = rope_qkv_f64(&qkv, &positions, shape, &cos, &sin);
        assert_close_f64(&rope_qkv_backward_ref(&q, &k, &v, &positions, shape, &cos, &sin), &qkv, 1e-6, "inverse rotation");
    }

    #[test]
    fn rope_backward_rejects_bad_operands() {
        let ctx = test_context();
        let step = StepBuffer::new(&ctx);
        let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 8 };
        let tables = RopeTables::new(&ctx, 8, 10000.0, None, 8).unwrap();
        let z = |n: usize| GpuTensor::zeros(&ctx, "t", DType::F32, &[n]).unwrap();
        let (dq, dk, dv, out) = (z(2 * 16), z(2 * 8), z(2 * 8), z(2 * 32));
        let op = RopeBackwardOp { dq: &dq, dk: &dk, dv: &dv, rows: 2, shape, tables: &tables, step: &step, d_qkv: &out };
        assert!(rope_qkv_backward(&ctx, "r.bwd", &op).is_ok());
        for (bad, what) in [
            (RopeBackwardOp { rows: 0, ..op }, "rows"),
            (RopeBackwardOp { rows: 3, ..op }, "dq ("),
            (RopeBackwardOp { dv: &dq, d_qkv: &dk, ..op }, "d_qkv ("),
            (RopeBackwardOp { shape: AttnShape { head_dim: 6, ..shape }, ..op }, "tables"),
            (RopeBackwardOp { shape: AttnShape { n_heads: 3, n_kv_heads: 2, head_dim: 8 }, ..op }, "r.bwd"),
        ] {
            let err = rope_qkv_backward(&ctx, "r.bwd", &bad).err().unwrap().to_string();
            assert!(err.contains("r.bwd: ") && err.contains(what), "{err}");
        }
    }
}
