//! Causal attention with GQA over the f32 KV cache, for prefill and decode.
//!
//! Two variants (see `shaders/attention.wgsl`):
//! - [`AttnVariant::Rows`]: one invocation per (query row, head) over all its keys; the prefill path.
//! - [`AttnVariant::Split`]: flash-decoding; the key range is cut into fixed chunks of
//!   `keys_per_split` keys, one invocation per (row, chunk, head) computes a partial online
//!   softmax, and a second dispatch merges the partials. The dispatch is sized for the whole
//!   cache (`max_pos`), so one prepared pair serves every decode step; chunks past the step's
//!   keys return at once.
//!
//! Both read `pos0` and `n_tokens` from the per-step uniform ([`StepBuffer`]).

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::rope::{cache_rows, check_f32, AttnShape};
use crate::kernels::step::StepBuffer;

const SOURCE: &str = include_str!("../../shaders/attention.wgsl");

/// Keys per split of the flash-decoding variant chosen by [`attention`].
pub const DEFAULT_KEYS_PER_SPLIT: usize = 32;

/// [`attention`] uses the split variant up to this many rows, the rows variant above.
pub const SPLIT_MAX_ROWS: usize = 4;

/// Which attention kernel to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnVariant {
    /// One invocation per (row, head) over all keys: one dispatch.
    Rows,
    /// Flash-decoding with this many keys per split: two dispatches (partials, combine).
    Split { keys_per_split: usize },
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AttnParams {
    pub rows: u32,
    pub n_heads: u32,
    pub group: u32,
    pub q_stride: u32,
    pub kv_stride: u32,
    pub max_pos: u32,
    pub splits: u32,
    pub keys_per_split: u32,
    pub scale: f32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// WGSL declaring the q/k/v bindings with accessors `q4/k4/v4(base, j) -> vec4<f32>` (lanes
/// 4j..4j+3 of the head starting at element `base`, zero past head_dim), and an output binding
/// with `store_NAME(base, j, v)`.
fn decls(head_dim: usize) -> (String, String, String) {
    let vec4 = head_dim % 4 == 0;
    let read = |binding: u32, var: &str, f: &str| {
        if vec4 {
            format!(
                "@group(0) @binding({binding}) var<storage, read> {var}: array<vec4<f32>>;\n\
                 fn {f}(base: u32, j: u32) -> vec4<f32> {{ return {var}[(base >> 2u) + j]; }}\n"
            )
        } else {
            format!(
                "@group(0) @binding({binding}) var<storage, read> {var}: array<f32>;\n\
                 fn {f}(base: u32, j: u32) -> vec4<f32> {{\n\
                 \x20   var r = vec4<f32>(0.0);\n\
                 \x20   let e = base + 4u * j;\n\
                 \x20   let n = min(HD - 4u * j, 4u);\n\
                 \x20   for (var c = 0u; c < n; c++) {{ r[c] = {var}[e + c]; }}\n\
                 \x20   return r;\n\
                 }}\n"
            )
        }
    };
    let write = |binding: u32, var: &str, f: &str| {
        if vec4 {
            format!(
                "@group(0) @binding({binding}) var<storage, read_write> {var}: array<vec4<f32>>;\n\
                 fn {f}(base: u32, j: u32, v: vec4<f32>) {{ {var}[(base >> 2u) + j] = v; }}\n"
            )
        } else {
            format!(
                "@group(0) @binding({binding}) var<storage, read_write> {var}: array<f32>;\n\
                 fn {f}(base: u32, j: u32, v: vec4<f32>) {{\n\
                 \x20   let e = base + 4u * j;\n\
                 \x20   let n = min(HD - 4u * j, 4u);\n\
                 \x20   for (var c = 0u; c < n; c++) {{ {var}[e + c] = v[c]; }}\n\
                 }}\n"
            )
        }
    };
    let qkv = read(2, "q", "q4") + &read(3, "k_cache", "k4") + &read(4, "v_cache", "v4");
    (qkv, write(5, "out", "store_out"), write(4, "c_out", "store_cout"))
}

fn variant(entry: &'static str, head_dim: usize) -> ShaderVariant {
    let (qkv, out, cout) = decls(head_dim);
    ShaderVariant::new("attention", SOURCE, entry)
        .define("HD", head_dim)
        .define("HD4", head_dim.div_ceil(4))
        .define("DECLS_QKV", qkv)
        .define("DECLS_OUT", out)
        .define("DECLS_COUT", cout)
}

/// The variant [`attention`] picks for `rows` query rows.
pub fn default_variant(rows: usize) -> AttnVariant {
    if rows <= SPLIT_MAX_ROWS {
        AttnVariant::Split { keys_per_split: DEFAULT_KEYS_PER_SPLIT }
    } else {
        AttnVariant::Rows
    }
}

/// Causal attention with GQA (kv head = h / (n_heads / n_kv_heads)): for t < rows (the step's
/// `n_tokens`, at most `rows`), the query at position `p = pos0 + t` attends to cache rows 0..=p.
/// `q`, `out`: `[T, n_heads head_dim]` f32; caches `[max_pos, n_kv_heads head_dim]` f32.
/// `rows` sizes the dispatch; pos0 and n_tokens come from `step` at run time. Picks the variant
/// with [`default_variant`].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    ctx: &GpuContext,
    label: &str,
    q: &GpuTensor,
    rows: usize,
    k_cache: &GpuTensor,
    v_cache: &GpuTensor,
    shape: AttnShape,
    step: &StepBuffer,
    out: &GpuTensor,
) -> Result<Vec<Dispatch>, GpuError> {
    attention_variant(ctx, label, q, rows, k_cache, v_cache, shape, step, out, default_variant(rows))
}

