//! Read and write NumPy `.npy` files of `f32` (std only), to exchange q/k/v and attention
//! outputs with PyTorch.
//!
//! Supported: format versions 1.0, 2.0 and 3.0; dtype `'<f4'` (and `'<f8'`, converted to
//! f32 on reading); C order; any rank (a rank-0 array has one element). Everything else
//! (other dtypes, big-endian data, `fortran_order: True`, a truncated or corrupt file)
//! is a typed [`RopeError`], never a panic.
//!
//! ```
//! use ropex::npy;
//! let bytes = npy::to_bytes(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])?;
//! let (shape, data) = npy::from_bytes(&bytes)?;
//! assert_eq!(shape, [2, 3]);
//! assert_eq!(data[4], 4.0);
//! # Ok::<(), ropex::RopeError>(())
//! ```

use std::path::Path;

use ndarray::{Array3, ArrayView3};

use crate::error::{Result, RopeError};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Reads a `.npy` file: `(shape, data)` with data in C order.
pub fn read(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f32>)> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| RopeError::Io {
        path: name.clone(),
        message: e.to_string(),
    })?;
    decode(&bytes, &name)
}

/// Reads a rank-3 `.npy` file (e.g. `[tokens, heads, head_dim]`).
pub fn read_array3(path: impl AsRef<Path>) -> Result<Array3<f32>> {
    let path = path.as_ref();
    let (shape, data) = read(path)?;
    to_array3(&shape, data, &path.display().to_string())
}

/// Decodes `.npy` bytes: `(shape, data)` with data in C order.
pub fn from_bytes(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    decode(bytes, "npy data")
}

/// Decodes rank-3 `.npy` bytes.
pub fn array3_from_bytes(bytes: &[u8]) -> Result<Array3<f32>> {
    let (shape, data) = from_bytes(bytes)?;
    to_array3(&shape, data, "npy data")
}

/// Writes `data` (C order) with `shape` as a `'<f4'` `.npy` file.
pub fn write(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_bytes(shape, data)?;
    std::fs::write(path, bytes).map_err(|e| RopeError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Writes a rank-3 array as a `'<f4'` `.npy` file.
pub fn write_array3(path: impl AsRef<Path>, array: ArrayView3<f32>) -> Result<()> {
    let (a, b, c) = array.dim();
    let data: Vec<f32> = array.iter().copied().collect();
    write(path, &[a, b, c], &data)
}

/// Encodes `data` (C order) with `shape` as `.npy` bytes (version 1.0, or 2.0 for a header
/// longer than 65535 bytes), header padded to a multiple of 64 bytes as NumPy does.
pub fn to_bytes(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let count = element_count(shape).ok_or_else(|| {
        RopeError::shape(
            "npy shape",
            "a shape whose size fits in memory",
            fmt_shape(shape),
        )
    })?;
    if count != data.len() {
        return Err(RopeError::shape(
            format!("npy data for shape {}", fmt_shape(shape)),
            format!("{count} values"),
            data.len(),
        ));
    }
    let dict = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': {}, }}",
        fmt_shape(shape)
    );
    let (version, len_bytes) = if dict.len() + 1 + 10 <= u16::MAX as usize {
        (1u8, 2usize)
    } else {
        (2u8, 4usize)
    };
    let unpadded = MAGIC.len() + 2 + len_bytes + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let header_len = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(unpadded + pad + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        let len = u32::try_from(header_len).map_err(|_| {
            RopeError::shape("npy header", "at most 4 GiB", format!("{header_len} bytes"))
        })?;
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

fn to_array3(shape: &[usize], data: Vec<f32>, name: &str) -> Result<Array3<f32>> {
    match *shape {
        [a, b, c] => Array3::from_shape_vec((a, b, c), data)
            .map_err(|e| RopeError::shape(name, "[n, heads, d]", e.to_string())),
        _ => Err(RopeError::shape(
            format!("{name} (rank)"),
            "a rank-3 array [n, heads, d]",
            format!("shape {}", fmt_shape(shape)),
        )),
    }
}

fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [] => "()".into(),
        [a] => format!("({a},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn corrupt(name: &str, message: impl Into<String>) -> RopeError {
    RopeError::Io {
        path: name.to_string(),
        message: format!("not a valid .npy file: {}", message.into()),
    }
}

/// Element type of the data.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F4,
    F8,
}

fn decode(bytes: &[u8], name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(corrupt(name, "missing the \\x93NUMPY magic string"));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(corrupt(name, "truncated header length"));
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        _ => {
            return Err(RopeError::invalid(
                format!("{name} format version"),
                format!("{major}.{minor}"),
                "must be 1.0, 2.0 or 3.0",
            ));
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            corrupt(
                name,
                format!(
                    "header of {header_len} bytes but the file has {} bytes",
                    bytes.len()
                ),
            )
        })?;
    let raw = &bytes[start..end];
    let header: String = if major == 3 {
        std::str::from_utf8(raw)
            .map_err(|_| corrupt(name, "header is not UTF-8"))?
            .to_string()
    } else {
        // Latin-1: every byte is one char.
        raw.iter().map(|&b| b as char).collect()
    };
    let h = Header::parse(&header).map_err(|m| corrupt(name, format!("header {m}")))?;
    let dtype = match h.descr.as_str() {
        "<f4" => Dtype::F4,
        "<f8" => Dtype::F8,
        other => {
            let why = if other.starts_with('>') {
                "big-endian data is not supported; save with dtype '<f4'"
            } else {
                "must be '<f4' (little-endian float32) or '<f8' (converted to f32)"
            };
            return Err(RopeError::invalid(format!("{name} dtype"), other, why));
        }
    };
    if h.fortran_order {
        return Err(RopeError::invalid(
            format!("{name} fortran_order"),
            "True",
            "must be False (C order); save with np.ascontiguousarray",
        ));
    }
    let count = element_count(&h.shape)
        .ok_or_else(|| corrupt(name, format!("shape {} overflows", fmt_shape(&h.shape))))?;
    let item = match dtype {
        Dtype::F4 => 4,
        Dtype::F8 => 8,
    };
    let body = &bytes[end..];
    let need = count
        .checked_mul(item)
        .ok_or_else(|| corrupt(name, format!("shape {} overflows", fmt_shape(&h.shape))))?;
    if body.len() != need {
        return Err(corrupt(
            name,
            format!(
                "shape {} of {} needs {need} data bytes, found {}{}",
                fmt_shape(&h.shape),
                h.descr,
                body.len(),
                if body.len() < need {
                    " (truncated)"
                } else {
                    " (trailing bytes)"
                }
            ),
        ));
    }
    let data = match dtype {
        Dtype::F4 => body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F8 => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    };
    Ok((h.shape, data))
}

/// The header dict: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A tiny reader for the Python literal NumPy writes.
struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        match self.peek() {
            Some(x) if x == c => {
                self.i += 1;
                Ok(())
            }
            other => Err(format!(
                "expected '{}' at byte {}, found {}",
                c as char,
                self.i,
                other.map_or("the end".into(), |x| format!("'{}'", x as char))
            )),
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let q = self.peek().ok_or("ends where a string was expected")?;
        if q != b'\'' && q != b'"' {
            return Err(format!("expected a quoted string at byte {}", self.i));
        }
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err("has an unterminated string".into());
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }

    fn word(&mut self) -> String {
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_alphanumeric() {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn tuple(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                Some(b')') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(_) => {
                    let w = self.word();
                    let w = w.trim_end_matches('L'); // Python 2 longs
                    let d = w
                        .parse::<usize>()
                        .map_err(|_| format!("has a bad shape entry '{w}'"))?;
                    out.push(d);
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b')') => {}
                        _ => return Err("has a malformed shape tuple".into()),
                    }
                }
                None => return Err("has an unterminated shape tuple".into()),
            }
        }
    }
}

