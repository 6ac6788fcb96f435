//! The backward form of the linear product, [`LinearForm::XW`]: `y[t, y_col0 + k] (+)= scale ·
//! sum_n x[t, n] · W[n, k]` with W `[N, K]` (Hugging Face `[out, in]`) read as stored. With x =
//! dY and y = dX it is the input gradient `dX = dY · W` of the forward `Y = X · Wᵀ` (and LoRA's
//! `da = s · dY · B`). Reached through [`crate::kernels::matmul::matmul`] and
//! [`crate::kernels::matvec::matvec`] with an op built by [`LinearOp::new_xw`]; one kernel for
//! every weight kind the forward reads (f32, f16 and its read modes, quantised blocks), since a
//! backward pass runs once per training step, not per decoded token.

use bytemuck::{Pod, Zeroable};

use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, ShaderVariant, WeightKind};
use crate::kernels::linear::{FLAG_ACCUMULATE, LinearForm, LinearOp};

const SOURCE: &str = include_str!("../../shaders/matmul_xw.wgsl");

/// Workgroup size of `matmul_xw`.
pub const XW_WG: u32 = 64;
/// Dense kinds: rows of y per invocation of `matmul_xw`.
///
/// Blocks measured on lavapipe (`cargo bench --bench kernels -- linear_xw`, T = 128, gate_up
/// 3072x576 and down 576x1536, alternated rounds under a load average of 4-6): dense 4 x 8
/// (this) was as fast as 8 x 4 in f32 and 1.3-1.8x faster in f16, 8 x 8 no faster; quantised
/// 4 x 32 and 8 x 32 were alike and 2 x 32 slower.
pub const XW_TM: u32 = 4;
/// Dense kinds: groups of 4 columns of y per invocation (`4 XW_KB` columns, so `XW_TM` x
/// `4 XW_KB` outputs in registers).
pub const XW_KB: u32 = 2;
/// Quantised kinds: rows of y per invocation; each invocation computes one unit of 32 columns
/// (the accessors' unit), so that a unit's scales and quant words are loaded once per row of W.
pub const XW_QUANT_TM: u32 = 4;

/// Uniform of `shaders/matmul_xw.wgsl` (`struct MatmulXwParams` there, same fields in the same
/// order), one per chunk of W.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatmulXwParams {
    /// Rows of x and y (tokens) T.
    pub t: u32,
    /// Rows of W this dispatch reads from its chunk: its reduction length.
    pub n: u32,
    /// Columns of W (`w.cols`): outputs per row of y.
    pub k: u32,
    /// Index of the first row read in the product's N: the first column of x it reads.
    pub row0: u32,
    /// Row stride of x in elements (the product's N: `w.rows`, or the length of
    /// [`LinearOp::w_rows`]).
    pub x_stride: u32,
    /// Row stride of y in elements.
    pub y_stride: u32,
    /// First output column of y.
    pub y_col0: u32,
    /// Bits of [`crate::kernels::linear`]: `FLAG_ACCUMULATE` (always set after the first
    /// chunk), `FLAG_SCALE`.
    pub flags: u32,
    /// Multiplies the product when `flags` has `FLAG_SCALE` (before accumulation).
    pub scale: f32,
    /// First row of the chunk's tensor read (0 unless [`LinearOp::w_rows`] cuts W).
    pub w_row0: u32,
    /// Padding to 48 bytes.
    pub _pad1: u32,
    /// Padding to 48 bytes.
    pub _pad2: u32,
}

/// The block of outputs of one `matmul_xw` invocation for weights of `kind`: (rows of y,
/// columns of y).
fn xw_block(kind: WeightKind) -> (u32, u32) {
    if matches!(kind, WeightKind::Quant(_)) { (XW_QUANT_TM, 32) } else { (XW_TM, 4 * XW_KB) }
}

