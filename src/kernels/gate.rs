//! FiRST's gated layer output (issue 13): with `h` a routed layer's input `[T, d]`, `y` its full
//! output (residual included) and a gate `g` in [0, 1] known on the CPU (hard: 0 or 1; soft: the
//! router's probability p), the layer's output during training is
//!
//! ```text
//! mix = h + g (y - h)
//! ```
//!
//! and its backward, from `dmix = dL/dmix`, with the straight-through estimator for the gate
//! (`dL/dp := dL/dg`, also for a hard gate; FiRST, arXiv 2410.12513, and Bengio et al. 2013 for
//! the estimator):
//!
//! ```text
//! dL/dp = Σ_i dmix[i] (y[i] - h[i])     (added to dp[slot])
//! dy    = g dmix                         (overwritten)
//! dh    = (1 - g) dmix                   (in place over dmix: the residual path's share)
//! ```
//!
//! The sum runs in a fixed order (per-workgroup partial sums in a scratch buffer, then one
//! workgroup adds them with lane strides and a tree; no atomics), so it repeats bit for bit.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor};
use crate::kernels::checks::{check_f32, check_u32, invalid};

const SOURCE: &str = include_str!("../../shaders/gate.wgsl");

/// Invocations per workgroup of every entry point.
const LANES: usize = 256;
/// Elements per invocation aimed at by the backward's grid-stride loop.
const PER_LANE: usize = 16;
/// Most workgroups (partial sums) of the backward.
const MAX_GROUPS: usize = 1024;

/// Uniform of `shaders/gate.wgsl` (`struct GateParams` there, same fields in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GateParams {
    /// Elements n.
    pub n: u32,
    /// The gate g.
    pub g: f32,
    /// Workgroups of the backward's first dispatch (partial sums); 0 for the forward.
    pub groups: u32,
    /// The element of dp the backward adds to; 0 for the forward.
    pub slot: u32,
}

/// Checks shared by the forward and the backward: at least one element, g in [0, 1].
fn check_gate(label: &str, n: usize, g: f32) -> Result<(), GpuError> {
    if n == 0 {
        return Err(invalid(label, "n must be at least 1"));
    }
    if !(0.0..=1.0).contains(&g) {
        return Err(invalid(label, format!("the gate g must be in [0, 1], got {g}")));
    }
    Ok(())
}

/// Prepares the mix `y[i] = h[i] + g (y[i] - h[i])` for the first `n` elements, in place on `y`
/// (a routed layer's output, `[T, d]` f32, becomes the gated output); `h` is the layer's input,
/// f32 with at least `n` elements. One dispatch `label`, one invocation per element.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when n is 0 or does not fit in u32, g is not in
/// [0, 1], or h or y is not f32 or has fewer than n elements.
pub fn gate_mix(ctx: &GpuContext, label: &str, h: &GpuTensor, y: &GpuTensor, n: usize, g: f32) -> Result<Dispatch, GpuError> {
    check_gate(label, n, g)?;
    check_u32(label, n, "n")?;
    check_f32(label, h, n, "h")?;
    check_f32(label, y, n, "y")?;
    let pipeline = ctx.pipeline(&super::snippet_variant("gate", SOURCE, "gate_mix"))?;
    let u = uniform(ctx, label, &GateParams { n: n as u32, g, groups: 0, slot: 0 });
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[u.as_entire_binding(), h.buffer.as_entire_binding(), y.buffer.as_entire_binding()],
        grid((n as u32).div_ceil(LANES as u32)),
        Cost { flops: 3 * n as u64, bytes: 12 * n as u64 },
    ))
}

