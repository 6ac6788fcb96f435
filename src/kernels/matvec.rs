//! Matrix-vector product for decode (one token): `y[y_col0 + n] (+)= dot(w[n, :], x) (+ bias[n])`
//! with `w` a `[N, K]` weight matrix (Hugging Face `[out, in]`) in f32 or f16 and f32 maths.
//!
//! Two variants: [`MatvecVariant::Rows`] (each invocation owns a few rows, register-blocked vec4
//! loads, no workgroup memory: the fast one on CPU drivers such as lavapipe) and
//! [`MatvecVariant::Reduce`] (one workgroup per row, reduction through workgroup memory: the usual
//! GPU shape). [`crate::kernels::choice::matvec_variant`] picks one per adapter.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, ShaderVariant, WeightKind};

const SOURCE: &str = include_str!("../../shaders/matvec.wgsl");

/// Rows per invocation of the `Rows` variant.
pub const ROWS_PER_INVOCATION: u32 = 2;
/// Workgroup size of the `Rows` variant.
pub const ROWS_WG: u32 = 64;
/// Workgroup size of the `Reduce` variant (a power of two).
pub const REDUCE_WG: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatvecVariant {
    /// Register-blocked vec4, no workgroup memory.
    Rows,
    /// Workgroup reduction per row.
    Reduce,
}

impl MatvecVariant {
    pub const ALL: [MatvecVariant; 2] = [MatvecVariant::Rows, MatvecVariant::Reduce];

