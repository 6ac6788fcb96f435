//! Backward pass of causal GQA attention ([`crate::kernels::attention`]) for training: given
//! the forward's q, K, V, its output O and the loss gradient dO, the gradients dq, dK and dV,
//! recomputing the softmax row by row so that no `[T, T]` matrix of probabilities is ever held
//! (memory linear in T). The algorithm is the FlashAttention-2 backward (Dao 2023, "FlashAttention-2:
//! Faster Attention with Better Parallelism and Work Partitioning", Algorithm 2), written as
//! plain loops per (query row, head) and per (key row, kv head), so that no two invocations
//! write the same output and no atomics are needed (see `shaders/attention_backward.wgsl`).
//!
//! **Prefill from position 0 only**: query row t sits at position t and attends to key rows
//! 0..=t (`pos0 = 0`), which is what a training sequence is. Gradients are **overwritten**:
//! each of dq, dK, dV is produced once per layer, so there is nothing to accumulate.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::attention::{AttnShape, head_access};
use crate::kernels::checks::{cache_rows, check_f32, check_rows, invalid};

const SOURCE: &str = include_str!("../../shaders/attention_backward.wgsl");

/// Uniform of `shaders/attention_backward.wgsl` (`struct AttnBackwardParams` there, same fields
/// in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AttnBackwardParams {
    /// Query rows T (= key rows: prefill from position 0).
    pub rows: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Query heads per kv head (`n_heads / n_kv_heads`).
    pub group: u32,
    /// Row stride of q, O, dO and dq (`n_heads * head_dim`).
    pub q_stride: u32,
    /// Row stride of K, V, dK and dV (`n_kv_heads * head_dim`).
    pub kv_stride: u32,
    /// Score scale `1 / sqrt(head_dim)`, as the forward's.
    pub scale: f32,
    /// Padding to 32 bytes.
    pub _pad0: u32,
    /// Padding to 32 bytes.
    pub _pad1: u32,
}

/// The operands of one attention backward (see [`attention_backward`]). All f32.
#[derive(Debug, Clone, Copy)]
pub struct AttnBackwardOp<'a> {
    /// Rotated queries of the forward, `[rows, n_heads * head_dim]`.
    pub q: &'a GpuTensor,
    /// Keys, `[>= rows, n_kv_heads * head_dim]` (the layer's KV cache; rows 0..rows are read).
    pub k: &'a GpuTensor,
    /// Values, same layout as `k`.
    pub v: &'a GpuTensor,
    /// The forward's output O, `[rows, n_heads * head_dim]`.
    pub out: &'a GpuTensor,
    /// Gradient of the loss with respect to O, `[rows, n_heads * head_dim]`.
    pub d_out: &'a GpuTensor,
    /// Query rows T (positions 0..T); at least 1.
    pub rows: usize,
    /// Heads and head size.
    pub shape: AttnShape,
    /// Output: gradient with respect to q, `[rows, n_heads * head_dim]`, overwritten.
    pub dq: &'a GpuTensor,
    /// Output: gradient with respect to K rows 0..rows, `[rows, n_kv_heads * head_dim]` (summed
    /// over the query heads that share a kv head), overwritten.
    pub dk: &'a GpuTensor,
    /// Output: gradient with respect to V rows 0..rows, `[rows, n_kv_heads * head_dim]` (summed
    /// likewise), overwritten.
    pub dv: &'a GpuTensor,
}

fn variant(entry: &'static str, head_dim: usize) -> ShaderVariant {
    let read = |binding, var, f| head_access(binding, var, f, head_dim, false);
    let write = |binding, var, f| head_access(binding, var, f, head_dim, true);
    let inputs = read(1, "q", "q4") + &read(2, "k", "k4") + &read(3, "v", "v4") + &read(4, "d_out", "do4");
    ShaderVariant::new("attention_backward", SOURCE, entry)
        .define("HD", head_dim)
        .define("HD4", head_dim.div_ceil(4))
        .define("DECLS_IN", inputs)
        .define("DECLS_Q", read(5, "o", "o4") + &write(7, "dq", "store_dq"))
        .define("DECLS_KV", write(6, "dk", "store_dk") + &write(7, "dv", "store_dv"))
}

