//! Training checkpoints: everything `firstrt train --resume` needs to continue bit for bit, in
//! one safetensors file written atomically.
//!
//! Tensors (all f32, row-major, any names the engine gives, e.g. `router.5.w1`,
//! `adam.m.router.5.w1`, `adam.v.router.5.w1`): the trainable parameters and AdamW's first and
//! second moments. Besides them the file holds the reserved tensor [`LOSS_HISTORY`]
//! (f64 `[steps recorded]`), the loss of each step so far.
//!
//! `__metadata__` (all values strings, every key required, others ignored):
//! ```text
//! format = "firstrt-checkpoint"   version = "1"
//! step          the optimizer steps taken (decimal u64)
//! options       the training options, a JSON object (compared on resume, key by key)
//! model_arch  model_layers  model_hidden  model_vocab  model_weight_hash   (ModelIdentity)
//! data_hash     64-bit FNV-1a, 16 lowercase hex digits, over every tensor in name order:
//!               its name, a 0 byte, its shape as little-endian u64s, its data bytes
//! ```
//! Loading trusts nothing in the file: safetensors checks that the header's offsets and
//! shapes fit the file's length exactly, then every tensor's dtype, shape and byte length is
//! checked again here, every value must be finite, and `data_hash` must match the data, so a
//! truncated file, a damaged header or changed bytes are refused with the file's name and the
//! key or tensor at fault.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::model::atomic::write_atomic;
use crate::model::routers::{Fnv1a64, ModelIdentity, is_weight_hash};

/// Value of the `format` metadata key.
pub const FORMAT: &str = "firstrt-checkpoint";
/// Value of the `version` metadata key.
pub const VERSION: &str = "1";
/// The reserved name of the loss-history tensor (f64 `[n]`); no [`Checkpoint::tensors`] entry
/// may use it.
pub const LOSS_HISTORY: &str = "checkpoint.loss_history";

/// One named tensor of a checkpoint: f32 values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointTensor {
    /// The shape, e.g. `[r, d_model]`; `[]` is a scalar of one value.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

/// The state of a training run after `step` optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps taken (AdamW's bias correction continues from `step + 1`).
    pub step: u64,
    /// The training options as a JSON object (what [`Checkpoint::check_options`] compares on
    /// resume).
    pub options: String,
    /// The base model the run trains on.
    pub identity: ModelIdentity,
    /// The loss of each step recorded so far, in order.
    pub losses: Vec<f64>,
    /// Trainable parameters and optimizer moments by name (sorted).
    pub tensors: BTreeMap<String, CheckpointTensor>,
}

/// A checkpoint that cannot be written, read or resumed from. Every message names the file
/// and, where there is one, the metadata key, tensor or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read.
    #[error("checkpoint {}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be written (the previous checkpoint under that name, if any, is kept).
    #[error("checkpoint {}: cannot write: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a whole safetensors file (truncated, damaged header), or the tensor
    /// data does not match `data_hash`.
    #[error("checkpoint {}: damaged or incomplete file: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A safetensors file, but not a checkpoint of this format and version.
    #[error("checkpoint {}: not a firstrt checkpoint: {what}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A required metadata key is absent.
    #[error("checkpoint {}: missing metadata key '{key}'", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
    },
    /// A metadata value (or, on save, a field) that does not parse or is out of range.
    #[error("checkpoint {}: '{key}' is {value:?}, expected {expected}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// The value found (cut to 200 characters).
        value: String,
        /// What was expected.
        expected: String,
    },
    /// A tensor with a wrong dtype, a length that does not fit its shape, a value that is not
    /// finite, or a reserved name.
    #[error("checkpoint {}: tensor '{tensor}': {what}", path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        what: String,
    },
    /// The checkpoint was made for another base model.
    #[error(
        "checkpoint {}: made for another model: {field} is {checkpoint_value} in the checkpoint, {model_value} for this model",
        path.display()
    )]
    WrongModel {
        /// The file.
        path: PathBuf,
        /// The identity field that differs (metadata key and meaning).
        field: String,
        /// The checkpoint's value.
        checkpoint_value: String,
        /// The model's value.
        model_value: String,
    },
    /// The checkpoint was made with other training options.
    #[error(
        "checkpoint {}: made with other training options: '{option}' is {checkpoint_value} in the checkpoint, {current_value} now",
        path.display()
    )]
    OptionsDiffer {
        /// The file.
        path: PathBuf,
        /// The option (key of the options object).
        option: String,
        /// The checkpoint's value as JSON (`null` when absent).
        checkpoint_value: String,
        /// The current value as JSON (`null` when absent).
        current_value: String,
    },
    /// The checkpoint lacks a tensor the run needs.
    #[error("checkpoint {}: missing tensor '{tensor}' (shape {shape:?})", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the run needs.
        shape: Vec<usize>,
    },
    /// The checkpoint holds a tensor the run does not have.
    #[error("checkpoint {}: unexpected tensor '{tensor}' (this run has no such parameter)", path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor of another shape than the run's.
    #[error("checkpoint {}: tensor '{tensor}' has shape {found:?}, this run needs {expected:?}", path.display())]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the run needs.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        found: Vec<usize>,
    },
}

