//! GGUF (versions 2 and 3) reader over a memory-mapped file.
//!
//! Layout of a GGUF file (all integers little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count x  { key: string, value_type: u32, value }
//! tensor_count x { name: string, n_dims: u32, dims: [u64; n_dims], ggml_type: u32, offset: u64 }
//! padding up to `general.alignment` (default 32)
//! data section: each tensor at data_start + offset
//! string = { len: u64, bytes: [u8; len] }   array = { elem_type: u32, count: u64, elems }
//! ```
//!
//! GGUF dims are innermost-first: `dims[0]` (ggml's `ne[0]`) is the length of a row and varies
//! fastest in memory. Every tensor's byte range is checked against the file when opening; types
//! this crate cannot dequantise only fail when such a tensor is read.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::dequantize;
use super::error::ModelError;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of every tensor offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Nesting limit for array metadata values (arrays of arrays of ...), against stack exhaustion.
pub const MAX_ARRAY_NESTING: u32 = 8;
/// Smallest possible size of the fixed header: magic, version, tensor count, kv count.
const HEADER_BYTES: u64 = 4 + 4 + 8 + 8;
/// Smallest encoded tensor info: empty name (8), n_dims (4), no dims, type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Smallest encoded key/value: empty key (8), value type (4), a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// One metadata value. Arrays may nest.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// A u8 value.
    U8(u8),
    /// A i8 value.
    I8(i8),
    /// A u16 value.
    U16(u16),
    /// A i16 value.
    I16(i16),
    /// A u32 value.
    U32(u32),
    /// A i32 value.
    I32(i32),
    /// A u64 value.
    U64(u64),
    /// A i64 value.
    I64(i64),
    /// A f32 value.
    F32(f32),
    /// A f64 value.
    F64(f64),
    /// A bool value.
    Bool(bool),
    /// A UTF-8 string value.
    String(String),
    /// A array of values of one type value.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer value that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(u64::from(v)),
            MetaValue::U16(v) => Some(u64::from(v)),
            MetaValue::U32(v) => Some(u64::from(v)),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(i64::from(v)),
            MetaValue::U16(v) => Some(i64::from(v)),
            MetaValue::U32(v) => Some(i64::from(v)),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I8(v) => Some(i64::from(v)),
            MetaValue::I16(v) => Some(i64::from(v)),
            MetaValue::I32(v) => Some(i64::from(v)),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float value, or an integer converted to f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(f64::from(v)),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64).or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    /// The string of a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value of a bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }
}

/// Metadata value type ids of the GGUF format.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Smallest encoded size of one value of a metadata type (used to bound array counts before
/// allocating); `None` for an unknown type id.
fn min_encoded_size(type_id: u32) -> Option<u64> {
    use value_type::*;
    match type_id {
        U8 | I8 | BOOL => Some(1),
        U16 | I16 => Some(2),
        U32 | I32 | F32 => Some(4),
        U64 | I64 | F64 => Some(8),
        STRING => Some(8),
        ARRAY => Some(4 + 8),
        _ => None,
    }
}

/// Element type of a tensor, with ggml's numeric ids.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half float.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit blocks of 32 with an f16 scale.
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum.
    Q4_1,
    /// 5-bit blocks of 32 with an f16 scale.
    Q5_0,
    /// 5-bit blocks of 32 with an f16 scale and minimum.
    Q5_1,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// 2-bit k-quant super-blocks of 256.
    Q2_K,
    /// 3-bit k-quant super-blocks of 256.
    Q3_K,
    /// 4-bit k-quant super-blocks of 256.
    Q4_K,
    /// 5-bit k-quant super-blocks of 256.
    Q5_K,
    /// 6-bit k-quant super-blocks of 256.
    Q6_K,
    /// Any other ggml type id (Q8_1, Q8_K, IQ*, integer types, ...).
    Other(u32),
}

/// How a ggml type packs elements: `elements` values are stored in `bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    /// Values per block.
    pub elements: u64,
    /// Bytes per block.
    pub bytes: u64,
}

