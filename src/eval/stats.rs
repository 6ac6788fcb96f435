//! Summary statistics of per-example scores: the mean and a bootstrap confidence interval of
//! the mean.
//!
//! Every function takes the values as a slice (one per example, any unit) and returns `None` for
//! an empty slice rather than NaN, so that a configuration with no example cannot print a number.

use rand::{Rng, SeedableRng};

/// The arithmetic mean of `values`; `None` when there is none.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() { None } else { Some(values.iter().sum::<f64>() / values.len() as f64) }
}

/// The 95% percentile-bootstrap interval of the mean of `values`, as `(low, high)` in the unit of
/// the values: `resamples` samples of `values.len()` values drawn with replacement, and the 2.5th
/// and 97.5th percentiles of their means (Efron & Tibshirani, "An Introduction to the Bootstrap",
/// Chapman & Hall 1993, ch. 13, the percentile interval). Percentiles interpolate linearly
/// between the sorted resampled means (position `q (B - 1)`, numpy's default).
///
/// The draws come from `StdRng` seeded with `seed`: the same values, `resamples` and seed give
/// the same interval. `None` when `values` is empty or `resamples` is 0.
pub fn bootstrap_ci(values: &[f64], resamples: usize, seed: u64) -> Option<(f64, f64)> {
    if values.is_empty() || resamples == 0 {
        return None;
    }
    let n = values.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples).map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    Some((percentile(&means, 0.025), percentile(&means, 0.975)))
}

/// The `q`-quantile (`q` in [0, 1]) of the ascending non-empty `sorted`, interpolated linearly
/// between the order statistics around position `q (len - 1)`.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let below = pos.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let frac = pos - below as f64;
    sorted[below] + (sorted[above] - sorted[below]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_values() {
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(mean(&[]), None);
    }

    #[test]
    fn percentile_interpolates_between_order_statistics() {
        let s = [0.0, 10.0, 20.0, 30.0, 40.0];
        assert_eq!(percentile(&s, 0.0), 0.0);
        assert_eq!(percentile(&s, 1.0), 40.0);
        assert_eq!(percentile(&s, 0.5), 20.0);
        assert!((percentile(&s, 0.025) - 1.0).abs() < 1e-12);
        assert!((percentile(&s, 0.975) - 39.0).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 0.975), 7.0);
    }

    #[test]
    fn constant_sample_gives_a_zero_width_interval() {
        assert_eq!(bootstrap_ci(&[0.25; 30], 500, 1), Some((0.25, 0.25)));
    }

    #[test]
    fn interval_contains_the_mean_and_matches_the_normal_width() {
        // 400 values, half 0 and half 1: the standard error of the mean is sqrt(0.25 / 400) =
        // 0.025, so a 95% interval is about 0.5 +- 1.96 * 0.025 = [0.451, 0.549].
        let values: Vec<f64> = (0..400).map(|i| (i % 2) as f64).collect();
        let (lo, hi) = bootstrap_ci(&values, 2000, 7).unwrap();
        assert!(lo < 0.5 && 0.5 < hi, "[{lo}, {hi}]");
        assert!((hi - lo - 2.0 * 1.96 * 0.025).abs() < 0.01, "[{lo}, {hi}]");
    }

    #[test]
    fn interval_narrows_with_more_data() {
        let pattern = [0.1, 0.9, 0.3, 0.6, 0.2, 0.8, 0.45, 0.55];
        let width = |n: usize| {
            let values: Vec<f64> = pattern.iter().copied().cycle().take(n).collect();
            let (lo, hi) = bootstrap_ci(&values, 1000, 3).unwrap();
            hi - lo
        };
        let (small, large) = (width(16), width(1600));
        assert!(large < small / 5.0, "16 values: {small}, 1600 values: {large}");
    }

    #[test]
    fn seed_decides_the_draws() {
        let values = [0.1, 0.4, 0.35, 0.8, 0.05, 0.6, 0.2];
        assert_eq!(bootstrap_ci(&values, 300, 42), bootstrap_ci(&values, 300, 42));
        assert_ne!(bootstrap_ci(&values, 300, 42), bootstrap_ci(&values, 300, 43));
    }

    #[test]
    fn empty_input_or_no_resample_has_no_interval() {
        assert_eq!(bootstrap_ci(&[], 1000, 0), None);
        assert_eq!(bootstrap_ci(&[1.0, 2.0], 0, 0), None);
    }
}
