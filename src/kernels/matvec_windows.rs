//! The decode GEMV with W read through uniform windows ([`MatvecVariant::Windows`]): the
//! product, parameters and epilogues of [`MatvecVariant::Rows`], but each workgroup of
//! [`WINDOW_LANES`] invocations reads one window of whole rows of W bound as a uniform buffer (at
//! most the adapter's `max_uniform_buffer_binding_size`, 64 KiB on lavapipe), and a dispatch binds
//! up to [`WINDOWS_PER_DISPATCH`] windows, one binding each (two where an output pairs two rows of
//! W), its workgroup picking its own through a `switch`.
//!
//! The windows are cut from a second copy of W in an eight-row interleaved layout
//! ([`interleave8`]), built on the first use and kept with the matrix
//! ([`crate::gpu::MatrixChunk::interleaved8`]): invocation `l` of a workgroup reads rows `l`,
//! `l + 8`, .. of its window, and in that layout the eight invocations' values at one step lie side
//! by side (128 bytes of f16), where in the row-major layout they lie a row apart. On lavapipe that
//! halved the time of f16 products that do not fit the caches (the LM head: 20.5 ms to 8.4–10 ms)
//! and cut f32's by a quarter (BENCHMARKS.md, Kernels, "Interleaved rows"). The cost is memory: a
//! model whose products run through windows (a CPU adapter's measured choice) holds its dense
//! weights twice.
//!
//! Why: on lavapipe (Mesa 25.0) a storage load whose offset is not a constant is a loop over the
//! SIMD lanes with a bounds branch per component, while a uniform load is a branchless gather;
//! a GEMV there is bound by those per-lane loads, not by memory (BENCHMARKS.md, Kernels, "W through
//! uniform windows"). The cost is one copy of the loop over K per window in the shader (its
//! compile time grows with [`WINDOWS_PER_DISPATCH`]) and more dispatches for tall matrices.
//!
//! [`MatvecVariant::Windows`]: super::matvec::MatvecVariant::Windows
//! [`MatvecVariant::Rows`]: super::matvec::MatvecVariant::Rows

use std::fmt::Write;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::pipeline::{Pipeline, ShaderVariant};
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, MatrixChunk, WeightKind};
use crate::kernels::checks::invalid;
use crate::kernels::linear::{LinearForm, LinearOp};
use crate::kernels::matvec::{MatvecEpilogue, MatvecParams, MatvecVariant, uniform_x_bytes};

const SOURCE: &str = include_str!("../../shaders/matvec_windows.wgsl");
const INTERLEAVE_SOURCE: &str = include_str!("../../shaders/interleave8.wgsl");

/// Invocations per workgroup: one SIMD group of lavapipe's 256-bit code (eight 32-bit lanes).
pub const WINDOW_LANES: usize = 8;
/// Most outputs one invocation computes (one f32 accumulator each, two with a paired epilogue),
/// so a window holds at most `WINDOW_LANES * 7` = 56 outputs: 56 rows of f16 at K = 576 fill
/// 63 KiB. (4 and 3 measured no better for f16 on lavapipe: BENCHMARKS.md.)
pub const WINDOW_MAX_PER_LANE: usize = 7;
/// Most windows one dispatch binds. Each is a case of the shader's `switch` with its own copy of
/// the loop over K, and LLVM's compile time grows faster than the case count (a prototype: 0.3 s
/// for 55 cases, 2.0 s for 128).
pub const WINDOWS_PER_DISPATCH: usize = 64;
/// Most windows of an op with the norm epilogue, which must run as one dispatch (its hand-off
/// counts every invocation of the dispatch).
pub const NORM_WINDOWS_MAX: usize = 128;

/// Uniform `wp` of `shaders/matvec_windows.wgsl` (`struct WindowParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct WindowParams {
    win0: u32,
    nout: u32,
    _pad1: u32,
    _pad2: u32,
}

