//! Running a model: weights on the GPU, sessions (one per sequence), the step builder, the KV
//! cache, the layer plan, the routed prefill, block influence for static plans and profiling. The token loop, sampling and text
//! are in [`crate::generate`].

pub mod batch;
pub mod calibration;
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
pub use loaded::{LoadedModel, MergedLora, PlanChoice, PlanPolicyArgs, load_tokenizer};
pub use lora::GpuLora;
pub use profile::{ProfileError, ProfileMode, Profiler};
pub use session::{NonFiniteAt, Session, SessionOptions, StepId, StepOutput};
pub use step::{Activations, StepBuffers, StepBuilder};
pub use weights::{GpuWeights, WeightDtype, estimate_matrix_bytes, matrix_names};

use std::path::PathBuf;
use std::sync::Arc;

use crate::gpu::GpuError;
use crate::model::ModelError;
use crate::model::lora::LoraError;
use crate::model::routers::RouterError;
use crate::model::tokenizer::TokenizerError;

pub use plan::PlanError;

/// Everything that can go wrong while loading a model for generation or running a session.
/// Typed errors of the layers below are wrapped whole (their messages already name the file,
/// tensor, key or limit); the variants of this layer name the sizes involved.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A GPU operation failed: device loss, out of memory, invalid kernel arguments, read-back.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A model file (GGUF or Hugging Face folder) could not be read or does not fit the model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A LoRA adapter could not be read, does not fit the model, or got a bad scale.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// A router file could not be read or was made for another model.
    #[error(transparent)]
    Routers(#[from] RouterError),
    /// The tokenizer or chat template of the model at `path` could not be built.
    #[error("tokenizer: {}: {source}", path.display())]
    LoadTokenizer {
        /// The model file or folder.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: TokenizerError,
    },
    /// Chat messages were given to a model without a chat template.
    #[error("tokenizer: {} has no chat template; run without --chat", path.display())]
    NoChatTemplate {
        /// The model file or folder.
        path: PathBuf,
    },
    /// Encoding text or rendering the chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// A layer plan or router policy does not fit the model, or was used wrongly.
    #[error("layer plan: {0}")]
    Plan(#[from] PlanError),
    /// Profiling (`--profile`, `--trace`) failed.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// A threshold or skip budget was given with a router file that holds a static plan.
    #[error("{} holds a static plan (skip: {skip}); {option} does not apply to it", path.display())]
    StaticRouterFile {
        /// The router file.
        path: PathBuf,
        /// Its skipped layers, `3,6,9` (empty: none).
        skip: String,
        /// The option given (`--router-threshold`, `--min-skip`, `--max-skip`).
        option: &'static str,
    },
    /// A session was asked for a context of 0 positions.
    #[error("context length must be at least 1")]
    ZeroContext,
    /// The tokens do not fit in the context (`needed` positions, `ctx_len` available).
    #[error("the prompt needs {needed} positions but the context holds {ctx_len}; raise --ctx or pass --truncate")]
    ContextFull {
        /// Positions the sequence would reach.
        needed: usize,
        /// Positions the session's KV cache holds.
        ctx_len: usize,
    },
    /// A token id outside `0..vocab`.
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken {
        /// The id given.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A prefill of zero tokens.
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    /// [`Session::rewind`] to a position the session has not reached.
    #[error("cannot rewind to position {pos}: the session holds {position} tokens")]
    RewindPastEnd {
        /// The position asked for.
        pos: usize,
        /// The session's position.
        position: usize,
    },
    /// A broken invariant of the runtime itself (a bug, not a user error), e.g. a layer that
    /// runs without its KV cache.
    #[error("internal error (a bug in firstrt): {0}")]
    Internal(String),
    /// The model's chat template does not compile; only chat (`--chat`, `chat`) needs it.
    #[error("{}: {source}", path.display())]
    ChatTemplate {
        /// The model file or folder.
        path: PathBuf,
        /// Why it does not compile (shared: the loaded model keeps it for every chat call).
        #[source]
        source: Arc<TokenizerError>,
    },
    /// A step's logits were NaN or infinite (a broken weight or configuration value): reported
    /// instead of sampling from them, with where the values stop being finite.
    #[error("{step}: the logits are not finite (NaN or infinity): {at}; the model's weights or configuration are broken")]
    NonFinite {
        /// The step that produced them.
        step: StepId,
        /// Where they first appear.
        at: NonFiniteAt,
    },
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
                return Err(PlanError::LayerOutOfRange { layer: l, n_layers }.into());
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
