//! Which layers run: turning router probabilities into run/skip decisions.
//!
//! Definitions, for a model of `n` layers and a [`PlanPolicy`]:
//! - A layer is *protected* when it is layer 0 or layer `n - 1` and `skip_first_last` is false.
//! - A layer is *skippable* when it has a router, its probability `p` is a number (not NaN) and
//!   it is not protected. Every other layer runs.
//! - tau = `policy.threshold`. Without a budget a skippable layer is skipped iff `p < tau`
//!   (it runs iff `p >= tau`).
//!
//! # All probabilities known: [`decide_plan`]
//! Sort the skippable layers by `p` ascending (ties: lower layer index first). Let `below` be
//! how many have `p < tau` (they are the first `below` in that order). The number of skipped
//! layers is `k = min(max(below, min_skip), max_skip, skippable)` (a missing bound does not
//! apply), and the first `k` layers in that order are skipped. So `--max-skip N` keeps
//! skipping the `N` lowest-p layers among those below tau and runs the rest, `--min-skip N`
//! skips the `N` lowest-p skippable layers even when some are at or above tau, and when
//! `min_skip > max_skip` the maximum wins ([`PlanPolicy::validate`] rejects that combination).
//!
//! # Layer by layer during prefill: [`PlanDecider`]
//! Layer `l`'s router reads the hidden states after layer `l - 1`, which depend on the earlier
//! decisions, so prefill decides each layer as its probability arrives, in layer order.
//! [`PlanDecider::decide`] skips layer `l` iff it is skippable and
//! 1. fewer than `max_skip` layers have been skipped so far (no bound: always true), and
//! 2. `p < tau`, **or** the skips still needed for `min_skip`
//!    (`min_skip - skipped_so_far`) are at least the number of layers from `l` to `n - 1`
//!    (inclusive) that have a router and are not protected — i.e. skipping this layer is the
//!    only way left to reach the minimum.
//!
//! Without a budget this gives exactly [`decide_plan`]'s result for the same probabilities.
//! With a budget it is greedy in layer order: `--max-skip N` skips the *first* `N` layers that
//! fall below tau (not the `N` lowest), and then every later layer runs; `--min-skip N` skips
//! every layer below tau and, when too few layers have fallen below tau, the *last* skippable
//! layers regardless of `p` (not the lowest-p ones, which are unknown until the end). The
//! minimum is guaranteed unless a router yields NaN or fewer than `N` layers are skippable.
//! A runtime that wants the lowest-p semantics exactly can run a first pass with every layer,
//! collect the probabilities and call [`decide_plan`].

use crate::model::routers::RouterFile;

/// How router probabilities become a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanPolicy {
    /// tau: a skippable layer runs iff `p >= threshold`, before budgets.
    pub threshold: f32,
    /// Skip at most this many layers.
    pub max_skip: Option<usize>,
    /// Skip at least this many layers (as far as there are skippable layers).
    pub min_skip: Option<usize>,
    /// Whether layer 0 and the last layer may be skipped.
    pub skip_first_last: bool,
}

