//! FiRST router files: one small gate per decoder layer, stored as safetensors.
//!
//! A router reads the hidden states `h [T, d]` entering layer `l` during prefill and gives the
//! probability that the layer should run:
//! `p = sigmoid(fc2 · silu(fc1 · rmsnorm(mean_t h[t, :]) + b1) + b2)` for rank `r > 0`, or
//! `p = sigmoid(fc · rmsnorm(mean_t h[t, :]) + b)` for a linear router (`r = 0`).
//!
//! Tensor names for layer `l` (f32; f16 and bf16 are accepted on load and converted):
//! ```text
//! r > 0:  layers.{l}.norm.weight [d]   layers.{l}.fc1.weight [r, d]   layers.{l}.fc1.bias [r]
//!                                      layers.{l}.fc2.weight [1, r]   layers.{l}.fc2.bias [1]
//! r = 0:  layers.{l}.norm.weight [d]   layers.{l}.fc.weight  [1, d]   layers.{l}.fc.bias  [1]
//! ```
//! A layer with none of its tensors has no router and always runs; a layer with only some of
//! them is an error, as is any other tensor name.
//!
//! `__metadata__` (all values are strings; every key is required, unknown keys are ignored):
//! ```text
//! format = "firstrt-routers"   version = "1"
//! hidden_size (d)   num_layers   router_rank (r)   pooling = "mean"   norm = "rmsnorm"
//! norm_eps (> 0)    threshold (default tau, in [0, 1])    skip_first_last ("true" | "false")
//! model_arch  model_layers  model_hidden  model_vocab  model_weight_hash
//! ```
//! Optional: `static_skip` = `"3,6,9"` (increasing layer numbers, `""` for none) marks a *static
//! plan* (`firstrt static-plan --out`): the file's decisions do not depend on the input. Every
//! layer then has a linear router (`router_rank` = 0) with zero `fc.weight`, so
//! `p = sigmoid(fc.bias)`, and the bias must give exactly that plan (`p < threshold` for the
//! listed layers, `p >= threshold` for the others; written as ±[`STATIC_BIAS`]); a listed first or
//! last layer needs `skip_first_last = "true"`. A file whose `static_skip` disagrees with its
//! routers, or names a layer past the end, is refused. Such a file routed as any other gives
//! the same plan; the runtime runs it as a static plan, with no router on the GPU.
//!
//! The `model_*` keys identify the base model the routers were made for ([`ModelIdentity`]).
//! `model_weight_hash` is the 64-bit FNV-1a hash, as 16 lowercase hex digits, of the bytes
//! (little-endian) of the f32 bit patterns of `model.norm.weight` followed by the first row of
//! `model.embed_tokens.weight`, as the [`WeightSource`] returns them. GGUF and Hugging Face
//! copies of the same model in the same precision hash alike; different quantisations of the
//! same model (a Q4 GGUF and an f16 folder) do not, and a router file made on one is refused
//! by the other — the hidden states differ between them anyway.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::config::Arch;
use super::error::ModelError;
use super::names::{TensorName, split_layer};
use super::weights::WeightSource;

/// Value of the `format` metadata key.
pub const FORMAT: &str = "firstrt-routers";
/// Value of the `version` metadata key.
pub const VERSION: &str = "1";
/// Largest router rank accepted on load.
pub const MAX_RANK: usize = 1 << 16;
/// The bias magnitude of a static plan's fixed routers: `sigmoid(30) = 1 - 9e-14` (kept),
/// `sigmoid(-30) = 9e-14` (skipped).
pub const STATIC_BIAS: f32 = 30.0;

/// Which base model a router file belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    /// `llama`, `mistral` or `qwen2`.
    pub arch: String,
    /// Decoder layers.
    pub n_layers: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// 16 lowercase hex digits (see the module documentation).
    pub weight_hash: String,
}

