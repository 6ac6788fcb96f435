//! SwiGLU activation of the fused gate/up projection: `out[t, j] = silu(gate[t, j]) * up[t, j]`
//! where `gate_up[t, :] = [gate (ff) | up (ff)]` and `silu(x) = x * sigmoid(x)`, and its
//! backward ([`swiglu_backward`]).

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor};
use crate::kernels::checks::{check_f32, check_rows, check_u32, invalid};

const SOURCE: &str = include_str!("../../shaders/swiglu.wgsl");

/// Uniform of `shaders/swiglu.wgsl` (`struct Params` there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SwigluParams {
    /// Rows (tokens).
    pub rows: u32,
    /// Intermediate size (`d_ff`): columns of the output, half the columns of gate_up.
    pub ff: u32,
    /// Padding to 16 bytes.
    pub _pad0: u32,
    /// Padding to 16 bytes.
    pub _pad1: u32,
}

/// `rows * ff`, the forward's output elements, after the checks both directions share: rows
/// and ff at least 1, and `2 * rows * ff` (gate_up's elements) within u32.
fn elements(label: &str, rows: usize, ff: usize) -> Result<usize, GpuError> {
    check_rows(label, rows)?;
    if ff == 0 {
        return Err(invalid(label, "ff must be at least 1"));
    }
    let n = rows.checked_mul(ff).ok_or_else(|| invalid(label, format!("{rows} x {ff} elements overflow")))?;
    check_u32(label, n.saturating_mul(2), "gate_up elements")?;
    Ok(n)
}

/// `out` (`[rows, ff]` f32) = silu(gate) * up, with `gate_up` `[rows, 2 * ff]` f32 holding the
/// gate in columns `0..ff` and the up projection in `ff..2 * ff` (Shazeer 2020, as Hugging Face's
/// `LlamaMLP` with `hidden_act = "silu"`).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows or ff is 0, gate_up or out is not f32
/// or too small, or `2 * rows * ff` does not fit in u32.
pub fn swiglu(ctx: &GpuContext, label: &str, gate_up: &GpuTensor, rows: usize, ff: usize, out: &GpuTensor) -> Result<Dispatch, GpuError> {
    let n = elements(label, rows, ff)?;
    check_f32(label, gate_up, 2 * n, "gate_up")?;
    check_f32(label, out, n, "out")?;
    let pipeline = ctx.pipeline(&super::snippet_variant("swiglu", SOURCE, "swiglu"))?;
    let params = SwigluParams { rows: rows as u32, ff: ff as u32, _pad0: 0, _pad1: 0 };
    let u = uniform(ctx, label, &params);
    let cost = Cost { flops: (6 * n) as u64, bytes: (12 * n) as u64 };
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), gate_up.buffer.as_entire_binding(), out.buffer.as_entire_binding()],
        grid((n as u32).div_ceil(256)),
        cost,
    ))
}

/// Backward of [`swiglu`]: `d_gate_up` (`[rows, 2 * ff]` f32, overwritten: the product that
/// made gate_up has this one gradient) from `d_act` (`[rows, ff]` f32, the gradient w.r.t. the
/// output) and the forward's `gate_up` (`[rows, 2 * ff]`):
/// `d_gate = d_act · up · σ(g) (1 + g (1 - σ(g)))` (the derivative of `silu(g) = g σ(g)`) and
/// `d_up = d_act · silu(g)`. One invocation per output element of the forward.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows or ff is 0, an operand is not f32 or
/// too small, or `2 * rows * ff` does not fit in u32.
pub fn swiglu_backward(
    ctx: &GpuContext,
    label: &str,
    gate_up: &GpuTensor,
    d_act: &GpuTensor,
    rows: usize,
    ff: usize,
    d_gate_up: &GpuTensor,
) -> Result<Dispatch, GpuError> {
    let n = elements(label, rows, ff)?;
    check_f32(label, gate_up, 2 * n, "gate_up")?;
    check_f32(label, d_act, n, "d_act")?;
    check_f32(label, d_gate_up, 2 * n, "d_gate_up")?;
    let pipeline = ctx.pipeline(&super::snippet_variant("swiglu", SOURCE, "swiglu_backward"))?;
    let params = SwigluParams { rows: rows as u32, ff: ff as u32, _pad0: 0, _pad1: 0 };
    let u = uniform(ctx, label, &params);
    let cost = Cost { flops: (12 * n) as u64, bytes: (20 * n) as u64 };
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[
            u.as_entire_binding(),
            gate_up.buffer.as_entire_binding(),
            d_gate_up.buffer.as_entire_binding(),
            d_act.buffer.as_entire_binding(),
        ],
        grid((n as u32).div_ceil(256)),
        cost,
    ))
}

