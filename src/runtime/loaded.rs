//! A model ready to generate: weights on the GPU, its tokenizer and chat template, from a GGUF
//! file or a Hugging Face folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::gpu::GpuContext;
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::gguf::GgufFile;
use crate::model::tokenizer::{ModelTokenizer, TokenizerError};
use crate::model::{WeightSource, open_model};

use crate::model::routers::{RouterFile, layer_list, model_identity};

use crate::model::lora::LoraAdapter;

use super::lora::GpuLora;
use super::plan::PlanPolicy;
use super::routed::{GpuRouters, Routing};
use super::weights::WeightDtype;
use super::{GpuWeights, LayerPlan, RuntimeError, Session, SessionOptions};

/// What the user asked of the routers: a threshold overriding the file's, and budgets.
#[derive(Debug, Clone, Default)]
pub struct PlanPolicyArgs {
    /// Router probability in [0, 1] at or above which a layer runs (`--threshold`); None keeps
    /// the router file's.
    pub threshold: Option<f32>,
    /// The most layers to skip (`--max-skip`).
    pub max_skip: Option<usize>,
    /// The fewest layers to skip (`--min-skip`).
    pub min_skip: Option<usize>,
}

impl PlanPolicyArgs {
    /// The first option given, by its flag (`--router-threshold`, `--min-skip`, `--max-skip`).
    fn first_given(&self) -> Option<&'static str> {
        self.first_given_as(["--router-threshold", "--min-skip", "--max-skip"])
    }

    /// The first option given, in the order threshold, min_skip, max_skip, by its name in
    /// `names` (in that order: the CLI's flags, or a request's fields).
    pub fn first_given_as(&self, names: [&'static str; 3]) -> Option<&'static str> {
        [self.threshold.is_some(), self.min_skip.is_some(), self.max_skip.is_some()]
            .into_iter()
            .zip(names)
            .find_map(|(given, name)| given.then_some(name))
    }

    /// `base` with the threshold and skip budgets given here in place of its own (its
    /// first/last rule kept).
    pub fn apply(&self, base: &PlanPolicy) -> PlanPolicy {
        PlanPolicy {
            threshold: self.threshold.unwrap_or(base.threshold),
            max_skip: self.max_skip.or(base.max_skip),
            min_skip: self.min_skip.or(base.min_skip),
            skip_first_last: base.skip_first_last,
        }
    }
}

/// How the sessions of a run choose their layers: known before any input (the full model,
/// `--skip-layers`, a static router file), or decided per input by routers during the first
/// prefill. Made once (the router file read and uploaded once), then a session per sequence.
#[derive(Debug, Clone)]
pub enum PlanChoice {
    /// These layers run for every input; no router runs.
    Static(LayerPlan),
    /// Routers on the GPU decide during each session's first prefill.
    Routed(Routing),
}

impl PlanChoice {
    /// A static plan skipping `skip` (0-based layers, any order) of a model of `n_layers`
    /// (`--skip-layers`; empty: the full model). Errors: `RuntimeError::Plan` for a layer the
    /// model does not have.
    pub fn skipping(n_layers: usize, skip: &[usize]) -> Result<PlanChoice, RuntimeError> {
        Ok(PlanChoice::Static(LayerPlan::skipping(n_layers, skip)?))
    }

    /// A new session over `weights` under this choice ([`Session::new`] with the static plan,
    /// or [`Session::with_routers`]). Errors: as those.
    pub fn session(&self, weights: &Arc<GpuWeights>, options: SessionOptions) -> Result<Session, RuntimeError> {
        match self {
            PlanChoice::Static(plan) => Session::new(weights, options, plan.clone()),
            PlanChoice::Routed(routing) => Session::with_routers(weights, options, routing.clone()),
        }
    }

    /// True for a plan fixed before any input.
    pub fn is_static(&self) -> bool {
        matches!(self, PlanChoice::Static(_))
    }
}

/// A model file opened and uploaded: weights on the GPU, tokenizer and chat template.
pub struct LoadedModel {
    /// The GGUF file or Hugging Face folder it was loaded from.
    pub path: PathBuf,
    /// The weights on the GPU, shared by every session.
    pub weights: Arc<GpuWeights>,
    /// The tokenizer the file describes.
    pub tokenizer: ModelTokenizer,
    /// The chat template, compiled at load: None when the file has none, an error when it does
    /// not compile, which only what needs the template reports ([`LoadedModel::chat_ids`]:
    /// `run --chat`, `chat`); everything else still works.
    pub template: Option<Result<ChatTemplate, Arc<TokenizerError>>>,
    /// Summary of the file's tensor types, e.g. "Q4_1 x210, F32 x61, Q8_0 x1".
    pub file_dtypes: String,
    /// The file, kept open (memory-mapped) for what is read later: router identity, adapters.
    pub source: Box<dyn WeightSource>,
    /// The LoRA adapter folded into `weights` at load, if any.
    pub merged_lora: Option<MergedLora>,
}

/// A LoRA adapter to fold into the weights at load (`--lora-mode merged`).
#[derive(Debug, Clone, PartialEq)]
pub struct MergedLora {
    /// The adapter folder (PEFT `adapter_config.json` and `adapter_model.safetensors`).
    pub dir: PathBuf,
    /// User scale S: the weights become W + S (alpha / r) B A.
    pub scale: f32,
}

/// Read the tokenizer (and chat template) that belongs to the model at `path`.
pub fn load_tokenizer(path: &Path) -> Result<ModelTokenizer, RuntimeError> {
    let tok = if path.is_dir() {
        ModelTokenizer::from_hf_dir(path)
    } else {
        let gguf = GgufFile::open(path)?;
        ModelTokenizer::from_gguf_metadata(&gguf.metadata)
    };
    tok.map_err(|source| RuntimeError::LoadTokenizer { path: path.to_path_buf(), source })
}

impl LoadedModel {
    /// Load and upload everything. `progress` sees (steps done, steps in all).
    pub fn load(
        ctx: &Arc<GpuContext>,
        path: &Path,
        dtype: impl Into<WeightDtype>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LoadedModel, RuntimeError> {
        Self::load_merged(ctx, path, dtype, None, progress)
    }

    /// [`LoadedModel::load`] with a LoRA adapter merged into the weights before upload.
    pub fn load_merged(
        ctx: &Arc<GpuContext>,
        path: &Path,
        dtype: impl Into<WeightDtype>,
        lora: Option<&MergedLora>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LoadedModel, RuntimeError> {
        let source: Box<dyn WeightSource> = open_model(path)?;
        let tokenizer = load_tokenizer(path)?;
        let template = tokenizer.chat_template_source().map(|t| {
            ChatTemplate::new(t, tokenizer.bos_token(), tokenizer.eos_token()).map_err(|e| {
                log::warn!("{}: {e}; chat (--chat, `chat`) will not work", path.display());
                Arc::new(e)
            })
        });
        let file_dtypes = source.describe_dtypes();
        let adapter = match lora {
            Some(m) => {
                check_scale(m.scale)?;
                Some(LoraAdapter::load(&m.dir, source.config())?)
            }
            None => None,
        };
        let merge = adapter.as_ref().zip(lora.map(|m| m.scale));
        let weights = Arc::new(GpuWeights::load_merged(ctx, source.as_ref(), dtype, merge, progress)?);
        Ok(LoadedModel { path: path.to_path_buf(), weights, tokenizer, template, file_dtypes, source, merged_lora: lora.cloned() })
    }

    /// Read a PEFT LoRA adapter folder, check it against this model and upload it for the
    /// unmerged mode (`Session::set_lora`). The base weights are not touched.
    pub fn load_lora(&self, dir: &Path) -> Result<Arc<GpuLora>, RuntimeError> {
        let adapter = LoraAdapter::load(dir, &self.weights.config)?;
        Ok(Arc::new(GpuLora::upload(&self.weights.ctx, &adapter, &self.weights.config)?))
    }

    /// Read a router file and check that it was made for this model. A routed file is uploaded
    /// and its routers decide under `policy` (the file's threshold unless overridden); a static
    /// plan's file (`static_skip`, written by `firstrt static-plan --out`) gives that plan, with
    /// no router on the GPU. Errors: those of [`RouterFile::load`]; `RuntimeError::Plan` for an
    /// invalid policy; `RuntimeError::StaticRouterFile` when `policy` sets a threshold or a
    /// budget for a static file (they do not apply to it).
    pub fn load_routers(&self, path: &Path, policy: &PlanPolicyArgs) -> Result<(RouterFile, PlanChoice), RuntimeError> {
        let identity = model_identity(self.source.as_ref())?;
        let file = RouterFile::load(path, &identity)?;
        if let Some(skip) = &file.static_skip {
            if let Some(option) = policy.first_given() {
                return Err(RuntimeError::StaticRouterFile { path: path.to_path_buf(), skip: layer_list(skip), option });
            }
            let plan = PlanChoice::skipping(self.weights.config.n_layers, skip)?;
            return Ok((file, plan));
        }
        let policy = policy.apply(&PlanPolicy::from_routers(&file));
        policy.validate()?;
        let routers = Arc::new(GpuRouters::upload(&self.weights.ctx, &file)?);
        Ok((file, PlanChoice::Routed(Routing { routers, policy })))
    }

    /// Render `messages` with the model's chat template (with the generation prompt) and encode.
    pub fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, RuntimeError> {
        let text = self.chat_template()?.render(messages, true)?;
        // The template writes its own BOS where the model wants one.
        Ok(self.tokenizer.encode_with_bos(&text, false)?)
    }

    /// The model's compiled chat template. Errors: [`RuntimeError::NoChatTemplate`] when the
    /// file has none, [`RuntimeError::ChatTemplate`] when it did not compile.
    pub fn chat_template(&self) -> Result<&ChatTemplate, RuntimeError> {
        self.template
            .as_ref()
            .ok_or_else(|| RuntimeError::NoChatTemplate { path: self.path.clone() })?
            .as_ref()
            .map_err(|source| RuntimeError::ChatTemplate { path: self.path.clone(), source: source.clone() })
    }

    /// Encode plain text, with a BOS token first when the model's tokenizer asks for one.
    pub fn text_ids(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        Ok(self.tokenizer.encode(text)?)
    }
}

/// A LoRA scale must be a finite number (0 turns the adapter off, negative values subtract it).
pub fn check_scale(scale: f32) -> Result<(), RuntimeError> {
    if !scale.is_finite() {
        return Err(crate::model::lora::LoraError::BadScale { scale }.into());
    }
    Ok(())
}