/// Prepares the backward product `op` (form [`LinearForm::XW`]: `y[t, y_col0 + k] (+)= scale ·
/// sum_n x[t, n] · W[n, k]` for `t < op.rows`, `k < K`): one dispatch per chunk of W, named
/// `label` (`label[row0]` when W is split). The first chunk overwrites or accumulates as
/// `op.accumulate` says; every later chunk adds its rows' share into y, so the result is the
/// same whatever the split.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when [`LinearOp::check`] rejects the op or its
/// form is not [`LinearForm::XW`]; a pipeline build error as [`GpuError::Device`].
pub(crate) fn matmul_xw(ctx: &GpuContext, label: &str, op: &LinearOp) -> Result<Vec<Dispatch>, GpuError> {
    if op.form != LinearForm::XW {
        return Err(crate::kernels::checks::invalid(label, "matmul_xw computes the x · W form only"));
    }
    let kind = op.check(ctx, label)?;
    let (n_total, k) = op.k_n();
    let rows = op.rows;
    // x read four values of n per load where every part's first column of x is on a group of 4.
    let xvec = n_total.is_multiple_of(4) && op.chunk_parts().iter().all(|part| part.row0.is_multiple_of(4));
    let pipeline = |kind: WeightKind| {
        let (tm, kc) = xw_block(kind);
        let body = match kind {
            WeightKind::Quant(_) => xw_body_quant(tm, xvec),
            _ => xw_body_dense(tm, kc / 4, xvec),
        };
        let shader = ShaderVariant::new("matmul_xw", SOURCE, "matmul_xw")
            .define("XW_BODY", body)
            .weights("X_DECL", WeightKind::F32, 1, "x")
            .weights("W_DECL", kind, 2, "w")
            .define("ALIGNED", k.is_multiple_of(4))
            .define("WG", XW_WG)
            .define("TM", tm)
            .define("KC", kc);
        ctx.pipeline(&shader)
    };
    let flags = op.flags();
    let y_stride = op.y_row_stride();
    op.chunk_dispatches(ctx, label, kind, pipeline, |c, kind| {
        let params = MatmulXwParams {
            t: rows as u32,
            n: c.rows as u32,
            k: k as u32,
            row0: c.row0 as u32,
            x_stride: n_total as u32,
            y_stride: y_stride as u32,
            y_col0: op.y_col0 as u32,
            flags: if c.row0 == 0 { flags } else { flags | FLAG_ACCUMULATE },
            scale: op.scale.unwrap_or(1.0),
            w_row0: c.w_row0 as u32,
            ..Zeroable::zeroed()
        };
        let (tm, kc) = xw_block(kind);
        let invocations = (rows as u32).div_ceil(tm) * (k as u32).div_ceil(kc);
        let outputs = (rows * k) as u64;
        let accumulates = op.accumulate || c.row0 > 0;
        let cost = Cost {
            flops: 2 * outputs * c.rows as u64,
            bytes: c.byte_len() + 4 * (rows * c.rows) as u64 + outputs * if accumulates { 8 } else { 4 },
        };
        (params, grid(invocations.div_ceil(XW_WG)), cost)
    })
}

/// The start of both bodies: each row of x's offset `xb{i}` in elements (rows past the end
/// clamped to the last).
fn xw_prologue(s: &mut String, tm: u32) {
    use std::fmt::Write;
    for i in 0..tm {
        let _ = writeln!(s, "    let xb{i} = min(t0 + {i}u, p.t - 1u) * p.x_stride + p.row0;");
    }
}

