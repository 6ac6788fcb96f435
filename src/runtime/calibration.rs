//! Static layer plans from calibration data: ShortGPT's block influence (Men et al. 2024,
//! "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
//! arXiv 2403.03853), computed on the GPU.
//!
//! For decoder layer `l`, `BI_l = 1 - mean_t cos(h_in[t], h_out[t])`, where `h_in` is the
//! residual stream entering the layer, `h_out` the stream leaving it (before the final norm) and
//! the mean runs over every token of every calibration sequence. A layer that barely turns its
//! input has a low BI and is the first a static plan skips.
//!
//! Each sequence is one full-model prefill (every layer, no adapter) whose program is the
//! inference prefill's with two dispatches added per layer: the layer's input is copied aside
//! before the layer runs (`kernels::copy`) and after it one cosine per row is written into a
//! `[n_layers, T]` table (`kernels::cosine`), read back once per sequence and summed in f64.

use std::sync::Arc;

use crate::gpu::{DType, GpuTensor, Phase, Tag};
use crate::kernels::copy::copy;
use crate::kernels::cosine::{CosineOp, cosine};
use crate::kernels::step::StepParams;

use super::plan::{PlanError, check_skip_count, skippable_layers};
use super::{GpuWeights, LayerPlan, RuntimeError, Session, SessionOptions};

/// Per-layer block influence over a calibration set.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockInfluence {
    /// `[n_layers]`: the sum over every calibration token of `cos(h_in, h_out)` at each layer (f64).
    pub cos_sum: Vec<f64>,
    /// Calibration tokens summed over (every position of every sequence).
    pub tokens: usize,
    /// Calibration sequences.
    pub sequences: usize,
}

impl BlockInfluence {
    /// `[n_layers]`: `BI_l = 1 - cos_sum[l] / tokens` (NaN when no token was seen).
    pub fn bi(&self) -> Vec<f64> {
        self.cos_sum.iter().map(|s| 1.0 - s / self.tokens as f64).collect()
    }

    /// The `skip` layers of lowest BI (ties: the lower layer first), in layer order; layer 0 and
    /// the last layer are never chosen unless `skip_first_last`. Errors:
    /// [`PlanError::TooManySkips`] when `skip` is more than the layers that may be skipped.
    pub fn static_plan(&self, skip: usize, skip_first_last: bool) -> Result<Vec<usize>, PlanError> {
        let n = self.cos_sum.len();
        check_skip_count(n, skip, skip_first_last)?;
        let bi = self.bi();
        let mut order: Vec<usize> = skippable_layers(n, skip_first_last).collect();
        order.sort_by(|&a, &b| bi[a].total_cmp(&bi[b]).then(a.cmp(&b)));
        let mut chosen = order[..skip].to_vec();
        chosen.sort_unstable();
        Ok(chosen)
    }

    /// Adds one sequence's cosines, `cos [n_layers, t]` row-major.
    fn add(&mut self, cos: &[f32], t: usize) {
        for (sum, row) in self.cos_sum.iter_mut().zip(cos.chunks(t)) {
            *sum += row.iter().map(|&c| c as f64).sum::<f64>();
        }
        self.tokens += t;
        self.sequences += 1;
    }
}