/// CPU reference of the forward in f64: `gate_up` `[rows, 2 * ff]`, the result `[rows, ff]`.
pub fn swiglu_f64(gate_up: &[f64], ff: usize) -> Vec<f64> {
    gate_up.chunks(2 * ff).flat_map(|row| (0..ff).map(move |j| row[j] / (1.0 + (-row[j]).exp()) * row[ff + j])).collect()
}

/// CPU reference of [`swiglu_backward`] in f64: `d_gate_up` `[rows, 2 * ff]` from `gate_up`
/// `[rows, 2 * ff]` and `d_act` `[rows, ff]`.
pub fn swiglu_backward_ref(gate_up: &[f64], d_act: &[f64], ff: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(gate_up.len());
    for (row, d) in gate_up.chunks(2 * ff).zip(d_act.chunks(ff)) {
        let (g, u) = row.split_at(ff);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        out.extend((0..ff).map(|j| d[j] * u[j] * sig(g[j]) * (1.0 + g[j] * (1.0 - sig(g[j])))));
        out.extend((0..ff).map(|j| d[j] * g[j] * sig(g[j])));
    }
    out
}

/// CPU reference: `gate_up` is `[rows, 2 * ff]`, the result `[rows, ff]`.
pub fn swiglu_ref(gate_up: &[f32], rows: usize, ff: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * ff);
    for t in 0..rows {
        let row = &gate_up[t * 2 * ff..(t + 1) * 2 * ff];
        for j in 0..ff {
            let g = row[j] as f64;
            let silu = g / (1.0 + (-g).exp());
            out.push((silu * row[ff + j] as f64) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, test_context};
    use crate::kernels::testing::{assert_close, assert_close_f64, central_differences, random_vec, to_f64};

    fn check(rows: usize, ff: usize, scale: f32, seed: u64) {
        let ctx = test_context();
        let gu: Vec<f32> = random_vec(rows * 2 * ff, seed).iter().map(|v| v * scale).collect();
        let g = GpuTensor::from_f32(&ctx, "gate_up", &[rows, 2 * ff], &gu).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[rows, ff]).unwrap();
        let d = swiglu(&ctx, "swiglu", &g, rows, ff, &out).unwrap();
        ctx.run("test", &[&d]).unwrap();
        assert_close(&out.read_f32(&ctx).unwrap(), &swiglu_ref(&gu, rows, ff), 1e-6, 1e-5, &format!("swiglu [{rows}, {ff}]"));
    }

    #[test]
    fn swiglu_matches_reference() {
        for (i, (rows, ff)) in [(1, 1), (1, 7), (7, 257), (3, 1757), (257, 7), (33, 8192)].into_iter().enumerate() {
            check(rows, ff, 4.0, 10 + i as u64);
        }
    }

    #[test]
    fn swiglu_is_stable_for_large_inputs() {
        // |x| up to 200: exp(200) overflows f32, a naive sigmoid would give NaN or inf.
        check(5, 333, 200.0, 3);
        let ctx = test_context();
        let gu = [-1000.0f32, 1000.0, 90.0, -90.0, 2.0, 3.0, 0.5, 0.25];
        let g = GpuTensor::from_f32(&ctx, "gate_up", &[1, 8], &gu).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[1, 4]).unwrap();
        let d = swiglu(&ctx, "swiglu", &g, 1, 4, &out).unwrap();
        ctx.run("test", &[&d]).unwrap();
        let got = out.read_f32(&ctx).unwrap();
        assert!(got.iter().all(|v| v.is_finite()), "{got:?}");
        assert_close(&got, &[-0.0, 3000.0, 45.0, -0.0], 1e-6, 1e-6, "swiglu extremes");
    }

    #[test]
    fn swiglu_rejects_bad_operands() {
        let ctx = test_context();
        let g = GpuTensor::zeros(&ctx, "gate_up", DType::F32, &[2, 10]).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[2, 5]).unwrap();
        assert!(swiglu(&ctx, "swiglu", &g, 2, 5, &out).is_ok());
        let huge = usize::MAX / 2 + 1;
        for (rows, ff, what) in
            [(0, 5, "rows"), (2, 0, "ff"), (2, 6, "gate_up ("), (3, 5, "gate_up ("), (huge, 2, "overflow"), (1 << 16, 1 << 15, "32-bit")]
        {
            let err = swiglu(&ctx, "s.fwd", &g, rows, ff, &out).err().unwrap().to_string();
            assert!(err.contains("s.fwd: ") && err.contains(what), "{rows} x {ff}: {err}");
        }
        let big = GpuTensor::zeros(&ctx, "gate_up", DType::F32, &[2, 12]).unwrap();
        let err = swiglu(&ctx, "s.fwd", &big, 2, 6, &out).err().unwrap().to_string();
        assert!(err.contains("out ("), "{err}");
    }

    #[test]
    fn swiglu_backward_ref_matches_finite_differences() {
        for (rows, ff, scale) in [(3, 37, 3.0f32), (1, 1, 1.0), (2, 5, 12.0)] {
            let gu: Vec<f64> = to_f64(&random_vec(rows * 2 * ff, 5)).iter().map(|v| v * scale as f64).collect();
            let d_act = to_f64(&random_vec(rows * ff, 6));
            let loss = |gu: &[f64]| swiglu_f64(gu, ff).iter().zip(&d_act).map(|(a, d)| a * d).sum::<f64>();
            let num = central_differences(&gu, 1e-5, loss);
            assert_close_f64(&swiglu_backward_ref(&gu, &d_act, ff), &num, 1e-7, &format!("d_gate_up [{rows}, {ff}] scale {scale}"));
        }
    }

    fn check_backward(rows: usize, ff: usize, scale: f32, seed: u64) {
        let ctx = test_context();
        let gu: Vec<f32> = random_vec(rows * 2 * ff, seed).iter().map(|v| v * scale).collect();
        let d_act = random_vec(rows * ff, seed + 1);
        let g = GpuTensor::from_f32(&ctx, "gate_up", &[rows, 2 * ff], &gu).unwrap();
        let gd = GpuTensor::from_f32(&ctx, "d_act", &[rows, ff], &d_act).unwrap();
        let out = GpuTensor::from_f32(&ctx, "d_gate_up", &[rows, 2 * ff], &vec![f32::NAN; rows * 2 * ff]).unwrap();
        let d = swiglu_backward(&ctx, "swiglu.bwd", &g, &gd, rows, ff, &out).unwrap();
        ctx.run("test", &[&d]).unwrap();
        let want: Vec<f32> = swiglu_backward_ref(&to_f64(&gu), &to_f64(&d_act), ff).iter().map(|&v| v as f32).collect();
        assert_close(&out.read_f32(&ctx).unwrap(), &want, 1e-6, 1e-5, &format!("swiglu backward [{rows}, {ff}] scale {scale}"));
    }

    #[test]
    fn swiglu_backward_matches_reference() {
        for (i, (rows, ff)) in [(3, 37), (1, 1), (7, 257), (257, 7), (33, 1536)].into_iter().enumerate() {
            check_backward(rows, ff, 4.0, 50 + i as u64);
        }
        // Large |g|: the stable sigmoid keeps the gradient finite (silu'(g) -> 1 or 0).
        check_backward(5, 333, 200.0, 60);
    }

    #[test]
    fn swiglu_backward_rejects_bad_operands() {
        let ctx = test_context();
        let g = GpuTensor::zeros(&ctx, "gate_up", DType::F32, &[2, 10]).unwrap();
        let d_act = GpuTensor::zeros(&ctx, "d_act", DType::F32, &[2, 5]).unwrap();
        let out = GpuTensor::zeros(&ctx, "d_gate_up", DType::F32, &[2, 10]).unwrap();
        assert!(swiglu_backward(&ctx, "s.bwd", &g, &d_act, 2, 5, &out).is_ok());
        for (rows, ff, what) in [(0, 5, "rows"), (2, 0, "ff"), (2, 6, "gate_up ("), (3, 5, "gate_up (")] {
            let err = swiglu_backward(&ctx, "s.bwd", &g, &d_act, rows, ff, &out).err().unwrap().to_string();
            assert!(err.contains("s.bwd: ") && err.contains(what), "{err}");
        }
        let err = swiglu_backward(&ctx, "s.bwd", &g, &g, 2, 5, &d_act).err().unwrap().to_string();
        assert!(err.contains("d_gate_up ("), "{err}");
    }
}
