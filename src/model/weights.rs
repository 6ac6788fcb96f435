//! Host-side weights in Hugging Face layout and names, from a GGUF file or a Hugging Face
//! safetensors folder. Every [`WeightSource`] answers to the canonical (Hugging Face) names and
//! shapes of [`super::names`] (e.g. `model.layers.3.self_attn.q_proj.weight`
//! `[n_heads * head_dim, d_model]`), whatever the file calls and stores them as.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::config::{Arch, ModelConfig, gguf_key, hf_key};
use super::error::ModelError;
use super::gguf::{GgufFile, GgufTensorInfo};
use super::names::{LayerTensor, Projection, TensorName, split_layer};
use super::quant::{HostBlocks, QuantType};

/// A dense f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Canonical (Hugging Face) name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major, Hugging Face order: [out, in] for linear weights.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// Where weights come from. Names are the canonical (Hugging Face) names.
pub trait WeightSource: Send + Sync {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// The tensor as f32 in Hugging Face layout, shape-checked against the config. Errors:
    /// [`ModelError::MissingTensor`], [`ModelError::ShapeMismatch`], an unreadable data type or
    /// truncated data.
    fn get(&self, name: &str) -> Result<HostTensor, ModelError>;
    /// The matrix `name` as its quantised blocks, in Hugging Face layout (`[out, in]`, rows in
    /// Hugging Face order), when the file stores it as a [`QuantType`]; `Ok(None)` when it is
    /// stored as floats or a type without a GPU kernel (read it with [`WeightSource::get`]).
    /// Errors: those of [`WeightSource::get`], and [`ModelError::BadTensor`] when the rows are
    /// not whole blocks or the data is not the blocks of the shape.
    fn get_blocks(&self, name: &str) -> Result<Option<HostBlocks>, ModelError> {
        let _ = name;
        Ok(None)
    }
    /// How the file stores the tensor with canonical name `name` (`Q4_1`, `F16`, `BF16`, ...),
    /// or `None` when it is absent.
    fn storage_type(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
    /// Whether the tensor with canonical name `name` is present.
    fn has(&self, name: &str) -> bool;
    /// Storage types and how many tensors use each, e.g. "Q4_1 x210, F32 x61, Q8_0 x1".
    fn describe_dtypes(&self) -> String;
    /// Bytes of tensor data as stored (quantised size for GGUF).
    fn total_param_bytes(&self) -> u64;
}

/// Expected row-major shape of `name` under `c` (the table in [`super::names`]).
fn tensor_shape(name: TensorName, c: &ModelConfig) -> Vec<usize> {
    match name {
        TensorName::EmbedTokens | TensorName::LmHead => vec![c.vocab_size, c.d_model],
        TensorName::FinalNorm => vec![c.d_model],
        TensorName::Layer(_, t) => match t {
            LayerTensor::InputNorm | LayerTensor::PostAttentionNorm => vec![c.d_model],
            LayerTensor::Weight(p) => {
                let (out, inp) = p.dims(c);
                vec![out, inp]
            }
            LayerTensor::Bias(p) => vec![p.dims(c).0],
        },
    }
}

/// Heads whose rows llama.cpp's converter interleaved (q: n_heads, k: n_kv_heads).
fn permuted_heads(name: TensorName, c: &ModelConfig) -> Option<usize> {
    match name {
        TensorName::Layer(_, LayerTensor::Weight(Projection::Q) | LayerTensor::Bias(Projection::Q)) => Some(c.n_heads),
        TensorName::Layer(_, LayerTensor::Weight(Projection::K) | LayerTensor::Bias(Projection::K)) => Some(c.n_kv_heads),
        _ => None,
    }
}

/// The expected Hugging Face shape of a canonical tensor name under `config`, or `None` when
/// the name is not one of the canonical names.
pub fn expected_shape(config: &ModelConfig, name: &str) -> Option<Vec<usize>> {
    TensorName::parse(name).map(|t| tensor_shape(t, config))
}

fn check_shape(name: &str, expected: &[usize], found: &[usize]) -> Result<(), ModelError> {
    if expected == found {
        Ok(())
    } else {
        Err(ModelError::ShapeMismatch { tensor: name.to_owned(), expected: expected.to_vec(), found: found.to_vec() })
    }
}

/// Checks `rows` and `data` for a per-head row permutation with `n_head` heads.
fn check_head_rows(tensor: &str, data_len: usize, rows: usize, cols: usize, n_head: usize) -> Result<(), ModelError> {
    let bad = |what: String| ModelError::BadTensor { tensor: tensor.to_owned(), what };
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(bad(format!("{rows} rows do not split into {n_head} heads of even size")));
    }
    if rows.checked_mul(cols) != Some(data_len) {
        return Err(bad(format!("{data_len} values are not {rows} x {cols}")));
    }
    Ok(())
}

/// llama.cpp's converter permutation of q/k projection rows, on a row-major [rows, cols]
/// matrix (`cols` = 1 for a bias): within each head of `rows / n_head` rows, the rotate-half
/// order (first half, second half) becomes interleaved pairs. Numpy equivalent:
/// `w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn permute_qk_rows(tensor: &str, data: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>, ModelError> {
    check_head_rows(tensor, data.len(), rows, cols, n_head)?;
    // permuted row h*hd + 2i + s  <-  original row h*hd + s*half + i
    Ok(reorder_head_rows(data, rows, cols, n_head, |base, half, i, s| (base + 2 * i + s, base + s * half + i)))
}