impl ModelIdentity {
    /// The metadata keys and string values that store the identity in a file (router files,
    /// training checkpoints): `model_arch`, `model_layers`, `model_hidden`, `model_vocab`,
    /// `model_weight_hash`.
    pub fn metadata(&self) -> [(&'static str, String); 5] {
        [
            ("model_arch", self.arch.clone()),
            ("model_layers", self.n_layers.to_string()),
            ("model_hidden", self.d_model.to_string()),
            ("model_vocab", self.vocab_size.to_string()),
            ("model_weight_hash", self.weight_hash.clone()),
        ]
    }

    /// The first field in which `self` (e.g. a file's) and `other` (the model's) differ, in the
    /// order arch, layers, hidden size, vocabulary, weight hash, as (the field's metadata key
    /// with its meaning, e.g. `model_layers (number of layers)`, self's value, other's value);
    /// `None` when they are the same model.
    pub fn first_difference(&self, other: &ModelIdentity) -> Option<(&'static str, String, String)> {
        [
            ("model_arch (architecture)", self.arch.clone(), other.arch.clone()),
            ("model_layers (number of layers)", self.n_layers.to_string(), other.n_layers.to_string()),
            ("model_hidden (hidden size)", self.d_model.to_string(), other.d_model.to_string()),
            ("model_vocab (vocabulary size)", self.vocab_size.to_string(), other.vocab_size.to_string()),
            ("model_weight_hash (weight hash)", self.weight_hash.clone(), other.weight_hash.clone()),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
    }
}

/// The name stored in `model_arch`.
pub fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama => "llama",
        Arch::Mistral => "mistral",
        Arch::Qwen2 => "qwen2",
    }
}

/// The 64-bit FNV-1a hash (Fowler, Noll, Vo), fed bytes in pieces: the same value as over
/// the pieces joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a64(pub u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325) // the offset basis
    }
}

impl Fnv1a64 {
    /// Hash `bytes` after what came before.
    pub fn update(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(PRIME);
        }
    }
}

/// 64-bit FNV-1a over the little-endian bytes of the f32 bit patterns of `values`.
pub fn fnv1a64_f32(values: &[f32]) -> u64 {
    let mut h = Fnv1a64::default();
    for v in values {
        h.update(&v.to_bits().to_le_bytes());
    }
    h.0
}

/// The identity of the model behind `source`: its configuration plus the hash of
/// `model.norm.weight` `[d]` and row 0 of `model.embed_tokens.weight` `[vocab, d]`. Errors: those
/// of [`WeightSource::get`], and [`ModelError::BadTensor`] when the tensors do not fit d_model.
pub fn model_identity(source: &dyn WeightSource) -> Result<ModelIdentity, ModelError> {
    let c = source.config();
    let d = c.d_model;
    let norm = source.get(&TensorName::FinalNorm.hf_name())?;
    if norm.data.len() != d {
        return Err(ModelError::BadTensor { tensor: norm.name, what: format!("{} values, expected d_model = {d}", norm.data.len()) });
    }
    let embed = source.get(&TensorName::EmbedTokens.hf_name())?;
    if d == 0 || embed.data.len() < d {
        return Err(ModelError::BadTensor {
            tensor: embed.name,
            what: format!("{} values, fewer than one row of d_model = {d}", embed.data.len()),
        });
    }
    let mut values = norm.data;
    values.extend_from_slice(&embed.data[..d]);
    Ok(ModelIdentity {
        arch: arch_name(c.arch).to_owned(),
        n_layers: c.n_layers,
        d_model: d,
        vocab_size: c.vocab_size,
        weight_hash: format!("{:016x}", fnv1a64_f32(&values)),
    })
}

/// One layer's router on the host (f32).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterLayer {
    /// `[d]` RMSNorm weight.
    pub norm: Vec<f32>,
    /// `[r, d]` (`fc1.weight`), or `[1, d]` (`fc.weight`) when `r = 0`.
    pub w1: Vec<f32>,
    /// `[r]` (`fc1.bias`), or `[1]` (`fc.bias`) when `r = 0`.
    pub b1: Vec<f32>,
    /// `[1, r]` (`fc2.weight`); `None` when `r = 0`.
    pub w2: Option<Vec<f32>>,
    /// `fc2.bias`; `None` when `r = 0`.
    pub b2: Option<f32>,
}

