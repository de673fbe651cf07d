//! Read GGUF files (llama.cpp's model format) and derive ropex's rotary configuration
//! from them (feature `gguf`).
//!
//! A GGUF file is a header (magic `GGUF`, version, tensor count, metadata count), then
//! typed key-value metadata, then a tensor index (name, dims, ggml type, offset), then
//! the tensor data, aligned to `general.alignment` (default 32) bytes. [`GgufFile`]
//! parses everything up to the data and reads a tensor only when asked, so opening a
//! 100 MB model reads a few hundred KB.
//!
//! ```
//! use ropex::gguf::GgufFile;
//! let mut file = GgufFile::open("tests/data/gguf/llama_plain.gguf")?;
//! let rope = file.rope()?;
//! assert_eq!(rope.arch, "llama");
//! assert_eq!(rope.layout, ropex::Layout::Interleaved); // the converter permuted Q/K
//! assert_eq!(rope.config.head_dim(), 64);
//! assert_eq!(rope.config.base(), 100_000.0);
//! assert_eq!(rope.context_len, Some(8192));
//! let freqs = rope.config.frequencies();
//! assert_eq!(freqs.inv_freq().len(), 32);
//! # Ok::<(), ropex::RopeError>(())
//! ```
//!
//! How the rope keys map onto [`crate::RopeConfig`] and [`crate::Layout`] is described in
//! [`GgufRope`]; [`unpermute_qk_rows`] undoes the Q/K row permutation llama.cpp's
//! converter applies to Llama-family weights. Malformed files give [`crate::RopeError::GgufFormat`] with the byte
//! offset of the problem; valid files that use something ropex cannot represent give
//! [`crate::RopeError::GgufUnsupported`].

mod qk;
mod reader;
mod rope;
mod tensor;
mod value;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

pub use qk::{permute_qk_rows, unpermute_qk_rows};
pub use reader::{DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
pub use rope::{GgufRope, RopeLayoutKind, rope_layout_kind};
pub use tensor::{GgmlType, TensorInfo, dequantize};
pub use value::{Array, Value, ValueType};

use crate::error::{Result, RopeError};
use value::vec_with_capacity;

/// A parsed GGUF header: metadata and tensor index, without tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
}

impl Gguf {
    /// Parses the header of the GGUF file `reader` holds (byte 0 = the file's start).
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Gguf> {
        reader::read_header(reader)
    }

    /// Parses the header of a GGUF file held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Gguf> {
        Gguf::read(&mut Cursor::new(bytes))
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata key-value pair, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str> {
        let key = "general.architecture";
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(RopeError::GgufFormat {
                offset: 0,
                message: format!("{key} is a {}, expected a string", v.value_type().name()),
            }),
            None => Err(RopeError::MissingKey {
                key: key.into(),
                context: "GGUF metadata".into(),
            }),
        }
    }

    /// The tensor index, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The index entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the data section from the start of the file: tensor `t` starts at
    /// `data_offset() + t.offset()`.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    fn tensor_or_missing(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| RopeError::MissingKey {
            key: format!("tensor '{name}'"),
            context: "the GGUF tensor index".into(),
        })
    }
}

/// A GGUF file: its parsed header plus the reader its tensors are read from.
#[derive(Debug)]
pub struct GgufFile<R> {
    header: Gguf,
    reader: R,
}

impl GgufFile<File> {
    /// Opens the GGUF file at `path` and parses its header.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile<File>> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| RopeError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        GgufFile::new(file)
    }
}

impl<'a> GgufFile<Cursor<&'a [u8]>> {
    /// A GGUF file held in memory.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self> {
        GgufFile::new(Cursor::new(bytes))
    }
}

impl<R: Read + Seek> GgufFile<R> {
    /// Parses the header of the GGUF file `reader` holds (byte 0 = the file's start).
    pub fn new(mut reader: R) -> Result<Self> {
        let header = Gguf::read(&mut reader)?;
        Ok(GgufFile { header, reader })
    }

    /// The parsed header.
    pub fn header(&self) -> &Gguf {
        &self.header
    }

    /// The raw bytes of tensor `name`.
    pub fn tensor_bytes(&mut self, name: &str) -> Result<Vec<u8>> {
        let info = self.header.tensor_or_missing(name)?;
        let start = self.header.data_offset + info.offset; // checked against the length at parse
        let n = usize::try_from(info.n_bytes).map_err(|_| RopeError::GgufFormat {
            offset: start,
            message: format!(
                "tensor '{name}' of {} bytes does not fit in memory",
                info.n_bytes
            ),
        })?;
        let mut bytes = vec_with_capacity::<u8>(n, start, &format!("tensor '{name}'"))?;
        bytes.resize(n, 0);
        let io = |e: std::io::Error| RopeError::GgufFormat {
            offset: start,
            message: format!("reading tensor '{name}': {e}"),
        };
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        self.reader.read_exact(&mut bytes).map_err(io)?;
        Ok(bytes)
    }

    /// Tensor `name` dequantised to f32 (see [`dequantize`] for the types supported), in
    /// storage order (`dims()[0]` fastest).
    pub fn tensor_f32(&mut self, name: &str) -> Result<Vec<f32>> {
        let ty = self.header.tensor_or_missing(name)?.ggml_type;
        if !ty.can_dequantize() {
            return dequantize(ty, &[]);
        }
        let bytes = self.tensor_bytes(name)?;
        dequantize(ty, &bytes)
    }

    /// The rotary embedding this file describes (see [`GgufRope`]); reads the
    /// `rope_freqs` / `rope_factors_*` tensors when the file has them.
    pub fn rope(&mut self) -> Result<GgufRope> {
        let mut tensor = |name: &str| -> Result<Option<Vec<f32>>> {
            if self.header.tensor(name).is_none() {
                return Ok(None);
            }
            self.tensor_f32(name).map(Some)
        };
        let freqs = tensor(rope::ROPE_FREQS)?;
        let long = tensor(rope::ROPE_FACTORS_LONG)?;
        let short = tensor(rope::ROPE_FACTORS_SHORT)?;
        GgufRope::from_header(
            &self.header,
            rope::RopeTensors {
                freqs: freqs.as_deref(),
                long: long.as_deref(),
                short: short.as_deref(),
            },
        )
    }

    /// The reader back.
    pub fn into_inner(self) -> R {
        self.reader
    }
}
