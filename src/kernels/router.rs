//! FiRST router gate: the probability that a layer runs,
//! `p = sigmoid(w2 · silu(w1 · rmsnorm(mean_t h[t, :]) + b1) + b2)` (or
//! `sigmoid(w1 · rmsnorm(mean) + b1)` for a linear router, `r = 0`), written to `probs[slot]`.
//!
//! The mean over the T rows is computed in parallel: for T > [`BLOCK_ROWS`] a first dispatch sums
//! blocks of rows per column (`ceil(d / 64) x ceil(T / BLOCK_ROWS)` workgroups); a second
//! dispatch (one workgroup) adds the block sums, normalises, and runs the small MLP.
//!
//! The CPU definition of a router is `model::routers::RouterLayer::probability`; kernels do not
//! depend on model files, so the comparison with it lives in `runtime/routed/tests.rs`.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::MAX_GROUPS_PER_DIM;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor};

const SOURCE: &str = include_str!("../../shaders/router.wgsl");

/// Rows summed per block by the column-sum dispatch; up to this many rows, one dispatch.
pub const BLOCK_ROWS: usize = 64;

/// The shader's uniform (`RouterParams` in `shaders/router.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RouterParams {
    /// T: rows of `h`.
    pub rows: u32,
    /// d: columns of `h`.
    pub dim: u32,
    /// Blocks of [`BLOCK_ROWS`] rows summed by the column-sum dispatch; 0 when there is none.
    pub blocks: u32,
    /// [`BLOCK_ROWS`].
    pub block_rows: u32,
    /// Router rank r (0: linear router).
    pub r: u32,
    /// Index into `probs` written.
    pub slot: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Padding to 16 bytes.
    pub _pad0: u32,
}

/// One layer's router on the GPU (all f32).
#[derive(Debug, Clone)]
pub struct RouterWeights {
    /// `[d]` RMSNorm weight.
    pub norm: GpuTensor,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// `[r, d]`, or `[1, d]` when `r = 0`.
    pub w1: GpuTensor,
    /// `[r]` (or `[1]`).
    pub b1: GpuTensor,
    /// `[1, r]`; `None` when `r = 0`.
    pub w2: Option<GpuTensor>,
    /// `[1]`; `None` when `r = 0`.
    pub b2: Option<GpuTensor>,
    /// Rank r (0: linear router).
    pub r: usize,
    /// Hidden size d.
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

impl RouterWeights {
    /// The tensors in a fixed order: norm, w1, b1, then w2 and b2 when present. The gradients'
    /// [`RouterGrads::tensors`](crate::kernels::router_backward::RouterGrads::tensors) list theirs
    /// in the same order, so that the optimizer pairs them.
    pub fn tensors(&self) -> Vec<&GpuTensor> {
        let mut v = vec![&self.norm, &self.w1, &self.b1];
        v.extend(self.w2.iter().chain(&self.b2));
        v
    }
}

/// A router's sizes after the checks that [`router_gate`] and the router backward share.
pub(crate) struct CheckedRouter<'a> {
    /// Hidden units `max(r, 1)`.
    pub nh: usize,
    /// Blocks of [`BLOCK_ROWS`] rows for the column-sum dispatch; 0 when there is none.
    pub blocks: usize,
    /// w2 and b2; for `r = 0`, w1 and b1 as placeholders (the shaders do not read them then).
    pub w2: &'a GpuTensor,
    /// See `w2`.
    pub b2: &'a GpuTensor,
}