/// Prepares the backward pass of causal attention with GQA over `op.rows` positions from 0
/// (the forward is [`crate::kernels::attention::attention`] with `pos0 = 0`): for scores
/// `S = q Kᵀ / sqrt(head_dim)` with the causal mask, `P = softmax(S)` per row, `O = P V`, and
/// `D = rowsum(dO ∘ O)`,
/// `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)`, `dq = dS K / sqrt(head_dim)`,
/// `dK = dSᵀ q / sqrt(head_dim)` per head, dK and dV summed over each kv head's query heads
/// (FlashAttention-2's backward, Dao 2023). P is recomputed, never stored: besides the
/// operands, the pass holds `[rows, n_heads]` pairs (lse, D), 8 bytes each.
///
/// Two dispatches in order: `label.q` (per query row and head: lse, D and dq) and `label.kv`
/// (per key row and kv head: dK, dV); the second reads what the first wrote, so record them in
/// this order. dq, dK and dV are overwritten.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when the shape is invalid, rows is 0, an
/// operand is not f32 or too small for `rows` rows (k and v: not a whole number of kv rows, or
/// fewer than `rows`), or the dispatch would need more than 2^32 invocations or indices.
pub fn attention_backward(ctx: &GpuContext, label: &str, op: &AttnBackwardOp) -> Result<Vec<Dispatch>, GpuError> {
    let AttnBackwardOp { q, k, v, out, d_out, rows, shape, dq, dk, dv } = *op;
    shape.check(label)?;
    check_rows(label, rows)?;
    let (hd, qd, kvd) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    for (t, what) in [(q, "q"), (out, "out"), (d_out, "d_out"), (dq, "dq")] {
        check_f32(label, t, rows * qd, what)?;
    }
    for (t, what) in [(dk, "dk"), (dv, "dv")] {
        check_f32(label, t, rows * kvd, what)?;
    }
    for (t, what) in [(k, "k"), (v, "v")] {
        let have = cache_rows(label, t, kvd, what)?;
        if have < rows {
            return Err(invalid(label, format!("{what} ({}) has {have} rows, the backward of {rows} rows needs {rows}", t.label)));
        }
    }
    let k_rows = cache_rows(label, k, kvd, "k")?.max(cache_rows(label, v, kvd, "v")?);
    if rows * shape.n_heads > u32::MAX as usize || (rows * qd).max(k_rows * kvd) > u32::MAX as usize {
        return Err(invalid(label, format!("{rows} rows are too many for one dispatch")));
    }
    let params = AttnBackwardParams {
        rows: rows as u32,
        n_heads: shape.n_heads as u32,
        group: (shape.n_heads / shape.n_kv_heads) as u32,
        q_stride: qd as u32,
        kv_stride: kvd as u32,
        scale: 1.0 / (hd as f32).sqrt(),
        _pad0: 0,
        _pad1: 0,
    };
    let u = uniform(ctx, label, &params);
    let stats = GpuTensor::zeros(ctx, &format!("{label}.stats"), DType::F32, &[rows, shape.n_heads, 2])?;
    // Score-key pairs under the causal mask, per query head.
    let pairs = (rows * (rows + 1) / 2 * shape.n_heads) as u64;
    let (qd_bytes, kv_bytes) = (4 * (rows * qd) as u64, 4 * (rows * kvd) as u64);
    let q_pass = Dispatch::new(
        ctx,
        &ctx.pipeline(&variant("attn_bwd_q", hd))?,
        format!("{label}.q"),
        &[
            u.as_entire_binding(),
            q.buffer.as_entire_binding(),
            k.buffer.as_entire_binding(),
            v.buffer.as_entire_binding(),
            d_out.buffer.as_entire_binding(),
            out.buffer.as_entire_binding(),
            stats.buffer.as_entire_binding(),
            dq.buffer.as_entire_binding(),
        ],
        grid((rows * shape.n_heads).div_ceil(64) as u32),
        // Pass 1: q·k; pass 2: q·k, dO·v and dq += dS k.
        Cost { flops: 8 * pairs * hd as u64, bytes: 4 * qd_bytes + 2 * kv_bytes + 8 * (rows * shape.n_heads) as u64 },
    );
    let kv_pass = Dispatch::new(
        ctx,
        &ctx.pipeline(&variant("attn_bwd_kv", hd))?,
        format!("{label}.kv"),
        &[
            u.as_entire_binding(),
            q.buffer.as_entire_binding(),
            k.buffer.as_entire_binding(),
            v.buffer.as_entire_binding(),
            d_out.buffer.as_entire_binding(),
            stats.buffer.as_entire_binding(),
            dk.buffer.as_entire_binding(),
            dv.buffer.as_entire_binding(),
        ],
        grid((rows * shape.n_kv_heads).div_ceil(64) as u32),
        // q·k, dO·v, dV += P dO and dK += dS q.
        Cost { flops: 8 * pairs * hd as u64, bytes: 2 * qd_bytes + 4 * kv_bytes + 8 * (rows * shape.n_heads) as u64 },
    );
    Ok(vec![q_pass, kv_pass])
}

