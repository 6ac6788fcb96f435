//! Matrix-vector product (GEMV) for decode, one token: the [`LinearOp`]
//! `y[y_col0 + n] (+)= scale · dot(w[n, :], x) (+ bias[n])` with `w` a `[N, K]` weight matrix
//! (Hugging Face `[out, in]`) in f32 or f16 and f32 maths.
//!
//! Four variants: [`MatvecVariant::Rows`] (each invocation owns a few rows, register-blocked vec4
//! loads, no workgroup memory), [`MatvecVariant::Windows`] (the same with W read through uniform
//! windows, [`crate::kernels::matvec_windows`]: the fast one on CPU drivers such as lavapipe),
//! [`MatvecVariant::Reduce`] (one workgroup per row, reduction through workgroup memory) and
//! [`MatvecVariant::Subgroup`] (a subgroup per few rows, lanes striding over K, `subgroupAdd`: the
//! usual GPU GEMV where the adapter has subgroups).
//! [`crate::kernels::choice::matvec_variant`] picks one per adapter by measurement.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, WeightKind};
use crate::kernels::checks::invalid;
use crate::kernels::linear::{LinearForm, LinearOp, XBinding};
use crate::kernels::matmul_xw::matmul_xw;
use crate::kernels::matvec_windows::{WINDOW_LANES, WINDOWS_PER_DISPATCH, window_plan, windows_dispatches};
use crate::kernels::rope::RopeQkvOp;

const SOURCE: &str = include_str!("../../shaders/matvec.wgsl");

/// Rows per invocation of the `Rows` variant (4 measured at least as fast as 2 and 8 on lavapipe
/// for every kind, `cargo bench --bench kernels -- matvec`).
pub const ROWS_PER_INVOCATION: u32 = 4;
/// Workgroup size of the `Rows` variant.
pub const ROWS_WG: u32 = 64;
/// Workgroup size of the `Reduce` variant (a power of two).
pub const REDUCE_WG: u32 = 64;
/// Workgroup size of the `Subgroup` variant.
pub const SUBGROUP_WG: u32 = 64;
/// Storage buffers per shader stage that the RoPE epilogue binds ([`MatvecEpilogue::Rope`]: w,
/// bias, y, the cos and sin tables, q_out and both caches); an adapter allowing fewer keeps the
/// separate RoPE kernel.
pub const ROPE_EPILOGUE_STORAGE_BUFFERS: u32 = 8;
/// Row groups ([`ROWS_PER_INVOCATION`] rows each) per workgroup of the `Subgroup` variant: its
/// subgroups take them in turn, whatever the adapter's subgroup size.
pub const SUBGROUP_GROUPS: u32 = 8;

/// The matvec kernel variants; [`crate::kernels::choice::matvec_variant`] picks one per adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatvecVariant {
    /// Register-blocked vec4, no workgroup memory: [`ROWS_PER_INVOCATION`] rows of W per
    /// invocation, [`ROWS_WG`] invocations per workgroup.
    Rows,
    /// Workgroup reduction per row: one workgroup of [`REDUCE_WG`] invocations per row of W.
    Reduce,
    /// Subgroup reduction: each subgroup owns [`ROWS_PER_INVOCATION`] rows at a time, its lanes
    /// stride over K (adjacent lanes read adjacent memory) and `subgroupAdd` sums them; no
    /// workgroup memory or barrier. Needs the adapter's SUBGROUP feature.
    Subgroup,
    /// `Rows`' product and epilogues with W read through uniform windows of whole rows, one per
    /// workgroup of [`crate::kernels::matvec_windows::WINDOW_LANES`]; an op that does not suit
    /// them ([`crate::kernels::matvec_windows::window_plan`]: quantised or split weights, K % 16
    /// != 0, ..) runs as `Rows`. Needs room for a dispatch's windows in the adapter's uniform
    /// buffers per shader stage ([`MatvecVariant::available`]).
    Windows,
}

impl MatvecVariant {
    /// Every variant, in the order the kernel choice measures them.
    pub const ALL: [MatvecVariant; 4] = [MatvecVariant::Rows, MatvecVariant::Reduce, MatvecVariant::Subgroup, MatvecVariant::Windows];

    /// The variant's name in `FIRSTRT_KERNEL`, the choice cache and bench rows (`rows`, `reduce`,
    /// `subgroup`, `windows`).
    pub fn name(self) -> &'static str {
        match self {
            MatvecVariant::Rows => "rows",
            MatvecVariant::Reduce => "reduce",
            MatvecVariant::Subgroup => "subgroup",
            MatvecVariant::Windows => "windows",
        }
    }

    /// The variants this adapter can run, in the order of [`MatvecVariant::ALL`]: all but
    /// `Subgroup` where the adapter lacks SUBGROUP, and `Windows` where a dispatch's windows
    /// (two bindings each for the paired epilogues) would not fit its uniform buffers per shader
    /// stage.
    pub fn available(ctx: &GpuContext) -> Vec<MatvecVariant> {
        let windows_fit = u64::from(ctx.limits.max_uniform_buffers_per_shader_stage) >= 5 + 2 * WINDOWS_PER_DISPATCH as u64;
        MatvecVariant::ALL
            .into_iter()
            .filter(|&v| match v {
                MatvecVariant::Subgroup => ctx.has_subgroups(),
                MatvecVariant::Windows => windows_fit,
                _ => true,
            })
            .collect()
    }

    /// The variant called `s` ([`MatvecVariant::name`]), if any.
    pub fn parse(s: &str) -> Option<MatvecVariant> {
        MatvecVariant::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// Uniform of `shaders/matvec.wgsl` (`struct Params` there, same fields in the same order), one
/// per chunk of W.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatvecParams {
    /// Rows of W in this chunk (outputs it computes).
    pub rows: u32,
    /// Reduction length K (`w.cols`).
    pub k: u32,
    /// Index of the chunk's first row in W (and in the bias).
    pub row0: u32,
    /// First output column of y.
    pub y_col0: u32,
    /// Bits of [`crate::kernels::linear`]: `FLAG_ACCUMULATE`, `FLAG_BIAS`, `FLAG_SCALE`.
    pub flags: u32,
    /// Multiplies the product when `flags` has `FLAG_SCALE` (before bias and accumulation).
    pub scale: f32,
    /// Padding to 32 bytes.
    pub _pad1: u32,
    /// Padding to 32 bytes.
    pub _pad2: u32,
}

/// What the decode GEMV stores besides (or instead of) the product: an epilogue that does the
/// work of the small kernel after it, which saves a decode step one dispatch per layer (on
/// lavapipe a dispatch costs 65–85 us whatever its size: BENCHMARKS.md, "Epilogues of the
/// decode GEMV"). The epilogues pair two rows of W per output, so an invocation of the rows
/// kernel takes `ROWS_PER_INVOCATION / 2` outputs.
#[derive(Debug, Clone, Copy, Default)]
pub enum MatvecEpilogue<'a> {
    /// `y[y_col0 + n] (+)= scale · dot(W[n, :], x) (+ bias[n])`.
    #[default]
    Store,
    /// `LlamaMLP`'s `act_fn(gate_proj(x)) * up_proj(x)` (Hugging Face transformers) from the fused
    /// gate_up product: W is `[2 ff, K]`, its `ff` gate rows then its `ff` up rows, and
    /// `y[j] = silu(g_j) · u_j` for `j < ff`, with `g_j = dot(W[j, :], x)`,
    /// `u_j = dot(W[ff + j, :], x)` and `silu(g) = g · sigmoid(g)` (`kernels::swiglu`'s maths). y
    /// still needs room for N = 2 ff values ([`LinearOp::check`]); the rest is left as it was.
    /// Only [`MatvecVariant::Rows`] and [`MatvecVariant::Windows`]; no bias, scale, accumulation
    /// or `y_col0`; W in one chunk.
    SwiGlu,
    /// The fused QKV projection followed by [`crate::kernels::rope::rope_qkv_write`] of its one
    /// row: y (`[N]`, N = `(n_heads + 2 n_kv_heads) head_dim`) gets the product (with bias) as
    /// [`MatvecEpilogue::Store`], and each pair `(i, i + head_dim / 2)` of a head is rotated and
    /// written where the op says (q to `q_out` row 0, k and v to the caches at the step's
    /// position `pos0`), as the RoPE kernel does. The op's `qkv` is y, `rows` 1 and `row0` 0.
    /// Only [`MatvecVariant::Rows`] and [`MatvecVariant::Windows`]; no scale, accumulation or
    /// `y_col0` (a bias is fine); W in one chunk; the adapter must allow
    /// [`ROPE_EPILOGUE_STORAGE_BUFFERS`] storage buffers per shader stage.
    Rope(&'a RopeQkvOp<'a>),
    /// A product into the residual stream followed by the RMSNorm of its result (`kernels::rmsnorm`'s
    /// maths, `LlamaRMSNorm` of Hugging Face transformers): y gets the product as
    /// [`MatvecEpilogue::Store`] (with accumulation and bias as the op says), then
    /// `out[n] = y[n] / sqrt(mean(y²) + eps) · weight[n]` over the N values of y. Each invocation
    /// records the sum of squares of the values it stored and counts itself done on an atomic
    /// counter; the last one to finish sums the records and writes `out`, then resets the counter.
    /// That hand-off between workgroups relies on what WGSL does not promise (its atomics are
    /// relaxed) but lavapipe gives (sequentially consistent atomics on a CPU's coherent memory),
    /// so it is offered on CPU adapters only. Only [`MatvecVariant::Rows`] and
    /// [`MatvecVariant::Windows`]; no scale or `y_col0`; W in one chunk.
    Norm(&'a NormEpilogue<'a>),
}