/// The WGSL statements of `matmul_xw` for the dense kinds once `t0` and `k0` are known: a `tm`
/// x `4 kb` block of outputs in named vec4 registers `a{i}_{j}` (row i, columns `k0 + 4j ..
/// k0 + 4j + 4`). With `xvec` (every chunk's first column of x on a group of 4), rows of W four
/// at a time against one `x_4` load per row of x (`tm + 4 kb` loads per `16 tm kb`
/// multiply-adds), then the remaining rows one at a time (`x_1`); stores guarded by `t < p.t`
/// and `k < p.k`.
pub fn xw_body_dense(tm: u32, kb: u32, xvec: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    xw_prologue(&mut s, tm);
    for j in 0..kb {
        let _ = writeln!(s, "    let kc{j} = col4(k0 + {}u);", 4 * j);
    }
    for i in 0..tm {
        for j in 0..kb {
            let _ = writeln!(s, "    var a{i}_{j} = vec4<f32>(0.0);");
        }
    }
    let mut n_done = "0u";
    if xvec {
        let _ = writeln!(s, "    for (var nn = 0u; nn < p.n / 4u; nn++) {{");
        for r in 0..4 {
            for j in 0..kb {
                let _ = writeln!(s, "        let w{r}_{j} = w_row4(nn * 4u + {r}u, kc{j});");
            }
        }
        for i in 0..tm {
            let _ = writeln!(s, "        let x{i} = x_4(xb{i} / 4u + nn);");
            for j in 0..kb {
                let mut e = format!("a{i}_{j}");
                for (r, c) in "xyzw".chars().enumerate() {
                    e = format!("fma(vec4<f32>(x{i}.{c}), w{r}_{j}, {e})");
                }
                let _ = writeln!(s, "        a{i}_{j} = {e};");
            }
        }
        let _ = writeln!(s, "    }}");
        n_done = "(p.n / 4u) * 4u";
    }
    let _ = writeln!(s, "    for (var n = {n_done}; n < p.n; n++) {{");
    for j in 0..kb {
        let _ = writeln!(s, "        let w{j} = w_row4(n, kc{j});");
    }
    for i in 0..tm {
        let _ = writeln!(s, "        let x{i} = vec4<f32>(x_1(xb{i} + n));");
        for j in 0..kb {
            let _ = writeln!(s, "        a{i}_{j} = fma(x{i}, w{j}, a{i}_{j});");
        }
    }
    let _ = writeln!(s, "    }}");
    for i in 0..tm {
        let _ = writeln!(s, "    if (t0 + {i}u < p.t) {{");
        for j in 0..kb {
            for (c, comp) in "xyzw".chars().enumerate() {
                let col = 4 * j as usize + c;
                let _ = writeln!(s, "        if (k0 + {col}u < p.k) {{ store(t0 + {i}u, k0 + {col}u, a{i}_{j}.{comp}); }}");
            }
        }
        let _ = writeln!(s, "    }}");
    }
    s
}

