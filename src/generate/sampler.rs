//! The CPU sampler: one token id from the GPU's top-k candidates, with temperature, top-k, top-p
//! (nucleus) and a seeded RNG.
//!
//! **Sampling considers at most the 256 most likely tokens**
//! ([`crate::runtime::session::MAX_CANDIDATES`]): the session reads back
//! `k = min(top_k or 256, 256)` candidates per token (see [`SamplerConfig::candidates`]), so the
//! tail of the distribution beyond them is never drawn. The candidates come from
//! [`kernels::sample::top_k`](crate::kernels::sample::top_k) (or `argmax` when greedy).

use rand::{Rng, SeedableRng};

use crate::runtime::session::MAX_CANDIDATES;

/// How to pick the next token: softmax of `logit / temperature` over the first `top_k`
/// candidates, cut to the nucleus of mass `top_p` (Holtzman et al. 2019, "The Curious Case of
/// Neural Text Degeneration"), drawn with a seeded RNG. The same filters, in the same order, as
/// Hugging Face `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature, dimensionless; 0 (or less, or not finite) is greedy: the first
    /// candidate. [`SamplerConfig::validate`] allows finite values >= 0.
    pub temperature: f32,
    /// Candidates kept, best first (0: all that are given; the session gives at most
    /// [`MAX_CANDIDATES`] = 256). [`SamplerConfig::validate`] allows 0..=256.
    pub top_k: usize,
    /// Nucleus: keep the smallest prefix of candidates whose probability mass is >= `top_p`
    /// (1 keeps all, 0 keeps only the first). [`SamplerConfig::validate`] allows 0..=1.
    pub top_p: f32,
    /// Seed of the RNG (`StdRng`): the same seed and candidates give the same tokens.
    pub seed: u64,
}

/// A [`SamplerConfig`] field outside its allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sampler: {field} = {value} is outside the allowed range {allowed}")]
pub struct SamplerError {
    /// The field: `temperature`, `top_k` or `top_p`.
    pub field: &'static str,
    /// The value given, as text.
    pub value: String,
    /// The allowed range, e.g. `0..=1`.
    pub allowed: &'static str,
}

impl SamplerConfig {
    /// Greedy decoding: always the highest-logit candidate (temperature 0, top-k 1, top-p 1,
    /// seed 0), as transformers' `generate(do_sample=False)`.
    pub fn greedy() -> SamplerConfig {
        SamplerConfig { temperature: 0.0, top_k: 1, top_p: 1.0, seed: 0 }
    }

    /// Check every field: `temperature` finite and >= 0, `top_k` in 0..=256
    /// ([`MAX_CANDIDATES`]), `top_p` in 0..=1. The error names the first bad field and its
    /// allowed range. [`Sampler::pick`] accepts any value (it treats a bad temperature as greedy
    /// and clamps the others); this is for callers that must refuse bad requests.
    pub fn validate(&self) -> Result<(), SamplerError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplerError { field: "temperature", value: self.temperature.to_string(), allowed: "finite, >= 0" });
        }
        if self.top_k > MAX_CANDIDATES {
            return Err(SamplerError { field: "top_k", value: self.top_k.to_string(), allowed: "0..=256 (0: no limit)" });
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(SamplerError { field: "top_p", value: self.top_p.to_string(), allowed: "0..=1" });
        }
        Ok(())
    }

    /// Candidates a session must read back per token for this config
    /// ([`SessionOptions::candidates`](crate::runtime::SessionOptions::candidates)): 1 when
    /// greedy (temperature <= 0 or not finite), else `min(top_k or 256, 256)`.
    pub fn candidates(&self) -> usize {
        let greedy = self.temperature.is_nan() || self.temperature <= 0.0 || self.temperature.is_infinite();
        if greedy {
            1
        } else if self.top_k == 0 {
            MAX_CANDIDATES
        } else {
            self.top_k.min(MAX_CANDIDATES)
        }
    }
}