/// The RMSNorm of [`MatvecEpilogue::Norm`].
#[derive(Debug, Clone, Copy)]
pub struct NormEpilogue<'a> {
    /// The norm's weight γ, `[N]` f32.
    pub weight: &'a GpuTensor,
    /// The normalised row, `[N]` f32 (or longer); distinct from the GEMV's y.
    pub out: &'a GpuTensor,
    /// The epsilon added to the mean square (`rms_norm_eps` of config.json).
    pub eps: f32,
}

impl MatvecEpilogue<'_> {
    /// The epilogue's name in errors: `store`, `swiglu`, `rope` or `norm`.
    pub fn name(&self) -> &'static str {
        match self {
            MatvecEpilogue::Store => "store",
            MatvecEpilogue::SwiGlu => "swiglu",
            MatvecEpilogue::Rope(_) => "rope",
            MatvecEpilogue::Norm(_) => "norm",
        }
    }

    /// Whether an output takes two rows of W (`SwiGlu`, `Rope`).
    fn paired(&self) -> bool {
        matches!(self, MatvecEpilogue::SwiGlu | MatvecEpilogue::Rope(_))
    }
}

/// Uniform of the norm epilogue ([`norm_decl`]): N, the invocations that store rows, epsilon.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct NormParams {
    n: u32,
    n_inv: u32,
    eps: f32,
    _pad: u32,
}

/// The WGSL of the norm epilogue ([`MatvecEpilogue::Norm`]) pasted into `EPILOGUE_DECL`: its
/// bindings 5 to 8 (uniform `np`, γ, the output, the counter and per-invocation sums of squares)
/// and `norm_hand_off`. With `vec4` (N % 4 == 0) γ and the output are read and written four
/// values per access: the one invocation that normalises does every access alone, and on lavapipe
/// each costs a loop over the SIMD lanes whatever its width.
fn norm_decl(vec4: bool) -> String {
    let (elem, normalise) = if vec4 {
        (
            "vec4<f32>",
            "for (var i = 0u; i < np.n / 4u; i++) {
        let j = 4u * i;
        norm_out[i] = vec4<f32>(y[j], y[j + 1u], y[j + 2u], y[j + 3u]) * inv_rms * norm_w[i];
    }",
        )
    } else {
        (
            "f32",
            "for (var i = 0u; i < np.n; i++) {
        norm_out[i] = y[i] * inv_rms * norm_w[i];
    }",
        )
    };
    format!(
        "struct NormParams {{ n: u32, n_inv: u32, eps: f32, _pad: u32 }};
struct NormScratch {{ done: atomic<u32>, partial: array<f32> }};
@group(0) @binding(5) var<uniform> np: NormParams;
@group(0) @binding(6) var<storage, read> norm_w: array<{elem}>;         // [n] gamma
@group(0) @binding(7) var<storage, read_write> norm_out: array<{elem}>; // [n]
@group(0) @binding(8) var<storage, read_write> scratch: NormScratch;  // counter, [n_inv] sums of squares

// Invocation inv has stored its rows of y, whose squares sum to ss: record it and count it done;
// the last invocation to finish sums the records, writes the normalised y and resets the counter
// for the next dispatch.
fn norm_hand_off(inv: u32, ss: f32) {{
    scratch.partial[inv] = ss;
    if (atomicAdd(&scratch.done, 1u) != np.n_inv - 1u) {{
        return;
    }}
    var total = 0.0;
    for (var i = 0u; i < np.n_inv; i++) {{
        total += scratch.partial[i];
    }}
    let inv_rms = inverseSqrt(total / f32(np.n) + np.eps);
    {normalise}
    atomicStore(&scratch.done, 0u);
}}
"
    )
}

/// The WGSL pasted into `EPILOGUE_DECL` of matvec.wgsl and matvec_windows.wgsl for `epilogue` on
/// a product of N = `n` rows: the RoPE epilogue's ([`ROPE_DECL`] with `StepParams` and
/// `rope_write`), the norm epilogue's ([`norm_decl`]), or nothing.
fn epilogue_decl(epilogue: &MatvecEpilogue, n: usize) -> String {
    match epilogue {
        MatvecEpilogue::Rope(_) => {
            format!("{}\n{ROPE_DECL}\n{}", crate::kernels::step::STEP_PARAMS_WGSL, crate::kernels::rope::ROPE_WRITE)
        }
        MatvecEpilogue::Norm(_) => norm_decl(n.is_multiple_of(4)),
        _ => String::new(),
    }
}

/// The WGSL of the RoPE epilogue ([`MatvecEpilogue::Rope`]) pasted into `EPILOGUE_DECL` after
/// `step_params.wgsl` and before `rope_write.wgsl` (which declares `RopeParams`): its bindings 5 to 11 (step uniform, RoPE uniform `rp`, cos and sin tables, q_out, k and v caches),
/// `pair_row(o)`, the row of W of pair o's first value, and `rope_pair(o, x1, x2)`.
const ROPE_DECL: &str = "@group(0) @binding(5) var<uniform> step: StepParams;
@group(0) @binding(6) var<uniform> rp: RopeParams;
@group(0) @binding(7) var<storage, read> cos_t: array<f32>;          // [max_pos, head_dim/2]
@group(0) @binding(8) var<storage, read> sin_t: array<f32>;          // [max_pos, head_dim/2]
@group(0) @binding(9) var<storage, read_write> q_out: array<f32>;    // [1, n_heads * head_dim]
@group(0) @binding(10) var<storage, read_write> k_cache: array<f32>; // [max_pos, n_kv_heads * head_dim]
@group(0) @binding(11) var<storage, read_write> v_cache: array<f32>; // [max_pos, n_kv_heads * head_dim]

fn pair_row(o: u32) -> u32 {
    let slot = o / rp.half_dim;
    return slot * rp.head_dim + (o - slot * rp.half_dim);
}

// Pair o's values x1, x2 (product with bias) rotated and written, at the step's first position
// (none past the caches, or when the step has no token).
fn rope_pair(o: u32, x1: f32, x2: f32) {
    if (step.n_tokens == 0u || step.pos0 >= rp.max_pos) {
        return;
    }
    let slot = o / rp.half_dim;
    rope_write(rp, 0u, step.pos0, slot, o - slot * rp.half_dim, x1, x2);
}
";

/// Prepares the decode GEMV `op` (one row: `y[y_col0 + n] (+)= scale · dot(W[n, :], x) (+ bias[n])`)
/// as `variant`: one dispatch per chunk of W, named `label` (`label[row0]` when W is split).
/// The backward form [`LinearForm::XW`] (one row of `dX = dY · W`) has one kernel whatever
/// `variant`: [`crate::kernels::matmul_xw`].
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when `op.rows` is not 1 or [`LinearOp::check`]
/// rejects the op; a pipeline build error as [`GpuError::Device`].
pub fn matvec(ctx: &GpuContext, label: &str, op: &LinearOp, variant: MatvecVariant) -> Result<Vec<Dispatch>, GpuError> {
    matvec_with(ctx, label, op, variant, MatvecEpilogue::Store)
}

