//! FiRST routers on the GPU and the routed prefill: the plan is decided layer by layer while
//! the prompt goes through the model.

use std::sync::Arc;

use crate::gpu::{GpuContext, GpuError, GpuTensor};
use crate::kernels::router::RouterWeights;
use crate::model::routers::{RouterFile, RouterLayer};

use super::plan::PlanPolicy;

/// Every layer's router uploaded (None: that layer has no router and always runs).
#[derive(Debug)]
pub struct GpuRouters {
    /// `[n_layers]`: each layer's router weights (f32), `None` where the file has none.
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
    /// The routers on the GPU, shared by every session of the model.
    pub routers: Arc<GpuRouters>,
    /// Threshold, budgets and first/last rule.
    pub policy: PlanPolicy,
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
