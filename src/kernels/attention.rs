//! Causal attention with GQA over the f32 KV cache, for prefill and decode.
//!
//! Two variants (see `shaders/attention.wgsl`):
//! - [`AttnVariant::Rows`]: one invocation per (query row, head) over all its keys; the prefill path.
//! - [`AttnVariant::Split`]: flash-decoding; the key range is cut into chunks of at least
//!   `keys_per_split` keys, one invocation per (row, chunk, head) computes a partial online
//!   softmax, and a second dispatch merges the partials. The dispatch is sized for the whole
//!   cache (`max_pos`), so one prepared pair serves every decode step; chunks past the step's
//!   keys return at once. On a CPU adapter the chunks are few ([`cpu_max_splits`]) and grow
//!   with the step's keys ([`split_count`]), and a workgroup is one SIMD group of 8
//!   invocations, so that a short context's few chunks still spread over every core.
//!
//! Both read `pos0` and `n_tokens` from the per-step uniform ([`StepBuffer`]).

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant, WeightKind};
use crate::kernels::checks::{cache_rows, check_f32, check_rows, invalid};
use crate::kernels::step::StepBuffer;

const SOURCE: &str = include_str!("../../shaders/attention.wgsl");

/// Heads and head size of an attention layer (also the layout of the fused qkv rows that
/// [`crate::kernels::rope::rope_qkv_write`] splits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA: each serves `n_heads / n_kv_heads` query heads).
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl AttnShape {
    /// Width of one q row, `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of one k or v cache row, `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of one fused qkv row, `(n_heads + 2 * n_kv_heads) * head_dim`.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Checks the shape for the op `label`.
    ///
    /// # Errors
    /// [`GpuError::InvalidArgument`] naming `label` unless every size is non-zero and `n_heads`
    /// is a multiple of `n_kv_heads` (GQA).
    pub fn check(&self, label: &str) -> Result<(), GpuError> {
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(invalid(label, format!("attention shape {self:?}: sizes must be non-zero and n_heads a multiple of n_kv_heads")));
        }
        Ok(())
    }
}

/// The operands of one attention op (see [`attention`]).
#[derive(Debug, Clone, Copy)]
pub struct AttnOp<'a> {
    /// Rotated queries, `[row0 + rows, n_heads * head_dim]` f32.
    pub q: &'a GpuTensor,
    /// Query rows the dispatch is sized for (the step's `n_tokens` may be fewer); at least 1.
    pub rows: usize,
    /// First row of `q` and `out` the step's rows use: step row t is row `row0 + t` (0 but in a
    /// batched decode step, where each sequence has its row of the batch's tensors).
    pub row0: usize,
    /// Key cache, `[max_pos, n_kv_heads * head_dim]` f32.
    pub k_cache: &'a GpuTensor,
    /// Value cache, `[max_pos, n_kv_heads * head_dim]` f32.
    pub v_cache: &'a GpuTensor,
    /// Heads and head size.
    pub shape: AttnShape,
    /// The per-step uniform (`pos0`, `n_tokens`), read at run time.
    pub step: &'a StepBuffer,
    /// Output, `[row0 + rows, n_heads * head_dim]` f32.
    pub out: &'a GpuTensor,
}

/// Keys per split of the flash-decoding variant chosen by [`attention`] on a GPU.
pub const DEFAULT_KEYS_PER_SPLIT: usize = 32;

/// The fewest keys per split of the flash-decoding variant chosen by [`attention`] on a CPU
/// adapter, where [`cpu_max_splits`] caps the splits (BENCHMARKS.md, "Decode attention over
/// every core").
pub const CPU_KEYS_PER_SPLIT: usize = 8;

/// Invocations per `attn_rows` and `attn_split` workgroup on a CPU adapter: one SIMD group of
/// lavapipe's 256-bit lanes ([`workgroup_size`]).
pub const CPU_SIMD_WORKGROUP: usize = 8;

/// Workgroups per thread that [`cpu_max_splits`] aims at, so that the threads stay balanced
/// when one ends early.
pub const CPU_WORKGROUPS_PER_THREAD: usize = 3;

/// [`attention`] uses the split variant up to this many rows, the rows variant above.
pub const SPLIT_MAX_ROWS: usize = 4;

/// Which attention kernel to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnVariant {
    /// One invocation per (row, head) over all keys: one dispatch.
    Rows,
    /// Flash-decoding (Dao et al. 2023): two dispatches (partials, combine).
    Split {
        /// Keys per split (at least 1); more where [`split_count`] caps the splits.
        keys_per_split: usize,
    },
}

