//! GGUF tensor index entries, ggml tensor types and dequantisation to f32.
//!
//! Block formats (ggml, `ggml-common.h`; all little-endian, `d` and `m` are IEEE f16):
//!
//! | type | block | bytes | layout | value of element `i` |
//! |---|---|---|---|---|
//! | `F32` | 1 | 4 | f32 | `x` |
//! | `F16` / `BF16` | 1 | 2 | f16 / bf16 | `x` |
//! | `Q8_0` | 32 | 34 | `d`, 32 `i8` `q` | `d * q_i` |
//! | `Q4_0` | 32 | 18 | `d`, 16 bytes of nibbles | `d * (n_i - 8)` |
//! | `Q4_1` | 32 | 20 | `d`, `m`, 16 bytes of nibbles | `d * n_i + m` |
//!
//! In the 4-bit types, elements 0-15 are the low nibbles of the 16 bytes and elements
//! 16-31 their high nibbles.

use crate::error::{Result, RopeError};
use crate::gguf::value::vec_with_capacity;

macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $name:literal, $block:literal, $size:literal;)*) => {
        /// A ggml tensor type: how a tensor's elements are stored.
        ///
        /// Every type llama.cpp defines is listed, so that any file's tensor index can be
        /// read and its byte sizes checked; [`dequantize`] converts the few ropex
        /// supports to f32.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $(
                #[doc = concat!("ggml type ", stringify!($id), ": `", $name, "`, ",
                                stringify!($block), " elements in ", stringify!($size), " bytes.")]
                $variant,
            )*
        }

        impl GgmlType {
            /// The type with ggml id `id`, if ropex knows it.
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $($id => Some(GgmlType::$variant),)*
                    _ => None,
                }
            }

            /// The ggml id.
            pub fn id(self) -> u32 {
                match self {
                    $(GgmlType::$variant => $id,)*
                }
            }

            /// The ggml name (`Q4_1`, `F32`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(GgmlType::$variant => $name,)*
                }
            }

            /// Elements per block.
            pub fn block_size(self) -> u64 {
                match self {
                    $(GgmlType::$variant => $block,)*
                }
            }

            /// Bytes per block.
            pub fn type_size(self) -> u64 {
                match self {
                    $(GgmlType::$variant => $size,)*
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    Q8_1 = 9, "Q8_1", 32, 40;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    Q8_K = 15, "Q8_K", 256, 292;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
    NVFP4 = 40, "NVFP4", 64, 36;
    Q1_0 = 41, "Q1_0", 128, 18;
}

impl GgmlType {
    /// True when [`dequantize`] converts this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::F64
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
        )
    }
}

/// One entry of a GGUF tensor index.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) ggml_type: GgmlType,
    pub(crate) offset: u64,
    pub(crate) n_elements: u64,
    pub(crate) n_bytes: u64,
}

impl TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`, `rope_freqs.weight`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its dims in ggml order: `dims[0]` is the fastest-varying (the reverse of a
    /// PyTorch / numpy shape).
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// How its elements are stored.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Byte offset of its data from the start of the file's data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of elements (the product of the dims).
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }

    /// Number of bytes of its data.
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }
}

/// Dequantises `bytes` of type `ty` to f32, element for element as ggml and gguf-py
/// compute it (f32 arithmetic on the f16 scales, so results are bit-exact).
///
/// `bytes` must hold whole blocks. Types ropex does not convert give
/// [`RopeError::GgufUnsupported`].
///
/// ```
/// use ropex::gguf::{GgmlType, dequantize};
/// // One Q8_0 block: scale d = 0.5 (f16 0x3800), then q = 0, 1, ..., 31.
/// let mut block = vec![0x00, 0x38];
/// block.extend((0..32).map(|q: i8| q as u8));
/// let x = dequantize(GgmlType::Q8_0, &block)?;
/// assert_eq!(x[3], 1.5);
/// # Ok::<(), ropex::RopeError>(())
/// ```
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let size = ty.type_size() as usize;
    let block = ty.block_size() as usize;
    if !ty.can_dequantize() {
        return Err(RopeError::GgufUnsupported {
            what: format!("tensor type {} for dequantisation", ty.name()),
            allowed: "F32, F16, BF16, F64, Q8_0, Q4_0 and Q4_1".into(),
        });
    }
    if !bytes.len().is_multiple_of(size) {
        return Err(RopeError::shape(
            format!("{} tensor data", ty.name()),
            format!("a multiple of {size} bytes"),
            format!("{} bytes", bytes.len()),
        ));
    }
    let n = (bytes.len() / size)
        .checked_mul(block)
        .ok_or_else(|| RopeError::invalid("tensor data", bytes.len(), "too large"))?;
    let mut out = vec_with_capacity::<f32>(n, 0, "dequantised tensor")?;
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    for chunk in bytes.chunks_exact(size) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
            GgmlType::F16 => out.push(f16(chunk)),
            GgmlType::BF16 => out.push(half::bf16::from_le_bytes([chunk[0], chunk[1]]).to_f32()),
            GgmlType::F64 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                out.push(f64::from_le_bytes(b) as f32);
            }
            GgmlType::Q8_0 => {
                let d = f16(chunk);
                out.extend(chunk[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
            GgmlType::Q4_0 => {
                let d = f16(chunk);
                let qs = &chunk[2..18];
                out.extend(qs.iter().map(|&q| d * f32::from((q & 0x0f) as i8 - 8)));
                out.extend(qs.iter().map(|&q| d * f32::from((q >> 4) as i8 - 8)));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(chunk), f16(&chunk[2..]));
                let qs = &chunk[4..20];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0f) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
            _ => unreachable!("checked by can_dequantize"),
        }
    }
    Ok(out)
}