/// How an op's outputs split into windows ([`window_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowPlan {
    /// Outputs per window: rows of W per window binding.
    pub outputs: usize,
    /// Outputs of the op: N, or N / 2 where an output pairs two rows.
    pub nout: usize,
    /// Windows over the outputs, `⌈nout / outputs⌉`.
    pub windows: usize,
    /// Two window bindings per window (the SwiGLU and RoPE epilogues).
    pub paired: bool,
    /// The RoPE epilogue's `(half_dim, head_dim)`: its windows lie inside one half of a head, so
    /// window g starts at output `g · outputs`. Otherwise the last window is moved back to end at
    /// the last output, and each invocation stores only the outputs its window owns.
    pub rope: Option<(usize, usize)>,
    /// f16 weights (read eight halves per `vec4<u32>`), else f32 (`vec4<f32>`).
    pub f16: bool,
    /// Bytes of one row of W.
    pub row_bytes: u64,
    /// Bytes of x bound as a uniform ([`uniform_x_bytes`]: K f32 values).
    pub x_bytes: u64,
}

impl WindowPlan {
    /// Outputs per invocation, `⌈outputs / WINDOW_LANES⌉`.
    pub fn per_lane(&self) -> usize {
        self.outputs.div_ceil(WINDOW_LANES)
    }

    /// Window bindings per window: 2 where outputs pair rows, else 1.
    fn bindings(&self) -> usize {
        if self.paired { 2 } else { 1 }
    }

    /// The first output that window `g` binds.
    fn first_output(&self, g: usize) -> usize {
        if self.rope.is_some() { g * self.outputs } else { (g * self.outputs).min(self.nout - self.outputs) }
    }

    /// The first row of W of window `g`'s bindings: `(a, b)`, b only where paired.
    fn rows_of(&self, g: usize) -> (usize, usize) {
        let o = self.first_output(g);
        match self.rope {
            Some((half, head)) => {
                let row = (o / half) * head + o % half;
                (row, row + half)
            }
            None => (o, self.nout + o),
        }
    }
}

/// The windows of `op` read as `kind` with `epilogue` on `ctx`, or `None` where the op does not
/// suit them and the caller reads W from storage instead: the forward form of one row over all
/// of W in one chunk of f32 or f16 (not quantised) weights; K % 16 == 0 and x small enough for a
/// uniform binding; outputs (N, or N / 2 where paired) a multiple of [`WINDOW_LANES`], so that
/// every window starts at a group of the eight-row interleaved layout ([`interleave8`]); rows
/// whose byte length is a multiple of the adapter's `min_uniform_buffer_offset_alignment`, at
/// least [`WINDOW_LANES`] of which fit one uniform binding (or all of them where N is smaller);
/// for RoPE a multiple of 8 outputs that divides half a head; for the norm epilogue at most
/// [`NORM_WINDOWS_MAX`] windows; and enough uniform buffers per shader stage for a dispatch's
/// bindings.
pub fn window_plan(ctx: &GpuContext, op: &LinearOp, kind: WeightKind, epilogue: &MatvecEpilogue) -> Option<WindowPlan> {
    if op.form != LinearForm::XWt || op.rows != 1 || op.w_rows.is_some() || op.w.chunks.len() != 1 {
        return None;
    }
    let f16 = match op.w.chunks[0].kind(kind) {
        WeightKind::Quant(_) => return None,
        k => k.dtype() == DType::F16,
    };
    let (k, n) = (op.w.cols, op.w.rows);
    let limits = &ctx.limits;
    let max_uniform = limits.max_uniform_buffer_binding_size;
    let x_bytes = uniform_x_bytes(ctx, op, MatvecVariant::Windows, WeightKind::F32, k)?;
    if !k.is_multiple_of(16) {
        return None;
    }
    let row_bytes = k as u64 * if f16 { 2 } else { 4 };
    let align = u64::from(limits.min_uniform_buffer_offset_alignment).max(1);
    if !row_bytes.is_multiple_of(align) {
        return None;
    }
    let fit = (max_uniform / row_bytes).min((WINDOW_LANES * WINDOW_MAX_PER_LANE) as u64) as usize;
    let paired = matches!(epilogue, MatvecEpilogue::SwiGlu | MatvecEpilogue::Rope(_));
    let nout = if paired { n / 2 } else { n };
    if nout == 0 || !nout.is_multiple_of(WINDOW_LANES) {
        return None;
    }
    let (outputs, rope) = match epilogue {
        MatvecEpilogue::Rope(r) => {
            let (half, head) = (r.shape.head_dim / 2, r.shape.head_dim);
            let outputs = (1..=fit / 8).rev().map(|m| 8 * m).find(|&o| half.is_multiple_of(o))?;
            if !nout.is_multiple_of(half) {
                return None;
            }
            (outputs, Some((half, head)))
        }
        _ => {
            let full = 8 * (fit / 8);
            if full == 0 {
                return None;
            }
            (full.min(nout), None)
        }
    };
    let windows = nout.div_ceil(outputs);
    if matches!(epilogue, MatvecEpilogue::Norm(_)) && windows > NORM_WINDOWS_MAX {
        return None;
    }
    let plan = WindowPlan { outputs, nout, windows, paired, rope, f16, row_bytes, x_bytes };
    // p, x and wp, the epilogue's uniforms (RoPE's step and rp, the norm's np), the windows.
    let per_dispatch = if matches!(epilogue, MatvecEpilogue::Norm(_)) { windows } else { windows.min(WINDOWS_PER_DISPATCH) };
    let uniforms = 3 + 2 + per_dispatch * plan.bindings();
    let bindings = 12 + per_dispatch * plan.bindings();
    (uniforms as u64 <= u64::from(limits.max_uniform_buffers_per_shader_stage)
        && bindings as u64 <= u64::from(limits.max_bindings_per_bind_group))
    .then_some(plan)
}