/// Uniform of `shaders/attention.wgsl` (`struct Params` there, same fields in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AttnParams {
    /// Query rows the dispatch is sized for.
    pub rows: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Query heads per kv head (`n_heads / n_kv_heads`).
    pub group: u32,
    /// Row stride of q and out (`n_heads * head_dim`).
    pub q_stride: u32,
    /// Row stride of the caches (`n_kv_heads * head_dim`).
    pub kv_stride: u32,
    /// Rows of the caches.
    pub max_pos: u32,
    /// Key-range splits (`Split`, [`split_count`]), else 1.
    pub splits: u32,
    /// The fewest keys per split (`Split`; a step with more keys than `splits` such splits
    /// hold gives each split `ceil(keys / splits)`), else `max_pos`.
    pub keys_per_split: u32,
    /// Score scale `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// First row of q and out that the step's rows use.
    pub row0: u32,
    /// Padding to 48 bytes.
    pub _pad1: u32,
    /// Padding to 48 bytes.
    pub _pad2: u32,
}

/// WGSL declaring the storage binding `var` (f32 rows of heads of `head_dim` elements) with an
/// accessor for one head: reading (`write` false) `fn f(base: u32, j: u32) -> vec4<f32>` gives
/// lanes 4j..4j+3 of the head starting at element `base`, zero past head_dim; writing
/// (`write` true, a `read_write` binding) `fn f(base: u32, j: u32, v: vec4<f32>)` stores the
/// lanes below head_dim. Declared as `array<vec4<f32>>` when head_dim % 4 == 0 (heads start on
/// a vec4 boundary), else as `array<f32>` with per-element loops. The shader defines `HD`
/// (head_dim). Shared by the attention forward and backward kernels.
pub(crate) fn head_access(binding: u32, var: &str, f: &str, head_dim: usize, write: bool) -> String {
    let vec4 = head_dim.is_multiple_of(4);
    match (vec4, write) {
        (true, false) => format!(
            "@group(0) @binding({binding}) var<storage, read> {var}: array<vec4<f32>>;\n\
             fn {f}(base: u32, j: u32) -> vec4<f32> {{ return {var}[(base >> 2u) + j]; }}\n"
        ),
        (false, false) => format!(
            "@group(0) @binding({binding}) var<storage, read> {var}: array<f32>;\n\
             fn {f}(base: u32, j: u32) -> vec4<f32> {{\n\
             \x20   var r = vec4<f32>(0.0);\n\
             \x20   let e = base + 4u * j;\n\
             \x20   let n = min(HD - 4u * j, 4u);\n\
             \x20   for (var c = 0u; c < n; c++) {{ r[c] = {var}[e + c]; }}\n\
             \x20   return r;\n\
             }}\n"
        ),
        (true, true) => format!(
            "@group(0) @binding({binding}) var<storage, read_write> {var}: array<vec4<f32>>;\n\
             fn {f}(base: u32, j: u32, v: vec4<f32>) {{ {var}[(base >> 2u) + j] = v; }}\n"
        ),
        (false, true) => format!(
            "@group(0) @binding({binding}) var<storage, read_write> {var}: array<f32>;\n\
             fn {f}(base: u32, j: u32, v: vec4<f32>) {{\n\
             \x20   let e = base + 4u * j;\n\
             \x20   let n = min(HD - 4u * j, 4u);\n\
             \x20   for (var c = 0u; c < n; c++) {{ {var}[e + c] = v[c]; }}\n\
             }}\n"
        ),
    }
}

/// Query heads per invocation of `attn_rows` and `attn_split` on this adapter: on a CPU adapter
/// the largest divisor of the group size `n_heads / n_kv_heads` that is at most
/// [`MAX_HEADS_PER_INVOCATION`], elsewhere 1. The heads of one invocation share their kv head,
/// so each key's k and v rows are read once for all of them (on lavapipe, SmolLM2's 9/3 heads:
/// decode attention 1.3x faster at position 128 and 1.6x at 1024, `cargo bench --bench kernels
/// -- "attention decode"`; BENCHMARKS.md). A GPU would hold each head's q and accumulator in
/// registers (`2 x heads x head_dim` floats per invocation), which several heads would spill, and
/// it has not been measured there.
pub fn heads_per_invocation(ctx: &GpuContext, shape: AttnShape) -> usize {
    if !ctx.is_cpu() {
        return 1;
    }
    let group = shape.n_heads / shape.n_kv_heads.max(1);
    (1..=MAX_HEADS_PER_INVOCATION.min(group)).rev().find(|g| group.is_multiple_of(*g)).unwrap_or(1)
}

/// The most query heads one attention invocation takes (its private q and acc hold
/// `heads x head_dim` values each).
pub const MAX_HEADS_PER_INVOCATION: usize = 4;

/// Splits of a row's keys that [`attention_variant`] prepares for `max_pos` cache rows, at
/// least `keys_per_split` keys per split and `head_blocks` invocations per split:
/// `ceil(max_pos / keys_per_split)`, at most [`cpu_max_splits`] on a CPU adapter. Where the cap
/// binds, a step with `n` keys gives each split `max(keys_per_split, ceil(n / splits))` keys
/// (`split_keys` in the shader).
pub fn split_count(ctx: &GpuContext, max_pos: usize, keys_per_split: usize, head_blocks: usize) -> usize {
    let splits = max_pos.div_ceil(keys_per_split.max(1)).max(1);
    if ctx.is_cpu() { splits.min(cpu_max_splits(head_blocks, cpu_threads())) } else { splits }
}

