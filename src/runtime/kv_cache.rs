//! The KV cache of one sequence: per decoder layer, the rotated keys and the values of every
//! position so far. Only layers that the plan runs hold one; a skipped layer holds nothing.

use crate::gpu::{DType, GpuContext, GpuError, GpuTensor};

use super::LayerPlan;

/// One layer's cache: keys and values, each `[ctx_len, n_kv_heads * head_dim]` f32, row = position.
#[derive(Debug)]
pub struct LayerKv {
    /// Rotated keys `[ctx_len, n_kv_heads * head_dim]` f32 (RoPE applied when written).
    pub k: GpuTensor,
    /// Values `[ctx_len, n_kv_heads * head_dim]` f32.
    pub v: GpuTensor,
}

/// Every layer's cache slot: `Some` for a layer that runs, `None` for one that is skipped (or not
/// yet decided, during a routed prefill).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    ctx_len: usize,
    kv_dim: usize,
}

impl KvCache {
    /// Slots for `n_layers` layers of `ctx_len` rows of `kv_dim` (= n_kv_heads * head_dim) f32
    /// each, none allocated yet. Errors: [`GpuError::BufferTooLarge`] naming `--ctx`, one
    /// layer's K size in bytes and the device's storage-binding limit, when one layer's K (or V)
    /// cannot be bound whole: checked here, before any buffer is created.
    pub fn empty(ctx: &GpuContext, n_layers: usize, ctx_len: usize, kv_dim: usize) -> Result<KvCache, GpuError> {
        let label = format!("K cache of one layer for --ctx {ctx_len} ([{ctx_len}, {kv_dim}] f32)");
        crate::gpu::buffer::check_binding(ctx, &label, DType::F32, &[ctx_len, kv_dim])?;
        Ok(KvCache { layers: (0..n_layers).map(|_| None).collect(), ctx_len, kv_dim })
    }

    /// Allocate the cache of every layer `plan` runs and drop the others. Errors: the GPU
    /// allocation of a layer's K or V.
    pub fn fit(&mut self, ctx: &GpuContext, plan: &LayerPlan) -> Result<(), GpuError> {
        for l in 0..self.layers.len() {
            if plan.runs(l) {
                self.ensure(ctx, l)?;
            } else {
                self.layers[l] = None;
            }
        }
        Ok(())
    }

    /// Allocate layer `l`'s cache (zeros, `layer.{l}.k_cache` / `.v_cache`) unless it has one.
    /// Errors: the GPU allocation.
    pub fn ensure(&mut self, ctx: &GpuContext, l: usize) -> Result<(), GpuError> {
        if self.layers[l].is_none() {
            let shape = [self.ctx_len, self.kv_dim];
            self.layers[l] = Some(LayerKv {
                k: GpuTensor::zeros(ctx, &format!("layer.{l}.k_cache"), DType::F32, &shape)?,
                v: GpuTensor::zeros(ctx, &format!("layer.{l}.v_cache"), DType::F32, &shape)?,
            });
        }
        Ok(())
    }

    /// Free the cache of every layer `plan` skips.
    pub fn drop_skipped(&mut self, plan: &LayerPlan) {
        for (l, slot) in self.layers.iter_mut().enumerate() {
            if !plan.runs(l) {
                *slot = None;
            }
        }
    }

    /// Free every layer's cache (a routed session before its plan is decided).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|slot| *slot = None);
    }

    /// Layer `l`'s cache, None when it has none (skipped, or `l` out of range).
    pub fn layer(&self, l: usize) -> Option<&LayerKv> {
        self.layers.get(l).and_then(Option::as_ref)
    }

    /// Bytes held on the GPU by all layers' K and V.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|c| (c.k.byte_len() + c.v.byte_len()) as u64).sum()
    }
}
