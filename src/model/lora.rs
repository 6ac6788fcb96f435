//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read on the CPU and
//! checked against the base model's shapes.
//!
//! An adapted projection computes `y = W x + s · B (A x)` with `A` `[r, in]`, `B` `[out, r]` and
//! `s = user_scale · scaling`, where `scaling = lora_alpha / r` (or `lora_alpha / sqrt(r)` with
//! `use_rslora`). The runtime either folds `s · B A` into `W` before upload (merged, see
//! [`LoraAdapter::merge_into`]) or runs the two small products beside the base one (unmerged,
//! `runtime::lora::GpuLora`).
//!
//! Only what changes the forward pass of a plain LoRA on the seven LLaMA projections is read;
//! every other PEFT option that would change it (DoRA, trained biases, per-layer ranks, layer
//! subsets, modules_to_save, ...) is a [`LoraError::Unsupported`] naming the option, never a
//! silently different model.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub use super::names::Projection;
use super::names::{LoraFactor, LoraTensorName};
use super::{HostTensor, ModelConfig};

/// Everything that can be wrong with an adapter folder.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A file of the adapter could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `adapter_config.json` does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// `adapter_model.safetensors` does not parse.
    #[error("{path}: invalid safetensors file: {source}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The folder has no `adapter_model.safetensors`.
    #[error("{dir}: no adapter_model.safetensors{hint}")]
    MissingWeights {
        /// The adapter folder.
        dir: PathBuf,
        /// Advice, e.g. when only `adapter_model.bin` exists (may be empty).
        hint: String,
    },
    /// An adapter option that would change the forward pass in a way this runtime does not
    /// implement (DoRA, per-layer ranks, ...).
    #[error("{path}: unsupported adapter option: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// `adapter_config.json` is invalid (missing or mistyped rank, alpha, targets).
    #[error("{path}: invalid adapter config: {what}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A target module other than the seven projections.
    #[error(
        "{path}: target module '{module}' is not one this runtime adapts (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
    )]
    UnknownModule {
        /// The file.
        path: PathBuf,
        /// The module name.
        module: String,
    },
    /// A tensor that is not a LoRA factor of a target, or with bad data.
    #[error("{path}: tensor '{tensor}': {what}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        tensor: String,
        /// What is wrong.
        what: String,
    },
    /// A factor's shape does not fit the base model.
    #[error(
        "{path}: tensor '{tensor}' has shape {found:?}, but the base model {model} needs {expected:?}: the adapter was made for another model"
    )]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        tensor: String,
        /// The shape the base model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
        /// The base model's name.
        model: String,
    },
    /// A target projection lacks one of its two factors in some layer.
    #[error("{path}: missing tensor '{tensor}' (layer {layer}, {module} is a target)")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        tensor: String,
        /// The layer (0-based).
        layer: usize,
        /// The module name.
        module: &'static str,
    },
    /// The adapter was checked against a model of other sizes.
    #[error("adapter {dir}: {what}")]
    WrongModel {
        /// The adapter folder.
        dir: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A user scale that is not finite.
    #[error("LoRA scale {scale} is not a finite number")]
    BadScale {
        /// The scale given.
        scale: f32,
    },
    /// A file or folder of the adapter could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An adapter built in memory (by [`LoraAdapter::init`], by training, or by hand) is not
    /// one [`LoraAdapter::load`] would accept: a bad rank, alpha or target list, or a factor
    /// whose length does not fit its shape.
    #[error("invalid LoRA adapter: {what}")]
    Invalid {
        /// What is wrong.
        what: String,
    },
}

