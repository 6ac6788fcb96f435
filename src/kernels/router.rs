//! FiRST router gate: the probability that a layer runs,
//! `p = sigmoid(w2 · silu(w1 · rmsnorm(mean_t h[t, :]) + b1) + b2)` (or
//! `sigmoid(w1 · rmsnorm(mean) + b1)` for a linear router, `r = 0`), written to `probs[slot]`.
//!
//! The mean over the T rows is computed in parallel: for T > [`BLOCK_ROWS`] a first dispatch sums
//! blocks of rows per column (`ceil(d / 64) x ceil(T / BLOCK_ROWS)` workgroups); a second
//! dispatch (one workgroup) adds the block sums, normalises, and runs the small MLP.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::MAX_GROUPS_PER_DIM;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};

const SOURCE: &str = include_str!("../../shaders/router.wgsl");

/// Rows summed per block by the column-sum dispatch; up to this many rows, one dispatch.
pub const BLOCK_ROWS: usize = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RouterParams {
    pub rows: u32,
    pub dim: u32,
    pub blocks: u32,
    pub block_rows: u32,
    pub r: u32,
    pub slot: u32,
    pub eps: f32,
    pub _pad0: u32,
}

/// One layer's router on the GPU (all f32).
#[derive(Debug, Clone)]
pub struct RouterWeights {
    /// `[d]` RMSNorm weight.
    pub norm: GpuTensor,
    pub eps: f32,
    /// `[r, d]`, or `[1, d]` when `r = 0`.
    pub w1: GpuTensor,
    /// `[r]` (or `[1]`).
    pub b1: GpuTensor,
    /// `[1, r]`; `None` when `r = 0`.
    pub w2: Option<GpuTensor>,
    /// `[1]`; `None` when `r = 0`.
    pub b2: Option<GpuTensor>,
    pub r: usize,
    pub d: usize,
}

fn check(label: &str, what: &str, t: &GpuTensor, need: usize) -> Result<(), GpuError> {
    if t.dtype != DType::F32 {
        return Err(GpuError::InvalidArgument(format!("{label}: router {what} must be f32, is {}", t.dtype)));
    }
    if t.numel() < need {
        return Err(GpuError::InvalidArgument(format!("{label}: router {what} has {} elements, needs {need}", t.numel())));
    }
    Ok(())
}

/// Prepare the router of one layer: `h` is `[rows, d]` f32; the probability goes to
/// `probs[slot]` (`probs`: `[n_layers]` f32). Returns one dispatch for `rows <= BLOCK_ROWS`, two
/// otherwise; run them in order in one pass.
pub fn router_gate(
    ctx: &GpuContext,
    label: &str,
    h: &GpuTensor,
    rows: usize,
    weights: &RouterWeights,
    probs: &GpuTensor,
    slot: usize,
) -> Result<Vec<Dispatch>, GpuError> {
    let (d, r) = (weights.d, weights.r);
    let nh = r.max(1);
    if rows == 0 || d == 0 {
        return Err(GpuError::InvalidArgument(format!("{label}: router over {rows} rows of {d}")));
    }
    check(label, "h", h, rows * d)?;
    check(label, "norm", &weights.norm, d)?;
    check(label, "w1", &weights.w1, nh * d)?;
    check(label, "b1", &weights.b1, nh)?;
    check(label, "probs", probs, slot + 1)?;
    let (w2, b2) = match (r, &weights.w2, &weights.b2) {
        (0, _, _) => (&weights.w1, &weights.b1), // unused by the shader, bound as placeholders
        (_, Some(w2), Some(b2)) => {
            check(label, "w2", w2, r)?;
            check(label, "b2", b2, 1)?;
            (w2, b2)
        }
        _ => return Err(GpuError::InvalidArgument(format!("{label}: router with r = {r} needs w2 and b2"))),
    };
    if rows * d > u32::MAX as usize || nh * d > u32::MAX as usize {
        return Err(GpuError::InvalidArgument(format!("{label}: router of [{rows}, {d}] is too large")));
    }
    let blocks = if rows > BLOCK_ROWS { rows.div_ceil(BLOCK_ROWS) } else { 0 };
    let col_groups = d.div_ceil(64);
    if blocks > MAX_GROUPS_PER_DIM as usize || col_groups > MAX_GROUPS_PER_DIM as usize {
        return Err(GpuError::InvalidArgument(format!("{label}: router of [{rows}, {d}] needs too many workgroups")));
    }
    let params = RouterParams {
        rows: rows as u32,
        dim: d as u32,
        blocks: blocks as u32,
        block_rows: BLOCK_ROWS as u32,
        r: r as u32,
        slot: slot as u32,
        eps: weights.eps,
        _pad0: 0,
    };
    let u = uniform(ctx, label, &params);
    let scratch = GpuTensor::zeros(ctx, &format!("{label}.scratch"), DType::F32, &[blocks + 1, d])?;
    let mut dispatches = Vec::with_capacity(2);
    if blocks > 0 {
        let pipeline = ctx.pipeline(&ShaderVariant::new("router", SOURCE, "router_colsum"))?;
        dispatches.push(Dispatch::new(
            ctx,
            &pipeline,
            format!("{label}.colsum"),
            &[u.as_entire_binding(), h.buffer.as_entire_binding(), scratch.buffer.as_entire_binding()],
            [col_groups as u32, blocks as u32, 1],
            Cost { flops: (rows * d) as u64, bytes: 4 * (rows * d + blocks * d) as u64 },
        ));
    }
    let pipeline = ctx.pipeline(&ShaderVariant::new("router", SOURCE, "router_mlp"))?;
    let read = if blocks > 0 { blocks * d } else { rows * d };
    dispatches.push(Dispatch::new(
        ctx,
        &pipeline,
        format!("{label}.mlp"),
        &[
            u.as_entire_binding(),
            h.buffer.as_entire_binding(),
            scratch.buffer.as_entire_binding(),
            weights.norm.buffer.as_entire_binding(),
            weights.w1.buffer.as_entire_binding(),
            weights.b1.buffer.as_entire_binding(),
            w2.buffer.as_entire_binding(),
            b2.buffer.as_entire_binding(),
            probs.buffer.as_entire_binding(),
        ],
        [1, 1, 1],
        Cost { flops: (read + 4 * d + 2 * nh * d + 6 * nh) as u64, bytes: 4 * (read + 3 * d + nh * d + 2 * nh + 2) as u64 },
    ));
    Ok(dispatches)
}

