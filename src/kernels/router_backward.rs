//! Backward of the FiRST router gate ([`router_gate`](crate::kernels::router::router_gate)):
//! with `m = mean_{t < rows} h[t, :]`, `s = 1 / sqrt(mean(m²) + eps)`, `x = m s ⊙ norm`,
//! `a = w1 x + b1`, `z = w2 · silu(a) + b2` (`z = a_0` for a linear router, `r = 0`) and
//! `p = sigmoid(z)`, the chain rule from `dp = dL/dp` gives
//!
//! ```text
//! dz       = dp σ(z) σ(-z)
//! dw2_j   += dz silu(a_j)        db2 += dz        da_j = dz w2_j silu'(a_j)     (r > 0)
//! da_0     = dz                                                                  (r = 0)
//! db1_j   += da_j                dw1[j, c] += da_j x_c                dx_c = Σ_j da_j w1[j, c]
//! dnorm_c += dx_c m_c s          g_c = dx_c norm_c
//! dm_c     = s g_c - m_c s³ (Σ_k g_k m_k) / d                      (RMSNorm's backward, one row)
//! dh[t, c] += dm_c / rows        (t < rows)
//! ```
//!
//! with `silu'(a) = σ(a) (1 + a σ(-a))` (the router of FiRST, arXiv 2410.12513; RMSNorm's
//! gradient as in [`rmsnorm_backward`](crate::kernels::rmsnorm_backward)). The forward is
//! recomputed (nothing is saved by [`router_gate`](crate::kernels::router::router_gate)); the
//! mean over many rows uses the forward's column-sum dispatch (`router_colsum`, blocks of
//! [`BLOCK_ROWS`](crate::kernels::router::BLOCK_ROWS) rows). Every gradient is added to (the engine sums over a batch and zeroes
//! them itself). Every sum runs in a fixed order, without atomics.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor};
use crate::kernels::checks::{check_f32, check_u32, invalid};
use crate::kernels::router::{CheckedRouter, RouterWeights, check_router, column_sums};

const SOURCE: &str = include_str!("../../shaders/router_backward.wgsl");

/// Uniform of `shaders/router_backward.wgsl` (`struct RouterBackwardParams` there, same fields
/// in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RouterBackwardParams {
    /// Rows of h averaged.
    pub rows: u32,
    /// Hidden size d.
    pub dim: u32,
    /// Blocks of column-sum partials at the start of the scratch; 0 when there are none.
    pub blocks: u32,
    /// Rank r (0: linear router).
    pub r: u32,
    /// Hidden units `max(r, 1)`.
    pub nh: u32,
    /// Index into dp.
    pub slot: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Scratch offset of s.
    pub s_at: u32,
    /// Scratch offset of m `[d]`.
    pub m_at: u32,
    /// Scratch offset of x `[d]`.
    pub x_at: u32,
    /// Scratch offset of dm `[d]`.
    pub dm_at: u32,
    /// Scratch offset of a `[nh]`.
    pub a_at: u32,
    /// Scratch offset of da `[nh]`.
    pub da_at: u32,
    /// Padding to 64 bytes.
    pub _pad0: u32,
    /// Padding to 64 bytes.
    pub _pad1: u32,
    /// Padding to 64 bytes.
    pub _pad2: u32,
}

/// The gradients of one layer's router, f32, shaped as its [`RouterWeights`] (`norm [d]`,
/// `w1 [max(r, 1), d]`, `b1 [max(r, 1)]`, `w2 [1, r]` and `b2 [1]` when the weights have them).
#[derive(Debug, Clone)]
pub struct RouterGrads {
    /// `[d]`: d norm.
    pub norm: GpuTensor,
    /// `[max(r, 1), d]`: d w1.
    pub w1: GpuTensor,
    /// `[max(r, 1)]`: d b1.
    pub b1: GpuTensor,
    /// `[1, r]`: d w2; None when the weights have no w2 (`r = 0`).
    pub w2: Option<GpuTensor>,
    /// `[1]`: d b2; None when the weights have no b2 (`r = 0`).
    pub b2: Option<GpuTensor>,
}