/// Inverse of [`permute_qk_rows`]: restores Hugging Face's rotate-half row order.
pub fn unpermute_qk_rows(tensor: &str, data: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>, ModelError> {
    check_head_rows(tensor, data.len(), rows, cols, n_head)?;
    // original row h*hd + s*half + i  <-  permuted row h*hd + 2i + s
    Ok(reorder_head_rows(data, rows, cols, n_head, |base, half, i, s| (base + s * half + i, base + 2 * i + s)))
}

/// Copies rows per head; `map(head_base, half, i, s)` returns (destination row, source row)
/// for i in 0..half, s in 0..2. Sizes were checked by `check_head_rows`.
fn reorder_head_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    map: impl Fn(usize, usize, usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let (dst, src) = map(h * head_dim, half, i, s);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Checks the configuration's layer count against the tensor table before anything is sized by
/// it: every layer needs tensors named `{layer_prefix}{i}.`, so a count above the number of
/// distinct layer indices in `names` is impossible ([`ModelError::LimitExceeded`] naming the key
/// `key("n_layers")` and how many layers the file holds). The embedding's shape, checked by the
/// callers, bounds the hidden size and the vocabulary the same way.
fn check_layer_count<'a>(
    path: &Path,
    config: &ModelConfig,
    key: &dyn Fn(&str) -> String,
    names: impl Iterator<Item = &'a str>,
    layer_prefix: &str,
) -> Result<(), ModelError> {
    let layers: std::collections::HashSet<usize> =
        names.filter_map(|n| split_layer(n.strip_prefix(layer_prefix)?).map(|(i, _)| i)).filter(|&i| i < config.n_layers).collect();
    if layers.len() < config.n_layers {
        return Err(ModelError::LimitExceeded {
            path: path.to_path_buf(),
            what: format!("{} (decoder layers; the tensor table holds {} layers)", key("n_layers"), layers.len()),
            value: config.n_layers as u64,
            limit: layers.len() as u64,
        });
    }
    Ok(())
}

/// Checks the shape of every canonical tensor the file holds (embedding, final norm, head and
/// each layer's [`LayerTensor::ALL`]) against the configuration when the file opens, so a wrong
/// one is refused before anything is uploaded or sized by it ([`ModelError::ShapeMismatch`]).
/// `shape_of` gives a tensor's row-major shape, `None` when the file lacks it: a missing tensor
/// is reported where it is read, since biases and the head are optional. The layer count was
/// checked against the tensor table first, which bounds the number of names looked up.
fn check_shapes_at_open(config: &ModelConfig, shape_of: impl Fn(TensorName) -> Option<Vec<usize>>) -> Result<(), ModelError> {
    let layers = (0..config.n_layers).flat_map(|i| LayerTensor::ALL.into_iter().map(move |t| TensorName::Layer(i, t)));
    for name in [TensorName::EmbedTokens, TensorName::FinalNorm, TensorName::LmHead].into_iter().chain(layers) {
        if let Some(found) = shape_of(name) {
            check_shape(&name.hf_name(), &tensor_shape(name, config), &found)?;
        }
    }
    Ok(())
}

fn to_usize_shape(dims: &[u64]) -> Option<Vec<usize>> {
    dims.iter().map(|&d| usize::try_from(d).ok()).collect()
}

/// Weights from a GGUF file, mapped to Hugging Face names and layout.
#[derive(Debug)]
pub struct GgufWeights {
    file: GgufFile,
    config: ModelConfig,
}

impl GgufWeights {
    /// Opens a GGUF file and reads its configuration; errors of [`GgufFile::open`] and
    /// [`ModelConfig::from_gguf`].
    pub fn open(path: &Path) -> Result<GgufWeights, ModelError> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Wraps an open GGUF file; errors of [`ModelConfig::from_gguf`].
    pub fn from_file(file: GgufFile) -> Result<GgufWeights, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let arch = file.meta_str("general.architecture")?;
        let key = |field: &str| gguf_key(arch, field);
        check_layer_count(&file.path, &config, &key, file.tensors.iter().map(|t| t.name.as_str()), "blk.")?;
        let by_name: HashMap<&str, &GgufTensorInfo> = file.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        // dims that do not fit in usize read as no shape, which no expected shape equals
        check_shapes_at_open(&config, |t| {
            by_name.get(t.gguf_name().as_str()).map(|i| to_usize_shape(&i.row_major_shape()).unwrap_or_default())
        })?;
        Ok(GgufWeights { file, config })
    }

    /// The underlying GGUF file (raw quantised blocks, metadata, tokenizer keys).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The tensor with canonical name `name`: its name, its GGUF entry and its Hugging Face shape
    /// (GGUF dims are [ne0 = in, ne1 = out]; the same bytes read row-major are [out, in]),
    /// checked against the config. Errors: [`ModelError::MissingTensor`],
    /// [`ModelError::BadTensor`], [`ModelError::ShapeMismatch`].
    fn lookup(&self, name: &str) -> Result<(TensorName, &GgufTensorInfo, Vec<usize>), ModelError> {
        let missing = || ModelError::MissingTensor { path: self.file.path.clone(), tensor: name.to_owned() };
        let canonical = TensorName::parse(name).ok_or_else(missing)?;
        let gguf_name = canonical.gguf_name();
        let info = self
            .file
            .tensor_info(&gguf_name)
            .ok_or_else(|| ModelError::MissingTensor { path: self.file.path.clone(), tensor: format!("{name} (GGUF '{gguf_name}')") })?;
        let found = to_usize_shape(&info.row_major_shape())
            .ok_or_else(|| ModelError::BadTensor { tensor: name.to_owned(), what: format!("dims {:?} do not fit in usize", info.dims) })?;
        check_shape(name, &tensor_shape(canonical, &self.config), &found)?;
        Ok((canonical, info, found))
    }

    /// The heads whose rows llama.cpp permuted in `t`: llama-style GGUFs only, not qwen2.
    fn permuted_heads(&self, t: TensorName) -> Option<usize> {
        match self.config.arch {
            Arch::Qwen2 => None,
            Arch::Llama | Arch::Mistral => permuted_heads(t, &self.config),
        }
    }
}

