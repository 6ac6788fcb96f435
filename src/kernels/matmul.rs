//! Matrix product for prefill, the [`LinearOp`]
//! `y[t, y_col0 + n] (+)= scale · sum_k x[t, k] * w[n, k] (+ bias[n])`, i.e. `X · W^T` with `w` a
//! `[N, K]` weight matrix (Hugging Face `[out, in]`) in f32 or f16, f32 maths.
//!
//! Four variants: [`MatmulVariant::RegBlock`] (each invocation a small block of outputs held in
//! registers, vec4 loads along K, no workgroup memory), [`MatmulVariant::Tiled`] (64 x 64 tiles
//! staged through workgroup memory: the usual GPU shape), [`MatmulVariant::XBcast`] (a window of
//! tokens per dispatch, x bound as a uniform buffer and read by every invocation at once: on
//! lavapipe a branchless gather instead of a storage load's per-lane loop) and
//! [`MatmulVariant::XBcastSubgroup`] (the same windows, each lane loading one value of x per step
//! and `subgroupBroadcast` handing it to the others: the fast one on lavapipe).
//! [`crate::kernels::choice::matmul_variant`] picks one per adapter.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::UNIFORM_WINDOW_BYTES;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant, WeightKind};
use crate::kernels::linear::{ChunkPart, LinearForm, LinearOp, XBinding};
use crate::kernels::matmul_xw::matmul_xw;

const SOURCE: &str = include_str!("../../shaders/matmul.wgsl");

/// Workgroup size of the `RegBlock` variant.
pub const REGBLOCK_WG: u32 = 64;
/// Rows of x per `RegBlock` invocation at T >= 8 (8 x 4 was the fastest block on lavapipe, in CPU
/// time per call, against 2x4 to 16x4, 4x8, 6x6 and 8x8; bigger blocks spill). Fewer rows of x
/// take a smaller block ([`regblock_tm`]).
pub const REGBLOCK_TM: u32 = 8;
/// The `RegBlock` block of outputs (rows of x TM, rows of w TN) on quantised weights for a
/// product of `rows` rows of x: `(min(regblock_tm(rows), 2), 4)` up to
/// [`crate::kernels::choice::SHORT_PREFILL_ROWS`] rows, else `(regblock_tm(rows), 16)`.
///
/// On lavapipe a quantised block costs mostly its loads (scales, quant words, x: each a per-lane
/// loop), so the wider the block the fewer loads per multiply-add, and register spills cost far
/// less; but the driver's compile time grows much faster than the body. Measured (`cargo bench
/// --bench kernels -- "matmul regblock q"`, alternated; Q4_1 at 3072x576 and 576x1536, T = 128):
/// 8 x 32 35-37 GFLOP/s, 8 x 16 29-31, 8 x 8 22, 4 x 16 26-28, 2 x 4 14-17, 8 x 4 11-12; the
/// first run of a 72-token prompt with Mesa's shader cache off took 92 s (8 x 32), 33 s (8 x 16),
/// 19 s (8 x 8) and 10 s (2 x 4, as f16). So short prompts, the common case of a chat, keep the
/// block that compiles as fast as f16's, and long prompts pay the 8 x 16 compile once (the
/// driver caches it).
pub fn regblock_quant_block(rows: usize) -> (u32, u32) {
    let tm = regblock_tm(rows);
    if rows > crate::kernels::choice::SHORT_PREFILL_ROWS { (tm, 16) } else { (tm.min(2), 4) }
}

/// Rows of w per `RegBlock` invocation.
pub const REGBLOCK_TN: u32 = 4;
/// Output tile of one `Tiled` workgroup (rows of x and rows of w).
pub const TILE: u32 = 64;
/// `XBcast` variant: rows of x per window, the most ([`xbcast_windows`]; a dispatch holds up to
/// [`XBCAST_WINDOWS_PER_DISPATCH`] of them).
/// Measured on lavapipe against `RegBlock` in process CPU time, alternated in one process (f16
/// and f32, T = 128, 3072 x 576 and 576 x 1536): 8 x 8 (rows of x x rows of w) 1.2-1.45x
/// faster, 16 x 8 as fast as 8 x 8 but 2.5x the driver's compile time (2.0-2.4 s against
/// 0.8-1.1 s), 10 x 8 no faster, 8 x 4 and 16 x 4 1.0-1.1x (see BENCHMARKS.md).
pub const XBCAST_TB: u32 = 8;
/// `XBcast` variant: the most rows of x (tokens) it takes on quantised weights; longer products
/// run `RegBlock` with its 8 x 16 quantised block ([`regblock_quant_block`]).
///
/// Measured on lavapipe (Mesa 25.0.7, Intel Xeon, 2 cores), `firstrt bench --dtype native`
/// (SmolLM2-135M Q4_1) with and without it, alternated three times, prefill tok/s: at 16 tokens
/// `XBcast` 45-56 against `RegBlock`'s 2 x 4 block 28-29; at 37 tokens the two are within the
/// noise (53-63 and 56-69); at 64 `RegBlock` 8 x 16 is 1.0-1.07x faster, at 128 1.15x. But the
/// driver compiles that block in 38 s (the README question's first run on a fresh machine) and a
/// quantised `XBcast` window in 4-5.6 s (8 rows; shorter ones 0.6-2.2 s), so `XBcast` runs up
/// to 64 rows (a chat turn's prompt), and only longer prompts pay the 8 x 16 block's compile
/// (once: the driver caches it; `serve` compiles both at start-up).
pub const XBCAST_QUANT_MAX_ROWS: usize = 64;
/// `XBcast` variant: rows of w per invocation ([`XBCAST_TB`] x this many accumulators).
pub const XBCAST_NB: u32 = 8;
/// `XBcast` variant: full windows per dispatch, the most (fewer where
/// `max_uniform_buffer_binding_size` holds fewer: 3 for SmolLM2-135M's K = 576 on lavapipe's
/// 64 KiB, 1 for K = 1536).
pub const XBCAST_WINDOWS_PER_DISPATCH: u32 = 8;
/// `XBcastSubgroup` variant: rows of x per window, the most (where a window of them fits
/// `max_uniform_buffer_binding_size`, else [`XBCAST_TB`]: SmolLM2-135M's K = 576 takes 16, the
/// down projection's K = 1536 8).
///
/// Its x loads no longer grow with the window (one value per lane per step of K, handed to the
/// other lanes by `subgroupBroadcast`), so a longer window shares each load of W among more
/// multiply-adds. Measured in `cargo bench --bench kernels` (lavapipe, AMD EPYC Zen 3, T = 128,
/// 3072 x 576, alternated, two rounds): 16 x 4 (rows of x x rows of w) f32wide 16.0-30.9 GFLOP/s
/// and f16packed 15.0-19.8 against 8 x 8's 9.4-15.7 and 11.2-23.4, and `XBcast`'s 7.0-8.6 and
/// 12.0; 16 x 8 12.5-28.0 and 16.2-16.3, 32 x 2 13.0-20.3 and 14.8-18.6 (BENCHMARKS.md, "x
/// handed across lanes").
pub const XBCAST_SG_TB: u32 = 16;
/// `XBcastSubgroup` variant: rows of w per invocation in windows of [`XBCAST_SG_TB`] rows (64
/// accumulators, as [`XBCAST_TB`] x [`XBCAST_NB`]); shorter windows take [`XBCAST_NB`].
pub const XBCAST_SG_NB: u32 = 4;
/// `XBcast` variant: workgroup size. Small, so that a product of few rows of w (576 at
/// SmolLM2-135M's d_model) still spreads over the CPU's threads: lavapipe hands whole workgroups
/// to its threads, and a dispatch holds only a few windows.
pub const XBCAST_WG: u32 = 8;

/// The matmul kernel variants; [`crate::kernels::choice::matmul_variant`] picks one per adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulVariant {
    /// Register-blocked, no workgroup memory: a [`REGBLOCK_TM`] x [`REGBLOCK_TN`] block of
    /// outputs per invocation.
    RegBlock,
    /// Tiled through workgroup memory (for real GPUs): a [`TILE`] x [`TILE`] output tile per
    /// workgroup.
    Tiled,
    /// Windows of up to [`XBCAST_TB`] rows of x, a few per dispatch, bound as a uniform buffer
    /// so that every invocation of a workgroup reads the same x values (broadcast); [`XBCAST_NB`]
    /// rows of w per invocation. Dense f32/f16 weights only, where [`xbcast_window`] fits a window; other
    /// products fall back to `RegBlock`.
    XBcast,
    /// `XBcast`'s windows (of up to [`XBCAST_SG_TB`] rows) where each lane of a subgroup loads
    /// one value of x per step of K and `subgroupBroadcast` hands it to the others, instead of
    /// every lane loading every value: on lavapipe a uniform load at a loop-dependent offset is
    /// still a gather of one value per lane. Needs SUBGROUP with subgroups of exactly
    /// [`XBCAST_WG`] lanes ([`xbcast_lanes`]; lavapipe's 8 on 256-bit SIMD); quantised chunks of
    /// W, and K not a multiple of the lanes, run `XBcast`'s body.
    XBcastSubgroup,
}

