//! Hyper-parameters of a LLaMA-family model, read from GGUF metadata or a Hugging Face
//! `config.json`.

use std::path::Path;

use serde_json::Value;

use super::error::ModelError;
use super::gguf::GgufFile;
use super::names::{LayerTensor, Projection, TensorName};

/// Supported model families. All share the LLaMA block (RMSNorm, rotate-half RoPE, GQA
/// attention, SwiGLU MLP); Qwen2 adds q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA (`llama`, `LlamaForCausalLM`), also SmolLM2 and TinyLlama.
    Llama,
    /// Mistral (`mistral`, `MistralForCausalLM`): the LLaMA block, no sliding window here.
    Mistral,
    /// Qwen2 (`qwen2`, `Qwen2ForCausalLM`): the LLaMA block with q/k/v biases.
    Qwen2,
}

impl Arch {
    /// Maps a GGUF `general.architecture` or Hugging Face `model_type` / `architectures[0]`;
    /// [`ModelError::UnsupportedArch`] for any other name.
    pub fn from_name(name: &str) -> Result<Arch, ModelError> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Arch::Llama),
            "mistral" | "MistralForCausalLM" => Ok(Arch::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            other => Err(ModelError::UnsupportedArch { arch: other.to_owned() }),
        }
    }
}

/// Llama 3 style RoPE frequency scaling (`rope_type: "llama3"`), as in Hugging Face
/// `_compute_llama3_parameters` (transformers `modeling_rope_utils.py`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    /// `factor`: how much longer the context is than the original one.
    pub factor: f32,
    /// `low_freq_factor`: wavelengths above `original / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f32,
    /// `high_freq_factor`: wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings` (tokens): the context the model was pretrained with.
    pub original_max_position_embeddings: u32,
}

/// Llama 3.x defaults for the parameters that GGUF files do not store.
const LLAMA3_LOW_FREQ_FACTOR: f32 = 1.0;
const LLAMA3_HIGH_FREQ_FACTOR: f32 = 4.0;
const LLAMA3_ORIGINAL_CONTEXT: u32 = 8192;

/// The largest size a configuration may give (layers, hidden size, heads, head width, MLP
/// size, vocabulary, positions, and the q/k/v and gate/up row counts derived from them): the
/// kernels count rows, columns and positions in u32.
pub const MAX_SIZE: usize = u32::MAX as usize;

/// The GGUF key of a [`ModelConfig`] field, for messages.
pub(crate) fn gguf_key(arch: &str, field: &str) -> String {
    let suffix = match field {
        "n_layers" => "block_count",
        "d_model" => "embedding_length",
        "n_heads" => "attention.head_count",
        "n_kv_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        "d_ff" => "feed_forward_length",
        "max_position" => "context_length",
        "vocab_size" => return "vocab_size (tokenizer.ggml.tokens)".into(),
        other => other,
    };
    format!("{arch}.{suffix}")
}

/// The Hugging Face `config.json` key of a [`ModelConfig`] field, for messages.
pub(crate) fn hf_key(field: &str) -> String {
    match field {
        "n_layers" => "num_hidden_layers",
        "d_model" => "hidden_size",
        "n_heads" => "num_attention_heads",
        "n_kv_heads" => "num_key_value_heads",
        "d_ff" => "intermediate_size",
        "max_position" => "max_position_embeddings",
        other => other,
    }
    .to_owned()
}

/// What a forward pass needs to know about the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The model family.
    pub arch: Arch,
    /// Decoder layers (`num_hidden_layers`, GGUF `{arch}.block_count`).
    pub n_layers: usize,
    /// Hidden size (`hidden_size`, GGUF `{arch}.embedding_length`).
    pub d_model: usize,
    /// Query heads (`num_attention_heads`).
    pub n_heads: usize,
    /// Key/value heads (`num_key_value_heads`; fewer than `n_heads` for grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one head (`head_dim`, default `d_model / n_heads`); even.
    pub head_dim: usize,
    /// MLP intermediate size (`intermediate_size`, GGUF `{arch}.feed_forward_length`).
    pub d_ff: usize,
    /// Tokens in the vocabulary: rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// RMSNorm epsilon (`rms_norm_eps`).
    pub rms_eps: f32,
    /// RoPE base frequency (`rope_theta`, GGUF `{arch}.rope.freq_base`; default 10000).
    pub rope_theta: f32,
    /// Llama 3 frequency scaling, when the model uses it.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was made for, in tokens (`max_position_embeddings`).
    pub max_position: usize,
    /// The output projection reuses `model.embed_tokens.weight`.
    pub tied_embeddings: bool,
    /// q/k/v projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// A display name: GGUF `general.name`, or the Hugging Face folder's name.
    pub name: String,
}