/// The WGSL declarations of `nw` windows from binding `first_binding`: `wa{c}` (and `wb{c}` where
/// paired), each `plan.outputs` rows of W as `vec4<u32>` (f16) or `vec4<f32>`.
pub fn window_decls(plan: &WindowPlan, k: usize, nw: usize, first_binding: usize) -> String {
    let (elem, per_row) = if plan.f16 { ("vec4<u32>", k / 8) } else { ("vec4<f32>", k / 4) };
    let len = plan.outputs * per_row;
    let mut s = String::new();
    for c in 0..nw {
        let b = first_binding + c * plan.bindings();
        let _ = writeln!(s, "@group(0) @binding({b}) var<uniform> wa{c}: array<{elem}, {len}>;");
        if plan.paired {
            let _ = writeln!(s, "@group(0) @binding({}) var<uniform> wb{c}: array<{elem}, {len}>;", b + 1);
        }
    }
    s
}

/// The WGSL entry point `matvec_windows` for `nw` windows: workgroup c reads window c's rows
/// (invocation `lid` rows `lid`, `lid + 8`, .. `lid + 8 · (per_lane - 1)`, read from the
/// eight-row interleaved layout of [`interleave8`]: the group of row `8j + lid` starts at
/// `8j · K` values, its eight values of step kk at `+ 64 · kk + 8 · lid`) against x eight values a
/// step in one f32 accumulator per row, then stores the outputs its window owns as `epilogue`
/// says (as `matvec::rows_body` does: SwiGLU `silu(a) · b`, RoPE through `rope_pair`, the norm's
/// sum of squares to `norm_hand_off` by every invocation, at index `wg.x · WINDOW_LANES + lid`).
pub fn windows_entry(plan: &WindowPlan, k: usize, nw: usize, epilogue: &MatvecEpilogue) -> String {
    let (rw, pl, steps) = (plan.outputs, plan.per_lane(), k / 8);
    let mut s = String::new();
    let _ = writeln!(s, "@compute @workgroup_size({WINDOW_LANES})");
    let _ = writeln!(s, "fn matvec_windows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{");
    let _ = writeln!(s, "    let g = wp.win0 + wg.x;");
    if plan.rope.is_some() {
        let _ = writeln!(s, "    let ob = g * {rw}u;");
    } else {
        let _ = writeln!(s, "    let ob = min(g * {rw}u, wp.nout - {rw}u);");
    }
    for j in 0..pl {
        let _ = writeln!(s, "    let i{j} = {}u + lid;", j * WINDOW_LANES * steps);
        let _ = writeln!(s, "    var a{j} = 0.0;");
        if plan.paired {
            let _ = writeln!(s, "    var b{j} = 0.0;");
        }
    }
    let dot = |w: &str, j: usize| {
        if plan.f16 {
            format!("dot8_f16({w}[i{j} + kk * {WINDOW_LANES}u], xa, xb)")
        } else {
            format!("dot({w}[2u * (i{j} + kk * {WINDOW_LANES}u)], xa) + dot({w}[2u * (i{j} + kk * {WINDOW_LANES}u) + 1u], xb)")
        }
    };
    let _ = writeln!(s, "    switch wg.x {{");
    for c in 0..nw {
        let _ = writeln!(s, "        case {c}u: {{");
        let _ = writeln!(s, "            for (var kk = 0u; kk < {steps}u; kk++) {{");
        let _ = writeln!(s, "                let xa = x[2u * kk];");
        let _ = writeln!(s, "                let xb = x[2u * kk + 1u];");
        for j in 0..pl {
            let _ = writeln!(s, "                a{j} += {};", dot(&format!("wa{c}"), j));
            if plan.paired {
                let _ = writeln!(s, "                b{j} += {};", dot(&format!("wb{c}"), j));
            }
        }
        let _ = writeln!(s, "            }}");
        let _ = writeln!(s, "        }}");
    }
    let _ = writeln!(s, "        default: {{}}");
    let _ = writeln!(s, "    }}");
    if matches!(epilogue, MatvecEpilogue::Norm(_)) {
        let _ = writeln!(s, "    var ss = 0.0;");
    }
    for j in 0..pl {
        let _ = writeln!(s, "    let o{j} = ob + {}u + lid;", j * WINDOW_LANES);
        let owned = format!("o{j} >= g * {rw}u && o{j} < wp.nout");
        let body = match epilogue {
            MatvecEpilogue::Store => format!("store(o{j}, a{j});"),
            MatvecEpilogue::SwiGlu => format!("store(o{j}, a{j} * sigmoid(a{j}) * b{j});"),
            MatvecEpilogue::Rope(_) => format!(
                "let r{j} = pair_row(o{j}); let x1_{j} = store(r{j}, a{j}); \
                 let x2_{j} = store(r{j} + rp.half_dim, b{j}); rope_pair(o{j}, x1_{j}, x2_{j});"
            ),
            MatvecEpilogue::Norm(_) => format!("let v{j} = store(o{j}, a{j}); ss = fma(v{j}, v{j}, ss);"),
        };
        let _ = writeln!(s, "    if ({owned}) {{ {body} }}");
    }
    if matches!(epilogue, MatvecEpilogue::Norm(_)) {
        let _ = writeln!(s, "    norm_hand_off(wg.x * {WINDOW_LANES}u + lid, ss);");
    }
    let _ = writeln!(s, "}}");
    s
}