/// The options of `adapter_config.json` that this runtime uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// LoRA rank r (`r`): rows of A, columns of B.
    pub rank: usize,
    /// `lora_alpha`: the numerator of the scaling.
    pub alpha: f32,
    /// `use_rslora`: scale by `alpha / sqrt(r)` instead of `alpha / r` (Kalajdzievski 2023).
    pub use_rslora: bool,
    /// Targeted projections, in [`Projection::ALL`] order.
    pub targets: Vec<Projection>,
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f32 {
        if self.use_rslora { self.alpha / (self.rank as f32).sqrt() } else { self.alpha / self.rank as f32 }
    }

    /// Parse and validate `adapter_config.json` (`path` is for messages). Errors:
    /// [`LoraError::Json`], [`LoraError::BadConfig`], [`LoraError::Unsupported`],
    /// [`LoraError::UnknownModule`].
    pub fn parse(path: &Path, text: &str) -> Result<LoraConfig, LoraError> {
        let v: Value = serde_json::from_str(text).map_err(|source| LoraError::Json { path: path.to_path_buf(), source })?;
        let unsupported = |what: String| LoraError::Unsupported { path: path.to_path_buf(), what };
        let bad = |what: String| LoraError::BadConfig { path: path.to_path_buf(), what };
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let flag = |key: &str| -> Result<bool, LoraError> {
            match get(key) {
                None => Ok(false),
                Some(v) => v.as_bool().ok_or_else(|| bad(format!("{key} should be true or false, found {v}"))),
            }
        };
        // "Empty" means null, {}, [] or absent: PEFT writes these for unused options.
        let nonempty = |key: &str| match get(key) {
            None => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };

        if let Some(t) = get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(unsupported(format!("peft_type {t} (only \"LORA\")")));
            }
        }
        let rank = get("r").ok_or_else(|| bad("missing r".into()))?;
        let rank = rank.as_u64().filter(|&r| r > 0).ok_or_else(|| bad(format!("r should be a positive integer, found {rank}")))? as usize;
        // PEFT's default lora_alpha is 8.
        let alpha = match get("lora_alpha") {
            None => 8.0,
            Some(a) => a.as_f64().filter(|a| a.is_finite()).ok_or_else(|| bad(format!("lora_alpha should be a number, found {a}")))? as f32,
        };
        let use_rslora = flag("use_rslora")?;
        if flag("use_dora")? {
            return Err(unsupported("use_dora = true (DoRA's magnitude vectors are not applied)".into()));
        }
        match get("bias") {
            None => {}
            Some(Value::String(b)) if b == "none" => {}
            Some(b) => return Err(unsupported(format!("bias = {b} (only \"none\": trained biases are not applied)"))),
        }
        if flag("lora_bias")? {
            return Err(unsupported("lora_bias = true (a bias on lora_B is not applied)".into()));
        }
        if flag("fan_in_fan_out")? {
            // The LLaMA projections are nn.Linear ([out, in]); PEFT itself warns and resets
            // fan_in_fan_out to False for them, and lora_A / lora_B keep their [r, in] / [out, r]
            // shapes either way. Do the same.
            log::warn!("{}: fan_in_fan_out = true ignored: the target modules are Linear layers (as PEFT does)", path.display());
        }
        for key in [
            "layers_to_transform",
            "rank_pattern",
            "alpha_pattern",
            "layer_replication",
            "modules_to_save",
            "exclude_modules",
            "target_parameters",
            "trainable_token_indices",
            "alora_invocation_tokens",
        ] {
            if nonempty(key) {
                return Err(unsupported(format!("{key} = {} (not supported; it must be empty or null)", obj[key])));
            }
        }
        for key in ["use_qalora", "use_bdlora"] {
            if get(key).is_some_and(|v| v != &Value::Bool(false)) {
                return Err(unsupported(format!("{key} = {} (not supported)", obj[key])));
            }
        }

        let module = |name: &str| -> Result<Projection, LoraError> {
            // "q_proj", or with its block: "self_attn.q_proj".
            let (block, short) = name.rsplit_once('.').map_or((None, name), |(b, s)| (Some(b), s));
            Projection::parse(short)
                .filter(|p| block.is_none_or(|b| b == p.block()))
                .ok_or_else(|| LoraError::UnknownModule { path: path.to_path_buf(), module: name.to_string() })
        };
        let mut targets = match get("target_modules") {
            None => return Err(bad("missing target_modules".into())),
            Some(Value::Array(list)) => {
                let mut t = Vec::new();
                for m in list {
                    let name = m.as_str().ok_or_else(|| bad(format!("target_modules entry {m} is not a string")))?;
                    t.push(module(name)?);
                }
                t
            }
            Some(Value::String(s)) if s == "all-linear" => Projection::ALL.to_vec(),
            Some(Value::String(s)) if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => vec![module(s)?],
            Some(Value::String(s)) => {
                return Err(unsupported(format!(
                    "target_modules is the regular expression \"{s}\"; only a list of module names (or \"all-linear\") is supported"
                )));
            }
            Some(other) => return Err(bad(format!("target_modules should be a list of names, found {other}"))),
        };
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(bad("target_modules is empty".into()));
        }
        Ok(LoraConfig { rank, alpha, use_rslora, targets })
    }
}

/// [`LoraError::Invalid`] unless `config` has a rank above 0, a finite alpha and at least one
/// target, the targets in [`Projection::ALL`] order without repeats (as
/// [`LoraConfig::parse`] gives them).
fn check_config(config: &LoraConfig) -> Result<(), LoraError> {
    let invalid = |what: String| Err(LoraError::Invalid { what });
    if config.rank == 0 {
        return invalid("rank r = 0 (it must be at least 1)".into());
    }
    if !config.alpha.is_finite() {
        return invalid(format!("lora_alpha = {} is not a finite number", config.alpha));
    }
    if config.targets.is_empty() {
        return invalid("no target module".into());
    }
    if !config.targets.windows(2).all(|w| w[0] < w[1]) {
        return invalid(format!("targets {:?} are not in layer order without repeats", config.targets));
    }
    Ok(())
}

/// One adapted projection: `delta W = scaling · B A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `lora_A` `[r, in]` f32.
    pub a: Vec<f32>,
    /// `lora_B` `[out, r]` f32.
    pub b: Vec<f32>,
}

/// The sizes of the base model an adapter was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraDims {
    /// Decoder layers.
    pub n_layers: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Rows of the q projection (`n_heads * head_dim`).
    pub q_dim: usize,
    /// Rows of the k and v projections (`n_kv_heads * head_dim`).
    pub kv_dim: usize,
    /// MLP intermediate size.
    pub d_ff: usize,
}

