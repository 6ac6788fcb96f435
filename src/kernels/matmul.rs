//! Matrix product for prefill: `y[t, y_col0 + n] (+)= sum_k x[t, k] * w[n, k] (+ bias[n])`, i.e.
//! `X · W^T` with `w` a `[N, K]` weight matrix (Hugging Face `[out, in]`) in f32 or f16, f32 maths.
//!
//! Two variants: [`MatmulVariant::RegBlock`] (each invocation a small block of outputs held in
//! registers, vec4 loads along K, no workgroup memory: the fast one on CPU drivers such as
//! lavapipe) and [`MatmulVariant::Tiled`] (64 x 64 tiles staged through workgroup memory: the usual
//! GPU shape). [`crate::kernels::choice::matmul_variant`] picks one per adapter.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, ShaderVariant, WeightKind};
use crate::kernels::matvec::{FLAG_ACCUMULATE, FLAG_BIAS, FLAG_SCALE, check_linear, chunk_dispatch};

const SOURCE: &str = include_str!("../../shaders/matmul.wgsl");

/// Workgroup size of the `RegBlock` variant.
pub const REGBLOCK_WG: u32 = 64;
/// Rows of x per `RegBlock` invocation.
pub const REGBLOCK_TM: u32 = 2;
/// Rows of w per `RegBlock` invocation.
pub const REGBLOCK_TN: u32 = 4;
/// Output tile of one `Tiled` workgroup (rows of x and rows of w).
pub const TILE: u32 = 64;
/// `matmul_xbcast`: tokens per workgroup (uniform) and w rows per invocation.
pub const XBCAST_BM: u32 = 8;
pub const XBCAST_BNR: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulVariant {
    /// Register-blocked, no workgroup memory.
    RegBlock,
    /// Tiled through workgroup memory (for real GPUs).
    Tiled,
    /// A block of tokens per workgroup so that x loads are uniform (broadcast), w rows per lane.
    XBcast,
}

impl MatmulVariant {
    pub const ALL: [MatmulVariant; 3] = [MatmulVariant::RegBlock, MatmulVariant::Tiled, MatmulVariant::XBcast];

    pub fn name(self) -> &'static str {
        match self {
            MatmulVariant::RegBlock => "regblock",
            MatmulVariant::Tiled => "tiled",
            MatmulVariant::XBcast => "xbcast",
        }
    }

    pub fn parse(s: &str) -> Option<MatmulVariant> {
        MatmulVariant::ALL.into_iter().find(|v| v.name() == s)
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatmulParams {
    pub t: u32,
    pub n: u32,
    pub k: u32,
    pub row0: u32,
    pub y_stride: u32,
    pub y_col0: u32,
    pub flags: u32,
    /// Multiplies the product when `flags` has [`FLAG_SCALE`] (before bias and accumulation).
    pub scale: f32,
}

/// `y[t, y_col0 + n] (+)= sum_k x[t, k] * w[n, k] (+ bias[n])` for `t < rows`, `n < w.rows`.
/// x: `[rows, K]` f32 (K = w.cols), row stride K. y: f32 with row stride `y_stride`
/// (>= y_col0 + w.rows). `accumulate` adds into y (fuses the residual add). One dispatch per chunk of w.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    rows: usize,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    y_stride: usize,
    y_col0: usize,
    accumulate: bool,
    variant: MatmulVariant,
) -> Result<Vec<Dispatch>, GpuError> {
    let kind = crate::kernels::choice::weight_kind(ctx, w.dtype);
    matmul_with_kind(ctx, label, x, rows, w, bias, y, y_stride, y_col0, accumulate, variant, kind)
}

/// `y[t, y_col0 + n] (+)= scale * sum_k x[t, k] * w[n, k]`: [`matmul`] without bias and with the
/// product scaled (LoRA's `S * alpha / r` applied to `a · B^T`). The scale lives in the dispatch's
/// uniform, so a new scale means preparing the dispatch again, not re-uploading `w`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_scaled(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    rows: usize,
    w: &GpuMatrix,
    y: &GpuTensor,
    y_stride: usize,
    y_col0: usize,
    accumulate: bool,
    scale: f32,
    variant: MatmulVariant,
) -> Result<Vec<Dispatch>, GpuError> {
    let kind = crate::kernels::choice::weight_kind(ctx, w.dtype);
    matmul_inner(ctx, label, x, rows, w, None, y, y_stride, y_col0, accumulate, Some(scale), variant, kind)
}

