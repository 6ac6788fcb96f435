//! SwiGLU activation of the fused gate/up projection: `out[t, j] = silu(gate[t, j]) * up[t, j]`
//! where `gate_up[t, :] = [gate (ff) | up (ff)]` and `silu(x) = x * sigmoid(x)`.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, check_u32};

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

/// `out` (`[rows, ff]` f32) = silu(gate) * up, with `gate_up` `[rows, 2 * ff]` f32 holding the
/// gate in columns `0..ff` and the up projection in `ff..2 * ff` (Shazeer 2020, as Hugging Face's
/// `LlamaMLP` with `hidden_act = "silu"`).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when gate_up or out is not f32 or too small, or
/// `2 * rows * ff` does not fit in u32.
pub fn swiglu(ctx: &GpuContext, label: &str, gate_up: &GpuTensor, rows: usize, ff: usize, out: &GpuTensor) -> Result<Dispatch, GpuError> {
    let n = rows * ff;
    check_f32(label, gate_up, 2 * n, "gate_up")?;
    check_f32(label, out, n, "out")?;
    check_u32(label, 2 * n, "gate_up elements")?;
    let pipeline = ctx.pipeline(&ShaderVariant::new("swiglu", SOURCE, "swiglu"))?;
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
    use crate::kernels::testing::{assert_close, random_vec};

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
    fn swiglu_rejects_short_buffers() {
        let ctx = test_context();
        let g = GpuTensor::zeros(&ctx, "gate_up", DType::F32, &[2, 10]).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[2, 5]).unwrap();
        assert!(swiglu(&ctx, "swiglu", &g, 2, 6, &out).is_err());
    }
}