impl MatmulVariant {
    /// Every variant, in the order the kernel choice measures them.
    pub const ALL: [MatmulVariant; 4] =
        [MatmulVariant::RegBlock, MatmulVariant::Tiled, MatmulVariant::XBcast, MatmulVariant::XBcastSubgroup];

    /// The variant's name in `FIRSTRT_KERNEL`, the choice cache and bench rows (`regblock`,
    /// `tiled`, `xbcast`, `xbcast-subgroup`).
    pub fn name(self) -> &'static str {
        match self {
            MatmulVariant::RegBlock => "regblock",
            MatmulVariant::Tiled => "tiled",
            MatmulVariant::XBcast => "xbcast",
            MatmulVariant::XBcastSubgroup => "xbcast-subgroup",
        }
    }

    /// The variants this adapter can run: all but `XBcastSubgroup` where [`xbcast_lanes`] is None.
    pub fn available(ctx: &GpuContext) -> Vec<MatmulVariant> {
        MatmulVariant::ALL.into_iter().filter(|&v| v != MatmulVariant::XBcastSubgroup || xbcast_lanes(ctx).is_some()).collect()
    }

    /// The variant called `s` ([`MatmulVariant::name`]), if any.
    pub fn parse(s: &str) -> Option<MatmulVariant> {
        MatmulVariant::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// Uniform of `shaders/matmul.wgsl` (`struct MatmulParams` there, same fields in the same
/// order), one per chunk of W.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatmulParams {
    /// Rows of x (tokens) T.
    pub t: u32,
    /// Rows of W this dispatch reads from its chunk (output columns it computes).
    pub n: u32,
    /// Reduction length K (`w.cols`).
    pub k: u32,
    /// Index of the first row read in the product's N (the bias index and output column
    /// offset; the row's index in W unless [`LinearOp::w_rows`] cuts W).
    pub row0: u32,
    /// Row stride of y in elements.
    pub y_stride: u32,
    /// First output column of y.
    pub y_col0: u32,
    /// Bits of [`crate::kernels::linear`]: `FLAG_ACCUMULATE`, `FLAG_BIAS`, `FLAG_SCALE`.
    pub flags: u32,
    /// Multiplies the product when `flags` has `FLAG_SCALE` (before bias and accumulation).
    pub scale: f32,
    /// First row of the chunk's tensor read (0 unless [`LinearOp::w_rows`] cuts W).
    pub w_row0: u32,
    /// `XBcast` only: the window's first row of x and of y.
    pub t0: u32,
    /// `XBcast` only: the window's first rows that it computes but does not store (an earlier
    /// window stored them; [`xbcast_windows`]).
    pub skip: u32,
    /// Padding to 48 bytes.
    pub _pad2: u32,
}

/// Prepares the prefill product `op` (`y[t, y_col0 + n] (+)= scale · sum_k x[t, k] · W[n, k]
/// (+ bias[n])` for `t < op.rows`, `n < N`) as `variant`: one dispatch per chunk of W, named
/// `label` (`label[row0]` when W is split).
/// The backward form [`LinearForm::XW`] (`dX = dY · W`) has one kernel whatever `variant`:
/// [`crate::kernels::matmul_xw`].
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when [`LinearOp::check`] rejects the op or
/// `variant` is `XBcastSubgroup` on an adapter without [`xbcast_lanes`]; a pipeline build error
/// as [`GpuError::Device`].
pub fn matmul(ctx: &GpuContext, label: &str, op: &LinearOp, variant: MatmulVariant) -> Result<Vec<Dispatch>, GpuError> {
    if op.form == LinearForm::XW {
        return matmul_xw(ctx, label, op);
    }
    let kind = op.check(ctx, label)?;
    let (k, _) = op.k_n();
    let rows = op.rows;
    let entry = match variant {
        MatmulVariant::RegBlock => "matmul_regblock",
        MatmulVariant::Tiled => "matmul_tiled",
        MatmulVariant::XBcast | MatmulVariant::XBcastSubgroup => {
            let lanes = match variant {
                MatmulVariant::XBcastSubgroup => Some(xbcast_lanes(ctx).ok_or_else(|| {
                    GpuError::InvalidArgument(format!(
                        "{label}: matmul xbcast-subgroup needs SUBGROUP with subgroups of {XBCAST_WG} lanes, which adapter {} lacks",
                        ctx.info.name
                    ))
                })?),
                _ => None,
            };
            return match xbcast_window_of(ctx, op, kind, lanes) {
                Some(tb) => matmul_xbcast(ctx, label, op, kind, tb, lanes),
                None => matmul(ctx, label, op, MatmulVariant::RegBlock),
            };
        }
    };
    // Only `matmul_regblock` depends on the token count; the other entry points keep one
    // pipeline (one cache key, one driver compile) whatever the prompt length.
    let tm = if variant == MatmulVariant::RegBlock { regblock_tm(rows) } else { REGBLOCK_TM };
    // Quantised weights have their own block of outputs per invocation (`regblock_quant_block`).
    let block_of = |kind: WeightKind| if matches!(kind, WeightKind::Quant(_)) { regblock_quant_block(rows) } else { (tm, REGBLOCK_TN) };
    let pipeline = |kind: WeightKind| {
        let (tm, tn) = block_of(kind);
        let x_kind = kind.activations_on(ctx);
        let body = match kind {
            WeightKind::Quant(_) => regblock_body_quant(tm, tn, x_kind == WeightKind::F32Wide),
            _ => regblock_body(tm, tn, kind.step(k)),
        };
        let shader = ShaderVariant::new("matmul", SOURCE, entry)
            .define("REGBLOCK_BODY", body)
            .weights("X_DECL", x_kind, 1, "x")
            .weights("W_DECL", kind, 2, "w")
            .define("ALIGNED", k.is_multiple_of(4))
            .define("WG", REGBLOCK_WG)
            .define("TM", tm)
            .define("TN", tn)
            .define("NB", XBCAST_NB)
            .define("XBCAST_BODY", "")
            .define("XBCAST_SUBGROUP_ENTRY", "");
        ctx.pipeline(&shader)
    };
    op.chunk_dispatches(ctx, label, kind, pipeline, |c, kind| {
        let params = chunk_params(op, k, c);
        let (t, n) = (rows as u32, c.rows as u32);
        let workgroups = match variant {
            MatmulVariant::RegBlock => {
                let (tm, tn) = block_of(kind);
                grid((t.div_ceil(tm) * n.div_ceil(tn)).div_ceil(REGBLOCK_WG))
            }
            MatmulVariant::Tiled => grid(t.div_ceil(TILE) * n.div_ceil(TILE)),
            MatmulVariant::XBcast | MatmulVariant::XBcastSubgroup => unreachable!("the XBcast variants returned above"),
        };
        let outputs = (rows * c.rows) as u64;
        let cost = Cost {
            flops: 2 * outputs * k as u64,
            bytes: c.byte_len()
                + 4 * (rows * k) as u64
                + outputs * if op.accumulate { 8 } else { 4 }
                + if op.bias.is_some() { 4 * c.rows as u64 } else { 0 },
        };
        (params, workgroups, cost)
    })
}

/// The uniform of the product `op` (reduction length `k`) over one part of W (`t0` 0).
fn chunk_params(op: &LinearOp, k: usize, c: &ChunkPart) -> MatmulParams {
    MatmulParams {
        t: op.rows as u32,
        n: c.rows as u32,
        k: k as u32,
        row0: c.row0 as u32,
        y_stride: op.y_row_stride() as u32,
        y_col0: op.y_col0 as u32,
        flags: op.flags(),
        scale: op.scale.unwrap_or(1.0),
        w_row0: c.w_row0 as u32,
        ..Zeroable::zeroed()
    }
}

/// Rows of x per window of the `XBcast` variant for `op` read as `kind`, or `None` where the
/// variant does not apply and `RegBlock` runs instead. It applies where K % 4 == 0 (a row of x
/// is whole vec4s), a row of x is a multiple of the adapter's
/// `min_uniform_buffer_offset_alignment` bytes (every window starts on it), a window of
/// [`XBCAST_TB`] rows fits `max_uniform_buffer_binding_size`, and, where a chunk of W is
/// quantised, there are at most [`XBCAST_QUANT_MAX_ROWS`] rows of x. Products of fewer rows take
/// shorter windows ([`xbcast_windows`]).
pub fn xbcast_window(ctx: &GpuContext, op: &LinearOp, kind: WeightKind) -> Option<u32> {
    xbcast_window_of(ctx, op, kind, None)
}