/// Checks a router over `rows` rows of `h` (f32, at least `rows * d`) and its weights (f32,
/// sizes as [`RouterWeights`] says, w2 and b2 present when `r > 0`), that the indices fit u32 and
/// the column sums fit the workgroup limits.
pub(crate) fn check_router<'a>(label: &str, h: &GpuTensor, rows: usize, weights: &'a RouterWeights) -> Result<CheckedRouter<'a>, GpuError> {
    let (d, r) = (weights.d, weights.r);
    let nh = r.max(1);
    if rows == 0 || d == 0 {
        return Err(GpuError::InvalidArgument(format!("{label}: router over {rows} rows of {d}")));
    }
    if rows.checked_mul(d).is_none_or(|n| n > u32::MAX as usize) || nh.checked_mul(d).is_none_or(|n| n > u32::MAX as usize) {
        return Err(GpuError::InvalidArgument(format!("{label}: router of [{rows}, {d}] is too large")));
    }
    check(label, "h", h, rows * d)?;
    check(label, "norm", &weights.norm, d)?;
    check(label, "w1", &weights.w1, nh * d)?;
    check(label, "b1", &weights.b1, nh)?;
    let (w2, b2) = match (r, &weights.w2, &weights.b2) {
        (0, _, _) => (&weights.w1, &weights.b1),
        (_, Some(w2), Some(b2)) => {
            check(label, "w2", w2, r)?;
            check(label, "b2", b2, 1)?;
            (w2, b2)
        }
        _ => return Err(GpuError::InvalidArgument(format!("{label}: router with r = {r} needs w2 and b2"))),
    };
    let blocks = if rows > BLOCK_ROWS { rows.div_ceil(BLOCK_ROWS) } else { 0 };
    if blocks > MAX_GROUPS_PER_DIM as usize || d.div_ceil(64) > MAX_GROUPS_PER_DIM as usize {
        return Err(GpuError::InvalidArgument(format!("{label}: router of [{rows}, {d}] needs too many workgroups")));
    }
    Ok(CheckedRouter { nh, blocks, w2, b2 })
}

/// The column-sum dispatch `{label}.colsum` (`router_colsum`) for `blocks > 0` blocks of
/// [`BLOCK_ROWS`] rows: `scratch[b, c] = Σ_{t in block b} h[t, c]` for `h [rows, d]` f32 into
/// rows `0..blocks` of `scratch` (f32, at least `blocks * d`). Sizes as [`check_router`] checked.
pub(crate) fn column_sums(
    ctx: &GpuContext,
    label: &str,
    h: &GpuTensor,
    rows: usize,
    d: usize,
    blocks: usize,
    scratch: &GpuTensor,
) -> Result<Dispatch, GpuError> {
    let params =
        RouterParams { rows: rows as u32, dim: d as u32, blocks: blocks as u32, block_rows: BLOCK_ROWS as u32, ..Zeroable::zeroed() };
    let u = uniform(ctx, label, &params);
    let pipeline = ctx.pipeline(&super::snippet_variant("router", SOURCE, "router_colsum"))?;
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        format!("{label}.colsum"),
        &[u.as_entire_binding(), h.buffer.as_entire_binding(), scratch.buffer.as_entire_binding()],
        [d.div_ceil(64) as u32, blocks as u32, 1],
        Cost { flops: (rows * d) as u64, bytes: 4 * (rows * d + blocks * d) as u64 },
    ))
}

/// Prepare the router of one layer: `h` is `[rows, d]` f32; the probability goes to
/// `probs[slot]` (`probs`: `[n_layers]` f32). Returns one dispatch for `rows <= BLOCK_ROWS`, two
/// otherwise; run them in order in one pass.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows or d is 0, an operand is not f32 or
/// too small, w2 or b2 is missing for `r > 0`, or the sizes exceed u32 indexing or the
/// workgroup limits; a buffer error for the scratch.
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
    let CheckedRouter { nh, blocks, w2, b2 } = check_router(label, h, rows, weights)?;
    if slot > u32::MAX as usize {
        return Err(GpuError::InvalidArgument(format!("{label}: router slot {slot} is too large")));
    }
    check(label, "probs", probs, slot + 1)?;
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
        dispatches.push(column_sums(ctx, label, h, rows, d, blocks, &scratch)?);
    }
    let pipeline = ctx.pipeline(&super::snippet_variant("router", SOURCE, "router_mlp"))?;
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