impl RouterLayer {
    /// CPU reference (f64 accumulation) of this router's probability for hidden states
    /// `h [rows, d]` f32, rank `r` (0: linear router) and RMSNorm epsilon `eps`: the formula in
    /// the module documentation (FiRST, arXiv 2410.12513). The sizes must match (`h` holds
    /// `rows * d` values, `rows >= 1`, the tensors fit `r` and `d`; [`RouterFile::probability_ref`]
    /// checks them); it panics otherwise.
    pub fn probability(&self, h: &[f32], rows: usize, d: usize, r: usize, eps: f32) -> f32 {
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let mut mean = vec![0.0f64; d];
        for t in 0..rows {
            for c in 0..d {
                mean[c] += h[t * d + c] as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= rows as f64);
        let ms = mean.iter().map(|m| m * m).sum::<f64>() / d as f64;
        let scale = 1.0 / (ms + eps as f64).sqrt();
        let x: Vec<f64> = (0..d).map(|c| mean[c] * scale * self.norm[c] as f64).collect();
        let unit = |j: usize| self.b1[j] as f64 + (0..d).map(|c| self.w1[j * d + c] as f64 * x[c]).sum::<f64>();
        let z = if r == 0 {
            unit(0)
        } else {
            let w2 = self.w2.as_deref().expect("RouterLayer::probability: w2 is required when r > 0");
            let mut z = self.b2.unwrap_or(0.0) as f64;
            for (j, &w) in w2.iter().enumerate().take(r) {
                let a = unit(j);
                z += w as f64 * a * sigmoid(a);
            }
            z
        };
        sigmoid(z) as f32
    }
}

/// A router file: one optional router per decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterFile {
    /// `r`; 0 for linear routers.
    pub rank: usize,
    /// `d`, the model's hidden size.
    pub hidden: usize,
    /// RMSNorm epsilon of every router.
    pub eps: f32,
    /// Default tau: a layer runs iff `p >= threshold`.
    pub threshold: f32,
    /// Whether layer 0 and the last layer may be skipped.
    pub skip_first_last: bool,
    /// The base model the routers were made for.
    pub identity: ModelIdentity,
    /// `[n_layers]`; `None`: no router, the layer always runs.
    pub layers: Vec<Option<RouterLayer>>,
    /// A static plan: the layers it skips, increasing (metadata `static_skip`); the routers are
    /// then fixed and agree with it (see the module documentation). None: the routers decide.
    pub static_skip: Option<Vec<usize>>,
}