/// The most splits of a row's keys on a CPU adapter for `head_blocks` invocations per split
/// (query heads / heads per invocation) and `threads` threads: enough for
/// [`CPU_WORKGROUPS_PER_THREAD`] workgroups of [`CPU_SIMD_WORKGROUP`] per thread (SmolLM2's 3
/// blocks on 2 threads: 16 splits, 48 invocations, 6 workgroups), at least 1. lavapipe hands
/// whole workgroups to its threads, one per core, and runs a workgroup of 8 as one SIMD group;
/// each further split is one more q load and partial to write and merge.
pub fn cpu_max_splits(head_blocks: usize, threads: usize) -> usize {
    (CPU_WORKGROUPS_PER_THREAD * CPU_SIMD_WORKGROUP * threads.max(1)).div_ceil(head_blocks.max(1)).max(1)
}

/// Threads lavapipe runs a dispatch's workgroups on: one per core it may use.
fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Invocations per workgroup of `attn_rows` (one query row each) and `attn_split`:
/// [`CPU_SIMD_WORKGROUP`] (one SIMD group of lavapipe's 256-bit lanes) on a CPU adapter, 64
/// elsewhere. Every row of an `attn_rows` workgroup walks the keys of its last row, so fewer
/// rows waste fewer masked keys; and the few splits of `attn_split` that hold keys at a short
/// position reach every thread.
pub fn workgroup_size(ctx: &GpuContext) -> usize {
    if ctx.is_cpu() { CPU_SIMD_WORKGROUP } else { 64 }
}

/// Whether `attn_rows` and `attn_split` read the k and v caches eight lanes per load, as
/// `array<vec4<u64>>` (the wide layout): on a CPU adapter with SHADER_INT64 where `head_dim` is a
/// multiple of 8 (every head, and so every cache row, starts on a 32-byte boundary). On lavapipe
/// each storage load in a loop is a per-lane loop with a bounds check per component, whatever its
/// width, so half as many loads of twice the width halves that work (BENCHMARKS.md, "Attention
/// reads k and v eight lanes per load": about 10% of attention's time in the model; the driver's
/// compile of the kernels was not measurably shorter).
pub fn wide_kv(ctx: &GpuContext, head_dim: usize) -> bool {
    ctx.is_cpu() && ctx.has_int64() && head_dim.is_multiple_of(8)
}

/// WGSL declaring the cache `var` (read-only storage at `binding`) with `f8(base, j) ->
/// array<vec4<f32>, 2>`: lanes 8j..8j+7 of the head starting at element `base`, zero past
/// head_dim. Wide ([`wide_kv`]): one `vec4<u64>` load, through the `{var}_8` accessor of
/// [`WeightKind::F32Wide`]'s declaration; otherwise two loads through the `f4` accessor of
/// [`head_access`].
fn kv_access(binding: u32, var: &str, f8: &str, f4: &str, head_dim: usize, wide: bool) -> String {
    if wide {
        return WeightKind::F32Wide.declare(binding, var)
            + &format!("fn {f8}(base: u32, j: u32) -> array<vec4<f32>, 2> {{ return {var}_8((base >> 3u) + j); }}\n");
    }
    head_access(binding, var, f4, head_dim, false)
        + &format!(
            "fn {f8}(base: u32, j: u32) -> array<vec4<f32>, 2> {{\n\
             \x20   var hi = vec4<f32>(0.0);\n\
             \x20   if (2u * j + 1u < HD4) {{ hi = {f4}(base, 2u * j + 1u); }}\n\
             \x20   return array<vec4<f32>, 2>({f4}(base, 2u * j), hi);\n\
             }}\n"
        )
}

fn variant(ctx: &GpuContext, entry: &'static str, head_dim: usize, heads: usize) -> ShaderVariant {
    let wide = wide_kv(ctx, head_dim);
    let qkv = head_access(2, "q", "q4", head_dim, false)
        + &kv_access(3, "k_cache", "k8", "k4", head_dim, wide)
        + &kv_access(4, "v_cache", "v8", "v4", head_dim, wide);
    let out = head_access(5, "out", "store_out", head_dim, true);
    let cout = head_access(4, "c_out", "store_cout", head_dim, true);
    super::snippet_variant("attention", SOURCE, entry)
        .define("HD", head_dim)
        .define("HD4", head_dim.div_ceil(4))
        .define("GB", heads)
        .define("GBHD4", heads * head_dim.div_ceil(4))
        .define("HP", head_dim.div_ceil(4).div_ceil(2))
        .define("WG", workgroup_size(ctx))
        .define("DECLS_QKV", qkv)
        .define("DECLS_OUT", out)
        .define("DECLS_COUT", cout)
}