fn to_usize(path: &Path, key: &str, v: u64) -> Result<usize, ModelError> {
    usize::try_from(v).map_err(|_| ModelError::BadConfig { path: path.to_path_buf(), what: format!("{key} = {v} does not fit in usize") })
}

impl ModelConfig {
    /// Reads the hyper-parameters from GGUF metadata (`{arch}.block_count`, ...). Errors: a
    /// missing or mistyped key, an unsupported architecture or RoPE scaling, inconsistent sizes.
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch_name = g.meta_str("general.architecture")?;
        let arch = Arch::from_name(arch_name)?;
        let key = |suffix: &str| format!("{arch_name}.{suffix}");
        let usize_key = |suffix: &str| -> Result<usize, ModelError> {
            let k = key(suffix);
            to_usize(&g.path, &k, g.meta_u64(&k)?)
        };
        let optional_usize = |suffix: &str| -> Result<Option<usize>, ModelError> {
            let k = key(suffix);
            match g.meta(&k) {
                None => Ok(None),
                Some(_) => usize_key(suffix).map(Some),
            }
        };

        let n_layers = usize_key("block_count")?;
        let d_model = usize_key("embedding_length")?;
        let n_heads = usize_key("attention.head_count")?;
        let n_kv_heads = optional_usize("attention.head_count_kv")?.unwrap_or(n_heads);
        let d_ff = usize_key("feed_forward_length")?;
        let head_dim = match optional_usize("attention.key_length")? {
            Some(hd) => hd,
            None => d_model.checked_div(n_heads).unwrap_or(0),
        };
        let rms_eps = g.meta_f64(&key("attention.layer_norm_rms_epsilon"))? as f32;
        let rope_theta = match g.meta(&key("rope.freq_base")) {
            None => 10_000.0,
            Some(_) => g.meta_f64(&key("rope.freq_base"))? as f32,
        };
        let max_position = usize_key("context_length")?;

        let vocab_size = if let Some(tokens) = g.meta("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            tokens.len()
        } else if let Some(n) = optional_usize("vocab_size")? {
            n
        } else {
            let embd_name = TensorName::EmbedTokens.gguf_name();
            let embd = g.tensor_info(&embd_name).ok_or_else(|| ModelError::MissingKey {
                path: g.path.clone(),
                key: format!("tokenizer.ggml.tokens (or {embd_name} for the vocabulary size)"),
            })?;
            let n = embd.dims.get(1).copied().unwrap_or(0);
            to_usize(&g.path, &format!("{embd_name} dims[1]"), n)?
        };

        let rope_scaling = Self::gguf_rope_scaling(g, arch_name)?;
        let name = g
            .meta("general.name")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .or_else(|| g.path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();

        let config = ModelConfig {
            arch,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff,
            vocab_size,
            rms_eps,
            rope_theta,
            rope_scaling,
            max_position,
            tied_embeddings: g.tensor_info(&TensorName::LmHead.gguf_name()).is_none(),
            qkv_bias: g.tensor_info(&TensorName::Layer(0, LayerTensor::Bias(Projection::Q)).gguf_name()).is_some(),
            name,
        };
        config.validate(&g.path, &|field| gguf_key(arch_name, field))?;
        Ok(config)
    }

