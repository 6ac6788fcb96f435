//! Test support shared by the kernel tests: seeded random data and tolerance checks.

use rand::{Rng, SeedableRng};

/// `n` values uniform in [-1, 1) from a fixed seed.
pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Round every value through f16, so that a CPU reference sees what an f16 kernel reads.
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Largest |got - want| over the slices.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// Panics naming the first element where |got - want| > atol + rtol * |want|.
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
