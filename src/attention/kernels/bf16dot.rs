//! bf16 tile products: `vdpbf16ps` (AVX512_BF16) as the multiply-accumulate step of the
//! tile GEMMs of `gemm.rs`, and the roundings that make their operands.
//!
//! `vdpbf16ps acc, a, b` adds to each f32 lane `t` of `acc` the two products
//! `a[2t] b[2t] + a[2t+1] b[2t+1]` of bf16 pairs (each product of two bf16 is exact in
//! f32). So the operands are *pair matrices*: two bf16 that are summed together share
//! one 32-bit slot, the lower half the even element. A pair matrix is stored in f32
//! memory and handed to the GEMMs as a [`MatRef`] whose columns count pairs; the
//! kernels only move its bits (loads, broadcasts, the packing transpose), never treat
//! them as numbers.
//!
//! - `Q K^T`: rows of the rotated queries and keys rounded to bf16 along the head dim
//!   ([`round_pairs`]); the keys are then packed like f32 keys (a panel of 32 keys by
//!   `ceil(d / 2)` pairs), so [`qk_packed`] is the f32 packed-key GEMM with `vdpbf16ps`.
//! - `P V`: the probabilities rounded along the key axis (a row of `P` is a pair
//!   matrix row as it stands), and the values interleaved two key rows at a time
//!   ([`pair_rows`]: slot `c` of pair row `r` holds `(V[2r, c], V[2r+1, c])`).
//!
//! Rounding is to nearest even (`vcvtne2ps2bf16`); odd lengths are padded with a zero
//! bf16, which adds nothing. On the AMD Zen 4 core this was written on, `vdpbf16ps`
//! runs at 1.9-2.0x the f32 FLOP rate of `vfmadd231ps` (228-236 against 114-126 GFLOP/s in
//! register-only loops); on an Intel Xeon family 6 model 167 it ran at 0.5x (116 against
//! 229), so [`super::Kernels::bf16_products_pay`] measures it before the tiled kernel
//! uses it by default.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