/// [`matvec`] storing `epilogue` of the product (see [`MatvecEpilogue`]).
///
/// # Errors
/// As [`matvec`], and [`GpuError::InvalidArgument`] naming `label` when an epilogue other than
/// `Store` gets another variant than `Rows`, the [`LinearForm::XW`] form, an odd N, a W split into
/// chunks, a scale, accumulation or a `y_col0`, or a bias but for RoPE; when the RoPE epilogue's
/// op is not one row 0 of this GEMV's y with N its qkv width, the adapter has fewer than
/// [`ROPE_EPILOGUE_STORAGE_BUFFERS`] storage buffers per stage, or the op fails
/// [`rope_qkv_write`](crate::kernels::rope::rope_qkv_write)'s checks.
pub fn matvec_with(
    ctx: &GpuContext,
    label: &str,
    op: &LinearOp,
    variant: MatvecVariant,
    epilogue: MatvecEpilogue,
) -> Result<Vec<Dispatch>, GpuError> {
    let kind = op.check(ctx, label)?;
    if op.rows != 1 {
        return Err(invalid(label, format!("matvec multiplies one row of x, got {} (use matmul)", op.rows)));
    }
    let paired = epilogue.paired();
    let (k, n) = op.k_n();
    let rows_like = matches!(variant, MatvecVariant::Rows | MatvecVariant::Windows);
    if !matches!(epilogue, MatvecEpilogue::Store) && (!rows_like || op.form == LinearForm::XW) {
        return Err(invalid(
            label,
            format!("only the rows and windows matvec of x · Wᵀ have the {} epilogue (got {})", epilogue.name(), variant.name()),
        ));
    }
    if let MatvecEpilogue::Norm(ne) = epilogue {
        if op.w.chunks.len() != 1 {
            return Err(invalid(label, format!("the norm epilogue needs W in one chunk (got {} chunks)", op.w.chunks.len())));
        }
        if op.scale.is_some() || op.y_col0 != 0 {
            return Err(invalid(label, "the norm epilogue takes no scale or y_col0"));
        }
        if !ctx.is_cpu() {
            return Err(invalid(label, format!("the norm epilogue needs a CPU adapter (adapter {} is not)", ctx.info.name)));
        }
        let f32_of = |t: &GpuTensor, what: &str| {
            if t.dtype != DType::F32 || t.numel() < n {
                return Err(invalid(label, format!("the norm epilogue's {what} must be f32 with at least N = {n} values")));
            }
            Ok(())
        };
        f32_of(ne.weight, "weight")?;
        f32_of(ne.out, "output")?;
        if std::ptr::eq(ne.out, op.y) {
            return Err(invalid(label, "the norm epilogue's output must not be the GEMV's y"));
        }
    }
    if paired {
        if !n.is_multiple_of(2) || op.w.chunks.len() != 1 {
            return Err(invalid(
                label,
                format!("the epilogue pairs rows of W in one chunk (got {n} rows in {} chunks)", op.w.chunks.len()),
            ));
        }
        let bias_ok = matches!(epilogue, MatvecEpilogue::Rope(_));
        if op.accumulate || op.scale.is_some() || op.y_col0 != 0 || (op.bias.is_some() && !bias_ok) {
            return Err(invalid(label, "the epilogue takes no scale, accumulation or y_col0 (nor a bias, but for RoPE)"));
        }
    }
    let rope = match epilogue {
        MatvecEpilogue::Rope(r) => {
            if r.rows != 1 || r.row0 != 0 || !std::ptr::eq(r.qkv, op.y) || n != r.shape.qkv_dim() {
                return Err(invalid(label, "the RoPE epilogue takes one row 0 of the GEMV's own y, its N the qkv width"));
            }
            if ctx.limits.max_storage_buffers_per_shader_stage < ROPE_EPILOGUE_STORAGE_BUFFERS {
                return Err(invalid(
                    label,
                    format!("the RoPE epilogue needs {ROPE_EPILOGUE_STORAGE_BUFFERS} storage buffers per shader stage"),
                ));
            }
            Some((r, r.checked(label)?.0))
        }
        _ => None,
    };
    if op.form == LinearForm::XW {
        return matmul_xw(ctx, label, op);
    }
    if op.w_rows.is_some() {
        return Err(invalid(label, "matvec multiplies by all of W (a block of its rows needs matmul)"));
    }
    // The windows where the op suits them; otherwise `Windows` runs as `Rows`.
    let windows = if variant == MatvecVariant::Windows { window_plan(ctx, op, kind, &epilogue) } else { None };
    let variant = if variant == MatvecVariant::Windows { MatvecVariant::Rows } else { variant };
    if variant == MatvecVariant::Subgroup && !ctx.has_subgroups() {
        return Err(invalid(label, format!("the subgroup matvec needs SUBGROUP, which adapter {} lacks", ctx.info.name)));
    }
    let aligned = k.is_multiple_of(4);
    let (entry, wg) = match variant {
        MatvecVariant::Rows | MatvecVariant::Windows => ("matvec_rows", ROWS_WG),
        MatvecVariant::Reduce => ("matvec_reduce", REDUCE_WG),
        MatvecVariant::Subgroup => ("matvec_subgroup", SUBGROUP_WG),
    };
    let x_uniform = |kind: WeightKind| uniform_x_bytes(ctx, op, variant, kind.activations_on(ctx), k);
    // The epilogues take two rows per output: half the outputs per invocation.
    let outputs = if paired { ROWS_PER_INVOCATION / 2 } else { ROWS_PER_INVOCATION };
    let pipeline = |kind: WeightKind| {
        let kind = rows_kind(variant, kind, k);
        let x_kind = kind.activations_on(ctx);
        let x_decl = x_uniform(kind).and_then(|_| x_kind.declare_uniform(1, "x", k)).unwrap_or_else(|| x_kind.declare(1, "x"));
        let shader = crate::kernels::snippet_variant("matvec", SOURCE, entry)
            .define("ROWS_BODY", rows_body(ROWS_PER_INVOCATION, kind.step(k), x_kind == WeightKind::F32Wide, false, &epilogue))
            .define("EPILOGUE_DECL", epilogue_decl(&epilogue, n))
            .define(
                "SUBGROUP_ENTRY",
                if variant == MatvecVariant::Subgroup {
                    subgroup_entry(ROWS_PER_INVOCATION, kind.step(k), x_kind == WeightKind::F32Wide)
                } else {
                    String::new()
                },
            )
            .define("X_DECL", x_decl)
            .weights("W_DECL", kind, 2, "w")
            .define("ALIGNED", aligned)
            .define("QUANT", matches!(kind, WeightKind::Quant(_)))
            .define("REDUCE_UNITS", if matches!(kind, WeightKind::Quant(_)) { REDUCE_UNITS } else { "" })
            .define("WG", wg)
            .define("R", outputs);
        ctx.pipeline(&shader)
    };
    let rope_uniform = rope.map(|(_, params)| uniform(ctx, label, &params));
    // The norm epilogue's uniform and its scratch buffer (a zeroed counter, then a sum of squares
    // per invocation that stores rows): one chunk of W, so one dispatch.
    let norm_bufs = match epilogue {
        MatvecEpilogue::Norm(ne) => {
            // Invocations that hand off a sum of squares: every one of the windows' workgroups,
            // or each rows invocation that stores rows.
            let n_inv = windows.map_or(n.div_ceil(ROWS_PER_INVOCATION as usize), |w| w.windows * WINDOW_LANES);
            let params = NormParams { n: n as u32, n_inv: n_inv as u32, eps: ne.eps, _pad: 0 };
            let scratch = GpuTensor::zeros(ctx, &format!("{label}.norm_scratch"), DType::F32, &[1 + n_inv])?;
            Some((ne, uniform(ctx, label, &params), scratch))
        }
        _ => None,
    };
    let extra: Vec<wgpu::BindingResource> = if let Some((ne, u, scratch)) = &norm_bufs {
        vec![
            u.as_entire_binding(),
            ne.weight.buffer.as_entire_binding(),
            ne.out.buffer.as_entire_binding(),
            scratch.buffer.as_entire_binding(),
        ]
    } else {
        match (rope, &rope_uniform) {
            (Some((r, _)), Some(u)) => vec![
                r.step.buffer.as_entire_binding(),
                u.as_entire_binding(),
                r.tables.cos.buffer.as_entire_binding(),
                r.tables.sin.buffer.as_entire_binding(),
                r.q_out.buffer.as_entire_binding(),
                r.k_cache.buffer.as_entire_binding(),
                r.v_cache.buffer.as_entire_binding(),
            ],
            _ => Vec::new(),
        }
    };
    let flags = op.flags();
    if let Some(plan) = windows {
        let params = MatvecParams {
            rows: plan.nout as u32,
            k: k as u32,
            y_col0: op.y_col0 as u32,
            flags,
            scale: op.scale.unwrap_or(1.0),
            ..Zeroable::zeroed()
        };
        let ds = windows_dispatches(ctx, label, op, &plan, &epilogue, &epilogue_decl(&epilogue, n), &extra, params)?;
        return Ok(if norm_bufs.is_some() { ds.into_iter().map(Dispatch::warmed_whole).collect() } else { ds });
    }
    op.chunk_dispatches_each(
        ctx,
        label,
        kind,
        &extra,
        |kind, ()| pipeline(kind),
        |part, kind| {
            let c = part.chunk;
            let outputs_here = if paired { c.rows / 2 } else { c.rows };
            let params = MatvecParams {
                rows: outputs_here as u32,
                k: k as u32,
                row0: c.row0 as u32,
                y_col0: op.y_col0 as u32,
                flags,
                scale: op.scale.unwrap_or(1.0),
                ..Zeroable::zeroed()
            };
            let groups = match variant {
                MatvecVariant::Rows | MatvecVariant::Windows => (outputs_here as u32).div_ceil(outputs * ROWS_WG),
                MatvecVariant::Reduce => c.rows as u32,
                MatvecVariant::Subgroup => (c.rows as u32).div_ceil(ROWS_PER_INVOCATION * SUBGROUP_GROUPS),
            };
            let y_bytes = if op.accumulate { 8 } else { 4 } * outputs_here as u64;
            let cost = Cost {
                flops: 2 * (c.rows * k) as u64,
                bytes: c.tensor.byte_len() as u64 + 4 * k as u64 + y_bytes + if op.bias.is_some() { 4 * c.rows as u64 } else { 0 },
            };
            let x = x_uniform(kind).map_or(XBinding::Storage, |size| XBinding::Uniform { offset: 0, size });
            vec![((), params, grid(groups), cost, x)]
        },
    )
    .map(|ds| if norm_bufs.is_some() { ds.into_iter().map(Dispatch::warmed_whole).collect() } else { ds })
}