impl GgmlType {
    /// The type with ggml id `id` (`enum ggml_type`); [`GgmlType::Other`] for ids not listed.
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml id (`enum ggml_type`), as stored in a GGUF tensor info.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// Block size in elements and bytes, per ggml's block structs; `None` when this crate does
    /// not know the type's layout (its size cannot be checked and it cannot be read).
    pub fn block_layout(self) -> Option<BlockLayout> {
        let (elements, bytes) = match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            // d f16, qs[16]
            GgmlType::Q4_0 => (32, 2 + 16),
            // d f16, m f16, qs[16]
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            // d f16, qh[4], qs[16]
            GgmlType::Q5_0 => (32, 2 + 4 + 16),
            // d f16, m f16, qh[4], qs[16]
            GgmlType::Q5_1 => (32, 2 + 2 + 4 + 16),
            // d f16, qs[32] i8
            GgmlType::Q8_0 => (32, 2 + 32),
            // scales[16], qs[64], d f16, dmin f16
            GgmlType::Q2_K => (256, 16 + 64 + 2 + 2),
            // hmask[32], qs[64], scales[12], d f16
            GgmlType::Q3_K => (256, 32 + 64 + 12 + 2),
            // d f16, dmin f16, scales[12], qs[128]
            GgmlType::Q4_K => (256, 2 + 2 + 12 + 128),
            // d f16, dmin f16, scales[12], qh[32], qs[128]
            GgmlType::Q5_K => (256, 2 + 2 + 12 + 32 + 128),
            // ql[128], qh[64], scales[16] i8, d f16
            GgmlType::Q6_K => (256, 128 + 64 + 16 + 2),
            // Q8_1: d f16, s f16, qs[32]
            GgmlType::Other(9) => (32, 2 + 2 + 32),
            // Q8_K: d f32, qs[256], bsums i16[16]
            GgmlType::Other(15) => (256, 4 + 256 + 32),
            // I8, I16, I32, I64, F64
            GgmlType::Other(24) => (1, 1),
            GgmlType::Other(25) => (1, 2),
            GgmlType::Other(26) => (1, 4),
            GgmlType::Other(27) | GgmlType::Other(28) => (1, 8),
            GgmlType::Other(_) => return None,
        };
        Some(BlockLayout { elements, bytes })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(9) => write!(f, "Q8_1"),
            GgmlType::Other(15) => write!(f, "Q8_K"),
            GgmlType::Other(24) => write!(f, "I8"),
            GgmlType::Other(25) => write!(f, "I16"),
            GgmlType::Other(26) => write!(f, "I32"),
            GgmlType::Other(27) => write!(f, "I64"),
            GgmlType::Other(28) => write!(f, "F64"),
            GgmlType::Other(id) => write!(f, "ggml type {id}"),
            known => write!(f, "{known:?}"),
        }
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The file's tensor name, e.g. `blk.0.attn_q.weight` (see [`super::names`]).
    pub name: String,
    /// GGUF order: `dims[0]` (`ne[0]`) is the row length, the fastest-varying index.
    pub dims: Vec<u64>,
    /// How the values are stored.
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements (product of dims), `None` on overflow.
    pub fn n_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Size of the tensor's data in bytes, `None` when the type's layout is unknown, the row
    /// length is not a whole number of blocks, or on overflow.
    pub fn byte_size(&self) -> Option<u64> {
        let layout = self.ggml_type.block_layout()?;
        let row = self.dims.first().copied().unwrap_or(1);
        if row % layout.elements != 0 {
            return None;
        }
        let n = self.n_elements()?;
        (n / layout.elements).checked_mul(layout.bytes)
    }

    /// Shape in row-major order (outermost first): the GGUF dims reversed.
    pub fn row_major_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An open GGUF file: parsed header, metadata and tensor table over a memory map.
pub struct GgufFile {
    /// The file, for messages.
    pub path: PathBuf,
    /// GGUF version: 2 or 3.
    pub version: u32,
    /// Every metadata key and value.
    pub metadata: BTreeMap<String, MetaValue>,
    /// The tensor table, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    mmap: Mmap,
    data_offset: u64,
    alignment: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .field("alignment", &self.alignment)
            .finish()
    }
}

/// Characters of a key or tensor name that messages quote (see [`quoted`]).
const QUOTED_CHARS: usize = 40;