impl RouterWeights {
    /// Uploads one layer of a router file (`rank` r, hidden size `d`), checking every tensor's
    /// length first: `norm [d]`, `w1 [max(r, 1), d]`, `b1 [max(r, 1)]`, and for `r > 0`
    /// `w2 [1, r]` and `b2`.
    pub fn from_layer(
        ctx: &GpuContext,
        label: &str,
        layer: &crate::model::routers::RouterLayer,
        rank: usize,
        d: usize,
        eps: f32,
    ) -> Result<RouterWeights, GpuError> {
        let nh = rank.max(1);
        let len = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(GpuError::InvalidArgument(format!("{label}: router {what} has {got} values, expected {want} (r = {rank}, d = {d})")))
            }
        };
        len("norm", layer.norm.len(), d)?;
        len("w1", layer.w1.len(), nh * d)?;
        len("b1", layer.b1.len(), nh)?;
        let (w2, b2) = match (rank, &layer.w2, layer.b2) {
            (0, None, None) => (None, None),
            (0, _, _) => return Err(GpuError::InvalidArgument(format!("{label}: a linear router (r = 0) has no w2/b2"))),
            (_, Some(w2), Some(b2)) => {
                len("w2", w2.len(), rank)?;
                (
                    Some(GpuTensor::from_f32(ctx, &format!("{label}.w2"), &[1, rank], w2)?),
                    Some(GpuTensor::from_f32(ctx, &format!("{label}.b2"), &[1], &[b2])?),
                )
            }
            _ => return Err(GpuError::InvalidArgument(format!("{label}: router with r = {rank} needs w2 and b2"))),
        };
        Ok(RouterWeights {
            norm: GpuTensor::from_f32(ctx, &format!("{label}.norm"), &[d], &layer.norm)?,
            eps,
            w1: GpuTensor::from_f32(ctx, &format!("{label}.w1"), &[nh, d], &layer.w1)?,
            b1: GpuTensor::from_f32(ctx, &format!("{label}.b1"), &[nh], &layer.b1)?,
            w2,
            b2,
            r: rank,
            d,
        })
    }
}

