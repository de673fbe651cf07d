//! What the kernels read and write: an element type ([`Element`]: f32, and with the
//! `half` feature bf16 and f16) and a strided three-axis view ([`View3`], [`View3Mut`]).
//!
//! ## Element types
//! Engines keep activations and K/V in bf16 or f16. ropex accepts them as storage only:
//! every element is widened to f32 when it is loaded ([`Element::to_f32`], exact for
//! all three types), every dot product, softmax and accumulation runs in f32 (angles in
//! f64, see [`crate::rotary`]), and a result is rounded once, to nearest even, when it is
//! stored ([`Element::from_f32`]). A bf16 output therefore differs from the f32 result
//! by at most one rounding, `|x| * 2^-8` ([`Element::UNIT_ROUNDOFF`]); what the inputs'
//! own rounding does to attention is documented with the kernels.
//!
//! ## Views
//! Every kernel takes its q, k and v as a logical `[tokens, heads, dim]` array with
//! arbitrary strides, so both common memory layouts are read in place:
//! - `[tokens, heads, dim]` row-major (flash-attention's varlen layout, ropex's default):
//!   [`View3::tokens_heads_dim`];
//! - `[heads, tokens, dim]` row-major (one batch item of candle's or PyTorch's
//!   `(B, H, T, D)`): [`View3::heads_tokens_dim`].
//!
//! A view holds a slice, a shape and strides, never a raw pointer, and is checked when
//! it is built: every index it can address is inside the slice (and, for
//! [`View3Mut`], no two indices share an element). An [`ndarray`] view or array
//! converts into one with `.into()`, so `attn.tiled(q.view(), ...)` works unchanged.
//!
//! ```
//! use ropex::tensor::View3;
//!
//! // Two heads of three tokens, d = 4, stored head-major as candle's (H, T, D).
//! let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
//! let q = View3::heads_tokens_dim(&data, 2, 3, 4)?;
//! assert_eq!(q.dims(), [3, 2, 4]); // always read as [tokens, heads, dim]
//! assert_eq!(q.get(1, 1, 2), Some(18.0)); // token 1 of head 1: offset 1*12 + 1*4 + 2
//! # Ok::<(), ropex::RopeError>(())
//! ```

use std::fmt::Debug;

use ndarray::{Array3, ArrayView3, ArrayViewMut3, ShapeBuilder};

use crate::error::{Result, RopeError};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    #[cfg(feature = "half")]
    impl Sealed for half::bf16 {}
    #[cfg(feature = "half")]
    impl Sealed for half::f16 {}
}

/// A storage element type of the kernels and caches: `f32`, and with the `half` feature
/// `half::bf16` and `half::f16`. Sealed: the kernels' error bounds are stated for these
/// three.
pub trait Element:
    Copy + Default + Debug + PartialEq + Send + Sync + 'static + sealed::Sealed
{
    /// The type's name as engines spell it (`"f32"`, `"bf16"`, `"f16"`).
    const NAME: &'static str;
    /// Unit roundoff `u = 2^-p` (`p` = significand bits including the implicit one): one
    /// round-to-nearest store of `x` is within `u |x|` (normal range). f32 `2^-24`,
    /// bf16 `2^-8`, f16 `2^-11`.
    const UNIT_ROUNDOFF: f64;
    /// Bytes per element.
    const BYTES: usize = std::mem::size_of::<Self>();

    /// Widens to f32 (exact for all three types).
    fn to_f32(self) -> f32;

    /// Rounds an f32 to this type, to nearest even (the identity for f32). Values past
    /// the type's range become infinities, as IEEE conversion does.
    fn from_f32(x: f32) -> Self;

    /// Widens `src` into `dst` (equal lengths; a shorter one bounds the copy). The
    /// `half` crate's slice conversion is used for f16/bf16 (F16C where the CPU has it).
    #[inline]
    fn load_slice(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// Rounds `src` into `dst` (equal lengths; a shorter one bounds the copy).
    #[inline]
    fn store_slice(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }

    /// `s` itself when `Self` is f32 (the kernels then read it in place), else `None`.
    #[inline]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }

    /// `s` itself when `Self` is f32 (the kernels then write it in place), else `None`.
    #[inline]
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    const UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

    #[inline]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }

    #[inline]
    fn load_slice(src: &[Self], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
    }

    #[inline]
    fn store_slice(src: &[f32], dst: &mut [Self]) {
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
    }

    #[inline]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }

    #[inline]
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
}

#[cfg(feature = "half")]
macro_rules! half_element {
    ($t:ty, $name:literal, $bits:literal) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            const UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << $bits) as f64;

            #[inline]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }

            #[inline]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }

            #[inline]
            fn load_slice(src: &[Self], dst: &mut [f32]) {
                use half::slice::HalfFloatSliceExt;
                let n = src.len().min(dst.len());
                src[..n].convert_to_f32_slice(&mut dst[..n]);
            }

            #[inline]
            fn store_slice(src: &[f32], dst: &mut [Self]) {
                use half::slice::HalfFloatSliceExt;
                let n = src.len().min(dst.len());
                dst[..n].convert_from_f32_slice(&src[..n]);
            }
        }
    };
}