/// The variant [`attention`] picks for `rows` query rows on `ctx`'s adapter: `Split` up to
/// [`SPLIT_MAX_ROWS`] rows ([`CPU_KEYS_PER_SPLIT`] keys per split on a CPU adapter,
/// [`DEFAULT_KEYS_PER_SPLIT`] elsewhere), `Rows` above.
pub fn default_variant(ctx: &GpuContext, rows: usize) -> AttnVariant {
    let keys_per_split = if ctx.is_cpu() { CPU_KEYS_PER_SPLIT } else { DEFAULT_KEYS_PER_SPLIT };
    if rows <= SPLIT_MAX_ROWS { AttnVariant::Split { keys_per_split } } else { AttnVariant::Rows }
}

/// Causal attention with GQA (kv head = h / (n_heads / n_kv_heads)): for t < rows (the step's
/// `n_tokens`, at most `op.rows`), the query at position `p = pos0 + t` attends to cache rows
/// 0..=p, `out[t] = softmax(q[t] · Kᵀ / sqrt(head_dim)) · V` per head (Vaswani et al. 2017, as
/// Hugging Face's `LlamaAttention` with `repeat_kv`). `op.rows` sizes the dispatch; pos0 and
/// n_tokens come from `op.step` at run time. Picks the variant with [`default_variant`].
///
/// # Errors
/// As [`attention_variant`].
pub fn attention(ctx: &GpuContext, label: &str, op: &AttnOp) -> Result<Vec<Dispatch>, GpuError> {
    attention_variant(ctx, label, op, default_variant(ctx, op.rows))
}

/// [`attention`] with an explicit variant: one dispatch (`Rows`) or two (`Split`: partials named
/// `label.split`, merge named `label.combine`).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when the shape is invalid, rows is 0, q or out
/// is not f32 or too small for `rows` rows, a cache is not f32 or not a whole number of rows,
/// `keys_per_split` is 0, or the dispatch would need more than 2^32 invocations.
pub fn attention_variant(ctx: &GpuContext, label: &str, op: &AttnOp, variant_choice: AttnVariant) -> Result<Vec<Dispatch>, GpuError> {
    let AttnOp { q, rows, row0, k_cache, v_cache, shape, step, out } = *op;
    shape.check(label)?;
    check_rows(label, rows)?;
    let hd = shape.head_dim;
    let end =
        row0.checked_add(rows).filter(|&e| e <= u32::MAX as usize).ok_or_else(|| invalid(label, format!("row0 {row0} is too large")))?;
    check_f32(label, q, end * shape.q_dim(), "q")?;
    check_f32(label, out, end * shape.q_dim(), "out")?;
    let k_rows = cache_rows(label, k_cache, shape.kv_dim(), "k_cache")?;
    let v_rows = cache_rows(label, v_cache, shape.kv_dim(), "v_cache")?;
    let max_pos = k_rows.min(v_rows);
    let gb = heads_per_invocation(ctx, shape);
    let (splits, keys_per_split) = match variant_choice {
        AttnVariant::Rows => (1, max_pos),
        AttnVariant::Split { keys_per_split } => {
            if keys_per_split == 0 {
                return Err(invalid(label, "keys_per_split must be at least 1"));
            }
            (split_count(ctx, max_pos, keys_per_split, shape.n_heads / gb), keys_per_split)
        }
    };
    let hd4 = hd.div_ceil(4);
    let invocations = match variant_choice {
        AttnVariant::Rows => rows * shape.n_heads,
        AttnVariant::Split { .. } => (rows * splits * shape.n_heads).max(rows * shape.n_heads * hd4),
    };
    let row_groups = rows.div_ceil(workgroup_size(ctx));
    if invocations > u32::MAX as usize
        || rows * splits * shape.n_heads * hd4 > u32::MAX as usize
        || row_groups > crate::gpu::dispatch::MAX_GROUPS_PER_DIM as usize
    {
        return Err(invalid(label, format!("{rows} rows are too many for one dispatch")));
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
        row0: row0 as u32,
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
            let pipeline = ctx.pipeline(&variant(ctx, "attn_rows", hd, gb))?;
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
                [row_groups as u32, (shape.n_heads / gb) as u32, 1],
                attn_cost,
            )])
        }
        AttnVariant::Split { .. } => {
            let n_part = rows * splits * shape.n_heads;
            let part_ml = GpuTensor::zeros(ctx, &format!("{label}.part_ml"), DType::F32, &[n_part, 2])?;
            let part_acc = GpuTensor::zeros(ctx, &format!("{label}.part_acc"), DType::F32, &[n_part, hd4 * 4])?;
            let split = ctx.pipeline(&variant(ctx, "attn_split", hd, gb))?;
            let combine = ctx.pipeline(&variant(ctx, "attn_combine", hd, 1))?;
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
                grid((n_part / gb).div_ceil(workgroup_size(ctx)) as u32),
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
                Cost { flops: (4 * n_part * hd4 * 4) as u64, bytes: (4 * (n_part * (2 + hd4 * 4) + rows * shape.q_dim())) as u64 },
            );
            Ok(vec![partials, merge])
        }
    }
}