/// [`xbcast_window`] for `XBcast` (`lanes` None) or `XBcastSubgroup` (`lanes` from
/// [`xbcast_lanes`]): the latter takes windows of [`XBCAST_SG_TB`] rows where every chunk of W
/// is dense, K is a multiple of `lanes` and such a window fits the uniform binding.
pub fn xbcast_window_of(ctx: &GpuContext, op: &LinearOp, kind: WeightKind, lanes: Option<u32>) -> Option<u32> {
    let (k, n) = op.k_n();
    let row_bytes = 4 * k as u64;
    let aligned = k.is_multiple_of(4) && row_bytes.is_multiple_of(u64::from(ctx.limits.min_uniform_buffer_offset_alignment).max(1));
    // The most workgroups either body takes: rows of w per invocation, the fewest of the two.
    let groups_fit =
        n.div_ceil((XBCAST_WG * XBCAST_NB.min(XBCAST_SG_NB)) as usize) <= ctx.limits.max_compute_workgroups_per_dimension as usize;
    let quant = op.chunk_parts().iter().any(|part| matches!(part.chunk.kind(kind), WeightKind::Quant(_)));
    if !aligned || !groups_fit || (quant && op.rows > XBCAST_QUANT_MAX_ROWS) {
        return None;
    }
    let fits = |tb: u32| u64::from(tb) * row_bytes <= ctx.limits.max_uniform_buffer_binding_size;
    let long = !quant && xbcast_subgroup_applies(lanes, kind, k).is_some();
    [XBCAST_SG_TB, XBCAST_TB].into_iter().filter(|&tb| long || tb == XBCAST_TB).find(|&tb| fits(tb))
}

/// The subgroup size that `XBcastSubgroup` uses on this adapter: SUBGROUP with every subgroup
/// of exactly [`XBCAST_WG`] lanes (`AdapterInfo::subgroup_min_size` = `subgroup_max_size`), so
/// that a workgroup is one subgroup and its constant lane indices exist; None elsewhere.
pub fn xbcast_lanes(ctx: &GpuContext) -> Option<u32> {
    let (lo, hi) = (ctx.info.subgroup_min_size, ctx.info.subgroup_max_size);
    (ctx.has_subgroups() && lo == XBCAST_WG && hi == XBCAST_WG).then_some(XBCAST_WG)
}

/// Whether a chunk of W read as `kind` runs the subgroup body ([`xbcast_subgroup_entry`]) in a
/// `XBcastSubgroup` product of reduction length `k`: dense weights and K a multiple of `lanes`.
fn xbcast_subgroup_applies(lanes: Option<u32>, kind: WeightKind, k: usize) -> Option<u32> {
    lanes.filter(|&l| !matches!(kind, WeightKind::Quant(_)) && k.is_multiple_of(l as usize))
}

/// Rows of w per invocation of an `XBcast` pipeline with windows of `len` rows:
/// [`XBCAST_SG_NB`] for the subgroup body's long windows, else [`XBCAST_NB`].
fn xbcast_nb(subgroup: bool, len: usize) -> u32 {
    if subgroup && len > XBCAST_TB as usize { XBCAST_SG_NB } else { XBCAST_NB }
}

/// The WGSL entry point `matmul_xbcast_subgroup` (`MatmulVariant::XBcastSubgroup`) for windows
/// of `tb` rows of x and `nb` rows of w per invocation, in workgroups of one subgroup of `lanes`
/// lanes: K walked `lanes` values at a time; per step each lane loads its `nb` rows' `lanes`
/// values of w (`w_8` where `wide`, the wide kinds, else `w_4`) and, for each row i of the
/// window, the one value of x at `kk · lanes + lane` (`x_1` of the uniform window), which
/// `subgroupBroadcast` with the constant lane c hands to every lane for the multiply-adds by
/// value c of each w row. So a step costs `tb` one-value loads of x per lane instead of
/// `tb · lanes`. No invocation returns early (every lane takes part in the broadcasts): rows of
/// w past the end are clamped for loading and not stored; stores as `XBcast`'s.
pub fn xbcast_subgroup_entry(tb: u32, nb: u32, lanes: u32, wide: bool) -> String {
    use std::fmt::Write;
    let unit = if wide && lanes.is_multiple_of(8) { 8 } else { 4 };
    let loads = lanes / unit;
    let mut s = String::new();
    let _ = writeln!(s, "@compute @workgroup_size(WG)");
    let _ = writeln!(s, "fn matmul_xbcast_subgroup(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>,");
    let _ = writeln!(s, "                          @builtin(subgroup_invocation_id) lane: u32) {{");
    let _ = writeln!(s, "    let n0 = gid.x * {nb}u;");
    let _ = writeln!(s, "    let steps = p.k / {lanes}u;");
    let _ = writeln!(s, "    let xw = wg.y * {tb}u; // the dispatch's window (uniform across the workgroup)");
    for j in 0..nb {
        let _ = writeln!(s, "    let wb{j} = (p.w_row0 + min(n0 + {j}u, p.n - 1u)) * (p.k / {unit}u);");
    }
    for i in 0..tb {
        for j in 0..nb {
            let _ = writeln!(s, "    var a{i}_{j} = 0.0;");
        }
    }
    let _ = writeln!(s, "    for (var kk = 0u; kk < steps; kk++) {{");
    for j in 0..nb {
        for m in 0..loads {
            let _ = writeln!(s, "        let w{j}_{m} = w_{unit}(wb{j} + kk * {loads}u + {m}u);");
        }
    }
    // Value c of a step of w row j.
    let w_value = |j: u32, c: u32| -> String {
        let xyzw = ["x", "y", "z", "w"][(c % 4) as usize];
        if unit == 8 { format!("w{j}_{}[{}].{xyzw}", c / 8, (c % 8) / 4) } else { format!("w{j}_{}.{xyzw}", c / 4) }
    };
    for i in 0..tb {
        let _ = writeln!(s, "        {{");
        let _ = writeln!(s, "            let xl = x_1((xw + {i}u) * p.k + kk * {lanes}u + lane);");
        for c in 0..lanes {
            let _ = writeln!(s, "            let x{c} = subgroupBroadcast(xl, {c}u);");
        }
        for j in 0..nb {
            let mut e = format!("a{i}_{j}");
            for c in 0..lanes {
                e = format!("fma(x{c}, {}, {e})", w_value(j, c));
            }
            let _ = writeln!(s, "            a{i}_{j} = {e};");
        }
        let _ = writeln!(s, "        }}");
    }
    let _ = writeln!(s, "    }}");
    xbcast_stores(&mut s, tb, nb);
    let _ = writeln!(s, "}}");
    s
}

/// The windows of `rows` rows of x for windows of at most `tb` rows (a power of two):
/// `(first row, rows, skip)`. All have the same length `w`, the largest power of two at most
/// `rows` and `tb`: whole windows from row 0, then, where rows are left over, one more window
/// ending at the last row, whose first `skip` rows the window before it computed (its stores
/// leave them, so an accumulating product adds each row once). A window's length is a
/// compile-time constant of its pipeline, so every prompt of `tb` rows or more runs the same
/// pipelines (37 rows with `tb` 8: windows at rows 0, 8, 16, 24 and 29, the last skipping 3),
/// and a left-over row costs what a whole window does (on lavapipe a window's cost is mostly its
/// loads of W, whatever its length).
pub fn xbcast_windows(rows: usize, tb: usize) -> Vec<(usize, usize, usize)> {
    if rows == 0 {
        return Vec::new();
    }
    let w = tb.min(1 << rows.ilog2());
    let mut out: Vec<(usize, usize, usize)> = (0..rows / w).map(|i| (i * w, w, 0)).collect();
    let left = rows % w;
    if left > 0 {
        out.push((rows - w, w, w - left));
    }
    out
}

/// The dispatches of the `XBcast` variant over [`xbcast_windows`]: `(first row, rows per window,
/// windows, skip)`, up to `per_dispatch` consecutive windows without a skip in one dispatch (its
/// workgroups' second index picks the window), the overlapping last window alone with its
/// `skip`. Fewer, larger dispatches keep a CPU driver's threads busy: each dispatch ends with its
/// threads waiting for the slowest.
pub fn xbcast_dispatches(rows: usize, tb: usize, per_dispatch: usize) -> Vec<(usize, usize, usize, usize)> {
    let windows = xbcast_windows(rows, tb);
    let whole = windows.iter().take_while(|w| w.2 == 0).count();
    let (full, rest) = windows.split_at(whole);
    let mut out: Vec<_> = full.chunks(per_dispatch.max(1)).map(|run| (run[0].0, run[0].1, run.len(), 0)).collect();
    out.extend(rest.iter().map(|&(t0, len, skip)| (t0, len, 1, skip)));
    out
}