impl WeightSource for GgufWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn get(&self, name: &str) -> Result<HostTensor, ModelError> {
        let (canonical, info, found) = self.lookup(name)?;
        let mut data = self.file.tensor_f32(&info.name)?;
        if let Some(n_head) = self.permuted_heads(canonical) {
            let rows = found.first().copied().unwrap_or(1);
            let cols = found.get(1).copied().unwrap_or(1);
            data = unpermute_qk_rows(name, &data, rows, cols, n_head)?;
        }
        Ok(HostTensor { name: name.to_owned(), shape: found, data })
    }

    fn get_blocks(&self, name: &str) -> Result<Option<HostBlocks>, ModelError> {
        let (canonical, info, found) = self.lookup(name)?;
        let Some(ty) = QuantType::from_ggml(info.ggml_type) else { return Ok(None) };
        let [rows, cols] = found[..] else { return Ok(None) };
        let blocks = HostBlocks::new(name, rows, cols, ty, self.file.tensor_bytes(info)?.to_vec())?;
        Ok(Some(match self.permuted_heads(canonical) {
            None => blocks,
            Some(n_head) => {
                check_head_rows(name, rows * cols, rows, cols, n_head)?;
                // Hugging Face row h*hd + s*half + i is the file's row h*hd + 2i + s.
                let (hd, half) = (rows / n_head, rows / n_head / 2);
                blocks.reorder_rows(|r| {
                    let (base, s, i) = (r / hd * hd, r % hd / half, r % hd % half);
                    base + 2 * i + s
                })
            }
        }))
    }

    fn has(&self, name: &str) -> bool {
        TensorName::parse(name).is_some_and(|t| self.file.tensor_info(&t.gguf_name()).is_some())
    }

    fn storage_type(&self, name: &str) -> Option<String> {
        let t = TensorName::parse(name)?;
        self.file.tensor_info(&t.gguf_name()).map(|i| i.ggml_type.to_string())
    }

    fn describe_dtypes(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for t in &self.file.tensors {
            *counts.entry(t.ggml_type.to_string()).or_default() += 1;
        }
        describe_counts(counts)
    }

    fn total_param_bytes(&self) -> u64 {
        self.file.tensors.iter().filter_map(|t| t.byte_size()).sum()
    }
}

/// "A x3, B x1", most common first.
fn describe_counts(counts: BTreeMap<String, usize>) -> String {
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.iter().map(|(ty, n)| format!("{ty} x{n}")).collect::<Vec<_>>().join(", ")
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where a tensor lives in the shards.
struct SafeTensorEntry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the shard's file.
    start: usize,
    end: usize,
}

/// Weights from a Hugging Face folder: `config.json` and `model.safetensors` or the shards
/// listed in `model.safetensors.index.json`. F32, F16 and BF16 are converted to f32.
pub struct HfWeights {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<Shard>,
    tensors: HashMap<String, SafeTensorEntry>,
}