impl RouterGrads {
    /// Zero gradients shaped as `weights`' tensors, named `{label}.norm`, `{label}.w1`, ...
    ///
    /// # Errors
    /// A buffer error.
    pub fn zeros(ctx: &GpuContext, label: &str, weights: &RouterWeights) -> Result<RouterGrads, GpuError> {
        let like = |what: &str, t: &GpuTensor| GpuTensor::zeros(ctx, &format!("{label}.{what}"), DType::F32, &t.shape);
        Ok(RouterGrads {
            norm: like("norm", &weights.norm)?,
            w1: like("w1", &weights.w1)?,
            b1: like("b1", &weights.b1)?,
            w2: weights.w2.as_ref().map(|t| like("w2", t)).transpose()?,
            b2: weights.b2.as_ref().map(|t| like("b2", t)).transpose()?,
        })
    }

    /// The tensors in the order of [`RouterWeights::tensors`]: norm, w1, b1, then w2 and b2
    /// when present.
    pub fn tensors(&self) -> Vec<&GpuTensor> {
        let mut v = vec![&self.norm, &self.w1, &self.b1];
        v.extend(self.w2.iter().chain(&self.b2));
        v
    }
}

/// The operands of one router backward (see [`router_backward`]).
#[derive(Debug, Clone, Copy)]
pub struct RouterBackwardOp<'a> {
    /// The hidden states the router read, `[>= rows, d]` f32.
    pub h: &'a GpuTensor,
    /// Rows averaged (the prompt's P); at least 1.
    pub rows: usize,
    /// The router's weights (and d, r, eps).
    pub weights: &'a RouterWeights,
    /// `[slots]` f32: `dL/dp` is `dp[slot]`.
    pub dp: &'a GpuTensor,
    /// The element of `dp` read.
    pub slot: usize,
    /// The parameters' gradients, added to.
    pub grads: &'a RouterGrads,
    /// When given, `[>= rows, d]` f32: `dL/dh[t] = dm / rows` is added to rows `t < rows`; later
    /// rows are untouched.
    pub dh: Option<&'a GpuTensor>,
}

