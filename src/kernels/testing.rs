//! Test support shared by the kernel tests (and, through `firstrt::kernels::testing`, by the
//! integration tests): seeded random data, the weight kinds an adapter can read, and tolerance
//! checks. Hidden from the docs: not part of the library's API.

use rand::{Rng, SeedableRng};

use crate::gpu::{GpuContext, WeightKind};

/// `n` values uniform in [-1, 1) from a fixed seed.
pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Round every value through f16, so that a CPU reference sees what an f16 kernel reads.
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Every weight kind the kernels can read on `ctx`: f32 and packed f16 always, native f16 where
/// the adapter has SHADER_F16, the wide kinds where it has SHADER_INT64.
pub fn weight_kinds(ctx: &GpuContext) -> Vec<WeightKind> {
    let mut kinds = vec![WeightKind::F32, WeightKind::F16Packed];
    if ctx.has_f16() {
        kinds.push(WeightKind::F16);
    }
    if ctx.has_int64() {
        kinds.extend([WeightKind::F32Wide, WeightKind::F16Wide]);
    }
    kinds
}

/// Largest |got - want| over the slices. Equal values (equal infinities included) differ by 0; a
/// NaN on either side counts as an infinite difference, so that a tolerance check cannot pass on
/// NaN. Panics when the lengths differ.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "max_abs_diff: length {} vs {}", got.len(), want.len());
    let diff = |(a, b): (&f32, &f32)| if a == b { 0.0 } else { (a - b).abs() };
    got.iter().zip(want).map(diff).map(|d| if d.is_nan() { f32::INFINITY } else { d }).fold(0.0, f32::max)
}

/// Panics naming the first element where |got - want| > atol + rtol * |want|, or where one
/// side is finite and the other is not; `what` names the check in the message.
pub fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * b.abs();
        assert!(
            (a - b).abs() <= tol && a.is_finite() == b.is_finite(),
            "{what}: element {i}: got {a}, want {b} (|diff| {} > tol {tol}); max abs diff {}",
            (a - b).abs(),
            max_abs_diff(got, want)
        );
    }
}

/// A `[rows, cols]` matrix of `ty` blocks with random quants from a fixed seed and scales that
/// keep the values near [-1, 1] (the f16 scale fields are set, not random, so that no block is
/// NaN or infinite). `cols` must be a multiple of the block size.
pub fn random_blocks(ty: crate::model::QuantType, rows: usize, cols: usize, seed: u64) -> crate::model::HostBlocks {
    use crate::model::QuantType;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let blocks = rows * cols / be;
    let mut data: Vec<u8> = (0..blocks * bb).map(|_| rng.random()).collect();
    let put = |block: &mut [u8], at: usize, v: f32| block[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    for block in data.chunks_exact_mut(bb) {
        let d = rng.random_range(0.5f32..1.5);
        match ty {
            QuantType::Q8_0 => put(block, 0, d / 127.0),
            QuantType::Q4_0 => put(block, 0, d / 8.0),
            QuantType::Q4_1 => {
                put(block, 0, d / 8.0);
                put(block, 2, -d * rng.random_range(0.5f32..1.0));
            }
            QuantType::Q4_K => {
                put(block, 0, d / 8.0 / 63.0);
                put(block, 2, d / 63.0);
            }
            QuantType::Q6_K => put(block, 208, d / 32.0 / 127.0),
        }
    }
    crate::model::HostBlocks::new("random", rows, cols, ty, data).expect("whole blocks")
}

/// Central finite differences of a scalar function of `x`: element i is
/// `(f(x + h e_i) - f(x - h e_i)) / 2h` with `h = rel_step * max(|x_i|, 1)` (error O(h^2) for a
/// smooth `f`). The reference the backward kernels' CPU gradients are tested against.
pub fn central_differences(x: &[f64], rel_step: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = rel_step * x[i].abs().max(1.0);
            probe[i] = x[i] + h;
            let up = f(&probe);
            probe[i] = x[i] - h;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Panics naming the first element where |got - want| > tol * max(1, |want|) (or either side is
/// not finite); `what` names the check in the message.
pub fn assert_close_f64(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(a.is_finite() && b.is_finite() && (a - b).abs() <= tol * b.abs().max(1.0), "{what}: element {i}: got {a}, want {b}");
    }
}

/// `values` widened to f64.
pub fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}
