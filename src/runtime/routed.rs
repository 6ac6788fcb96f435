//! FiRST routers on the GPU and the routed prefill: the plan is decided layer by layer while
//! the prompt goes through the model.

use std::sync::Arc;

use crate::gpu::{GpuContext, GpuError};
use crate::kernels::router::RouterWeights;
use crate::model::routers::RouterFile;

use super::plan::PlanPolicy;

/// Every layer's router uploaded (None: that layer has no router and always runs).
#[derive(Debug)]
pub struct GpuRouters {
    pub layers: Vec<Option<RouterWeights>>,
}

impl GpuRouters {
    pub fn upload(ctx: &GpuContext, file: &RouterFile) -> Result<GpuRouters, GpuError> {
        let layers = (0..file.layers.len()).map(|l| file.upload(ctx, l)).collect::<Result<Vec<_>, _>>()?;
        Ok(GpuRouters { layers })
    }

    pub fn has_router(&self) -> Vec<bool> {
        self.layers.iter().map(Option::is_some).collect()
    }
}

/// What a routed session needs: the routers and how their probabilities become a plan.
#[derive(Debug, Clone)]
pub struct Routing {
    pub routers: Arc<GpuRouters>,
    pub policy: PlanPolicy,
}
