//! Widening bf16 / f16 rows to f32 for the decode loops, with runtime dispatch.
//!
//! A bf16 value is the top half of an f32 (`f32::from_bits((b as u32) << 16)`, exact);
//! an f16 is converted with IEEE half-to-single conversion (exact: every f16, subnormals,
//! infinities and NaN, is an f32). The vector paths therefore give results bit-identical, for every non-NaN input,
//! to the scalar [`Element::to_f32`] (a NaN stays a NaN; the scalar bf16 conversion
//! quiets a signalling NaN's payload, the shift keeps it):
//! - AVX-512F: 16 lanes per step, bf16 by zero-extending `u16 -> u32`
//!   (`vpmovzxwd`) and shifting left by 16, f16 by `vcvtph2ps`;
//! - AVX2: 8 lanes, bf16 the same way, f16 with F16C's `vcvtph2ps` (when the CPU has F16C);
//! - portable: the scalar conversion.
//!
//! The instruction set is the one [`Kernels::active`] uses (so `ROPEX_KERNELS` caps it
//! here too).

use std::any::TypeId;

use super::{Isa, Kernels};
use crate::tensor::Element;

/// The storage format of `S`, for the widening paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "half"), allow(dead_code))] // only f32 exists without `half`
enum Format {
    F32,
    Bf16,
    F16,
}

fn format<S: Element>() -> Format {
    let id = TypeId::of::<S>();
    #[cfg(feature = "half")]
    {
        if id == TypeId::of::<half::bf16>() {
            return Format::Bf16;
        }
        if id == TypeId::of::<half::f16>() {
            return Format::F16;
        }
    }
    debug_assert_eq!(id, TypeId::of::<f32>(), "Element is sealed to f32/bf16/f16");
    Format::F32
}

/// Whether `S` is bf16.
pub(crate) fn is_bf16<S: Element>() -> bool {
    format::<S>() == Format::Bf16
}

/// `src` itself when `S` is f32 (no copy needed), else `None`.
pub(crate) fn as_f32<S: Element>(src: &[S]) -> Option<&[f32]> {
    if format::<S>() == Format::F32 {
        // SAFETY: `S` is `f32` (same TypeId), so the slice is reinterpreted as itself.
        Some(unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<f32>(), src.len()) })
    } else {
        None
    }
}

/// The 16-bit patterns of a bf16/f16 slice.
fn bits<S: Element>(src: &[S]) -> &[u16] {
    debug_assert_eq!(std::mem::size_of::<S>(), 2);
    // SAFETY: only called for bf16/f16, which are `repr(transparent)` over `u16` (same
    // size and alignment, every bit pattern valid).
    unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u16>(), src.len()) }
}

/// A slice of stored keys or values, by storage format (bf16 / f16 as bit patterns),
/// for the decode GEMVs that widen in registers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stored<'a> {
    F32(&'a [f32]),
    #[cfg_attr(not(feature = "half"), allow(dead_code))]
    Bf16(&'a [u16]),
    #[cfg_attr(not(feature = "half"), allow(dead_code))]
    F16(&'a [u16]),
}

impl Stored<'_> {
    /// Elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Stored::F32(x) => x.len(),
            Stored::Bf16(x) | Stored::F16(x) => x.len(),
        }
    }
}

/// `src` by storage format.
pub(crate) fn stored<S: Element>(src: &[S]) -> Stored<'_> {
    match format::<S>() {
        Format::F32 => Stored::F32(as_f32(src).expect("f32 storage")),
        Format::Bf16 => Stored::Bf16(bits(src)),
        Format::F16 => Stored::F16(bits(src)),
    }
}

/// Which vector path this process widens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Portable,
    Avx2 { f16c: bool },
    Avx512,
}

fn path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| path_for(Kernels::active().isa()))
}