/// Picks tokens from top-k candidates with a seeded RNG: the same seed and candidates give the
/// same sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// The configuration it samples with.
    pub cfg: SamplerConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// A sampler whose RNG starts from `cfg.seed`.
    pub fn new(cfg: SamplerConfig) -> Sampler {
        Sampler { cfg, rng: rand::rngs::StdRng::seed_from_u64(cfg.seed) }
    }

    /// Pick a token id from `candidates` (`(id, logit)`, sorted by logit descending, as
    /// [`top_k`](crate::kernels::sample::top_k) returns them). Empty candidates give token 0.
    pub fn pick(&mut self, candidates: &[(u32, f32)]) -> u32 {
        let Some(&(first, top)) = candidates.first() else { return 0 };
        let t = self.cfg.temperature;
        if !t.is_finite() || t <= 0.0 || !top.is_finite() {
            return first;
        }
        let cands = if self.cfg.top_k > 0 { &candidates[..self.cfg.top_k.min(candidates.len())] } else { candidates };
        // Softmax over logit / T, relative to the largest (the first).
        let max = top as f64 / t as f64;
        let weights: Vec<f64> = cands.iter().map(|&(_, l)| if l.is_nan() { 0.0 } else { (l as f64 / t as f64 - max).exp() }).collect();
        let total: f64 = weights.iter().sum();
        // Nucleus: the smallest prefix with mass >= top_p (at least one candidate).
        let keep = if self.cfg.top_p >= 1.0 {
            cands.len()
        } else {
            let target = self.cfg.top_p.max(0.0) as f64 * total;
            let mut mass = 0.0;
            let mut keep = cands.len();
            for (i, w) in weights.iter().enumerate() {
                mass += w;
                if mass >= target {
                    keep = i + 1;
                    break;
                }
            }
            keep
        };
        let kept_mass: f64 = weights[..keep].iter().sum();
        let mut u = self.rng.random::<f64>() * kept_mass;
        for (i, w) in weights[..keep].iter().enumerate() {
            if u < *w {
                return cands[i].0;
            }
            u -= w;
        }
        cands[keep - 1].0 // rounding: u landed at the very end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_p: f32, seed: u64) -> SamplerConfig {
        SamplerConfig { temperature, top_k: 0, top_p, seed }
    }

    const CANDS: [(u32, f32); 4] = [(42, 3.0), (7, 2.5), (1000, 1.0), (5, -1.0)];

    #[test]
    fn sampler_temperature_zero_is_greedy() {
        let mut s = Sampler::new(cfg(0.0, 1.0, 1));
        assert!((0..100).all(|_| s.pick(&CANDS) == 42));
        assert_eq!(s.pick(&[]), 0);
        let mut g = Sampler::new(SamplerConfig::greedy());
        assert!((0..100).all(|_| g.pick(&CANDS) == 42));
    }

    #[test]
    fn sampler_is_repeatable_for_a_seed() {
        let draw = |seed| {
            let mut s = Sampler::new(cfg(1.5, 0.95, seed));
            (0..200).map(|_| s.pick(&CANDS)).collect::<Vec<_>>()
        };
        let a = draw(1234);
        assert_eq!(a, draw(1234));
        assert_ne!(a, draw(1235));
        assert!(a.iter().any(|&t| t != 42), "a hot sampler picks more than the first");
    }

    #[test]
    fn sampler_top_p_zero_keeps_only_the_first() {
        let mut s = Sampler::new(cfg(5.0, 0.0, 3));
        assert!((0..500).all(|_| s.pick(&CANDS) == 42));
    }

    #[test]
    fn sampler_top_p_and_top_k_cut_the_tail() {
        // p ~ [0.55, 0.33, 0.07, 0.004] at T = 1: top_p 0.8 keeps the first two.
        let mut s = Sampler::new(cfg(1.0, 0.8, 9));
        let picks: Vec<u32> = (0..2000).map(|_| s.pick(&CANDS)).collect();
        assert!(picks.iter().all(|t| [42, 7].contains(t)));
        assert!(picks.contains(&7));
        let mut s = Sampler::new(SamplerConfig { top_k: 1, ..cfg(2.0, 1.0, 9) });
        assert!((0..500).all(|_| s.pick(&CANDS) == 42));
    }

    #[test]
    fn sampler_frequencies_follow_the_softmax() {
        let cands = [(10u32, 1.2f32), (20, 0.5), (30, -0.3)];
        for t in [1.0f32, 0.7] {
            let z: Vec<f64> = cands.iter().map(|c| (c.1 as f64 / t as f64).exp()).collect();
            let sum: f64 = z.iter().sum();
            let mut s = Sampler::new(cfg(t, 1.0, 2024));
            let draws = 20_000;
            let mut counts = [0usize; 3];
            for _ in 0..draws {
                let id = s.pick(&cands);
                counts[cands.iter().position(|c| c.0 == id).unwrap()] += 1;
            }
            for i in 0..3 {
                let freq = counts[i] as f64 / draws as f64;
                let p = z[i] / sum;
                assert!((freq - p).abs() < 0.02, "T={t} candidate {i}: frequency {freq}, softmax {p}");
            }
        }
    }

    #[test]
    fn validate_names_the_field_and_its_range() {
        assert_eq!(SamplerConfig::greedy().validate(), Ok(()));
        assert_eq!(cfg(0.8, 0.95, 1).validate(), Ok(()));
        let err = cfg(-0.1, 1.0, 0).validate().unwrap_err();
        assert_eq!((err.field, err.allowed), ("temperature", "finite, >= 0"));
        assert_eq!(cfg(f32::NAN, 1.0, 0).validate().unwrap_err().field, "temperature");
        assert_eq!(cfg(f32::INFINITY, 1.0, 0).validate().unwrap_err().field, "temperature");
        let err = cfg(1.0, 1.5, 0).validate().unwrap_err();
        assert_eq!(err.field, "top_p");
        assert!(err.to_string().contains("top_p = 1.5") && err.to_string().contains("0..=1"), "{err}");
        assert_eq!(cfg(1.0, f32::NAN, 0).validate().unwrap_err().field, "top_p");
        let err = SamplerConfig { top_k: 257, ..cfg(1.0, 1.0, 0) }.validate().unwrap_err();
        assert_eq!(err.field, "top_k");
        assert!(SamplerConfig { top_k: 256, ..cfg(1.0, 1.0, 0) }.validate().is_ok());
    }

    #[test]
    fn candidates_read_back_per_token() {
        assert_eq!(SamplerConfig::greedy().candidates(), 1);
        assert_eq!(cfg(0.0, 1.0, 0).candidates(), 1);
        assert_eq!(cfg(f32::NAN, 1.0, 0).candidates(), 1);
        assert_eq!(cfg(0.7, 1.0, 0).candidates(), MAX_CANDIDATES, "top_k 0: all the session gives");
        assert_eq!(SamplerConfig { top_k: 40, ..cfg(0.7, 1.0, 0) }.candidates(), 40);
        assert_eq!(SamplerConfig { top_k: 1000, ..cfg(0.7, 1.0, 0) }.candidates(), MAX_CANDIDATES);
    }
}