#[cfg(feature = "half")]
half_element!(half::bf16, "bf16", 8);
#[cfg(feature = "half")]
half_element!(half::f16, "f16", 11);

/// Checks that `dims` with `strides` addresses only elements of a slice of `len`
/// elements, with checked arithmetic.
fn check_extent(
    what: &'static str,
    len: usize,
    dims: [usize; 3],
    strides: [usize; 3],
) -> Result<()> {
    if dims.contains(&0) {
        return Ok(());
    }
    let mut last = 0usize;
    for (&n, &s) in dims.iter().zip(&strides) {
        last = (n - 1)
            .checked_mul(s)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(|| {
                RopeError::shape(
                    what,
                    "strides whose offsets fit in usize",
                    format!("dims {dims:?}, strides {strides:?}"),
                )
            })?;
    }
    if last >= len {
        return Err(RopeError::shape(
            what,
            format!(
                "a slice of more than {last} elements for dims {dims:?} and strides {strides:?}"
            ),
            format!("{len} elements"),
        ));
    }
    Ok(())
}

/// Row-major strides of `[a, b, c]`, checked.
fn row_major(what: &'static str, a: usize, b: usize, c: usize) -> Result<usize> {
    a.checked_mul(b)
        .and_then(|x| x.checked_mul(c))
        .ok_or_else(|| {
            RopeError::shape(
                what,
                "a shape whose element count fits in usize",
                format!("[{a}, {b}, {c}]"),
            )
        })
}

fn exact_len<T>(what: &'static str, data: &[T], need: usize) -> Result<()> {
    if data.len() != need {
        return Err(RopeError::shape(
            what,
            format!("{need} elements"),
            data.len(),
        ));
    }
    Ok(())
}

/// A read-only logical `[tokens, heads, dim]` view of a slice with arbitrary strides
/// (see the [module docs](self)). Cheap to copy; built from a slice or from any
/// [`ndarray`] view (`.into()`).
#[derive(Debug, Clone, Copy)]
pub struct View3<'a, T>(ArrayView3<'a, T>);

impl<'a, T> View3<'a, T> {
    /// A view of `data` with logical dims `[tokens, heads, dim]` and element strides
    /// `strides` (offset of `[t, h, i]` = `t s0 + h s1 + i s2`). Errors
    /// ([`RopeError::Shape`]) if an addressable offset overflows or lies past
    /// `data.len()`.
    pub fn new(data: &'a [T], dims: [usize; 3], strides: [usize; 3]) -> Result<Self> {
        check_extent("view", data.len(), dims, strides)?;
        // an empty view addresses nothing: its strides are irrelevant
        let strides = if dims.contains(&0) { [0; 3] } else { strides };
        ArrayView3::from_shape(dims.strides(strides), data)
            .map(View3)
            .map_err(|e| {
                RopeError::shape("view", "dims and strides inside the slice", e.to_string())
            })
    }

    /// `data` as a row-major `[tokens, heads, dim]` array (exactly that many elements).
    pub fn tokens_heads_dim(
        data: &'a [T],
        tokens: usize,
        heads: usize,
        dim: usize,
    ) -> Result<Self> {
        let n = row_major("[tokens, heads, dim]", tokens, heads, dim)?;
        exact_len("[tokens, heads, dim] data", data, n)?;
        Self::new(data, [tokens, heads, dim], [heads * dim, dim, 1])
    }