/// Prepares the router backward (the module's formulas), in order: `{label}.colsum` (only for
/// `rows > BLOCK_ROWS`), `{label}.forward` (one workgroup: m, s, x, a), `{label}.units` (one
/// workgroup, r > 0) or `{label}.linear` (r = 0), `{label}.norm` (one workgroup: dnorm, dm),
/// `{label}.dw1` (one invocation per element of w1) and, with `dh`, `{label}.dh` (one per
/// element of `[rows, d]`). They share a scratch buffer of `(blocks + 3) d + 2 max(r, 1) + 1`
/// f32 that the dispatches own. Record them in this order.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows or d is 0, an operand (h, weights,
/// dp, grads, dh) is not f32 or is too small, w2/b2 (weights or grads) are missing with r > 0,
/// or the sizes exceed u32 indexing or the workgroup limits; a buffer error for the scratch.
pub fn router_backward(ctx: &GpuContext, label: &str, op: &RouterBackwardOp) -> Result<Vec<Dispatch>, GpuError> {
    let RouterBackwardOp { h, rows, weights, dp, slot, grads, dh } = *op;
    let (d, r) = (weights.d, weights.r);
    let CheckedRouter { nh, blocks, w2, b2 } = check_router(label, h, rows, weights)?;
    check_u32(label, slot, "slot")?;
    check_f32(label, dp, slot + 1, "dp")?;
    check_f32(label, &grads.norm, d, "d norm")?;
    check_f32(label, &grads.w1, nh * d, "d w1")?;
    check_f32(label, &grads.b1, nh, "d b1")?;
    let (dw2, db2) = match (r, &grads.w2, &grads.b2) {
        (0, _, _) => (None, None),
        (_, Some(dw2), Some(db2)) => {
            check_f32(label, dw2, r, "d w2")?;
            check_f32(label, db2, 1, "d b2")?;
            (Some(dw2), Some(db2))
        }
        _ => return Err(invalid(label, format!("router gradients with r = {r} need w2 and b2"))),
    };
    if let Some(dh) = dh {
        check_f32(label, dh, rows * d, "dh")?;
    }
    // Scratch: partials [blocks, d], m, x, dm [d], a, da [nh], s.
    let m_at = blocks * d;
    let (x_at, dm_at, a_at) = (m_at + d, m_at + 2 * d, m_at + 3 * d);
    let (da_at, s_at) = (a_at + nh, a_at + 2 * nh);
    check_u32(label, s_at + 1, "scratch elements")?;
    let params = RouterBackwardParams {
        rows: rows as u32,
        dim: d as u32,
        blocks: blocks as u32,
        r: r as u32,
        nh: nh as u32,
        slot: slot as u32,
        eps: weights.eps,
        s_at: s_at as u32,
        m_at: m_at as u32,
        x_at: x_at as u32,
        dm_at: dm_at as u32,
        a_at: a_at as u32,
        da_at: da_at as u32,
        ..Zeroable::zeroed()
    };
    let u = uniform(ctx, label, &params);
    let scratch = GpuTensor::zeros(ctx, &format!("{label}.scratch"), DType::F32, &[s_at + 1])?;
    let pipeline = |entry: &'static str| ctx.pipeline(&super::snippet_variant("router_backward", SOURCE, entry));
    let (ub, sb) = (u.as_entire_binding(), scratch.buffer.as_entire_binding());
    let mut dispatches = Vec::with_capacity(6);
    if blocks > 0 {
        dispatches.push(column_sums(ctx, label, h, rows, d, blocks, &scratch)?);
    }
    let read = if blocks > 0 { blocks * d } else { rows * d };
    dispatches.push(Dispatch::new(
        ctx,
        &pipeline("router_backward_forward")?,
        format!("{label}.forward"),
        &[
            ub.clone(),
            sb.clone(),
            h.buffer.as_entire_binding(),
            weights.norm.buffer.as_entire_binding(),
            weights.w1.buffer.as_entire_binding(),
            weights.b1.buffer.as_entire_binding(),
        ],
        [1, 1, 1],
        Cost { flops: (read + 4 * d + 2 * nh * d) as u64, bytes: 4 * (read + 4 * d + nh * d + 2 * nh + 1) as u64 },
    ));
    dispatches.push(match (dw2, db2) {
        (Some(dw2), Some(db2)) => Dispatch::new(
            ctx,
            &pipeline("router_backward_units")?,
            format!("{label}.units"),
            &[
                ub.clone(),
                sb.clone(),
                dp.buffer.as_entire_binding(),
                grads.b1.buffer.as_entire_binding(),
                w2.buffer.as_entire_binding(),
                b2.buffer.as_entire_binding(),
                dw2.buffer.as_entire_binding(),
                db2.buffer.as_entire_binding(),
            ],
            [1, 1, 1],
            Cost { flops: 20 * r as u64, bytes: 4 * (8 * r + 4) as u64 },
        ),
        _ => Dispatch::new(
            ctx,
            &pipeline("router_backward_linear")?,
            format!("{label}.linear"),
            &[ub.clone(), sb.clone(), dp.buffer.as_entire_binding(), grads.b1.buffer.as_entire_binding()],
            [1, 1, 1],
            Cost { flops: 10, bytes: 20 },
        ),
    });
    dispatches.push(Dispatch::new(
        ctx,
        &pipeline("router_backward_norm")?,
        format!("{label}.norm"),
        &[
            ub.clone(),
            sb.clone(),
            grads.norm.buffer.as_entire_binding(),
            weights.norm.buffer.as_entire_binding(),
            weights.w1.buffer.as_entire_binding(),
        ],
        [1, 1, 1],
        Cost { flops: (2 * nh * d + 10 * d) as u64, bytes: 4 * (nh * d + nh + 7 * d) as u64 },
    ));
    dispatches.push(Dispatch::new(
        ctx,
        &pipeline("router_backward_dw1")?,
        format!("{label}.dw1"),
        &[ub.clone(), sb.clone(), grads.w1.buffer.as_entire_binding()],
        grid(((nh * d) as u32).div_ceil(256)),
        Cost { flops: (2 * nh * d) as u64, bytes: 4 * (2 * nh * d + nh + d) as u64 },
    ));
    if let Some(dh) = dh {
        dispatches.push(Dispatch::new(
            ctx,
            &pipeline("router_backward_dh")?,
            format!("{label}.dh"),
            &[ub, sb, dh.buffer.as_entire_binding()],
            grid(((rows * d) as u32).div_ceil(256)),
            Cost { flops: (2 * rows * d) as u64, bytes: 4 * (2 * rows * d + d) as u64 },
        ));
    }
    Ok(dispatches)
}