/// [`attention`] with an explicit variant.
#[allow(clippy::too_many_arguments)]
pub fn attention_variant(
    ctx: &GpuContext,
    label: &str,
    q: &GpuTensor,
    rows: usize,
    k_cache: &GpuTensor,
    v_cache: &GpuTensor,
    shape: AttnShape,
    step: &StepBuffer,
    out: &GpuTensor,
    variant_choice: AttnVariant,
) -> Result<Vec<Dispatch>, GpuError> {
    shape.check()?;
    if rows == 0 {
        return Err(GpuError::InvalidArgument(format!("{label}: rows must be at least 1")));
    }
    let hd = shape.head_dim;
    check_f32(q, rows * shape.q_dim(), "q")?;
    check_f32(out, rows * shape.q_dim(), "out")?;
    let k_rows = cache_rows(k_cache, shape.kv_dim(), "k_cache")?;
    let v_rows = cache_rows(v_cache, shape.kv_dim(), "v_cache")?;
    let max_pos = k_rows.min(v_rows);
    let (splits, keys_per_split) = match variant_choice {
        AttnVariant::Rows => (1, max_pos),
        AttnVariant::Split { keys_per_split } => {
            if keys_per_split == 0 {
                return Err(GpuError::InvalidArgument(format!("{label}: keys_per_split must be at least 1")));
            }
            (max_pos.div_ceil(keys_per_split), keys_per_split)
        }
    };
    let hd4 = hd.div_ceil(4);
    let invocations = match variant_choice {
        AttnVariant::Rows => rows * shape.n_heads,
        AttnVariant::Split { .. } => (rows * splits * shape.n_heads).max(rows * shape.n_heads * hd4),
    };
    if invocations > u32::MAX as usize || rows * splits * shape.n_heads * hd4 > u32::MAX as usize {
        return Err(GpuError::InvalidArgument(format!("{label}: {rows} rows are too many for one dispatch")));
    }
    let params = AttnParams {
        rows: rows as u32,
        n_heads: shape.n_heads as u32,
        group: (shape.n_heads / shape.n_kv_heads) as u32,
        q_stride: shape.q_dim() as u32,
        kv_stride: shape.kv_dim() as u32,
        max_pos: max_pos as u32,
        splits: splits as u32,
        keys_per_split: keys_per_split as u32,
        scale: 1.0 / (hd as f32).sqrt(),
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    };
    let u = uniform(ctx, label, &params);
    // Cost of a step with the full cache (the dispatch is sized for it).
    let attn_cost = Cost {
        flops: (4 * rows * shape.n_heads * max_pos * hd) as u64,
        bytes: (4 * (2 * rows * shape.q_dim() + 2 * max_pos * shape.kv_dim())) as u64,
    };
    match variant_choice {
        AttnVariant::Rows => {
            let pipeline = ctx.pipeline(&variant("attn_rows", hd))?;
            Ok(vec![Dispatch::new(
                ctx,
                &pipeline,
                label,
                &[
                    u.as_entire_binding(),
                    step.buffer.as_entire_binding(),
                    q.buffer.as_entire_binding(),
                    k_cache.buffer.as_entire_binding(),
                    v_cache.buffer.as_entire_binding(),
                    out.buffer.as_entire_binding(),
                ],
                grid((rows * shape.n_heads).div_ceil(64) as u32),
                attn_cost,
            )])
        }
        AttnVariant::Split { .. } => {
            let n_part = rows * splits * shape.n_heads;
            let part_ml = GpuTensor::zeros(ctx, &format!("{label}.part_ml"), DType::F32, &[n_part, 2])?;
            let part_acc = GpuTensor::zeros(ctx, &format!("{label}.part_acc"), DType::F32, &[n_part, hd4 * 4])?;
            let split = ctx.pipeline(&variant("attn_split", hd))?;
            let combine = ctx.pipeline(&variant("attn_combine", hd))?;
            let partials = Dispatch::new(
                ctx,
                &split,
                format!("{label}.split"),
                &[
                    u.as_entire_binding(),
                    step.buffer.as_entire_binding(),
                    q.buffer.as_entire_binding(),
                    k_cache.buffer.as_entire_binding(),
                    v_cache.buffer.as_entire_binding(),
                    part_ml.buffer.as_entire_binding(),
                    part_acc.buffer.as_entire_binding(),
                ],
                grid(n_part.div_ceil(64) as u32),
                Cost { bytes: attn_cost.bytes + (4 * n_part * (2 + hd4 * 4)) as u64, ..attn_cost },
            );
            let n_comb = rows * shape.n_heads * hd4;
            let merge = Dispatch::new(
                ctx,
                &combine,
                format!("{label}.combine"),
                &[
                    u.as_entire_binding(),
                    step.buffer.as_entire_binding(),
                    part_ml.buffer.as_entire_binding(),
                    part_acc.buffer.as_entire_binding(),
                    out.buffer.as_entire_binding(),
                ],
                grid(n_comb.div_ceil(64) as u32),
                Cost {
                    flops: (4 * n_part * hd4 * 4) as u64,
                    bytes: (4 * (n_part * (2 + hd4 * 4) + rows * shape.q_dim())) as u64,
                },
            );
            Ok(vec![partials, merge])
        }
    }
}