/// A key or tensor name read from a file, as messages show it: in single quotes, escaped
/// (`char::escape_debug`: no raw NUL, newline or control character) and cut to its first
/// [`QUOTED_CHARS`] characters with "..." after, so that a wrong string length in the file
/// cannot pour hundreds of raw header bytes into an error.
fn quoted(name: &str) -> String {
    let mut out = String::from("'");
    out.extend(name.chars().take(QUOTED_CHARS).flat_map(char::escape_debug));
    out.push('\'');
    if name.chars().nth(QUOTED_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

/// Bounds-checked little-endian reader over the header bytes.
struct HeaderReader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> HeaderReader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len().saturating_sub(self.pos)) as u64
    }

    fn truncated(&self, what: &dyn Fn() -> String) -> ModelError {
        ModelError::Truncated { path: self.path.to_path_buf(), what: what() }
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], ModelError> {
        let n = usize::try_from(n).map_err(|_| self.truncated(what))?;
        let end = self.pos.checked_add(n).ok_or_else(|| self.truncated(what))?;
        let bytes = self.buf.get(self.pos..end).ok_or_else(|| self.truncated(what))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], ModelError> {
        let bytes = self.take(N as u64, what)?;
        bytes.try_into().map_err(|_| self.truncated(what))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed string. The length is checked against the remaining bytes before
    /// anything is allocated.
    fn string_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8], ModelError> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(ModelError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{} (string of {len} bytes, {} left)", what(), self.remaining()),
            });
        }
        self.take(len, what)
    }

    fn utf8_string(&mut self, what: &dyn Fn() -> String) -> Result<String, ModelError> {
        let bytes = self.string_bytes(what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ModelError::Malformed { path: self.path.to_path_buf(), what: format!("{} is not valid UTF-8", what()) })
    }

    fn value(&mut self, type_id: u32, depth: u32, what: &dyn Fn() -> String) -> Result<MetaValue, ModelError> {
        use value_type::*;
        Ok(match type_id {
            U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            BOOL => {
                let [b] = self.array::<1>(what)?;
                match b {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    other => {
                        return Err(ModelError::Malformed {
                            path: self.path.to_path_buf(),
                            what: format!("{}: bool byte {other} is neither 0 nor 1", what()),
                        });
                    }
                }
            }
            STRING => MetaValue::String(String::from_utf8_lossy(self.string_bytes(what)?).into_owned()),
            ARRAY => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(ModelError::LimitExceeded {
                        path: self.path.to_path_buf(),
                        what: format!("array nesting depth of {}", what()),
                        value: u64::from(depth) + 1,
                        limit: u64::from(MAX_ARRAY_NESTING),
                    });
                }
                let elem_type = self.u32(what)?;
                let count = self.u64(what)?;
                let min_size = min_encoded_size(elem_type).ok_or_else(|| ModelError::Malformed {
                    path: self.path.to_path_buf(),
                    what: format!("{}: unknown array element type {elem_type}", what()),
                })?;
                // Every element takes at least `min_size` bytes, so a count that cannot fit in
                // the rest of the file is rejected before allocating.
                let max_count = self.remaining() / min_size;
                if count > max_count {
                    return Err(ModelError::LimitExceeded {
                        path: self.path.to_path_buf(),
                        what: format!("array length of {} (bytes left in file)", what()),
                        value: count,
                        limit: max_count,
                    });
                }
                let count = usize::try_from(count).map_err(|_| self.truncated(what))?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_type, depth + 1, what)?);
                }
                MetaValue::Array(items)
            }
            other => {
                return Err(ModelError::Malformed {
                    path: self.path.to_path_buf(),
                    what: format!("{}: unknown metadata value type {other}", what()),
                });
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor table, and every tensor's
    /// byte range against the file length.
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let io_err = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        if file_len < HEADER_BYTES {
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                what: format!("header ({file_len} bytes, need {HEADER_BYTES})"),
            });
        }
        // SAFETY: the map is read-only; as for any memory-mapped model file, we rely on it not
        // being modified while open. Every access below is bounds-checked against its length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<GgufFile, ModelError> {
        let mut r = HeaderReader { buf: &mmap, pos: 0, path };
        let magic = r.take(4, &|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(ModelError::BadMagic { path: path.to_path_buf(), found: magic.to_vec() });
        }
        let version = r.u32(&|| "version".into())?;
        if version != 2 && version != 3 {
            return Err(ModelError::UnsupportedVersion { path: path.to_path_buf(), version });
        }
        let tensor_count = r.u64(&|| "tensor count".into())?;
        let kv_count = r.u64(&|| "metadata count".into())?;
        let limit_for = |min_size: u64, r: &HeaderReader| r.remaining() / min_size;
        if kv_count > limit_for(MIN_KV_BYTES, &r) {
            return Err(ModelError::LimitExceeded {
                path: path.to_path_buf(),
                what: "metadata key/value count (bytes left in file)".into(),
                value: kv_count,
                limit: limit_for(MIN_KV_BYTES, &r),
            });
        }

        let mut metadata = BTreeMap::new();
        for index in 0..kv_count {
            let key = r.utf8_string(&|| format!("metadata key #{index}"))?;
            let what = || format!("metadata value {}", quoted(&key));
            let type_id = r.u32(&what)?;
            let value = r.value(type_id, 0, &what)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(ModelError::Malformed { path: path.to_path_buf(), what: format!("duplicate metadata key {}", quoted(&key)) });
            }
        }

        if tensor_count > limit_for(MIN_TENSOR_INFO_BYTES, &r) {
            return Err(ModelError::LimitExceeded {
                path: path.to_path_buf(),
                what: "tensor count (bytes left in file)".into(),
                value: tensor_count,
                limit: limit_for(MIN_TENSOR_INFO_BYTES, &r),
            });
        }
        let mut tensors = Vec::with_capacity(usize::try_from(tensor_count).unwrap_or(0));
        let mut names = HashSet::new();
        for index in 0..tensor_count {
            let name = r.utf8_string(&|| format!("name of tensor #{index}"))?;
            let what = || format!("info of tensor {}", quoted(&name));
            let n_dims = r.u32(&what)?;
            if n_dims > MAX_DIMS {
                return Err(ModelError::LimitExceeded {
                    path: path.to_path_buf(),
                    what: format!("number of dimensions of tensor {}", quoted(&name)),
                    value: u64::from(n_dims),
                    limit: u64::from(MAX_DIMS),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let ggml_type = GgmlType::from_id(r.u32(&what)?);
            let offset = r.u64(&what)?;
            if !names.insert(name.clone()) {
                return Err(ModelError::Malformed { path: path.to_path_buf(), what: format!("duplicate tensor name {}", quoted(&name)) });
            }
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(ModelError::Malformed {
                        path: path.to_path_buf(),
                        what: format!("general.alignment {v:?} is not a power of two"),
                    });
                }
            },
        };
        let header_end = r.pos as u64;
        let data_offset = header_end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| ModelError::Malformed { path: path.to_path_buf(), what: "data offset overflows".into() })?;

        let file_len = mmap.len() as u64;
        for t in &tensors {
            Self::check_tensor_extent(path, t, data_offset, alignment, file_len)?;
        }

        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, mmap, data_offset, alignment })
    }

    /// Checks one tensor's dims, offset alignment and byte range against the file.
    fn check_tensor_extent(path: &Path, t: &GgufTensorInfo, data_offset: u64, alignment: u64, file_len: u64) -> Result<(), ModelError> {
        let malformed = |what: String| ModelError::Malformed { path: path.to_path_buf(), what };
        let name = quoted(&t.name);
        if t.n_elements().is_none() {
            return Err(malformed(format!("tensor {name}: element count of dims {:?} overflows", t.dims)));
        }
        if !t.offset.is_multiple_of(alignment) {
            return Err(malformed(format!("tensor {name}: offset {} is not a multiple of the alignment {alignment}", t.offset)));
        }
        let start = data_offset.checked_add(t.offset).ok_or_else(|| malformed(format!("tensor {name}: offset {} overflows", t.offset)))?;
        // Unknown layouts cannot be sized; they are only checked to start inside the file
        // and fail when read.
        let size = match t.ggml_type.block_layout() {
            None => 0,
            Some(layout) => t.byte_size().ok_or_else(|| {
                malformed(format!(
                    "tensor {name}: dims {:?} are not whole {}-element blocks of {} or overflow",
                    t.dims, layout.elements, t.ggml_type
                ))
            })?,
        };
        let end = start.checked_add(size).ok_or_else(|| malformed(format!("tensor {name}: size {size} overflows")))?;
        if end > file_len {
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                what: format!("data of tensor {name} (bytes {start}..{end}, file has {file_len})"),
            });
        }
        Ok(())
    }

    /// Alignment of the data section and tensor offsets (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The metadata value of `key`, if present.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&MetaValue, ModelError> {
        self.meta(key).ok_or_else(|| ModelError::MissingKey { path: self.path.clone(), key: key.to_owned() })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &MetaValue) -> ModelError {
        ModelError::WrongKeyType { path: self.path.clone(), key: key.to_owned(), expected, found: format!("{} {v:?}", v.type_name()) }
    }

    /// A required non-negative integer value: [`ModelError::MissingKey`] or
    /// [`ModelError::WrongKeyType`] otherwise.
    pub fn meta_u64(&self, key: &str) -> Result<u64, ModelError> {
        let v = self.required(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A required number (float or integer); errors as [`GgufFile::meta_u64`].
    pub fn meta_f64(&self, key: &str) -> Result<f64, ModelError> {
        let v = self.required(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    /// A required string value; errors as [`GgufFile::meta_u64`].
    pub fn meta_str(&self, key: &str) -> Result<&str, ModelError> {
        let v = self.required(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// The table entry of the tensor the file names `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (quantised blocks as stored), bounds-checked against the file.
    /// Errors: [`ModelError::UnsupportedType`], [`ModelError::BadTensor`] (dims not whole
    /// blocks), [`ModelError::Truncated`].
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8], ModelError> {
        let size = match info.ggml_type.block_layout() {
            None => {
                return Err(ModelError::UnsupportedType { tensor: info.name.clone(), ty: info.ggml_type.to_string() });
            }
            Some(_) => info.byte_size().ok_or_else(|| ModelError::BadTensor {
                tensor: info.name.clone(),
                what: format!("dims {:?} do not fit {} blocks", info.dims, info.ggml_type),
            })?,
        };
        let truncated = || ModelError::Truncated { path: self.path.clone(), what: format!("data of tensor '{}'", info.name) };
        let start = self.data_offset.checked_add(info.offset).ok_or_else(truncated)?;
        let end = start.checked_add(size).ok_or_else(truncated)?;
        let start = usize::try_from(start).map_err(|_| truncated())?;
        let end = usize::try_from(end).map_err(|_| truncated())?;
        self.mmap.get(start..end).ok_or_else(truncated)
    }

    /// A tensor dequantised to f32, in storage order: row-major with `dims[0]` fastest.
    /// Errors: [`ModelError::MissingTensor`], those of [`GgufFile::tensor_bytes`] and of
    /// dequantisation.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let info = self.tensor_info(name).ok_or_else(|| ModelError::MissingTensor { path: self.path.clone(), tensor: name.to_owned() })?;
        let bytes = self.tensor_bytes(info)?;
        let n = info
            .n_elements()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| ModelError::BadTensor { tensor: name.to_owned(), what: format!("too many elements: dims {:?}", info.dims) })?;
        dequantize(name, info.ggml_type, bytes, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf_test_writer::{GgufBuilder, TempFile};
    use half::f16;

    fn q8_0_block(d: f32, first: i8) -> Vec<u8> {
        let mut b = f16::from_f32(d).to_le_bytes().to_vec();
        b.extend((0..32).map(|j| first.wrapping_add(j) as u8));
        b
    }

    fn sample_builder() -> GgufBuilder {
        let f16_values = [1.0f32, -0.5, 2.0, 0.25];
        let mut q8 = q8_0_block(0.5, -16);
        q8.extend(q8_0_block(0.25, 3));
        GgufBuilder::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("t.u8", MetaValue::U8(200))
            .kv("t.i8", MetaValue::I8(-5))
            .kv("t.u16", MetaValue::U16(60000))
            .kv("t.i16", MetaValue::I16(-300))
            .kv("t.u32", MetaValue::U32(4_000_000_000))
            .kv("t.i32", MetaValue::I32(-70000))
            .kv("t.u64", MetaValue::U64(1 << 40))
            .kv("t.i64", MetaValue::I64(-(1 << 40)))
            .kv("t.f32", MetaValue::F32(1e-5))
            .kv("t.f64", MetaValue::F64(0.1))
            .kv("t.bool", MetaValue::Bool(true))
            .kv("t.empty", MetaValue::Array(vec![]))
            .kv("t.strings", MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("é✓".into())]))
            .kv(
                "t.nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
                    MetaValue::Array(vec![MetaValue::I32(3)]),
                ]),
            )
            .f32_tensor("a.f32", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5])
            .tensor("b.f16", &[4], GgmlType::F16, f16_values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect())
            .tensor("c.q8", &[32, 2], GgmlType::Q8_0, q8)
    }

    fn open_bytes(tag: &str, bytes: &[u8]) -> (TempFile, Result<GgufFile, ModelError>) {
        let file = TempFile::with_bytes(tag, bytes);
        let result = GgufFile::open(&file.path);
        (file, result)
    }

    #[test]
    fn round_trip_metadata_and_tensors() {
        for (version, alignment) in [(3, None), (2, Some(64u32)), (3, Some(8))] {
            let mut builder = sample_builder();
            builder.version = version;
            builder.alignment = alignment;
            let file = builder.write_temp("roundtrip");
            let g = GgufFile::open(&file.path).unwrap();
            assert_eq!(g.version, version);
            let align = u64::from(alignment.unwrap_or(32));
            assert_eq!(g.alignment(), align);
            assert_eq!(g.data_offset() % align, 0);

            for (key, value) in &builder.kvs {
                assert_eq!(g.meta(key), Some(value), "key {key}");
            }
            assert_eq!(g.meta_str("general.architecture").unwrap(), "llama");
            assert_eq!(g.meta_u64("t.u32").unwrap(), 4_000_000_000);
            assert_eq!(g.meta_u64("t.u64").unwrap(), 1 << 40);
            assert_eq!(g.meta("t.i64").unwrap().as_i64(), Some(-(1 << 40)));
            assert_eq!(g.meta("t.i8").unwrap().as_u64(), None);
            assert_eq!(g.meta_f64("t.f32").unwrap(), f64::from(1e-5f32));
            assert_eq!(g.meta("t.bool").unwrap().as_bool(), Some(true));
            let nested = g.meta("t.nested").unwrap().as_array().unwrap();
            assert_eq!(nested[0].as_array().unwrap()[1].as_i64(), Some(-2));
            assert_eq!(g.meta("t.strings").unwrap().as_array().unwrap()[1].as_str(), Some("é✓"));

            assert_eq!(g.tensors.len(), 3);
            let a = g.tensor_info("a.f32").unwrap();
            assert_eq!(a.dims, vec![3, 2]);
            assert_eq!(a.row_major_shape(), vec![2, 3]);
            assert_eq!(g.tensor_f32("a.f32").unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
            assert_eq!(g.tensor_f32("b.f16").unwrap(), vec![1.0, -0.5, 2.0, 0.25]);
            let q = g.tensor_f32("c.q8").unwrap();
            assert_eq!(q.len(), 64);
            assert_eq!(q[0], -8.0);
            assert_eq!(q[31], 7.5);
            assert_eq!(q[32], 0.75);
            let c = g.tensor_info("c.q8").unwrap();
            assert_eq!(c.offset % align, 0);
            assert_eq!(g.tensor_bytes(c).unwrap().len(), 68);
            assert!(g.tensor_info("missing").is_none());
        }
    }

    #[test]
    fn missing_and_mistyped_keys_name_key_and_file() {
        let file = sample_builder().write_temp("keys");
        let g = GgufFile::open(&file.path).unwrap();
        let err = g.meta_u64("llama.block_count").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelError::MissingKey { ref key, .. } if key == "llama.block_count"));
        assert!(msg.contains("llama.block_count") && msg.contains(&*file.path.to_string_lossy()), "{msg}");
        assert!(matches!(g.meta_u64("general.architecture"), Err(ModelError::WrongKeyType { .. })));
        assert!(matches!(g.meta_str("t.u8"), Err(ModelError::WrongKeyType { .. })));
        assert!(matches!(g.tensor_f32("nope"), Err(ModelError::MissingTensor { tensor, .. }) if tensor == "nope"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample_builder().build();
        for cut in 0..bytes.len() {
            let (_file, result) = open_bytes("cut", &bytes[..cut]);
            assert!(result.is_err(), "prefix of {cut} of {} bytes opened", bytes.len());
        }
        // a cut inside the last tensor's data names that tensor
        let (_file, result) = open_bytes("cut", &bytes[..bytes.len() - 1]);
        match result {
            Err(ModelError::Truncated { what, .. }) => assert!(what.contains("c.q8"), "{what}"),
            other => panic!("expected Truncated, got {other:?}"),
        }
        // a cut in the header
        assert!(matches!(open_bytes("cut", &bytes[..10]).1, Err(ModelError::Truncated { .. })));
    }

    #[test]
    fn bad_magic_and_versions() {
        let mut bytes = sample_builder().build();
        bytes[0] = b'X';
        assert!(matches!(open_bytes("magic", &bytes).1, Err(ModelError::BadMagic { .. })));
        for version in [1u32, 4, u32::MAX] {
            let mut builder = sample_builder();
            builder.version = version;
            let (_f, result) = open_bytes("version", &builder.build());
            assert!(matches!(result, Err(ModelError::UnsupportedVersion { version: v, .. }) if v == version), "version {version}");
        }
    }

    /// A header with the given counts followed by `rest`.
    fn raw_file(tensor_count: u64, kv_count: u64, rest: &[u8]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&tensor_count.to_le_bytes());
        out.extend_from_slice(&kv_count.to_le_bytes());
        out.extend_from_slice(rest);
        out.resize(out.len() + 256, 0);
        out
    }

    #[test]
    fn absurd_counts_and_lengths_are_rejected_without_allocating() {
        let (_f, r) = open_bytes("count", &raw_file(1 << 60, 0, &[]));
        assert!(matches!(r, Err(ModelError::LimitExceeded { value, .. }) if value == 1 << 60), "{r:?}");
        let (_f, r) = open_bytes("count", &raw_file(0, 1 << 60, &[]));
        assert!(matches!(r, Err(ModelError::LimitExceeded { value, .. }) if value == 1 << 60), "{r:?}");

        // key with a string length of 2^50
        let (_f, r) = open_bytes("strlen", &raw_file(0, 1, &(1u64 << 50).to_le_bytes()));
        assert!(matches!(r, Err(ModelError::Truncated { .. })), "{r:?}");

        // string value with length 2^50
        let mut kv = Vec::new();
        crate::model::gguf_test_writer::put_string(&mut kv, "k");
        kv.extend_from_slice(&8u32.to_le_bytes());
        kv.extend_from_slice(&(1u64 << 50).to_le_bytes());
        let (_f, r) = open_bytes("strlen", &raw_file(0, 1, &kv));
        assert!(matches!(r, Err(ModelError::Truncated { ref what, .. }) if what.contains("'k'")), "{r:?}");

        // array of 2^60 u64
        let mut kv = Vec::new();
        crate::model::gguf_test_writer::put_string(&mut kv, "arr");
        kv.extend_from_slice(&9u32.to_le_bytes());
        kv.extend_from_slice(&10u32.to_le_bytes());
        kv.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let (_f, r) = open_bytes("arrlen", &raw_file(0, 1, &kv));
        assert!(matches!(r, Err(ModelError::LimitExceeded { value, .. }) if value == 1 << 60), "{r:?}");

        // deeply nested arrays
        let mut kv = Vec::new();
        crate::model::gguf_test_writer::put_string(&mut kv, "deep");
        kv.extend_from_slice(&9u32.to_le_bytes());
        for _ in 0..100 {
            kv.extend_from_slice(&9u32.to_le_bytes());
            kv.extend_from_slice(&1u64.to_le_bytes());
        }
        let (_f, r) = open_bytes("deep", &raw_file(0, 1, &kv));
        assert!(matches!(r, Err(ModelError::LimitExceeded { .. })), "{r:?}");

        // unknown value type
        let mut kv = Vec::new();
        crate::model::gguf_test_writer::put_string(&mut kv, "odd");
        kv.extend_from_slice(&77u32.to_le_bytes());
        let (_f, r) = open_bytes("vtype", &raw_file(0, 1, &kv));
        assert!(matches!(r, Err(ModelError::Malformed { .. })), "{r:?}");

        // tensor with 1000 dims, and one whose dims overflow
        let mut info = Vec::new();
        crate::model::gguf_test_writer::put_string(&mut info, "t");
        info.extend_from_slice(&1000u32.to_le_bytes());
        let (_f, r) = open_bytes("ndims", &raw_file(1, 0, &info));
        assert!(matches!(r, Err(ModelError::LimitExceeded { value: 1000, .. })), "{r:?}");

        let b = GgufBuilder::new().tensor("huge", &[1 << 32, 1 << 32, 1 << 32], GgmlType::F32, vec![]);
        let (_f, r) = open_bytes("overflow", &b.build());
        assert!(matches!(r, Err(ModelError::Malformed { ref what, .. }) if what.contains("huge")), "{r:?}");
        let b = GgufBuilder::new().tensor("big", &[1 << 40], GgmlType::F32, vec![0; 4]);
        let (_f, r) = open_bytes("big", &b.build());
        assert!(matches!(r, Err(ModelError::Truncated { ref what, .. }) if what.contains("big")), "{r:?}");
    }

    #[test]
    fn unknown_or_unsupported_types_fail_only_when_read() {
        let b = GgufBuilder::new().f32_tensor("ok", &[2], &[1.0, 2.0]).tensor("mystery", &[16], GgmlType::Other(1234), vec![0; 16]).tensor(
            "q2k",
            &[256],
            GgmlType::Q2_K,
            vec![0; 84],
        );
        let file = b.write_temp("types");
        let g = GgufFile::open(&file.path).unwrap();
        assert_eq!(g.tensor_f32("ok").unwrap(), vec![1.0, 2.0]);
        let err = g.tensor_f32("mystery").unwrap_err();
        assert!(matches!(&err, ModelError::UnsupportedType { tensor, ty } if tensor == "mystery" && ty.contains("1234")));
        let err = g.tensor_f32("q2k").unwrap_err();
        assert!(matches!(&err, ModelError::UnsupportedType { tensor, ty } if tensor == "q2k" && ty == "Q2_K"));
        // known layouts are still size-checked at open
        let b = GgufBuilder::new().tensor("q2k", &[256], GgmlType::Q2_K, vec![0; 83]);
        assert!(matches!(open_bytes("q2k", &b.build()).1, Err(ModelError::Truncated { .. })));
        // a quantised row must be whole blocks
        let b = GgufBuilder::new().tensor("q8", &[16, 2], GgmlType::Q8_0, vec![0; 34]);
        assert!(matches!(open_bytes("q8", &b.build()).1, Err(ModelError::Malformed { .. })));
    }

    #[test]
    fn misaligned_offsets_duplicates_and_bad_alignment_are_malformed() {
        let b = GgufBuilder::new().f32_tensor("x", &[1], &[1.0]).f32_tensor("x", &[1], &[2.0]);
        assert!(matches!(open_bytes("dup", &b.build()).1, Err(ModelError::Malformed { ref what, .. }) if what.contains("'x'")));

        let b = GgufBuilder::new().kv("k", MetaValue::U8(1)).kv("k", MetaValue::U8(2));
        assert!(matches!(open_bytes("dupkey", &b.build()).1, Err(ModelError::Malformed { .. })));

        let mut b = GgufBuilder::new().f32_tensor("x", &[1], &[1.0]);
        b.alignment = Some(3);
        assert!(matches!(open_bytes("align", &b.build()).1, Err(ModelError::Malformed { .. })));

        // patch the offset field of the only tensor (last 8 bytes of its info) to 4
        let b = GgufBuilder::new().f32_tensor("x", &[2], &[1.0, 2.0]);
        let (mut bytes, info_start) = b.build_with_info_start();
        let offset_at = info_start + 8 + 1 + 4 + 8 + 4;
        bytes[offset_at..offset_at + 8].copy_from_slice(&4u64.to_le_bytes());
        assert!(matches!(open_bytes("misaligned", &bytes).1, Err(ModelError::Malformed { .. })));
    }

    #[test]
    fn random_corruption_never_panics() {
        let bytes = sample_builder().build();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut corrupt = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % corrupt.len() as u64) as usize;
                corrupt[at] = next() as u8;
            }
            let (_f, result) = open_bytes("fuzz", &corrupt);
            if let Ok(g) = result {
                for t in &g.tensors {
                    let _ = g.tensor_f32(&t.name);
                }
            }
        }
    }

    /// A key length that runs past the key: the error quotes a short escaped prefix of what was
    /// read, never the raw bytes (NULs, newlines, control characters) of the rest of the header.
    #[test]
    fn a_wrong_key_length_is_quoted_short_and_escaped() {
        let builder = GgufBuilder::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("k", MetaValue::U32(7))
            .kv("multi\nline", MetaValue::String("x".repeat(300)))
            .kv("last", MetaValue::U32(1));
        let mut bytes = builder.build();
        // The key "k" (length 1) now claims 256 bytes: the rest of the header is read as its name.
        let at = bytes.windows(9).position(|w| w == b"\x01\0\0\0\0\0\0\0k").expect("key k");
        bytes[at..at + 8].copy_from_slice(&256u64.to_le_bytes());
        let (f, r) = open_bytes("keylen", &bytes);
        let msg = r.expect_err("the value type after a 256-byte key is garbage").to_string();
        assert!(!msg.chars().any(|c| c.is_control()), "raw control characters in {msg:?}");
        assert!(msg.contains("..."), "the key is cut short: {msg}");
        assert!(msg.len() < 200 + f.path.as_os_str().len(), "{} characters: {msg}", msg.len());
    }
}