/// How `variant` declares weights that the op reads as `kind` with rows of `k` elements: the
/// `rows` kernel reads [`WeightKind::F16Wide`] as [`WeightKind::F16Wide16`] (sixteen values per
/// load, the same buffer) where K % 16 == 0; everything else as `kind`.
pub fn rows_kind(variant: MatvecVariant, kind: WeightKind, k: usize) -> WeightKind {
    match kind {
        WeightKind::F16Wide if variant == MatvecVariant::Rows => WeightKind::F16Wide16.for_k(k),
        other => other,
    }
}

/// Bytes of x to bind as a uniform buffer for `variant` reading x as `x_kind`, or `None` for a
/// storage binding. Only [`MatvecVariant::Rows`] and [`MatvecVariant::Windows`] take x as a
/// uniform: every invocation reads the same element of x at the same time there, which lavapipe then loads as a branchless gather
/// (a scalar load per lane) instead of a per-lane loop with a bounds check and branch per
/// component (its storage loads), and which is the access a GPU's constant cache serves best. The lanes of the `Reduce` and
/// `Subgroup` variants read different elements, which a constant cache serialises. x must fit
/// the adapter's `max_uniform_buffer_binding_size` and its own buffer.
pub fn uniform_x_bytes(ctx: &GpuContext, op: &LinearOp, variant: MatvecVariant, x_kind: WeightKind, k: usize) -> Option<u64> {
    let bytes = x_kind.uniform_bytes(k)?;
    let fits = bytes <= ctx.limits.max_uniform_buffer_binding_size && bytes <= op.x.buffer.size();
    (matches!(variant, MatvecVariant::Rows | MatvecVariant::Windows) && fits).then_some(bytes)
}

/// The loop of `matvec_reduce` over the 32-value units of a row of quantised weights: invocation
/// `lid` takes units `lid, lid + WG, ..`, each a `w_dot32` against eight vec4 of x.
const REDUCE_UNITS: &str = "        let units = p.k / 32u;
        let base = row * units;
        for (var u = lid; u < units; u += WG) {
            let xb = u * 8u;
            acc.x += w_dot32(base + u, x_4(xb), x_4(xb + 1u), x_4(xb + 2u), x_4(xb + 3u),
                             x_4(xb + 4u), x_4(xb + 5u), x_4(xb + 6u), x_4(xb + 7u));
        }";

/// The WGSL statements of `matvec_rows` once `first` is known: `r` rows from `first`, each with
/// one accumulator in a named register (vec4, or f32 when `step` is 1 or 32), K walked `step`
/// elements at a time (32 through `w_dot32` of the quantised kinds, one unit of x loaded once for
/// all rows; 8 through the `_8` accessors of the wide kinds, 4 through `_4`, or 1), fused
/// multiply-adds, and stores guarded by `n < p.rows`. Rows past the end are clamped, so every
/// load stays in bounds. With `wide_x` (x declared `F32Wide`; only for step 32) a unit's x comes
/// in four eight-value loads instead of eight vec4 loads. With `lanes` (the subgroup variant) the
/// subgroup's lanes share the rows: lane `sg_lane` takes steps `sg_lane, sg_lane + sg_size, ..`,
/// each row's sum is `subgroupAdd`ed and lane 0 stores it. With a paired `epilogue` (not with
/// `lanes`) the invocation owns `r / 2` outputs from `first`, output j taking two rows of W in
/// accumulators j and `r/2 + j`: for `SwiGlu` gate row j and up row `p.rows + j`, storing
/// `silu(gate_j) · up_j`; for `Rope` the pair `pair_row(j)`, `pair_row(j) + half_dim`, storing both
/// and passing them to `rope_pair` (`ROPE_DECL`); with `Norm` (not paired) it stores its `r` rows
/// and passes the sum of their squares to `norm_hand_off` (`norm_decl`).
pub fn rows_body(r: u32, step: usize, wide_x: bool, lanes: bool, epilogue: &MatvecEpilogue) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let zero = if step == 1 || step == 32 { "0.0" } else { "vec4<f32>(0.0)" };
    let _ = writeln!(s, "    let steps = p.k / {step}u;");
    let half = r / 2;
    for j in 0..r {
        let row = match epilogue {
            MatvecEpilogue::SwiGlu if j >= half => format!("(min(first + {}u, p.rows - 1u) + p.rows)", j - half),
            MatvecEpilogue::Rope(_) if j >= half => format!("(pair_row(min(first + {}u, p.rows - 1u)) + rp.half_dim)", j - half),
            MatvecEpilogue::Rope(_) => format!("pair_row(min(first + {j}u, p.rows - 1u))"),
            _ => format!("min(first + {j}u, p.rows - 1u)"),
        };
        let _ = writeln!(s, "    let wb{j} = {row} * steps;");
        let _ = writeln!(s, "    var a{j} = {zero};");
    }
    if lanes {
        let _ = writeln!(s, "    for (var kk = sg_lane; kk < steps; kk += sg_size) {{");
    } else {
        let _ = writeln!(s, "    for (var kk = 0u; kk < steps; kk++) {{");
    }
    if step == 32 && wide_x {
        // Loads 0 and 1 hold values 0..15 (x0..x3), loads 2 and 3 values 16..31 (x4..x7).
        for l in 0..4 {
            let _ = writeln!(s, "        let xw{l} = x_8(kk * 4u + {l}u);");
        }
        for k in 0..8 {
            let _ = writeln!(s, "        let x{k} = xw{}[{}];", k / 2, k % 2);
        }
        for j in 0..r {
            let _ = writeln!(s, "        a{j} += w_dot32(wb{j} + kk, x0, x1, x2, x3, x4, x5, x6, x7);");
        }
    } else if step == 32 {
        for k in 0..8 {
            let _ = writeln!(s, "        let x{k} = x_4(kk * 8u + {k}u);");
        }
        for j in 0..r {
            let _ = writeln!(s, "        a{j} += w_dot32(wb{j} + kk, x0, x1, x2, x3, x4, x5, x6, x7);");
        }
    } else if step == 16 {
        // Sixteen values of w per load (`F16Wide16`), x in two eight-value loads.
        let _ = writeln!(s, "        let xa = x_8(kk * 2u);");
        let _ = writeln!(s, "        let xb = x_8(kk * 2u + 1u);");
        for j in 0..r {
            let _ = writeln!(s, "        let w{j} = w_16(wb{j} + kk);");
            let _ = writeln!(s, "        a{j} = fma(w{j}[3], xb[1], fma(w{j}[2], xb[0], fma(w{j}[1], xa[1], fma(w{j}[0], xa[0], a{j}))));");
        }
    } else {
        let _ = writeln!(s, "        let xv = x_{step}(kk);");
        for j in 0..r {
            let _ = writeln!(s, "        let w{j} = w_{step}(wb{j} + kk);");
            let e = if step == 8 { format!("fma(w{j}[1], xv[1], fma(w{j}[0], xv[0], a{j}))") } else { format!("fma(w{j}, xv, a{j})") };
            let _ = writeln!(s, "        a{j} = {e};");
        }
    }
    let _ = writeln!(s, "    }}");
    let sum = |j: u32| if step == 1 || step == 32 { format!("a{j}") } else { format!("(a{j}.x + a{j}.y) + (a{j}.z + a{j}.w)") };
    match epilogue {
        MatvecEpilogue::SwiGlu => {
            for j in 0..half {
                let _ = writeln!(s, "    let g{j} = {};", sum(j));
                let _ =
                    writeln!(s, "    if (first + {j}u < p.rows) {{ store(first + {j}u, g{j} * sigmoid(g{j}) * ({})); }}", sum(j + half));
            }
            return s;
        }
        MatvecEpilogue::Rope(_) => {
            for j in 0..half {
                let _ = writeln!(s, "    if (first + {j}u < p.rows) {{");
                let _ = writeln!(s, "        let ra{j} = pair_row(first + {j}u);");
                let _ = writeln!(s, "        let x1_{j} = store(ra{j}, {});", sum(j));
                let _ = writeln!(s, "        let x2_{j} = store(ra{j} + rp.half_dim, {});", sum(j + half));
                let _ = writeln!(s, "        rope_pair(first + {j}u, x1_{j}, x2_{j});");
                let _ = writeln!(s, "    }}");
            }
            return s;
        }
        MatvecEpilogue::Norm(_) => {
            let _ = writeln!(s, "    var ss = 0.0;");
            for j in 0..r {
                let _ = writeln!(
                    s,
                    "    if (first + {j}u < p.rows) {{ let v{j} = store(first + {j}u, {}); ss = fma(v{j}, v{j}, ss); }}",
                    sum(j)
                );
            }
            let _ = writeln!(s, "    norm_hand_off(first / {r}u, ss);");
            return s;
        }
        MatvecEpilogue::Store => {}
    }
    for j in 0..r {
        let sum = sum(j);
        if lanes {
            let _ = writeln!(s, "    let s{j} = subgroupAdd({sum});");
            let _ = writeln!(s, "    if (sg_lane == 0u && first + {j}u < p.rows) {{ store(first + {j}u, s{j}); }}");
        } else {
            let _ = writeln!(s, "    if (first + {j}u < p.rows) {{ store(first + {j}u, {sum}); }}");
        }
    }
    s
}