/// Bytes of x that an `XBcast` dispatch of `rows` rows of `row_bytes` bytes from byte `offset`
/// of `x` declares and binds: [`UNIFORM_WINDOW_BYTES`] (or the adapter's smaller
/// `max_uniform_buffer_binding_size`) where the rows fit in it and the buffer holds that many
/// bytes from `offset` (activations do: [`GpuTensor::zeros_bound`]), else just the rows.
///
/// The declared size is part of the pipeline: a fixed size lets one pipeline serve every K and
/// every count of windows per dispatch (SmolLM2-135M's prefill compiled three quantised `XBcast`
/// pipelines of 4-5 s each on lavapipe, for K = 576 with one and three windows and K = 1536;
/// now one).
pub fn xbcast_x_bytes(ctx: &GpuContext, x: &GpuTensor, offset: u64, rows: u64, row_bytes: u64) -> u64 {
    let fixed = ctx.limits.max_uniform_buffer_binding_size.min(UNIFORM_WINDOW_BYTES) / 16 * 16;
    let exact = rows * row_bytes;
    if exact <= fixed && offset + fixed <= x.buffer.size() { fixed } else { exact }
}

/// [`matmul`] as `MatmulVariant::XBcast` with windows of at most `tb` rows ([`xbcast_window`]):
/// per chunk of W, the dispatches of [`xbcast_dispatches`] (as many windows per dispatch as
/// `max_uniform_buffer_binding_size` holds, at most [`XBCAST_WINDOWS_PER_DISPATCH`]), the
/// dispatch's rows of x bound as a uniform buffer of [`xbcast_x_bytes`]; one pipeline per
/// window length and declared size of x (and per kind of W). With `lanes` (`XBcastSubgroup`),
/// dense chunks run [`xbcast_subgroup_entry`].
fn matmul_xbcast(
    ctx: &GpuContext,
    label: &str,
    op: &LinearOp,
    kind: WeightKind,
    tb: u32,
    lanes: Option<u32>,
) -> Result<Vec<Dispatch>, GpuError> {
    let (k, _) = op.k_n();
    let row_bytes = 4 * k as u64;
    let fit = ctx.limits.max_uniform_buffer_binding_size / (u64::from(tb) * row_bytes);
    let per_dispatch = fit.clamp(1, XBCAST_WINDOWS_PER_DISPATCH as u64) as usize;
    // Pipeline selector: window length and bytes of x declared.
    let pipeline = |kind: WeightKind, (len, x_bytes): (usize, u64)| {
        let x_decl = WeightKind::F32
            .declare_uniform(1, "x", (x_bytes / 4) as usize)
            .ok_or_else(|| GpuError::InvalidArgument(format!("{label}: a window of x cannot be a uniform array")))?;
        let subgroup = xbcast_subgroup_applies(lanes, kind, k);
        let (entry, body, sg_entry) = match subgroup {
            Some(lanes) => (
                "matmul_xbcast_subgroup",
                String::new(),
                xbcast_subgroup_entry(len as u32, xbcast_nb(true, len), lanes, kind.needs_int64()),
            ),
            None => (
                "matmul_xbcast",
                match kind {
                    WeightKind::Quant(_) => xbcast_body_quant(len as u32, XBCAST_NB),
                    _ => xbcast_body(len as u32, XBCAST_NB, kind.step(k)),
                },
                String::new(),
            ),
        };
        let shader = ShaderVariant::new("matmul", SOURCE, entry)
            .define("XBCAST_BODY", body)
            .define("XBCAST_SUBGROUP_ENTRY", sg_entry)
            .define("REGBLOCK_BODY", "")
            .define("X_DECL", x_decl)
            .weights("W_DECL", kind, 2, "w")
            .define("ALIGNED", true)
            .define("WG", XBCAST_WG)
            .define("TM", 1)
            .define("TN", 1)
            .define("NB", XBCAST_NB);
        ctx.pipeline(&shader)
    };
    let dispatches = xbcast_dispatches(op.rows, tb as usize, per_dispatch);
    op.chunk_dispatches_each(ctx, label, kind, &[], pipeline, |c, kind| {
        let n = c.rows as u32;
        let subgroup = xbcast_subgroup_applies(lanes, kind, k).is_some();
        dispatches
            .iter()
            .map(|&(t0, len, count, skip)| {
                let params = MatmulParams { t0: t0 as u32, skip: skip as u32, ..chunk_params(op, k, c) };
                let rows = (len * count) as u64;
                // The product's work: the rows this dispatch stores (not those it skips).
                let outputs = (rows - skip as u64) * c.rows as u64;
                let cost = Cost {
                    flops: 2 * outputs * k as u64,
                    bytes: count as u64 * c.byte_len()
                        + rows * row_bytes
                        + outputs * if op.accumulate { 8 } else { 4 }
                        + if op.bias.is_some() { 4 * c.rows as u64 } else { 0 },
                };
                let offset = t0 as u64 * row_bytes;
                let x_bytes = xbcast_x_bytes(ctx, op.x, offset, rows, row_bytes);
                let x = XBinding::Uniform { offset, size: x_bytes };
                let groups = n.div_ceil(XBCAST_WG * xbcast_nb(subgroup, len));
                ((len, x_bytes), params, [groups, count as u32, 1], cost, x)
            })
            .collect()
    })
}

/// The WGSL statements of `matmul_xbcast` once `n0` is known: `nb` rows of w from `n0` (rows past
/// the end clamped, so every load stays in bounds) against the `tb` rows of x of the window, in
/// `tb` x `nb` named f32 accumulators; K walked `step` elements at a time (8 through `w_8`, 4
/// through `w_4`), x always through `x_4` (a uniform array of vec4) from the row `xw` of the
/// binding (the dispatch's window `wg.y`: `xw = wg.y * tb`); stores row i of the block to row
/// `p.t0 + xw + i` of y, guarded by `i >= p.skip` (rows an earlier window stored) and `n < p.n`.
pub fn xbcast_body(tb: u32, nb: u32, step: usize) -> String {
    use std::fmt::Write;
    let mut s = xbcast_prologue(tb, nb, step);
    for j in 0..nb {
        let _ = writeln!(s, "        let w{j} = w_{step}(wb{j} + kk);");
    }
    for i in 0..tb {
        let _ = writeln!(s, "        {{");
        // (x value, w value) pairs of one step of K for row i of x and row j of w.
        let pairs: Vec<(String, String)> = if step == 8 {
            let _ = writeln!(s, "            let xl = x_4((xw + {i}u) * xs + kk * 2u);");
            let _ = writeln!(s, "            let xh = x_4((xw + {i}u) * xs + kk * 2u + 1u);");
            [("xl", 0), ("xh", 1)]
                .iter()
                .flat_map(|&(x, h)| "xyzw".chars().map(move |c| (format!("{x}.{c}"), format!("[{h}].{c}"))))
                .collect()
        } else {
            let _ = writeln!(s, "            let xv = x_4((xw + {i}u) * xs + kk);");
            "xyzw".chars().map(|c| (format!("xv.{c}"), format!(".{c}"))).collect()
        };
        for j in 0..nb {
            let mut e = format!("a{i}_{j}");
            for (x, w) in &pairs {
                e = format!("fma({x}, w{j}{w}, {e})");
            }
            let _ = writeln!(s, "            a{i}_{j} = {e};");
        }
        let _ = writeln!(s, "        }}");
    }
    let _ = writeln!(s, "    }}");
    xbcast_stores(&mut s, tb, nb);
    s
}

/// Rows of x per `RegBlock` invocation for a product of `rows` rows: the next power of two,
/// at most [`REGBLOCK_TM`]. A short prompt then loads no row of x twice per step of K (a
/// 1-token prefill costs what a decode step's matvec does, not a 8-row block's loads).
pub fn regblock_tm(rows: usize) -> u32 {
    (rows.max(1).next_power_of_two() as u32).min(REGBLOCK_TM)
}

/// The WGSL statements of `matmul_regblock` once `t0` and `n0` are known: a `tm` x `tn` block
/// of outputs in named f32 registers, K walked `step` elements at a time (8 through the `_8`
/// accessors of the wide kinds, 4 through `_4`, or 1; the quantised kinds have their own,
/// [`regblock_body_quant`]), fused multiply-adds, and stores guarded by `t < p.t` and `n < p.n`. Rows past the end are clamped, so every load stays in bounds.
pub fn regblock_body(tm: u32, tn: u32, step: usize) -> String {
    use std::fmt::Write;
    let mut s = regblock_prologue(tm, tn, step, 1);
    let _ = writeln!(s, "    for (var kk = 0u; kk < steps; kk++) {{");
    for i in 0..tm {
        let _ = writeln!(s, "        let x{i} = x_{step}(xb{i} + kk);");
    }
    for j in 0..tn {
        let _ = writeln!(s, "        let w{j} = w_{step}(wb{j} + kk);");
    }
    // The terms of one step of K for the pair (i, j), as fma chains onto the accumulator.
    let terms = |i: u32, j: u32| -> Vec<(String, String)> {
        match step {
            8 => (0..2).flat_map(|h| "xyzw".chars().map(move |c| (format!("x{i}[{h}].{c}"), format!("w{j}[{h}].{c}")))).collect(),
            4 => "xyzw".chars().map(|c| (format!("x{i}.{c}"), format!("w{j}.{c}"))).collect(),
            _ => vec![(format!("x{i}"), format!("w{j}"))],
        }
    };
    for i in 0..tm {
        for j in 0..tn {
            let mut e = format!("a{i}_{j}");
            for (a, b) in terms(i, j) {
                e = format!("fma({a}, {b}, {e})");
            }
            let _ = writeln!(s, "        a{i}_{j} = {e};");
        }
    }
    let _ = writeln!(s, "    }}");
    regblock_stores(&mut s, tm, tn);
    s
}