    /// GGUF stores llama3 scaling either as `{arch}.rope.scaling.*` keys or only as a
    /// precomputed `rope_freqs.weight` tensor (llama.cpp's converter for Llama 3.1+). In the
    /// latter case the factor is the largest frequency divisor and the other parameters take
    /// the Llama 3 defaults (low 1, high 4, original context 8192).
    fn gguf_rope_scaling(g: &GgufFile, arch_name: &str) -> Result<Option<RopeScaling>, ModelError> {
        let key = |suffix: &str| format!("{arch_name}.rope.scaling.{suffix}");
        let kind = g.meta(&key("type")).and_then(|v| v.as_str());
        match kind {
            None | Some("none") => {}
            Some("llama3") => {
                let f32_or = |suffix: &str, default: f32| -> Result<f32, ModelError> {
                    match g.meta(&key(suffix)) {
                        None => Ok(default),
                        Some(_) => Ok(g.meta_f64(&key(suffix))? as f32),
                    }
                };
                let original = match g.meta(&key("original_context_length")) {
                    None => LLAMA3_ORIGINAL_CONTEXT,
                    Some(_) => u32::try_from(g.meta_u64(&key("original_context_length"))?).map_err(|_| ModelError::BadConfig {
                        path: g.path.clone(),
                        what: format!("{} does not fit in u32", key("original_context_length")),
                    })?,
                };
                return Ok(Some(RopeScaling {
                    factor: g.meta_f64(&key("factor"))? as f32,
                    low_freq_factor: f32_or("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR)?,
                    high_freq_factor: f32_or("high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR)?,
                    original_max_position_embeddings: original,
                }));
            }
            Some(other) => {
                return Err(ModelError::UnsupportedRopeScaling { path: g.path.clone(), kind: other.to_owned() });
            }
        }
        if g.tensor_info("rope_freqs.weight").is_some() {
            let freqs = g.tensor_f32("rope_freqs.weight")?;
            let factor = freqs.iter().copied().fold(1.0f32, f32::max);
            log::warn!(
                "{}: llama3 rope scaling taken from rope_freqs.weight (factor {factor}); \
                 assuming low_freq_factor {LLAMA3_LOW_FREQ_FACTOR}, high_freq_factor \
                 {LLAMA3_HIGH_FREQ_FACTOR}, original context {LLAMA3_ORIGINAL_CONTEXT}",
                g.path.display()
            );
            return Ok(Some(RopeScaling {
                factor,
                low_freq_factor: LLAMA3_LOW_FREQ_FACTOR,
                high_freq_factor: LLAMA3_HIGH_FREQ_FACTOR,
                original_max_position_embeddings: LLAMA3_ORIGINAL_CONTEXT,
            }));
        }
        Ok(None)
    }

    /// Reads a Hugging Face `config.json`. Errors as [`ModelConfig::from_hf_json`], plus
    /// [`ModelError::Io`] and [`ModelError::Json`].
    pub fn from_hf_config(path: &Path) -> Result<ModelConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
        let name = path.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self::from_hf_json(path, &json, name)
    }

    /// Parses an already-loaded `config.json` (`name` is the display name); `path` is used in
    /// errors only. Errors: a missing or mistyped key, an unsupported architecture or RoPE
    /// scaling, inconsistent sizes ([`ModelError::BadConfig`]).
    pub fn from_hf_json(path: &Path, json: &Value, name: String) -> Result<ModelConfig, ModelError> {
        let missing = |key: &str| ModelError::MissingKey { path: path.to_path_buf(), key: key.to_owned() };
        let bad = |key: &str, expected: &'static str| ModelError::WrongKeyType {
            path: path.to_path_buf(),
            key: key.to_owned(),
            expected,
            found: json.get(key).map(|v| v.to_string()).unwrap_or_default(),
        };
        let present = |key: &str| json.get(key).filter(|v| !v.is_null());
        let opt_usize = |key: &str| -> Result<Option<usize>, ModelError> {
            match present(key) {
                None => Ok(None),
                Some(v) => v.as_u64().and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| bad(key, "a non-negative integer")),
            }
        };
        let req_usize = |key: &str| opt_usize(key)?.ok_or_else(|| missing(key));
        let opt_f64 = |key: &str| -> Result<Option<f64>, ModelError> {
            match present(key) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(key, "a number")),
            }
        };

        let arch_name = present("model_type")
            .and_then(Value::as_str)
            .or_else(|| present("architectures").and_then(|a| a.get(0)).and_then(Value::as_str))
            .ok_or_else(|| missing("model_type"))?;
        let arch = Arch::from_name(arch_name)?;

        let d_model = req_usize("hidden_size")?;
        let n_heads = req_usize("num_attention_heads")?;
        let n_kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match opt_usize("head_dim")? {
            Some(hd) => hd,
            None => d_model.checked_div(n_heads).unwrap_or(0),
        };
        let tied_embeddings = match present("tie_word_embeddings") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| bad("tie_word_embeddings", "a bool"))?,
        };
        let qkv_bias = match (arch, present("attention_bias")) {
            (Arch::Qwen2, _) => true,
            (_, None) => false,
            (_, Some(v)) => v.as_bool().ok_or_else(|| bad("attention_bias", "a bool"))?,
        };

        let rope_scaling = match present("rope_scaling") {
            None => None,
            Some(rs) => {
                let kind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(Value::as_str).unwrap_or("(none)");
                if kind != "llama3" {
                    return Err(ModelError::UnsupportedRopeScaling { path: path.to_path_buf(), kind: kind.to_owned() });
                }
                let num = |key: &str| -> Result<f64, ModelError> {
                    rs.get(key).and_then(Value::as_f64).ok_or_else(|| missing(&format!("rope_scaling.{key}")))
                };
                const ORIGINAL: &str = "original_max_position_embeddings";
                let original = rs.get(ORIGINAL).ok_or_else(|| missing(&format!("rope_scaling.{ORIGINAL}")))?;
                let original = original.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| ModelError::WrongKeyType {
                    path: path.to_path_buf(),
                    key: format!("rope_scaling.{ORIGINAL}"),
                    expected: "an integer from 0 to 2^32 - 1",
                    found: original.to_string(),
                })?;
                Some(RopeScaling {
                    factor: num("factor")? as f32,
                    low_freq_factor: num("low_freq_factor")? as f32,
                    high_freq_factor: num("high_freq_factor")? as f32,
                    original_max_position_embeddings: original,
                })
            }
        };

        let config = ModelConfig {
            arch,
            n_layers: req_usize("num_hidden_layers")?,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff: req_usize("intermediate_size")?,
            vocab_size: req_usize("vocab_size")?,
            rms_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: opt_f64("rope_theta")?.unwrap_or(10_000.0) as f32,
            rope_scaling,
            max_position: req_usize("max_position_embeddings")?,
            tied_embeddings,
            qkv_bias,
            name,
        };
        config.validate(path, &hf_key)?;
        Ok(config)
    }

    /// Rejects sizes a forward pass cannot use: zeros, heads that do not group, odd head_dim,
    /// and any size over [`MAX_SIZE`] (the kernels count rows, columns and positions in u32),
    /// with checked arithmetic for the derived sizes (q/k/v rows, 2 d_ff, the parameter count).
    /// `key` maps a field name to the key the file spells it with, for the messages.
    fn validate(&self, path: &Path, key: &dyn Fn(&str) -> String) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::BadConfig { path: path.to_path_buf(), what });
        let limit = MAX_SIZE as u64;
        for (name, v) in [
            ("n_layers", self.n_layers),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("d_ff", self.d_ff),
            ("vocab_size", self.vocab_size),
            ("max_position", self.max_position),
        ] {
            if v == 0 && name != "max_position" {
                return bad(format!("{} is 0", key(name)));
            }
            if v > MAX_SIZE {
                return Err(ModelError::LimitExceeded { path: path.to_path_buf(), what: key(name), value: v as u64, limit });
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} heads are not a multiple of {} kv heads", self.n_heads, self.n_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd (RoPE rotates pairs)", self.head_dim));
        }
        let heads = self.n_heads.checked_add(2 * self.n_kv_heads);
        for (what, rows) in [
            ("n_heads * head_dim (q rows)", self.n_heads.checked_mul(self.head_dim)),
            ("(n_heads + 2 n_kv_heads) * head_dim (q, k and v rows)", heads.and_then(|h| h.checked_mul(self.head_dim))),
            ("2 * d_ff (gate and up rows)", self.d_ff.checked_mul(2)),
        ] {
            match rows {
                Some(r) if r <= MAX_SIZE => {}
                _ => {
                    return bad(format!(
                        "{what} is {}, over the limit of {MAX_SIZE}",
                        rows.map_or("more than usize".into(), |r| r.to_string())
                    ));
                }
            }
        }
        if self.checked_parameter_count().is_none() {
            return bad("the parameter count overflows a u64".into());
        }
        if let Some(what) = self.out_of_domain() {
            return bad(what);
        }
        Ok(())
    }

    /// The first floating-point or position value outside the domain where the forward pass
    /// stays finite, described with its key and the allowed range; None when all are inside:
    /// - `rms_norm_eps` finite and > 0 (RMSNorm divides by `sqrt(mean(x^2) + eps)`);
    /// - `rope_theta` finite and > 0 (`inv_freq = theta^(-2i/head_dim)`);
    /// - `max_position_embeddings` >= 1;
    /// - llama3 `rope_scaling` (HF `_compute_llama3_parameters`): `factor` finite and > 0 (low
    ///   frequencies are divided by it), `low_freq_factor` finite and > 0 and `high_freq_factor`
    ///   finite and greater than it (the smoothing divides by their difference),
    ///   `original_max_position_embeddings` >= 1 (wavelength bounds are divided from it).
    fn out_of_domain(&self) -> Option<String> {
        let positive = |x: f32| x > 0.0 && x.is_finite();
        if !positive(self.rms_eps) {
            return Some(format!("rms_norm_eps = {} must be a finite number > 0", self.rms_eps));
        }
        if !positive(self.rope_theta) {
            return Some(format!("rope_theta = {} must be a finite number > 0", self.rope_theta));
        }
        if self.max_position == 0 {
            return Some("max_position_embeddings (context length) is 0: must be at least 1".into());
        }
        let s = self.rope_scaling.as_ref()?;
        if !positive(s.factor) {
            return Some(format!("rope_scaling.factor = {} must be a finite number > 0", s.factor));
        }
        if !positive(s.low_freq_factor) {
            return Some(format!("rope_scaling.low_freq_factor = {} must be a finite number > 0", s.low_freq_factor));
        }
        if !(s.high_freq_factor.is_finite() && s.high_freq_factor > s.low_freq_factor) {
            return Some(format!(
                "rope_scaling.high_freq_factor = {} must be a finite number greater than low_freq_factor = {}",
                s.high_freq_factor, s.low_freq_factor
            ));
        }
        if s.original_max_position_embeddings == 0 {
            return Some("rope_scaling.original_max_position_embeddings is 0: must be at least 1".into());
        }
        None
    }

    /// Rows of the q projection: n_heads * head_dim.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Rows of each of the k and v projections: n_kv_heads * head_dim.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Parameters of one decoder layer (projections, norms and q/k/v biases); `None` on
    /// overflow (a configuration that passed validation never overflows).
    fn checked_layer_parameter_count(&self) -> Option<u64> {
        let (d, q, kv, ff) = (self.d_model as u64, self.q_dim() as u64, self.kv_dim() as u64, self.d_ff as u64);
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let attn = d.checked_mul(q.checked_add(kv.checked_mul(2)?)?)?.checked_add(q.checked_mul(d)?)?;
        let mlp = d.checked_mul(ff)?.checked_mul(3)?;
        attn.checked_add(mlp)?.checked_add(2 * d)?.checked_add(bias)
    }

    /// Parameters of the whole model (a tied LM head counted once); `None` on overflow.
    fn checked_parameter_count(&self) -> Option<u64> {
        let embed = (self.vocab_size as u64).checked_mul(self.d_model as u64)?;
        let head = if self.tied_embeddings { 0 } else { embed };
        let layers = (self.n_layers as u64).checked_mul(self.checked_layer_parameter_count()?)?;
        embed.checked_add(head)?.checked_add(self.d_model as u64)?.checked_add(layers)
    }

    /// Parameters of one decoder layer (projections, norms and q/k/v biases); saturates at
    /// u64::MAX for a configuration built by hand that would overflow (the parsers refuse those).
    pub fn layer_parameter_count(&self) -> u64 {
        self.checked_layer_parameter_count().unwrap_or(u64::MAX)
    }

    /// Parameters of the whole model (a tied LM head counted once); saturates like
    /// [`ModelConfig::layer_parameter_count`].
    pub fn parameter_count(&self) -> u64 {
        self.checked_parameter_count().unwrap_or(u64::MAX)
    }

    /// Bytes of one layer's K cache (and of its V cache) for `ctx_len` positions:
    /// `ctx_len * n_kv_heads * head_dim * 4` (f32 rows); `None` when that overflows a u64.
    pub fn kv_layer_bytes(&self, ctx_len: usize) -> Option<u64> {
        (ctx_len as u64).checked_mul(self.kv_dim() as u64)?.checked_mul(4)
    }

    /// Bytes of the whole KV cache for `ctx_len` positions when every layer runs: K and V of
    /// each of `n_layers` layers, `2 * n_layers * kv_layer_bytes(ctx_len)`; `None` on overflow.
    pub fn kv_cache_bytes(&self, ctx_len: usize) -> Option<u64> {
        self.kv_layer_bytes(ctx_len)?.checked_mul(2)?.checked_mul(self.n_layers as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{GgmlType, MetaValue};
    use crate::model::gguf_test_writer::GgufBuilder;
    use serde_json::json;

    fn llama_builder() -> GgufBuilder {
        GgufBuilder::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("general.name", MetaValue::String("tiny".into()))
            .kv("llama.block_count", MetaValue::U32(2))
            .kv("llama.embedding_length", MetaValue::U32(8))
            .kv("llama.attention.head_count", MetaValue::U32(2))
            .kv("llama.attention.head_count_kv", MetaValue::U32(1))
            .kv("llama.feed_forward_length", MetaValue::U32(12))
            .kv("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
            .kv("llama.rope.freq_base", MetaValue::F32(500_000.0))
            .kv("llama.context_length", MetaValue::U32(128))
            .kv("tokenizer.ggml.tokens", MetaValue::Array((0..5).map(|i| MetaValue::String(format!("t{i}"))).collect()))
    }

    #[test]
    fn gguf_llama_config() {
        let file = llama_builder().write_temp("cfg");
        let g = GgufFile::open(&file.path).unwrap();
        let c = ModelConfig::from_gguf(&g).unwrap();
        assert_eq!(
            c,
            ModelConfig {
                arch: Arch::Llama,
                n_layers: 2,
                d_model: 8,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                d_ff: 12,
                vocab_size: 5,
                rms_eps: 1e-5,
                rope_theta: 500_000.0,
                rope_scaling: None,
                max_position: 128,
                tied_embeddings: true,
                qkv_bias: false,
                name: "tiny".into(),
            }
        );
    }

    #[test]
    fn gguf_rope_scaling_from_keys_and_from_rope_freqs() {
        let b = llama_builder()
            .kv("llama.rope.scaling.type", MetaValue::String("llama3".into()))
            .kv("llama.rope.scaling.factor", MetaValue::F32(32.0))
            .kv("llama.rope.scaling.original_context_length", MetaValue::U32(8192));
        let file = b.write_temp("rope");
        let c = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap();
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 })
        );

        let b = llama_builder().f32_tensor("rope_freqs.weight", &[2], &[1.0, 8.0]);
        let file = b.write_temp("ropefreqs");
        let c = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap();
        assert_eq!(c.rope_scaling.map(|r| r.factor), Some(8.0));

        let b = llama_builder().kv("llama.rope.scaling.type", MetaValue::String("yarn".into()));
        let file = b.write_temp("yarn");
        let err = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedRopeScaling { ref kind, .. } if kind == "yarn"));
    }

    #[test]
    fn gguf_missing_key_and_unsupported_arch() {
        let mut b = llama_builder();
        b.kvs.retain(|(k, _)| k != "llama.feed_forward_length");
        let file = b.write_temp("nokey");
        let err = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap_err();
        assert!(matches!(err, ModelError::MissingKey { ref key, .. } if key == "llama.feed_forward_length"), "{err}");

        let b = GgufBuilder::new().kv("general.architecture", MetaValue::String("mamba".into()));
        let file = b.write_temp("mamba");
        let err = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mamba") && msg.contains("qwen2") && msg.contains("llama"), "{msg}");
    }

    #[test]
    fn gguf_untied_and_biased() {
        let b =
            llama_builder().tensor("output.weight", &[8, 5], GgmlType::F32, vec![0; 160]).f32_tensor("blk.0.attn_q.bias", &[8], &[0.0; 8]);
        let file = b.write_temp("untied");
        let c = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap();
        assert!(!c.tied_embeddings);
        assert!(c.qkv_bias);
    }

    #[test]
    fn hf_llama3_config() {
        let json = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_attention_heads": 32,
            "num_hidden_layers": 16,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "max_position_embeddings": 131072,
            "tie_word_embeddings": true,
            "vocab_size": 128256
        });
        let c = ModelConfig::from_hf_json(Path::new("config.json"), &json, "Llama-3.2-1B".into()).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim), (16, 2048, 32, 8, 64));
        assert_eq!((c.d_ff, c.vocab_size, c.max_position), (8192, 128256, 131072));
        assert_eq!((c.rms_eps, c.rope_theta), (1e-5, 500000.0));
        assert!(c.tied_embeddings && !c.qkv_bias);
        assert_eq!(c.rope_scaling.unwrap().factor, 32.0);
    }

    #[test]
    fn hf_qwen2_and_mistral_configs() {
        let json = json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "tie_word_embeddings": true, "vocab_size": 151936, "rope_scaling": null
        });
        let c = ModelConfig::from_hf_json(Path::new("config.json"), &json, String::new()).unwrap();
        assert_eq!((c.arch, c.head_dim, c.qkv_bias, c.rope_scaling), (Arch::Qwen2, 64, true, None));

        let json = json!({
            "model_type": "mistral", "hidden_size": 5120, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 1024000, "vocab_size": 131072
        });
        let c = ModelConfig::from_hf_json(Path::new("config.json"), &json, String::new()).unwrap();
        assert_eq!((c.arch, c.head_dim, c.tied_embeddings, c.rope_theta), (Arch::Mistral, 128, false, 10000.0));
    }

    /// Issue 15 §1: sizes beyond what the kernels can count (u32) are refused naming the key,
    /// and derived sizes are computed with checked arithmetic.
    #[test]
    fn sizes_over_the_limit_name_the_key() {
        let mut b = llama_builder();
        b.kvs.iter_mut().find(|(k, _)| k == "llama.block_count").unwrap().1 = MetaValue::U64(1 << 40);
        let file = b.write_temp("layers");
        let err = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap_err();
        assert!(
            matches!(err, ModelError::LimitExceeded { ref what, value, .. } if what == "llama.block_count" && value == 1 << 40),
            "{err}"
        );

        let base = json!({"model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
            "num_attention_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 16, "vocab_size": 4});
        let mut j = base.clone();
        j["num_hidden_layers"] = json!(1_099_511_627_776u64);
        let err = ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()).unwrap_err();
        assert!(err.to_string().contains("num_hidden_layers is 1099511627776, over the limit of 4294967295"), "{err}");

        // q rows = 2 * 2^31 and gate/up rows = 2 * 2^31 overflow u32, each size alone does not
        let mut j = base.clone();
        j["head_dim"] = json!(1u64 << 31);
        let err = ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()).unwrap_err();
        assert!(matches!(err, ModelError::BadConfig { ref what, .. } if what.contains("q rows")), "{err}");
        let mut j = base;
        j["intermediate_size"] = json!(1u64 << 31);
        let err = ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()).unwrap_err();
        assert!(matches!(err, ModelError::BadConfig { ref what, .. } if what.contains("gate and up")), "{err}");

        let c = ModelConfig::from_gguf(&GgufFile::open(&llama_builder().write_temp("kv").path).unwrap()).unwrap();
        assert_eq!(c.kv_layer_bytes(128), Some(128 * 4 * 4));
        assert_eq!(c.kv_cache_bytes(128), Some(2 * 2 * 128 * 4 * 4));
        assert_eq!(c.kv_layer_bytes(1 << 62), None);
    }

    #[test]
    fn gguf_llama3_scaling_factor_zero_is_refused_at_load() {
        // issue 15: a factor of 0 made every logit NaN and the run end with empty text.
        let b = llama_builder()
            .kv("llama.rope.scaling.type", MetaValue::String("llama3".into()))
            .kv("llama.rope.scaling.factor", MetaValue::F32(0.0));
        let file = b.write_temp("rope0");
        let err = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap_err();
        assert!(matches!(err, ModelError::BadConfig { .. }), "{err}");
        assert!(err.to_string().contains("rope_scaling.factor = 0"), "{err}");

        let mut b = llama_builder();
        b.kvs.retain(|(k, _)| k != "llama.rope.freq_base");
        let b = b.kv("llama.rope.freq_base", MetaValue::F32(f32::NAN));
        let file = b.write_temp("thetanan");
        let err = ModelConfig::from_gguf(&GgufFile::open(&file.path).unwrap()).unwrap_err();
        assert!(err.to_string().contains("rope_theta = NaN"), "{err}");
    }

    #[test]
    fn hf_values_outside_their_domain_are_refused() {
        let base = json!({"model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
            "num_attention_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 16, "vocab_size": 4,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}});
        assert!(ModelConfig::from_hf_json(Path::new("c.json"), &base, String::new()).is_ok());
        let cases: [(&str, Value, &str); 11] = [
            ("/rope_scaling/factor", json!(0.0), "rope_scaling.factor"),
            ("/rope_scaling/factor", json!(-2.0), "rope_scaling.factor"),
            ("/rope_scaling/factor", json!(1e39), "rope_scaling.factor"),
            ("/rope_scaling/low_freq_factor", json!(0.0), "rope_scaling.low_freq_factor"),
            ("/rope_scaling/high_freq_factor", json!(1.0), "rope_scaling.high_freq_factor"),
            ("/rope_scaling/original_max_position_embeddings", json!(0), "rope_scaling.original_max_position_embeddings"),
            ("/rms_norm_eps", json!(0.0), "rms_norm_eps"),
            ("/rms_norm_eps", json!(-1e-6), "rms_norm_eps"),
            ("/rope_theta", json!(0.0), "rope_theta"),
            ("/rope_theta", json!(-10000.0), "rope_theta"),
            ("/max_position_embeddings", json!(0), "max_position_embeddings"),
        ];
        for (pointer, value, key) in cases {
            let mut j = base.clone();
            let mut slot = &mut j;
            for part in pointer.split('/').skip(1) {
                slot = &mut slot[part];
            }
            *slot = value.clone();
            let err = ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()).unwrap_err();
            assert!(matches!(err, ModelError::BadConfig { .. }), "{pointer} = {value}: {err}");
            assert!(err.to_string().contains(key), "{pointer} = {value}: {err}");
        }
        let mut j = base;
        j["rope_scaling"]["original_max_position_embeddings"] = json!(-1);
        let err = ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()).unwrap_err();
        assert!(matches!(err, ModelError::WrongKeyType { ref key, .. } if key == "rope_scaling.original_max_position_embeddings"), "{err}");
    }

    #[test]
    fn hf_errors_name_the_problem() {
        let base = json!({"model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
            "num_attention_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 16, "vocab_size": 4});
        assert!(ModelConfig::from_hf_json(Path::new("c.json"), &base, String::new()).is_ok());

        let mut j = base.clone();
        j["model_type"] = json!("gpt2");
        let err = ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedArch { ref arch } if arch == "gpt2"));

        let mut j = base.clone();
        j.as_object_mut().unwrap().remove("vocab_size");
        let err = ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()).unwrap_err();
        assert!(matches!(err, ModelError::MissingKey { ref key, .. } if key == "vocab_size"));

        let mut j = base.clone();
        j["hidden_size"] = json!(-8);
        assert!(matches!(ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()), Err(ModelError::WrongKeyType { .. })));

        let mut j = base.clone();
        j["num_key_value_heads"] = json!(3);
        assert!(matches!(ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()), Err(ModelError::BadConfig { .. })));

        let mut j = base;
        j["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        assert!(matches!(
            ModelConfig::from_hf_json(Path::new("c.json"), &j, String::new()),
            Err(ModelError::UnsupportedRopeScaling { ref kind, .. }) if kind == "linear"
        ));
    }
}
