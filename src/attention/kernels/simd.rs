//! The vector abstraction every kernel is written against once: a zero-sized *token*
//! per instruction set ([`Portable`], and on x86-64 `Avx2` and `Avx512`), implementing
//! [`Simd`].
//!
//! A token can only be obtained when the CPU supports its instructions (see
//! [`super::Isa`]), which is what makes its arithmetic methods safe to call. Kernels are
//! generic functions marked `#[inline(always)]`; each instruction set gets a thin
//! `#[target_feature]` entry point that calls the generic body with its token, so the
//! whole body, intrinsics included, is compiled for that instruction set.
//!
//! No closure may call a token method: a closure is a function of its own, compiled
//! without the entry point's target features, so its intrinsics would become calls.

/// One SIMD instruction set: a vector of `LANES` f32 and the operations kernels use.
///
/// Semantics shared by every implementation (and checked by the tests):
/// - `max(a, b)` is `a` if `a > b`, else `b` (a NaN in `a` yields `b`);
/// - `fma(a, b, c)` is `a * b + c`, fused where the hardware fuses it;
/// - `exp` follows [`super::exp`]'s contract (relative error < 1e-6 on normal
///   results, `exp(x) = 0` below `ln(f32::MIN_POSITIVE)`, `+inf` above
///   `ln(f32::MAX)`, NaN in -> NaN out).
pub(crate) trait Simd: Copy {
    /// f32 lanes per vector.
    const LANES: usize;
    /// A vector of `LANES` f32.
    type V: Copy;
    /// Which lanes a partial load or store touches.
    type M: Copy;

    /// Every lane `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Every lane zero.
    fn zero(self) -> Self::V;
    /// The mask of the first `min(n, LANES)` lanes.
    fn mask(self, n: usize) -> Self::M;

    /// Loads `LANES` f32.
    ///
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// Loads the lanes in `m`, zero elsewhere; lanes outside `m` are not read.
    ///
    /// # Safety
    /// The lanes of `p` selected by `m` must be readable.
    unsafe fn load_masked(self, p: *const f32, m: Self::M) -> Self::V;
    /// Stores `LANES` f32.
    ///
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// Stores the lanes in `m`; memory outside `m` is not touched.
    ///
    /// # Safety
    /// The lanes of `p` selected by `m` must be writable.
    unsafe fn store_masked(self, p: *mut f32, v: Self::V, m: Self::M);

    /// `a * b + c`.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a` if `a > b`, else `b`.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// The sum of the lanes.
    fn hsum(self, v: Self::V) -> f32;
    /// The largest lane (lanes must not be NaN).
    fn hmax(self, v: Self::V) -> f32;
    /// Lane-wise `e^x`.
    fn exp(self, x: Self::V) -> Self::V;
    /// Lane-wise `e^x` for `x <= 0` or NaN (a softmax numerator `e^(s - max)`): equal
    /// to [`Simd::exp`] there (NaN stays a NaN, perhaps with another payload), without
    /// its overflow and NaN blends. Positive lanes are not allowed.
    #[inline(always)]
    fn exp_nonpos(self, x: Self::V) -> Self::V {
        self.exp(x)
    }

    /// Lane `t` of the result is the sum of the lanes of `v[t]` (`v.len() == LANES`):
    /// `LANES` horizontal sums at once.
    #[inline(always)]
    fn transpose_sum(self, v: &[Self::V]) -> Self::V {
        debug_assert_eq!(v.len(), Self::LANES);
        let mut sums = [0f32; 16];
        for (x, &vt) in sums.iter_mut().zip(v) {
            *x = self.hsum(vt);
        }
        // SAFETY: `sums` holds 16 >= LANES f32.
        unsafe { self.load(sums.as_ptr()) }
    }

