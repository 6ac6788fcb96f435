//! TEST SUPPORT ONLY: reads the metadata section of a GGUF file (v2/v3) into a map.
//!
//! Exists so the tokenizer tests can run before the real GGUF reader (`model::gguf`) lands; the
//! integrator may replace `read_metadata` with `GgufFile::open(path)?.metadata`.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};
use std::path::Path;

use crate::model::gguf_meta::MetaValue;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

struct Reader<R: Read> {
    inner: R,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> io::Result<String> {
        let len = self.u64()?;
        if len > 1 << 24 {
            return Err(invalid(format!("string length {len} is implausible")));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf)?;
        String::from_utf8(buf).map_err(|e| invalid(format!("string is not UTF-8: {e}")))
    }

    fn value(&mut self, value_type: u32) -> io::Result<MetaValue> {
        Ok(match value_type {
            0 => MetaValue::U8(u8::from_le_bytes(self.bytes()?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.bytes()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.bytes()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.bytes()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.bytes()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.bytes()?)),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                let element_type = self.u32()?;
                let count = self.u64()?;
                if count > 1 << 24 {
                    return Err(invalid(format!("array length {count} is implausible")));
                }
                let items = (0..count)
                    .map(|_| self.value(element_type))
                    .collect::<io::Result<Vec<_>>>()?;
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.bytes()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(invalid(format!("unknown GGUF value type {other}"))),
        })
    }
}

/// The key/value metadata of a GGUF file (tensor infos are not read).
pub fn read_metadata(path: &Path) -> io::Result<BTreeMap<String, MetaValue>> {
    let mut reader = Reader {
        inner: BufReader::new(std::fs::File::open(path)?),
    };
    if &reader.bytes::<4>()? != b"GGUF" {
        return Err(invalid(format!("{} is not a GGUF file", path.display())));
    }
    let version = reader.u32()?;
    if !(2..=3).contains(&version) {
        return Err(invalid(format!("unsupported GGUF version {version}")));
    }
    let _tensor_count = reader.u64()?;
    let kv_count = reader.u64()?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = reader.string()?;
        let value_type = reader.u32()?;
        metadata.insert(key, reader.value(value_type)?);
    }
    Ok(metadata)
}