/// [`regblock_body`] for the quantised kinds: K walked one unit of 32 values at a time. Per unit
/// and w row the scales and the quant words are loaded once (`w_scales`, `w_words`: one to four
/// vec4 loads); then for each half h of the unit, quarters 2h and 2h+1 (`w_pair_of(words, i)`:
/// values 4i..4i+3 and 16+4i..16+4i+3) are dequantised in registers and multiply the matching x
/// values of every x row, so that what is live at once is half a unit, not all 32 values of
/// every w row. With `wide_x` (x declared `F32Wide`) a row's x values of a half come in two
/// eight-value loads (`x_8`), else in four vec4 loads: x loads are most of a quantised block's
/// loads, TM rows of x against TN rows of w.
pub fn regblock_body_quant(tm: u32, tn: u32, wide_x: bool) -> String {
    use std::fmt::Write;
    // x row offsets in loads: eight values per load when wide, else four.
    let mut s = regblock_prologue(tm, tn, 32, if wide_x { 4 } else { 8 });
    let _ = writeln!(s, "    for (var kk = 0u; kk < steps; kk++) {{");
    for j in 0..tn {
        let _ = writeln!(s, "        let s{j} = w_scales(wb{j} + kk);");
        let _ = writeln!(s, "        let u{j} = w_words(wb{j} + kk);");
        let _ = writeln!(s, "        let sl{j} = vec4<f32>(s{j}.x);");
        let _ = writeln!(s, "        let sh{j} = vec4<f32>(s{j}.y);");
        let _ = writeln!(s, "        let sc{j} = vec4<f32>(s{j}.z);");
    }
    for h in 0..2 {
        let _ = writeln!(s, "        {{");
        for q in [2 * h, 2 * h + 1] {
            for j in 0..tn {
                let _ = writeln!(s, "            let p{q}_{j} = w_pair_of(u{j}, {q}u);");
                let _ = writeln!(s, "            let wl{q}_{j} = fma(p{q}_{j}.lo, sl{j}, sc{j});");
                let _ = writeln!(s, "            let wh{q}_{j} = fma(p{q}_{j}.hi, sh{j}, sc{j});");
            }
        }
        // x values 4q..4q+3 (lo) and 16+4q..16+4q+3 (hi) of quarter q, for each x row.
        let x_of = |i: u32, q: u32, hi: bool| -> String {
            if wide_x {
                format!("x{}{i}[{}]", if hi { "h" } else { "l" }, q % 2)
            } else {
                format!("x{}{q}_{i}", if hi { "h" } else { "l" })
            }
        };
        for i in 0..tm {
            if wide_x {
                let _ = writeln!(s, "            let xl{i} = x_8(xb{i} + kk * 4u + {h}u);");
                let _ = writeln!(s, "            let xh{i} = x_8(xb{i} + kk * 4u + {}u);", h + 2);
            } else {
                for q in [2 * h, 2 * h + 1] {
                    let _ = writeln!(s, "            let xl{q}_{i} = x_4(xb{i} + kk * 8u + {q}u);");
                    let _ = writeln!(s, "            let xh{q}_{i} = x_4(xb{i} + kk * 8u + {}u);", q + 4);
                }
            }
        }
        for i in 0..tm {
            for j in 0..tn {
                let mut e = format!("a{i}_{j}");
                for q in [2 * h, 2 * h + 1] {
                    for hi in [false, true] {
                        let (x, w) = (x_of(i, q, hi), format!("w{}{q}_{j}", if hi { "h" } else { "l" }));
                        for c in ["x", "y", "z", "w"] {
                            e = format!("fma({x}.{c}, {w}.{c}, {e})");
                        }
                    }
                }
                let _ = writeln!(s, "            a{i}_{j} = {e};");
            }
        }
        let _ = writeln!(s, "        }}");
    }
    let _ = writeln!(s, "    }}");
    regblock_stores(&mut s, tm, tn);
    s
}

/// The start of both regblock bodies: `steps` (K over `step`), each x row's offset in x loads
/// (`loads_per_step` per step of K), each w row's offset in steps (from the chunk's row
/// `p.w_row0`; rows past the end clamped) and
/// the `tm` x `tn` accumulators `a{i}_{j}`.
fn regblock_prologue(tm: u32, tn: u32, step: usize, loads_per_step: u32) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "    let steps = p.k / {step}u;");
    let x_scale = if loads_per_step == 1 { String::new() } else { format!(" * {loads_per_step}u") };
    for i in 0..tm {
        let _ = writeln!(s, "    let xb{i} = min(t0 + {i}u, p.t - 1u) * steps{x_scale};");
    }
    w_rows_and_accumulators(&mut s, tm, tn);
    s
}

/// Statements shared by the generated bodies: each of `tn` w rows' offset in steps of K from
/// `n0` (from the chunk's row `p.w_row0`; rows past the end clamped, so every load stays in
/// bounds) and the `tm` x `tn` accumulators `a{i}_{j}`, zeroed.
fn w_rows_and_accumulators(s: &mut String, tm: u32, tn: u32) {
    use std::fmt::Write;
    for j in 0..tn {
        let _ = writeln!(s, "    let wb{j} = (p.w_row0 + min(n0 + {j}u, p.n - 1u)) * steps;");
    }
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "    var a{i}_{j} = 0.0;");
        }
    }
}

/// The start of both xbcast bodies, up to the opening of the loop over K: `steps` (K over
/// `step`), `xs` (vec4 of x per row), `xw` (the window's first row in the binding), the `nb` rows
/// of w and the `tb` x `nb` accumulators.
fn xbcast_prologue(tb: u32, nb: u32, step: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "    let steps = p.k / {step}u;");
    let _ = writeln!(s, "    let xs = p.k / 4u;");
    let _ = writeln!(s, "    let xw = wy * {tb}u;");
    w_rows_and_accumulators(&mut s, tb, nb);
    let _ = writeln!(s, "    for (var kk = 0u; kk < steps; kk++) {{");
    s
}

/// The end of both xbcast bodies: each accumulator stored to row `p.t0 + xw + i` of y, guarded
/// by `i >= p.skip` (rows an earlier window stored) and `n < p.n`.
fn xbcast_stores(s: &mut String, tb: u32, nb: u32) {
    block_stores(s, tb, nb, |i| format!("{i}u >= p.skip"), |i| format!("p.t0 + xw + {i}u"));
}

/// The end of both regblock bodies: each accumulator stored, guarded by `t < p.t`, `n < p.n`.
fn regblock_stores(s: &mut String, tm: u32, tn: u32) {
    block_stores(s, tm, tn, |i| format!("t0 + {i}u < p.t"), |i| format!("t0 + {i}u"));
}

/// Stores of a `rows` x `cols` block of accumulators `a{i}_{j}`: row i of the block to row
/// `row(i)` of y where `guard(i)` holds, column j to `n0 + j` where `n0 + j < p.n`.
fn block_stores(s: &mut String, rows: u32, cols: u32, guard: impl Fn(u32) -> String, row: impl Fn(u32) -> String) {
    use std::fmt::Write;
    for i in 0..rows {
        let (guard, row) = (guard(i), row(i));
        let _ = writeln!(s, "    if ({guard}) {{");
        for j in 0..cols {
            let _ = writeln!(s, "        if (n0 + {j}u < p.n) {{ store({row}, n0 + {j}u, a{i}_{j}); }}");
        }
        let _ = writeln!(s, "    }}");
    }
}