/// The WGSL statements of `matmul_xw` for the quantised kinds once `t0` and `k0` (a multiple of
/// 32: K is a whole number of units) are known: `tm` rows of y times one unit of 32 columns, in
/// named vec4 registers `l{i}_{q}` (columns `k0 + 4q ..`) and `h{i}_{q}` (`k0 + 16 + 4q ..`),
/// q < 4. Per row n of W the unit's scales and quant words are loaded once
/// (`w_scales`, `w_words`) and dequantised in registers (`w_pair_of`), then feed `32 tm`
/// multiply-adds; with `xvec`, x is read four rows of W at a time by one `x_4` load per row of
/// x, then the remaining rows one at a time (`x_1`).
pub fn xw_body_quant(tm: u32, xvec: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    xw_prologue(&mut s, tm);
    let _ = writeln!(s, "    let units = p.k / 32u;");
    let _ = writeln!(s, "    let u = k0 / 32u;");
    for i in 0..tm {
        for q in 0..4 {
            let _ = writeln!(s, "    var l{i}_{q} = vec4<f32>(0.0);");
            let _ = writeln!(s, "    var h{i}_{q} = vec4<f32>(0.0);");
        }
    }
    // One row `n` of W (a WGSL expression) against x values `x{i}` (vec4 splats), at `indent`.
    let row = |s: &mut String, n: &str, x_of: &dyn Fn(u32) -> String, indent: &str| {
        let _ = writeln!(s, "{indent}{{");
        let _ = writeln!(s, "{indent}    let b = (p.w_row0 + {n}) * units + u;");
        let _ = writeln!(s, "{indent}    let sc = w_scales(b);");
        let _ = writeln!(s, "{indent}    let wd = w_words(b);");
        for q in 0..4 {
            let _ = writeln!(s, "{indent}    let p{q} = w_pair_of(wd, {q}u);");
            let _ = writeln!(s, "{indent}    let wl{q} = fma(p{q}.lo, vec4<f32>(sc.x), vec4<f32>(sc.z));");
            let _ = writeln!(s, "{indent}    let wh{q} = fma(p{q}.hi, vec4<f32>(sc.y), vec4<f32>(sc.z));");
        }
        for i in 0..tm {
            let _ = writeln!(s, "{indent}    let xs{i} = vec4<f32>({});", x_of(i));
            for q in 0..4 {
                let _ = writeln!(s, "{indent}    l{i}_{q} = fma(xs{i}, wl{q}, l{i}_{q});");
                let _ = writeln!(s, "{indent}    h{i}_{q} = fma(xs{i}, wh{q}, h{i}_{q});");
            }
        }
        let _ = writeln!(s, "{indent}}}");
    };
    let mut n_done = "0u";
    if xvec {
        let _ = writeln!(s, "    for (var nn = 0u; nn < p.n / 4u; nn++) {{");
        for i in 0..tm {
            let _ = writeln!(s, "        let x{i} = x_4(xb{i} / 4u + nn);");
        }
        for (r, c) in "xyzw".chars().enumerate() {
            row(&mut s, &format!("nn * 4u + {r}u"), &|i| format!("x{i}.{c}"), "        ");
        }
        let _ = writeln!(s, "    }}");
        n_done = "(p.n / 4u) * 4u";
    }
    let _ = writeln!(s, "    for (var n = {n_done}; n < p.n; n++) {{");
    row(&mut s, "n", &|i| format!("x_1(xb{i} + n)"), "        ");
    let _ = writeln!(s, "    }}");
    for i in 0..tm {
        let _ = writeln!(s, "    if (t0 + {i}u < p.t) {{");
        for q in 0..4u32 {
            for (c, comp) in "xyzw".chars().enumerate() {
                let _ = writeln!(s, "        store(t0 + {i}u, k0 + {}u, l{i}_{q}.{comp});", 4 * q as usize + c);
                let _ = writeln!(s, "        store(t0 + {i}u, k0 + {}u, h{i}_{q}.{comp});", 16 + 4 * q as usize + c);
            }
        }
        let _ = writeln!(s, "    }}");
    }
    s
}