/// The first 200 characters of `s`, for messages.
fn cut(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The options text as a JSON object, or why not.
fn options_object(text: &str) -> Result<serde_json::Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("a JSON object, found {}", cut(&other.to_string()))),
        Err(e) => Err(format!("a JSON object ({e})")),
    }
}

/// `shape`'s element count, `None` on overflow.
fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// [`Fnv1a64`] over `(name, shape, bytes)` in the order given (see the module documentation).
fn data_hash<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [u8])>) -> String {
    let mut h = Fnv1a64::default();
    for (name, shape, bytes) in tensors {
        h.update(name.as_bytes());
        h.update(&[0]);
        for &d in shape {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update(bytes);
    }
    format!("{:016x}", h.0)
}

/// Typed access to a checkpoint's metadata.
struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, String>,
}

impl Meta<'_> {
    fn str(&self, key: &str) -> Result<&str, CheckpointError> {
        self.map.get(key).map(String::as_str).ok_or_else(|| CheckpointError::MissingKey { path: self.path.to_path_buf(), key: key.into() })
    }

    fn bad(&self, key: &str, value: &str, expected: &str) -> CheckpointError {
        CheckpointError::BadValue { path: self.path.to_path_buf(), key: key.into(), value: cut(value), expected: expected.into() }
    }

    /// Plain decimal digits (no sign, no spaces) that fit `T`.
    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<T, CheckpointError> {
        let v = self.str(key)?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.bad(key, v, "a non-negative integer"));
        }
        v.parse().map_err(|_| self.bad(key, v, &format!("an integer that fits in {}", std::any::type_name::<T>())))
    }
}