fn path_for(isa: Isa) -> Path {
    match isa {
        Isa::Portable => Path::Portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Path::Avx2 {
            f16c: is_x86_feature_detected!("f16c"),
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Path::Avx512,
        #[cfg(not(target_arch = "x86_64"))]
        _ => Path::Portable,
    }
}

/// Widens `src` into `dst[..src.len()]` (exactly [`Element::to_f32`] per element).
///
/// # Panics
/// If `dst` is shorter than `src` (an internal invariant of the callers).
pub(crate) fn widen<S: Element>(src: &[S], dst: &mut [f32]) {
    widen_with(path(), src, dst)
}

fn widen_with<S: Element>(path: Path, src: &[S], dst: &mut [f32]) {
    let dst = &mut dst[..src.len()];
    let format = format::<S>();
    if format == Format::F32 {
        S::load_slice(src, dst);
        return;
    }
    let bits = bits(src);
    let done = match path {
        Path::Portable => 0,
        // SAFETY: `path_for` chose these paths only on CPUs with the features.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { x86::widen_avx512(format == Format::Bf16, bits, dst) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 { f16c } => {
            if format == Format::Bf16 {
                // SAFETY: as above.
                unsafe { x86::widen_bf16_avx2(bits, dst) }
            } else if f16c {
                // SAFETY: as above, and F16C was detected.
                unsafe { x86::widen_f16_f16c(bits, dst) }
            } else {
                0
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => 0,
    };
    S::load_slice(&src[done..], &mut dst[done..]);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Widens whole vectors of 16; returns how many elements were done.
    #[target_feature(enable = "avx512f")]
    pub(super) fn widen_avx512(bf16: bool, src: &[u16], dst: &mut [f32]) -> usize {
        let n = src.len() / 16 * 16;
        for (s, d) in src[..n].chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: `s` holds 16 u16 (32 bytes), `d` 16 f32 (64 bytes); unaligned ops.
            unsafe {
                let h = _mm256_loadu_si256(s.as_ptr().cast());
                let f = if bf16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                } else {
                    _mm512_cvtph_ps(h)
                };
                _mm512_storeu_ps(d.as_mut_ptr(), f);
            }
        }
        n
    }

    /// bf16 in whole vectors of 8; returns how many elements were done.
    #[target_feature(enable = "avx2")]
    pub(super) fn widen_bf16_avx2(src: &[u16], dst: &mut [f32]) -> usize {
        let n = src.len() / 8 * 8;
        for (s, d) in src[..n].chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
            // SAFETY: `s` holds 8 u16 (16 bytes), `d` 8 f32 (32 bytes); unaligned ops.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast());
                let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                _mm256_storeu_ps(d.as_mut_ptr(), f);
            }
        }
        n
    }

    /// f16 in whole vectors of 8 (F16C); returns how many elements were done.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn widen_f16_f16c(src: &[u16], dst: &mut [f32]) -> usize {
        let n = src.len() / 8 * 8;
        for (s, d) in src[..n].chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
            // SAFETY: as in `widen_bf16_avx2`.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast());
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        n
    }
}

#[cfg(all(test, feature = "half"))]
mod tests {
    use super::*;

    /// Every path this CPU has, portable first.
    fn paths() -> Vec<Path> {
        Isa::ALL
            .into_iter()
            .filter(|i| Kernels::with_isa(*i).is_some())
            .map(path_for)
            .collect()
    }

    fn check<S: Element>(from_bits: fn(u16) -> S) {
        // every 16-bit pattern (NaN payloads, infinities, subnormals), at odd offsets and
        // lengths so the vector loops and the scalar tails both run
        let all: Vec<S> = (0..=u16::MAX).map(from_bits).collect();
        for path in paths() {
            for (start, len) in [(0, all.len()), (3, 37), (1, 15), (5, 8), (0, 0)] {
                let src = &all[start..start + len];
                let mut dst = vec![f32::NAN; len + 3];
                widen_with(path, src, &mut dst);
                for (i, (s, d)) in src.iter().zip(&dst).enumerate() {
                    let want = s.to_f32();
                    if want.is_nan() {
                        // the scalar conversion quiets signalling NaNs, the shift keeps them
                        assert!(d.is_nan(), "{} {path:?} element {i}", S::NAME);
                    } else {
                        assert_eq!(
                            want.to_bits(),
                            d.to_bits(),
                            "{} {path:?} element {i}",
                            S::NAME
                        );
                    }
                }
                assert!(dst[len..].iter().all(|x| x.is_nan()), "wrote past the end");
            }
        }
    }

    #[test]
    fn every_path_widens_every_pattern_like_the_scalar_conversion() {
        check(half::bf16::from_bits);
        check(half::f16::from_bits);
        assert!(paths().contains(&Path::Portable));
    }

    #[test]
    fn f32_is_borrowed_and_halves_are_not() {
        let x = [1.0f32, 2.0];
        assert_eq!(as_f32(&x).map(<[f32]>::as_ptr), Some(x.as_ptr()));
        assert!(as_f32(&[half::bf16::ONE]).is_none());
        let mut d = [0f32; 2];
        widen(&x, &mut d);
        assert_eq!(d, x);
    }
}