/// A layer plan or router policy that does not fit the model, or a decider used wrongly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// tau outside [0, 1] (or NaN).
    #[error("threshold {0} must be a number in [0, 1]")]
    Threshold(f32),
    /// `min_skip > max_skip`.
    #[error("--min-skip {min} is more than --max-skip {max}")]
    MinAboveMax {
        /// `--min-skip`.
        min: usize,
        /// `--max-skip`.
        max: usize,
    },
    /// [`PlanDecider::decide`] called out of layer order.
    #[error("layer {got} decided out of order: layer {expected} is next")]
    OutOfOrder {
        /// The next layer to decide.
        expected: usize,
        /// The layer given.
        got: usize,
    },
    /// A layer index (to skip, or to decide) past the model's last layer.
    #[error("layer {layer} does not exist: the model has {n_layers} layers (0..{})", n_layers.saturating_sub(1))]
    LayerOutOfRange {
        /// The layer given (0-based).
        layer: usize,
        /// Layers in the model.
        n_layers: usize,
    },
    /// [`PlanDecider::finish`] before every layer was decided.
    #[error("plan unfinished: {decided} of {n_layers} layers decided")]
    Unfinished {
        /// Layers decided so far.
        decided: usize,
        /// Layers in the model.
        n_layers: usize,
    },
    /// A [`super::LayerPlan`] for a different number of layers than the model's.
    #[error("plan has {plan} layers, the model {model}")]
    PlanLength {
        /// Layers in the plan.
        plan: usize,
        /// Layers in the model.
        model: usize,
    },
    /// Uploaded routers for a different number of layers than the model's.
    #[error("routers for {routers} layers, the model has {model}")]
    RouterCount {
        /// Router slots.
        routers: usize,
        /// Layers in the model.
        model: usize,
    },
    /// A static plan asked to skip more layers than may be skipped (`--skip N`).
    #[error(
        "--skip {skip} is more than the {skippable} layers that may be skipped (the model has {n_layers}{})",
        if *skip_first_last { "" } else { "; the first and last layer are kept unless --skip-first-last" }
    )]
    TooManySkips {
        /// Layers asked to skip.
        skip: usize,
        /// Layers that may be skipped.
        skippable: usize,
        /// Layers in the model.
        n_layers: usize,
        /// Whether layer 0 and the last layer may be skipped.
        skip_first_last: bool,
    },
}

/// The layers a static plan may skip: every layer, or all but layer 0 and the last one unless
/// `skip_first_last`.
pub fn skippable_layers(n_layers: usize, skip_first_last: bool) -> std::ops::Range<usize> {
    if skip_first_last { 0..n_layers } else { 1..n_layers.saturating_sub(1).max(1) }
}

/// `skip` layers fit among the [`skippable_layers`] of a model of `n_layers`.
/// Errors: [`PlanError::TooManySkips`] naming `--skip`, the count and the limit.
pub fn check_skip_count(n_layers: usize, skip: usize, skip_first_last: bool) -> Result<(), PlanError> {
    let skippable = skippable_layers(n_layers, skip_first_last).len();
    if skip > skippable {
        return Err(PlanError::TooManySkips { skip, skippable, n_layers, skip_first_last });
    }
    Ok(())
}

impl PlanPolicy {
    /// The router file's threshold and first/last rule, without budgets.
    pub fn from_routers(routers: &RouterFile) -> PlanPolicy {
        PlanPolicy { threshold: routers.threshold, max_skip: None, min_skip: None, skip_first_last: routers.skip_first_last }
    }

    /// Threshold in [0, 1] and, when both are given, `min_skip <= max_skip`.
    /// Errors: `PlanError::Threshold`, `PlanError::MinAboveMax`.
    pub fn validate(&self) -> Result<(), PlanError> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(PlanError::Threshold(self.threshold));
        }
        if let (Some(min), Some(max)) = (self.min_skip, self.max_skip)
            && min > max
        {
            return Err(PlanError::MinAboveMax { min, max });
        }
        Ok(())
    }

    /// Layer 0 and the last layer are protected unless `skip_first_last`.
    pub fn protected(&self, layer: usize, n_layers: usize) -> bool {
        !self.skip_first_last && (layer == 0 || layer + 1 == n_layers)
    }
}

/// The plan from all probabilities at once (`probs [n_layers]`, `None`: no router); returns
/// `[n_layers]` run flags. See the module documentation for the exact rule.
pub fn decide_plan(probs: &[Option<f32>], policy: &PlanPolicy) -> Vec<bool> {
    let n = probs.len();
    let mut skippable: Vec<(usize, f32)> = probs
        .iter()
        .enumerate()
        .filter_map(|(l, p)| match p {
            Some(p) if !p.is_nan() && !policy.protected(l, n) => Some((l, *p)),
            _ => None,
        })
        .collect();
    skippable.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let below = skippable.iter().filter(|(_, p)| *p < policy.threshold).count();
    let mut k = below.max(policy.min_skip.unwrap_or(0));
    if let Some(max) = policy.max_skip {
        k = k.min(max);
    }
    k = k.min(skippable.len());
    let mut run = vec![true; n];
    for &(l, _) in &skippable[..k] {
        run[l] = false;
    }
    run
}