/// CPU reference (f64 accumulation): `q` `[rows, n_heads head_dim]`, caches `[>= pos0 + rows,
/// n_kv_heads head_dim]`; row t at position pos0 + t attends to cache rows 0..=pos0 + t.
/// [`attention_ref_f64`] on the values widened to f64, rounded to f32.
pub fn attention_ref(q: &[f32], rows: usize, k_cache: &[f32], v_cache: &[f32], pos0: usize, shape: AttnShape) -> Vec<f32> {
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    attention_ref_f64(&wide(q), rows, &wide(k_cache), &wide(v_cache), pos0, shape).into_iter().map(|x| x as f32).collect()
}

/// The maths of [`attention`] in f64 (the forward the backward's finite-difference tests
/// differentiate): `out[t, head h] = softmax_j(q[t, h] · K[j, h / group] / sqrt(head_dim)) ·
/// V[j, h / group]` over cache rows j in 0..=pos0 + t; shapes as [`attention_ref`].
pub fn attention_ref_f64(q: &[f64], rows: usize, k_cache: &[f64], v_cache: &[f64], pos0: usize, shape: AttnShape) -> Vec<f64> {
    let (hd, qd, kvd) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0f64; rows * qd];
    let mut scores = Vec::new();
    for t in 0..rows {
        let n_keys = pos0 + t + 1;
        for h in 0..shape.n_heads {
            let qh = &q[t * qd + h * hd..][..hd];
            let kvb = (h / group) * hd;
            scores.clear();
            for key in 0..n_keys {
                let kh = &k_cache[key * kvd + kvb..][..hd];
                let s: f64 = qh.iter().zip(kh).map(|(&a, &b)| a * b).sum();
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
                    acc += w * v_cache[key * kvd + kvb + i];
                }
                *oi = acc / sum;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::step::StepParams;
    use crate::kernels::testing::{assert_close, random_vec};

    const GQA: AttnShape = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
    const MHA_ODD: AttnShape = AttnShape { n_heads: 4, n_kv_heads: 4, head_dim: 7 };
    const GQA_12: AttnShape = AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: 12 };
    /// Group 8: two invocations of [`MAX_HEADS_PER_INVOCATION`] heads per kv head.
    const GQA_8: AttnShape = AttnShape { n_heads: 16, n_kv_heads: 2, head_dim: 16 };

    /// Caches of `max_pos` random rows on the GPU and the CPU.
    struct Cache {
        k: Vec<f32>,
        v: Vec<f32>,
        gk: GpuTensor,
        gv: GpuTensor,
    }

    fn cache(shape: AttnShape, max_pos: usize, seed: u64) -> Cache {
        let ctx = test_context();
        let k = random_vec(max_pos * shape.kv_dim(), seed);
        let v = random_vec(max_pos * shape.kv_dim(), seed + 1);
        let gk = GpuTensor::from_f32(&ctx, "k", &[max_pos, shape.kv_dim()], &k).unwrap();
        let gv = GpuTensor::from_f32(&ctx, "v", &[max_pos, shape.kv_dim()], &v).unwrap();
        Cache { k, v, gk, gv }
    }

    /// Prepare `variant` for `rows` rows, run it at pos0 with a random q scaled by `q_scale`,
    /// and compare with the reference.
    fn check(shape: AttnShape, c: &Cache, rows: usize, pos0: usize, variant: AttnVariant, q_scale: f32, seed: u64) {
        check_at(shape, c, 0, rows, pos0, variant, q_scale, seed);
    }

    /// [`check`] with the step's rows at `row0..row0 + rows` of q and out (earlier rows of out
    /// must stay zero).
    #[allow(clippy::too_many_arguments)]
    fn check_at(shape: AttnShape, c: &Cache, row0: usize, rows: usize, pos0: usize, variant: AttnVariant, q_scale: f32, seed: u64) {
        let ctx = test_context();
        let q: Vec<f32> = random_vec(rows * shape.q_dim(), seed).iter().map(|v| v * q_scale).collect();
        let mut padded = random_vec(row0 * shape.q_dim(), seed + 9);
        padded.extend_from_slice(&q);
        let gq = GpuTensor::from_f32(&ctx, "q", &[row0 + rows, shape.q_dim()], &padded).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[row0 + rows, shape.q_dim()]).unwrap();
        let step = StepBuffer::new(&ctx);
        step.write(&ctx, &StepParams::new(pos0, rows));
        let ds = attention_variant(
            &ctx,
            "attn",
            &AttnOp { q: &gq, rows, row0, k_cache: &c.gk, v_cache: &c.gv, shape, step: &step, out: &out },
            variant,
        )
        .unwrap();
        ctx.run("attn", &ds.iter().collect::<Vec<_>>()).unwrap();
        let mut want = vec![0.0; row0 * shape.q_dim()];
        want.extend(attention_ref(&q, rows, &c.k, &c.v, pos0, shape));
        let what = format!("{shape:?} {variant:?} T={rows} pos0={pos0} row0={row0} q_scale={q_scale}");
        assert_close(&out.read_f32(&ctx).unwrap(), &want, 2e-5, 1e-4, &what);
    }

    #[test]
    fn an_invocation_takes_a_divisor_of_the_group() {
        let ctx = test_context();
        let gb = |n_heads, n_kv_heads| heads_per_invocation(&ctx, AttnShape { n_heads, n_kv_heads, head_dim: 64 });
        let got = [gb(9, 3), gb(32, 8), gb(16, 2), gb(14, 2), gb(4, 4), gb(12, 2)];
        if ctx.is_cpu() {
            assert_eq!(got, [3, 4, 4, 1, 1, 3]);
        } else {
            assert_eq!(got, [1; 6]);
        }
    }

    /// The reference checks below run each layout this adapter has: on a CPU adapter with
    /// SHADER_INT64 (lavapipe), k and v are read wide where head_dim % 8 == 0 (GQA, GQA_8) and
    /// two vec4 per step elsewhere (GQA_12: an odd number of vec4 per head, the second of the
    /// last pair zero; MHA_ODD: the scalar layout).
    #[test]
    fn kv_reads_are_wide_where_the_head_allows() {
        let ctx = test_context();
        let wide = ctx.is_cpu() && ctx.has_int64();
        for (shape, allows) in [(GQA, true), (GQA_8, true), (GQA_12, false), (MHA_ODD, false)] {
            let source = variant(&ctx, "attn_split", shape.head_dim, 1).expand().unwrap();
            let declared = source.contains("var<storage, read> k_cache: array<vec4<u64>>");
            assert_eq!(declared, wide && allows, "head_dim {}", shape.head_dim);
            assert_eq!(wide_kv(&ctx, shape.head_dim), declared);
        }
    }

    /// The CPU cap on splits: three workgroups of 8 per thread, whatever the head blocks; a GPU
    /// keeps one split per `keys_per_split` keys of the cache.
    #[test]
    fn cpu_splits_fill_three_workgroups_per_thread() {
        assert_eq!(cpu_max_splits(3, 2), 16); // SmolLM2: 9 heads in 3 blocks, 2 cores
        assert_eq!(cpu_max_splits(8, 2), 6); // Llama-3.2-1B: 32 heads in 8 blocks
        assert_eq!(cpu_max_splits(3, 16), 128);
        assert_eq!(cpu_max_splits(100, 1), 1);
        assert_eq!(cpu_max_splits(0, 0), 24);
        let ctx = test_context();
        let splits = split_count(&ctx, 4096, 8, 3);
        if ctx.is_cpu() {
            assert_eq!(splits, cpu_max_splits(3, cpu_threads()).min(512));
            // Few cache rows: one split per keys_per_split keys, under the cap.
            assert_eq!(split_count(&ctx, 16, 8, 3), 2);
        } else {
            assert_eq!(splits, 512);
        }
        assert_eq!(split_count(&ctx, 1, 8, 3), 1);
    }

    #[test]
    fn attention_reference_is_softmax_weighted_values() {
        // One head, two keys: the weights are softmax(q.k / sqrt(d)); the first query sees key 0 only.
        let shape = AttnShape { n_heads: 1, n_kv_heads: 1, head_dim: 4 };
        let q = [1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0];
        let k = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let v = [1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 0.0];
        let out = attention_ref(&q, 2, &k, &v, 0, shape);
        assert_eq!(&out[..4], &v[..4]);
        let (w0, w1) = (1.0f64, 1.0f64.exp()); // scores 0 and 2/2 = 1
        for i in 0..4 {
            let want = (w0 * v[i] as f64 + w1 * v[4 + i] as f64) / (w0 + w1);
            assert!((out[4 + i] as f64 - want).abs() < 1e-6);
        }
    }

    #[test]
    fn attention_rows_matches_reference() {
        for (i, shape) in [GQA, MHA_ODD, GQA_12, GQA_8].into_iter().enumerate() {
            let c = cache(shape, 420, 100 + i as u64);
            for (j, &(rows, pos0)) in [(1, 0), (1, 419), (7, 3), (300, 0), (300, 117)].iter().enumerate() {
                check(shape, &c, rows, pos0, AttnVariant::Rows, 1.0, 200 + j as u64);
            }
        }
    }

    #[test]
    fn attention_split_matches_reference() {
        for (i, shape) in [GQA, MHA_ODD, GQA_12, GQA_8].into_iter().enumerate() {
            let c = cache(shape, 420, 110 + i as u64);
            for (j, &(rows, pos0)) in [(1, 0), (1, 256), (1, 419), (4, 30), (7, 100)].iter().enumerate() {
                for kps in [1, 7, DEFAULT_KEYS_PER_SPLIT] {
                    check(shape, &c, rows, pos0, AttnVariant::Split { keys_per_split: kps }, 1.0, 300 + j as u64);
                }
            }
            // A long prefill through the split variant (chunks larger than the cache's tail).
            check(shape, &c, 300, 117, AttnVariant::Split { keys_per_split: 64 }, 1.0, 310);
        }
    }

    /// A batched decode step's row of the batch's q and out (`row0`), in both variants.
    #[test]
    fn attention_at_a_row_offset_matches_reference() {
        for (i, shape) in [GQA, MHA_ODD].into_iter().enumerate() {
            let c = cache(shape, 420, 120 + i as u64);
            for (row0, rows, pos0) in [(5, 1, 37), (2, 3, 200)] {
                check_at(shape, &c, row0, rows, pos0, AttnVariant::Rows, 1.0, 500);
                check_at(shape, &c, row0, rows, pos0, AttnVariant::Split { keys_per_split: 7 }, 1.0, 501);
            }
        }
    }

    #[test]
    fn attention_is_stable_for_large_scores() {
        // Scores up to ~|q| |k| / 8 with q scaled by 60: exp would overflow without the running max.
        let c = cache(GQA, 300, 120);
        for variant in [AttnVariant::Rows, AttnVariant::Split { keys_per_split: 16 }] {
            check(GQA, &c, 7, 200, variant, 60.0, 400);
        }
    }

    #[test]
    fn decode_reuses_one_prepared_dispatch_list() {
        // One dispatch list per variant prepared for rows = 1 and a 1800-row cache, re-recorded for
        // steps at kv_len 1, 257, 1757 and 2 with new q values and step uniforms.
        let ctx = test_context();
        for (i, shape) in [GQA, MHA_ODD].into_iter().enumerate() {
            let max_pos = 1800;
            let c = cache(shape, max_pos, 130 + i as u64);
            let gq = GpuTensor::zeros(&ctx, "q", DType::F32, &[1, shape.q_dim()]).unwrap();
            let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[1, shape.q_dim()]).unwrap();
            let step = StepBuffer::new(&ctx);
            let variants = [
                None,
                Some(AttnVariant::Rows),
                Some(AttnVariant::Split { keys_per_split: 7 }),
                Some(AttnVariant::Split { keys_per_split: 256 }),
            ];
            for v in variants {
                let ds = match v {
                    None => attention(
                        &ctx,
                        "attn",
                        &AttnOp { q: &gq, rows: 1, row0: 0, k_cache: &c.gk, v_cache: &c.gv, shape, step: &step, out: &out },
                    )
                    .unwrap(),
                    Some(v) => attention_variant(
                        &ctx,
                        "attn",
                        &AttnOp { q: &gq, rows: 1, row0: 0, k_cache: &c.gk, v_cache: &c.gv, shape, step: &step, out: &out },
                        v,
                    )
                    .unwrap(),
                };
                assert_eq!(ds.len(), if v == Some(AttnVariant::Rows) { 1 } else { 2 });
                for (s, kv_len) in [1usize, 257, 1757, 2].into_iter().enumerate() {
                    let q = random_vec(shape.q_dim(), 500 + s as u64);
                    gq.write_f32(&ctx, &q);
                    step.write(&ctx, &StepParams::new(kv_len - 1, 1));
                    ctx.run("decode", &ds.iter().collect::<Vec<_>>()).unwrap();
                    let want = attention_ref(&q, 1, &c.k, &c.v, kv_len - 1, shape);
                    let what = format!("decode {shape:?} {v:?} kv_len={kv_len}");
                    assert_close(&out.read_f32(&ctx).unwrap(), &want, 2e-5, 1e-4, &what);
                }
            }
        }
    }

    #[test]
    fn attention_reads_rows_from_the_step_uniform() {
        // Prepared for 7 rows, run with a 3-token step: rows 3.. of out keep their contents.
        let ctx = test_context();
        let shape = GQA_12;
        let c = cache(shape, 64, 140);
        let q = random_vec(7 * shape.q_dim(), 141);
        let gq = GpuTensor::from_f32(&ctx, "q", &[7, shape.q_dim()], &q).unwrap();
        let step = StepBuffer::new(&ctx);
        step.write(&ctx, &StepParams::new(20, 3));
        for variant in [AttnVariant::Rows, AttnVariant::Split { keys_per_split: 5 }] {
            let out = GpuTensor::from_f32(&ctx, "out", &[7, shape.q_dim()], &vec![9.0; 7 * shape.q_dim()]).unwrap();
            let ds = attention_variant(
                &ctx,
                "attn",
                &AttnOp { q: &gq, rows: 7, row0: 0, k_cache: &c.gk, v_cache: &c.gv, shape, step: &step, out: &out },
                variant,
            )
            .unwrap();
            ctx.run("attn", &ds.iter().collect::<Vec<_>>()).unwrap();
            let mut want = attention_ref(&q[..3 * shape.q_dim()], 3, &c.k, &c.v, 20, shape);
            want.resize(7 * shape.q_dim(), 9.0);
            assert_close(&out.read_f32(&ctx).unwrap(), &want, 2e-5, 1e-4, &format!("{variant:?}"));
        }
    }

    #[test]
    fn attention_rejects_bad_arguments() {
        let ctx = test_context();
        let step = StepBuffer::new(&ctx);
        let shape = GQA_12;
        let q = GpuTensor::zeros(&ctx, "q", DType::F32, &[2, shape.q_dim()]).unwrap();
        let k = GpuTensor::zeros(&ctx, "k", DType::F32, &[8, shape.kv_dim()]).unwrap();
        let bad_heads = AttnShape { n_heads: 6, n_kv_heads: 4, head_dim: 12 };
        let r = attention(&ctx, "a", &AttnOp { q: &q, rows: 2, row0: 0, k_cache: &k, v_cache: &k, shape: bad_heads, step: &step, out: &q });
        assert!(matches!(r, Err(GpuError::InvalidArgument(_))), "6/4 heads");
        let r = attention(&ctx, "a", &AttnOp { q: &q, rows: 3, row0: 0, k_cache: &k, v_cache: &k, shape, step: &step, out: &q });
        assert!(matches!(r, Err(GpuError::InvalidArgument(_))), "q too small for 3 rows");
        let odd_cache = GpuTensor::zeros(&ctx, "k", DType::F32, &[8 * shape.kv_dim() + 1]).unwrap();
        let r = attention(&ctx, "a", &AttnOp { q: &q, rows: 2, row0: 0, k_cache: &odd_cache, v_cache: &k, shape, step: &step, out: &q });
        assert!(matches!(r, Err(GpuError::InvalidArgument(_))), "cache not a whole number of rows");
        let r = attention_variant(
            &ctx,
            "a",
            &AttnOp { q: &q, rows: 2, row0: 0, k_cache: &k, v_cache: &k, shape, step: &step, out: &q },
            AttnVariant::Split { keys_per_split: 0 },
        );
        assert!(matches!(r, Err(GpuError::InvalidArgument(_))), "zero keys per split");
        assert!(attention(&ctx, "a", &AttnOp { q: &q, rows: 2, row0: 0, k_cache: &k, v_cache: &k, shape, step: &step, out: &q }).is_ok());
    }

    /// Rough timings for SmolLM2's shape (9/3/64) on the current adapter; prints, asserts nothing
    /// about speed. `cargo test --release --lib attention_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn attention_timing() {
        let ctx = test_context();
        let shape = GQA;
        let max_pos = 8192;
        let c = cache(shape, max_pos, 150);
        let step = StepBuffer::new(&ctx);
        let time = |ds: &[Dispatch], iters: usize| {
            let refs: Vec<&Dispatch> = ds.iter().collect();
            ctx.run("warm", &refs).unwrap();
            let t0 = std::time::Instant::now();
            for _ in 0..iters {
                ctx.run("t", &refs).unwrap();
            }
            t0.elapsed().as_secs_f64() * 1e3 / iters as f64
        };
        println!("adapter: {}", ctx.info.name);
        let gq = GpuTensor::from_f32(&ctx, "q", &[128, shape.q_dim()], &random_vec(128 * shape.q_dim(), 1)).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[128, shape.q_dim()]).unwrap();
        for kv_len in [128, 1024, 4096] {
            step.write(&ctx, &StepParams::new(kv_len - 1, 1));
            let mut variants = vec![AttnVariant::Rows];
            variants.extend([8, 16, 32, 64, 128].map(|k| AttnVariant::Split { keys_per_split: k }));
            for v in variants {
                let ds = attention_variant(
                    &ctx,
                    "a",
                    &AttnOp { q: &gq, rows: 1, row0: 0, k_cache: &c.gk, v_cache: &c.gv, shape, step: &step, out: &out },
                    v,
                )
                .unwrap();
                println!("decode kv_len {kv_len:5} max_pos {max_pos} {v:?}: {:.3} ms", time(&ds, 20));
            }
        }
        for pos0 in [0, 1000] {
            step.write(&ctx, &StepParams::new(pos0, 128));
            for v in [AttnVariant::Rows, AttnVariant::Split { keys_per_split: 64 }, AttnVariant::Split { keys_per_split: 256 }] {
                let ds = attention_variant(
                    &ctx,
                    "a",
                    &AttnOp { q: &gq, rows: 128, row0: 0, k_cache: &c.gk, v_cache: &c.gv, shape, step: &step, out: &out },
                    v,
                )
                .unwrap();
                println!("prefill T=128 pos0 {pos0} {v:?}: {:.3} ms", time(&ds, 5));
            }
        }
        // The empty step: what one submit + wait costs here.
        step.write(&ctx, &StepParams::new(0, 0));
        let ds = attention_variant(
            &ctx,
            "a",
            &AttnOp { q: &gq, rows: 1, row0: 0, k_cache: &c.gk, v_cache: &c.gv, shape, step: &step, out: &out },
            AttnVariant::Rows,
        )
        .unwrap();
        println!("empty step (submit + wait overhead): {:.3} ms", time(&ds, 20));
    }
}