/// Gradients of causal attention with respect to its inputs, in f64 (see
/// [`attention_backward_ref`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AttnGrads {
    /// `[rows, n_heads * head_dim]`.
    pub dq: Vec<f64>,
    /// `[rows, n_kv_heads * head_dim]`.
    pub dk: Vec<f64>,
    /// `[rows, n_kv_heads * head_dim]`.
    pub dv: Vec<f64>,
}

/// CPU reference of [`attention_backward`] in f64, from the definition (FlashAttention-2's
/// backward equations, Dao 2023): for each query row t (position t, keys 0..=t) and head h,
/// the probabilities `P_j` of [`crate::kernels::attention::attention_ref_f64`] with `pos0 = 0`,
/// `O_t = sum_j P_j v_j`, `D = dO_t · O_t`, `dS_j = P_j (dO_t · v_j − D)`;
/// `dq_t = sum_j dS_j k_j / sqrt(hd)`, `dk_j += dS_j q_t / sqrt(hd)`, `dv_j += P_j dO_t`.
/// q and `d_out` are `[rows, n_heads hd]`, k and v `[>= rows, n_kv_heads hd]` (rows 0..rows used).
pub fn attention_backward_ref(q: &[f64], k: &[f64], v: &[f64], d_out: &[f64], rows: usize, shape: AttnShape) -> AttnGrads {
    let (hd, qd, kvd) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut g = AttnGrads { dq: vec![0.0; rows * qd], dk: vec![0.0; rows * kvd], dv: vec![0.0; rows * kvd] };
    for t in 0..rows {
        for h in 0..shape.n_heads {
            let qb = t * qd + h * hd;
            let kvb = (h / group) * hd;
            let (qt, dot_t) = (&q[qb..qb + hd], &d_out[qb..qb + hd]);
            let key = |j: usize| &k[j * kvd + kvb..][..hd];
            let val = |j: usize| &v[j * kvd + kvb..][..hd];
            let s: Vec<f64> = (0..=t).map(|j| dot(qt, key(j)) * scale).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|&x| x / sum).collect();
            let o: Vec<f64> = (0..hd).map(|i| (0..=t).map(|j| p[j] * val(j)[i]).sum()).collect();
            let d = dot(dot_t, &o);
            for (j, &pj) in p.iter().enumerate() {
                let ds = pj * (dot(dot_t, val(j)) - d);
                for i in 0..hd {
                    g.dq[qb + i] += ds * key(j)[i] * scale;
                    g.dk[j * kvd + kvb + i] += ds * qt[i] * scale;
                    g.dv[j * kvd + kvb + i] += pj * dot_t[i];
                }
            }
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::attention::attention_ref_f64;
    use crate::kernels::testing::{assert_close, assert_close_f64, central_differences, random_vec, to_f64};

    fn narrow(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    /// The scalar whose gradient the backward computes: `L = sum(dO ∘ attention(q, K, V))`.
    fn loss(q: &[f64], k: &[f64], v: &[f64], d_out: &[f64], rows: usize, shape: AttnShape) -> f64 {
        attention_ref_f64(q, rows, k, v, 0, shape).iter().zip(d_out).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn attention_backward_reference_matches_finite_differences() {
        // Odd sizes: T = 5, GQA 3 heads on 1 kv head, head_dim 8; MHA with head_dim 7; K and V
        // with more rows than T (a KV cache), which must get no gradient past row T.
        let cases = [
            (5, AttnShape { n_heads: 3, n_kv_heads: 1, head_dim: 8 }, 5),
            (3, AttnShape { n_heads: 2, n_kv_heads: 2, head_dim: 7 }, 6),
            (7, AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: 3 }, 7),
        ];
        for (i, (rows, shape, cache_rows)) in cases.into_iter().enumerate() {
            let seed = 10 * i as u64;
            let q: Vec<f64> = random_vec(rows * shape.q_dim(), seed).iter().map(|&x| 2.0 * x as f64).collect();
            let k = to_f64(&random_vec(cache_rows * shape.kv_dim(), seed + 1));
            let v = to_f64(&random_vec(cache_rows * shape.kv_dim(), seed + 2));
            let d_out = to_f64(&random_vec(rows * shape.q_dim(), seed + 3));
            let g = attention_backward_ref(&q, &k, &v, &d_out, rows, shape);
            let kv_n = rows * shape.kv_dim();
            let numeric = [
                central_differences(&q, 1e-5, |x| loss(x, &k, &v, &d_out, rows, shape)),
                central_differences(&k, 1e-5, |x| loss(&q, x, &v, &d_out, rows, shape)),
                central_differences(&v, 1e-5, |x| loss(&q, &k, x, &d_out, rows, shape)),
            ];
            for (mut want, got, name) in
                numeric.into_iter().zip([(&g.dq, "dq"), (&g.dk, "dk"), (&g.dv, "dv")]).map(|(n, (g, name))| (n, g, name))
            {
                if name != "dq" {
                    // Cache rows past T never reach the loss.
                    assert!(want[kv_n..].iter().all(|&x| x == 0.0), "{name}: cache rows past T must not matter");
                    want.truncate(kv_n);
                }
                assert_close_f64(got, &want, 1e-7, &format!("{shape:?} T={rows} {name}: backward vs finite differences"));
            }
        }
    }

    /// Runs the GPU backward on random f32 operands (q scaled by `q_scale`), K and V with
    /// `cache_rows` rows, and compares with the f64 reference.
    fn check_gpu(rows: usize, shape: AttnShape, cache_rows: usize, q_scale: f32, seed: u64) {
        let ctx = test_context();
        let (qd, kvd) = (shape.q_dim(), shape.kv_dim());
        let q: Vec<f32> = random_vec(rows * qd, seed).iter().map(|v| v * q_scale).collect();
        let k = random_vec(cache_rows * kvd, seed + 1);
        let v = random_vec(cache_rows * kvd, seed + 2);
        let d_out = random_vec(rows * qd, seed + 3);
        let o = attention_ref_f64(&to_f64(&q), rows, &to_f64(&k), &to_f64(&v), 0, shape);
        let up = |name: &str, x: &[f32], cols: usize| GpuTensor::from_f32(&ctx, name, &[x.len() / cols, cols], x).unwrap();
        let (gq, gk, gv, gdo, go) =
            (up("q", &q, qd), up("k", &k, kvd), up("v", &v, kvd), up("d_out", &d_out, qd), up("o", &narrow(&o), qd));
        // Outputs start as garbage: the backward overwrites them.
        let (gdq, gdk, gdv) =
            (up("dq", &random_vec(rows * qd, 7), qd), up("dk", &random_vec(rows * kvd, 8), kvd), up("dv", &random_vec(rows * kvd, 9), kvd));
        let op = AttnBackwardOp { q: &gq, k: &gk, v: &gv, out: &go, d_out: &gdo, rows, shape, dq: &gdq, dk: &gdk, dv: &gdv };
        let ds = attention_backward(&ctx, "attn_bwd", &op).unwrap();
        assert_eq!(ds.len(), 2);
        ctx.run("attn_bwd", &ds.iter().collect::<Vec<_>>()).unwrap();
        let want = attention_backward_ref(&to_f64(&q), &to_f64(&k), &to_f64(&v), &to_f64(&d_out), rows, shape);
        let what = format!("{shape:?} T={rows} cache={cache_rows} q_scale={q_scale}");
        // f32 sums over up to T keys (and T · group rows for dK, dV) of terms of size ~1.
        let atol = 2e-5 * ((rows * shape.n_heads / shape.n_kv_heads) as f32).sqrt();
        assert_close(&gdq.read_f32(&ctx).unwrap(), &narrow(&want.dq), atol, 1e-4, &format!("dq {what}"));
        assert_close(&gdk.read_f32(&ctx).unwrap(), &narrow(&want.dk), atol, 1e-4, &format!("dk {what}"));
        assert_close(&gdv.read_f32(&ctx).unwrap(), &narrow(&want.dv), atol, 1e-4, &format!("dv {what}"));
    }

    #[test]
    fn attention_backward_matches_reference() {
        // head_dim 8 and 64 use the vec4 accessors, 7 and 3 the scalar ones.
        check_gpu(5, AttnShape { n_heads: 3, n_kv_heads: 1, head_dim: 8 }, 5, 1.0, 1);
        check_gpu(3, AttnShape { n_heads: 2, n_kv_heads: 2, head_dim: 7 }, 6, 1.0, 2);
        check_gpu(1, AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: 3 }, 1, 1.0, 3);
        check_gpu(67, AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 }, 80, 1.0, 4);
        check_gpu(131, AttnShape { n_heads: 4, n_kv_heads: 4, head_dim: 12 }, 131, 1.0, 5);
    }

    #[test]
    fn attention_backward_is_stable_for_large_scores() {
        // Scores up to ~|q| |k| / 8 with q scaled by 60: exp overflows without the lse shift.
        check_gpu(37, AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 }, 37, 60.0, 6);
    }

    #[test]
    fn attention_backward_rejects_bad_arguments() {
        let ctx = test_context();
        let shape = AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: 12 };
        let z = |rows: usize, cols: usize| GpuTensor::zeros(&ctx, "t", DType::F32, &[rows, cols]).unwrap();
        let (q, kv, kv_short) = (z(4, shape.q_dim()), z(4, shape.kv_dim()), z(3, shape.kv_dim()));
        let op = AttnBackwardOp { q: &q, k: &kv, v: &kv, out: &q, d_out: &q, rows: 4, shape, dq: &q, dk: &kv, dv: &kv };
        assert!(attention_backward(&ctx, "bwd", &op).is_ok());
        let bad = |op: AttnBackwardOp, what: &str| match attention_backward(&ctx, "bwd", &op) {
            Err(GpuError::InvalidArgument(m)) => assert!(m.starts_with("bwd: "), "{what}: {m}"),
            other => panic!("{what}: expected InvalidArgument, got {other:?}"),
        };
        bad(AttnBackwardOp { rows: 0, ..op }, "zero rows");
        bad(AttnBackwardOp { rows: 5, ..op }, "q too small for 5 rows");
        bad(AttnBackwardOp { k: &kv_short, ..op }, "k shorter than T");
        bad(AttnBackwardOp { dv: &kv_short, ..op }, "dv too small");
        bad(AttnBackwardOp { shape: AttnShape { n_kv_heads: 4, ..shape }, ..op }, "6 heads on 4 kv heads");
        let u = GpuTensor::zeros(&ctx, "u", DType::U32, &[4, shape.q_dim()]).unwrap();
        bad(AttnBackwardOp { d_out: &u, ..op }, "d_out not f32");
    }
}