/// [`matmul`] reading the weights as `kind` (tests use it to cover `F16Packed` where SHADER_F16 exists).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with_kind(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    rows: usize,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    y_stride: usize,
    y_col0: usize,
    accumulate: bool,
    variant: MatmulVariant,
    kind: WeightKind,
) -> Result<Vec<Dispatch>, GpuError> {
    matmul_inner(ctx, label, x, rows, w, bias, y, y_stride, y_col0, accumulate, None, variant, kind)
}

#[allow(clippy::too_many_arguments)]
fn matmul_inner(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    rows: usize,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    y_stride: usize,
    y_col0: usize,
    accumulate: bool,
    scale: Option<f32>,
    variant: MatmulVariant,
    kind: WeightKind,
) -> Result<Vec<Dispatch>, GpuError> {
    check_linear(label, x, rows, w, bias, y, y_stride, y_col0)?;
    if kind.dtype() != w.dtype {
        return Err(GpuError::Device(format!("{label}: weight kind {} cannot read {} weights", kind.name(), w.dtype)));
    }
    if kind == WeightKind::F16 && !ctx.has_f16() {
        return Err(GpuError::Device(format!("{label}: WeightKind::F16 needs SHADER_F16")));
    }
    let k = w.cols;
    let entry = match variant {
        MatmulVariant::RegBlock => "matmul_regblock",
        MatmulVariant::Tiled => "matmul_tiled",
        MatmulVariant::XBcast => "matmul_xbcast",
    };
    let shader = ShaderVariant::new("matmul", SOURCE, entry)
        .weights("X_DECL", WeightKind::F32, 1, "x")
        .weights("W_DECL", kind, 2, "w")
        .define("ALIGNED", k % 4 == 0)
        .define("WG", REGBLOCK_WG)
        .define("TM", REGBLOCK_TM)
        .define("TN", REGBLOCK_TN)
        .define("BM", XBCAST_BM)
        .define("BNR", XBCAST_BNR);
    let pipeline = ctx.pipeline(&shader)?;
    let flags = if accumulate { FLAG_ACCUMULATE } else { 0 }
        | if bias.is_some() { FLAG_BIAS } else { 0 }
        | if scale.is_some() { FLAG_SCALE } else { 0 };
    let bias_buf = bias.unwrap_or(x);
    let mut out = Vec::with_capacity(w.chunks.len());
    for c in &w.chunks {
        let params = MatmulParams {
            t: rows as u32,
            n: c.rows as u32,
            k: k as u32,
            row0: c.row0 as u32,
            y_stride: y_stride as u32,
            y_col0: y_col0 as u32,
            flags,
            scale: scale.unwrap_or(1.0),
        };
        let u = uniform(ctx, label, &params);
        let (t, n) = (rows as u32, c.rows as u32);
        let groups = match variant {
            MatmulVariant::RegBlock => (t.div_ceil(REGBLOCK_TM) * n.div_ceil(REGBLOCK_TN)).div_ceil(REGBLOCK_WG),
            MatmulVariant::Tiled => t.div_ceil(TILE) * n.div_ceil(TILE),
            MatmulVariant::XBcast => 0,
        };
        let workgroups = match variant {
            MatmulVariant::XBcast => [n.div_ceil(REGBLOCK_WG * XBCAST_BNR), t.div_ceil(XBCAST_BM), 1],
            _ => grid(groups),
        };
        let outputs = (rows * c.rows) as u64;
        let cost = Cost {
            flops: 2 * outputs * k as u64,
            bytes: c.tensor.byte_len() as u64
                + 4 * (rows * k) as u64
                + outputs * if accumulate { 8 } else { 4 }
                + if bias.is_some() { 4 * c.rows as u64 } else { 0 },
        };
        out.push(chunk_dispatch(ctx, &pipeline, label, w, c, &u, x, bias_buf, y, workgroups, cost));
    }
    Ok(out)
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
    use crate::gpu::{DType, GpuOptions, test_context};
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
        let ds =
            matmul_with_kind(ctx, "mm", &gx, c.t, &gw, c.bias.then_some(&gb), &gy, stride, c.y_col0, c.accumulate, variant, kind).unwrap();
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
        for variant in MatmulVariant::ALL {
            for kind in weight_kinds(&ctx) {
                for (t, n, k) in [(1, 1, 1), (7, 7, 7), (3, 257, 257), (5, 9, 1757), (1757, 5, 12), (70, 67, 20), (65, 130, 64)] {
                    check(&ctx, &case(t, n, k), kind, variant);
                }
            }
        }
    }

    #[test]
    fn matmul_bias_accumulate_and_strided_y() {
        let ctx = test_context();
        for variant in MatmulVariant::ALL {
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
        for variant in MatmulVariant::ALL {
            check(&ctx, &case(64, 576, 576), WeightKind::F32, variant);
            let c = Case { t: 33, n: 576, k: 1536, bias: true, accumulate: true, y_col0: 0, y_extra: 0 };
            check(&ctx, &c, WeightKind::for_dtype(&ctx, DType::F16), variant);
        }
    }

    #[test]
    fn matmul_over_split_weights() {
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        for variant in MatmulVariant::ALL {
            for kind in [WeightKind::F32, WeightKind::F16Packed] {
                let gw = GpuMatrix::upload(&ctx, "w", 301, 36, &random_vec(301 * 36, 9), kind.dtype()).unwrap();
                assert!(gw.chunks.len() > 1);
                check(&ctx, &Case { t: 5, n: 301, k: 36, bias: true, accumulate: false, y_col0: 3, y_extra: 1 }, kind, variant);
                check(&ctx, &Case { t: 3, n: 97, k: 257, bias: true, accumulate: true, y_col0: 1, y_extra: 0 }, kind, variant);
            }
        }
    }

    #[test]
    fn matmul_rejects_bad_shapes() {
        let ctx = test_context();
        let gw = GpuMatrix::upload(&ctx, "w", 8, 16, &random_vec(128, 1), DType::F32).unwrap();
        let gx = GpuTensor::from_f32(&ctx, "x", &[2, 16], &random_vec(32, 2)).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[2, 8]).unwrap();
        assert!(matmul(&ctx, "mm", &gx, 3, &gw, None, &gy, 8, 0, false, MatmulVariant::RegBlock).is_err());
        assert!(matmul(&ctx, "mm", &gx, 2, &gw, None, &gy, 7, 0, false, MatmulVariant::RegBlock).is_err());
        assert!(matmul(&ctx, "mm", &gx, 2, &gw, None, &gy, 9, 0, false, MatmulVariant::RegBlock).is_err());
        assert!(matmul(&ctx, "mm", &gx, 0, &gw, None, &gy, 8, 0, false, MatmulVariant::RegBlock).is_err());
        matmul(&ctx, "mm", &gx, 2, &gw, None, &gy, 8, 0, false, MatmulVariant::Tiled).unwrap();
    }

    /// The scale flag (LoRA's `y[:, col0..] += s · a · B^T`): every variant, strided y with an
    /// offset, K = 8 (a LoRA rank) and K = 576 (x onto A).
    #[test]
    fn matmul_scaled_accumulates_scaled_product() {
        let ctx = test_context();
        for variant in MatmulVariant::ALL {
            for (t, n, k, y_col0, scale) in [(9usize, 37usize, 8usize, 5usize, -1.75f32), (70, 8, 576, 0, 2.0), (3, 19, 6, 2, 0.0)] {
                let y_stride = y_col0 + n + 4;
                let x = random_vec(t * k, 21);
                let wv = random_vec(n * k, 22);
                let y0 = random_vec(t * y_stride, 23);
                let gw = GpuMatrix::upload(&ctx, "w", n, k, &wv, DType::F32).unwrap();
                let gx = GpuTensor::from_f32(&ctx, "x", &[t, k], &x).unwrap();
                let gy = GpuTensor::from_f32(&ctx, "y", &[t, y_stride], &y0).unwrap();
                let ds = matmul_scaled(&ctx, "mm", &gx, t, &gw, &gy, y_stride, y_col0, true, scale, variant).unwrap();
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