/// Rounds an f32 to bf16 (bit pattern), to nearest even; a NaN stays a (quiet) NaN.
/// The scalar twin of the vector rounding (which also flushes subnormal inputs to
/// zero; bf16 subnormals are below `1.2e-38`).
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// Two bf16 as the bits of one f32 slot of a pair matrix (`lo` the even element).
#[inline(always)]
pub(crate) fn pair(lo: u16, hi: u16) -> f32 {
    f32::from_bits(u32::from(lo) | (u32::from(hi) << 16))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::gemm::{self, Mac};
    use super::super::simd::{Avx512, Simd};
    use super::super::{MatMut, MatRef};
    use super::{f32_to_bf16, pair};

    /// AVX-512 BF16 token: constructed only when the CPU has AVX-512F and BW,
    /// AVX512_BF16, AVX2 and FMA.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Bf16Dot {
        avx: Avx512,
    }

    impl Bf16Dot {
        /// The token, if the CPU has the instructions.
        pub(crate) fn new() -> Option<Self> {
            let avx = Avx512::new()?;
            (is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16"))
                .then_some(Bf16Dot { avx })
        }
    }

    // Every `unsafe` block below whose only obligation is "the CPU supports the
    // instructions" is justified by the token (see `Bf16Dot::new`).

    /// `vdpbf16ps` as the GEMMs' multiply-accumulate: the lanes of `a` and `b` are bf16
    /// pairs (`a` one pair splatted in the tile GEMMs), `acc` f32.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct DotBf16(pub(crate) Bf16Dot);

    impl Bf16Dot {
        /// The AVX-512 token this one extends.
        pub(crate) fn avx(self) -> Avx512 {
            self.avx
        }
    }

    impl Mac<Avx512> for DotBf16 {
        /// The two products of a pair slot, each exact in f32, added to `acc` in f32.
        #[inline(always)]
        fn scalar(self, a: f32, b: f32, acc: f32) -> f32 {
            let (a, b) = (a.to_bits(), b.to_bits());
            let half = |x: u32| f32::from_bits(x << 16);
            let (lo, hi) = (half(a) * half(b), half(a >> 16) * half(b >> 16));
            acc + lo + hi
        }

        #[inline(always)]
        fn mac(self, _s: Avx512, a: __m512, b: __m512, acc: __m512) -> __m512 {
            // SAFETY: the token => AVX512_BF16; the casts reinterpret 512 bits.
            unsafe {
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512, __m512bh>(a),
                    std::mem::transmute::<__m512, __m512bh>(b),
                )
            }
        }
    }

    /// `S = scale * A K^T` for pair matrices `A` (`[m, ceil(d/2)]`) and packed pair keys,
    /// as [`gemm::qk_packed`]; the register block of the f32 AVX-512 path.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(crate) fn qk_packed(t: Bf16Dot, a: MatRef<'_>, panels: &[f32], c: MatMut<'_>, sc: f32) {
        gemm::qk_packed::<Avx512, _, 8, 2, 1>(t.avx, DotBf16(t), a, panels, c, sc)
    }

    /// `O += P V` for pair matrices `P` (`[m, ceil(k/2)]`) and `V` (`[ceil(k/2), dv]`),
    /// as [`gemm::pv`]; the register block of the f32 AVX-512 path.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(crate) fn pv(t: Bf16Dot, p: MatRef<'_>, v: MatRef<'_>, o: MatMut<'_>) {
        gemm::pv::<Avx512, _, 4, 4, false>(t.avx, DotBf16(t), p, v, o)
    }

    /// Rounds `x[..n]` to bf16 in place as a pair-matrix row: afterwards slot `s <
    /// ceil(n / 2)` holds `(x[2s], x[2s + 1])` (`0` past `n`). Slots from `ceil(n / 2)`
    /// on keep what they held. Requires `n <= x.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(crate) fn round_pairs(t: Bf16Dot, x: &mut [f32], n: usize) {
        assert!(n <= x.len(), "round_pairs within the row");
        let p = x.as_mut_ptr();
        let mut i = 0;
        // 32 values (16 slots) at a time: both loads come before the store, and the
        // store ends at slot `i/2 + 16 <= i + 16`, never past the values still to read.
        while i + 32 <= n {
            // SAFETY: the token => AVX-512F/BF16; `i + 32 <= n <= x.len()`.
            unsafe {
                let lo = t.avx.load(p.add(i));
                let hi = t.avx.load(p.add(i + 16));
                let b = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(
                    p.add(i / 2).cast(),
                    std::mem::transmute::<__m512bh, __m512i>(b),
                );
            }
            i += 32;
        }
        // The tail in scalar (at most 31 values): slot by slot, left to right, each
        // reading only values at or after its own index.
        let mut s = i / 2;
        while i < n {
            let lo = f32_to_bf16(x[i]);
            let hi = if i + 1 < n { f32_to_bf16(x[i + 1]) } else { 0 };
            x[s] = pair(lo, hi);
            s += 1;
            i += 2;
        }
    }

    /// The pair row of two value rows: `out[c] = (r0[c], r1[c])` rounded to bf16 (`r1 =
    /// None`: a zero second element), for `c < out.len()`; `r0` and `r1` hold at least
    /// `out.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(crate) fn pair_rows(t: Bf16Dot, r0: &[f32], r1: Option<&[f32]>, out: &mut [f32]) {
        let n = out.len();
        assert!(
            r0.len() >= n && r1.is_none_or(|r| r.len() >= n),
            "pair_rows lengths"
        );
        // Words 0..16 from r0, 16..32 from r1: interleave them.
        const IDX: [u16; 32] = {
            let mut idx = [0u16; 32];
            let mut c = 0;
            while c < 16 {
                idx[2 * c] = c as u16;
                idx[2 * c + 1] = (c + 16) as u16;
                c += 1;
            }
            idx
        };
        let mut c = 0;
        // SAFETY: the token => AVX-512F/BW/BF16; `c + 16 <= n` for every access, and
        // `IDX` is 64 readable bytes.
        unsafe {
            let idx = _mm512_loadu_si512(IDX.as_ptr().cast());
            while c + 16 <= n {
                let a = t.avx.load(r0.as_ptr().add(c));
                let b = match r1 {
                    Some(r1) => t.avx.load(r1.as_ptr().add(c)),
                    None => t.avx.zero(),
                };
                let words = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
                let pairs = _mm512_permutexvar_epi16(idx, words);
                _mm512_storeu_si512(out.as_mut_ptr().add(c).cast(), pairs);
                c += 16;
            }
        }
        for (i, o) in out.iter_mut().enumerate().skip(c) {
            let hi = r1.map_or(0, |r| f32_to_bf16(r[i]));
            *o = pair(f32_to_bf16(r0[i]), hi);
        }
    }

    /// `C` independent chains of `vdpbf16ps` for `iters` rounds: `iters * C * 64`
    /// flops (16 lanes, two products and two sums each); returns a value that depends
    /// on every chain. Timed against the FMA loop by
    /// [`super::super::Kernels::bf16_products_pay`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(crate) fn dot_loop(t: Bf16Dot, iters: u64) -> f32 {
        // Not `peak::fma_loop` with another step: its chains run through the
        // multiplicand (`x = x a + b`, measured 6% faster on the Zen 4 core than through
        // the addend), while `vdpbf16ps` can chain only through its accumulator.
        let s = t.avx;
        // Products of 2^-10 keep every chain finite and normal for any `iters` timed.
        let a = s.splat(pair(0x3a80, 0x3a80));
        let mut acc = [s.zero(); DOT_CHAINS];
        for (i, x) in acc.iter_mut().enumerate() {
            *x = s.splat(1.0 + i as f32);
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = DotBf16(t).mac(s, a, a, *x);
            }
        }
        let mut sum = s.zero();
        for x in acc {
            sum = s.add(sum, x);
        }
        s.hsum(sum)
    }

    /// Chains of [`dot_loop`].
    pub(crate) const DOT_CHAINS: usize = 16;
}

/// Stands in for the token off x86-64, where no CPU has the instructions: no value of
/// it exists.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bf16Dot {}

#[cfg(not(target_arch = "x86_64"))]
impl Bf16Dot {
    pub(crate) fn new() -> Option<Self> {
        None
    }
}