/// [`xbcast_body`] for the quantised kinds: K walked one unit of 32 values at a time. Per unit
/// and w row the scales and the quant words are loaded once (`w_scales`, `w_words`); then for
/// each quarter q of the unit, values 4q..4q+3 and 16+4q..16+4q+3 of every w row are dequantised
/// in registers (`w_pair_of`) and multiply the matching x values of each row of the window (two
/// `x_4` loads of the uniform per row), so that what is live at once is a quarter of a unit of
/// the `nb` rows of w, not all 32 values. Stores as [`xbcast_body`] does.
pub fn xbcast_body_quant(tb: u32, nb: u32) -> String {
    use std::fmt::Write;
    let mut s = xbcast_prologue(tb, nb, 32);
    for j in 0..nb {
        let _ = writeln!(s, "        let s{j} = w_scales(wb{j} + kk);");
        let _ = writeln!(s, "        let u{j} = w_words(wb{j} + kk);");
    }
    for q in 0..4 {
        let _ = writeln!(s, "        {{");
        for j in 0..nb {
            let _ = writeln!(s, "            let p{j} = w_pair_of(u{j}, {q}u);");
            let _ = writeln!(s, "            let wl{j} = fma(p{j}.lo, vec4<f32>(s{j}.x), vec4<f32>(s{j}.z));");
            let _ = writeln!(s, "            let wh{j} = fma(p{j}.hi, vec4<f32>(s{j}.y), vec4<f32>(s{j}.z));");
        }
        for i in 0..tb {
            let _ = writeln!(s, "            {{");
            let _ = writeln!(s, "                let xl = x_4((xw + {i}u) * xs + kk * 8u + {q}u);");
            let _ = writeln!(s, "                let xh = x_4((xw + {i}u) * xs + kk * 8u + {}u);", q + 4);
            for j in 0..nb {
                let mut e = format!("a{i}_{j}");
                for (x, w) in [("xl", "wl"), ("xh", "wh")] {
                    for c in ["x", "y", "z", "w"] {
                        e = format!("fma({x}.{c}, {w}{j}.{c}, {e})");
                    }
                }
                let _ = writeln!(s, "                a{i}_{j} = {e};");
            }
            let _ = writeln!(s, "            }}");
        }
        let _ = writeln!(s, "        }}");
    }
    let _ = writeln!(s, "    }}");
    xbcast_stores(&mut s, tb, nb);
    s
}