/// The operands of one gate backward (see [`gate_backward`]).
#[derive(Debug, Clone, Copy)]
pub struct GateBackwardOp<'a> {
    /// On entry `dL/dmix` `[n]` f32 (the gradient of the gated output); on return `dL/dh`'s
    /// share through the mix, `(1 - g) dL/dmix`, overwritten in place.
    pub dh: &'a GpuTensor,
    /// The layer's input, `[n]` f32 (as given to [`gate_mix`]).
    pub h: &'a GpuTensor,
    /// The layer's full output before the mix, `[n]` f32 (not the mixed one).
    pub y: &'a GpuTensor,
    /// Elements; at least 1.
    pub n: usize,
    /// The gate g of the forward, in [0, 1].
    pub g: f32,
    /// `g dL/dmix`, `[n]` f32, overwritten: the gradient entering the layer's backward.
    pub dy: &'a GpuTensor,
    /// `[slots]` f32: `dL/dp` is added to `dp[slot]`.
    pub dp: &'a GpuTensor,
    /// The element of `dp` added to (the layer's).
    pub slot: usize,
}

/// Prepares the gate backward (the module's formulas): `{label}.partial` (up to 1024 workgroups
/// of 256: dy and dh elementwise, and each workgroup's sum of `dmix (y - h)` into a scratch
/// buffer the dispatches own) and `{label}.finish` (one workgroup: adds the partial sums in a
/// fixed order to `dp[slot]`). Record them in this order.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when n is 0 or too large for 32-bit indexing,
/// g is not in [0, 1], an operand is not f32 or has fewer than n elements (dp: slot + 1), or
/// slot does not fit in u32; a buffer error for the scratch.
pub fn gate_backward(ctx: &GpuContext, label: &str, op: &GateBackwardOp) -> Result<Vec<Dispatch>, GpuError> {
    let GateBackwardOp { dh, h, y, n, g, dy, dp, slot } = *op;
    check_gate(label, n, g)?;
    let groups = n.div_ceil(LANES * PER_LANE).clamp(1, MAX_GROUPS);
    // The grid-stride loop's index must not wrap past u32::MAX.
    check_u32(label, n.saturating_add(groups * LANES), "n plus one grid stride")?;
    check_u32(label, slot, "slot")?;
    check_f32(label, dh, n, "dh")?;
    check_f32(label, h, n, "h")?;
    check_f32(label, y, n, "y")?;
    check_f32(label, dy, n, "dy")?;
    check_f32(label, dp, slot + 1, "dp")?;
    let params = GateParams { n: n as u32, g, groups: groups as u32, slot: slot as u32 };
    let u = uniform(ctx, label, &params);
    let partial = GpuTensor::zeros(ctx, &format!("{label}.partial"), DType::F32, &[groups])?;
    let first = ctx.pipeline(&super::snippet_variant("gate", SOURCE, "gate_backward"))?;
    let finish = ctx.pipeline(&super::snippet_variant("gate", SOURCE, "gate_finish"))?;
    Ok(vec![
        Dispatch::new(
            ctx,
            &first,
            format!("{label}.partial"),
            &[
                u.as_entire_binding(),
                h.buffer.as_entire_binding(),
                y.buffer.as_entire_binding(),
                dh.buffer.as_entire_binding(),
                dy.buffer.as_entire_binding(),
                partial.buffer.as_entire_binding(),
            ],
            [groups as u32, 1, 1],
            Cost { flops: 5 * n as u64, bytes: (20 * n + 4 * groups) as u64 },
        ),
        Dispatch::new(
            ctx,
            &finish,
            format!("{label}.finish"),
            &[u.as_entire_binding(), partial.buffer.as_entire_binding(), dp.buffer.as_entire_binding()],
            [1, 1, 1],
            Cost { flops: groups as u64, bytes: 4 * (groups + 2) as u64 },
        ),
    ])
}

/// CPU reference of the forward in f64: `h + g (y - h)` elementwise.
pub fn gate_mix_ref(h: &[f64], y: &[f64], g: f64) -> Vec<f64> {
    h.iter().zip(y).map(|(h, y)| h + g * (y - h)).collect()
}