impl std::fmt::Debug for HfWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfWeights")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("shards", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl HfWeights {
    /// Opens the folder `dir` and memory-maps its safetensors files. Errors: a missing
    /// `config.json` or weights file ([`ModelError::MissingFile`]), bad JSON, a bad safetensors
    /// header, a shard outside the folder, a tensor in two shards.
    pub fn open(dir: &Path) -> Result<HfWeights, ModelError> {
        let config = ModelConfig::from_hf_config(&dir.join("config.json"))?;
        let shard_names = Self::shard_names(dir)?;
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for file_name in shard_names {
            let path = dir.join(&file_name);
            let io_err = |source| ModelError::Io { path: path.clone(), source };
            let file = File::open(&path).map_err(io_err)?;
            // SAFETY: read-only map; we rely on the file not being modified while open. All
            // accesses are bounds-checked through `get`.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|source| ModelError::SafeTensors { path: path.clone(), source })?;
            // data starts after the u64 header length and the JSON header
            let data_start = header_len
                .checked_add(8)
                .ok_or_else(|| ModelError::Malformed { path: path.clone(), what: "header length overflows".into() })?;
            let shard = shards.len();
            for (name, info) in metadata.tensors() {
                let (begin, end) = info.data_offsets;
                let range = data_start.checked_add(begin).zip(data_start.checked_add(end));
                let Some((start, end)) = range.filter(|(s, e)| s <= e && *e <= mmap.len()) else {
                    return Err(ModelError::Truncated { path: path.clone(), what: format!("data of tensor '{name}'") });
                };
                let entry = SafeTensorEntry { shard, dtype: info.dtype, shape: info.shape.clone(), start, end };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(ModelError::Malformed {
                        path: path.clone(),
                        what: format!("tensor '{name}' appears in more than one shard"),
                    });
                }
            }
            shards.push(Shard { path, mmap });
        }
        check_layer_count(&dir.join("config.json"), &config, &hf_key, tensors.keys().map(String::as_str), "model.layers.")?;
        check_shapes_at_open(&config, |t| tensors.get(&t.hf_name()).map(|e| e.shape.clone()))?;
        Ok(HfWeights { dir: dir.to_path_buf(), config, shards, tensors })
    }

    /// `model.safetensors`, or the distinct files of the index's `weight_map`, sorted.
    fn shard_names(dir: &Path) -> Result<Vec<String>, ModelError> {
        if dir.join("model.safetensors").is_file() {
            return Ok(vec!["model.safetensors".into()]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.is_file() {
            return Err(ModelError::MissingFile {
                path: dir.to_path_buf(),
                what: "model.safetensors or model.safetensors.index.json".into(),
            });
        }
        let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index_path.clone(), source })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::MissingKey { path: index_path.clone(), key: "weight_map".into() })?;
        let mut names: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::WrongKeyType {
                path: index_path.clone(),
                key: format!("weight_map.{tensor}"),
                expected: "a file name",
                found: file.to_string(),
            })?;
            // shard names come from the file: keep them inside the folder
            let plain = !file.is_empty() && !file.contains(['/', '\\']) && file != "." && file != "..";
            if !plain {
                return Err(ModelError::Malformed {
                    path: index_path.clone(),
                    what: format!("shard name '{file}' of tensor '{tensor}' is not a plain file name"),
                });
            }
            if !names.iter().any(|n| n == file) {
                names.push(file.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn entry_f32(&self, name: &str, entry: &SafeTensorEntry) -> Result<Vec<f32>, ModelError> {
        let shard =
            self.shards.get(entry.shard).ok_or_else(|| ModelError::MissingTensor { path: self.dir.clone(), tensor: name.to_owned() })?;
        let bytes = shard
            .mmap
            .get(entry.start..entry.end)
            .ok_or_else(|| ModelError::Truncated { path: shard.path.clone(), what: format!("data of tensor '{name}'") })?;
        let n_elements = entry.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let (elem_bytes, convert): (usize, fn(&[u8]) -> f32) = match entry.dtype {
            Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 => (2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::BF16 => (2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            other => {
                return Err(ModelError::UnsupportedType { tensor: name.to_owned(), ty: format!("{other:?}") });
            }
        };
        if n_elements.and_then(|n| n.checked_mul(elem_bytes)) != Some(bytes.len()) {
            return Err(ModelError::BadTensor {
                tensor: name.to_owned(),
                what: format!("{} bytes for shape {:?} of {:?}", bytes.len(), entry.shape, entry.dtype),
            });
        }
        // chunks_exact yields slices of exactly elem_bytes, so the converters' indices are in range
        Ok(bytes.chunks_exact(elem_bytes).map(convert).collect())
    }
}

impl WeightSource for HfWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn get(&self, name: &str) -> Result<HostTensor, ModelError> {
        let entry = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor { path: self.dir.clone(), tensor: name.to_owned() })?;
        if let Some(expected) = expected_shape(&self.config, name) {
            check_shape(name, &expected, &entry.shape)?;
        }
        let data = self.entry_f32(name, entry)?;
        Ok(HostTensor { name: name.to_owned(), shape: entry.shape.clone(), data })
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn storage_type(&self, name: &str) -> Option<String> {
        self.tensors.get(name).map(|e| format!("{:?}", e.dtype))
    }

    fn describe_dtypes(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for e in self.tensors.values() {
            *counts.entry(format!("{:?}", e.dtype)).or_default() += 1;
        }
        describe_counts(counts)
    }

    fn total_param_bytes(&self) -> u64 {
        self.tensors.values().map(|e| (e.end - e.start) as u64).sum()
    }
}

/// Opens a model: a `.gguf` file (or any file starting with the GGUF magic) or a Hugging Face
/// folder with `config.json`.
pub fn open_model(path: &Path) -> Result<Box<dyn WeightSource>, ModelError> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    if meta.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(ModelError::MissingFile { path: path.to_path_buf(), what: "config.json".into() });
        }
        return Ok(Box::new(HfWeights::open(path)?));
    }
    let is_gguf_name = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let has_gguf_magic = || {
        use std::io::Read;
        let mut magic = [0u8; 4];
        File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
    };
    if is_gguf_name || has_gguf_magic() {
        return Ok(Box::new(GgufWeights::open(path)?));
    }
    Err(ModelError::UnknownModelFormat { path: path.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{GgmlType, MetaValue};
    use crate::model::gguf_test_writer::GgufBuilder;
    use crate::testdata::TempDir;

    #[test]
    fn permutation_matches_numpy_definition_and_inverse_restores() {
        // 2 heads of head_dim 4 (half 2), 3 columns; value = 10 * row + col
        let (rows, cols, n_head) = (8, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|k| (10 * (k / cols) + k % cols) as f32).collect();
        let p = permute_qk_rows("q", &w, rows, cols, n_head).unwrap();
        // numpy: reshape(2, 2, 2, 3).swapaxes(1, 2) puts original rows per head in order 0, 2, 1, 3
        let permuted_rows: Vec<usize> = p.chunks(cols).map(|r| (r[0] / 10.0) as usize).collect();
        assert_eq!(permuted_rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(unpermute_qk_rows("q", &p, rows, cols, n_head).unwrap(), w);

        // larger: 3 heads of 8 rows, bias-like single column
        let b: Vec<f32> = (0..24).map(|k| k as f32 * 0.5).collect();
        let pb = permute_qk_rows("k", &b, 24, 1, 3).unwrap();
        assert_ne!(pb, b);
        assert_eq!(unpermute_qk_rows("k", &pb, 24, 1, 3).unwrap(), b);

        assert!(matches!(unpermute_qk_rows("q", &w, 8, 3, 3), Err(ModelError::BadTensor { .. })));
        assert!(matches!(unpermute_qk_rows("q", &w[..5], 8, 3, 2), Err(ModelError::BadTensor { .. })));
    }

    /// Tiny model: d 8, 2 heads (head_dim 4), 1 kv head, d_ff 12, vocab 5, one layer.
    /// Weight values are `seed + index` so every tensor is distinct.
    fn hf_matrix(rows: usize, cols: usize, seed: f32) -> Vec<f32> {
        (0..rows * cols).map(|k| seed + k as f32).collect()
    }

    fn tiny_gguf(arch: &str, with_bias: bool) -> GgufBuilder {
        let (d, q, kv, ff, vocab) = (8u64, 8u64, 4u64, 12u64, 5u64);
        let permute = arch != "qwen2";
        let qk = |name: &str, rows: u64, heads: usize, seed: f32| -> (String, Vec<f32>) {
            let w = hf_matrix(rows as usize, d as usize, seed);
            let stored = if permute { permute_qk_rows(name, &w, rows as usize, d as usize, heads).unwrap() } else { w };
            (name.to_owned(), stored)
        };
        let (qn, qw) = qk("blk.0.attn_q.weight", q, 2, 1000.0);
        let (kn, kw) = qk("blk.0.attn_k.weight", kv, 1, 2000.0);
        let mut b = GgufBuilder::new()
            .kv("general.architecture", MetaValue::String(arch.into()))
            .kv(&format!("{arch}.block_count"), MetaValue::U32(1))
            .kv(&format!("{arch}.embedding_length"), MetaValue::U32(8))
            .kv(&format!("{arch}.attention.head_count"), MetaValue::U32(2))
            .kv(&format!("{arch}.attention.head_count_kv"), MetaValue::U32(1))
            .kv(&format!("{arch}.feed_forward_length"), MetaValue::U32(12))
            .kv(&format!("{arch}.attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-6))
            .kv(&format!("{arch}.context_length"), MetaValue::U32(64))
            .kv(&format!("{arch}.vocab_size"), MetaValue::U32(5))
            .f32_tensor("token_embd.weight", &[d, vocab], &hf_matrix(5, 8, 0.0))
            .f32_tensor("output_norm.weight", &[d], &hf_matrix(1, 8, 100.0))
            .f32_tensor("blk.0.attn_norm.weight", &[d], &hf_matrix(1, 8, 200.0))
            .f32_tensor(&qn, &[d, q], &qw)
            .f32_tensor(&kn, &[d, kv], &kw)
            .f32_tensor("blk.0.attn_v.weight", &[d, kv], &hf_matrix(4, 8, 3000.0))
            .f32_tensor("blk.0.attn_output.weight", &[q, d], &hf_matrix(8, 8, 4000.0))
            .f32_tensor("blk.0.ffn_norm.weight", &[d], &hf_matrix(1, 8, 300.0))
            .f32_tensor("blk.0.ffn_gate.weight", &[d, ff], &hf_matrix(12, 8, 5000.0))
            .f32_tensor("blk.0.ffn_up.weight", &[d, ff], &hf_matrix(12, 8, 6000.0))
            .f32_tensor("blk.0.ffn_down.weight", &[ff, d], &hf_matrix(8, 12, 7000.0));
        if with_bias {
            let qb = hf_matrix(8, 1, 10.0);
            let qb = if permute { permute_qk_rows("qb", &qb, 8, 1, 2).unwrap() } else { qb };
            b = b.f32_tensor("blk.0.attn_q.bias", &[q], &qb).f32_tensor("blk.0.attn_k.bias", &[kv], &hf_matrix(4, 1, 20.0)).f32_tensor(
                "blk.0.attn_v.bias",
                &[kv],
                &hf_matrix(4, 1, 30.0),
            );
        }
        b
    }

    fn check_tiny_model(w: &dyn WeightSource) {
        let c = w.config();
        assert_eq!((c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size), (1, 8, 2, 1, 4, 12, 5));
        let cases: [(&str, Vec<usize>, f32); 9] = [
            ("model.embed_tokens.weight", vec![5, 8], 0.0),
            ("model.norm.weight", vec![8], 100.0),
            ("model.layers.0.input_layernorm.weight", vec![8], 200.0),
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 8], 1000.0),
            ("model.layers.0.self_attn.k_proj.weight", vec![4, 8], 2000.0),
            ("model.layers.0.self_attn.v_proj.weight", vec![4, 8], 3000.0),
            ("model.layers.0.self_attn.o_proj.weight", vec![8, 8], 4000.0),
            ("model.layers.0.mlp.gate_proj.weight", vec![12, 8], 5000.0),
            ("model.layers.0.mlp.down_proj.weight", vec![8, 12], 7000.0),
        ];
        for (name, shape, seed) in cases {
            let t = w.get(name).unwrap();
            assert_eq!(t.shape, shape, "{name}");
            assert_eq!(t.data, hf_matrix(shape.iter().product(), 1, seed), "{name}");
            assert!(w.has(name));
        }
        assert!(!w.has("lm_head.weight"));
        assert!(matches!(w.get("lm_head.weight"), Err(ModelError::MissingTensor { .. })));
        assert!(matches!(w.get("model.layers.1.mlp.up_proj.weight"), Err(ModelError::MissingTensor { .. })));
    }

    #[test]
    fn gguf_weights_in_hf_layout_with_qk_unpermuted() {
        let file = tiny_gguf("llama", true).write_temp("tiny");
        let w = GgufWeights::open(&file.path).unwrap();
        check_tiny_model(&w);
        assert!(w.config().tied_embeddings);
        let qb = w.get("model.layers.0.self_attn.q_proj.bias").unwrap();
        assert_eq!(qb.data, hf_matrix(8, 1, 10.0));
        assert_eq!(w.describe_dtypes(), "F32 x14");
        assert_eq!(w.total_param_bytes(), 4 * (40 + 8 + 8 + 64 + 32 + 32 + 64 + 8 + 96 + 96 + 96 + 8 + 4 + 4));

        let boxed = open_model(&file.path).unwrap();
        check_tiny_model(boxed.as_ref());
    }

    #[test]
    fn gguf_qwen2_is_not_unpermuted() {
        let file = tiny_gguf("qwen2", true).write_temp("qwen");
        let w = GgufWeights::open(&file.path).unwrap();
        assert_eq!(w.config().arch, Arch::Qwen2);
        check_tiny_model(&w);
        assert_eq!(w.get("model.layers.0.self_attn.q_proj.bias").unwrap().data, hf_matrix(8, 1, 10.0));
    }

    /// Issue 15: a layer tensor of the wrong shape is refused when the file opens (it used to be
    /// found only when read, after the layers before it were uploaded), in GGUF files and HF
    /// folders alike.
    #[test]
    fn gguf_shape_mismatch_names_tensor_and_shapes() {
        let mut b = tiny_gguf("llama", false);
        let t = b.tensors.iter_mut().find(|t| t.name == "blk.0.ffn_up.weight").unwrap();
        t.dims = vec![12, 8]; // transposed: reads as [8, 12] instead of [12, 8]
        let file = b.write_temp("shape");
        let err = GgufWeights::open(&file.path).unwrap_err();
        match &err {
            ModelError::ShapeMismatch { tensor, expected, found } => {
                assert_eq!(tensor, "model.layers.0.mlp.up_proj.weight");
                assert_eq!((expected.as_slice(), found.as_slice()), (&[12, 8][..], &[8, 12][..]));
            }
            other => panic!("expected ShapeMismatch, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("[12, 8]") && msg.contains("[8, 12]"), "{msg}");
        // a missing optional tensor is still reported where it is read, by its GGUF name
        let file = tiny_gguf("llama", false).write_temp("no-bias");
        let w = GgufWeights::open(&file.path).unwrap();
        let err = w.get("model.layers.0.self_attn.q_proj.bias").unwrap_err();
        assert!(err.to_string().contains("attn_q.bias"), "{err}");
    }

    /// Issue 15 §1: a layer count the tensor table cannot hold (it used to abort allocating
    /// per-layer state) is refused when the file opens, naming the key and what the file holds.
    #[test]
    fn a_layer_count_over_the_tensor_table_is_refused_at_open() {
        for blocks in [MetaValue::U32(0xFFFF_FFFE), MetaValue::U32(2), MetaValue::U64(1 << 40)] {
            let mut b = tiny_gguf("llama", false);
            b.kvs.iter_mut().find(|(k, _)| k == "llama.block_count").unwrap().1 = blocks.clone();
            let file = b.write_temp("blocks");
            let err = open_model(&file.path).err().expect("refused");
            let msg = err.to_string();
            assert!(matches!(err, ModelError::LimitExceeded { .. }), "{blocks:?}: {msg}");
            assert!(msg.contains("llama.block_count") && msg.contains(&blocks.as_u64().unwrap().to_string()), "{msg}");
        }
        // a hidden size that the embedding does not have
        let mut b = tiny_gguf("llama", false);
        b.kvs.iter_mut().find(|(k, _)| k == "llama.embedding_length").unwrap().1 = MetaValue::U32(1 << 30);
        b.kvs.retain(|(k, _)| k != "llama.attention.key_length");
        let file = b.write_temp("hidden");
        let err = open_model(&file.path).err().expect("refused");
        assert!(matches!(err, ModelError::ShapeMismatch { ref tensor, .. } if tensor == "model.embed_tokens.weight"), "{err}");

        let dir = TempDir::new("hf-layers");
        let config = TINY_CONFIG.replace("\"num_hidden_layers\": 1", "\"num_hidden_layers\": 4294967294");
        std::fs::write(dir.path.join("config.json"), config).unwrap();
        write_safetensors(&dir.path.join("model.safetensors"), &tiny_hf_tensors());
        let msg = open_model(&dir.path).err().expect("refused").to_string();
        assert!(msg.contains("num_hidden_layers") && msg.contains("4294967294") && msg.contains("holds 1 layers"), "{msg}");
    }

    /// Writes a safetensors file by hand: header JSON then the raw bytes.
    fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert((*name).to_owned(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        std::fs::write(path, out).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
    }
    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
    }

    const TINY_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
        "max_position_embeddings": 64, "vocab_size": 5, "rms_norm_eps": 1e-6}"#;

    /// The tiny model's tensors in HF layout; values up to 7095 are exact in f16 only below
    /// 2048, so large seeds are stored as f32 and small ones in f16/bf16.
    fn tiny_hf_tensors() -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
        vec![
            ("model.embed_tokens.weight", "F16", vec![5, 8], f16_bytes(&hf_matrix(40, 1, 0.0))),
            ("model.norm.weight", "BF16", vec![8], bf16_bytes(&hf_matrix(8, 1, 100.0))),
            ("model.layers.0.input_layernorm.weight", "F32", vec![8], f32_bytes(&hf_matrix(8, 1, 200.0))),
            ("model.layers.0.self_attn.q_proj.weight", "F16", vec![8, 8], f16_bytes(&hf_matrix(64, 1, 1000.0))),
            ("model.layers.0.self_attn.k_proj.weight", "F32", vec![4, 8], f32_bytes(&hf_matrix(32, 1, 2000.0))),
            ("model.layers.0.self_attn.v_proj.weight", "F32", vec![4, 8], f32_bytes(&hf_matrix(32, 1, 3000.0))),
            ("model.layers.0.self_attn.o_proj.weight", "F32", vec![8, 8], f32_bytes(&hf_matrix(64, 1, 4000.0))),
            ("model.layers.0.mlp.gate_proj.weight", "F32", vec![12, 8], f32_bytes(&hf_matrix(96, 1, 5000.0))),
            ("model.layers.0.mlp.down_proj.weight", "F32", vec![8, 12], f32_bytes(&hf_matrix(96, 1, 7000.0))),
            ("model.layers.0.mlp.up_proj.weight", "F32", vec![12, 8], f32_bytes(&hf_matrix(96, 1, 6000.0))),
            ("model.layers.0.extra.ints", "I32", vec![2], vec![0; 8]),
        ]
    }

    #[test]
    fn hf_single_file_and_sharded() {
        let dir = TempDir::new("hf");
        std::fs::write(dir.path.join("config.json"), TINY_CONFIG).unwrap();
        write_safetensors(&dir.path.join("model.safetensors"), &tiny_hf_tensors());
        let w = open_model(&dir.path).unwrap();
        check_tiny_model(w.as_ref());
        assert!(w.describe_dtypes().starts_with("F32 x7"), "{}", w.describe_dtypes());

        assert_eq!(w.get("model.layers.0.mlp.up_proj.weight").unwrap().data, hf_matrix(96, 1, 6000.0));
        let err = w.get("model.layers.0.extra.ints").unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedType { ref ty, .. } if ty == "I32"), "{err}");

        // a layer tensor of the wrong shape: refused at open
        let wrong = TempDir::new("hf-shape");
        std::fs::write(wrong.path.join("config.json"), TINY_CONFIG).unwrap();
        let mut tensors = tiny_hf_tensors();
        let up = tensors.iter_mut().find(|t| t.0 == "model.layers.0.mlp.up_proj.weight").unwrap();
        (up.2, up.3) = (vec![12, 7], f32_bytes(&hf_matrix(84, 1, 6000.0)));
        write_safetensors(&wrong.path.join("model.safetensors"), &tensors);
        let err = open_model(&wrong.path).err().expect("refused");
        assert!(
            matches!(err, ModelError::ShapeMismatch { ref tensor, ref found, .. } if tensor == "model.layers.0.mlp.up_proj.weight" && found == &[12, 7]),
            "{err}"
        );

        // the same tensors split over two shards with an index
        let sharded = TempDir::new("hf-sharded");
        std::fs::write(sharded.path.join("config.json"), TINY_CONFIG).unwrap();
        let tensors = tiny_hf_tensors();
        let (first, second) = tensors.split_at(4);
        write_safetensors(&sharded.path.join("model-00001-of-00002.safetensors"), first);
        write_safetensors(&sharded.path.join("model-00002-of-00002.safetensors"), second);
        let mut map = serde_json::Map::new();
        for (i, (name, ..)) in tensors.iter().enumerate() {
            let file = if i < 4 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
            map.insert((*name).to_owned(), serde_json::json!(file));
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(sharded.path.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let w = open_model(&sharded.path).unwrap();
        check_tiny_model(w.as_ref());
        assert_eq!(w.total_param_bytes(), tensors.iter().map(|t| t.3.len() as u64).sum::<u64>());
    }

    #[test]
    fn hf_bad_folders_are_errors() {
        let dir = TempDir::new("hf-bad");
        assert!(matches!(open_model(&dir.path), Err(ModelError::MissingFile { .. })));
        std::fs::write(dir.path.join("config.json"), TINY_CONFIG).unwrap();
        assert!(matches!(open_model(&dir.path), Err(ModelError::MissingFile { .. })));

        let index = serde_json::json!({"weight_map": {"model.norm.weight": "../outside.safetensors"}});
        std::fs::write(dir.path.join("model.safetensors.index.json"), index.to_string()).unwrap();
        assert!(matches!(open_model(&dir.path), Err(ModelError::Malformed { .. })));

        // a truncated safetensors file
        let full = TempDir::new("hf-trunc");
        std::fs::write(full.path.join("config.json"), TINY_CONFIG).unwrap();
        let st = full.path.join("model.safetensors");
        write_safetensors(&st, &tiny_hf_tensors());
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(open_model(&full.path), Err(ModelError::SafeTensors { .. })));

        let not_model = TempDir::new("hf-none");
        let text = not_model.path.join("notes.txt");
        std::fs::write(&text, "hello").unwrap();
        assert!(matches!(open_model(&text), Err(ModelError::UnknownModelFormat { .. })));
        assert!(matches!(open_model(&not_model.path.join("absent.gguf")), Err(ModelError::Io { .. })));
    }

    /// The SmolLM2-135M-Instruct Q4_1 GGUF (Q8_0 embeddings, Q4_1 matrices, F32 norms).
    fn test_model_path() -> PathBuf {
        crate::testdata::model_path()
    }

    fn assert_close(got: &[f32], expected: &[f32], what: &str) {
        assert_eq!(got.len(), expected.len(), "{what}");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!((g - e).abs() <= 1e-6, "{what}[{i}]: got {g}, gguf-py {e}");
        }
    }

    #[test]
    fn real_model_smollm2_q4_1() {
        let w = open_model(&test_model_path()).unwrap();
        let c = w.config();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim), (30, 576, 9, 3, 64));
        assert_eq!((c.d_ff, c.vocab_size, c.max_position), (1536, 49152, 8192));
        assert!((c.rms_eps - 1e-5).abs() < 1e-9, "rms_eps {}", c.rms_eps);
        assert_eq!(c.rope_theta, 100_000.0);
        assert!(c.tied_embeddings && !c.qkv_bias && c.rope_scaling.is_none());
        assert!(!w.has("lm_head.weight"));
        assert!(w.has("model.layers.29.mlp.down_proj.weight"));
        assert!(!w.has("model.layers.30.mlp.down_proj.weight"));
        let dtypes = w.describe_dtypes();
        assert!(dtypes.contains("Q4_1") && dtypes.contains("Q8_0") && dtypes.contains("F32"), "{dtypes}");

        // Expected values from gguf-py 0.19 (gguf.quants.dequantize, q/k rows un-permuted with
        // numpy: P.reshape(n_head, head_dim // 2, 2, in).swapaxes(1, 2).reshape(out, in)).
        let q = w.get("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.shape, vec![576, 576]);
        assert_close(&q.data[0..3], &[-0.09631348, 0.15734863, -0.09631348], "q_proj row 0");
        assert_close(&q.data[33 * 576..33 * 576 + 3], &[-0.062805176, 0.14465332, 0.0063476562], "q_proj row 33");
        assert_close(&q.data[32 * 576..32 * 576 + 3], &[-0.11730957, -0.11730957, -0.19281006], "q_proj row 32");
        assert_close(&q.data[576 * 576 - 1..], &[-0.25585938], "q_proj last");

        let k = w.get("model.layers.0.self_attn.k_proj.weight").unwrap();
        assert_eq!(k.shape, vec![192, 576]);
        assert_close(&k.data[0..3], &[-0.15527344, 0.34020996, -0.4855957], "k_proj row 0");
        assert_close(&k.data[100 * 576..100 * 576 + 3], &[0.2972412, -0.07501221, 0.54541016], "k_proj row 100");

        let e = w.get("model.embed_tokens.weight").unwrap();
        assert_eq!(e.shape, vec![49152, 576]);
        assert_close(&e.data[576..580], &[-0.023803711, -0.01586914, -0.03967285, 0.01586914], "embed row 1");
        assert_close(&e.data[49152 * 576 - 2..], &[-0.11989403, -0.04170227], "embed last");

        let n = w.get("model.norm.weight").unwrap();
        assert_close(&n.data[..3], &[1.7578125, 1.8203125, 1.78125], "final norm");
    }

    /// A one-layer llama of width `d` (2 heads of d/2, 1 kv head), d_ff 64, vocab 5, with the
    /// matrices of `quant` stored as Q8_0 blocks (q and k permuted as llama.cpp's converter
    /// stores them) and the rest as f32. Returns the builder and the Hugging Face values.
    /// (Hugging Face name, shape, values) of each matrix.
    type HfMatrices = Vec<(String, Vec<usize>, Vec<f32>)>;

    fn tiny_q8_gguf(d: usize, quant: &[&str]) -> (GgufBuilder, HfMatrices) {
        use crate::model::quant::quantize;
        let ff = 64usize;
        let value = |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|k| ((k as f32 * 0.37 + seed).sin()) * 0.5).collect() };
        let mats: [(&str, &str, usize, usize, Option<usize>); 8] = [
            ("token_embd.weight", "model.embed_tokens.weight", 5, d, None),
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", d, d, Some(2)),
            ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", d / 2, d, Some(1)),
            ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", d / 2, d, None),
            ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", d, d, None),
            ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", ff, d, None),
            ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", ff, d, None),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", d, ff, None),
        ];
        let mut b = GgufBuilder::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("llama.block_count", MetaValue::U32(1))
            .kv("llama.embedding_length", MetaValue::U32(d as u32))
            .kv("llama.attention.head_count", MetaValue::U32(2))
            .kv("llama.attention.head_count_kv", MetaValue::U32(1))
            .kv("llama.feed_forward_length", MetaValue::U32(ff as u32))
            .kv("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-6))
            .kv("llama.context_length", MetaValue::U32(64))
            .kv("llama.vocab_size", MetaValue::U32(5))
            .f32_tensor("output_norm.weight", &[d as u64], &value(d, 1.0))
            .f32_tensor("blk.0.attn_norm.weight", &[d as u64], &value(d, 2.0))
            .f32_tensor("blk.0.ffn_norm.weight", &[d as u64], &value(d, 3.0));
        let mut hf = Vec::new();
        for (i, (gguf, name, rows, cols, heads)) in mats.into_iter().enumerate() {
            let w = value(rows * cols, 10.0 * i as f32);
            let stored = match heads {
                Some(h) => permute_qk_rows(gguf, &w, rows, cols, h).unwrap(),
                None => w.clone(),
            };
            let dims = [cols as u64, rows as u64];
            b = if quant.contains(&gguf) {
                // Quantised as one flat run of blocks, as ggml would store it whatever the rows.
                b.tensor(gguf, &dims, GgmlType::Q8_0, quantize(gguf, QuantType::Q8_0, &stored, 1, rows * cols).unwrap().data)
            } else {
                b.f32_tensor(gguf, &dims, &stored)
            };
            hf.push((name.to_string(), vec![rows, cols], w));
        }
        (b, hf)
    }

    #[test]
    fn gguf_blocks_come_in_hugging_face_row_order() {
        use crate::model::quant::quantize;
        let q8 = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"];
        let (b, hf) = tiny_q8_gguf(64, &q8);
        let file = b.write_temp("tiny-q8");
        let w = GgufWeights::open(&file.path).unwrap();
        for (name, shape, values) in &hf {
            let blocks = w.get_blocks(name).unwrap();
            let quantised = ["q_proj", "k_proj", "down_proj"].iter().any(|p| name.contains(p));
            assert_eq!(blocks.is_some(), quantised, "{name}");
            assert_eq!(w.storage_type(name).unwrap(), if quantised { "Q8_0" } else { "F32" }, "{name}");
            if let Some(blocks) = blocks {
                // Quantising rows commutes with reordering them: the blocks are those of the
                // Hugging Face matrix, and they dequantise to what `get` returns.
                assert_eq!((blocks.rows, blocks.cols, blocks.ty), (shape[0], shape[1], QuantType::Q8_0));
                assert_eq!(blocks.data, quantize(name, QuantType::Q8_0, values, shape[0], shape[1]).unwrap().data, "{name}");
                assert_eq!(blocks.dequantize().unwrap(), w.get(name).unwrap().data, "{name}");
            }
        }
        assert!(w.get_blocks("lm_head.weight").is_err());
    }

    #[test]
    fn gguf_blocks_that_split_rows_are_refused_naming_the_tensor() {
        // ffn_gate is [64, 48]: 48-value rows, 96 whole Q8_0 blocks in all but not per row.
        let (b, _) = tiny_q8_gguf(48, &["blk.0.ffn_gate.weight"]);
        // The file is refused when opened, before any block is read.
        let file = b.write_temp("tiny-q8-rows");
        let e = GgufWeights::open(&file.path).unwrap_err().to_string();
        assert!(e.contains("blk.0.ffn_gate.weight") && e.contains("[48, 64]") && e.contains("Q8_0"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}