/// The WGSL entry point `matvec_subgroup` ([`MatvecVariant::Subgroup`]): workgroup w owns rows
/// `w · SUBGROUP_GROUPS · r ..` in [`SUBGROUP_GROUPS`] groups of `r`; subgroup s takes groups
/// s, s + num_subgroups, .., and in each its lanes walk K `step` elements at a time from their
/// lane index by the subgroup size ([`rows_body`] with `lanes`), then `subgroupAdd` the row sums
/// and lane 0 stores them. Every `subgroupAdd` sits in subgroup-uniform control flow.
pub fn subgroup_entry(r: u32, step: usize, wide_x: bool) -> String {
    let body: String = rows_body(r, step, wide_x, true, &MatvecEpilogue::Store).lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "@compute @workgroup_size({SUBGROUP_WG})
fn matvec_subgroup(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) sg_lane: u32, @builtin(subgroup_size) sg_size: u32,
                   @builtin(subgroup_id) sg_id: u32, @builtin(num_subgroups) n_sg: u32) {{
    let wg_row0 = (wg.x + wg.y * nwg.x) * {groups}u * {r}u;
    for (var g = sg_id; g < {groups}u; g += n_sg) {{
        let first = wg_row0 + g * {r}u;
        if (first >= p.rows) {{
            break;
        }}
{body}    }}
}}
",
        groups = SUBGROUP_GROUPS
    )
}