/// CPU reference of the backward form: `[rows, k]` = x (`[rows, n]`) times w (`[n, k]`), in
/// f64. With x = dY it is the input gradient `dX = dY · W` of `Y = X · Wᵀ`
/// ([`crate::kernels::matmul::matmul_ref`]): `∂/∂X[t, k] sum_{t', j} dY[t', j] · sum_k' X[t', k']
/// · W[j, k'] = sum_j dY[t, j] · W[j, k]`.
pub fn matmul_xw_ref(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0; rows * k];
    for t in 0..rows {
        let mut acc = vec![0.0f64; k];
        for j in 0..n {
            let xv = x[t * n + j] as f64;
            for (a, &wv) in acc.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                *a += xv * wv as f64;
            }
        }
        for (o, a) in y[t * k..(t + 1) * k].iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, GpuMatrix, GpuOptions, GpuTensor, MatrixPart, test_context};
    use crate::kernels::matmul::{MatmulVariant, matmul};
    use crate::kernels::matvec::{MatvecVariant, matvec};
    use crate::kernels::testing::{assert_close, random_blocks, random_vec, round_f16, weight_kinds};
    use crate::model::QuantType;

    /// Options of one check: y from column `y_col0` of rows `y_col0 + K + y_extra` wide.
    #[derive(Clone, Copy)]
    struct Opts {
        accumulate: bool,
        scale: Option<f32>,
        y_col0: usize,
        y_extra: usize,
    }

    const PLAIN: Opts = Opts { accumulate: false, scale: None, y_col0: 0, y_extra: 0 };

    /// `y (+)= scale · x · W` on the GPU (through `matmul`, or `matvec` for one row) against
    /// [`matmul_xw_ref`] of `wv`, the values W holds (after f16 rounding or dequantisation).
    fn check(ctx: &GpuContext, w: &GpuMatrix, wv: &[f32], kind: Option<WeightKind>, t: usize, o: Opts, what: &str) {
        let (n, k) = (w.rows, w.cols);
        let seed = (t * 1000 + n * 31 + k) as u64;
        let x = random_vec(t * n, seed);
        let stride = o.y_col0 + k + o.y_extra;
        let y0 = random_vec(t * stride, seed + 1);
        let gx = GpuTensor::from_f32(ctx, "dy", &[t, n], &x).unwrap();
        let gy = GpuTensor::from_f32(ctx, "dx", &[t, stride], &y0).unwrap();
        let mut op = LinearOp::new_xw(&gx, t, w, &gy).y_stride(stride).y_col0(o.y_col0).accumulate(o.accumulate);
        if let Some(s) = o.scale {
            op = op.scale(s);
        }
        if let Some(kind) = kind {
            op = op.kind(kind);
        }
        let ds = if t == 1 {
            matvec(ctx, "dx", &op, MatvecVariant::Rows).unwrap()
        } else {
            matmul(ctx, "dx", &op, MatmulVariant::RegBlock).unwrap()
        };
        assert_eq!(ds.len(), w.chunks.len());
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let r = matmul_xw_ref(&x, t, wv, n, k);
        let s = o.scale.unwrap_or(1.0);
        let mut want = y0.clone();
        for row in 0..t {
            for c in 0..k {
                let i = row * stride + o.y_col0 + c;
                want[i] = if o.accumulate { want[i] + s * r[row * k + c] } else { s * r[row * k + c] };
            }
        }
        let wmax = wv.iter().fold(0f32, |a, v| a.max(v.abs()));
        let atol = 4e-5 * (n as f32).sqrt() * wmax.max(1.0);
        assert_close(&gy.read_f32(ctx).unwrap(), &want, atol, 1e-5, &format!("{what} t={t} n={n} k={k}"));
    }

    #[test]
    fn xw_matches_reference_every_dense_kind() {
        let ctx = test_context();
        for kind in weight_kinds(&ctx) {
            for (t, n, k) in [(3, 41, 37), (17, 41, 576), (5, 1, 1), (1, 41, 37), (1, 9, 576), (70, 13, 20), (6, 44, 37), (17, 64, 576)] {
                let mut wv = random_vec(n * k, (n * k) as u64);
                let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, kind.dtype()).unwrap();
                if kind.dtype() == DType::F16 {
                    wv = round_f16(&wv);
                }
                check(&ctx, &w, &wv, Some(kind), t, PLAIN, &format!("xw {}", kind.name()));
                let o = Opts { accumulate: true, scale: Some(-1.5), y_col0: 3, y_extra: 2 };
                check(&ctx, &w, &wv, Some(kind), t, o, &format!("xw {} acc scale strided", kind.name()));
            }
        }
    }

    #[test]
    fn xw_matches_dequantised_reference_every_block_type() {
        let ctx = test_context();
        // 44 rows: x read four rows of W at a time; 45: one at a time.
        for (q, n) in QuantType::ALL.into_iter().flat_map(|q| [(q, 44), (q, 45)]) {
            let k = if q.block_elems() == 256 { 768 } else { 576 };
            let blocks = random_blocks(q, n, k, 5);
            let wv = blocks.dequantize().unwrap();
            let w = GpuMatrix::upload_parts(&ctx, "w", k, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
            for t in [1, 3, 17] {
                check(&ctx, &w, &wv, Some(WeightKind::Quant(q)), t, PLAIN, &format!("xw {q}"));
                let o = Opts { accumulate: true, scale: Some(0.75), y_col0: 1, y_extra: 0 };
                check(&ctx, &w, &wv, None, t, o, &format!("xw {q} acc scale strided"));
            }
        }
    }

    /// W split into row chunks (a small binding limit): the reduction runs over the chunks, the
    /// first overwriting (or accumulating) and the rest adding; also a stack of block types
    /// and f16.
    #[test]
    fn xw_sums_over_chunks() {
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        for (kind, n) in [(WeightKind::F32, 301), (WeightKind::F16Packed, 301), (WeightKind::F32, 300), (WeightKind::F16Packed, 300)] {
            let k = 36;
            let mut wv = random_vec(n * k, 9);
            let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, kind.dtype()).unwrap();
            assert!(w.chunks.len() > 1);
            if kind.dtype() == DType::F16 {
                wv = round_f16(&wv);
            }
            for o in [PLAIN, Opts { accumulate: true, scale: Some(2.0), y_col0: 2, y_extra: 1 }] {
                check(&ctx, &w, &wv, Some(kind), 5, o, &format!("xw split {}", kind.name()));
            }
        }
        let k = 256;
        let a = random_blocks(QuantType::Q4_K, 40, k, 1);
        let b = random_blocks(QuantType::Q6_K, 24, k, 2);
        let c = random_vec(9 * k, 3);
        let parts = [MatrixPart::Blocks(&a), MatrixPart::Blocks(&b), MatrixPart::Dense { rows: 9, data: &c }];
        let w = GpuMatrix::upload_parts(&ctx, "w", k, &parts, DType::F16).unwrap();
        assert!(w.chunks.len() > 3, "{} chunks", w.chunks.len());
        let mut wv = a.dequantize().unwrap();
        wv.extend(b.dequantize().unwrap());
        wv.extend(round_f16(&c));
        check(&ctx, &w, &wv, None, 3, PLAIN, "xw mixed stack");
        check(&ctx, &w, &wv, None, 1, Opts { accumulate: true, scale: None, y_col0: 0, y_extra: 0 }, "xw mixed stack acc");
    }

    #[test]
    fn xw_rejects_bad_operands() {
        let ctx = test_context();
        let w = GpuMatrix::upload(&ctx, "w", 8, 16, &random_vec(128, 1), DType::F32).unwrap();
        let dy = GpuTensor::from_f32(&ctx, "dy", &[2, 8], &random_vec(16, 2)).unwrap();
        let dx = GpuTensor::zeros(&ctx, "dx", DType::F32, &[2, 16]).unwrap();
        let bias = GpuTensor::zeros(&ctx, "b", DType::F32, &[16]).unwrap();
        let err = |op: LinearOp| matmul(&ctx, "grad/dx", &op, MatmulVariant::RegBlock).unwrap_err().to_string();
        assert!(err(LinearOp::new_xw(&dy, 2, &w, &dx).bias(Some(&bias))).contains("grad/dx: the x · W form takes no bias"));
        assert!(err(LinearOp::new_xw(&dy, 3, &w, &dx)).contains("x has 16 elements, needs 3 x 8"));
        assert!(err(LinearOp::new_xw(&dy, 2, &w, &dx).y_col0(1)).contains("grad/dx: y has 32 elements"));
        assert!(err(LinearOp::new_xw(&dy, 0, &w, &dx)).contains("empty product"));
        assert!(matvec(&ctx, "grad/dx", &LinearOp::new_xw(&dy, 2, &w, &dx), MatvecVariant::Rows).is_err());
        assert!(matmul_xw(&ctx, "grad/dx", &LinearOp::new(&dx, 2, &w, &dy)).unwrap_err().to_string().contains("x · W form only"));
    }
}