/// CPU reference of the backward in f64 (the module's formulas): `(dL/dp, dy, dh)` from the
/// forward's `h`, `y` and `g` and `dmix = dL/dmix`, all `[n]`.
pub fn gate_backward_ref(h: &[f64], y: &[f64], dmix: &[f64], g: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let dp = dmix.iter().zip(y.iter().zip(h)).map(|(d, (y, h))| d * (y - h)).sum();
    (dp, dmix.iter().map(|d| g * d).collect(), dmix.iter().map(|d| (1.0 - g) * d).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::testing::{assert_close, assert_close_f64, central_differences, random_vec, to_f64};

    /// `L = Σ c ⊙ mix(h, y, g)`: its gradients are the backward's outputs for `dmix = c`.
    fn loss(h: &[f64], y: &[f64], g: f64, c: &[f64]) -> f64 {
        gate_mix_ref(h, y, g).iter().zip(c).map(|(m, c)| m * c).sum()
    }

    #[test]
    fn gate_backward_ref_matches_finite_differences() {
        for (n, g) in [(37, 0.3), (1, 0.0), (5, 1.0), (101, 0.77)] {
            let (h, y, c) = (to_f64(&random_vec(n, 1)), to_f64(&random_vec(n, 2)), to_f64(&random_vec(n, 3)));
            let (dp, dy, dh) = gate_backward_ref(&h, &y, &c, g);
            let num_g = central_differences(&[g], 1e-5, |g| loss(&h, &y, g[0], &c));
            let num_y = central_differences(&y, 1e-5, |y| loss(&h, y, g, &c));
            let num_h = central_differences(&h, 1e-5, |h| loss(h, &y, g, &c));
            assert_close_f64(&[dp], &num_g, 1e-8, &format!("dp n={n} g={g}"));
            assert_close_f64(&dy, &num_y, 1e-8, &format!("dy n={n} g={g}"));
            assert_close_f64(&dh, &num_h, 1e-8, &format!("dh n={n} g={g}"));
        }
    }

    #[test]
    fn gate_mix_matches_reference() {
        let ctx = test_context();
        for (i, (n, g)) in [(37, 0.25f32), (1000, 1.0), (70001, 0.0), (70001, 0.6)].into_iter().enumerate() {
            let (h, y) = (random_vec(n + 3, 10 * i as u64), random_vec(n + 3, 10 * i as u64 + 1));
            let gh = GpuTensor::from_f32(&ctx, "h", &[n + 3], &h).unwrap();
            let gy = GpuTensor::from_f32(&ctx, "y", &[n + 3], &y).unwrap();
            let d = gate_mix(&ctx, "mix", &gh, &gy, n, g).unwrap();
            ctx.run("test", &[&d]).unwrap();
            let mut want: Vec<f32> = gate_mix_ref(&to_f64(&h[..n]), &to_f64(&y[..n]), g as f64).iter().map(|&v| v as f32).collect();
            want.extend_from_slice(&y[n..]); // past n: untouched
            assert_close(&gy.read_f32(&ctx).unwrap(), &want, 1e-6, 1e-6, &format!("mix n={n} g={g}"));
            assert_eq!(gh.read_f32(&ctx).unwrap(), h, "h written");
        }
    }

    #[test]
    fn gate_backward_matches_reference() {
        let ctx = test_context();
        for (i, (n, g)) in [(37, 0.25f32), (1000, 1.0), (70001, 0.0), (70001, 0.6), ((1 << 20) + 3, 0.4)].into_iter().enumerate() {
            let seed = 10 * i as u64;
            let (h, y, dmix) = (random_vec(n, seed), random_vec(n, seed + 1), random_vec(n, seed + 2));
            let dp0 = [0.5f32, -0.25, 2.0];
            let t = |name: &str, v: &[f32]| GpuTensor::from_f32(&ctx, name, &[v.len()], v).unwrap();
            let (gh, gy, gdh, gdp) = (t("h", &h), t("y", &y), t("dh", &dmix), t("dp", &dp0));
            let gdy = t("dy", &random_vec(n, seed + 3)); // overwritten
            let op = GateBackwardOp { dh: &gdh, h: &gh, y: &gy, n, g, dy: &gdy, dp: &gdp, slot: 1 };
            let ds = gate_backward(&ctx, "gate.bwd", &op).unwrap();
            ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
            let (dp, dy, dh) = gate_backward_ref(&to_f64(&h), &to_f64(&y), &to_f64(&dmix), g as f64);
            let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<_>>();
            let what = format!("n={n} g={g}");
            assert_close(&gdy.read_f32(&ctx).unwrap(), &f32s(dy), 1e-7, 1e-6, &format!("dy {what}"));
            assert_close(&gdh.read_f32(&ctx).unwrap(), &f32s(dh), 1e-7, 1e-6, &format!("dh {what}"));
            let got = gdp.read_f32(&ctx).unwrap();
            assert_eq!([got[0], got[2]], [dp0[0], dp0[2]], "other slots written ({what})");
            // f32 summation: error bounded relative to the sum of the terms' magnitudes.
            let scale: f64 = (0..n).map(|i| (dmix[i] as f64 * (y[i] as f64 - h[i] as f64)).abs()).sum();
            let want = dp0[1] as f64 + dp;
            assert!((got[1] as f64 - want).abs() <= 1e-6 * scale + 1e-6, "dp {what}: got {}, want {want}", got[1]);
        }
    }

    #[test]
    fn gate_backward_repeats_bit_for_bit_and_accumulates_dp() {
        let ctx = test_context();
        let n = 300_001;
        let (h, y, dmix) = (random_vec(n, 1), random_vec(n, 2), random_vec(n, 3));
        let t = |name: &str, v: &[f32]| GpuTensor::from_f32(&ctx, name, &[v.len()], v).unwrap();
        let (gh, gy, gdy, gdp) = (t("h", &h), t("y", &y), t("dy", &h), t("dp", &[0.0]));
        let mut sums = Vec::new();
        for _ in 0..3 {
            let gdh = t("dh", &dmix);
            let op = GateBackwardOp { dh: &gdh, h: &gh, y: &gy, n, g: 0.5, dy: &gdy, dp: &gdp, slot: 0 };
            let ds = gate_backward(&ctx, "gate.bwd", &op).unwrap();
            ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
            sums.push(gdp.read_f32(&ctx).unwrap()[0]);
        }
        // dp accumulates: s, 2s, 3s, each step adding the same f32 s.
        let s = sums[0];
        assert!(s != 0.0);
        assert_eq!(sums, vec![s, s + s, s + s + s]);
    }

    #[test]
    fn gate_rejects_bad_operands() {
        let ctx = test_context();
        let z = |n: usize| GpuTensor::zeros(&ctx, "t", DType::F32, &[n]).unwrap();
        let (h, y, dh, dy, dp, small) = (z(10), z(10), z(10), z(10), z(2), z(9));
        let ids = GpuTensor::zeros(&ctx, "ids", DType::U32, &[10]).unwrap();
        assert!(gate_mix(&ctx, "g.mix", &h, &y, 10, 0.5).is_ok());
        for (hh, yy, n, g, what) in [
            (&h, &y, 0, 0.5, "n must"),
            (&h, &y, 10, 1.5, "gate g"),
            (&h, &y, 10, f32::NAN, "gate g"),
            (&small, &y, 10, 0.5, "h ("),
            (&h, &ids, 10, 0.5, "y ("),
        ] {
            let err = gate_mix(&ctx, "g.mix", hh, yy, n, g).err().unwrap().to_string();
            assert!(err.contains("g.mix: ") && err.contains(what), "{err}");
        }
        let op = GateBackwardOp { dh: &dh, h: &h, y: &y, n: 10, g: 1.0, dy: &dy, dp: &dp, slot: 1 };
        assert!(gate_backward(&ctx, "g.bwd", &op).is_ok());
        for (bad, what) in [
            (GateBackwardOp { n: 0, ..op }, "n must"),
            (GateBackwardOp { g: -0.1, ..op }, "gate g"),
            (GateBackwardOp { slot: 2, ..op }, "dp ("),
            (GateBackwardOp { dh: &small, ..op }, "dh ("),
            (GateBackwardOp { dy: &ids, ..op }, "dy ("),
            (GateBackwardOp { n: u32::MAX as usize, ..op }, "32-bit"),
        ] {
            let err = gate_backward(&ctx, "g.bwd", &bad).err().unwrap().to_string();
            assert!(err.contains("g.bwd: ") && err.contains(what), "{err}");
        }
    }
}