/// Decides layer by layer as probabilities arrive (see the module documentation).
#[derive(Debug, Clone)]
pub struct PlanDecider {
    policy: PlanPolicy,
    /// `[n_layers]`
    has_router: Vec<bool>,
    /// `[layers decided so far]`
    run: Vec<bool>,
    skipped: usize,
}

impl PlanDecider {
    /// `has_router [n_layers]`: which layers have a router (known before prefill; the
    /// `min_skip` rule counts the skippable layers still ahead).
    pub fn new(has_router: Vec<bool>, policy: PlanPolicy) -> PlanDecider {
        let n = has_router.len();
        PlanDecider { policy, has_router, run: Vec::with_capacity(n), skipped: 0 }
    }

    /// For a router file's layers.
    pub fn for_routers(routers: &RouterFile, policy: PlanPolicy) -> PlanDecider {
        PlanDecider::new(routers.has_router(), policy)
    }

    /// The model's layer count.
    pub fn n_layers(&self) -> usize {
        self.has_router.len()
    }

    /// Layers skipped so far.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Run flags of the layers decided so far.
    pub fn decided(&self) -> &[bool] {
        &self.run
    }

    /// Decides `layer` (which must be the next undecided one) given its router's probability
    /// (`None`: no router); returns whether it runs.
    /// Errors: `PlanError::OutOfOrder`, `PlanError::LayerOutOfRange`.
    pub fn decide(&mut self, layer: usize, p: Option<f32>) -> Result<bool, PlanError> {
        let n = self.n_layers();
        if layer >= n {
            return Err(PlanError::LayerOutOfRange { layer, n_layers: n });
        }
        let next = self.run.len();
        if layer != next {
            return Err(PlanError::OutOfOrder { expected: next, got: layer });
        }
        let policy = &self.policy;
        let skippable = self.has_router[layer] && p.is_some_and(|p| !p.is_nan()) && !policy.protected(layer, n);
        let skip = skippable && {
            let under_max = policy.max_skip.is_none_or(|max| self.skipped < max);
            let below = p.is_some_and(|p| p < policy.threshold);
            let need = policy.min_skip.unwrap_or(0).saturating_sub(self.skipped);
            let ahead = (layer..n).filter(|&l| self.has_router[l] && !policy.protected(l, n)).count();
            under_max && (below || need >= ahead)
        };
        self.skipped += usize::from(skip);
        self.run.push(!skip);
        Ok(!skip)
    }