/// The dispatches of `op` through the windows of `plan`: groups of up to [`WINDOWS_PER_DISPATCH`]
/// windows (all of them in one for the norm epilogue), named `label`, `label#2`, ..; bindings
/// p, x (a uniform of K f32), wp, bias (x when absent), y, `extra` (the epilogue's operands,
/// declared by `epilogue_decl` from binding 5) and the windows, cut from W's interleaved copy
/// ([`interleaved8`], built here on the first call for this W). `params` is the op's
/// [`MatvecParams`] (rows = outputs).
///
/// # Errors
/// A pipeline build error as [`GpuError::Device`]; building the interleaved copy's errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn windows_dispatches(
    ctx: &GpuContext,
    label: &str,
    op: &LinearOp,
    plan: &WindowPlan,
    epilogue: &MatvecEpilogue,
    epilogue_decl: &str,
    extra: &[wgpu::BindingResource<'_>],
    params: MatvecParams,
) -> Result<Vec<Dispatch>, GpuError> {
    let k = op.w.cols;
    let chunk = interleaved8(ctx, label, &op.w.chunks[0], k)?;
    let first_binding = 5 + extra.len();
    let per_dispatch = if matches!(epilogue, MatvecEpilogue::Norm(_)) { plan.windows } else { WINDOWS_PER_DISPATCH };
    let mut pipelines: Vec<(usize, Arc<Pipeline>)> = Vec::new();
    let p = uniform(ctx, label, &params);
    let bias = op.bias.unwrap_or(op.x);
    let window_bytes = plan.outputs as u64 * plan.row_bytes;
    let mut out = Vec::new();
    for (i, win0) in (0..plan.windows).step_by(per_dispatch).enumerate() {
        let nw = per_dispatch.min(plan.windows - win0);
        let pipe = match pipelines.iter().find(|(n, _)| *n == nw) {
            Some((_, pipe)) => pipe.clone(),
            None => {
                let shader = crate::kernels::snippet_variant("matvec_windows", SOURCE, "matvec_windows")
                    .define("X_VEC4", k / 4)
                    .define("EPILOGUE_DECL", epilogue_decl)
                    .define("WINDOW_DECLS", window_decls(plan, k, nw, first_binding))
                    .define("WINDOWS_ENTRY", windows_entry(plan, k, nw, epilogue));
                let pipe = ctx.pipeline(&shader)?;
                pipelines.push((nw, pipe.clone()));
                pipe
            }
        };
        let wp = uniform(ctx, label, &WindowParams { win0: win0 as u32, nout: plan.nout as u32, _pad1: 0, _pad2: 0 });
        let mut resources = vec![
            p.as_entire_binding(),
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &op.x.buffer,
                offset: 0,
                size: wgpu::BufferSize::new(plan.x_bytes),
            }),
            wp.as_entire_binding(),
            bias.buffer.as_entire_binding(),
            op.y.buffer.as_entire_binding(),
        ];
        resources.extend(extra.iter().cloned());
        for g in win0..win0 + nw {
            let (a, b) = plan.rows_of(g);
            for row in [a, b].into_iter().take(plan.bindings()) {
                resources.push(wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &chunk.buffer,
                    offset: row as u64 * plan.row_bytes,
                    size: wgpu::BufferSize::new(window_bytes),
                }));
            }
        }
        let rows_read = (nw * plan.outputs * plan.bindings()) as u64;
        let cost =
            Cost { flops: 2 * rows_read * k as u64, bytes: rows_read * plan.row_bytes + 4 * k as u64 + 4 * (nw * plan.outputs) as u64 };
        let name = if i == 0 { label.to_string() } else { format!("{label}#{}", i + 1) };
        out.push(Dispatch::new(ctx, &pipe, name, &resources, [nw as u32, 1, 1], cost));
    }
    Ok(out)
}