    /// `data` as a row-major `[heads, tokens, dim]` array (one batch item of candle's
    /// `(B, H, T, D)`), read as `[tokens, heads, dim]` without a copy.
    pub fn heads_tokens_dim(
        data: &'a [T],
        heads: usize,
        tokens: usize,
        dim: usize,
    ) -> Result<Self> {
        let n = row_major("[heads, tokens, dim]", heads, tokens, dim)?;
        exact_len("[heads, tokens, dim] data", data, n)?;
        Self::new(data, [tokens, heads, dim], [dim, tokens * dim, 1])
    }

    /// Logical dims `[tokens, heads, dim]`.
    pub fn dims(&self) -> [usize; 3] {
        let (t, h, d) = self.0.dim();
        [t, h, d]
    }

    /// Element `[t, h, i]`, or `None` out of range.
    pub fn get(&self, t: usize, h: usize, i: usize) -> Option<T>
    where
        T: Copy,
    {
        self.0.get([t, h, i]).copied()
    }

    /// The same data as an [`ndarray`] view (no copy).
    pub fn as_ndarray(&self) -> ArrayView3<'a, T> {
        self.0
    }

    /// Tokens `range` of this view (no copy). Errors if the range is past the end.
    pub fn tokens(&self, range: std::ops::Range<usize>) -> Result<Self> {
        let n = self.0.dim().0;
        if range.start > range.end || range.end > n {
            return Err(RopeError::shape(
                "token range",
                format!("inside 0..{n}"),
                format!("{range:?}"),
            ));
        }
        Ok(View3(self.0.slice_move(ndarray::s![range, .., ..])))
    }
}

impl<'a, T> From<ArrayView3<'a, T>> for View3<'a, T> {
    fn from(v: ArrayView3<'a, T>) -> Self {
        View3(v)
    }
}

impl<'a, T> From<&'a Array3<T>> for View3<'a, T> {
    fn from(a: &'a Array3<T>) -> Self {
        View3(a.view())
    }
}

/// A mutable logical `[tokens, heads, dim]` view (outputs of the `_into` kernels).
/// Building one checks, besides bounds, that no two indices share an element.
#[derive(Debug)]
pub struct View3Mut<'a, T>(ArrayViewMut3<'a, T>);

impl<'a, T> View3Mut<'a, T> {
    /// A mutable view of `data` with dims `[tokens, heads, dim]` and element strides
    /// `strides`. Errors if an offset overflows, lies past the slice, or two indices
    /// alias one element.
    pub fn new(data: &'a mut [T], dims: [usize; 3], strides: [usize; 3]) -> Result<Self> {
        check_extent("output view", data.len(), dims, strides)?;
        let strides = if dims.contains(&0) { [0; 3] } else { strides };
        ArrayViewMut3::from_shape(dims.strides(strides), data)
            .map(View3Mut)
            .map_err(|e| {
                RopeError::shape(
                    "output view",
                    "dims and strides inside the slice, no two indices on one element",
                    e.to_string(),
                )
            })
    }

    /// `data` as a row-major `[tokens, heads, dim]` array.
    pub fn tokens_heads_dim(
        data: &'a mut [T],
        tokens: usize,
        heads: usize,
        dim: usize,
    ) -> Result<Self> {
        let n = row_major("[tokens, heads, dim]", tokens, heads, dim)?;
        exact_len("[tokens, heads, dim] output", data, n)?;
        Self::new(data, [tokens, heads, dim], [heads * dim, dim, 1])
    }

    /// `data` as a row-major `[heads, tokens, dim]` array, written as `[tokens, heads, dim]`.
    pub fn heads_tokens_dim(
        data: &'a mut [T],
        heads: usize,
        tokens: usize,
        dim: usize,
    ) -> Result<Self> {
        let n = row_major("[heads, tokens, dim]", heads, tokens, dim)?;
        exact_len("[heads, tokens, dim] output", data, n)?;
        Self::new(data, [tokens, heads, dim], [dim, tokens * dim, 1])
    }

    /// Logical dims `[tokens, heads, dim]`.
    pub fn dims(&self) -> [usize; 3] {
        let (t, h, d) = self.0.dim();
        [t, h, d]
    }

    /// The same data as an [`ndarray`] mutable view (no copy).
    pub fn as_ndarray(&mut self) -> ArrayViewMut3<'_, T> {
        self.0.view_mut()
    }

    /// The underlying ndarray view, consuming this one.
    pub fn into_ndarray(self) -> ArrayViewMut3<'a, T> {
        self.0
    }

    /// A shorter-lived mutable view of the same elements (to pass on without giving
    /// this one up).
    pub fn reborrow(&mut self) -> View3Mut<'_, T> {
        View3Mut(self.0.view_mut())
    }
}

