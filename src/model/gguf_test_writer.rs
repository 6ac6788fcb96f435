//! GGUF writer for tests and fuzz seeds: builds small GGUF files in memory so that the reader,
//! the config parser and the weight mapping can be tested without real model files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::gguf::{GgmlType, MetaValue};

/// One tensor to write: name, GGUF dims, ggml type id and its bytes as stored.
pub struct TestTensor {
    /// Tensor name.
    pub name: String,
    /// GGUF order, `ne[0]` first.
    pub dims: Vec<u64>,
    /// ggml type id ([`GgmlType::id`]).
    pub type_id: u32,
    /// Data as stored in the file (quantised blocks for quantised types).
    pub data: Vec<u8>,
}

/// Builder of a GGUF file image.
pub struct GgufBuilder {
    /// GGUF version written in the header (the reader accepts 2 and 3).
    pub version: u32,
    /// Written as `general.alignment` (u32) when set; the data is aligned to it either way.
    pub alignment: Option<u32>,
    /// Metadata in file order.
    pub kvs: Vec<(String, MetaValue)>,
    /// Tensors in file order.
    pub tensors: Vec<TestTensor>,
}

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

/// Appends a GGUF string: u64 length, then the bytes.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes a value without its type tag.
fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            let elem_type = items.first().map_or(0, type_id);
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

impl Default for GgufBuilder {
    /// An empty version-3 file with the default alignment.
    fn default() -> Self {
        GgufBuilder { version: 3, alignment: None, kvs: Vec::new(), tensors: Vec::new() }
    }
}

impl GgufBuilder {
    /// An empty version-3 file with the default alignment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key/value.
    pub fn kv(mut self, key: &str, value: MetaValue) -> Self {
        self.kvs.push((key.to_owned(), value));
        self
    }

    /// Adds a tensor with its stored bytes (`dims` in GGUF order, `dims[0]` the row length).
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors.push(TestTensor { name: name.to_owned(), dims: dims.to_vec(), type_id: ty.id(), data });
        self
    }

    /// Adds an f32 tensor.
    pub fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, data)
    }

    /// The file image, and the byte position where the tensor infos start.
    pub fn build_with_info_start(&self) -> (Vec<u8>, usize) {
        let alignment = u64::from(self.alignment.unwrap_or(32));
        let mut kvs = self.kvs.clone();
        if let Some(a) = self.alignment {
            kvs.push(("general.alignment".to_owned(), MetaValue::U32(a)));
        }
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (key, value) in &kvs {
            put_string(&mut out, key);
            out.extend_from_slice(&type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let info_start = out.len();
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
        }
        let data_start = (out.len() as u64).next_multiple_of(alignment);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend_from_slice(&t.data);
        }
        (out, info_start)
    }

    /// The file image.
    pub fn build(&self) -> Vec<u8> {
        self.build_with_info_start().0
    }

    /// Writes the image to a fresh temporary file and returns its path.
    pub fn write_temp(&self, tag: &str) -> TempFile {
        TempFile::with_bytes(tag, &self.build())
    }

    /// A LLaMA model of the given sizes with f32 weights drawn uniformly from ±`scale` /
    /// sqrt(fan-in) (norm weights 1 ± 0.1) by a seeded xorshift, untied LM head, no tokenizer:
    /// enough for the runtime and training engine to run on token ids. Sizes: `n_layers`,
    /// `d` = d_model, `heads` x `head_dim` = d, `kv_heads`, `ff` = d_ff, `vocab`.
    pub fn random_llama(dims: RandomLlama, seed: u64) -> GgufBuilder {
        let RandomLlama { n_layers, d, heads, kv_heads, ff, vocab } = dims;
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut matrix = |rows: usize, cols: usize| -> Vec<f32> {
            let bound = 1.0 / (cols as f32).sqrt();
            (0..rows * cols).map(|_| next() * bound).collect()
        };
        let kv = kv_heads * (d / heads);
        let arch = "llama";
        let u = |v: usize| MetaValue::U32(v as u32);
        let mut b = GgufBuilder::new()
            .kv("general.architecture", MetaValue::String(arch.into()))
            .kv("llama.block_count", u(n_layers))
            .kv("llama.embedding_length", u(d))
            .kv("llama.attention.head_count", u(heads))
            .kv("llama.attention.head_count_kv", u(kv_heads))
            .kv("llama.feed_forward_length", u(ff))
            .kv("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
            .kv("llama.context_length", u(256))
            .kv("llama.vocab_size", u(vocab));
        let norm = |m: &mut dyn FnMut(usize, usize) -> Vec<f32>, n: usize| {
            m(1, n).iter().map(|v| 1.0 + 0.1 * v * (n as f32).sqrt()).collect::<Vec<f32>>()
        };
        let (d64, kv64, ff64, vocab64) = (d as u64, kv as u64, ff as u64, vocab as u64);
        b = b.f32_tensor("token_embd.weight", &[d64, vocab64], &matrix(vocab, d).iter().map(|v| v * 8.0).collect::<Vec<_>>());
        b = b.f32_tensor("output.weight", &[d64, vocab64], &matrix(vocab, d));
        b = b.f32_tensor("output_norm.weight", &[d64], &norm(&mut matrix, d));
        for l in 0..n_layers {
            let t = |name: &str| format!("blk.{l}.{name}.weight");
            b = b.f32_tensor(&t("attn_norm"), &[d64], &norm(&mut matrix, d));
            b = b.f32_tensor(&t("attn_q"), &[d64, d64], &matrix(d, d));
            b = b.f32_tensor(&t("attn_k"), &[d64, kv64], &matrix(kv, d));
            b = b.f32_tensor(&t("attn_v"), &[d64, kv64], &matrix(kv, d));
            b = b.f32_tensor(&t("attn_output"), &[d64, d64], &matrix(d, d));
            b = b.f32_tensor(&t("ffn_norm"), &[d64], &norm(&mut matrix, d));
            b = b.f32_tensor(&t("ffn_gate"), &[d64, ff64], &matrix(ff, d));
            b = b.f32_tensor(&t("ffn_up"), &[d64, ff64], &matrix(ff, d));
            b = b.f32_tensor(&t("ffn_down"), &[ff64, d64], &matrix(d, ff));
        }
        b
    }
}

/// Sizes of [`GgufBuilder::random_llama`].
#[derive(Debug, Clone, Copy)]
pub struct RandomLlama {
    /// Decoder layers.
    pub n_layers: usize,
    /// Hidden size (heads x head_dim).
    pub d: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides heads).
    pub kv_heads: usize,
    /// MLP intermediate size.
    pub ff: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// A file under the system temp dir, removed when dropped.
pub struct TempFile {
    /// The file.
    pub path: PathBuf,
}

impl TempFile {
    /// Writes `bytes` to a fresh file whose name contains `tag`; panics when it cannot.
    pub fn with_bytes(tag: &str, bytes: &[u8]) -> TempFile {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("firstrt-test-{}-{tag}-{n}.gguf", std::process::id()));
        std::fs::write(&path, bytes).expect("write temp GGUF");
        TempFile { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
