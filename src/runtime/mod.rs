//! Running a model: weights on the GPU, sessions (one per sequence), the step builder, the KV
//! cache, the layer plan, the routed prefill and profiling. The token loop, sampling and text
//! are in [`crate::generate`].

pub mod kv_cache;
pub mod loaded;
pub mod lora;
pub mod plan;
pub mod profile;
pub mod routed;
pub mod session;
pub mod step;
pub mod weights;

pub use crate::gpu::{Phase, Tag};
pub use kv_cache::{KvCache, LayerKv};
pub use loaded::{LoadedModel, MergedLora, PlanPolicyArgs, load_tokenizer};
pub use lora::GpuLora;
pub use profile::{ProfileError, ProfileMode, Profiler};
pub use session::{Session, SessionOptions, StepOutput};
pub use step::{Activations, StepBuffers, StepBuilder};
pub use weights::GpuWeights;

use crate::gpu::GpuError;
use crate::model::ModelError;
use crate::model::lora::LoraError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("the prompt needs {needed} positions but the context holds {ctx_len}; raise --ctx or pass --truncate")]
    ContextFull { needed: usize, ctx_len: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    #[error("router file: {0}")]
    Routers(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Output(String),
    #[error("layer plan: {0}")]
    Plan(String),
}

/// Which decoder layers a sequence runs. Fixed after prefill; a skipped layer passes its input
/// through unchanged and never has KV-cache entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    run: Vec<bool>,
}

impl LayerPlan {
    /// Every layer runs.
    pub fn full(n_layers: usize) -> LayerPlan {
        LayerPlan { run: vec![true; n_layers] }
    }

    /// From run flags, one per layer.
    pub fn from_flags(run: Vec<bool>) -> LayerPlan {
        LayerPlan { run }
    }

    /// Skip exactly the listed layers (0-based). Errors: `RuntimeError::Plan` for a layer the
    /// model does not have.
    pub fn skipping(n_layers: usize, skip: &[usize]) -> Result<LayerPlan, RuntimeError> {
        let mut run = vec![true; n_layers];
        for &l in skip {
            if l >= n_layers {
                return Err(RuntimeError::Plan(format!("layer {l} does not exist: the model has {n_layers} layers (0..{})", n_layers - 1)));
            }
            run[l] = false;
        }
        Ok(LayerPlan { run })
    }

    /// Number of layers the plan covers (the model's layer count).
    pub fn len(&self) -> usize {
        self.run.len()
    }

    /// True for a plan over no layers.
    pub fn is_empty(&self) -> bool {
        self.run.is_empty()
    }

    /// True when `layer` (0-based) runs; false when skipped or out of range.
    pub fn runs(&self, layer: usize) -> bool {
        self.run.get(layer).copied().unwrap_or(false)
    }

    /// How many layers run.
    pub fn kept(&self) -> usize {
        self.run.iter().filter(|&&r| r).count()
    }

    /// The skipped layers (0-based), in order.
    pub fn skipped_layers(&self) -> Vec<usize> {
        self.run.iter().enumerate().filter(|(_, r)| !**r).map(|(i, _)| i).collect()
    }
}