/// CPU reference: `[rows, n]` = x (`[rows, k]`) times w (`[n, k]`) transposed, plus bias; in f64.
pub fn matmul_ref(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0.0; rows * n];
    for t in 0..rows {
        let xr = &x[t * k..(t + 1) * k];
        for j in 0..n {
            let d: f64 = w[j * k..(j + 1) * k].iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
            y[t * n + j] = (d + bias.map_or(0.0, |b| b[j] as f64)) as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, GpuMatrix, GpuOptions, GpuTensor, WeightKind, test_context};
    use crate::kernels::testing::{assert_close, random_vec, round_f16, weight_kinds};

    struct Case {
        t: usize,
        n: usize,
        k: usize,
        bias: bool,
        accumulate: bool,
        y_col0: usize,
        y_extra: usize,
    }

    fn case(t: usize, n: usize, k: usize) -> Case {
        Case { t, n, k, bias: false, accumulate: false, y_col0: 0, y_extra: 0 }
    }

    fn check(ctx: &GpuContext, c: &Case, kind: WeightKind, variant: MatmulVariant) {
        let seed = (c.t * 1000 + c.n * 31 + c.k) as u64;
        let x = random_vec(c.t * c.k, seed);
        let mut wv = random_vec(c.n * c.k, seed + 1);
        let b = random_vec(c.n, seed + 2);
        let stride = c.y_col0 + c.n + c.y_extra;
        let y0 = random_vec(c.t * stride, seed + 3);
        let gw = GpuMatrix::upload(ctx, "w", c.n, c.k, &wv, kind.dtype()).unwrap();
        if kind.dtype() == DType::F16 {
            wv = round_f16(&wv);
        }
        let gx = GpuTensor::from_f32(ctx, "x", &[c.t, c.k], &x).unwrap();
        let gb = GpuTensor::from_f32(ctx, "b", &[c.n], &b).unwrap();
        let gy = GpuTensor::from_f32(ctx, "y", &[c.t, stride], &y0).unwrap();
        let op = LinearOp::new(&gx, c.t, &gw, &gy)
            .bias(c.bias.then_some(&gb))
            .y_stride(stride)
            .y_col0(c.y_col0)
            .accumulate(c.accumulate)
            .kind(kind);
        let ds = matmul(ctx, "mm", &op, variant).unwrap();
        let refs: Vec<&Dispatch> = ds.iter().collect();
        ctx.run("test", &refs).unwrap();
        let got = gy.read_f32(ctx).unwrap();
        let r = matmul_ref(&x, c.t, &wv, c.n, c.k, c.bias.then_some(&b[..]));
        let mut want = y0.clone();
        for t in 0..c.t {
            for j in 0..c.n {
                let i = t * stride + c.y_col0 + j;
                want[i] = if c.accumulate { want[i] + r[t * c.n + j] } else { r[t * c.n + j] };
            }
        }
        let atol = 4e-5 * (c.k as f32).sqrt();
        let what = format!("matmul {variant:?} {} t={} n={} k={} bias={} acc={}", kind.name(), c.t, c.n, c.k, c.bias, c.accumulate);
        assert_close(&got, &want, atol, 1e-5, &what);
    }

    #[test]
    fn matmul_matches_reference_all_variants_and_kinds() {
        let ctx = test_context();
        for variant in MatmulVariant::available(&ctx) {
            for kind in weight_kinds(&ctx) {
                for (t, n, k) in
                    [(1, 1, 1), (7, 7, 7), (3, 257, 257), (5, 9, 1757), (1757, 5, 12), (70, 67, 20), (65, 130, 64), (17, 33, 576)]
                {
                    check(&ctx, &case(t, n, k), kind, variant);
                }
            }
        }
    }

    #[test]
    fn matmul_bias_accumulate_and_strided_y() {
        let ctx = test_context();
        for variant in MatmulVariant::available(&ctx) {
            for kind in weight_kinds(&ctx) {
                check(&ctx, &Case { t: 9, n: 37, k: 64, bias: true, accumulate: false, y_col0: 5, y_extra: 3 }, kind, variant);
                check(&ctx, &Case { t: 66, n: 37, k: 63, bias: true, accumulate: true, y_col0: 2, y_extra: 0 }, kind, variant);
                check(&ctx, &Case { t: 4, n: 10, k: 20, bias: false, accumulate: true, y_col0: 0, y_extra: 7 }, kind, variant);
            }
        }
    }

    #[test]
    fn matmul_large() {
        let ctx = test_context();
        for variant in MatmulVariant::available(&ctx) {
            check(&ctx, &case(64, 576, 576), WeightKind::F32, variant);
            let c = Case { t: 33, n: 576, k: 1536, bias: true, accumulate: true, y_col0: 0, y_extra: 0 };
            check(&ctx, &c, WeightKind::for_dtype(&ctx, DType::F16), variant);
        }
    }

    #[test]
    fn matmul_over_split_weights() {
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        for variant in MatmulVariant::available(&ctx) {
            for kind in [WeightKind::F32, WeightKind::F16Packed] {
                let gw = GpuMatrix::upload(&ctx, "w", 301, 36, &random_vec(301 * 36, 9), kind.dtype()).unwrap();
                assert!(gw.chunks.len() > 1);
                check(&ctx, &Case { t: 5, n: 301, k: 36, bias: true, accumulate: false, y_col0: 3, y_extra: 1 }, kind, variant);
                check(&ctx, &Case { t: 3, n: 97, k: 257, bias: true, accumulate: true, y_col0: 1, y_extra: 0 }, kind, variant);
            }
        }
    }

    /// A block of W's rows ([`LinearOp::w_rows`], the cross-entropy's vocabulary chunks): the
    /// forward product (every variant) and the backward form over rows `start .. start + len`
    /// equal the references on those rows alone, for dense kinds and a block type, with W split
    /// into buffers that the block straddles.
    #[test]
    fn products_over_a_block_of_rows() {
        use crate::gpu::MatrixPart;
        use crate::kernels::matmul_xw::matmul_xw_ref;
        use crate::kernels::testing::random_blocks;
        use crate::model::QuantType;
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        let (n, k, t) = (301, 64, 7);
        let (dense, blocks) = (random_vec(n * k, 6), random_blocks(QuantType::Q8_0, n, k, 5));
        let up = |dtype| GpuMatrix::upload(&ctx, "w", n, k, &dense, dtype).unwrap();
        let weights = [
            (WeightKind::F32, up(DType::F32), dense.clone()),
            (WeightKind::F16Packed, up(DType::F16), round_f16(&dense)),
            (
                WeightKind::Quant(QuantType::Q8_0),
                GpuMatrix::upload_parts(&ctx, "w", k, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap(),
                blocks.dequantize().unwrap(),
            ),
        ];
        let x = random_vec(t * k, 7);
        let gx = GpuTensor::from_f32(&ctx, "x", &[t, k], &x).unwrap();
        for (kind, gw, wv) in &weights {
            assert!(gw.chunks.len() > 2, "{}: W must be split", kind.name());
            let atol = 1e-4 * (k as f32).sqrt() * wv.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (start, len) in [(0, n), (5, 3), (37, 150), (n - 1, 1)] {
                let block = &wv[start * k..(start + len) * k];
                let what = format!("{} rows {start} + {len}", kind.name());
                for variant in MatmulVariant::available(&ctx) {
                    let gy = GpuTensor::from_f32(&ctx, "y", &[t, len], &random_vec(t * len, 8)).unwrap();
                    let ds = matmul(&ctx, "mm", &LinearOp::new(&gx, t, gw, &gy).w_rows(start, len).kind(*kind), variant).unwrap();
                    ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
                    let want = matmul_ref(&x, t, block, len, k, None);
                    assert_close(&gy.read_f32(&ctx).unwrap(), &want, atol, 1e-5, &format!("{what} {variant:?} x W_blockᵀ"));
                }
                let g = random_vec(t * len, 9);
                let gg = GpuTensor::from_f32(&ctx, "g", &[t, len], &g).unwrap();
                let gdx = GpuTensor::from_f32(&ctx, "dx", &[t, k], &random_vec(t * k, 10)).unwrap();
                let ds = matmul(&ctx, "xw", &LinearOp::new_xw(&gg, t, gw, &gdx).w_rows(start, len).kind(*kind), MatmulVariant::RegBlock)
                    .unwrap();
                ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
                let want = matmul_xw_ref(&g, t, block, len, k);
                assert_close(
                    &gdx.read_f32(&ctx).unwrap(),
                    &want,
                    atol * (len as f32 / k as f32).sqrt().max(1.0),
                    1e-5,
                    &format!("{what} g x W_block"),
                );
            }
        }
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[t, 2]).unwrap();
        let past = LinearOp::new(&gx, t, &weights[0].1, &gy).w_rows(n - 1, 2);
        assert!(matmul(&ctx, "mm", &past, MatmulVariant::RegBlock).is_err(), "rows past the end of W");
    }

    #[test]
    fn matmul_rejects_bad_shapes() {
        let ctx = test_context();
        let gw = GpuMatrix::upload(&ctx, "w", 8, 16, &random_vec(128, 1), DType::F32).unwrap();
        let gx = GpuTensor::from_f32(&ctx, "x", &[2, 16], &random_vec(32, 2)).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[2, 8]).unwrap();
        assert!(matmul(&ctx, "mm", &LinearOp::new(&gx, 3, &gw, &gy).y_stride(8), MatmulVariant::RegBlock).is_err());
        assert!(matmul(&ctx, "mm", &LinearOp::new(&gx, 2, &gw, &gy).y_stride(7), MatmulVariant::RegBlock).is_err());
        assert!(matmul(&ctx, "mm", &LinearOp::new(&gx, 2, &gw, &gy).y_stride(9), MatmulVariant::RegBlock).is_err());
        assert!(matmul(&ctx, "mm", &LinearOp::new(&gx, 0, &gw, &gy).y_stride(8), MatmulVariant::RegBlock).is_err());
        matmul(&ctx, "mm", &LinearOp::new(&gx, 2, &gw, &gy).y_stride(8), MatmulVariant::Tiled).unwrap();
    }

    /// The windows of the `XBcast` variant store every row exactly once, in order: all of one
    /// length (the largest power of two at most `tb` and the rows), the last one overlapping the
    /// one before by its `skip`; its dispatches group up to `per_dispatch` whole windows and store
    /// the same rows.
    #[test]
    fn xbcast_windows_cover_each_row_once() {
        assert!(xbcast_windows(0, 8).is_empty());
        assert_eq!(xbcast_windows(37, 8), [(0, 8, 0), (8, 8, 0), (16, 8, 0), (24, 8, 0), (29, 8, 3)]);
        for tb in [8usize, 16] {
            for rows in 1..4 * tb + 3 {
                let windows = xbcast_windows(rows, tb);
                let w = tb.min(1 << rows.ilog2());
                let mut next = 0;
                for (i, &(t0, len, skip)) in windows.iter().enumerate() {
                    let last = i + 1 == windows.len();
                    assert!(len == w && t0 + skip == next && skip < len && (last || skip == 0), "rows {rows} tb {tb}: {windows:?}");
                    next = t0 + len;
                }
                assert_eq!(next, rows, "rows {rows} tb {tb}: {windows:?}");
                assert_eq!(windows.len(), rows.div_ceil(w));
                for per_dispatch in [1, 3, 8] {
                    let dispatches = xbcast_dispatches(rows, tb, per_dispatch);
                    let mut next = 0;
                    for &(t0, len, count, skip) in &dispatches {
                        assert!(len == w && t0 + skip == next && (count == 1 || skip == 0) && count <= per_dispatch, "{dispatches:?}");
                        next = t0 + len * count;
                    }
                    assert_eq!(next, rows, "rows {rows} tb {tb} per dispatch {per_dispatch}: {dispatches:?}");
                    assert_eq!(dispatches.len(), (rows / w).div_ceil(per_dispatch) + usize::from(!rows.is_multiple_of(w)));
                }
            }
        }
    }

    /// `XBcast` runs as one dispatch per window and chunk where it applies (dense weights,
    /// aligned rows of x), also over split weights with bias and accumulation and windows of 8
    /// rows, the last overlapping (37 rows; results checked: an overlapping row stored twice
    /// would be added twice), and falls back to `RegBlock` (one dispatch per
    /// chunk) for quantised weights past [`XBCAST_QUANT_MAX_ROWS`] rows and unaligned rows of x.
    #[test]
    fn xbcast_windows_and_fallbacks() {
        use crate::model::QuantType;
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(8192), ..Default::default() }).unwrap();
        let align = ctx.limits.min_uniform_buffer_offset_alignment as usize;
        let k = align.max(64);
        let (t, n) = (37, 301);
        let (x, wv, b, y0) = (random_vec(t * k, 31), random_vec(n * k, 32), random_vec(n, 33), random_vec(t * n, 34));
        let gx = GpuTensor::from_f32(&ctx, "x", &[t, k], &x).unwrap();
        let gb = GpuTensor::from_f32(&ctx, "b", &[n], &b).unwrap();
        let lanes = xbcast_lanes(&ctx);
        // XBcast, and XBcastSubgroup (windows of 16 rows) where the adapter runs it.
        let variants = [(MatmulVariant::XBcast, None)].into_iter().chain(lanes.map(|l| (MatmulVariant::XBcastSubgroup, Some(l))));
        for ((variant, lanes), dtype) in variants.flat_map(|v| [DType::F32, DType::F16].map(|d| (v, d))) {
            let gw = GpuMatrix::upload(&ctx, "w", n, k, &wv, dtype).unwrap();
            let chunks = gw.chunks.len();
            assert!(chunks > 1, "W must be split");
            let gy = GpuTensor::from_f32(&ctx, "y", &[t, n], &y0).unwrap();
            let op = LinearOp::new(&gx, t, &gw, &gy).bias(Some(&gb)).accumulate(true);
            let kind = WeightKind::for_dtype(&ctx, dtype);
            let op = op.kind(kind);
            let tb = xbcast_window_of(&ctx, &op, kind, lanes).expect("XBcast applies");
            assert_eq!(tb, if lanes.is_some() { XBCAST_SG_TB } else { XBCAST_TB }, "{variant:?}");
            let tag = crate::gpu::Tag::layer(crate::gpu::Phase::Prefill, 3, "mlp.down");
            let ds: Vec<Dispatch> = matmul(&ctx, &tag.label(), &op, variant).unwrap().into_iter().map(|d| d.tagged(tag)).collect();
            // Every dispatch its own label (the profiler times each once), one operation in the tables.
            let mut labels: Vec<&str> = ds.iter().map(|d| d.label.as_str()).collect();
            labels.sort_unstable();
            labels.dedup();
            assert_eq!(labels.len(), ds.len(), "{labels:?}");
            assert!(ds.iter().all(|d| d.op_name().starts_with("mlp.down") && !d.op_name().contains('#')));
            let per_dispatch = (ctx.limits.max_uniform_buffer_binding_size as usize / (tb as usize * 4 * k))
                .clamp(1, XBCAST_WINDOWS_PER_DISPATCH as usize);
            assert_eq!(ds.len(), chunks * xbcast_dispatches(t, tb as usize, per_dispatch).len(), "{dtype}: dispatches per chunk");
            ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
            let w_read = if dtype == DType::F16 { round_f16(&wv) } else { wv.clone() };
            let r = matmul_ref(&x, t, &w_read, n, k, Some(&b));
            let want: Vec<f32> = y0.iter().zip(&r).map(|(a, b)| a + b).collect();
            assert_close(&gy.read_f32(&ctx).unwrap(), &want, 4e-5 * (k as f32).sqrt(), 1e-5, &format!("{variant:?} {dtype} accumulate"));
        }
        // Quantised weights: XBcast up to XBCAST_QUANT_MAX_ROWS rows (its body is checked on
        // every block type in quant_tests), RegBlock beyond, with as many dispatches as
        // RegBlock's (one per chunk).
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[XBCAST_QUANT_MAX_ROWS + 1, n]).unwrap();
        let blocks = crate::kernels::testing::random_blocks(QuantType::Q8_0, n, k, 35);
        let gq = GpuMatrix::upload_parts(&ctx, "q", k, &[crate::gpu::MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
        // Kinds given: the kernel choice is not measured in this context (split weights).
        let quant = LinearOp::new(&gx, t, &gq, &gy).kind(WeightKind::F32);
        assert_eq!(xbcast_window(&ctx, &quant, WeightKind::F32), Some(XBCAST_TB), "quantised weights, {t} rows");
        // XBcastSubgroup runs XBcast's quantised body, in XBcast's windows.
        assert_eq!(xbcast_window_of(&ctx, &quant, WeightKind::F32, lanes), Some(XBCAST_TB), "quantised weights, subgroup");
        let long_x = GpuTensor::zeros(&ctx, "x", DType::F32, &[XBCAST_QUANT_MAX_ROWS + 1, k]).unwrap();
        let long = LinearOp::new(&long_x, XBCAST_QUANT_MAX_ROWS + 1, &gq, &gy).kind(WeightKind::F32);
        assert_eq!(xbcast_window(&ctx, &long, WeightKind::F32), None, "quantised weights, more rows");
        let ds = matmul(&ctx, "mm", &long, MatmulVariant::XBcast).unwrap();
        assert_eq!(ds.len(), matmul(&ctx, "mm", &long, MatmulVariant::RegBlock).unwrap().len());
        let k_odd = k + 4;
        let (x_odd, w_odd) = (random_vec(t * k_odd, 36), random_vec(n * k_odd, 37));
        let gx_odd = GpuTensor::from_f32(&ctx, "x", &[t, k_odd], &x_odd).unwrap();
        let gw_odd = GpuMatrix::upload(&ctx, "w", n, k_odd, &w_odd, DType::F32).unwrap();
        let odd = LinearOp::new(&gx_odd, t, &gw_odd, &gy).kind(WeightKind::F32);
        if !(4 * k_odd).is_multiple_of(align) {
            assert_eq!(xbcast_window(&ctx, &odd, WeightKind::F32), None, "rows of x not aligned");
        } else if let Some(l) = lanes {
            // K not a multiple of the lanes: XBcastSubgroup runs XBcast's body and windows.
            assert!(!k_odd.is_multiple_of(l as usize));
            assert_eq!(xbcast_window_of(&ctx, &odd, WeightKind::F32, lanes), Some(XBCAST_TB));
            let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[t, n]).unwrap();
            let odd = LinearOp::new(&gx_odd, t, &gw_odd, &gy).kind(WeightKind::F32);
            ctx.run("test", &matmul(&ctx, "mm", &odd, MatmulVariant::XBcastSubgroup).unwrap().iter().collect::<Vec<_>>()).unwrap();
            let want = matmul_ref(&x_odd, t, &w_odd, n, k_odd, None);
            assert_close(&gy.read_f32(&ctx).unwrap(), &want, 4e-5 * (k_odd as f32).sqrt(), 1e-5, "xbcast-subgroup, K % lanes != 0");
        }
    }

    /// On activations ([`GpuTensor::zeros_bound`], with room past their rows) every `XBcast`
    /// dispatch binds and declares the same [`xbcast_x_bytes`], so one pipeline per kind of W and
    /// window length serves K = 576 (three windows per dispatch, then one; `XBcastSubgroup`: one
    /// window of 16 rows) and K = 1536 (one); on a tensor without that room past its last windows
    /// they bind just their rows. Results are checked both ways, for both xbcast variants.
    #[test]
    fn xbcast_one_pipeline_per_window_length_for_every_k_and_window_count() {
        let ctx = GpuContext::new(&GpuOptions::default()).unwrap();
        let fixed = ctx.limits.max_uniform_buffer_binding_size.min(UNIFORM_WINDOW_BYTES);
        if fixed < 8 * 4 * 1536 || ctx.limits.min_uniform_buffer_offset_alignment > 4 * 576 {
            return; // xbcast does not apply to both shapes here
        }
        let (t, n) = (37, 67);
        let lanes = xbcast_lanes(&ctx);
        let variants = [(MatmulVariant::XBcast, None)].into_iter().chain(lanes.map(|l| (MatmulVariant::XBcastSubgroup, Some(l))));
        for ((variant, lanes), dtype) in variants.flat_map(|v| [DType::F32, DType::F16].map(|d| (v, d))) {
            let kind = WeightKind::for_dtype(&ctx, dtype);
            for activation in [true, false] {
                let before = ctx.pipelines.len();
                let mut lengths = Vec::new();
                for (i, k) in [576usize, 1536].into_iter().enumerate() {
                    let x = random_vec(t * k, 40 + i as u64);
                    let wv = random_vec(n * k, 50 + i as u64);
                    let gw = GpuMatrix::upload(&ctx, "w", n, k, &wv, dtype).unwrap();
                    let w_read = if dtype == DType::F16 { round_f16(&wv) } else { wv.clone() };
                    let gx = if activation {
                        let gx = GpuTensor::zeros_bound(&ctx, "x", DType::F32, &[t, k]).unwrap();
                        gx.write_f32(&ctx, &x);
                        gx
                    } else {
                        GpuTensor::from_f32(&ctx, "x", &[t, k], &x).unwrap()
                    };
                    assert_eq!(gx.buffer.size() >= 4 * (t * k) as u64 + fixed, activation);
                    let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[t, n]).unwrap();
                    let op = LinearOp::new(&gx, t, &gw, &gy).kind(kind);
                    lengths.push(xbcast_window_of(&ctx, &op, kind, lanes).expect("xbcast applies"));
                    let ds = matmul(&ctx, "mm", &op, variant).unwrap();
                    ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
                    let what = format!("{variant:?} {dtype} K = {k}, activation {activation}");
                    assert_close(
                        &gy.read_f32(&ctx).unwrap(),
                        &matmul_ref(&x, t, &w_read, n, k, None),
                        4e-5 * (k as f32).sqrt(),
                        1e-5,
                        &what,
                    );
                }
                // One pipeline per window length (XBcast: 8 rows at both K; XBcastSubgroup: 16
                // at K = 576, 8 at K = 1536). A plain tensor's last windows bind just their rows
                // (XBcast: 18 KiB at K = 576, XBcastSubgroup 36 KiB; 48 KiB at K = 1536), each
                // size its own pipeline; its earlier windows still have 64 KiB of the buffer after
                // them and share the activations' one.
                lengths.dedup();
                let added = ctx.pipelines.len() - before;
                assert_eq!(
                    added,
                    if activation { lengths.len() } else { 2 },
                    "{variant:?} {dtype}: pipelines built, activation {activation}"
                );
            }
        }
    }

    /// The scale flag (LoRA's `y[:, col0..] += s · a · B^T`): every variant, strided y with an
    /// offset, K = 8 (a LoRA rank) and K = 576 (x onto A).
    #[test]
    fn matmul_scaled_accumulates_scaled_product() {
        let ctx = test_context();
        for variant in MatmulVariant::available(&ctx) {
            for (t, n, k, y_col0, scale) in [(9usize, 37usize, 8usize, 5usize, -1.75f32), (70, 8, 576, 0, 2.0), (3, 19, 6, 2, 0.0)] {
                let y_stride = y_col0 + n + 4;
                let x = random_vec(t * k, 21);
                let wv = random_vec(n * k, 22);
                let y0 = random_vec(t * y_stride, 23);
                let gw = GpuMatrix::upload(&ctx, "w", n, k, &wv, DType::F32).unwrap();
                let gx = GpuTensor::from_f32(&ctx, "x", &[t, k], &x).unwrap();
                let gy = GpuTensor::from_f32(&ctx, "y", &[t, y_stride], &y0).unwrap();
                let op = LinearOp::new(&gx, t, &gw, &gy).y_stride(y_stride).y_col0(y_col0).accumulate(true).scale(scale);
                let ds = matmul(&ctx, "mm", &op, variant).unwrap();
                ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
                let got = gy.read_f32(&ctx).unwrap();
                let r = matmul_ref(&x, t, &wv, n, k, None);
                let mut want = y0.clone();
                for row in 0..t {
                    for j in 0..n {
                        want[row * y_stride + y_col0 + j] += scale * r[row * n + j];
                    }
                }
                assert_close(&got, &want, 1e-4, 1e-5, &format!("matmul_scaled {variant:?} t={t} n={n} k={k} scale={scale}"));
                if scale == 0.0 {
                    assert_eq!(got, y0, "scale 0 must leave y bit-identical");
                }
            }
        }
    }
}