/// Uniform `p` of `shaders/interleave8.wgsl` (`struct InterleaveParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct InterleaveParams {
    n: u32,
    row_words: u32,
    chunk_words: u32,
    _pad: u32,
}

/// The words of one chunk of eight values of `dtype` (8 for f32, 4 for f16), or `None` for a
/// dtype the layout does not take.
fn chunk_words(dtype: DType) -> Option<usize> {
    match dtype {
        DType::F32 => Some(8),
        DType::F16 => Some(4),
        _ => None,
    }
}

/// The dispatch that writes `dst` as `src` (`[rows, cols]` f32 or f16, row-major) in the decode
/// GEMV's eight-row interleaved layout: rows in groups of [`WINDOW_LANES`], each group stored
/// chunk by chunk of eight values, the group's eight rows' chunk c side by side. Value
/// `(r, k)` sits at value index `(r / 8) · 8 · cols + (k / 8) · 64 + (r % 8) · 8 + k % 8`
/// ([`interleave8_ref`]). So the eight invocations of a windows workgroup, each reading its own
/// row, read 8 · 8 adjacent values: 128 bytes of f16 in two cache lines, where the row-major
/// layout puts them in eight lines `cols` values apart (BENCHMARKS.md, Kernels, "Interleaved
/// rows"). llama.cpp's CPU backend likewise repacks quantised weights, rows interleaved in
/// groups, for its SIMD kernels (`block_q4_0x8`).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when the dtypes or sizes differ, rows % 8 != 0,
/// cols % 8 != 0, or the word count exceeds u32.
pub fn interleave8(
    ctx: &GpuContext,
    label: &str,
    src: &GpuTensor,
    rows: usize,
    cols: usize,
    dst: &GpuTensor,
) -> Result<Dispatch, GpuError> {
    let cw = chunk_words(src.dtype).ok_or_else(|| invalid(label, format!("interleave8 takes f32 or f16 values, not {:?}", src.dtype)))?;
    if dst.dtype != src.dtype || src.numel() != rows * cols || dst.numel() != rows * cols {
        return Err(invalid(label, format!("interleave8 needs src and dst of {rows}x{cols} {:?} values", src.dtype)));
    }
    if !rows.is_multiple_of(WINDOW_LANES) || !cols.is_multiple_of(8) {
        return Err(invalid(label, format!("interleave8 needs rows and cols multiples of 8, not {rows}x{cols}")));
    }
    let row_words = cols * cw / 8;
    let n = u32::try_from(rows * row_words).map_err(|_| invalid(label, format!("{rows}x{cols} is more words than u32 counts")))?;
    let pipeline = ctx.pipeline(&ShaderVariant::new("interleave8", INTERLEAVE_SOURCE, "interleave8"))?;
    let u = uniform(ctx, label, &InterleaveParams { n, row_words: row_words as u32, chunk_words: cw as u32, _pad: 0 });
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), src.buffer.as_entire_binding(), dst.buffer.as_entire_binding()],
        grid(n.div_ceil(64)),
        Cost { flops: 0, bytes: 8 * u64::from(n) },
    ))
}