/// Block influence of every decoder layer of `weights` over `sequences` (token ids; each one
/// prefilled alone from position 0 with every layer running and no adapter). `progress` sees
/// (sequences done, sequences in all) after each one.
///
/// Errors: `RuntimeError::EmptyPrompt` for an empty sequence, `BadToken` for an id outside the
/// vocabulary, `NonFinite` when a prefill's logits are not finite, `Gpu` for a kernel, buffer or
/// read-back failure (a sequence longer than the device's binding limit allows among them).
pub fn block_influence(
    weights: &Arc<GpuWeights>,
    sequences: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BlockInfluence, RuntimeError> {
    let n = weights.config.n_layers;
    let mut bi = BlockInfluence { cos_sum: vec![0.0; n], tokens: 0, sequences: 0 };
    for (i, ids) in sequences.iter().enumerate() {
        if ids.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        let mut session = Session::new(weights, SessionOptions { ctx_len: ids.len(), candidates: 1 }, LayerPlan::full(n))?;
        let cos = session.prefill_cosines(ids)?;
        bi.add(&cos, ids.len());
        progress(i + 1, sequences.len());
    }
    Ok(bi)
}

impl Session {
    /// Prefill `ids` from position 0 through every layer (the session's plan must be full) and
    /// return `cos(h_in[t], h_out[t])` of each layer, `[n_layers, T]` row-major.
    fn prefill_cosines(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let (t, n, d) = (ids.len(), self.weights.config.n_layers, self.weights.config.d_model);
        if self.position() != 0 || self.plan().kept() != n {
            return Err(RuntimeError::Internal("block influence needs a fresh session running every layer".into()));
        }
        self.check_ids(ids)?;
        self.ensure_prefill_acts(t)?;
        let ctx = self.ctx.clone();
        let cos = GpuTensor::zeros_bound(&ctx, "bi.cos", DType::F32, &[n, t])?;
        let program = {
            let acts = self.prefill_acts.as_ref().ok_or_else(|| RuntimeError::Internal("prefill buffers missing".into()))?;
            acts.ids.write_u32(&ctx, ids);
            self.bufs.step.write(&ctx, &StepParams::new(0, t));
            let h_in = GpuTensor::zeros_bound(&ctx, "bi.h_in", DType::F32, &acts.x.shape)?;
            let builder = self.builder(Phase::Prefill);
            let mut p = builder.head(acts, t)?;
            for l in 0..n {
                let tag = |op| Tag::layer(Phase::Prefill, l, op);
                p.push(copy(&ctx, &tag("bi.save_input").label(), &acts.x, &h_in)?.tagged(tag("bi.save_input")));
                p.extend(builder.layer(acts, t, l)?);
                let op = CosineOp { a: &h_in, b: &acts.x, rows: t, dim: d, out: &cos, out_offset: l * t };
                p.push(cosine(&ctx, &tag("bi.cosine").label(), &op)?.tagged(tag("bi.cosine")));
            }
            p.extend(builder.tail(acts, t)?);
            p
        };
        self.execute(&program, Phase::Prefill)?;
        Ok(cos.read_f32(&ctx)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn influence(bi: &[f64]) -> BlockInfluence {
        BlockInfluence { cos_sum: bi.iter().map(|b| 10.0 * (1.0 - b)).collect(), tokens: 10, sequences: 2 }
    }

    #[test]
    fn static_plan_takes_the_lowest_bi() {
        let b = influence(&[0.01, 0.5, 0.1, 0.3, 0.05, 0.2, 0.02]);
        assert_eq!(b.static_plan(0, false).unwrap(), Vec::<usize>::new());
        assert_eq!(b.static_plan(1, false).unwrap(), vec![4]);
        assert_eq!(b.static_plan(3, false).unwrap(), vec![2, 4, 5]);
        // with the first and last layer allowed, their low BI puts them first
        assert_eq!(b.static_plan(3, true).unwrap(), vec![0, 4, 6]);
        assert_eq!(b.static_plan(5, false).unwrap(), vec![1, 2, 3, 4, 5]);
        let bi = b.bi();
        assert!((bi[1] - 0.5).abs() < 1e-12 && (bi[6] - 0.02).abs() < 1e-12, "{bi:?}");
    }

    #[test]
    fn static_plan_ties_go_to_the_lower_layer() {
        let b = influence(&[0.0, 0.2, 0.1, 0.2, 0.1, 0.2, 0.0]);
        assert_eq!(b.static_plan(1, false).unwrap(), vec![2]);
        assert_eq!(b.static_plan(3, false).unwrap(), vec![1, 2, 4]);
        assert_eq!(b.static_plan(2, true).unwrap(), vec![0, 6]);
    }

    #[test]
    fn static_plan_refuses_more_than_the_skippable_layers() {
        let b = influence(&[0.1; 7]);
        let err = b.static_plan(6, false).unwrap_err();
        assert_eq!(err, PlanError::TooManySkips { skip: 6, skippable: 5, n_layers: 7, skip_first_last: false });
        let text = err.to_string();
        assert!(text.contains("--skip 6") && text.contains("5 layers") && text.contains("--skip-first-last"), "{text}");
        assert_eq!(b.static_plan(7, true).unwrap(), (0..7).collect::<Vec<_>>());
        let err = b.static_plan(8, true).unwrap_err().to_string();
        assert!(err.contains("--skip 8") && err.contains("7 layers") && !err.contains("--skip-first-last"), "{err}");
        // one or two layers: nothing may be skipped unless the first and last may
        assert!(influence(&[0.1, 0.2]).static_plan(1, false).is_err());
        assert_eq!(influence(&[0.1, 0.2]).static_plan(0, false).unwrap(), Vec::<usize>::new());
        assert!(influence(&[0.1]).static_plan(1, false).is_err());
    }

    #[test]
    fn sums_add_up_over_sequences() {
        let mut b = BlockInfluence { cos_sum: vec![0.0; 2], tokens: 0, sequences: 0 };
        b.add(&[1.0, 0.5, 0.0, 0.5], 2);
        b.add(&[0.25, 1.0], 1);
        assert_eq!(b.cos_sum, vec![1.75, 1.5]);
        assert_eq!((b.tokens, b.sequences), (3, 2));
        assert_eq!(b.bi(), vec![1.0 - 1.75 / 3.0, 0.5]);
    }
}
