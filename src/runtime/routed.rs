//! FiRST routers on the GPU and the routed prefill: the plan is decided layer by layer while
//! the prompt goes through the model.

use std::sync::Arc;

use crate::gpu::{GpuContext, GpuError, GpuTensor, Phase};
use crate::kernels::router::RouterWeights;
use crate::model::routers::{RouterFile, RouterLayer};

use super::plan::{PlanDecider, PlanPolicy, decide_plan};
use super::session::{Session, StepOutput};
use super::{LayerPlan, RuntimeError};

/// Every layer's router uploaded (None: that layer has no router and always runs).
#[derive(Debug)]
pub struct GpuRouters {
    /// Layer l's router at index l; None where the file has none.
    pub layers: Vec<Option<RouterWeights>>,
}

impl GpuRouters {
    /// Uploads every layer's router of `file`; errors as [`GpuRouters::upload_layer`].
    pub fn upload(ctx: &GpuContext, file: &RouterFile) -> Result<GpuRouters, GpuError> {
        let layers = (0..file.layers.len()).map(|l| Self::upload_layer(ctx, file, l)).collect::<Result<Vec<_>, _>>()?;
        Ok(GpuRouters { layers })
    }

    /// The GPU weights of `file`'s router for layer `layer`; `Ok(None)` when that layer has none.
    /// Errors ([`GpuError::InvalidArgument`]) when `layer` is out of range or a tensor's length
    /// does not fit the file's rank and hidden size.
    pub fn upload_layer(ctx: &GpuContext, file: &RouterFile, layer: usize) -> Result<Option<RouterWeights>, GpuError> {
        let slot = file.layers.get(layer).ok_or_else(|| {
            GpuError::InvalidArgument(format!("router layer {layer} does not exist: the file has {} layers", file.layers.len()))
        })?;
        slot.as_ref().map(|r| upload_router(ctx, &format!("router.{layer}"), r, file.rank, file.hidden, file.eps)).transpose()
    }

    /// `[n_layers]`: whether each layer has a router.
    pub fn has_router(&self) -> Vec<bool> {
        self.layers.iter().map(Option::is_some).collect()
    }
}

/// What a routed session needs: the routers and how their probabilities become a plan.
#[derive(Debug, Clone)]
pub struct Routing {
    /// The uploaded routers, shared between sessions.
    pub routers: Arc<GpuRouters>,
    /// Threshold and skip budget that turn probabilities into a plan.
    pub policy: PlanPolicy,
}

impl Session {
    /// The routed prefill of `ids` (already written to the prefill activations and the step
    /// uniform): router l reads the hidden states that reach layer l (after the earlier
    /// decisions) and its probability is read back before layer l is encoded. With a budget
    /// (--max-skip/--min-skip) the probabilities of this pass pick the final plan; when that
    /// differs from the threshold-only plan, the prompt is prefilled again under it so that the
    /// cache only holds what the final plan computes. Layers the final plan skips lose their
    /// KV cache. Errors: `RuntimeError::Plan` from the plan decision; GPU errors.
    pub(super) fn prefill_routed(&mut self, ids: &[u32], routing: Routing) -> Result<StepOutput, RuntimeError> {
        let t = ids.len();
        let n = self.weights.config.n_layers;
        let tau_only = PlanPolicy { max_skip: None, min_skip: None, ..routing.policy.clone() };
        let mut decider = PlanDecider::new(routing.routers.has_router(), tau_only);
        let mut run = vec![true; n];
        let acts = self.prefill_acts.take().expect("allocated by prefill");
        let mut segment = self.builder(Phase::Prefill).head(&acts, t)?;
        for (l, router) in routing.routers.layers.iter().enumerate() {
            if let Some(rw) = router {
                segment.extend(self.builder(Phase::Prefill).router(&acts, t, l, rw)?);
                self.submit(&segment);
                segment.clear();
                let raw = crate::gpu::buffer::read_buffer(&self.ctx, &self.bufs.router_probs.buffer, 4 * l as u64, 4, "router.probs")?;
                self.probs[l] = Some(f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
            }
            run[l] = decider.decide(l, self.probs[l])?;
            if run[l] {
                self.bufs.kv.ensure(&self.ctx, l)?;
                segment.extend(self.builder(Phase::Prefill).layer(&acts, t, l)?);
            }
        }
        let budgeted = decide_plan(&self.probs, &routing.policy);
        let result = if budgeted == run {
            self.plan = LayerPlan::from_flags(run);
            segment.extend(self.builder(Phase::Prefill).tail(&acts, t)?);
            self.execute(&segment, Phase::Prefill)
        } else {
            log::info!("router budget changes the plan: prefilling again");
            self.plan = LayerPlan::from_flags(budgeted);
            self.bufs.kv.fit(&self.ctx, &self.plan)?;
            let program = self.builder(Phase::Prefill).step(t, &acts, |_| &acts)?;
            self.execute(&program, Phase::Prefill)
        };
        self.bufs.kv.drop_skipped(&self.plan);
        self.prefill_acts = Some(acts);
        result
    }
}

/// Uploads one layer's router (`rank` r, hidden size `d`), checking every tensor's length first:
/// `norm [d]`, `w1 [max(r, 1), d]`, `b1 [max(r, 1)]`, and for `r > 0` `w2 [1, r]` and `b2`.
fn upload_router(ctx: &GpuContext, label: &str, layer: &RouterLayer, rank: usize, d: usize, eps: f32) -> Result<RouterWeights, GpuError> {
    let nh = rank.max(1);
    let len = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(GpuError::InvalidArgument(format!("{label}: router {what} has {got} values, expected {want} (r = {rank}, d = {d})")))
        }
    };
    len("norm", layer.norm.len(), d)?;
    len("w1", layer.w1.len(), nh * d)?;
    len("b1", layer.b1.len(), nh)?;
    let (w2, b2) = match (rank, &layer.w2, layer.b2) {
        (0, None, None) => (None, None),
        (0, _, _) => return Err(GpuError::InvalidArgument(format!("{label}: a linear router (r = 0) has no w2/b2"))),
        (_, Some(w2), Some(b2)) => {
            len("w2", w2.len(), rank)?;
            (
                Some(GpuTensor::from_f32(ctx, &format!("{label}.w2"), &[1, rank], w2)?),
                Some(GpuTensor::from_f32(ctx, &format!("{label}.b2"), &[1], &[b2])?),
            )
        }
        _ => return Err(GpuError::InvalidArgument(format!("{label}: router with r = {rank} needs w2 and b2"))),
    };
    Ok(RouterWeights {
        norm: GpuTensor::from_f32(ctx, &format!("{label}.norm"), &[d], &layer.norm)?,
        eps,
        w1: GpuTensor::from_f32(ctx, &format!("{label}.w1"), &[nh, d], &layer.w1)?,
        b1: GpuTensor::from_f32(ctx, &format!("{label}.b1"), &[nh], &layer.b1)?,
        w2,
        b2,
        r: rank,
        d,
    })
}

#[cfg(test)]
mod tests;