    pub fn name(self) -> &'static str {
        match self {
            MatvecVariant::Rows => "rows",
            MatvecVariant::Reduce => "reduce",
        }
    }

    pub fn parse(s: &str) -> Option<MatvecVariant> {
        MatvecVariant::ALL.into_iter().find(|v| v.name() == s)
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatvecParams {
    pub rows: u32,
    pub k: u32,
    pub row0: u32,
    pub y_col0: u32,
    pub flags: u32,
    /// Multiplies the product when `flags` has [`FLAG_SCALE`] (before bias and accumulation).
    pub scale: f32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// `flags` bit: add into y instead of overwriting it.
pub const FLAG_ACCUMULATE: u32 = 1;
/// `flags` bit: add the bias.
pub const FLAG_BIAS: u32 = 2;
/// `flags` bit: multiply the product by `scale` (before bias and accumulation).
pub const FLAG_SCALE: u32 = 4;

fn invalid(label: &str, msg: String) -> GpuError {
    GpuError::Device(format!("{label}: {msg}"))
}

/// Checks shared by matvec and matmul: dtypes and sizes of x, bias and y.
pub(crate) fn check_linear(
    label: &str,
    x: &GpuTensor,
    rows: usize,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    y_stride: usize,
    y_col0: usize,
) -> Result<(), GpuError> {
    if x.dtype != DType::F32 || y.dtype != DType::F32 {
        return Err(invalid(label, format!("x and y must be f32 (got {} and {})", x.dtype, y.dtype)));
    }
    if w.dtype == DType::U32 {
        return Err(invalid(label, "weights must be f32 or f16".into()));
    }
    if w.rows == 0 || w.cols == 0 || rows == 0 {
        return Err(invalid(label, format!("empty product: {rows} rows times [{}, {}]", w.rows, w.cols)));
    }
    if x.numel() < rows * w.cols {
        return Err(invalid(label, format!("x has {} elements, needs {rows} x {}", x.numel(), w.cols)));
    }
    if y_stride < y_col0 + w.rows {
        return Err(invalid(label, format!("y stride {y_stride} < y_col0 {y_col0} + {} outputs", w.rows)));
    }
    if y.numel() < (rows - 1) * y_stride + y_col0 + w.rows {
        return Err(invalid(label, format!("y has {} elements, too few for {rows} rows of stride {y_stride}", y.numel())));
    }
    if let Some(b) = bias {
        if b.dtype != DType::F32 || b.numel() < w.rows {
            return Err(invalid(label, format!("bias must be f32 with {} elements (got {} {})", w.rows, b.numel(), b.dtype)));
        }
    }
    let max = u32::MAX as usize;
    if rows * w.cols > max || (rows - 1) * y_stride + y_col0 + w.rows > max {
        return Err(invalid(label, "tensor too large for 32-bit indexing".into()));
    }
    for c in &w.chunks {
        if c.tensor.dtype != w.dtype || c.tensor.numel() != c.rows * w.cols {
            return Err(invalid(label, format!("chunk at row {} does not match the matrix", c.row0)));
        }
    }
    Ok(())
}

/// `y[y_col0 + n] (+)= dot(w[n, :], x) (+ bias[n])`; x: `[K]` f32; y: f32. One dispatch per chunk of w.
pub fn matvec(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    y_col0: usize,
    accumulate: bool,
    variant: MatvecVariant,
) -> Result<Vec<Dispatch>, GpuError> {
    matvec_with_kind(ctx, label, x, w, bias, y, y_col0, accumulate, variant, crate::kernels::choice::weight_kind(ctx, w.dtype))
}

/// `y[y_col0 + n] (+)= scale * dot(w[n, :], x)`: [`matvec`] without bias and with the product
/// scaled (LoRA's `S * alpha / r` applied to `a · B^T`); the scale lives in the dispatch's uniform.
#[allow(clippy::too_many_arguments)]
pub fn matvec_scaled(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    w: &GpuMatrix,
    y: &GpuTensor,
    y_col0: usize,
    accumulate: bool,
    scale: f32,
    variant: MatvecVariant,
) -> Result<Vec<Dispatch>, GpuError> {
    let kind = crate::kernels::choice::weight_kind(ctx, w.dtype);
    matvec_inner(ctx, label, x, w, None, y, y_col0, accumulate, Some(scale), variant, kind)
}

/// [`matvec`] reading the weights as `kind` (tests use it to cover `F16Packed` where SHADER_F16 exists).
#[allow(clippy::too_many_arguments)]
pub fn matvec_with_kind(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    y_col0: usize,
    accumulate: bool,
    variant: MatvecVariant,
    kind: WeightKind,
) -> Result<Vec<Dispatch>, GpuError> {
    matvec_inner(ctx, label, x, w, bias, y, y_col0, accumulate, None, variant, kind)
}

#[allow(clippy::too_many_arguments)]
fn matvec_inner(
    ctx: &GpuContext,
    label: &str,
    x: &GpuTensor,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    y_col0: usize,
    accumulate: bool,
    scale: Option<f32>,
    variant: MatvecVariant,
    kind: WeightKind,
) -> Result<Vec<Dispatch>, GpuError> {
    check_linear(label, x, 1, w, bias, y, y_col0 + w.rows, y_col0)?;
    if kind.dtype() != w.dtype {
        return Err(invalid(label, format!("weight kind {} cannot read {} weights", kind.name(), w.dtype)));
    }
    if kind == WeightKind::F16 && !ctx.has_f16() {
        return Err(invalid(label, "WeightKind::F16 needs SHADER_F16".into()));
    }
    let k = w.cols;
    let aligned = k % 4 == 0;
    let (entry, wg) = match variant {
        MatvecVariant::Rows => ("matvec_rows", ROWS_WG),
        MatvecVariant::Reduce => ("matvec_reduce", REDUCE_WG),
    };
    let shader = ShaderVariant::new("matvec", SOURCE, entry)
        .weights("X_DECL", WeightKind::F32, 1, "x")
        .weights("W_DECL", kind, 2, "w")
        .define("ALIGNED", aligned)
        .define("WG", wg)
        .define("R", ROWS_PER_INVOCATION);
    let pipeline = ctx.pipeline(&shader)?;
    let flags = if accumulate { FLAG_ACCUMULATE } else { 0 }
        | if bias.is_some() { FLAG_BIAS } else { 0 }
        | if scale.is_some() { FLAG_SCALE } else { 0 };
    let bias_buf = bias.unwrap_or(x);
    let mut out = Vec::with_capacity(w.chunks.len());
    for c in &w.chunks {
        let params = MatvecParams {
            rows: c.rows as u32,
            k: k as u32,
            row0: c.row0 as u32,
            y_col0: y_col0 as u32,
            flags,
            scale: scale.unwrap_or(1.0),
            ..Zeroable::zeroed()
        };
        let u = uniform(ctx, label, &params);
        let groups = match variant {
            MatvecVariant::Rows => (c.rows as u32).div_ceil(ROWS_PER_INVOCATION * ROWS_WG),
            MatvecVariant::Reduce => c.rows as u32,
        };
        let y_bytes = if accumulate { 8 } else { 4 } * c.rows as u64;
        let cost = Cost {
            flops: 2 * (c.rows * k) as u64,
            bytes: c.tensor.byte_len() as u64 + 4 * k as u64 + y_bytes + if bias.is_some() { 4 * c.rows as u64 } else { 0 },
        };
        out.push(chunk_dispatch(ctx, &pipeline, label, w, c, &u, x, bias_buf, y, grid(groups), cost));
    }
    Ok(out)
}

/// One chunk's dispatch of a linear kernel (matvec or matmul): bindings params, x, the chunk's
/// weights, bias, y; named `label[row0]` when the matrix is split.
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_dispatch(
    ctx: &GpuContext,
    pipeline: &std::sync::Arc<crate::gpu::pipeline::Pipeline>,
    label: &str,
    w: &GpuMatrix,
    c: &crate::gpu::MatrixChunk,
    params: &wgpu::Buffer,
    x: &GpuTensor,
    bias: &GpuTensor,
    y: &GpuTensor,
    workgroups: [u32; 3],
    cost: Cost,
) -> Dispatch {
    let name = if w.chunks.len() == 1 { label.to_string() } else { format!("{label}[{}]", c.row0) };
    Dispatch::new(
        ctx,
        pipeline,
        name,
        &[
            params.as_entire_binding(),
            x.buffer.as_entire_binding(),
            c.tensor.buffer.as_entire_binding(),
            bias.buffer.as_entire_binding(),
            y.buffer.as_entire_binding(),
        ],
        workgroups,
        cost,
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
    use crate::gpu::{GpuOptions, test_context};
    use crate::kernels::testing::{assert_close, random_vec, round_f16, weight_kinds};

    /// Runs one matvec and compares with the reference; y starts as `y0` (accumulate) or garbage.
    fn check(
        ctx: &GpuContext,
        n: usize,
        k: usize,
        kind: WeightKind,
        variant: MatvecVariant,
        with_bias: bool,
        accumulate: bool,
        y_col0: usize,
    ) {
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
        let ds = matvec_with_kind(ctx, "mv", &gx, &gw, with_bias.then_some(&gb), &gy, y_col0, accumulate, variant, kind).unwrap();
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
        for variant in MatvecVariant::ALL {
            for kind in weight_kinds(&ctx) {
                for (n, k) in [(1, 1), (7, 7), (257, 257), (13, 1757), (1757, 12), (5, 8), (300, 576)] {
                    check(&ctx, n, k, kind, variant, false, false, 0);
                }
            }
        }
    }

    #[test]
    fn matvec_bias_accumulate_and_offset() {
        let ctx = test_context();
        for variant in MatvecVariant::ALL {
            for kind in weight_kinds(&ctx) {
                check(&ctx, 37, 64, kind, variant, true, false, 5);
                check(&ctx, 37, 63, kind, variant, true, true, 2);
                check(&ctx, 9, 20, kind, variant, false, true, 0);
            }
        }
    }

    #[test]
    fn matvec_large() {
        let ctx = test_context();
        for variant in MatvecVariant::ALL {
            check(&ctx, 3072, 576, WeightKind::F32, variant, false, false, 0);
            check(&ctx, 576, 1536, WeightKind::for_dtype(&ctx, DType::F16), variant, true, true, 0);
        }
    }

    #[test]
    fn matvec_over_split_weights() {
        // A binding of 4 KiB forces the matrix into several chunks.
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        for variant in MatvecVariant::ALL {
            for kind in [WeightKind::F32, WeightKind::F16Packed] {
                let (n, k) = (301, 36);
                let gw = GpuMatrix::upload(&ctx, "w", n, k, &random_vec(n * k, 9), kind.dtype()).unwrap();
                assert!(gw.chunks.len() > 1);
                check(&ctx, n, k, kind, variant, true, false, 3);
                check(&ctx, 97, 257, kind, variant, true, true, 1);
            }
        }
    }

    #[test]
    fn matvec_rejects_bad_shapes() {
        let ctx = test_context();
        let gw = GpuMatrix::upload(&ctx, "w", 8, 16, &random_vec(128, 1), DType::F32).unwrap();
        let gx = GpuTensor::from_f32(&ctx, "x", &[15], &random_vec(15, 2)).unwrap();
        let gy = GpuTensor::zeros(&ctx, "y", DType::F32, &[8]).unwrap();
        assert!(matvec(&ctx, "mv", &gx, &gw, None, &gy, 0, false, MatvecVariant::Rows).is_err());
        let gx = GpuTensor::from_f32(&ctx, "x", &[16], &random_vec(16, 2)).unwrap();
        assert!(matvec(&ctx, "mv", &gx, &gw, None, &gy, 1, false, MatvecVariant::Rows).is_err());
        let gb = GpuTensor::from_f32(&ctx, "b", &[7], &random_vec(7, 3)).unwrap();
        assert!(matvec(&ctx, "mv", &gx, &gw, Some(&gb), &gy, 0, false, MatvecVariant::Rows).is_err());
        matvec(&ctx, "mv", &gx, &gw, None, &gy, 0, false, MatvecVariant::Rows).unwrap();
        assert!(matvec_with_kind(&ctx, "mv", &gx, &gw, None, &gy, 0, false, MatvecVariant::Rows, WeightKind::F16Packed).is_err());
    }

    /// The scale flag (LoRA's `y += s · a · B^T`): every variant, with an offset and accumulation,
    /// K = 8 (a LoRA rank) and K = 576 (the down-projection of x onto A).
    #[test]
    fn matvec_scaled_accumulates_scaled_product() {
        let ctx = test_context();
        for variant in MatvecVariant::ALL {
            for (n, k, y_col0, scale) in [(37usize, 8usize, 5usize, -1.75f32), (8, 576, 0, 2.0), (19, 6, 3, 0.0)] {
                let x = random_vec(k, 11);
                let wv = random_vec(n * k, 12);
                let y0 = random_vec(y_col0 + n + 2, 13);
                let gw = GpuMatrix::upload(&ctx, "w", n, k, &wv, DType::F32).unwrap();
                let gx = GpuTensor::from_f32(&ctx, "x", &[k], &x).unwrap();
                let gy = GpuTensor::from_f32(&ctx, "y", &[y0.len()], &y0).unwrap();
                let ds = matvec_scaled(&ctx, "mv", &gx, &gw, &gy, y_col0, true, scale, variant).unwrap();
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