    /// Lane `t` of the result is the largest lane of `v[t]` (`v.len() == LANES`, no NaN
    /// lanes): `LANES` horizontal maxima at once.
    #[inline(always)]
    fn transpose_max(self, v: &[Self::V]) -> Self::V {
        debug_assert_eq!(v.len(), Self::LANES);
        let mut maxima = [0f32; 16];
        for (x, &vt) in maxima.iter_mut().zip(v) {
            *x = self.hmax(vt);
        }
        // SAFETY: `maxima` holds 16 >= LANES f32.
        unsafe { self.load(maxima.as_ptr()) }
    }

    /// Packs `rows <= nr` rows of a row-major block, transposed: for `kk < kc`,
    /// `panel[kk * nr + jj] = b[jj * ldb + kk]` for `jj < rows` and `0` for
    /// `rows <= jj < nr`.
    ///
    /// # Safety
    /// `b` must be readable for `rows` rows of `kc` f32 with stride `ldb`, and `panel`
    /// writable for `kc * nr` f32.
    #[inline(always)]
    unsafe fn pack_bt(
        self,
        b: *const f32,
        ldb: usize,
        rows: usize,
        kc: usize,
        panel: *mut f32,
        nr: usize,
    ) {
        // SAFETY: the caller guarantees `b` covers `rows x kc` with stride `ldb` and
        // `panel` covers `kc * nr`; every index below stays inside those ranges.
        unsafe {
            for kk in 0..kc {
                let dst = panel.add(kk * nr);
                for jj in 0..rows {
                    *dst.add(jj) = *b.add(jj * ldb + kk);
                }
                for jj in rows..nr {
                    *dst.add(jj) = 0.0;
                }
            }
        }
    }

    // decode: widening loads of 16-bit storage and a prefetch hint, for the decode
    // GEMVs (`gemv.rs`), which read bf16 / f16 keys and values in place.

    /// Loads `LANES` bf16 (bit patterns) widened to f32: `f32::from_bits(b << 16)`,
    /// exact (a NaN keeps its payload).
    ///
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load_bf16(self, p: *const u16) -> Self::V;
    /// Loads `LANES` f16 (bit patterns) widened to f32 (IEEE half to single, exact for
    /// every pattern; a NaN stays a NaN).
    ///
    /// # Safety
    /// `p .. p + LANES` must be readable; on [`Avx2`](x86::Avx2) the CPU must also have
    /// F16C and the caller be compiled with it (the decode entry points check it).
    unsafe fn load_f16(self, p: *const u16) -> Self::V;
    /// A hint to fetch the cache line of `p` into the caches; never faults, any address.
    #[inline(always)]
    fn prefetch(self, _p: *const u8) {}
    /// A hint to fetch the cache line of `p` into L2 but not L1 (`prefetcht1`), for
    /// streams read once: the L1 fill buffers stay free for the demand loads. Never
    /// faults, any address.
    #[inline(always)]
    fn prefetch_l2(self, _p: *const u8) {}
}

/// Constants of the f32 exponential shared by every instruction set.
///
/// `e^x = 2^n e^r` with `n = round(x log2 e)` and `r = x - n ln 2` (ln 2 split in a
/// short high part, exact when multiplied by `n`, and a low correction), `e^r` on
/// `|r| <= ln2 / 2` by a degree-7 polynomial in Horner form (`1 + r + r^2 P(r)` with
/// `P` of degree 5, the classic Cody-Waite / Cephes coefficients).
pub(crate) mod expc {
    /// Below this, `e^x` is under `f32::MIN_POSITIVE`: flushed to 0 (no subnormals).
    /// `exp(LO)` is, in exact arithmetic, at least `f32::MIN_POSITIVE`.
    pub const LO: f32 = -87.336_54;
    /// Above this, `e^x` overflows to `+inf` (`ln(f32::MAX) = 88.7228391`).
    pub const HI: f32 = 88.722_83;
    /// log2(e).
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// High part of ln 2 (9 significant bits, so `n * LN2_HI` is exact).
    pub const LN2_HI: f32 = 0.693_359_4;
    /// `ln 2 - LN2_HI`.
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Polynomial coefficients, highest degree first: `P(r) = ((((P0 r + P1) r + P2) r
    /// + P3) r + P4) r + P5`.
    pub const P0: f32 = 1.987_569_1e-4;
    /// See [`P0`].
    pub const P1: f32 = 1.398_199_9e-3;
    /// See [`P0`].
    pub const P2: f32 = 8.333_452e-3;
    /// See [`P0`].
    pub const P3: f32 = 4.166_579_6e-2;
    /// See [`P0`].
    pub const P4: f32 = 1.666_666_5e-1;
    /// See [`P0`].
    pub const P5: f32 = 0.5;
}