/// Everything that can go wrong with a router file. Each variant names the file and the key,
/// tensor, field or limit involved.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The file could not be read or written.
    #[error("cannot access router file {path}: {source}")]
    Io {
        /// The router file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The safetensors container does not parse or serialise.
    #[error("router file {path}: invalid safetensors: {source}")]
    SafeTensors {
        /// The router file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The file is not a router file (no metadata, wrong format or version).
    #[error("router file {path}: {what}")]
    Format {
        /// The router file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A required metadata key is absent.
    #[error("router file {path}: missing metadata key '{key}'")]
    MissingKey {
        /// The router file.
        path: PathBuf,
        /// The metadata key.
        key: String,
    },
    /// A metadata value is out of range or does not parse.
    #[error("router file {path}: metadata key '{key}' is {value:?}, expected {expected}")]
    BadValue {
        /// The router file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// The value found.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// A size over a sanity limit.
    #[error("router file {path}: {what} is {value}, over the limit of {limit}")]
    Limit {
        /// The router file.
        path: PathBuf,
        /// What is wrong.
        what: String,
        /// The value found.
        value: usize,
        /// The largest accepted value.
        limit: usize,
    },
    /// A layer has some of its router tensors but not this one.
    #[error("router file {path}: missing tensor '{tensor}' (the layer has other router tensors)")]
    MissingTensor {
        /// The router file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor name outside the scheme.
    #[error("router file {path}: unexpected tensor '{tensor}' ({why})")]
    UnexpectedTensor {
        /// The router file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Why it is not accepted.
        why: String,
    },
    /// A tensor's shape does not fit the rank and hidden size.
    #[error("router file {path}: tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The router file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What was expected.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor data type other than F32, F16 or BF16.
    #[error("router file {path}: tensor '{tensor}' has data type {dtype}, expected F32, F16 or BF16")]
    Dtype {
        /// The router file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The data type in the file.
        dtype: String,
    },
    /// A NaN or infinite weight.
    #[error("router file {path}: tensor '{tensor}' holds a non-finite value at index {index}")]
    NonFinite {
        /// The router file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Index of the first bad value.
        index: usize,
    },
    /// The file was made for another base model.
    #[error(
        "router file {path} was made for a different model: {field} is {file_value} in the file, \
         {model_value} for this model"
    )]
    WrongModel {
        /// The router file.
        path: PathBuf,
        /// The identity field that differs.
        field: String,
        /// The file's value.
        file_value: String,
        /// The model's value.
        model_value: String,
    },
    /// The in-memory [`RouterFile`] is not consistent (on save) or an argument does not match it.
    #[error("router file {path}: {what}")]
    Invalid {
        /// The router file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Tensor suffixes of one layer, in file order.
fn suffixes(rank: usize) -> &'static [&'static str] {
    if rank == 0 { &["norm.weight", "fc.weight", "fc.bias"] } else { &["norm.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] }
}

/// Expected shape of a tensor suffix.
fn suffix_shape(suffix: &str, rank: usize, d: usize) -> Vec<usize> {
    match suffix {
        "norm.weight" => vec![d],
        "fc.weight" => vec![1, d],
        "fc.bias" | "fc2.bias" => vec![1],
        "fc1.weight" => vec![rank, d],
        "fc1.bias" => vec![rank],
        "fc2.weight" => vec![1, rank],
        _ => vec![],
    }
}

fn tensor_name(layer: usize, suffix: &str) -> String {
    format!("layers.{layer}.{suffix}")
}

/// `layers.{l}.{suffix}` with a canonical decimal `l`.
fn parse_tensor_name(name: &str) -> Option<(usize, &str)> {
    split_layer(name.strip_prefix("layers.")?)
}

/// Typed access to the string metadata of one file.
struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, String>,
}

impl Meta<'_> {
    fn str(&self, key: &str) -> Result<&str, RouterError> {
        self.map.get(key).map(String::as_str).ok_or_else(|| RouterError::MissingKey { path: self.path.to_path_buf(), key: key.to_owned() })
    }

    fn bad(&self, key: &str, value: &str, expected: &str) -> RouterError {
        RouterError::BadValue { path: self.path.to_path_buf(), key: key.to_owned(), value: value.to_owned(), expected: expected.to_owned() }
    }

    fn exact(&self, key: &str, want: &str) -> Result<(), RouterError> {
        let v = self.str(key)?;
        if v == want { Ok(()) } else { Err(self.bad(key, v, &format!("{want:?}"))) }
    }

    fn usize(&self, key: &str) -> Result<usize, RouterError> {
        let v = self.str(key)?;
        // Plain decimal digits only: no sign, no spaces.
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.bad(key, v, "a non-negative integer"));
        }
        v.parse().map_err(|_| self.bad(key, v, "an integer that fits in usize"))
    }

    fn f32(&self, key: &str, expected: &str, ok: impl Fn(f32) -> bool) -> Result<f32, RouterError> {
        let v = self.str(key)?;
        match v.trim().parse::<f32>() {
            Ok(x) if ok(x) => Ok(x),
            _ => Err(self.bad(key, v, expected)),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, RouterError> {
        match self.str(key)? {
            "true" => Ok(true),
            "false" => Ok(false),
            v => Err(self.bad(key, v, "\"true\" or \"false\"")),
        }
    }
}

fn eps_ok(eps: f32) -> bool {
    eps.is_finite() && eps > 0.0
}

fn threshold_ok(t: f32) -> bool {
    (0.0..=1.0).contains(&t)
}

/// `3,6,9` (empty for no layer): the text of `static_skip`.
pub fn layer_list(layers: &[usize]) -> String {
    layers.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Parses `static_skip`: plain decimal layer numbers, comma-separated, increasing, each below
/// `n_layers`; `""` is no layer.
fn parse_layer_list(meta: &Meta<'_>, key: &str, n_layers: usize) -> Result<Vec<usize>, RouterError> {
    let v = meta.str(key)?;
    let expected = format!("comma-separated layer numbers below num_layers = {n_layers}, increasing");
    if v.is_empty() {
        return Ok(Vec::new());
    }
    let mut layers: Vec<usize> = Vec::new();
    for part in v.split(',') {
        let l = match part.parse::<usize>() {
            Ok(l) if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) => l,
            _ => return Err(meta.bad(key, v, &expected)),
        };
        if l >= n_layers || layers.last().is_some_and(|&prev| prev >= l) {
            return Err(meta.bad(key, v, &expected));
        }
        layers.push(l);
    }
    Ok(layers)
}

/// Whether `s` is a `model_weight_hash`: 16 lowercase hex digits.
pub fn is_weight_hash(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads one tensor as f32, checking its shape, dtype and values.
fn read_tensor(path: &Path, st: &SafeTensors<'_>, name: &str, expected: &[usize]) -> Result<Vec<f32>, RouterError> {
    let view = st.tensor(name).map_err(|_| RouterError::MissingTensor { path: path.to_path_buf(), tensor: name.to_owned() })?;
    if view.shape() != expected {
        return Err(RouterError::Shape {
            path: path.to_path_buf(),
            tensor: name.to_owned(),
            expected: expected.to_vec(),
            found: view.shape().to_vec(),
        });
    }
    let bytes = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(RouterError::Dtype { path: path.to_path_buf(), tensor: name.to_owned(), dtype: format!("{other:?}") });
        }
    };
    // safetensors checked that the byte length matches shape x dtype; keep the guarantee local.
    if values.len() != expected.iter().product::<usize>() {
        return Err(RouterError::Format {
            path: path.to_path_buf(),
            what: format!("tensor '{name}' holds {} values for shape {expected:?}", values.len()),
        });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(RouterError::NonFinite { path: path.to_path_buf(), tensor: name.to_owned(), index });
    }
    Ok(values)
}

impl RouterFile {
    /// Reads `path` and validates it against `model`: every metadata key present and sane,
    /// the identity (arch, layers, hidden, vocab, weight hash) equal to `model`'s, every
    /// tensor's name, dtype, shape and values.
    pub fn load(path: &Path, model: &ModelIdentity) -> Result<RouterFile, RouterError> {
        let bytes = std::fs::read(path).map_err(|source| RouterError::Io { path: path.to_path_buf(), source })?;
        let st_err = |source| RouterError::SafeTensors { path: path.to_path_buf(), source };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(st_err)?;
        let st = SafeTensors::deserialize(&bytes).map_err(st_err)?;
        let map = header.metadata().as_ref().ok_or_else(|| RouterError::Format {
            path: path.to_path_buf(),
            what: format!("no __metadata__ (expected format = \"{FORMAT}\")"),
        })?;
        let meta = Meta { path, map };
        meta.exact("format", FORMAT)?;
        meta.exact("version", VERSION)?;

        // The base model first: the most useful message when the file is for another model.
        let arch = meta.str("model_arch")?.to_owned();
        let n_layers = meta.usize("model_layers")?;
        let d_model = meta.usize("model_hidden")?;
        let vocab_size = meta.usize("model_vocab")?;
        let weight_hash = meta.str("model_weight_hash")?.to_owned();
        if !is_weight_hash(&weight_hash) {
            return Err(meta.bad("model_weight_hash", &weight_hash, "16 lowercase hex digits"));
        }
        let identity = ModelIdentity { arch, n_layers, d_model, vocab_size, weight_hash };
        if let Some((field, file_value, model_value)) = identity.first_difference(model) {
            return Err(RouterError::WrongModel { path: path.to_path_buf(), field: field.to_owned(), file_value, model_value });
        }

        let hidden = meta.usize("hidden_size")?;
        if hidden != identity.d_model {
            return Err(meta.bad("hidden_size", &hidden.to_string(), &format!("model_hidden = {}", identity.d_model)));
        }
        let num_layers = meta.usize("num_layers")?;
        if num_layers != identity.n_layers {
            return Err(meta.bad("num_layers", &num_layers.to_string(), &format!("model_layers = {}", identity.n_layers)));
        }
        let rank = meta.usize("router_rank")?;
        if rank > MAX_RANK {
            return Err(RouterError::Limit { path: path.to_path_buf(), what: "router_rank".into(), value: rank, limit: MAX_RANK });
        }
        meta.exact("pooling", "mean")?;
        meta.exact("norm", "rmsnorm")?;
        let eps = meta.f32("norm_eps", "a finite number > 0", eps_ok)?;
        let threshold = meta.f32("threshold", "a number in [0, 1]", threshold_ok)?;
        let skip_first_last = meta.bool("skip_first_last")?;
        let static_skip = map.contains_key("static_skip").then(|| parse_layer_list(&meta, "static_skip", num_layers)).transpose()?;

        // Every tensor must be one of the documented names.
        let allowed = suffixes(rank);
        let mut present: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        let names = st.names();
        for name in &names {
            let why = match parse_tensor_name(name) {
                None => Some("names are layers.{l}.<part>".to_owned()),
                Some((l, _)) if l >= num_layers => Some(format!("the model has {num_layers} layers")),
                Some((_, s)) if !allowed.contains(&s) => Some(format!("a router of rank {rank} has only {}", allowed.join(", "))),
                Some((l, s)) => {
                    present.entry(l).or_default().push(s);
                    None
                }
            };
            if let Some(why) = why {
                return Err(RouterError::UnexpectedTensor { path: path.to_path_buf(), tensor: (*name).to_owned(), why });
            }
        }

        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            if !present.contains_key(&l) {
                layers.push(None);
                continue;
            }
            let get = |suffix: &str| read_tensor(path, &st, &tensor_name(l, suffix), &suffix_shape(suffix, rank, hidden));
            let layer = if rank == 0 {
                RouterLayer { norm: get("norm.weight")?, w1: get("fc.weight")?, b1: get("fc.bias")?, w2: None, b2: None }
            } else {
                RouterLayer {
                    norm: get("norm.weight")?,
                    w1: get("fc1.weight")?,
                    b1: get("fc1.bias")?,
                    w2: Some(get("fc2.weight")?),
                    b2: Some(get("fc2.bias")?[0]),
                }
            };
            layers.push(Some(layer));
        }
        let file = RouterFile { rank, hidden, eps, threshold, skip_first_last, identity, layers, static_skip };
        file.check_static(path)?;
        Ok(file)
    }

    /// A static plan for `model` that skips `skip` (any order; repeats count once): a linear
    /// router on every layer with zero weights, norm weights 1 and bias `-STATIC_BIAS` (skipped)
    /// or `+STATIC_BIAS` (kept), threshold 0.5, `skip_first_last` true iff the first or last
    /// layer is skipped, and `static_skip` set. Errors ([`RouterError::Invalid`]) for a layer
    /// the model does not have.
    pub fn static_plan(model: &ModelIdentity, skip: &[usize]) -> Result<RouterFile, RouterError> {
        let n = model.n_layers;
        let mut skip = skip.to_vec();
        skip.sort_unstable();
        skip.dedup();
        if let Some(&l) = skip.iter().find(|&&l| l >= n) {
            return Err(RouterError::Invalid {
                path: PathBuf::from("<in memory>"),
                what: format!("static plan skips layer {l}, the model has {n} layers (0..{})", n.saturating_sub(1)),
            });
        }
        let mut file = RouterFile::init(model, 0, STATIC_BIAS, 1e-5, 0.5);
        for &l in &skip {
            if let Some(layer) = file.layers[l].as_mut() {
                layer.b1 = vec![-STATIC_BIAS];
            }
        }
        file.skip_first_last = skip.first() == Some(&0) || (n > 0 && skip.last() == Some(&(n - 1)));
        file.static_skip = Some(skip);
        Ok(file)
    }

    /// A static plan's routers agree with its `static_skip` (see the module documentation):
    /// rank 0, a router with zero `fc.weight` on every layer, each bias on the side of the
    /// threshold that the list says, listed first/last layers only with `skip_first_last`.
    /// Errors: [`RouterError::BadValue`] on `static_skip`, saying which layer or field disagrees.
    fn check_static(&self, path: &Path) -> Result<(), RouterError> {
        let Some(skip) = &self.static_skip else { return Ok(()) };
        let n = self.layers.len();
        let bad = |expected: String| RouterError::BadValue {
            path: path.to_path_buf(),
            key: "static_skip".into(),
            value: layer_list(skip),
            expected,
        };
        if let Some(&l) = skip.iter().find(|&&l| l >= n) {
            return Err(bad(format!("layers below num_layers = {n}; layer {l} does not exist")));
        }
        if skip.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("increasing layer numbers".into()));
        }
        if self.rank != 0 {
            return Err(bad(format!("router_rank 0 (a static plan's routers ignore their input), the file has {}", self.rank)));
        }
        if !self.skip_first_last && skip.iter().any(|&l| l == 0 || l + 1 == n) {
            return Err(bad("no first or last layer while skip_first_last is false".into()));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let Some(layer) = layer else {
                return Err(bad(format!("a router on every layer; layer {l} has none")));
            };
            if layer.w1.iter().any(|&w| w != 0.0) {
                return Err(bad(format!("fixed routers, but {} is not all zero", tensor_name(l, "fc.weight"))));
            }
            let bias = layer.b1.first().copied().unwrap_or(f32::NAN);
            let p = 1.0 / (1.0 + (-bias as f64).exp());
            let runs = p >= self.threshold as f64;
            if runs == skip.contains(&l) {
                let (listed, says) = if runs { ("lists", "keeps it") } else { ("does not list", "skips it") };
                return Err(bad(format!(
                    "the plan its routers give: it {listed} layer {l}, but {} = {bias} (p = {p:.3}, threshold {}) {says}",
                    tensor_name(l, "fc.bias"),
                    self.threshold
                )));
            }
        }
        Ok(())
    }

    /// A valid starting point for `model`: every layer gets a router whose output is
    /// `p = sigmoid(bias)` for every input (with `bias > 0` every layer is kept at tau = 0.5),
    /// norm weights 1. The final layer's weights are zero and its bias is `bias`
    /// (`fc2` for `r > 0`, `fc` for `r = 0`); for `r > 0`, `fc1` gets small deterministic
    /// pseudo-random weights (uniform in ±1/sqrt(d), fixed seed per layer) and zero bias so
    /// that training can move off the all-zero saddle — they do not change `p` while `fc2` is 0.
    /// `skip_first_last` is false.
    pub fn init(model: &ModelIdentity, rank: usize, bias: f32, eps: f32, threshold: f32) -> RouterFile {
        let d = model.d_model;
        let scale = if d > 0 { 1.0 / (d as f32).sqrt() } else { 0.0 };
        let layers = (0..model.n_layers)
            .map(|l| {
                let norm = vec![1.0; d];
                Some(if rank == 0 {
                    RouterLayer { norm, w1: vec![0.0; d], b1: vec![bias], w2: None, b2: None }
                } else {
                    let mut state = 0x5eed_0000_0000_0000u64 ^ l as u64;
                    let w1 = (0..rank * d).map(|_| scale * (2.0 * unit_random(&mut state) - 1.0)).collect();
                    RouterLayer { norm, w1, b1: vec![0.0; rank], w2: Some(vec![0.0; rank]), b2: Some(bias) }
                })
            })
            .collect();
        RouterFile { rank, hidden: d, eps, threshold, skip_first_last: false, identity: model.clone(), layers, static_skip: None }
    }

    /// Checks that the fields agree with each other (what [`RouterFile::load`] would demand).
    fn validate(&self, path: &Path) -> Result<(), RouterError> {
        let invalid = |what: String| RouterError::Invalid { path: path.to_path_buf(), what };
        let id = &self.identity;
        if self.hidden != id.d_model {
            return Err(invalid(format!("hidden {} differs from the model's hidden size {}", self.hidden, id.d_model)));
        }
        if self.layers.len() != id.n_layers {
            return Err(invalid(format!("{} router slots for a model with {} layers", self.layers.len(), id.n_layers)));
        }
        if self.rank > MAX_RANK {
            return Err(invalid(format!("rank {} is over the limit of {MAX_RANK}", self.rank)));
        }
        if !eps_ok(self.eps) {
            return Err(invalid(format!("eps {} must be finite and > 0", self.eps)));
        }
        if !threshold_ok(self.threshold) {
            return Err(invalid(format!("threshold {} must be in [0, 1]", self.threshold)));
        }
        if !is_weight_hash(&id.weight_hash) {
            return Err(invalid(format!("weight hash {:?} is not 16 lowercase hex digits", id.weight_hash)));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let Some(layer) = layer else { continue };
            for (suffix, values) in self.layer_tensors(layer) {
                let want: usize = suffix_shape(suffix, self.rank, self.hidden).iter().product();
                let name = tensor_name(l, suffix);
                match values {
                    None => return Err(invalid(format!("layer {l} lacks {name} for rank {}", self.rank))),
                    Some(v) if v.len() != want => {
                        return Err(invalid(format!("{name} has {} values, expected {want}", v.len())));
                    }
                    Some(v) if v.iter().any(|x| !x.is_finite()) => {
                        return Err(invalid(format!("{name} holds a non-finite value")));
                    }
                    Some(_) => {}
                }
            }
            if self.rank == 0 && (layer.w2.is_some() || layer.b2.is_some()) {
                return Err(invalid(format!("layer {l}: a linear router (rank 0) has no fc2")));
            }
        }
        self.check_static(path)
    }

    /// (suffix, values) of one layer in file order; `None` where the layer lacks the part.
    fn layer_tensors<'a>(&self, layer: &'a RouterLayer) -> Vec<(&'static str, Option<std::borrow::Cow<'a, [f32]>>)> {
        use std::borrow::Cow;
        let s = suffixes(self.rank);
        let mut out = vec![
            (s[0], Some(Cow::Borrowed(&layer.norm[..]))),
            (s[1], Some(Cow::Borrowed(&layer.w1[..]))),
            (s[2], Some(Cow::Borrowed(&layer.b1[..]))),
        ];
        if self.rank > 0 {
            out.push((s[3], layer.w2.as_deref().map(Cow::Borrowed)));
            out.push((s[4], layer.b2.map(|b| Cow::Owned(vec![b]))));
        }
        out
    }

    /// Writes the file (f32 tensors) atomically (a temporary file beside it, then a rename), after
    /// checking that it would load back.
    pub fn save(&self, path: &Path) -> Result<(), RouterError> {
        self.validate(path)?;
        let id = &self.identity;
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_owned()),
            ("version", VERSION.to_owned()),
            ("hidden_size", self.hidden.to_string()),
            ("num_layers", self.layers.len().to_string()),
            ("router_rank", self.rank.to_string()),
            ("pooling", "mean".to_owned()),
            ("norm", "rmsnorm".to_owned()),
            ("norm_eps", self.eps.to_string()),
            ("threshold", self.threshold.to_string()),
            ("skip_first_last", self.skip_first_last.to_string()),
        ]
        .into_iter()
        .chain(id.metadata())
        .chain(self.static_skip.as_deref().map(|skip| ("static_skip", layer_list(skip))))
        .map(|(k, v)| (k.to_owned(), v))
        .collect();

        // (name, shape, little-endian f32 bytes)
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let Some(layer) = layer else { continue };
            for (suffix, values) in self.layer_tensors(layer) {
                let values = values.unwrap_or_default(); // validate() made sure every part is present
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                owned.push((tensor_name(l, suffix), suffix_shape(suffix, self.rank, self.hidden), bytes));
            }
        }
        let st_err = |source| RouterError::SafeTensors { path: path.to_path_buf(), source };
        let views = owned
            .iter()
            .map(|(name, shape, bytes)| safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.as_str(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(st_err)?;
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(st_err)?;
        crate::model::atomic::write_atomic(path, &bytes).map_err(|source| RouterError::Io { path: path.to_path_buf(), source })
    }

    /// Number of layers (router slots).
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// `[n_layers]`: whether each layer has a router.
    pub fn has_router(&self) -> Vec<bool> {
        self.layers.iter().map(Option::is_some).collect()
    }

    /// CPU probability (via [`RouterLayer::probability`]) of layer `layer`'s router for hidden states
    /// `h [rows, hidden]`; `Ok(None)` when the layer has no router. Errors when `layer` is out
    /// of range, `rows` is 0, `h` is not `rows * hidden` values, or the layer's tensors do not
    /// match the file's rank and hidden size.
    pub fn probability_ref(&self, layer: usize, h: &[f32], rows: usize) -> Result<Option<f32>, RouterError> {
        let invalid = |what: String| RouterError::Invalid { path: PathBuf::from("<in memory>"), what };
        let slot = self
            .layers
            .get(layer)
            .ok_or_else(|| invalid(format!("layer {layer} does not exist: the file has {} layers", self.layers.len())))?;
        let Some(r) = slot else { return Ok(None) };
        let d = self.hidden;
        if rows == 0 || rows.checked_mul(d) != Some(h.len()) {
            return Err(invalid(format!("hidden states of {} values are not [{rows}, {d}] with rows >= 1", h.len())));
        }
        let nh = self.rank.max(1);
        let w2_ok = self.rank == 0 || (r.w2.as_ref().is_some_and(|w| w.len() == self.rank) && r.b2.is_some());
        if r.norm.len() != d || r.w1.len() != nh * d || r.b1.len() != nh || !w2_ok {
            return Err(invalid(format!("layer {layer}'s router tensors do not match rank {} and hidden {d}", self.rank)));
        }
        Ok(Some(r.probability(h, rows, d, self.rank, self.eps)))
    }
}

/// splitmix64 mapped to [0, 1).
fn unit_random(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

#[cfg(test)]
pub(crate) mod tests;