/// One router's parameters in f64 for the CPU references, shaped as [`RouterWeights`]; also
/// the type of their gradients ([`router_backward_ref`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterF64 {
    /// `[d]` RMSNorm weight.
    pub norm: Vec<f64>,
    /// `[max(r, 1), d]`.
    pub w1: Vec<f64>,
    /// `[max(r, 1)]`.
    pub b1: Vec<f64>,
    /// `[r]`; empty for a linear router (r = 0).
    pub w2: Vec<f64>,
    /// `[1]`; empty for a linear router.
    pub b2: Vec<f64>,
}

impl RouterF64 {
    /// Rank r: the length of w2.
    pub fn r(&self) -> usize {
        self.w2.len()
    }

    /// Hidden size d: the length of norm.
    pub fn d(&self) -> usize {
        self.norm.len()
    }

    /// Zeros of the same shapes.
    pub fn zeros_like(&self) -> RouterF64 {
        let z = |v: &[f64]| vec![0.0; v.len()];
        RouterF64 { norm: z(&self.norm), w1: z(&self.w1), b1: z(&self.b1), w2: z(&self.w2), b2: z(&self.b2) }
    }
}

/// The forward's intermediate values (see the module documentation).
struct Forward {
    m: Vec<f64>,
    s: f64,
    x: Vec<f64>,
    a: Vec<f64>,
    z: f64,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn forward(router: &RouterF64, eps: f64, h: &[f64], rows: usize) -> Forward {
    let d = router.d();
    let mut m = vec![0.0; d];
    for row in h[..rows * d].chunks(d) {
        m.iter_mut().zip(row).for_each(|(m, v)| *m += v);
    }
    m.iter_mut().for_each(|v| *v /= rows as f64);
    let s = 1.0 / (m.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
    let x: Vec<f64> = m.iter().zip(&router.norm).map(|(m, w)| m * s * w).collect();
    let a: Vec<f64> =
        router.b1.iter().zip(router.w1.chunks(d)).map(|(b, w)| b + w.iter().zip(&x).map(|(w, x)| w * x).sum::<f64>()).collect();
    let z = if router.r() == 0 { a[0] } else { router.b2[0] + router.w2.iter().zip(&a).map(|(w, a)| w * a * sigmoid(*a)).sum::<f64>() };
    Forward { m, s, x, a, z }
}

/// CPU reference of the forward in f64: the probability `p` of `router` (RMSNorm epsilon
/// `eps`) over rows `0..rows` of `h [>= rows, d]` (the module's formula; it equals
/// `model::routers::RouterLayer::probability` on the same values). Panics when `h` is shorter
/// than `rows * d` or rows is 0.
pub fn router_probability_f64(router: &RouterF64, eps: f64, h: &[f64], rows: usize) -> f64 {
    assert!(rows > 0, "router_probability_f64: no rows");
    sigmoid(forward(router, eps, h, rows).z)
}

/// CPU reference of the backward in f64 (the module's formulas): the parameters' gradients and
/// `dL/dh` `[rows, d]` for `dL/dp = dp`, the forward as [`router_probability_f64`].
pub fn router_backward_ref(router: &RouterF64, eps: f64, h: &[f64], rows: usize, dp: f64) -> (RouterF64, Vec<f64>) {
    let (d, r) = (router.d(), router.r());
    let Forward { m, s, x, a, z } = forward(router, eps, h, rows);
    let mut grads = router.zeros_like();
    let dz = dp * sigmoid(z) * sigmoid(-z);
    let da: Vec<f64> = if r == 0 {
        vec![dz]
    } else {
        grads.b2[0] = dz;
        grads.w2 = a.iter().map(|a| dz * a * sigmoid(*a)).collect();
        a.iter().zip(&router.w2).map(|(a, w)| dz * w * sigmoid(*a) * (1.0 + a * sigmoid(-a))).collect()
    };
    grads.b1.copy_from_slice(&da);
    let mut dx = vec![0.0; d];
    for (j, daj) in da.iter().enumerate() {
        for c in 0..d {
            grads.w1[j * d + c] = daj * x[c];
            dx[c] += daj * router.w1[j * d + c];
        }
    }
    let g: Vec<f64> = (0..d).map(|c| dx[c] * router.norm[c]).collect();
    grads.norm = dx.iter().zip(&m).map(|(dx, m)| dx * m * s).collect();
    let k = s * s * s * g.iter().zip(&m).map(|(g, m)| g * m).sum::<f64>() / d as f64;
    let dm: Vec<f64> = (0..d).map(|c| s * g[c] - k * m[c]).collect();
    let dh = (0..rows * d).map(|i| dm[i % d] / rows as f64).collect();
    (grads, dh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::router::BLOCK_ROWS;
    use crate::kernels::testing::{assert_close, assert_close_f64, central_differences, random_vec, to_f64};

    /// Hidden states `[rows, d]` with a per-column offset (so that the mean is not just noise)
    /// and a router of rank r whose probability is away from 0 and 1.
    fn case(rows: usize, d: usize, r: usize, seed: u64) -> (Vec<f32>, [Vec<f32>; 5]) {
        let nh = r.max(1);
        let offset = random_vec(d, seed);
        let h = random_vec(rows * d, seed + 1).iter().enumerate().map(|(i, v)| v + offset[i % d]).collect();
        let scaled = |n: usize, s: f32, seed: u64| random_vec(n, seed).iter().map(|v| v * s).collect::<Vec<f32>>();
        let norm = random_vec(d, seed + 2).iter().map(|v| 1.0 + 0.5 * v).collect();
        let w1 = scaled(nh * d, 2.0 / (d as f32).sqrt(), seed + 3);
        let b1 = random_vec(nh, seed + 4);
        let (w2, b2) = if r > 0 { (scaled(r, 2.0 / (r as f32).sqrt(), seed + 5), random_vec(1, seed + 6)) } else { (vec![], vec![]) };
        (h, [norm, w1, b1, w2, b2])
    }

    fn router_f64(p: &[Vec<f32>; 5]) -> RouterF64 {
        let [norm, w1, b1, w2, b2] = p.each_ref().map(|v| to_f64(v));
        RouterF64 { norm, w1, b1, w2, b2 }
    }

    fn part_mut(p: &mut RouterF64, k: usize) -> &mut Vec<f64> {
        [&mut p.norm, &mut p.w1, &mut p.b1, &mut p.w2, &mut p.b2].into_iter().nth(k).unwrap()
    }

    #[test]
    fn router_backward_ref_matches_finite_differences() {
        let eps = 1e-5;
        let mut probs = Vec::new();
        for (i, (rows, r)) in [(1, 5), (3, 5), (130, 5), (1, 0), (3, 0), (130, 0)].into_iter().enumerate() {
            let d = 37;
            let (h, params) = case(rows, d, r, 100 * i as u64);
            let (h, router) = (to_f64(&h), router_f64(&params));
            let dp = 1.3;
            probs.push(router_probability_f64(&router, eps, &h, rows));
            let (grads, dh) = router_backward_ref(&router, eps, &h, rows, dp);
            let what = format!("rows {rows} d {d} r {r}");
            let num_dh = central_differences(&h, 1e-5, |h| dp * router_probability_f64(&router, eps, h, rows));
            assert_close_f64(&dh, &num_dh, 1e-8, &format!("dh {what}"));
            let mut grads = grads;
            for (k, name) in ["norm", "w1", "b1", "w2", "b2"].into_iter().enumerate() {
                let base = part_mut(&mut router.clone(), k).clone();
                let num = central_differences(&base, 1e-5, |v| {
                    let mut probe = router.clone();
                    *part_mut(&mut probe, k) = v.to_vec();
                    dp * router_probability_f64(&probe, eps, &h, rows)
                });
                assert_close_f64(part_mut(&mut grads, k), &num, 1e-8, &format!("d {name} {what}"));
            }
        }
        // The cases exercise the sigmoid away from its saturated ends.
        assert!(probs.iter().all(|p| *p > 0.02 && *p < 0.98), "{probs:?}");
    }

    fn upload(ctx: &GpuContext, p: &[Vec<f32>; 5], r: usize, d: usize, eps: f32) -> RouterWeights {
        let nh = r.max(1);
        let t = |name: &str, shape: &[usize], v: &[f32]| GpuTensor::from_f32(ctx, name, shape, v).unwrap();
        RouterWeights {
            norm: t("norm", &[d], &p[0]),
            eps,
            w1: t("w1", &[nh, d], &p[1]),
            b1: t("b1", &[nh], &p[2]),
            w2: (r > 0).then(|| t("w2", &[1, r], &p[3])),
            b2: (r > 0).then(|| t("b2", &[1], &p[4])),
            r,
            d,
        }
    }

    /// Gradients starting from random values (so that a test sees that they are added to).
    fn random_grads(ctx: &GpuContext, w: &RouterWeights, seed: u64) -> RouterGrads {
        let g = |t: &GpuTensor, k: u64| GpuTensor::from_f32(ctx, "grad", &t.shape, &random_vec(t.numel(), seed + k)).unwrap();
        RouterGrads {
            norm: g(&w.norm, 0),
            w1: g(&w.w1, 1),
            b1: g(&w.b1, 2),
            w2: w.w2.as_ref().map(|t| g(t, 3)),
            b2: w.b2.as_ref().map(|t| g(t, 4)),
        }
    }

    fn run_gpu(rows: usize, d: usize, r: usize, with_dh: bool, seed: u64) {
        let ctx = test_context();
        let eps = 1e-5f32;
        let (h, params) = case(rows, d, r, seed);
        let extra = 2 * d; // rows past `rows`: neither read nor written
        let mut h_all = h.clone();
        h_all.extend(random_vec(extra, seed + 7));
        let w = upload(&ctx, &params, r, d, eps);
        let gh = GpuTensor::from_f32(&ctx, "h", &[rows + 2, d], &h_all).unwrap();
        let dp = GpuTensor::from_f32(&ctx, "dp", &[4], &[9.0, -9.0, 1.3, 9.0]).unwrap();
        let grads = random_grads(&ctx, &w, seed + 10);
        let before: Vec<Vec<f32>> = grads.tensors().iter().map(|t| t.read_f32(&ctx).unwrap()).collect();
        let dh0 = random_vec(rows * d + extra, seed + 20);
        let gdh = GpuTensor::from_f32(&ctx, "dh", &[rows + 2, d], &dh0).unwrap();
        let op = RouterBackwardOp { h: &gh, rows, weights: &w, dp: &dp, slot: 2, grads: &grads, dh: with_dh.then_some(&gdh) };
        let ds = router_backward(&ctx, "router.bwd", &op).unwrap();
        assert_eq!(ds.len(), 4 + (rows > BLOCK_ROWS) as usize + with_dh as usize);
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();

        let (want, dh) = router_backward_ref(&router_f64(&params), eps as f64, &to_f64(&h), rows, 1.3f32 as f64);
        let what = format!("rows {rows} d {d} r {r}");
        let want = [want.norm, want.w1, want.b1, want.w2, want.b2];
        for ((t, b), (name, g)) in grads.tensors().into_iter().zip(&before).zip(["norm", "w1", "b1", "w2", "b2"].into_iter().zip(want)) {
            let want: Vec<f32> = g.iter().zip(b).map(|(g, b)| (g + *b as f64) as f32).collect();
            assert_close(&t.read_f32(&ctx).unwrap(), &want, 1e-5, 1e-4, &format!("d {name} {what}"));
        }
        let mut want_dh: Vec<f32> = dh0.clone();
        if with_dh {
            want_dh.iter_mut().zip(&dh).for_each(|(w, g)| *w = (*w as f64 + g) as f32);
        }
        assert_close(&gdh.read_f32(&ctx).unwrap(), &want_dh, 1e-5, 1e-4, &format!("dh {what}"));
        assert_eq!(&gdh.read_f32(&ctx).unwrap()[rows * d..], &dh0[rows * d..], "dh past the rows ({what})");
        assert_eq!(dp.read_f32(&ctx).unwrap(), [9.0, -9.0, 1.3, 9.0], "dp written ({what})");
    }

    #[test]
    fn router_backward_matches_reference() {
        let shapes =
            [(1, 37, 5), (3, 37, 0), (130, 37, 5), (130, 37, 0), (64, 33, 1), (65, 33, 9), (5, 40, 300), (257, 576, 64), (2048, 64, 16)];
        for (i, (rows, d, r)) in shapes.into_iter().enumerate() {
            run_gpu(rows, d, r, true, 1000 + 30 * i as u64);
        }
        run_gpu(7, 37, 3, false, 5000);
    }

    #[test]
    fn router_grads_pair_with_the_weights() {
        let ctx = test_context();
        for r in [0, 4] {
            let (_, params) = case(1, 9, r, 3);
            let w = upload(&ctx, &params, r, 9, 1e-5);
            let grads = RouterGrads::zeros(&ctx, "g", &w).unwrap();
            let (wt, gt) = (w.tensors(), grads.tensors());
            assert_eq!(wt.len(), if r > 0 { 5 } else { 3 });
            assert_eq!(wt.iter().map(|t| &t.shape).collect::<Vec<_>>(), gt.iter().map(|t| &t.shape).collect::<Vec<_>>());
            for t in gt {
                assert!(t.read_f32(&ctx).unwrap().iter().all(|v| *v == 0.0));
            }
        }
    }

    #[test]
    fn router_backward_rejects_bad_operands() {
        let ctx = test_context();
        let (rows, d, r) = (3, 8, 2);
        let (h, params) = case(rows, d, r, 5);
        let w = upload(&ctx, &params, r, d, 1e-5);
        let gh = GpuTensor::from_f32(&ctx, "h", &[rows, d], &h).unwrap();
        let dp = GpuTensor::zeros(&ctx, "dp", DType::F32, &[2]).unwrap();
        let grads = RouterGrads::zeros(&ctx, "g", &w).unwrap();
        let dh = GpuTensor::zeros(&ctx, "dh", DType::F32, &[rows, d]).unwrap();
        let short = GpuTensor::zeros(&ctx, "short", DType::F32, &[rows * d - 1]).unwrap();
        let ids = GpuTensor::zeros(&ctx, "ids", DType::U32, &[rows * d]).unwrap();
        let op = RouterBackwardOp { h: &gh, rows, weights: &w, dp: &dp, slot: 1, grads: &grads, dh: Some(&dh) };
        assert!(router_backward(&ctx, "r.bwd", &op).is_ok());
        let no_w2 = RouterWeights { w2: None, ..w.clone() };
        let grads_no_b2 = RouterGrads { b2: None, ..grads.clone() };
        let grads_u32 = RouterGrads { norm: GpuTensor::zeros(&ctx, "n", DType::U32, &[d]).unwrap(), ..grads.clone() };
        let grads_short = RouterGrads { w1: GpuTensor::zeros(&ctx, "w1", DType::F32, &[r * d - 1]).unwrap(), ..grads.clone() };
        for (bad, what) in [
            (RouterBackwardOp { rows: 0, ..op }, "rows"),
            (RouterBackwardOp { rows: rows + 1, ..op }, "h has"),
            (RouterBackwardOp { h: &ids, ..op }, "h must be f32"),
            (RouterBackwardOp { slot: 2, ..op }, "dp ("),
            (RouterBackwardOp { dp: &ids, ..op }, "dp ("),
            (RouterBackwardOp { dh: Some(&short), ..op }, "dh ("),
            (RouterBackwardOp { dh: Some(&ids), ..op }, "dh ("),
            (RouterBackwardOp { weights: &no_w2, ..op }, "needs w2 and b2"),
            (RouterBackwardOp { grads: &grads_no_b2, ..op }, "need w2 and b2"),
            (RouterBackwardOp { grads: &grads_u32, ..op }, "d norm ("),
            (RouterBackwardOp { grads: &grads_short, ..op }, "d w1 ("),
        ] {
            let err = router_backward(&ctx, "r.bwd", &bad).err().unwrap().to_string();
            assert!(err.contains("r.bwd: ") && err.contains(what), "{what}: {err}");
        }
    }
}