/// The scalar exponential with exactly the portable path's operation order.
#[inline(always)]
pub(crate) fn exp_scalar(x: f32) -> f32 {
    use expc::*;
    // Round to nearest with the 1.5 * 2^23 trick: exact for |t| < 2^22.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI); // NaN stays NaN here; handled below.
    let xc = if xc.is_nan() { 0.0 } else { xc };
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    let y = p * (r * r) + r + 1.0;
    // 2^n in two normal factors: n is in [-126, 128].
    let ni = n as i32;
    let na = ni >> 1;
    let nb = ni - na;
    let pa = f32::from_bits(((na + 127) as u32) << 23);
    let pb = f32::from_bits(((nb + 127) as u32) << 23);
    let e = y * pa * pb;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// The portable instruction set: plain f32 arithmetic on 8-lane arrays, which the
/// compiler vectorises with the baseline instructions of the target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

const PL: usize = 8;

impl Simd for Portable {
    const LANES: usize = PL;
    type V = [f32; PL];
    type M = usize;

    #[inline(always)]
    fn splat(self, x: f32) -> Self::V {
        [x; PL]
    }
    #[inline(always)]
    fn zero(self) -> Self::V {
        [0.0; PL]
    }
    #[inline(always)]
    fn mask(self, n: usize) -> usize {
        n.min(PL)
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees PL readable f32 at `p`; f32 arrays have f32
        // alignment.
        unsafe { p.cast::<[f32; PL]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn load_masked(self, p: *const f32, m: usize) -> Self::V {
        let mut v = [0.0; PL];
        for (i, x) in v.iter_mut().enumerate().take(m) {
            // SAFETY: lanes `< m` are readable by the caller's contract.
            *x = unsafe { *p.add(i) };
        }
        v
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees PL writable f32 at `p`.
        unsafe { p.cast::<[f32; PL]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn store_masked(self, p: *mut f32, v: Self::V, m: usize) {
        for (i, x) in v.iter().enumerate().take(m) {
            // SAFETY: lanes `< m` are writable by the caller's contract.
            unsafe { *p.add(i) = *x };
        }
    }
    #[inline(always)]
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // Unfused on purpose: `mul_add` without hardware FMA is a slow libm call.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn max(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn hsum(self, v: Self::V) -> f32 {
        // Pairwise, the same tree shape as the vector paths.
        let a = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
        let b = [a[0] + a[2], a[1] + a[3]];
        b[0] + b[1]
    }
    #[inline(always)]
    fn hmax(self, v: Self::V) -> f32 {
        v.iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }
    #[inline(always)]
    fn exp(self, x: Self::V) -> Self::V {
        x.map(exp_scalar)
    }

    // decode
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> Self::V {
        // SAFETY: the caller guarantees PL readable u16 at `p`.
        let h = unsafe { p.cast::<[u16; PL]>().read_unaligned() };
        h.map(bf16_to_f32)
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> Self::V {
        // SAFETY: the caller guarantees PL readable u16 at `p`.
        let h = unsafe { p.cast::<[u16; PL]>().read_unaligned() };
        h.map(f16_to_f32)
    }
}

/// bf16 (bit pattern) to single, exact: the bf16 bits are the top half of the f32's
/// (a NaN keeps its payload).
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// IEEE half (bit pattern) to single, exact: normals re-biased, subnormals as
/// `m * 2^-24`, infinities and NaN (payload shifted, so a NaN stays a NaN) kept.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = (u32::from(h) & 0x8000) << 16;
    let exp = u32::from(h >> 10) & 0x1f;
    let man = u32::from(h) & 0x3ff;
    let bits = match exp {
        0x1f => sign | 0x7f80_0000 | (man << 13),
        0 => {
            // 0 or subnormal: man * 2^-24 is exact in f32.
            let m = man as f32 * f32::from_bits(0x3380_0000);
            sign | m.to_bits()
        }
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Simd, expc};
    use core::arch::x86_64::*;

    /// `LANES` horizontal folds by `$op` (`_mm256_add_ps`, `_mm256_max_ps`) of 8 vectors
    /// at once: lane `t` of the result folds the lanes of `$v[t]`. A tree of pairwise
    /// folds; the final lane order is fixed by feeding vector `4 (s % 2) + s / 2` into
    /// slot `s`. Needs AVX.
    macro_rules! transpose_fold_256 {
        ($v:expr, $op:ident) => {{
            let v: &[__m256] = $v;
            debug_assert_eq!(v.len(), 8);
            let x: [__m256; 8] = [v[0], v[4], v[1], v[5], v[2], v[6], v[3], v[7]];
            let mut w = [_mm256_setzero_ps(); 4];
            for (i, wi) in w.iter_mut().enumerate() {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                *wi = $op(
                    _mm256_permute2f128_ps::<0x20>(a, b),
                    _mm256_permute2f128_ps::<0x31>(a, b),
                );
            }
            let mut y = [_mm256_setzero_ps(); 2];
            for (i, yi) in y.iter_mut().enumerate() {
                let (a, b) = (w[2 * i], w[2 * i + 1]);
                *yi = $op(
                    _mm256_shuffle_ps::<0x44>(a, b),
                    _mm256_shuffle_ps::<0xEE>(a, b),
                );
            }
            $op(
                _mm256_shuffle_ps::<0x88>(y[0], y[1]),
                _mm256_shuffle_ps::<0xDD>(y[0], y[1]),
            )
        }};
    }

    /// [`transpose_fold_256!`] for 16 vectors of 16 lanes (`_mm512_add_ps`,
    /// `_mm512_max_ps`). A tree of pairwise folds (128-bit lanes twice, then elements
    /// twice) leaves the fold of slot `4e + j` at lane `4j + e`: feed slot `4e + j` with
    /// vector `4j + e` so lane `t` folds `v[t]`. Needs AVX-512F.
    macro_rules! transpose_fold_512 {
        ($v:expr, $op:ident) => {{
            let v: &[__m512] = $v;
            debug_assert_eq!(v.len(), 16);
            let x: [__m512; 16] = [
                v[0], v[4], v[8], v[12], v[1], v[5], v[9], v[13], v[2], v[6], v[10], v[14], v[3],
                v[7], v[11], v[15],
            ];
            let mut w = [_mm512_setzero_ps(); 8];
            for (i, wi) in w.iter_mut().enumerate() {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                *wi = $op(
                    _mm512_shuffle_f32x4::<0x44>(a, b),
                    _mm512_shuffle_f32x4::<0xEE>(a, b),
                );
            }
            let mut y = [_mm512_setzero_ps(); 4];
            for (i, yi) in y.iter_mut().enumerate() {
                let (a, b) = (w[2 * i], w[2 * i + 1]);
                *yi = $op(
                    _mm512_shuffle_f32x4::<0x88>(a, b),
                    _mm512_shuffle_f32x4::<0xDD>(a, b),
                );
            }
            let mut z = [_mm512_setzero_ps(); 2];
            for (i, zi) in z.iter_mut().enumerate() {
                let (a, b) = (y[2 * i], y[2 * i + 1]);
                *zi = $op(
                    _mm512_shuffle_ps::<0x44>(a, b),
                    _mm512_shuffle_ps::<0xEE>(a, b),
                );
            }
            $op(
                _mm512_shuffle_ps::<0x88>(z[0], z[1]),
                _mm512_shuffle_ps::<0xDD>(z[0], z[1]),
            )
        }};
    }

    /// `e^xc` for `xc` already clamped to `[LO, HI]` (or NaN): `n = round(xc log2 e)`,
    /// `r = xc - n ln 2` (in two parts), `e^r` by the degree-7 polynomial of
    /// [`expc`], times `2^n` as two normal factors (`n` in `[-126, 128]`). Needs AVX2
    /// and FMA.
    #[inline(always)]
    unsafe fn exp_clamped_256(xc: __m256) -> __m256 {
        use expc::*;
        // SAFETY: the caller runs with AVX2 + FMA; pure register arithmetic.
        unsafe {
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(P0);
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
            let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
            let y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
            let ni = _mm256_cvtps_epi32(n);
            let na = _mm256_srai_epi32::<1>(ni);
            let nb = _mm256_sub_epi32(ni, na);
            let bias = _mm256_set1_epi32(127);
            let pa = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(na, bias)));
            let pb = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(nb, bias)));
            _mm256_mul_ps(_mm256_mul_ps(y, pa), pb)
        }
    }

    /// [`exp_clamped_256`]'s `(e^r, n)` in 16 lanes, for `_mm512_scalef_ps(e^r, n)`.
    /// Needs AVX-512F.
    #[inline(always)]
    unsafe fn exp_clamped_512(xc: __m512) -> (__m512, __m512) {
        use expc::*;
        // SAFETY: the caller runs with AVX-512F; pure register arithmetic.
        unsafe {
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(P0);
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
            let y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
            (_mm512_add_ps(y, _mm512_set1_ps(1.0)), n)
        }
    }

    /// AVX2 + FMA token (8 lanes). Constructed only when the CPU has both.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// The token, if the CPU supports AVX2 and FMA.
        pub(crate) fn new() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
                .then_some(Avx2(()))
        }
    }

    /// AVX-512F token (16 lanes; AVX2 and FMA implied). Constructed only when the CPU
    /// has AVX-512F, AVX2 and FMA.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx512(());

    impl Avx512 {
        /// The token, if the CPU supports AVX-512F (and AVX2, FMA).
        pub(crate) fn new() -> Option<Self> {
            (is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma"))
            .then_some(Avx512(()))
        }
    }

    // Every `unsafe` block below whose only obligation is "the CPU supports the
    // instructions" is justified by the token: an `Avx2` / `Avx512` value exists only
    // after runtime detection succeeded (the constructors above are the only ones).

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        type M = __m256i;

        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: token => AVX available.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn zero(self) -> __m256 {
            // SAFETY: token => AVX available.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn mask(self, n: usize) -> __m256i {
            let n = n.min(8) as i32;
            // SAFETY: token => AVX2 available.
            unsafe {
                _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(n),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                )
            }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            // SAFETY: token => AVX; the caller guarantees 8 readable f32 (unaligned ok).
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_masked(self, p: *const f32, m: __m256i) -> __m256 {
            // SAFETY: token => AVX; masked-off lanes are neither read nor fault, the
            // selected ones are readable by the caller's contract.
            unsafe { _mm256_maskload_ps(p, m) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            // SAFETY: token => AVX; the caller guarantees 8 writable f32.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, v: __m256, m: __m256i) {
            // SAFETY: token => AVX; only the selected (writable) lanes are written.
            unsafe { _mm256_maskstore_ps(p, m, v) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: token => FMA available.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: token => AVX available.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: token => AVX available.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: token => AVX available.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: token => AVX available. `vmaxps a, b` returns `b` unless `a > b`.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn hsum(self, v: __m256) -> f32 {
            // SAFETY: token => AVX available.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn hmax(self, v: __m256) -> f32 {
            // SAFETY: token => AVX available.
            unsafe {
                let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn exp(self, x: __m256) -> __m256 {
            use expc::*;
            // SAFETY: token => AVX2 + FMA available; pure register arithmetic.
            unsafe {
                let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
                let e = exp_clamped_256(xc);
                let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO));
                let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(HI));
                let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
                let e = _mm256_andnot_ps(under, e);
                let e = _mm256_blendv_ps(e, _mm256_set1_ps(f32::INFINITY), over);
                _mm256_blendv_ps(e, x, nan)
            }
        }

        #[inline(always)]
        fn exp_nonpos(self, x: __m256) -> __m256 {
            use expc::*;
            // SAFETY: token => AVX2 + FMA available; pure register arithmetic.
            unsafe {
                // `exp` for x <= 0: no upper clamp or overflow blend, and a NaN flows
                // through the arithmetic (the max keeps its NaN second operand).
                let e = exp_clamped_256(_mm256_max_ps(_mm256_set1_ps(LO), x));
                let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO));
                _mm256_andnot_ps(under, e)
            }
        }

        #[inline(always)]
        fn transpose_sum(self, v: &[__m256]) -> __m256 {
            // SAFETY: token => AVX available.
            unsafe { transpose_fold_256!(v, _mm256_add_ps) }
        }

        #[inline(always)]
        fn transpose_max(self, v: &[__m256]) -> __m256 {
            // SAFETY: token => AVX available.
            unsafe { transpose_fold_256!(v, _mm256_max_ps) }
        }

        #[inline(always)]
        unsafe fn pack_bt(
            self,
            b: *const f32,
            ldb: usize,
            rows: usize,
            kc: usize,
            panel: *mut f32,
            nr: usize,
        ) {
            // 8 x 8 blocks transposed in registers; ragged edges go through masks.
            let mut j = 0;
            while j < nr {
                let nrows = rows.saturating_sub(j).min(8);
                let mut k = 0;
                while k < kc {
                    let kn = (kc - k).min(8);
                    let m = self.mask(kn);
                    let mut r = [self.zero(); 8];
                    for (i, ri) in r.iter_mut().enumerate().take(nrows) {
                        // SAFETY: row `j + i < rows` and lanes `k .. k + kn <= kc` lie
                        // inside the caller's readable block.
                        *ri = unsafe { self.load_masked(b.add((j + i) * ldb + k), m) };
                    }
                    let t = transpose8(self, r);
                    for (kk, tk) in t.iter().enumerate().take(kn) {
                        // SAFETY: `(k + kk) * nr + j + 8 <= kc * nr` because `nr` is a
                        // multiple of 8 and `j + 8 <= nr`: inside the caller's panel.
                        unsafe { self.store(panel.add((k + kk) * nr + j), *tk) };
                    }
                    k += 8;
                }
                j += 8;
            }
        }

        // decode
        #[inline(always)]
        unsafe fn load_bf16(self, p: *const u16) -> __m256 {
            // SAFETY: token => AVX2; the caller guarantees 8 readable u16 (16 bytes).
            unsafe {
                let h = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        unsafe fn load_f16(self, p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable u16 and that the CPU has F16C.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        #[inline(always)]
        fn prefetch(self, p: *const u8) {
            // SAFETY: a prefetch never faults, whatever the address (SSE, implied).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }
        #[inline(always)]
        fn prefetch_l2(self, p: *const u8) {
            // SAFETY: as `prefetch`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
    }

    /// Transposes 8 rows of 8 lanes.
    #[inline(always)]
    fn transpose8(_t: Avx2, r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: only reachable with an `Avx2` token => AVX available.
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        type M = __mmask16;

        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn zero(self) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn mask(self, n: usize) -> __mmask16 {
            if n >= 16 {
                0xFFFF
            } else {
                ((1u32 << n) - 1) as __mmask16
            }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            // SAFETY: token => AVX-512F; the caller guarantees 16 readable f32.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_masked(self, p: *const f32, m: __mmask16) -> __m512 {
            // SAFETY: token => AVX-512F; masked-off lanes are neither read nor fault.
            unsafe { _mm512_maskz_loadu_ps(m, p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m512) {
            // SAFETY: token => AVX-512F; the caller guarantees 16 writable f32.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, v: __m512, m: __mmask16) {
            // SAFETY: token => AVX-512F; only the selected (writable) lanes are written.
            unsafe { _mm512_mask_storeu_ps(p, m, v) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: token => AVX-512F available. `vmaxps a, b` returns `b` unless
            // `a > b`.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn hsum(self, v: __m512) -> f32 {
            // SAFETY: token => AVX-512F available.
            unsafe {
                let h = _mm256_add_ps(
                    _mm512_castps512_ps256(v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                );
                let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn hmax(self, v: __m512) -> f32 {
            // SAFETY: token => AVX-512F available.
            unsafe {
                let h = _mm256_max_ps(
                    _mm512_castps512_ps256(v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                );
                let s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn exp(self, x: __m512) -> __m512 {
            use expc::*;
            // SAFETY: token => AVX-512F available; pure register arithmetic.
            unsafe {
                let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
                let (y, n) = exp_clamped_512(xc);
                // y * 2^n, exact, with correct overflow (n <= 128).
                let e = _mm512_scalef_ps(y, n);
                let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(LO));
                let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(HI));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
                let e = _mm512_maskz_mov_ps(!under, e);
                let e = _mm512_mask_mov_ps(e, over, _mm512_set1_ps(f32::INFINITY));
                _mm512_mask_mov_ps(e, nan, x)
            }
        }

        #[inline(always)]
        fn exp_nonpos(self, x: __m512) -> __m512 {
            use expc::*;
            // SAFETY: token => AVX-512F available; pure register arithmetic.
            unsafe {
                // `exp` for x <= 0: no upper clamp or overflow blend, and a NaN flows
                // through the arithmetic (the max keeps its NaN second operand).
                let (y, n) = exp_clamped_512(_mm512_max_ps(_mm512_set1_ps(LO), x));
                let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(LO));
                _mm512_maskz_scalef_ps(!under, y, n)
            }
        }

        #[inline(always)]
        fn transpose_sum(self, v: &[__m512]) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { transpose_fold_512!(v, _mm512_add_ps) }
        }

        #[inline(always)]
        fn transpose_max(self, v: &[__m512]) -> __m512 {
            // SAFETY: token => AVX-512F available.
            unsafe { transpose_fold_512!(v, _mm512_max_ps) }
        }

        #[inline(always)]
        unsafe fn pack_bt(
            self,
            b: *const f32,
            ldb: usize,
            rows: usize,
            kc: usize,
            panel: *mut f32,
            nr: usize,
        ) {
            // 16 x 16 blocks transposed in registers; ragged edges go through masks.
            let mut j = 0;
            while j < nr {
                let nrows = rows.saturating_sub(j).min(16);
                let mut k = 0;
                if nrows == 16 {
                    // Whole blocks: straight-line loads, transpose, stores.
                    while k + 16 <= kc {
                        let mut r = [self.zero(); 16];
                        for (i, ri) in r.iter_mut().enumerate() {
                            // SAFETY: rows `j .. j + 16 <= rows`, columns `k .. k + 16 <=
                            // kc` are inside the caller's readable block.
                            *ri = unsafe { self.load(b.add((j + i) * ldb + k)) };
                        }
                        let t = transpose16(self, r);
                        for (kk, tk) in t.into_iter().enumerate() {
                            // SAFETY: `(k + kk) * nr + j + 16 <= kc * nr`: in the panel.
                            unsafe { self.store(panel.add((k + kk) * nr + j), tk) };
                        }
                        k += 16;
                    }
                }
                while k < kc {
                    let kn = (kc - k).min(16);
                    let m = self.mask(kn);
                    let mut r = [self.zero(); 16];
                    for (i, ri) in r.iter_mut().enumerate().take(nrows) {
                        // SAFETY: row `j + i < rows` and lanes `k .. k + kn <= kc` lie
                        // inside the caller's readable block.
                        *ri = unsafe { self.load_masked(b.add((j + i) * ldb + k), m) };
                    }
                    let t = transpose16(self, r);
                    for (kk, tk) in t.iter().enumerate().take(kn) {
                        // SAFETY: `(k + kk) * nr + j + 16 <= kc * nr` because `nr` is a
                        // multiple of 16 and `j + 16 <= nr`: inside the caller's panel.
                        unsafe { self.store(panel.add((k + kk) * nr + j), *tk) };
                    }
                    k += 16;
                }
                j += 16;
            }
        }

        // decode
        #[inline(always)]
        unsafe fn load_bf16(self, p: *const u16) -> __m512 {
            // SAFETY: token => AVX-512F; the caller guarantees 16 readable u16 (32 bytes).
            unsafe {
                let h = _mm256_loadu_si256(p.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        unsafe fn load_f16(self, p: *const u16) -> __m512 {
            // SAFETY: token => AVX-512F (its `vcvtph2ps`); 16 readable u16 (caller).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
        #[inline(always)]
        fn prefetch(self, p: *const u8) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }
        #[inline(always)]
        fn prefetch_l2(self, p: *const u8) {
            // SAFETY: as `prefetch`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
    }

    /// Transposes 16 rows of 16 lanes.
    #[inline(always)]
    fn transpose16(_t: Avx512, r: [__m512; 16]) -> [__m512; 16] {
        // SAFETY: only reachable with an `Avx512` token => AVX-512F available.
        unsafe {
            // Stage 1: interleave pairs of rows (32-bit elements).
            let mut t = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            // Stage 2: 64-bit pairs -> 4 x 4 blocks transposed inside each 128-bit lane.
            let mut u = [_mm512_setzero_ps(); 16];
            for i in 0..4 {
                let (a0, a1, b0, b1) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
                u[4 * i] = _mm512_shuffle_ps::<0x44>(a0, b0);
                u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a0, b0);
                u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(a1, b1);
                u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(a1, b1);
            }
            // u[4i + c] holds, in 128-bit lane L, column 4L + c of rows 4i .. 4i + 4.
            // Stage 3: gather 128-bit lanes. v[c + 4p] (p in 0..2) combines rows
            // 0..8 (p = 0) or 8..16 (p = 1) for lanes (0, 1) and (2, 3)...
            let mut v = [_mm512_setzero_ps(); 16];
            for c in 0..4 {
                // rows 0..4 with rows 4..8: lanes {0,1} of each, then {2,3}.
                v[c] = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
                v[4 + c] = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
                v[8 + c] = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
                v[12 + c] = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
            }
            // v[c]: [rows0-3 L0, rows0-3 L1, rows4-7 L0, rows4-7 L1] for column c.
            // Stage 4: final 128-bit lane selection.
            let mut o = [_mm512_setzero_ps(); 16];
            for c in 0..4 {
                // column c (lane 0): rows 0-3 L0, rows 4-7 L0, rows 8-11 L0, rows 12-15 L0
                o[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
                // column 4 + c (lane 1)
                o[4 + c] = _mm512_shuffle_f32x4::<0xDD>(v[c], v[8 + c]);
                // column 8 + c (lane 2)
                o[8 + c] = _mm512_shuffle_f32x4::<0x88>(v[4 + c], v[12 + c]);
                // column 12 + c (lane 3)
                o[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v[4 + c], v[12 + c]);
            }
            o
        }
    }
}