    /// `[n_layers]` run flags once every layer is decided.
    /// Errors: `PlanError::Unfinished`.
    pub fn finish(self) -> Result<Vec<bool>, PlanError> {
        if self.run.len() != self.n_layers() {
            return Err(PlanError::Unfinished { decided: self.run.len(), n_layers: self.n_layers() });
        }
        Ok(self.run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(threshold: f32, max_skip: Option<usize>, min_skip: Option<usize>, skip_first_last: bool) -> PlanPolicy {
        PlanPolicy { threshold, max_skip, min_skip, skip_first_last }
    }

    fn skipped(run: &[bool]) -> Vec<usize> {
        run.iter().enumerate().filter(|(_, r)| !**r).map(|(l, _)| l).collect()
    }

    fn online(probs: &[Option<f32>], policy: &PlanPolicy) -> Vec<bool> {
        let mut d = PlanDecider::new(probs.iter().map(Option::is_some).collect(), policy.clone());
        for (l, p) in probs.iter().enumerate() {
            d.decide(l, *p).unwrap();
        }
        d.finish().unwrap()
    }

    // p per layer; layer 3 has no router.
    const P: [Option<f32>; 8] = [Some(0.1), Some(0.4), Some(0.9), None, Some(0.2), Some(0.6), Some(0.45), Some(0.05)];

    #[test]
    fn threshold_and_first_last_rule() {
        let p = policy(0.5, None, None, false);
        // 0 and 7 are below tau but protected; 3 has no router; 2 and 5 are >= tau.
        assert_eq!(skipped(&decide_plan(&P, &p)), vec![1, 4, 6]);
        let p = policy(0.5, None, None, true);
        assert_eq!(skipped(&decide_plan(&P, &p)), vec![0, 1, 4, 6, 7]);
        // p == tau runs.
        assert_eq!(skipped(&decide_plan(&[Some(1.0), Some(0.5), Some(1.0)], &policy(0.5, None, None, false))), Vec::<usize>::new());
        // NaN never skips, tau 0 never skips, tau 1 skips every skippable layer below 1.
        assert_eq!(skipped(&decide_plan(&[Some(1.0), Some(f32::NAN), Some(0.0), Some(1.0)], &policy(0.5, None, None, false))), vec![2]);
        assert!(skipped(&decide_plan(&P, &policy(0.0, None, None, true))).is_empty());
        assert_eq!(skipped(&decide_plan(&P, &policy(1.0, None, None, false))), vec![1, 2, 4, 5, 6]);
        // A single layer is first and last.
        assert_eq!(decide_plan(&[Some(0.0)], &policy(0.5, None, None, false)), vec![true]);
        assert_eq!(decide_plan(&[Some(0.0)], &policy(0.5, None, None, true)), vec![false]);
        assert!(decide_plan(&[], &policy(0.5, Some(1), Some(1), true)).is_empty());
    }

    #[test]
    fn max_skip_keeps_the_lowest() {
        // below tau and skippable: 1 (0.4), 4 (0.2), 6 (0.45)
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, Some(2), None, false))), vec![1, 4]);
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, Some(1), None, false))), vec![4]);
        assert!(skipped(&decide_plan(&P, &policy(0.5, Some(0), None, false))).is_empty());
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, Some(10), None, false))), vec![1, 4, 6]);
        // with first/last: 7 (0.05) and 0 (0.1) are the lowest
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, Some(2), None, true))), vec![0, 7]);
        // ties: the lower layer index first
        let ties = [Some(1.0), Some(0.3), Some(0.3), Some(0.3), Some(1.0)];
        assert_eq!(skipped(&decide_plan(&ties, &policy(0.5, Some(2), None, false))), vec![1, 2]);
    }

    #[test]
    fn min_skip_adds_the_lowest_above_tau() {
        // 3 below tau; min 5 adds the lowest at/above tau: 5 (0.6) then 2 (0.9)
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, None, Some(4), false))), vec![1, 4, 5, 6]);
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, None, Some(5), false))), vec![1, 2, 4, 5, 6]);
        // more than skippable: capped, no router and protected layers still run
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, None, Some(8), false))), vec![1, 2, 4, 5, 6]);
        // fewer than below: no effect
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, None, Some(1), false))), vec![1, 4, 6]);
        // both: max wins
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, Some(2), Some(4), false))), vec![1, 4]);
        assert_eq!(skipped(&decide_plan(&P, &policy(0.5, Some(4), Some(4), false))), vec![1, 4, 5, 6]);
    }

    #[test]
    fn policy_validation() {
        assert!(policy(0.5, Some(3), Some(3), false).validate().is_ok());
        assert_eq!(policy(0.5, Some(2), Some(3), false).validate(), Err(PlanError::MinAboveMax { min: 3, max: 2 }));
        assert!(policy(f32::NAN, None, None, false).validate().is_err());
        assert!(policy(1.5, None, None, false).validate().is_err());
        assert!(policy(-0.1, None, None, false).validate().is_err());
    }

    #[test]
    fn decider_without_budget_equals_decide_plan() {
        // A deterministic sweep of probability patterns, with and without routers.
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f32 / (1u64 << 31) as f32
        };
        for case in 0..200 {
            let n = 1 + case % 9;
            let probs: Vec<Option<f32>> = (0..n)
                .map(|_| {
                    let v = next();
                    (v > 0.15).then(&mut next)
                })
                .collect();
            for sfl in [false, true] {
                let p = policy(0.5, None, None, sfl);
                assert_eq!(online(&probs, &p), decide_plan(&probs, &p), "{probs:?} skip_first_last={sfl}");
            }
        }
    }

    #[test]
    fn decider_max_skip_takes_the_first_below_tau() {
        // below tau in layer order: 1, 4, 6 — the online form keeps the first two.
        assert_eq!(skipped(&online(&P, &policy(0.5, Some(2), None, false))), vec![1, 4]);
        let p = [Some(1.0), Some(0.45), Some(0.1), Some(0.2), Some(1.0)];
        assert_eq!(skipped(&online(&p, &policy(0.5, Some(1), None, false))), vec![1]);
        assert_eq!(skipped(&decide_plan(&p, &policy(0.5, Some(1), None, false))), vec![2]);
        assert!(skipped(&online(&p, &policy(0.5, Some(0), None, false))).is_empty());
    }

    #[test]
    fn decider_min_skip_forces_the_last_skippable() {
        // skippable: 1, 2, 4, 5, 6 (3 has no router; 0 and 7 protected); below tau: 1, 4, 6.
        // min 3: 1 skips (below tau); at 2: need 2, ahead {2,4,5,6} -> 2 runs; 4 skips; at 5:
        // need 1, ahead {5,6} -> 5 runs; 6 skips. Enough below tau: same as decide_plan.
        assert_eq!(skipped(&online(&P, &policy(0.5, None, Some(3), false))), vec![1, 4, 6]);
        // min 4: 1 skip; at 2: need 3, ahead {2,4,5,6} = 4 -> 2 runs; 4 skip (need 2, ahead
        // {5,6}); at 5: need 2 >= ahead 2 -> forced; 6 below tau.
        assert_eq!(skipped(&online(&P, &policy(0.5, None, Some(4), false))), vec![1, 4, 5, 6]);
        // every layer above tau: the last skippable ones are forced.
        let high = [Some(0.9); 6];
        assert_eq!(skipped(&online(&high, &policy(0.5, None, Some(2), false))), vec![3, 4]);
        assert_eq!(skipped(&online(&high, &policy(0.5, None, Some(2), true))), vec![4, 5]);
        assert_eq!(skipped(&online(&high, &policy(0.5, None, Some(9), false))), vec![1, 2, 3, 4]);
        // with a maximum too
        assert_eq!(skipped(&online(&high, &policy(0.5, Some(1), Some(2), false))), vec![3]);
        // min-skip is met whatever the probabilities (no NaN, enough skippable layers)
        let mut state = 11u64;
        for _ in 0..100 {
            let probs: Vec<Option<f32>> = (0..10)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    Some((state >> 40) as f32 / (1u64 << 24) as f32)
                })
                .collect();
            for min in 0..=8 {
                let run = online(&probs, &policy(0.5, None, Some(min), false));
                let below = probs[1..9].iter().filter(|p| p.unwrap() < 0.5).count();
                assert_eq!(skipped(&run).len(), below.max(min), "{probs:?} min {min}");
                assert!(run[0] && run[9]);
            }
        }
    }

    #[test]
    fn decider_rejects_misuse() {
        let mut d = PlanDecider::new(vec![true, true, true], policy(0.5, None, None, false));
        assert_eq!(d.decide(1, Some(0.1)), Err(PlanError::OutOfOrder { expected: 0, got: 1 }));
        assert_eq!(d.decide(3, Some(0.1)), Err(PlanError::LayerOutOfRange { layer: 3, n_layers: 3 }));
        assert_eq!(d.decide(0, Some(0.1)), Ok(true));
        assert_eq!(d.decide(0, Some(0.1)), Err(PlanError::OutOfOrder { expected: 1, got: 0 }));
        assert_eq!(d.decide(1, Some(0.1)), Ok(false));
        assert_eq!(d.decided(), &[true, false]);
        assert_eq!(d.skipped(), 1);
        assert_eq!(d.clone().finish(), Err(PlanError::Unfinished { decided: 2, n_layers: 3 }));
        assert_eq!(d.decide(2, Some(0.1)), Ok(true));
        assert_eq!(d.finish(), Ok(vec![true, false, true]));
        // a probability for a layer the file says has no router is ignored: the layer runs
        let mut d = PlanDecider::new(vec![true, false, true], policy(0.5, None, None, true));
        assert_eq!(d.decide(0, None), Ok(true));
        assert_eq!(d.decide(1, Some(0.0)), Ok(true));
    }
}