impl<'a, T> From<ArrayViewMut3<'a, T>> for View3Mut<'a, T> {
    fn from(v: ArrayViewMut3<'a, T>) -> Self {
        View3Mut(v)
    }
}

impl<'a, T> From<&'a mut Array3<T>> for View3Mut<'a, T> {
    fn from(a: &'a mut Array3<T>) -> Self {
        View3Mut(a.view_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_address_the_documented_offsets() {
        let data: Vec<f32> = (0..60).map(|x| x as f32).collect();
        let thd = View3::tokens_heads_dim(&data, 5, 3, 4).unwrap();
        let htd = View3::heads_tokens_dim(&data, 3, 5, 4).unwrap();
        for t in 0..5 {
            for h in 0..3 {
                for i in 0..4 {
                    assert_eq!(thd.get(t, h, i), Some((t * 12 + h * 4 + i) as f32));
                    assert_eq!(htd.get(t, h, i), Some((h * 20 + t * 4 + i) as f32));
                }
            }
        }
        assert_eq!(htd.get(5, 0, 0), None);
        let sub = htd.tokens(1..3).unwrap();
        assert_eq!(sub.dims(), [2, 3, 4]);
        assert_eq!(sub.get(0, 2, 1), Some((2 * 20 + 4 + 1) as f32));
        assert!(htd.tokens(3..6).is_err());
    }

    #[test]
    fn bad_views_are_typed_errors() {
        let data = vec![0f32; 10];
        assert!(View3::tokens_heads_dim(&data, 2, 2, 3).is_err()); // 12 != 10
        assert!(View3::new(&data, [2, 2, 3], [6, 3, 1]).is_err()); // last offset 11
        assert!(View3::new(&data, [2, 1, 5], [5, 0, 1]).is_ok());
        assert!(View3::new(&data, [usize::MAX, 2, 2], [usize::MAX, 1, 1]).is_err());
        assert!(View3::tokens_heads_dim(&data, usize::MAX, 2, 2).is_err());
        // empty views never read
        assert!(View3::new(&data[..0], [0, 4, 4], [16, 4, 1]).is_ok());
        let mut out = vec![0f32; 10];
        // aliasing output strides
        assert!(View3Mut::new(&mut out, [2, 2, 2], [1, 1, 1]).is_err());
        assert!(View3Mut::new(&mut out, [2, 1, 5], [5, 5, 1]).is_ok());
    }

    #[test]
    fn f32_round_trips_exactly() {
        for x in [0.0f32, -1.5, 3.0e38, f32::MIN_POSITIVE, 1.0 + f32::EPSILON] {
            assert_eq!(f32::from_f32(x).to_f32(), x);
        }
        let src = [1.0f32, 2.0, 3.0];
        let mut dst = [0f32; 3];
        f32::load_slice(&src, &mut dst);
        assert_eq!(dst, src);
    }

    #[cfg(feature = "half")]
    #[test]
    fn half_types_round_within_their_unit_roundoff() {
        fn check<T: Element>() {
            let mut x = 0.37f32;
            for _ in 0..200 {
                x = (x * 3.7 + 0.11) % 53.0 - 20.0;
                let r = T::from_f32(x).to_f32();
                assert!(
                    ((r - x).abs() as f64) <= T::UNIT_ROUNDOFF * x.abs() as f64 + 1e-30,
                    "{} {x} -> {r}",
                    T::NAME
                );
                // a value already in the type converts back unchanged
                assert_eq!(T::from_f32(r).to_f32(), r);
            }
            let src: Vec<T> = (0..37)
                .map(|i| T::from_f32(i as f32 * 0.25 - 4.0))
                .collect();
            let mut wide = vec![0f32; 37];
            T::load_slice(&src, &mut wide);
            let mut back = vec![T::default(); 37];
            T::store_slice(&wide, &mut back);
            assert_eq!(back, src);
            assert_eq!(wide[17], 17.0 * 0.25 - 4.0);
        }
        check::<half::bf16>();
        check::<half::f16>();
        // bf16 keeps f32's range, f16 does not
        assert!(half::f16::from_f32(1.0e6).to_f32().is_infinite());
        assert_eq!(half::bf16::from_f32(1.0e6).to_f32(), 999_424.0);
    }
}