/// CPU reference of [`interleave8`] on `[rows, cols]` values (rows and cols multiples of 8).
pub fn interleave8_ref<T: Copy>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = src.to_vec();
    for r in 0..rows {
        for k in 0..cols {
            out[(r / 8) * 8 * cols + (k / 8) * 64 + (r % 8) * 8 + k % 8] = src[r * cols + k];
        }
    }
    out
}

/// `chunk`'s rows in the eight-row interleaved layout ([`interleave8`]) for the windows GEMV:
/// built on first use into `chunk.interleaved8` (one more copy of the chunk's bytes on the
/// adapter; the kernel warmed through [`GpuContext::warm_up`], then run and waited for here),
/// then shared.
///
/// # Errors
/// As [`interleave8`]; buffer creation errors.
pub fn interleaved8<'a>(ctx: &GpuContext, label: &str, chunk: &'a MatrixChunk, cols: usize) -> Result<&'a GpuTensor, GpuError> {
    if let Some(t) = chunk.interleaved8.get() {
        return Ok(t);
    }
    let src = &chunk.tensor;
    let dst = GpuTensor::zeros(ctx, &format!("{label}.interleaved8"), src.dtype, &[chunk.rows, cols])?;
    let d = interleave8(ctx, &format!("{label}.interleave8"), src, chunk.rows, cols, &dst)?;
    // Warmed like every other pipeline (the run that prepares a step must leave none cold), then
    // run whole.
    ctx.warm_up([&d])?;
    ctx.run(label, &[&d])?;
    Ok(chunk.interleaved8.get_or_init(|| dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuMatrix, GpuOptions, GpuTensor, test_context};
    use crate::kernels::matvec::{MatvecVariant, NormEpilogue};
    use crate::kernels::testing::random_vec;

    /// Whether the adapter has lavapipe's uniform limits (64 KiB bindings, offsets aligned to at
    /// most 32 bytes), for which the plans below are worked out.
    fn lavapipe_like(ctx: &GpuContext) -> bool {
        MatvecVariant::available(ctx).contains(&MatvecVariant::Windows)
            && ctx.limits.max_uniform_buffer_binding_size == 65536
            && ctx.limits.min_uniform_buffer_offset_alignment <= 32
    }

    /// The windows of SmolLM2-135M's decode products: 56 rows of f16 or 24 of f32 at K = 576, 16
    /// and 8 at K = 1536 (64 KiB over a row's bytes, in whole groups of eight lanes), N / 2
    /// outputs for SwiGLU, the last window moved back to end at N.
    #[test]
    fn window_plans_of_the_model_shapes() {
        let ctx = test_context();
        if !lavapipe_like(&ctx) {
            return;
        }
        let plan = |n: usize, k: usize, dtype: DType, epilogue: &MatvecEpilogue| {
            let w = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 1), dtype).unwrap();
            let x = GpuTensor::zeros(&ctx, "x", DType::F32, &[k]).unwrap();
            let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
            let kind = crate::kernels::choice::weight_kind(&ctx, dtype);
            window_plan(&ctx, &LinearOp::new(&x, 1, &w, &y), kind, epilogue).map(|p| (p.outputs, p.per_lane(), p.nout, p.windows))
        };
        let store = MatvecEpilogue::Store;
        assert_eq!(plan(49152, 576, DType::F16, &store), Some((56, 7, 49152, 878)));
        assert_eq!(plan(49152, 576, DType::F32, &store), Some((24, 3, 49152, 2048)));
        assert_eq!(plan(3072, 576, DType::F16, &MatvecEpilogue::SwiGlu), Some((56, 7, 1536, 28)));
        assert_eq!(plan(3072, 576, DType::F32, &MatvecEpilogue::SwiGlu), Some((24, 3, 1536, 64)));
        // Fewer rows than a window: one window of all of them; outputs not a multiple of eight
        // (no whole groups of the interleaved layout): rows.
        assert_eq!(plan(40, 576, DType::F16, &store), Some((40, 5, 40, 1)));
        assert_eq!(plan(5, 576, DType::F16, &store), None);
        assert_eq!(plan(3068, 576, DType::F16, &MatvecEpilogue::SwiGlu), None);
        let gamma = GpuTensor::zeros(&ctx, "gamma", DType::F32, &[1032]).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[1032]).unwrap();
        let norm = MatvecEpilogue::Norm(&NormEpilogue { weight: &gamma, out: &out, eps: 1e-5 });
        assert_eq!(plan(576, 1536, DType::F16, &norm), Some((16, 2, 576, 36)));
        assert_eq!(plan(576, 1536, DType::F32, &norm), Some((8, 1, 576, 72)));
        // The norm's one dispatch holds at most NORM_WINDOWS_MAX windows.
        assert_eq!(plan(8 * NORM_WINDOWS_MAX, 1536, DType::F32, &norm).map(|p| p.3), Some(NORM_WINDOWS_MAX));
        assert_eq!(plan(8 * NORM_WINDOWS_MAX + 1, 1536, DType::F32, &norm), None);
        // K not a multiple of 16: rows.
        assert_eq!(plan(64, 40, DType::F32, &store), None);
    }

    /// Quantised and split weights are not read through windows; the LM head's many windows
    /// take several dispatches of at most WINDOWS_PER_DISPATCH windows, whose products match
    /// the `rows` kernel's; the first builds W's interleaved copy, which the second reuses.
    #[test]
    fn windows_fall_back_and_split_into_dispatches() {
        let ctx = test_context();
        if !lavapipe_like(&ctx) {
            return;
        }
        let (n, k) = (56 * WINDOWS_PER_DISPATCH + 64, 576);
        let x = GpuTensor::from_f32(&ctx, "x", &[k], &random_vec(k, 2)).unwrap();
        for dtype in [DType::F16, DType::F32] {
            let w = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 3), dtype).unwrap();
            let mut got = Vec::new();
            for variant in [MatvecVariant::Rows, MatvecVariant::Windows] {
                let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
                let ds = crate::kernels::matvec::matvec(&ctx, "lm_head", &LinearOp::new(&x, 1, &w, &y), variant).unwrap();
                if variant == MatvecVariant::Windows {
                    let copy = w.chunks[0].interleaved8.get().expect("built by the first windows dispatch list");
                    let again = crate::kernels::matvec::matvec(&ctx, "lm_head", &LinearOp::new(&x, 1, &w, &y), variant).unwrap();
                    assert_eq!(again.len(), ds.len());
                    assert!(std::ptr::eq(copy, w.chunks[0].interleaved8.get().unwrap()), "the copy is built once");
                    let per_row = if dtype == DType::F16 { 56 } else { 24 };
                    assert_eq!(ds.len(), n.div_ceil(per_row).div_ceil(WINDOWS_PER_DISPATCH), "{dtype}");
                    assert!(ds.iter().all(|d| d.family() == "matvec_windows"));
                    assert_eq!(ds[1].label, "lm_head#2");
                }
                ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
                got.push(y.read_f32(&ctx).unwrap());
            }
            crate::kernels::testing::assert_close(&got[1], &got[0], 1e-4, 1e-4, &format!("windows against rows, {dtype}"));
        }
        let blocks = crate::kernels::testing::random_blocks(crate::model::QuantType::Q4_1, 64, 576, 4);
        let wq = GpuMatrix::upload_parts(&ctx, "w", 576, &[crate::gpu::MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
        let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[64]).unwrap();
        let op = LinearOp::new(&x, 1, &wq, &y);
        assert_eq!(window_plan(&ctx, &op, op.check(&ctx, "w").unwrap(), &MatvecEpilogue::Store), None);
        let split = GpuContext::new(&GpuOptions { max_binding_override: Some(65536), ..Default::default() }).unwrap();
        let xs = GpuTensor::from_f32(&split, "x", &[k], &random_vec(k, 2)).unwrap();
        let ws = GpuMatrix::upload(&split, "w", 256, k, &random_vec(256 * k, 5), DType::F32).unwrap();
        assert!(ws.chunks.len() > 1);
        let ys = GpuTensor::zeros(&split, "y", DType::F32, &[256]).unwrap();
        let op = LinearOp::new(&xs, 1, &ws, &ys);
        assert_eq!(window_plan(&split, &op, WeightKind::F32, &MatvecEpilogue::Store), None);
        let ds = crate::kernels::matvec::matvec(&split, "mv", &op, MatvecVariant::Windows).unwrap();
        assert!(ds.iter().all(|d| d.family() == "matvec"), "split weights run the rows kernel");
        assert!(ws.chunks.iter().all(|c| c.interleaved8.get().is_none()), "and build no interleaved copy");
    }

    /// The interleaving kernel against its reference, f32 and f16, and its
    /// argument checks.
    #[test]
    fn interleave8_matches_reference() {
        let ctx = test_context();
        let (rows, cols) = (24, 40);
        let v = random_vec(rows * cols, 11);
        let src = GpuTensor::from_f32(&ctx, "src", &[rows, cols], &v).unwrap();
        let dst = GpuTensor::zeros(&ctx, "dst", DType::F32, &[rows, cols]).unwrap();
        ctx.run("test", &[&interleave8(&ctx, "il", &src, rows, cols, &dst).unwrap()]).unwrap();
        assert_eq!(dst.read_f32(&ctx).unwrap(), interleave8_ref(&v, rows, cols));
        let src16 = GpuTensor::from_f32_as(&ctx, "src", &[rows, cols], &v, DType::F16).unwrap();
        let dst16 = GpuTensor::zeros(&ctx, "dst", DType::F16, &[rows, cols]).unwrap();
        ctx.run("test", &[&interleave8(&ctx, "il", &src16, rows, cols, &dst16).unwrap()]).unwrap();
        assert_eq!(dst16.read_f32(&ctx).unwrap(), interleave8_ref(&src16.read_f32(&ctx).unwrap(), rows, cols));
        let e = interleave8(&ctx, "il", &src, 12, 80, &GpuTensor::zeros(&ctx, "d", DType::F32, &[12, 80]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("multiples of 8"), "{e}");
        assert!(interleave8(&ctx, "il", &src, rows, cols, &dst16).is_err(), "dtypes differ");
    }
}