impl Checkpoint {
    /// The tensors as written: the named ones plus [`LOSS_HISTORY`], in name order, each as
    /// (name, dtype, shape, little-endian bytes).
    fn file_tensors(&self) -> Vec<(&str, Dtype, Vec<usize>, &[u8])> {
        let mut out: Vec<_> =
            self.tensors.iter().map(|(name, t)| (name.as_str(), Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.data))).collect();
        out.push((LOSS_HISTORY, Dtype::F64, vec![self.losses.len()], bytemuck::cast_slice(&self.losses)));
        out.sort_by(|a, b| a.0.cmp(b.0));
        out
    }

    /// Write the checkpoint to `path` atomically (a temporary file in the same folder, then a
    /// rename): `path` holds either the previous file or the whole new one, never part of it.
    /// The folder must exist.
    ///
    /// Errors, before anything is written: [`CheckpointError::BadValue`] when `options` is not
    /// a JSON object or the identity's weight hash is not 16 lowercase hex digits;
    /// [`CheckpointError::BadTensor`] for a tensor named [`LOSS_HISTORY`] or with an empty
    /// name, whose data length is not its shape's element count, or holding a value (or a loss)
    /// that is not finite. Then [`CheckpointError::Write`].
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let bad_value = |key: &str, value: &str, expected: &str| CheckpointError::BadValue {
            path: path.to_path_buf(),
            key: key.into(),
            value: cut(value),
            expected: expected.into(),
        };
        options_object(&self.options).map_err(|expected| bad_value("options", &self.options, &expected))?;
        if !is_weight_hash(&self.identity.weight_hash) {
            return Err(bad_value("model_weight_hash", &self.identity.weight_hash, "16 lowercase hex digits"));
        }
        let bad = |tensor: &str, what: String| CheckpointError::BadTensor { path: path.to_path_buf(), tensor: tensor.into(), what };
        for (name, t) in &self.tensors {
            if name == LOSS_HISTORY || name.is_empty() {
                return Err(bad(name, "this name is reserved or empty".into()));
            }
            if elements(&t.shape) != Some(t.data.len()) {
                return Err(bad(name, format!("{} values for shape {:?}", t.data.len(), t.shape)));
            }
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(bad(name, format!("element {i} is {}", t.data[i])));
            }
        }
        if let Some(i) = self.losses.iter().position(|v| !v.is_finite()) {
            return Err(bad(LOSS_HISTORY, format!("the loss of entry {i} is {}", self.losses[i])));
        }

        let tensors = self.file_tensors();
        let hash = data_hash(tensors.iter().map(|(n, _, s, b)| (*n, s.as_slice(), *b)));
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("step", self.step.to_string()),
            ("options", self.options.clone()),
            ("data_hash", hash),
        ]
        .into_iter()
        .chain(self.identity.metadata())
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let st_err = |e: safetensors::SafeTensorError| CheckpointError::Corrupt { path: path.to_path_buf(), what: e.to_string() };
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map(|v| (*name, v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(st_err)?;
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(st_err)?;
        write_atomic(path, &bytes).map_err(|source| CheckpointError::Write { path: path.to_path_buf(), source })
    }

    /// Read and check the checkpoint at `path` (see the module documentation for what is
    /// checked). The result equals, bit for bit, the [`Checkpoint`] that was saved.
    ///
    /// Errors: [`CheckpointError::Read`]; [`CheckpointError::Corrupt`] for a file that is not a
    /// whole safetensors file or whose data does not match `data_hash`;
    /// [`CheckpointError::Format`] (no metadata, another format or version);
    /// [`CheckpointError::MissingKey`] / [`CheckpointError::BadValue`] for the metadata;
    /// [`CheckpointError::BadTensor`] (dtype, length, non-finite value, no loss history).
    pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read { path: path.to_path_buf(), source })?;
        let corrupt = |e: safetensors::SafeTensorError| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            what: format!("{e} (the file is {} bytes)", bytes.len()),
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
        let st = SafeTensors::deserialize(&bytes).map_err(corrupt)?;
        let format_err = |what: String| CheckpointError::Format { path: path.to_path_buf(), what };
        let map = header.metadata().as_ref().ok_or_else(|| format_err(format!("no __metadata__ (expected format = \"{FORMAT}\")")))?;
        let meta = Meta { path, map };
        let format = meta.str("format").map_err(|_| format_err(format!("no 'format' metadata key (expected \"{FORMAT}\")")))?;
        if format != FORMAT {
            return Err(format_err(format!("format is {:?}, expected \"{FORMAT}\"", cut(format))));
        }
        let version = meta.str("version")?;
        if version != VERSION {
            return Err(meta.bad("version", version, &format!("\"{VERSION}\" (written by another firstrt version)")));
        }
        let step = meta.number::<u64>("step")?;
        let options = meta.str("options")?;
        options_object(options).map_err(|expected| meta.bad("options", options, &expected))?;
        let weight_hash = meta.str("model_weight_hash")?;
        if !is_weight_hash(weight_hash) {
            return Err(meta.bad("model_weight_hash", weight_hash, "16 lowercase hex digits"));
        }
        let identity = ModelIdentity {
            arch: meta.str("model_arch")?.to_string(),
            n_layers: meta.number("model_layers")?,
            d_model: meta.number("model_hidden")?,
            vocab_size: meta.number("model_vocab")?,
            weight_hash: weight_hash.to_string(),
        };
        let want_hash = meta.str("data_hash")?;
        if !is_weight_hash(want_hash) {
            return Err(meta.bad("data_hash", want_hash, "16 lowercase hex digits"));
        }

        let bad = |tensor: &str, what: String| CheckpointError::BadTensor { path: path.to_path_buf(), tensor: tensor.into(), what };
        let mut views: Vec<_> = st.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        let hash = data_hash(views.iter().map(|(n, v)| (n.as_str(), v.shape(), v.data())));
        if hash != want_hash {
            return Err(CheckpointError::Corrupt {
                path: path.to_path_buf(),
                what: format!("the tensor data hashes to {hash}, the file says data_hash = {want_hash}: its bytes were changed"),
            });
        }
        let mut losses = None;
        let mut tensors = BTreeMap::new();
        for (name, view) in views {
            let (dtype, size) = if name == LOSS_HISTORY { (Dtype::F64, 8) } else { (Dtype::F32, 4) };
            if view.dtype() != dtype {
                return Err(bad(&name, format!("dtype {:?}, expected {dtype:?}", view.dtype())));
            }
            if elements(view.shape()).and_then(|n| n.checked_mul(size)) != Some(view.data().len()) {
                return Err(bad(&name, format!("{} bytes for shape {:?} of {dtype:?}", view.data().len(), view.shape())));
            }
            if name == LOSS_HISTORY {
                if view.shape().len() != 1 {
                    return Err(bad(&name, format!("shape {:?}, expected [steps]", view.shape())));
                }
                let values: Vec<f64> =
                    view.data().chunks_exact(8).map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])).collect();
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(bad(&name, format!("the loss of entry {i} is {}", values[i])));
                }
                losses = Some(values);
                continue;
            }
            let data: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(bad(&name, format!("element {i} is {}", data[i])));
            }
            tensors.insert(name, CheckpointTensor { shape: view.shape().to_vec(), data });
        }
        let losses = losses.ok_or_else(|| bad(LOSS_HISTORY, "missing (every checkpoint has one)".into()))?;
        Ok(Checkpoint { step, options: options.to_string(), identity, losses, tensors })
    }

    /// [`CheckpointError::WrongModel`], naming the first identity field that differs, unless the
    /// checkpoint was made for the model `identity` (see [`ModelIdentity::first_difference`]).
    /// `path` names the checkpoint in the message.
    pub fn check_model(&self, path: &Path, identity: &ModelIdentity) -> Result<(), CheckpointError> {
        match self.identity.first_difference(identity) {
            None => Ok(()),
            Some((field, checkpoint_value, model_value)) => {
                Err(CheckpointError::WrongModel { path: path.to_path_buf(), field: field.into(), checkpoint_value, model_value })
            }
        }
    }

    /// [`CheckpointError::OptionsDiffer`] naming the first option (in key order) whose value
    /// differs between the checkpoint's options and `current` (a JSON object; an absent key
    /// counts as `null`), options named in `ignore` aside (e.g. the step count, which a resumed
    /// run may raise). [`CheckpointError::BadValue`] (key `options`) when `current` is not a
    /// JSON object. `path` names the checkpoint in messages.
    pub fn check_options(&self, path: &Path, current: &str, ignore: &[&str]) -> Result<(), CheckpointError> {
        let bad = |value: &str, expected: String| CheckpointError::BadValue {
            path: path.to_path_buf(),
            key: "options".into(),
            value: cut(value),
            expected,
        };
        let saved = options_object(&self.options).map_err(|e| bad(&self.options, e))?;
        let now = options_object(current).map_err(|e| bad(current, format!("the current options as {e}")))?;
        let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            if ignore.contains(&key.as_str()) {
                continue;
            }
            let (a, b) = (saved.get(key).unwrap_or(&Value::Null), now.get(key).unwrap_or(&Value::Null));
            if a != b {
                return Err(CheckpointError::OptionsDiffer {
                    path: path.to_path_buf(),
                    option: key.clone(),
                    checkpoint_value: cut(&a.to_string()),
                    current_value: cut(&b.to_string()),
                });
            }
        }
        Ok(())
    }

    /// Check that the checkpoint holds exactly the tensors `expected` (name, shape) of the run
    /// that resumes from it. Errors, the first found: [`CheckpointError::MissingTensor`] or
    /// [`CheckpointError::TensorShape`] in `expected`'s order, then
    /// [`CheckpointError::UnexpectedTensor`] for a tensor `expected` does not name (in name
    /// order). `path` names the checkpoint in messages.
    pub fn check_tensors(&self, path: &Path, expected: &[(String, Vec<usize>)]) -> Result<(), CheckpointError> {
        for (name, shape) in expected {
            let Some(t) = self.tensors.get(name) else {
                return Err(CheckpointError::MissingTensor { path: path.to_path_buf(), tensor: name.clone(), shape: shape.clone() });
            };
            if &t.shape != shape {
                return Err(CheckpointError::TensorShape {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                });
            }
        }
        let names: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = self.tensors.keys().find(|n| !names.contains(n.as_str())) {
            return Err(CheckpointError::UnexpectedTensor { path: path.to_path_buf(), tensor: extra.clone() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::TempDir;

    fn identity() -> ModelIdentity {
        ModelIdentity { arch: "llama".into(), n_layers: 30, d_model: 576, vocab_size: 49152, weight_hash: "0123456789abcdef".into() }
    }

    /// Tensors with awkward values (subnormals, -0.0, the extremes) and odd shapes.
    fn sample() -> Checkpoint {
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| match (i + seed) % 7 {
                    0 => -0.0,
                    1 => f32::MIN_POSITIVE / 3.0,
                    2 => f32::MAX,
                    3 => -f32::MIN_POSITIVE,
                    _ => ((i * 2654435761u32.wrapping_add(seed)) as f32).sin() * 1e-3,
                })
                .collect()
        };
        let mut tensors = BTreeMap::new();
        for (name, shape) in [
            ("router.5.w1", vec![3, 37]),
            ("adam.m.router.5.w1", vec![3, 37]),
            ("adam.v.router.5.w1", vec![3, 37]),
            ("router.5.b2", vec![]),
            ("lora.2.q_proj.A", vec![8, 5]),
            ("empty", vec![0, 4]),
        ] {
            let n = shape.iter().product();
            tensors.insert(name.to_string(), CheckpointTensor { shape, data: values(n, name.len() as u32) });
        }
        Checkpoint {
            step: 1234,
            options: r#"{"stage":"routers","lr":0.001,"lambda":0.01,"steps":2000,"seed":7}"#.into(),
            identity: identity(),
            losses: vec![3.25, 2.9999999999999996, 1e-300, 2.0],
            tensors,
        }
    }

    fn assert_bits_equal(a: &Checkpoint, b: &Checkpoint) {
        assert_eq!((a.step, &a.options, &a.identity), (b.step, &b.options, &b.identity));
        assert_eq!(a.losses.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.losses.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>());
        for (name, t) in &a.tensors {
            let u = &b.tensors[name];
            assert_eq!(t.shape, u.shape, "{name}");
            assert_eq!(
                t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                u.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name}"
            );
        }
    }

    #[test]
    fn round_trip_is_bit_exact_and_atomic() {
        let dir = TempDir::new("ckpt");
        let path = dir.join("checkpoint.safetensors");
        let c = sample();
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_bits_equal(&c, &back);
        back.check_model(&path, &identity()).unwrap();
        back.check_options(&path, &c.options, &[]).unwrap();
        let expected: Vec<(String, Vec<usize>)> = c.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
        back.check_tensors(&path, &expected).unwrap();

        // Overwriting keeps one file, no temporary left; an empty history is fine.
        let mut next = c.clone();
        next.step += 1;
        next.losses.clear();
        next.save(&path).unwrap();
        assert_bits_equal(&next, &Checkpoint::load(&path).unwrap());
        let names: Vec<_> = std::fs::read_dir(&dir.path).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["checkpoint.safetensors"]);

        // A refused save leaves the previous file as it was.
        let mut bad = c.clone();
        bad.tensors.get_mut("router.5.w1").unwrap().data[40] = f32::NAN;
        let e = bad.save(&path).unwrap_err().to_string();
        assert!(e.contains("tensor 'router.5.w1': element 40 is NaN"), "{e}");
        assert_bits_equal(&next, &Checkpoint::load(&path).unwrap());
    }

    #[test]
    fn save_refuses_inconsistent_checkpoints() {
        let dir = TempDir::new("ckpt-bad");
        let path = dir.join("c.safetensors");
        let err = |c: Checkpoint| c.save(&path).unwrap_err().to_string();
        let mut c = sample();
        c.tensors.get_mut("lora.2.q_proj.A").unwrap().data.pop();
        assert!(err(c).contains("tensor 'lora.2.q_proj.A': 39 values for shape [8, 5]"));
        let mut c = sample();
        c.tensors.insert(LOSS_HISTORY.into(), CheckpointTensor { shape: vec![1], data: vec![0.0] });
        assert!(err(c).contains("reserved"));
        let mut c = sample();
        c.losses[2] = f64::INFINITY;
        assert!(err(c).contains("the loss of entry 2 is inf"));
        let mut c = sample();
        c.options = "[1, 2]".into();
        assert!(err(c).contains("'options' is \"[1, 2]\", expected a JSON object"));
        let mut c = sample();
        c.identity.weight_hash = "XYZ".into();
        assert!(err(c).contains("model_weight_hash"));
        assert!(!path.exists());
        let e = sample().save(&dir.join("no/such/folder/c.safetensors")).unwrap_err().to_string();
        assert!(e.contains("no/such/folder/c.safetensors: cannot write"), "{e}");
    }

    #[test]
    fn truncated_or_damaged_files_are_refused() {
        let dir = TempDir::new("ckpt-corrupt");
        let path = dir.join("c.safetensors");
        sample().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let load_bytes = |bytes: &[u8]| {
            let p = dir.join("x.safetensors");
            std::fs::write(&p, bytes).unwrap();
            Checkpoint::load(&p).unwrap_err().to_string()
        };
        // Truncated anywhere: in the length, in the header, in the data; one byte too many.
        for cut_at in [0, 5, 8 + header_len / 2, 8 + header_len + 3, good.len() - 1] {
            let e = load_bytes(&good[..cut_at]);
            assert!(
                e.contains("x.safetensors: damaged or incomplete file") && e.contains(&format!("the file is {cut_at} bytes")),
                "{cut_at}: {e}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(load_bytes(&longer).contains("damaged or incomplete"));
        // A flipped bit in the data: the hash catches it.
        let mut flipped = good.clone();
        let last = flipped.len() - 5;
        flipped[last] ^= 0x10;
        let e = load_bytes(&flipped);
        assert!(e.contains("its bytes were changed"), "{e}");
        // A header length that points past the end.
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
        assert!(load_bytes(&huge).contains("damaged or incomplete"));

        // Other safetensors files: no metadata, another format, a bad metadata value.
        let views = |meta: Option<HashMap<String, String>>| {
            let data = [0u8; 8];
            let v = safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &data).unwrap();
            safetensors::serialize([("w", v)], meta).unwrap()
        };
        assert!(load_bytes(&views(None)).contains("not a firstrt checkpoint: no __metadata__"));
        let meta = |pairs: &[(&str, &str)]| Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        assert!(load_bytes(&views(meta(&[("format", "firstrt-routers")]))).contains("format is \"firstrt-routers\""));
        let e = load_bytes(&views(meta(&[("format", FORMAT), ("version", "1"), ("step", "-3")])));
        assert!(e.contains("'step' is \"-3\", expected a non-negative integer"), "{e}");
        let e = load_bytes(&views(meta(&[("format", FORMAT), ("version", "1"), ("step", "3")])));
        assert!(e.contains("missing metadata key 'options'"), "{e}");

        // A tensor of another dtype (with a matching hash, so the dtype check is what refuses).
        let c = sample();
        let mut tensors = c.file_tensors();
        let data = [0u8; 6];
        tensors.push(("half", Dtype::F16, vec![3], &data));
        tensors.sort_by(|a, b| a.0.cmp(b.0));
        let hash = data_hash(tensors.iter().map(|(n, _, s, b)| (*n, s.as_slice(), *b)));
        let mut metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("step", "1".to_string()),
            ("options", "{}".to_string()),
            ("data_hash", hash),
        ]
        .into_iter()
        .chain(c.identity.metadata())
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let serialize = |metadata: &HashMap<String, String>| {
            let views = tensors.iter().map(|(n, d, s, b)| (*n, safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()));
            safetensors::serialize(views, Some(metadata.clone())).unwrap()
        };
        let e = load_bytes(&serialize(&metadata));
        assert!(e.contains("tensor 'half': dtype F16, expected F32"), "{e}");
        metadata.insert("model_layers".into(), "thirty".into());
        assert!(load_bytes(&serialize(&metadata)).contains("'model_layers' is \"thirty\""));
    }

    #[test]
    fn checks_name_the_model_option_and_tensor_that_differ() {
        let path = Path::new("run/checkpoint.safetensors");
        let c = sample();
        let mut other = identity();
        other.weight_hash = "fedcba9876543210".into();
        let e = c.check_model(path, &other).unwrap_err().to_string();
        assert!(
            e.contains("run/checkpoint.safetensors: made for another model: model_weight_hash (weight hash) is 0123456789abcdef"),
            "{e}"
        );
        other.n_layers = 24;
        assert!(
            c.check_model(path, &other).unwrap_err().to_string().contains("model_layers (number of layers) is 30 in the checkpoint, 24")
        );

        let now = r#"{"seed":7,"stage":"routers","lr":0.002,"lambda":0.01,"steps":4000}"#;
        let e = c.check_options(path, now, &["steps"]).unwrap_err().to_string();
        assert!(e.contains("'lr' is 0.001 in the checkpoint, 0.002 now"), "{e}");
        c.check_options(path, r#"{"seed":7,"stage":"routers","lr":0.001,"lambda":0.01,"steps":4000}"#, &["steps"]).unwrap();
        let e =
            c.check_options(path, r#"{"seed":7,"stage":"routers","lr":0.001,"lambda":0.01,"steps":2000,"gate":"soft"}"#, &[]).unwrap_err();
        assert!(e.to_string().contains("'gate' is null in the checkpoint, \"soft\" now"), "{e}");
        assert!(c.check_options(path, "not json", &[]).unwrap_err().to_string().contains("the current options as a JSON object"));

        let mut expected: Vec<(String, Vec<usize>)> = c.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
        expected.push(("router.6.w1".into(), vec![3, 37]));
        let e = c.check_tensors(path, &expected).unwrap_err().to_string();
        assert!(e.contains("missing tensor 'router.6.w1' (shape [3, 37])"), "{e}");
        expected.pop();
        expected[0].1 = vec![37, 3];
        let e = c.check_tensors(path, &expected).unwrap_err().to_string();
        assert!(e.contains(&format!("tensor '{}' has shape", expected[0].0)), "{e}");
        expected.remove(0);
        let e = c.check_tensors(path, &expected).unwrap_err().to_string();
        assert!(e.contains("unexpected tensor 'adam.m.router.5.w1'"), "{e}");
    }
}