impl LoraDims {
    /// `(out, in)` of projection `p`'s base weight `[out, in]` (so `lora_A` is `[r, in]` and
    /// `lora_B` is `[out, r]`); the same as [`Projection::dims`] on the model's configuration.
    pub fn projection(&self, p: Projection) -> (usize, usize) {
        match p {
            Projection::Q => (self.q_dim, self.d_model),
            Projection::K | Projection::V => (self.kv_dim, self.d_model),
            Projection::O => (self.d_model, self.q_dim),
            Projection::Gate | Projection::Up => (self.d_ff, self.d_model),
            Projection::Down => (self.d_model, self.d_ff),
        }
    }

    /// The sizes of a model of `cfg`.
    pub fn of(cfg: &ModelConfig) -> LoraDims {
        LoraDims {
            n_layers: cfg.n_layers,
            d_model: cfg.d_model,
            q_dim: cfg.n_heads * cfg.head_dim,
            kv_dim: cfg.n_kv_heads * cfg.head_dim,
            d_ff: cfg.d_ff,
        }
    }
}

/// A LoRA adapter on the CPU, shape-checked against one base model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// The adapter folder (empty for an adapter made in memory by [`LoraAdapter::init`]).
    pub dir: PathBuf,
    /// Its `adapter_config.json`.
    pub config: LoraConfig,
    /// The base model sizes it was checked against.
    pub dims: LoraDims,
    /// `layers[l][p.index()]`: the pair of projection `p` in layer `l`, when targeted.
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraAdapter {
    /// Read `dir/adapter_config.json` and `dir/adapter_model.safetensors` and check every tensor
    /// against `base` (the model the adapter will be applied to). Errors: every [`LoraError`]
    /// but [`LoraError::WrongModel`] and [`LoraError::BadScale`].
    pub fn load(dir: &Path, base: &ModelConfig) -> Result<LoraAdapter, LoraError> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| LoraError::Io { path: config_path.clone(), source })?;
        let config = LoraConfig::parse(&config_path, &text)?;
        let path = dir.join("adapter_model.safetensors");
        if !path.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                " (found adapter_model.bin: only safetensors adapters are read; save with safe_serialization=True)".to_string()
            } else {
                String::new()
            };
            return Err(LoraError::MissingWeights { dir: dir.to_path_buf(), hint });
        }
        let bytes = std::fs::read(&path).map_err(|source| LoraError::Io { path: path.clone(), source })?;
        Self::from_safetensors(dir, &path, &bytes, config, base)
    }

    /// Build from the bytes of a safetensors file (`path` is for messages); errors as
    /// [`LoraAdapter::load`].
    pub fn from_safetensors(
        dir: &Path,
        path: &Path,
        bytes: &[u8],
        config: LoraConfig,
        base: &ModelConfig,
    ) -> Result<LoraAdapter, LoraError> {
        let st = SafeTensors::deserialize(bytes).map_err(|source| LoraError::SafeTensors { path: path.to_path_buf(), source })?;
        let r = config.rank;
        let n_layers = base.n_layers;
        let mut a_parts: Vec<[Option<Vec<f32>>; 7]> = (0..n_layers).map(|_| Default::default()).collect();
        let mut b_parts: Vec<[Option<Vec<f32>>; 7]> = (0..n_layers).map(|_| Default::default()).collect();
        let bad = |tensor: &str, what: String| LoraError::BadTensor { path: path.to_path_buf(), tensor: tensor.to_string(), what };
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        for name in &names {
            let LoraTensorName { layer, projection: p, factor } = LoraTensorName::parse(name).ok_or_else(|| {
                bad(
                    name,
                    "not a lora_A / lora_B weight of a decoder-layer projection (embedding adapters, biases and modules_to_save are not supported)"
                        .into(),
                )
            })?;
            if !config.targets.contains(&p) {
                return Err(bad(name, format!("{} is not in target_modules", p.module())));
            }
            if layer >= n_layers {
                return Err(bad(name, format!("layer {layer} does not exist: the base model {} has {n_layers} layers", base.name)));
            }
            let t = st.tensor(name).map_err(|source| LoraError::SafeTensors { path: path.to_path_buf(), source })?;
            let (out, inp) = p.dims(base);
            let expected = match factor {
                LoraFactor::A => vec![r, inp],
                LoraFactor::B => vec![out, r],
            };
            if t.shape() != expected.as_slice() {
                return Err(LoraError::Shape {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    expected,
                    found: t.shape().to_vec(),
                    model: base.name.clone(),
                });
            }
            let (size, convert): (usize, fn(&[u8]) -> f32) = match t.dtype() {
                Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                Dtype::F16 => (2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
                Dtype::BF16 => (2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                other => return Err(bad(name, format!("data type {other:?} (supported: F32, F16, BF16)"))),
            };
            let n: usize = expected.iter().product();
            if t.data().len() != n * size {
                return Err(bad(name, format!("{} bytes for shape {expected:?}", t.data().len())));
            }
            let data: Vec<f32> = t.data().chunks_exact(size).map(convert).collect();
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(bad(name, format!("element {i} is {}", data[i])));
            }
            let parts = match factor {
                LoraFactor::A => &mut a_parts,
                LoraFactor::B => &mut b_parts,
            };
            let slot = &mut parts[layer][p.index()];
            *slot = Some(data);
        }
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for &p in &config.targets {
                let missing = |factor| LoraError::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: LoraTensorName { layer: l, projection: p, factor }.key(),
                    layer: l,
                    module: p.module(),
                };
                let a = a_parts[l][p.index()].take().ok_or_else(|| missing(LoraFactor::A))?;
                let b = b_parts[l][p.index()].take().ok_or_else(|| missing(LoraFactor::B))?;
                pairs[p.index()] = Some(LoraPair { a, b });
            }
            layers.push(pairs);
        }
        Ok(LoraAdapter { dir: dir.to_path_buf(), config, dims: LoraDims::of(base), layers })
    }

    /// A new adapter as PEFT initialises one (`init_lora_weights=True`): every targeted
    /// projection of every layer gets `lora_A` `[r, in]` drawn from Kaiming-uniform with
    /// `a = sqrt(5)` (`torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))`, whose bound
    /// `gain · sqrt(3 / fan_in)` with `gain = sqrt(2 / (1 + a²))` is `1 / sqrt(in)`), i.e.
    /// uniform in `[-1/sqrt(in), 1/sqrt(in))`, and `lora_B` `[out, r]` = 0, so the adapted model
    /// starts equal to the base model. f32 throughout.
    ///
    /// Deterministic: the values come from `StdRng::seed_from_u64(seed)` drawn layer by layer,
    /// projection by projection in [`Projection::ALL`] order, row-major; the same seed (and the
    /// same `rand` version) gives the same adapter. `config.targets` is sorted and deduplicated;
    /// `dir` is empty.
    ///
    /// Errors: [`LoraError::Invalid`] for a rank of 0, an alpha that is not finite, or no target.
    pub fn init(mut config: LoraConfig, dims: LoraDims, seed: u64) -> Result<LoraAdapter, LoraError> {
        use rand::{Rng, SeedableRng};
        config.targets.sort();
        config.targets.dedup();
        check_config(&config)?;
        let r = config.rank;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let layers = (0..dims.n_layers)
            .map(|_| {
                let mut pairs: [Option<LoraPair>; 7] = Default::default();
                for &p in &config.targets {
                    let (out, inp) = dims.projection(p);
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a = (0..r * inp).map(|_| rng.random_range(-bound..bound)).collect();
                    pairs[p.index()] = Some(LoraPair { a, b: vec![0.0; out * r] });
                }
                pairs
            })
            .collect();
        Ok(LoraAdapter { dir: PathBuf::new(), config, dims, layers })
    }

    /// [`LoraError::Invalid`] unless the adapter is one [`LoraAdapter::load`] would give back:
    /// a valid config, `dims.n_layers` layers, and in every layer exactly the targeted
    /// projections, each with `lora_A` of `r · in` and `lora_B` of `out · r` finite values.
    pub fn validate(&self) -> Result<(), LoraError> {
        check_config(&self.config)?;
        let invalid = |what: String| LoraError::Invalid { what };
        if self.layers.len() != self.dims.n_layers {
            return Err(invalid(format!("{} layers for a model of {}", self.layers.len(), self.dims.n_layers)));
        }
        let r = self.config.rank;
        for (l, pairs) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                let targeted = self.config.targets.contains(&p);
                let (out, inp) = self.dims.projection(p);
                let key = |factor| LoraTensorName { layer: l, projection: p, factor }.key();
                match (&pairs[p.index()], targeted) {
                    (None, false) => {}
                    (None, true) => return Err(invalid(format!("layer {l}: {} is a target but has no factors", p.module()))),
                    (Some(_), false) => return Err(invalid(format!("layer {l}: {} has factors but is not a target", p.module()))),
                    (Some(pair), true) => {
                        for (factor, values, want) in [(LoraFactor::A, &pair.a, [r, inp]), (LoraFactor::B, &pair.b, [out, r])] {
                            if values.len() != want[0] * want[1] {
                                return Err(invalid(format!("{}: {} values for shape {want:?}", key(factor), values.len())));
                            }
                            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                                return Err(invalid(format!("{}: element {i} is {}", key(factor), values[i])));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The `adapter_config.json` that Hugging Face PEFT writes for this LoRA (and reads with
    /// `PeftModel.from_pretrained`): `peft_type` `"LORA"`, `task_type` `"CAUSAL_LM"`, `r`,
    /// `lora_alpha` (an integer when it is one), `use_rslora`, `target_modules` (module names in
    /// [`Projection::ALL`] order), `lora_dropout` 0, `bias` `"none"`, `fan_in_fan_out` false,
    /// `use_dora` false, `init_lora_weights` true, `inference_mode` true, `modules_to_save`,
    /// `layers_to_transform`, `layers_pattern`, `revision` null, `rank_pattern` and
    /// `alpha_pattern` empty, and `base_model_name_or_path` (null when `None`).
    pub fn peft_config_json(&self, base_model: Option<&str>) -> String {
        let alpha = self.config.alpha;
        let alpha =
            if alpha.fract() == 0.0 && alpha.abs() < 1e15 { serde_json::json!(alpha as i64) } else { serde_json::json!(alpha as f64) };
        let targets: Vec<&str> = self.config.targets.iter().map(|p| p.module()).collect();
        let v = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "revision": null,
            "r": self.config.rank,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "use_rslora": self.config.use_rslora,
            "use_dora": false,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        // A json! object of plain values always serialises.
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// Write the adapter as PEFT does, into `dir` (created with its parents when missing):
    /// `adapter_model.safetensors` (every factor f32 under PEFT's key, e.g.
    /// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` `[r, in]` and
    /// `...lora_B.weight` `[out, r]`; metadata `format` = `pt` as `save_pretrained` writes)
    /// then `adapter_config.json` ([`LoraAdapter::peft_config_json`] with `base_model` as
    /// `base_model_name_or_path`). Each file is written atomically (a temporary name in `dir`,
    /// then a rename), the weights first: an interrupted save leaves each file either old or
    /// new, and a new weights file beside an old config of another rank or target list is
    /// refused by [`LoraAdapter::load`], never read as another adapter. The adapter loads back
    /// equal (with `dir` set to the folder).
    ///
    /// Errors: [`LoraError::Invalid`] (see [`LoraAdapter::validate`]) before anything is
    /// written; [`LoraError::Write`] naming the folder or file that could not be written;
    /// [`LoraError::SafeTensors`] if serialisation fails.
    pub fn save(&self, dir: &Path, base_model: Option<&str>) -> Result<(), LoraError> {
        self.validate()?;
        std::fs::create_dir_all(dir).map_err(|source| LoraError::Write { path: dir.to_path_buf(), source })?;
        let weights_path = dir.join("adapter_model.safetensors");
        let r = self.config.rank;
        let mut owned: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (l, pairs) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                let Some(pair) = &pairs[p.index()] else { continue };
                let (out, inp) = self.dims.projection(p);
                let key = |factor| LoraTensorName { layer: l, projection: p, factor }.key();
                owned.push((key(LoraFactor::A), vec![r, inp], &pair.a));
                owned.push((key(LoraFactor::B), vec![out, r], &pair.b));
            }
        }
        let st_err = |source| LoraError::SafeTensors { path: weights_path.clone(), source };
        let views = owned
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data)).map(|v| (name.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(st_err)?;
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(st_err)?;
        super::atomic::write_atomic(&weights_path, &bytes).map_err(|source| LoraError::Write { path: weights_path.clone(), source })?;
        let config_path = dir.join("adapter_config.json");
        let text = self.peft_config_json(base_model);
        super::atomic::write_atomic(&config_path, text.as_bytes()).map_err(|source| LoraError::Write { path: config_path, source })
    }

    /// The LoRA rank r.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// `alpha / r` (or `alpha / sqrt(r)`): the factor in front of `B A` at user scale 1.
    pub fn scaling(&self) -> f32 {
        self.config.scaling()
    }

    /// The pair of projection `p` in layer `layer`, when targeted.
    pub fn pair(&self, layer: usize, p: Projection) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[p.index()].as_ref())
    }

    /// [`LoraError::WrongModel`] unless the adapter was checked against a model of `cfg`'s sizes.
    pub fn check_model(&self, cfg: &ModelConfig) -> Result<(), LoraError> {
        if self.dims != LoraDims::of(cfg) {
            return Err(LoraError::WrongModel {
                dir: self.dir.clone(),
                what: format!("made for sizes {:?}, the model {} has {:?}", self.dims, cfg.name, LoraDims::of(cfg)),
            });
        }
        Ok(())
    }

    /// `W += scale · scaling · B A` for projection `p` of layer `layer` (no-op when not targeted).
    /// `w` is the base weight `[out, in]` f32; [`LoraError::WrongModel`] when its shape differs.
    pub fn merge_into(&self, layer: usize, p: Projection, w: &mut HostTensor, scale: f32) -> Result<(), LoraError> {
        let Some(pair) = self.pair(layer, p) else { return Ok(()) };
        let r = self.config.rank;
        let (out, inp) = (pair.b.len() / r, pair.a.len() / r);
        if w.shape != [out, inp] || w.data.len() != out * inp {
            return Err(LoraError::WrongModel {
                dir: self.dir.clone(),
                what: format!(
                    "{} is {:?}, the adapter's {} needs [{out}, {inp}]",
                    w.name,
                    w.shape,
                    LoraTensorName { layer, projection: p, factor: LoraFactor::B }.key()
                ),
            });
        }
        let s = scale * self.scaling();
        for (o, row) in w.data.chunks_exact_mut(inp).enumerate() {
            for k in 0..r {
                let c = s * pair.b[o * r + k]; // B[o, k]
                if c != 0.0 {
                    for (wv, &av) in row.iter_mut().zip(&pair.a[k * inp..(k + 1) * inp]) {
                        *wv += c * av; // A[k, :]
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::TempDir;

    use crate::testdata::tiny_llama_config as tiny_config;

    fn config_json(extra: &[(&str, Value)]) -> String {
        let mut v = serde_json::json!({
            "peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none", "use_dora": false, "use_rslora": false,
            "fan_in_fan_out": false, "layers_to_transform": null, "rank_pattern": {}, "alpha_pattern": {},
            "target_modules": ["q_proj", "v_proj", "down_proj"],
        });
        for (k, val) in extra {
            v[*k] = val.clone();
        }
        v.to_string()
    }

    fn parse(extra: &[(&str, Value)]) -> Result<LoraConfig, LoraError> {
        LoraConfig::parse(Path::new("x/adapter_config.json"), &config_json(extra))
    }

    /// Every tensor of a rank-`r` adapter on `targets` for `cfg`, with optional overrides.
    fn tensors(cfg: &ModelConfig, r: usize, targets: &[Projection]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        for l in 0..cfg.n_layers {
            for &p in targets {
                let (o, i) = p.dims(cfg);
                let fill = |n: usize, seed: usize| (0..n).map(|j| ((j * 7 + seed * 13) % 11) as f32 * 0.1 - 0.5).collect::<Vec<f32>>();
                let key = |factor| LoraTensorName { layer: l, projection: p, factor }.key();
                out.push((key(LoraFactor::A), vec![r, i], fill(r * i, l * 10 + p.index())));
                out.push((key(LoraFactor::B), vec![o, r], fill(o * r, l * 10 + p.index() + 100)));
            }
        }
        out
    }

    fn write(dir: &Path, config: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
        std::fs::write(dir.join("adapter_config.json"), config).unwrap();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(d)).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    }

    const TARGETS: [Projection; 3] = [Projection::Q, Projection::V, Projection::Down];

    #[test]
    fn config_options() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.rank, c.alpha, c.scaling()), (2, 4.0, 2.0));
        assert_eq!(c.targets, TARGETS);
        let c = parse(&[("use_rslora", Value::Bool(true))]).unwrap();
        assert!((c.scaling() - 4.0 / 2f32.sqrt()).abs() < 1e-6);
        assert_eq!(parse(&[("target_modules", "all-linear".into())]).unwrap().targets, Projection::ALL);
        assert_eq!(parse(&[("target_modules", serde_json::json!(["self_attn.o_proj"]))]).unwrap().targets, [Projection::O]);
        // PEFT resets fan_in_fan_out for Linear layers; so do we.
        assert!(parse(&[("fan_in_fan_out", Value::Bool(true))]).is_ok());

        let err = |extra: &[(&str, Value)]| parse(extra).unwrap_err().to_string();
        assert!(err(&[("use_dora", Value::Bool(true))]).contains("use_dora"), "{}", err(&[("use_dora", Value::Bool(true))]));
        assert!(err(&[("bias", "all".into())]).contains("bias = \"all\""));
        assert!(err(&[("bias", "lora_only".into())]).contains("only \"none\""));
        assert!(err(&[("layers_to_transform", serde_json::json!([0, 1]))]).contains("layers_to_transform"));
        assert!(err(&[("rank_pattern", serde_json::json!({"q_proj": 4}))]).contains("rank_pattern"));
        assert!(err(&[("alpha_pattern", serde_json::json!({"q_proj": 4}))]).contains("alpha_pattern"));
        assert!(err(&[("modules_to_save", serde_json::json!(["lm_head"]))]).contains("modules_to_save"));
        assert!(err(&[("target_modules", ".*(q|v)_proj".into())]).contains("regular expression"));
        assert!(err(&[("target_modules", serde_json::json!(["q_proj", "lm_head"]))]).contains("'lm_head'"));
        assert!(err(&[("target_modules", serde_json::json!(["mlp.q_proj"]))]).contains("'mlp.q_proj'"));
        assert!(err(&[("r", 0.into())]).contains("positive integer"));
        assert!(err(&[("peft_type", "IA3".into())]).contains("peft_type"));
    }

    #[test]
    fn loads_and_checks_shapes() {
        let cfg = tiny_config();
        let dir = TempDir::new("lora-ok");
        write(&dir.path, &config_json(&[]), &tensors(&cfg, 2, &TARGETS));
        let a = LoraAdapter::load(&dir.path, &cfg).unwrap();
        assert_eq!(a.rank(), 2);
        assert!(a.pair(1, Projection::Down).is_some() && a.pair(1, Projection::K).is_none());
        assert_eq!(a.pair(0, Projection::V).unwrap().a.len(), 2 * 8);

        // Another model's shapes: k_proj's `in` of 8 against a d_model of 16.
        let mut other = cfg.clone();
        other.d_model = 16;
        let e = LoraAdapter::load(&dir.path, &other).unwrap_err().to_string();
        assert!(e.contains("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight") && e.contains("another model"), "{e}");

        // One wrong tensor among right ones.
        let mut t = tensors(&cfg, 2, &TARGETS);
        let bad = t.iter_mut().find(|(n, _, _)| n.contains("layers.1.self_attn.v_proj.lora_A")).unwrap();
        bad.1 = vec![2, 7];
        bad.2.truncate(14);
        let dir2 = TempDir::new("lora-shape");
        write(&dir2.path, &config_json(&[]), &t);
        let e = LoraAdapter::load(&dir2.path, &cfg).unwrap_err().to_string();
        assert!(e.contains("'base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight' has shape [2, 7]"), "{e}");

        // A missing half, a tensor outside target_modules, a layer past the end.
        let mut t = tensors(&cfg, 2, &TARGETS);
        t.retain(|(n, _, _)| !n.contains("layers.1.self_attn.q_proj.lora_B"));
        write(&dir2.path, &config_json(&[]), &t);
        let e = LoraAdapter::load(&dir2.path, &cfg).unwrap_err().to_string();
        assert!(e.contains("missing tensor 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'"), "{e}");
        write(&dir2.path, &config_json(&[]), &tensors(&cfg, 2, &Projection::ALL));
        let e = LoraAdapter::load(&dir2.path, &cfg).unwrap_err().to_string();
        assert!(e.contains("gate_proj is not in target_modules"), "{e}");
        let mut deep = cfg.clone();
        deep.n_layers = 3;
        write(&dir2.path, &config_json(&[]), &tensors(&deep, 2, &TARGETS));
        let e = LoraAdapter::load(&dir2.path, &cfg).unwrap_err().to_string();
        assert!(e.contains("layer 2 does not exist"), "{e}");

        // No safetensors, but a .bin.
        std::fs::remove_file(dir2.path.join("adapter_model.safetensors")).unwrap();
        std::fs::write(dir2.path.join("adapter_model.bin"), b"pickle").unwrap();
        let e = LoraAdapter::load(&dir2.path, &cfg).unwrap_err().to_string();
        assert!(e.contains("only safetensors"), "{e}");
    }

    fn tiny_dims() -> LoraDims {
        LoraDims::of(&tiny_config())
    }

    #[test]
    fn init_is_peft_default_and_seeded() {
        let dims = tiny_dims();
        let config = LoraConfig { rank: 3, alpha: 6.0, use_rslora: false, targets: vec![Projection::Down, Projection::Q, Projection::Q] };
        let a = LoraAdapter::init(config.clone(), dims, 7).unwrap();
        assert_eq!(a.config.targets, [Projection::Q, Projection::Down]);
        a.validate().unwrap();
        let mut seen_negative = false;
        for l in 0..dims.n_layers {
            for p in [Projection::Q, Projection::Down] {
                let (out, inp) = dims.projection(p);
                let pair = a.pair(l, p).unwrap();
                assert_eq!((pair.a.len(), pair.b.len()), (3 * inp, out * 3));
                let bound = 1.0 / (inp as f32).sqrt();
                assert!(pair.a.iter().all(|&v| (-bound..bound).contains(&v)), "layer {l} {p:?}");
                seen_negative |= pair.a.iter().any(|&v| v < 0.0);
                assert!(pair.b.iter().all(|&v| v == 0.0));
            }
            assert!(a.pair(l, Projection::K).is_none());
        }
        assert!(seen_negative);
        // Same seed, same adapter; another seed, another A.
        assert_eq!(LoraAdapter::init(config.clone(), dims, 7).unwrap(), a);
        let other = LoraAdapter::init(config.clone(), dims, 8).unwrap();
        assert_ne!(other.pair(0, Projection::Q).unwrap().a, a.pair(0, Projection::Q).unwrap().a);

        let err = |c: LoraConfig| LoraAdapter::init(c, dims, 0).unwrap_err().to_string();
        assert!(err(LoraConfig { rank: 0, ..config.clone() }).contains("rank r = 0"));
        assert!(err(LoraConfig { alpha: f32::NAN, ..config.clone() }).contains("lora_alpha = NaN"));
        assert!(err(LoraConfig { targets: vec![], ..config }).contains("no target"));
    }

    #[test]
    fn save_writes_peft_files_that_load_back_equal() {
        let cfg = tiny_config();
        let config = LoraConfig { rank: 2, alpha: 5.5, use_rslora: true, targets: vec![Projection::K, Projection::O, Projection::Up] };
        let mut adapter = LoraAdapter::init(config, LoraDims::of(&cfg), 1).unwrap();
        // B non-zero (as after training), with values that f32 -> text -> f32 would not keep.
        for pairs in &mut adapter.layers {
            for pair in pairs.iter_mut().flatten() {
                for (i, b) in pair.b.iter_mut().enumerate() {
                    *b = (i as f32 + 0.1).sin() / 3.0;
                }
            }
        }
        let dir = TempDir::new("lora-save");
        let folder = dir.join("out/adapter");
        adapter.save(&folder, Some("HuggingFaceTB/SmolLM2-135M-Instruct")).unwrap();
        let loaded = LoraAdapter::load(&folder, &cfg).unwrap();
        assert_eq!(loaded, LoraAdapter { dir: folder.clone(), ..adapter.clone() });
        let mut names: Vec<_> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);

        // What PEFT reads: the keys and shapes of its LoraModel, the config fields it needs.
        let json: Value = serde_json::from_str(&std::fs::read_to_string(folder.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(json["r"], 2);
        assert_eq!(json["lora_alpha"], 5.5);
        assert_eq!(json["use_rslora"], true);
        assert_eq!(json["target_modules"], serde_json::json!(["k_proj", "o_proj", "up_proj"]));
        assert_eq!(json["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!((json["bias"].as_str(), json["lora_dropout"].as_f64()), (Some("none"), Some(0.0)));
        assert!(json["modules_to_save"].is_null() && json["init_lora_weights"] == true && json["inference_mode"] == true);
        let bytes = std::fs::read(folder.join("adapter_model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 2 * 3 * 2);
        let o_b = st.tensor("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight").unwrap();
        assert_eq!((o_b.dtype(), o_b.shape()), (Dtype::F32, &[8, 2][..]));
        let up_a = st.tensor("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight").unwrap();
        assert_eq!(up_a.shape(), [2, 8]);
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");

        // An integral alpha is written as an integer; no base model is null. Saving again over
        // the folder replaces both files.
        adapter.config.alpha = 16.0;
        adapter.config.use_rslora = false;
        adapter.save(&folder, None).unwrap();
        let json: Value = serde_json::from_str(&std::fs::read_to_string(folder.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!((json["lora_alpha"].as_i64(), json["base_model_name_or_path"].is_null()), (Some(16), true));
        assert_eq!(LoraAdapter::load(&folder, &cfg).unwrap().config, adapter.config);
    }

    #[test]
    fn save_refuses_an_inconsistent_adapter_before_writing() {
        let dims = tiny_dims();
        let config = LoraConfig { rank: 2, alpha: 4.0, use_rslora: false, targets: vec![Projection::V] };
        let good = LoraAdapter::init(config, dims, 3).unwrap();
        let dir = TempDir::new("lora-save-bad");
        let folder = dir.join("a");
        let err = |a: &LoraAdapter| {
            let e = a.save(&folder, None).unwrap_err().to_string();
            assert!(!folder.exists(), "{e}");
            e
        };
        let mut a = good.clone();
        a.layers[1][Projection::V.index()].as_mut().unwrap().b.pop();
        assert!(err(&a).contains("layers.1.self_attn.v_proj.lora_B.weight: 7 values for shape [4, 2]"), "{}", err(&a));
        let mut a = good.clone();
        a.layers[0][Projection::V.index()].as_mut().unwrap().a[3] = f32::INFINITY;
        assert!(err(&a).contains("lora_A.weight: element 3 is inf"), "{}", err(&a));
        let mut a = good.clone();
        a.layers[0][Projection::Gate.index()] = a.layers[0][Projection::V.index()].clone();
        assert!(err(&a).contains("layer 0: gate_proj has factors but is not a target"), "{}", err(&a));
        let mut a = good.clone();
        a.layers.pop();
        assert!(err(&a).contains("1 layers for a model of 2"), "{}", err(&a));
        let mut a = good;
        a.config.targets = vec![Projection::V, Projection::K];
        assert!(err(&a).contains("not in layer order"), "{}", err(&a));
    }

    #[test]
    fn merge_adds_scaled_b_times_a() {
        let cfg = tiny_config();
        let dir = TempDir::new("lora-merge");
        write(&dir.path, &config_json(&[]), &tensors(&cfg, 2, &TARGETS));
        let a = LoraAdapter::load(&dir.path, &cfg).unwrap();
        let (out, inp) = Projection::Down.dims(&cfg);
        let base: Vec<f32> = (0..out * inp).map(|i| i as f32 * 0.01).collect();
        let mut w = HostTensor { name: "down".into(), shape: vec![out, inp], data: base.clone() };
        a.merge_into(1, Projection::Down, &mut w, 0.5).unwrap();
        let p = a.pair(1, Projection::Down).unwrap();
        for o in 0..out {
            for i in 0..inp {
                let d: f32 = (0..2).map(|k| p.b[o * 2 + k] * p.a[k * inp + i]).sum();
                let want = base[o * inp + i] + 0.5 * 2.0 * d;
                assert!((w.data[o * inp + i] - want).abs() < 1e-5, "[{o}, {i}]");
            }
        }
        // Not targeted: unchanged. Wrong shape: an error naming the tensor.
        let mut k = HostTensor { name: "k".into(), shape: vec![4, 8], data: vec![1.0; 32] };
        a.merge_into(0, Projection::K, &mut k, 1.0).unwrap();
        assert!(k.data.iter().all(|&v| v == 1.0));
        let mut q = HostTensor { name: "q".into(), shape: vec![8, 9], data: vec![0.0; 72] };
        assert!(a.merge_into(0, Projection::Q, &mut q, 1.0).unwrap_err().to_string().contains("q is [8, 9]"));
    }
}