impl Header {
    fn parse(text: &str) -> std::result::Result<Header, String> {
        let mut lx = Lexer {
            s: text.as_bytes(),
            i: 0,
        };
        lx.expect(b'{')?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        loop {
            if lx.peek() == Some(b'}') {
                break;
            }
            let key = lx.string()?;
            lx.expect(b':')?;
            match key.as_str() {
                "descr" => {
                    if lx.peek() != Some(b'\'') && lx.peek() != Some(b'"') {
                        return Err(
                            "has a structured 'descr' (only plain dtypes are supported)".into()
                        );
                    }
                    descr = Some(lx.string()?)
                }
                "fortran_order" => match lx.word().as_str() {
                    "True" => fortran = Some(true),
                    "False" => fortran = Some(false),
                    w => return Err(format!("has fortran_order = '{w}'")),
                },
                "shape" => shape = Some(lx.tuple()?),
                other => return Err(format!("has an unexpected key '{other}'")),
            }
            match lx.peek() {
                Some(b',') => lx.i += 1,
                Some(b'}') => {}
                _ => return Err("is not a dict literal".into()),
            }
        }
        Ok(Header {
            descr: descr.ok_or("lacks 'descr'")?,
            fortran_order: fortran.ok_or("lacks 'fortran_order'")?,
            shape: shape.ok_or("lacks 'shape'")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-builds a file: magic, version, header length, header (padded), data.
    fn build(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dict.as_bytes().to_vec();
        let prefix = if version == 1 { 10 } else { 12 };
        while !(prefix + header.len() + 1).is_multiple_of(64) {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend_from_slice(&[version, 0]);
        if version == 1 {
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out
    }

    fn f4(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn reads_every_version_and_rank() {
        let data = f4(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        for v in [1, 2, 3] {
            let b = build(
                v,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }",
                &data,
            );
            let (shape, vals) = from_bytes(&b).unwrap();
            assert_eq!(shape, [1, 2, 3]);
            assert_eq!(vals, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
            let a = array3_from_bytes(&b).unwrap();
            assert_eq!(a[[0, 1, 2]], 6.0);
        }
        // Rank 0 and rank 1, double quotes, no trailing comma, extra spaces.
        let b = build(
            1,
            "{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":()}",
            &f4(&[7.5]),
        );
        assert_eq!(from_bytes(&b).unwrap(), (vec![], vec![7.5]));
        let b = build(
            1,
            "{ 'shape' : (2,) , 'fortran_order' : False , 'descr' : '<f4' }",
            &f4(&[1.0, -1.0]),
        );
        assert_eq!(from_bytes(&b).unwrap(), (vec![2], vec![1.0, -1.0]));
        // Empty arrays.
        let b = build(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }",
            &[],
        );
        assert_eq!(from_bytes(&b).unwrap(), (vec![0, 4], vec![]));
    }

    #[test]
    fn f8_is_converted() {
        let data: Vec<u8> = [0.5f64, 1e-3, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = build(
            1,
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }",
            &data,
        );
        assert_eq!(from_bytes(&b).unwrap().1, [0.5, 1e-3f32, -2.0]);
    }

    #[test]
    fn round_trip_matches_numpy_layout() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.25).collect();
        let b = to_bytes(&[2, 3, 4], &data).unwrap();
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert_eq!(b[10 + header_len - 1], b'\n');
        // Exactly what numpy 1.x/2.x writes for this array.
        let text = std::str::from_utf8(&b[10..10 + header_len]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }"));
        assert_eq!(from_bytes(&b).unwrap(), (vec![2, 3, 4], data));
        assert!(to_bytes(&[2, 3], &[1.0]).is_err());
        assert!(to_bytes(&[usize::MAX, 2], &[]).is_err());
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
        let data = f4(&[1.0, 2.0, 3.0, 4.0]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "magic"),
            (b"PK\x03\x04 not npy at all".to_vec(), "magic"),
            (build(1, ok_dict, &data)[..9].to_vec(), "magic"),
            (build(1, ok_dict, &data)[..40].to_vec(), "header of"),
            (build(1, ok_dict, &data[..15]), "truncated"),
            (
                build(1, ok_dict, &[data.clone(), vec![0]].concat()),
                "trailing",
            ),
            (build(4, ok_dict, &data), "version"),
            (
                build(
                    1,
                    "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
                    &data,
                ),
                "dtype",
            ),
            (
                build(
                    1,
                    "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }",
                    &data,
                ),
                "big-endian",
            ),
            (
                build(
                    1,
                    "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }",
                    &data,
                ),
                "dtype",
            ),
            (
                build(
                    1,
                    "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
                    &data,
                ),
                "structured",
            ),
            (
                build(
                    1,
                    "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                    &data,
                ),
                "fortran_order",
            ),
            (
                build(
                    1,
                    "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2, 2), }",
                    &data,
                ),
                "fortran_order",
            ),
            (
                build(
                    1,
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -2), }",
                    &data,
                ),
                "shape",
            ),
            (
                build(
                    1,
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999, 99999999999999), }",
                    &data,
                ),
                "overflows",
            ),
            (
                build(1, "{'descr': '<f4', 'fortran_order': False}", &data),
                "shape",
            ),
            (
                build(
                    1,
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'x': 1}",
                    &data,
                ),
                "unexpected key",
            ),
            (build(1, "['descr', '<f4']", &data), "expected '{'"),
            (build(1, "{'descr': '<f4", &data), "unterminated"),
            (
                build(
                    1,
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2",
                    &data,
                ),
                "shape",
            ),
        ];
        for (bytes, want) in cases {
            let e = from_bytes(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "expected '{want}' in: {e}");
        }
        // Header length beyond the file (v2, huge u32).
        let mut b = build(2, ok_dict, &data);
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(from_bytes(&b).is_err());
        // Rank errors for read_array3.
        let b = build(1, ok_dict, &data);
        let e = array3_from_bytes(&b).unwrap_err();
        assert!(matches!(e, RopeError::ShapeMismatch { .. }), "{e}");
        // Version 3 requires UTF-8.
        let mut b = build(3, ok_dict, &data);
        b[14] = 0xff;
        assert!(from_bytes(&b).is_err());
    }

    #[test]
    fn files_round_trip_and_report_paths() {
        let dir = std::env::temp_dir().join(format!("ropex-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        let a = Array3::from_shape_fn((3, 2, 4), |(i, j, k)| (i * 8 + j * 4 + k) as f32);
        write_array3(&path, a.view()).unwrap();
        assert_eq!(read_array3(&path).unwrap(), a);
        let e = read(dir.join("missing.npy")).unwrap_err();
        assert!(matches!(e, RopeError::Io { ref path, .. } if path.ends_with("missing.npy")));
        std::fs::write(&path, b"junk").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("a.npy") && e.contains("not a valid .npy"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