/// CPU reference (f64 accumulation) of the router probability.
#[allow(clippy::too_many_arguments)]
pub fn router_ref(
    h: &[f32],
    rows: usize,
    d: usize,
    norm: &[f32],
    eps: f32,
    w1: &[f32],
    b1: &[f32],
    w2: Option<&[f32]>,
    b2: Option<f32>,
    r: usize,
) -> f32 {
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let mut mean = vec![0.0f64; d];
    for t in 0..rows {
        for c in 0..d {
            mean[c] += h[t * d + c] as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    let ms = mean.iter().map(|m| m * m).sum::<f64>() / d as f64;
    let scale = 1.0 / (ms + eps as f64).sqrt();
    let x: Vec<f64> = (0..d).map(|c| mean[c] * scale * norm[c] as f64).collect();
    let unit = |j: usize| b1[j] as f64 + (0..d).map(|c| w1[j * d + c] as f64 * x[c]).sum::<f64>();
    let z = if r == 0 {
        unit(0)
    } else {
        let w2 = w2.expect("router_ref: w2 is required when r > 0");
        let mut z = b2.unwrap_or(0.0) as f64;
        for (j, &w) in w2.iter().enumerate().take(r) {
            let a = unit(j);
            z += w as f64 * a * sigmoid(a);
        }
        z
    };
    sigmoid(z) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::testing::random_vec;

    struct Case {
        h: Vec<f32>,
        norm: Vec<f32>,
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: f32,
    }

    fn case(rows: usize, d: usize, r: usize, seed: u64) -> Case {
        let nh = r.max(1);
        // A per-column offset so that the mean is not just noise.
        let offset = random_vec(d, seed);
        let h: Vec<f32> = random_vec(rows * d, seed + 1).iter().enumerate().map(|(i, v)| v + offset[i % d]).collect();
        let norm: Vec<f32> = random_vec(d, seed + 2).iter().map(|v| 1.0 + 0.5 * v).collect();
        let s1 = 2.0 / (d as f32).sqrt();
        let w1: Vec<f32> = random_vec(nh * d, seed + 3).iter().map(|v| v * s1).collect();
        let b1 = random_vec(nh, seed + 4);
        let s2 = 2.0 / (nh as f32).sqrt();
        let w2: Vec<f32> = random_vec(nh, seed + 5).iter().map(|v| v * s2).collect();
        let b2 = random_vec(1, seed + 6)[0];
        Case { h, norm, w1, b1, w2, b2 }
    }

    fn upload(ctx: &GpuContext, c: &Case, d: usize, r: usize) -> RouterWeights {
        let nh = r.max(1);
        RouterWeights {
            norm: GpuTensor::from_f32(ctx, "norm", &[d], &c.norm).unwrap(),
            eps: 1e-5,
            w1: GpuTensor::from_f32(ctx, "w1", &[nh, d], &c.w1).unwrap(),
            b1: GpuTensor::from_f32(ctx, "b1", &[nh], &c.b1).unwrap(),
            w2: (r > 0).then(|| GpuTensor::from_f32(ctx, "w2", &[1, r], &c.w2).unwrap()),
            b2: (r > 0).then(|| GpuTensor::from_f32(ctx, "b2", &[1], &[c.b2]).unwrap()),
            r,
            d,
        }
    }

    fn reference(c: &Case, rows: usize, d: usize, r: usize) -> f32 {
        let (w2, b2) = if r > 0 { (Some(&c.w2[..]), Some(c.b2)) } else { (None, None) };
        router_ref(&c.h, rows, d, &c.norm, 1e-5, &c.w1, &c.b1, w2, b2, r)
    }

    #[test]
    fn router_matches_reference() {
        let ctx = test_context();
        let shapes =
            [(1, 7, 0), (1, 7, 3), (7, 257, 5), (64, 33, 1), (65, 33, 9), (257, 64, 16), (1757, 33, 0), (1757, 13, 7), (3000, 576, 64)];
        let mut probs_seen = Vec::new();
        for (i, &(rows, d, r)) in shapes.iter().enumerate() {
            let c = case(rows, d, r, 1000 + 10 * i as u64);
            let w = upload(&ctx, &c, d, r);
            let gh = GpuTensor::from_f32(&ctx, "h", &[rows, d], &c.h).unwrap();
            let probs = GpuTensor::from_f32(&ctx, "probs", &[4], &[-1.0; 4]).unwrap();
            let ds = router_gate(&ctx, "router", &gh, rows, &w, &probs, 2).unwrap();
            assert_eq!(ds.len(), if rows > BLOCK_ROWS { 2 } else { 1 });
            ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
            let got = probs.read_f32(&ctx).unwrap();
            let want = reference(&c, rows, d, r);
            assert!((got[2] - want).abs() < 2e-5, "router T={rows} d={d} r={r}: got {}, want {want}", got[2]);
            assert_eq!([got[0], got[1], got[3]], [-1.0; 3], "other slots written: {got:?}");
            probs_seen.push(want);
        }
        // The cases must exercise the sigmoid away from its saturated ends.
        assert!(probs_seen.iter().filter(|p| **p > 0.05 && **p < 0.95).count() >= shapes.len() / 2, "{probs_seen:?}");
    }

    #[test]
    fn router_rejects_bad_arguments() {
        let ctx = test_context();
        let (rows, d, r) = (3, 8, 2);
        let c = case(rows, d, r, 5);
        let w = upload(&ctx, &c, d, r);
        let gh = GpuTensor::from_f32(&ctx, "h", &[rows, d], &c.h).unwrap();
        let probs = GpuTensor::zeros(&ctx, "probs", DType::F32, &[2]).unwrap();
        assert!(router_gate(&ctx, "router", &gh, rows, &w, &probs, 2).is_err(), "slot out of range");
        assert!(router_gate(&ctx, "router", &gh, rows + 1, &w, &probs, 0).is_err(), "h too short");
        assert!(router_gate(&ctx, "router", &gh, 0, &w, &probs, 0).is_err(), "no rows");
        let no_w2 = RouterWeights { w2: None, ..w.clone() };
        assert!(router_gate(&ctx, "router", &gh, rows, &no_w2, &probs, 0).is_err(), "r > 0 without w2");
        assert!(router_gate(&ctx, "router", &gh, rows, &w, &probs, 1).is_ok());
    }
}
