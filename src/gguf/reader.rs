//! Parsing a GGUF header: magic, version, metadata and the tensor index.
//!
//! Every count and length the file claims is checked against the bytes left in the file
//! before anything is allocated, and allocations go through `try_reserve`: a corrupt or
//! hostile file gives a [`RopeError::GgufFormat`], never an abort or a huge allocation.

use std::collections::HashSet;
use std::io::{BufReader, Read, Seek, SeekFrom};

use crate::error::{Result, RopeError};
use crate::gguf::Gguf;
use crate::gguf::tensor::{GgmlType, TensorInfo};
use crate::gguf::value::{Array, Value, ValueType, vec_with_capacity};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`: a tensor has at most this many dims.
pub const MAX_DIMS: u32 = 4;
/// How deeply arrays may nest. The format sets no limit; real files nest at most once,
/// and a bound keeps a hostile file from exhausting the stack.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Smallest key-value pair: key length (8) + one key byte + value type (4) + one byte.
const MIN_KV_BYTES: u64 = 14;
/// Smallest tensor-index entry: name length (8) + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_BYTES: u64 = 24;

/// A byte source that knows its position and how many bytes are left.
struct Source<R: Read> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Source<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn error(&self, message: impl Into<String>) -> RopeError {
        RopeError::GgufFormat {
            offset: self.pos,
            message: message.into(),
        }
    }

    fn need(&self, n: u64, what: &str) -> Result<()> {
        if n > self.left() {
            return Err(self.error(format!(
                "truncated file: {what} needs {n} bytes, {} are left",
                self.left()
            )));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.need(buf.len() as u64, what)?;
        self.inner
            .read_exact(buf)
            .map_err(|e| self.error(format!("reading {what}: {e}")))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_each` bytes each, checked against the bytes left.
    fn count(&mut self, what: &str, min_each: u64) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = n
            .checked_mul(min_each)
            .is_some_and(|bytes| bytes <= self.left());
        if !fits {
            return Err(RopeError::GgufFormat {
                offset: at,
                message: format!(
                    "{what} is {n}, but {n} items of at least {min_each} bytes do not fit in the {} bytes left",
                    self.left()
                ),
            });
        }
        usize::try_from(n).map_err(|_| self.error(format!("{what} {n} does not fit in memory")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(&format!("length of {what}"), 1)?;
        let mut bytes = vec_with_capacity::<u8>(n, self.pos, what)?;
        bytes.resize(n, 0);
        let at = self.pos;
        self.fill(&mut bytes, what)?;
        String::from_utf8(bytes).map_err(|e| RopeError::GgufFormat {
            offset: at,
            message: format!("{what} is not valid UTF-8: {e}"),
        })
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType> {
        let at = self.pos;
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| RopeError::GgufFormat {
            offset: at,
            message: format!("unknown metadata value type {id} for {what}; GGUF defines 0..=12"),
        })
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        let at = self.pos;
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(RopeError::GgufFormat {
                offset: at,
                message: format!("{what} is a bool of byte value {b}; allowed: 0 or 1"),
            }),
        }
    }

    fn value(&mut self, ty: ValueType, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => Value::Bool(self.bool(what)?),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => Value::Array(self.array_value(what, depth)?),
        })
    }

    fn array_value(&mut self, what: &str, depth: usize) -> Result<Array> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.error(format!(
                "{what} nests arrays more than {MAX_ARRAY_DEPTH} deep"
            )));
        }
        let ty = self.value_type(&format!("element type of {what}"))?;
        let n = self.count(&format!("element count of {what}"), ty.min_size())?;
        macro_rules! items {
            ($variant:ident, $read:expr) => {{
                let mut v = vec_with_capacity(n, self.pos, what)?;
                for _ in 0..n {
                    v.push($read);
                }
                Array::$variant(v)
            }};
        }
        Ok(match ty {
            ValueType::U8 => items!(U8, self.array::<1>(what)?[0]),
            ValueType::I8 => items!(I8, self.array::<1>(what)?[0] as i8),
            ValueType::U16 => items!(U16, u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => items!(I16, i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => items!(U32, self.u32(what)?),
            ValueType::I32 => items!(I32, i32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => items!(U64, self.u64(what)?),
            ValueType::I64 => items!(I64, i64::from_le_bytes(self.array(what)?)),
            ValueType::F32 => items!(F32, f32::from_le_bytes(self.array(what)?)),
            ValueType::F64 => items!(F64, f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => items!(Bool, self.bool(what)?),
            ValueType::String => items!(String, self.string(what)?),
            ValueType::Array => items!(Array, self.array_value(what, depth + 1)?),
        })
    }
}

/// Reads a GGUF header from `reader`, whose byte 0 is the file's first byte. Leaves the
/// reader somewhere after the tensor index.
pub(crate) fn read_header<R: Read + Seek>(reader: &mut R) -> Result<Gguf> {
    let io = |e: std::io::Error| RopeError::GgufFormat {
        offset: 0,
        message: format!("cannot seek in the file: {e}"),
    };
    let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut src = Source {
        inner: BufReader::new(reader),
        pos: 0,
        len,
    };

    let magic: [u8; 4] = src.array("the magic")?;
    if magic != MAGIC {
        return Err(RopeError::GgufFormat {
            offset: 0,
            message: format!(
                "bad magic {magic:02x?} ({:?}); a GGUF file starts with \"GGUF\"",
                String::from_utf8_lossy(&magic)
            ),
        });
    }
    let version = src.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(RopeError::GgufUnsupported {
                what: "version 1".into(),
                allowed: "versions 2 and 3 (re-convert the model with a current llama.cpp)".into(),
            });
        }
        v if matches!(v.swap_bytes(), 1..=3) => {
            return Err(RopeError::GgufUnsupported {
                what: format!("big-endian file (version field {v:#010x})"),
                allowed: "little-endian files only".into(),
            });
        }
        v => {
            return Err(RopeError::GgufFormat {
                offset: 4,
                message: format!("unknown version {v}; known versions are 1, 2 and 3"),
            });
        }
    }
    let n_tensors = src.count("tensor count", MIN_TENSOR_BYTES)?;
    let n_kv = src.count("metadata count", MIN_KV_BYTES)?;

    let mut metadata = vec_with_capacity::<(String, Value)>(n_kv, src.pos, "metadata")?;
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let at = src.pos;
        let key = src.string(&format!("metadata key #{i}"))?;
        let ty = src.value_type(&format!("type of '{key}'"))?;
        let value = src.value(ty, &format!("'{key}'"), 0)?;
        if !keys.insert(key.clone()) {
            return Err(RopeError::GgufFormat {
                offset: at,
                message: format!("duplicate metadata key '{key}'"),
            });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(RopeError::GgufFormat {
                offset: src.pos,
                message: format!(
                    "general.alignment is {v:?}; allowed: a uint32 power of two (default {DEFAULT_ALIGNMENT})"
                ),
            });
        }
    };

    let mut tensors = vec_with_capacity::<TensorInfo>(n_tensors, src.pos, "tensor index")?;
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let at = src.pos;
        let name = src.string(&format!("name of tensor #{i}"))?;
        let what = format!("tensor '{name}'");
        let n_dims = src.u32(&format!("dim count of {what}"))?;
        if n_dims > MAX_DIMS {
            return Err(src.error(format!(
                "{what} has {n_dims} dims; ggml allows at most {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(src.u64(&format!("dims of {what}"))?);
        }
        let type_at = src.pos;
        let type_id = src.u32(&format!("type of {what}"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| RopeError::GgufFormat {
            offset: type_at,
            message: format!("{what} has unknown ggml type {type_id}"),
        })?;
        let offset = src.u64(&format!("offset of {what}"))?;
        let info = tensor_info(name, dims, ggml_type, offset, alignment).map_err(|message| {
            RopeError::GgufFormat {
                offset: at,
                message,
            }
        })?;
        if !names.insert(info.name.clone()) {
            return Err(RopeError::GgufFormat {
                offset: at,
                message: format!("duplicate tensor name '{}'", info.name),
            });
        }
        tensors.push(info);
    }

    let data_offset = src
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| src.error("data section offset overflows"))?;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        if end.is_none_or(|end| end > len) {
            return Err(RopeError::GgufFormat {
                offset: data_offset.saturating_add(t.offset),
                message: format!(
                    "truncated file: tensor '{}' ({} bytes at data offset {}) ends past the file's {len} bytes",
                    t.name, t.n_bytes, t.offset
                ),
            });
        }
    }

    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_len: len,
    })
}

/// Checks one tensor-index entry and computes its sizes.
fn tensor_info(
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    alignment: u64,
) -> std::result::Result<TensorInfo, String> {
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| format!("tensor '{name}' dims {dims:?} overflow the element count"))?;
    let block = ggml_type.block_size();
    if dims.first().is_some_and(|d| d % block != 0) {
        return Err(format!(
            "tensor '{name}' of type {} has a first dim of {}, not a multiple of its block size {block}",
            ggml_type.name(),
            dims[0]
        ));
    }
    let n_bytes = (n_elements / block)
        .checked_mul(ggml_type.type_size())
        .ok_or_else(|| format!("tensor '{name}' byte size overflows"))?;
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}"
        ));
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        n_elements,
        n_bytes,
    })
}