/// CPU reference (f64 accumulation): `q` `[rows, n_heads head_dim]`, caches `[>= pos0 + rows,
/// n_kv_heads head_dim]`; row t at position pos0 + t attends to cache rows 0..=pos0 + t.
pub fn attention_ref(q: &[f32], rows: usize, k_cache: &[f32], v_cache: &[f32], pos0: usize, shape: AttnShape) -> Vec<f32> {
    let (hd, qd, kvd) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0f32; rows * qd];
    let mut scores = Vec::new();
    for t in 0..rows {
        let n_keys = pos0 + t + 1;
        for h in 0..shape.n_heads {
            let qh = &q[t * qd + h * hd..][..hd];
            let kvb = (h / group) * hd;
            scores.clear();
            for key in 0..n_keys {
                let kh = &k_cache[key * kvd + kvb..][..hd];
                let s: f64 = qh.iter().zip(kh).map(|(&a, &b)| a as f64 * b as f64).sum();
                scores.push(s * scale);
            }
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - m).exp();
                sum += *s;
            }
            let o = &mut out[t * qd + h * hd..][..hd];
            for (i, oi) in o.iter_mut().enumerate() {
                let mut acc = 0.0;
                for (key, &w) in scores.iter().enumerate() {
                    acc += w * v_cache[key * kvd + kvb + i] as f64;
                }
                *oi = (acc / sum) as f32;
            }
        }
    }
    out
}
