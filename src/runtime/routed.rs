//! FiRST routers on the GPU and the routed prefill: the plan is decided layer by layer while
//! the prompt goes through the model.

use std::sync::Arc;

use crate::gpu::{GpuContext, GpuError, Phase};
use crate::kernels::router::RouterWeights;
use crate::model::routers::RouterFile;

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
    /// Upload every layer's router of `file`. Errors: a GPU allocation, or a router whose
    /// sizes do not fit (`GpuError::InvalidArgument`).
    pub fn upload(ctx: &GpuContext, file: &RouterFile) -> Result<GpuRouters, GpuError> {
        let layers = (0..file.layers.len()).map(|l| file.upload(ctx, l)).collect::<Result<Vec<_>, _>>()?;
        Ok(GpuRouters { layers })
    }

    /// Per layer: true where a router exists.
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
            run[l] = decider.decide(l, self.probs[l]).map_err(|e| RuntimeError::Plan(e.to_string()))?;
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