/// CPU reference: `dot(w[n, :], x) (+ bias[n])` for each of the `n` rows of `w` (`[n, k]`), in f64.
pub fn matvec_ref(x: &[f32], w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Vec<f32> {
    (0..n)
        .map(|r| {
            let d: f64 = w[r * k..(r + 1) * k].iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
            (d + bias.map_or(0.0, |b| b[r] as f64)) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, GpuMatrix, GpuOptions, GpuTensor, WeightKind, test_context};
    use crate::kernels::attention::AttnShape;
    use crate::kernels::rope::RopeTables;
    use crate::kernels::step::{StepBuffer, StepParams};
    use crate::kernels::testing::{assert_close, random_vec, round_f16, weight_kinds};

    /// Whether `variant` must read W (`k` columns of `dtype`, `outputs` outputs) through uniform
    /// windows on this adapter: `windows`, the model's K = 576, outputs a positive multiple of
    /// eight, and eight rows fitting one uniform binding at an offset the adapter allows (as on
    /// lavapipe).
    fn windowed(ctx: &GpuContext, variant: MatvecVariant, dtype: DType, k: usize, outputs: usize) -> bool {
        let row = (k * dtype.size()) as u64;
        let limits = &ctx.limits;
        variant == MatvecVariant::Windows
            && k == 576
            && outputs > 0
            && outputs.is_multiple_of(8)
            && matches!(dtype, DType::F32 | DType::F16)
            && row.is_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment))
            && limits.max_uniform_buffer_binding_size / row >= 8
    }

    /// Asserts that `ds` ran through windows where [`windowed`] says they must (`outputs`: W's rows,
    /// or half of them where an epilogue pairs rows).
    fn assert_windowed(ctx: &GpuContext, ds: &[Dispatch], variant: MatvecVariant, w: &GpuMatrix, outputs: usize, what: &str) {
        if w.format() == w.dtype.to_string() && w.chunks.len() == 1 && windowed(ctx, variant, w.dtype, w.cols, outputs) {
            assert!(ds.iter().all(|d| d.family() == "matvec_windows"), "{what}: read through uniform windows");
        }
    }

    /// The variants that take the epilogues on this adapter: `rows`, and `windows` where available.
    fn rows_variants(ctx: &GpuContext) -> Vec<MatvecVariant> {
        MatvecVariant::available(ctx).into_iter().filter(|v| matches!(v, MatvecVariant::Rows | MatvecVariant::Windows)).collect()
    }

    struct Case {
        n: usize,
        k: usize,
        bias: bool,
        accumulate: bool,
        y_col0: usize,
    }

    fn case(n: usize, k: usize) -> Case {
        Case { n, k, bias: false, accumulate: false, y_col0: 0 }
    }

    /// Runs one matvec and compares with the reference; y starts as `y0` (accumulate) or garbage.
    fn check(ctx: &GpuContext, c: &Case, kind: WeightKind, variant: MatvecVariant) {
        let Case { n, k, bias: with_bias, accumulate, y_col0 } = *c;
        let seed = (n * 31 + k) as u64;
        let x = random_vec(k, seed);
        let mut wv = random_vec(n * k, seed + 1);
        let b = random_vec(n, seed + 2);
        let y_len = y_col0 + n + 3;
        let y0 = random_vec(y_len, seed + 3);
        let gw = GpuMatrix::upload(ctx, "w", n, k, &wv, kind.dtype()).unwrap();
        if kind.dtype() == DType::F16 {
            wv = round_f16(&wv);
        }
        let gx = GpuTensor::from_f32(ctx, "x", &[k], &x).unwrap();
        let gb = GpuTensor::from_f32(ctx, "b", &[n], &b).unwrap();
        let gy = GpuTensor::from_f32(ctx, "y", &[y_len], &y0).unwrap();
        let op = LinearOp::new(&gx, 1, &gw, &gy).bias(with_bias.then_some(&gb)).y_col0(y_col0).accumulate(accumulate).kind(kind);
        let ds = matvec(ctx, "mv", &op, variant).unwrap();
        assert_windowed(ctx, &ds, variant, &gw, n, &format!("matvec {} n={n} k={k}", kind.name()));
        let refs: Vec<&Dispatch> = ds.iter().collect();
        ctx.run("test", &refs).unwrap();
        let got = gy.read_f32(ctx).unwrap();
        let mut want = y0.clone();
        let r = matvec_ref(&x, &wv, n, k, with_bias.then_some(&b[..]));
        for i in 0..n {
            want[y_col0 + i] = if accumulate { want[y_col0 + i] + r[i] } else { r[i] };
        }
        // f32 accumulation over K terms of size <= 1: error grows ~ sqrt(K) * eps.
        let atol = 1e-5 * (k as f32).sqrt() * 4.0;
        assert_close(&got, &want, atol, 1e-5, &format!("matvec {variant:?} {} n={n} k={k} bias={with_bias} acc={accumulate}", kind.name()));
    }

    #[test]
    fn matvec_matches_reference_all_variants_and_kinds() {
        let ctx = test_context();
        for variant in MatvecVariant::available(&ctx) {
            for kind in weight_kinds(&ctx) {
                for (n, k) in [(1, 1), (7, 7), (257, 257), (13, 1757), (1757, 12), (5, 8), (3, 56), (2, 16), (300, 576), (296, 576)] {
                    check(&ctx, &case(n, k), kind, variant);
                }
            }
        }
    }

    /// The `rows` kernel reads f16 weights sixteen values per load where K % 16 == 0 (the
    /// cases above with K = 16, 64 and 576 run it), eight where K % 8 == 0 only (K = 56).
    #[test]
    fn rows_reads_f16_sixteen_values_per_load_where_k_allows() {
        assert_eq!(rows_kind(MatvecVariant::Rows, WeightKind::F16Wide, 576), WeightKind::F16Wide16);
        assert_eq!(rows_kind(MatvecVariant::Rows, WeightKind::F16Wide, 56), WeightKind::F16Wide);
        assert_eq!(rows_kind(MatvecVariant::Rows, WeightKind::F16Wide, 12), WeightKind::F16Packed);
        assert_eq!(rows_kind(MatvecVariant::Subgroup, WeightKind::F16Wide, 576), WeightKind::F16Wide);
        assert_eq!(rows_kind(MatvecVariant::Rows, WeightKind::F32Wide, 576), WeightKind::F32Wide);
        assert_eq!(WeightKind::F16Wide16.step(576), 16);
    }

    #[test]
    fn matvec_bias_accumulate_and_offset() {
        let ctx = test_context();
        for variant in MatvecVariant::available(&ctx) {
            for kind in weight_kinds(&ctx) {
                check(&ctx, &Case { n: 37, k: 64, bias: true, accumulate: false, y_col0: 5 }, kind, variant);
                check(&ctx, &Case { n: 37, k: 63, bias: true, accumulate: true, y_col0: 2 }, kind, variant);
                check(&ctx, &Case { n: 9, k: 20, bias: false, accumulate: true, y_col0: 0 }, kind, variant);
            }
        }
    }

    #[test]
    fn matvec_large() {
        let ctx = test_context();
        for variant in MatvecVariant::available(&ctx) {
            check(&ctx, &case(3072, 576), WeightKind::F32, variant);
            check(
                &ctx,
                &Case { n: 576, k: 1536, bias: true, accumulate: true, y_col0: 0 },
                WeightKind::for_dtype(&ctx, DType::F16),
                variant,
            );
        }
    }

    /// `Rows` binds x as a uniform where it fits and the other variants bind it as storage; an x
    /// beyond its buffer or the adapter's uniform limit falls back to storage, with the same
    /// result. (Binding fewer bytes than the uniform declaration makes wgpu reject every `Rows`
    /// dispatch of the other tests, so they do run the uniform path.)
    #[test]
    fn rows_reads_x_as_a_uniform_where_it_fits() {
        let mut ctx = GpuContext::new(&GpuOptions::default()).unwrap();
        let (n, k) = (40, 576);
        let gw = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 4), DType::F32).unwrap();
        let gx = GpuTensor::from_f32(&ctx, "x", &[k], &random_vec(k, 5)).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
        let op = LinearOp::new(&gx, 1, &gw, &gy);
        let x_kinds = if ctx.has_int64() { vec![WeightKind::F32, WeightKind::F32Wide] } else { vec![WeightKind::F32] };
        for &x_kind in &x_kinds {
            assert_eq!(uniform_x_bytes(&ctx, &op, MatvecVariant::Rows, x_kind, k), Some(4 * k as u64));
            assert_eq!(uniform_x_bytes(&ctx, &op, MatvecVariant::Reduce, x_kind, k), None);
            assert_eq!(uniform_x_bytes(&ctx, &op, MatvecVariant::Subgroup, x_kind, k), None);
            assert_eq!(uniform_x_bytes(&ctx, &op, MatvecVariant::Rows, x_kind, k + 8), None, "x's buffer holds {k} values");
        }
        assert_eq!(WeightKind::F32.uniform_bytes(6), Some(32));
        assert_eq!(WeightKind::F32Wide.uniform_bytes(12), None);
        assert_eq!(WeightKind::F16Wide.uniform_bytes(k), None);
        std::sync::Arc::get_mut(&mut ctx).expect("a fresh context").limits.max_uniform_buffer_binding_size = 1024;
        for &x_kind in &x_kinds {
            assert_eq!(uniform_x_bytes(&ctx, &op, MatvecVariant::Rows, x_kind, k), None);
        }
        check(&ctx, &case(n, k), WeightKind::F32, MatvecVariant::Rows);
        check(&ctx, &case(n, 200), WeightKind::F32, MatvecVariant::Rows);
    }

    #[test]
    fn matvec_over_split_weights() {
        // A binding of 4 KiB forces the matrix into several chunks.
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        for variant in MatvecVariant::available(&ctx) {
            for kind in [WeightKind::F32, WeightKind::F16Packed] {
                let (n, k) = (301, 36);
                let gw = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 9), kind.dtype()).unwrap();
                assert!(gw.chunks.len() > 1);
                check(&ctx, &Case { n, k, bias: true, accumulate: false, y_col0: 3 }, kind, variant);
                check(&ctx, &Case { n: 97, k: 257, bias: true, accumulate: true, y_col0: 1 }, kind, variant);
            }
        }
    }

    #[test]
    fn matvec_rejects_bad_shapes() {
        let ctx = test_context();
        let gw = GpuMatrix::upload(&ctx, "w", 8, 16, &random_vec(128, 1), DType::F32).unwrap();
        let gx = GpuTensor::from_f32(&ctx, "x", &[15], &random_vec(15, 2)).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[8]).unwrap();
        assert!(matvec(&ctx, "mv", &LinearOp::new(&gx, 1, &gw, &gy), MatvecVariant::Rows).is_err());
        let gx = GpuTensor::from_f32(&ctx, "x", &[16], &random_vec(16, 2)).unwrap();
        assert!(matvec(&ctx, "mv", &LinearOp::new(&gx, 1, &gw, &gy).y_col0(1), MatvecVariant::Rows).is_err());
        let gb = GpuTensor::from_f32(&ctx, "b", &[7], &random_vec(7, 3)).unwrap();
        assert!(matvec(&ctx, "mv", &LinearOp::new(&gx, 1, &gw, &gy).bias(Some(&gb)), MatvecVariant::Rows).is_err());
        matvec(&ctx, "mv", &LinearOp::new(&gx, 1, &gw, &gy), MatvecVariant::Rows).unwrap();
        assert!(matvec(&ctx, "mv", &LinearOp::new(&gx, 1, &gw, &gy).kind(WeightKind::F16Packed), MatvecVariant::Rows).is_err());
        // A block of W's rows is matmul's (the forward form here reads all of W).
        assert!(matvec(&ctx, "mv", &LinearOp::new(&gx, 1, &gw, &gy).w_rows(2, 3), MatvecVariant::Rows).is_err());
    }

    /// One GEMV with the SwiGLU epilogue of a random `[n, k]` W read as `kind` (`None`: the
    /// adapter's way for W's blocks) against `matvec_ref` then `swiglu_ref`; y past the `n / 2`
    /// outputs keeps its values.
    fn check_swiglu(ctx: &GpuContext, w: &GpuMatrix, wv: &[f32], kind: Option<WeightKind>, variant: MatvecVariant, what: &str) {
        let (n, k) = (w.rows, w.cols);
        let seed = (n * 7 + k) as u64;
        let x: Vec<f32> = random_vec(k, seed).iter().map(|v| 3.0 * v).collect();
        let gx = GpuTensor::from_f32(ctx, "x", &[k], &x).unwrap();
        let y0 = random_vec(n, seed + 3);
        let gy = GpuTensor::from_f32(ctx, "y", &[n], &y0).unwrap();
        let mut op = LinearOp::new(&gx, 1, w, &gy);
        if let Some(kind) = kind {
            op = op.kind(kind);
        }
        let ds = matvec_with(ctx, "mv", &op, variant, MatvecEpilogue::SwiGlu).unwrap();
        assert_windowed(ctx, &ds, variant, w, n / 2, what);
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let got = gy.read_f32(ctx).unwrap();
        let product = matvec_ref(&x, wv, n, k, None);
        let mut want = y0.clone();
        want[..n / 2].copy_from_slice(&crate::kernels::swiglu::swiglu_ref(&product, 1, n / 2));
        let scale = wv.iter().fold(0f32, |a, v| a.max(v.abs())) * x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let atol = 2e-5 * (k as f32).sqrt() * scale * 4.0;
        assert_close(&got, &want, atol, 1e-4, &format!("{what} {} n={n} k={k}", variant.name()));
    }

    /// The SwiGLU epilogue ([`MatvecEpilogue::SwiGlu`]) matches matvec then swiglu, for every
    /// dense kind and every block type that stays quantised, K aligned to 4 or not, outputs not
    /// a multiple of an invocation's or a workgroup's.
    #[test]
    fn swiglu_epilogue_matches_matvec_then_swiglu() {
        let ctx = test_context();
        for kind in weight_kinds(&ctx) {
            for (n, k) in [(2, 8), (14, 576), (262, 64), (6, 37), (208, 576), (3072, 576)] {
                let mut wv = random_vec(n * k, (n + k) as u64);
                let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, kind.dtype()).unwrap();
                if kind.dtype() == DType::F16 {
                    wv = round_f16(&wv);
                }
                for variant in rows_variants(&ctx) {
                    check_swiglu(&ctx, &w, &wv, Some(kind), variant, &format!("swiglu matvec {}", kind.name()));
                }
            }
        }
        for q in crate::model::QuantType::ALL {
            let (n, k) = (10, if q.block_elems() == 256 { 512 } else { 96 });
            let blocks = crate::kernels::testing::random_blocks(q, n, k, 3);
            let wv = blocks.dequantize().unwrap();
            let w = GpuMatrix::upload_parts(&ctx, "w", k, &[crate::gpu::MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
            if w.format() == q.name() {
                for variant in rows_variants(&ctx) {
                    check_swiglu(&ctx, &w, &wv, None, variant, &format!("swiglu matvec {q}"));
                }
            }
        }
    }

    /// The norm epilogue ([`MatvecEpilogue::Norm`]) of `x · Wᵀ` accumulated into y (with a bias
    /// where `bias`) against matvec then `rmsnorm_ref`, for `runs` dispatches in one submission
    /// (the counter must be back at 0 after each).
    #[allow(clippy::too_many_arguments)]
    fn check_norm(
        ctx: &GpuContext,
        w: &GpuMatrix,
        wv: &[f32],
        kind: Option<WeightKind>,
        variant: MatvecVariant,
        bias: bool,
        runs: usize,
        what: &str,
    ) {
        let what = format!("{what} {}", variant.name());
        let (n, k) = (w.rows, w.cols);
        let seed = (n * 5 + k) as u64;
        let x = random_vec(k, seed);
        let gx = GpuTensor::from_f32(ctx, "x", &[k], &x).unwrap();
        let y0 = random_vec(n, seed + 1);
        let gy = GpuTensor::from_f32(ctx, "y", &[n], &y0).unwrap();
        let gamma: Vec<f32> = random_vec(n, seed + 2).iter().map(|v| 1.0 + v).collect();
        let gw = GpuTensor::from_f32(ctx, "gamma", &[n], &gamma).unwrap();
        let out = GpuTensor::zeros(ctx, "out", DType::F32, &[n]).unwrap();
        let b = random_vec(n, seed + 3);
        let gb = GpuTensor::from_f32(ctx, "bias", &[n], &b).unwrap();
        let mut op = LinearOp::new(&gx, 1, w, &gy).accumulate(true);
        if bias {
            op = op.bias(Some(&gb));
        }
        if let Some(kind) = kind {
            op = op.kind(kind);
        }
        let ne = NormEpilogue { weight: &gw, out: &out, eps: 1e-5 };
        let ds = matvec_with(ctx, "mv", &op, variant, MatvecEpilogue::Norm(&ne)).unwrap();
        assert_windowed(ctx, &ds, variant, w, n, &what);
        let list: Vec<&Dispatch> = std::iter::repeat_n(ds.iter(), runs).flatten().collect();
        ctx.run("test", &list).unwrap();
        let product = matvec_ref(&x, wv, n, k, bias.then_some(&b[..]));
        let mut want_y = y0.clone();
        for _ in 0..runs {
            for (y, p) in want_y.iter_mut().zip(&product) {
                *y += p;
            }
        }
        let atol = 2e-5 * (k as f32).sqrt() * runs as f32 * 4.0;
        assert_close(&gy.read_f32(ctx).unwrap(), &want_y, atol, 1e-4, &format!("{what} y n={n} k={k}"));
        let want = crate::kernels::rmsnorm::rmsnorm_ref(&want_y, &gamma, 1e-5);
        assert_close(&out.read_f32(ctx).unwrap(), &want, 1e-4, 1e-3, &format!("{what} norm n={n} k={k}"));
    }

    /// The norm epilogue matches matvec then RMSNorm on a CPU adapter, for every dense kind and
    /// a block type that stays quantised, N not a multiple of an invocation's or a workgroup's
    /// rows, with and without a bias, and again and again in one submission.
    #[test]
    fn norm_epilogue_matches_matvec_then_rmsnorm() {
        let ctx = test_context();
        if !ctx.is_cpu() {
            return;
        }
        for kind in weight_kinds(&ctx) {
            for (i, (n, k)) in [(1, 8), (7, 576), (576, 576), (300, 1536), (1030, 64)].into_iter().enumerate() {
                let mut wv = random_vec(n * k, (n + k) as u64);
                let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, kind.dtype()).unwrap();
                if kind.dtype() == DType::F16 {
                    wv = round_f16(&wv);
                }
                for variant in rows_variants(&ctx) {
                    check_norm(&ctx, &w, &wv, Some(kind), variant, i % 2 == 1, 1 + i % 3, &format!("norm matvec {}", kind.name()));
                }
            }
        }
        let (n, k) = (100, 96);
        let blocks = crate::kernels::testing::random_blocks(crate::model::QuantType::Q4_1, n, k, 5);
        let wv = blocks.dequantize().unwrap();
        let w = GpuMatrix::upload_parts(&ctx, "w", k, &[crate::gpu::MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
        for variant in rows_variants(&ctx) {
            check_norm(&ctx, &w, &wv, None, variant, false, 2, "norm matvec q4_1");
        }
    }

    /// A warm-up before the first run (the decode program's, one workgroup of every other
    /// kernel) leaves the norm epilogue's counter at 0: its dispatch warms over the whole grid.
    #[test]
    fn norm_epilogue_survives_the_warm_up() {
        // A context of its own, so that the pipeline is cold here whatever other tests ran.
        let ctx = GpuContext::new(&GpuOptions::default()).unwrap();
        if !ctx.is_cpu() {
            return;
        }
        let (n, k) = (576, 64);
        let wv = random_vec(n * k, 9);
        let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, DType::F32).unwrap();
        let x = random_vec(k, 10);
        let gx = GpuTensor::from_f32(&ctx, "x", &[k], &x).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
        let gamma = GpuTensor::from_f32(&ctx, "gamma", &[n], &vec![1.0; n]).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[n]).unwrap();
        let ne = NormEpilogue { weight: &gamma, out: &out, eps: 1e-5 };
        let ds = matvec_with(&ctx, "mv", &LinearOp::new(&gx, 1, &w, &gy), MatvecVariant::Rows, MatvecEpilogue::Norm(&ne)).unwrap();
        assert!(ds.iter().all(Dispatch::is_cold));
        assert_eq!(ctx.warm_up(&ds).unwrap(), 1);
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let want = crate::kernels::rmsnorm::rmsnorm_ref(&matvec_ref(&x, &wv, n, k, None), &vec![1.0; n], 1e-5);
        assert_close(&out.read_f32(&ctx).unwrap(), &want, 1e-4, 1e-3, "norm after a warm-up");
    }

    #[test]
    fn norm_epilogue_refuses_what_it_cannot_compute() {
        let ctx = test_context();
        let (n, k) = (8, 16);
        let w = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 1), DType::F32).unwrap();
        let x = GpuTensor::from_f32(&ctx, "x", &[k], &random_vec(k, 2)).unwrap();
        let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
        let gamma = GpuTensor::from_f32(&ctx, "gamma", &[n], &random_vec(n, 3)).unwrap();
        let short = GpuTensor::zeros(&ctx, "short", DType::F32, &[n - 1]).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[n]).unwrap();
        let ne = NormEpilogue { weight: &gamma, out: &out, eps: 1e-5 };
        let op = LinearOp::new(&x, 1, &w, &y);
        let err = |op: &LinearOp, variant, ne: &NormEpilogue| {
            matvec_with(&ctx, "mv", op, variant, MatvecEpilogue::Norm(ne)).err().map(|e| e.to_string())
        };
        if !ctx.is_cpu() {
            assert!(err(&op, MatvecVariant::Rows, &ne).unwrap().contains("CPU adapter"));
            return;
        }
        assert!(err(&op, MatvecVariant::Rows, &ne).is_none());
        assert!(err(&op, MatvecVariant::Reduce, &ne).unwrap().contains("rows and windows matvec"));
        assert!(err(&op.scale(2.0), MatvecVariant::Rows, &ne).unwrap().contains("no scale"));
        let bad_weight = NormEpilogue { weight: &short, ..ne };
        assert!(err(&op, MatvecVariant::Rows, &bad_weight).unwrap().contains("weight"));
        let bad_out = NormEpilogue { out: &short, ..ne };
        assert!(err(&op, MatvecVariant::Rows, &bad_out).unwrap().contains("output"));
        let onto_y = NormEpilogue { out: &y, ..ne };
        assert!(err(&op, MatvecVariant::Rows, &onto_y).unwrap().contains("must not be the GEMV's y"));
    }

    #[test]
    fn swiglu_epilogue_refuses_what_it_cannot_compute() {
        let ctx = test_context();
        let w = GpuMatrix::upload(&ctx, "w", 8, 16, &random_vec(128, 1), DType::F32).unwrap();
        let w_odd = GpuMatrix::upload(&ctx, "w", 7, 16, &random_vec(112, 1), DType::F32).unwrap();
        let gx = GpuTensor::from_f32(&ctx, "x", &[16], &random_vec(16, 2)).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[9]).unwrap();
        let op = LinearOp::new(&gx, 1, &w, &gy);
        let err = |op: &LinearOp, v| matvec_with(&ctx, "mlp.gate_up", op, v, MatvecEpilogue::SwiGlu).unwrap_err().to_string();
        assert!(err(&op, MatvecVariant::Reduce).contains("only the rows and windows matvec"));
        assert!(err(&op, MatvecVariant::Reduce).contains("mlp.gate_up"));
        assert!(err(&LinearOp::new(&gx, 1, &w_odd, &gy), MatvecVariant::Rows).contains("pairs rows of W"));
        assert!(err(&op.accumulate(true), MatvecVariant::Rows).contains("no scale"));
        assert!(err(&op.y_col0(1), MatvecVariant::Rows).contains("no scale"));
        assert!(err(&op.scale(2.0), MatvecVariant::Rows).contains("no scale"));
        let gb = GpuTensor::zeros(&ctx, "b", DType::F32, &[8]).unwrap();
        assert!(err(&op.bias(Some(&gb)), MatvecVariant::Rows).contains("nor a bias"));
        matvec_with(&ctx, "mv", &op, MatvecVariant::Rows, MatvecEpilogue::SwiGlu).unwrap();
    }

    /// A W over the binding limit is split into chunks, which the SwiGLU epilogue refuses.
    #[test]
    fn swiglu_epilogue_refuses_split_weights() {
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        let (n, k) = (300, 36);
        let w = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 9), DType::F32).unwrap();
        assert!(w.chunks.len() > 1);
        let gx = GpuTensor::from_f32(&ctx, "x", &[k], &random_vec(k, 2)).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
        let err = matvec_with(&ctx, "mv", &LinearOp::new(&gx, 1, &w, &gy), MatvecVariant::Rows, MatvecEpilogue::SwiGlu).unwrap_err();
        assert!(err.to_string().contains("in one chunk"), "{err}");
    }

    /// The RoPE epilogue against the unfused path (matvec, then `rope_qkv_write`, each tested
    /// against its CPU reference): y, q_out and both caches agree, for `shape` with x of `k`
    /// values, W read as `kind`, at position `pos0` of caches of `max_pos` rows (at or past
    /// `max_pos`: nothing is written but y).
    #[allow(clippy::too_many_arguments)]
    fn check_rope(
        ctx: &GpuContext,
        shape: AttnShape,
        k: usize,
        w: &GpuMatrix,
        kind: Option<WeightKind>,
        variant: MatvecVariant,
        bias: bool,
        pos0: usize,
        max_pos: usize,
    ) {
        let (qd, kvd, n) = (shape.q_dim(), shape.kv_dim(), shape.qkv_dim());
        let seed = (n * 3 + k + pos0) as u64;
        let gx = GpuTensor::from_f32(ctx, "x", &[k], &random_vec(k, seed)).unwrap();
        let gb = GpuTensor::from_f32(ctx, "b", &[n], &random_vec(n, seed + 1)).unwrap();
        let tables = RopeTables::new(ctx, shape.head_dim, 10000.0, None, max_pos).unwrap();
        let step = StepBuffer::new(ctx);
        step.write(ctx, &StepParams::new(pos0, 1));
        let k_old = random_vec(max_pos * kvd, seed + 2);
        let v_old = random_vec(max_pos * kvd, seed + 3);
        let q_old = random_vec(qd, seed + 4);
        let mut outs = Vec::new();
        for fused in [false, true] {
            let y = GpuTensor::from_f32(ctx, "y", &[n], &random_vec(n, seed + 5)).unwrap();
            let q = GpuTensor::from_f32(ctx, "q", &[qd], &q_old).unwrap();
            let kc = GpuTensor::from_f32(ctx, "k", &[max_pos, kvd], &k_old).unwrap();
            let vc = GpuTensor::from_f32(ctx, "v", &[max_pos, kvd], &v_old).unwrap();
            let mut op = LinearOp::new(&gx, 1, w, &y).bias(bias.then_some(&gb));
            if let Some(kind) = kind {
                op = op.kind(kind);
            }
            let rope = RopeQkvOp { qkv: &y, rows: 1, row0: 0, shape, tables: &tables, step: &step, q_out: &q, k_cache: &kc, v_cache: &vc };
            let ds = if fused {
                let ds = matvec_with(ctx, "mv", &op, variant, MatvecEpilogue::Rope(&rope)).unwrap();
                assert_windowed(ctx, &ds, variant, w, n / 2, "rope");
                ds
            } else {
                let mut ds = matvec(ctx, "mv", &op, MatvecVariant::Rows).unwrap();
                ds.push(crate::kernels::rope::rope_qkv_write(ctx, "rope", &rope).unwrap());
                ds
            };
            ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
            outs.push([&y, &q, &kc, &vc].map(|t| t.read_f32(ctx).unwrap()));
        }
        let what = format!("rope matvec {} {kind:?} {shape:?} k={k} bias={bias} pos0={pos0} max_pos={max_pos}", variant.name());
        for (i, name) in ["y", "q_out", "k_cache", "v_cache"].iter().enumerate() {
            assert_close(&outs[1][i], &outs[0][i], 1e-5, 1e-5, &format!("{what}: {name}"));
        }
        if pos0 >= max_pos {
            assert_eq!(outs[1][1], q_old, "{what}: q_out past the tables");
            assert_eq!(outs[1][2], k_old, "{what}: k_cache past its rows");
        } else {
            assert_ne!(outs[1][2], k_old, "{what}: the key was written");
        }
    }

    /// The RoPE epilogue ([`MatvecEpilogue::Rope`]) writes what matvec then `rope_qkv_write`
    /// write: every dense kind and a block type, GQA and plain heads, an odd K, half a head of 1
    /// (pairs of one invocation in two heads), with and without bias, and a position past the
    /// caches.
    #[test]
    fn rope_epilogue_matches_matvec_then_rope() {
        let ctx = test_context();
        let shapes = [
            (AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 }, 576),
            (AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 6 }, 37),
            (AttnShape { n_heads: 2, n_kv_heads: 2, head_dim: 2 }, 8),
        ];
        for variant in rows_variants(&ctx) {
            for kind in weight_kinds(&ctx) {
                for (shape, k) in shapes {
                    let n = shape.qkv_dim();
                    let w = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, (n + k) as u64), kind.dtype()).unwrap();
                    check_rope(&ctx, shape, k, &w, Some(kind), variant, true, 5, 9);
                }
            }
            let (shape, k) = shapes[0];
            let n = shape.qkv_dim();
            let w = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 1), DType::F32).unwrap();
            check_rope(&ctx, shape, k, &w, None, variant, false, 0, 4);
            check_rope(&ctx, shape, k, &w, None, variant, true, 4, 4);
            let blocks = crate::kernels::testing::random_blocks(crate::model::QuantType::Q4_1, n, k, 3);
            let w = GpuMatrix::upload_parts(&ctx, "w", k, &[crate::gpu::MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
            assert_eq!(w.format(), crate::model::QuantType::Q4_1.name());
            check_rope(&ctx, shape, k, &w, None, variant, true, 3, 8);
        }
    }

    #[test]
    fn rope_epilogue_refuses_an_op_it_cannot_fuse() {
        let ctx = test_context();
        let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 4 };
        let (n, k) = (shape.qkv_dim(), 8);
        let w = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 1), DType::F32).unwrap();
        let gx = GpuTensor::from_f32(&ctx, "x", &[k], &random_vec(k, 2)).unwrap();
        let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
        let other = GpuTensor::zeros(&ctx, "other", DType::F32, &[n]).unwrap();
        let q = GpuTensor::zeros(&ctx, "q", DType::F32, &[shape.q_dim()]).unwrap();
        let cache = GpuTensor::zeros(&ctx, "c", DType::F32, &[4, shape.kv_dim()]).unwrap();
        let short = GpuTensor::zeros(&ctx, "c", DType::F32, &[3]).unwrap();
        let tables = RopeTables::new(&ctx, 4, 10000.0, None, 4).unwrap();
        let step = StepBuffer::new(&ctx);
        let rope =
            RopeQkvOp { qkv: &y, rows: 1, row0: 0, shape, tables: &tables, step: &step, q_out: &q, k_cache: &cache, v_cache: &cache };
        let op = LinearOp::new(&gx, 1, &w, &y);
        let err = |op: &LinearOp, r: &RopeQkvOp| {
            matvec_with(&ctx, "attn.qkv", op, MatvecVariant::Rows, MatvecEpilogue::Rope(r)).unwrap_err().to_string()
        };
        assert!(err(&op, &RopeQkvOp { qkv: &other, ..rope }).contains("own y"));
        assert!(err(&op, &RopeQkvOp { row0: 1, ..rope }).contains("own y"));
        assert!(err(&op, &RopeQkvOp { shape: AttnShape { n_heads: 3, ..shape }, ..rope }).contains("qkv width"));
        assert!(err(&op, &RopeQkvOp { k_cache: &short, ..rope }).contains("k_cache"));
        assert!(err(&op.accumulate(true), &rope).contains("no scale"));
        let e = matvec_with(&ctx, "attn.qkv", &op, MatvecVariant::Reduce, MatvecEpilogue::Rope(&rope)).unwrap_err().to_string();
        assert!(e.contains("attn.qkv") && e.contains("rope epilogue"), "{e}");
        matvec_with(&ctx, "attn.qkv", &op, MatvecVariant::Rows, MatvecEpilogue::Rope(&rope)).unwrap();
    }

    /// The scale flag (LoRA's `y += s · a · B^T`): every variant, with an offset and accumulation,
    /// K = 8 (a LoRA rank) and K = 576 (the down-projection of x onto A).
    #[test]
    fn matvec_scaled_accumulates_scaled_product() {
        let ctx = test_context();
        for variant in MatvecVariant::available(&ctx) {
            for (n, k, y_col0, scale) in [(37usize, 8usize, 5usize, -1.75f32), (8, 576, 0, 2.0), (19, 6, 3, 0.0)] {
                let x = random_vec(k, 11);
                let wv = random_vec(n * k, 12);
                let y0 = random_vec(y_col0 + n + 2, 13);
                let gw = GpuMatrix::upload(&ctx, "w", n, k, &wv, DType::F32).unwrap();
                let gx = GpuTensor::from_f32(&ctx, "x", &[k], &x).unwrap();
                let gy = GpuTensor::from_f32(&ctx, "y", &[y0.len()], &y0).unwrap();
                let op = LinearOp::new(&gx, 1, &gw, &gy).y_col0(y_col0).accumulate(true).scale(scale);
                let ds = matvec(&ctx, "mv", &op, variant).unwrap();
                ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
                let got = gy.read_f32(&ctx).unwrap();
                let r = matvec_ref(&x, &wv, n, k, None);
                let mut want = y0.clone();
                for i in 0..n {
                    want[y_col0 + i] += scale * r[i];
                }
                assert_close(&got, &want, 1e-4, 1e-5, &format!("matvec_scaled {variant:?} n={n} k={k} scale={scale}"));
                if scale == 0.0 {
                    assert_eq!(got, y0, "scale 0 must leave y bit-identical");
                }
            }
        }
    }
}
