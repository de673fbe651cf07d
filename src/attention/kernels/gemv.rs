//! Decode GEMVs, written once against [`Simd`] and a storage format [`Widen`]: a GQA
//! group of `G <= 8` queries against many stored keys or values, read in their storage
//! type (f32, bf16 or f16) and widened to f32 in registers as they are loaded.
//!
//! - [`qk`]: `S = scale * Q K^T`. Dot products along the head dim: a block of `G`
//!   queries by `R` keys holds `G * R` vector accumulators; each key vector is loaded
//!   (and widened) once and used by the `G` queries, so K is streamed exactly once.
//!   The `G * R` accumulators are reduced `LANES` at a time by
//!   [`Simd::transpose_sum`] (one reduction per block, amortised over the head dim).
//! - [`pv`]: `O += P V`. A block of `G` rows of O by `NV` vectors of columns is held in
//!   registers over [`PV_KC`] rows of V; each value vector is loaded (and widened)
//!   once per column block and used by the `G` rows. The V rows of a k-block stay in
//!   L1 between its column blocks, so V is streamed from memory once.
//!
//! Widening: bf16 by zero-extending to 32 bits and shifting left by 16 (exact), f16 by
//! `vcvtph2ps` (exact) — no round trip through a scratch tile. Every product and sum is
//! f32 (fused multiply-adds on the SIMD paths), as with f32 storage.
//!
//! Both kernels software-prefetch [`PREFETCH`] bytes ahead of the rows they stream, into L2.
//! Ragged tails (a head dim or value dim that is not a whole number of vectors) are
//! summed in scalar f32, which keeps the accumulators of the main loops in registers
//! (a partial load through a stack copy made LLVM spill them).

use super::gemm::Mac;
use super::simd::Simd;

/// Bytes ahead of the current row that the GEMVs prefetch, into L2 ([`Simd::prefetch_l2`]).
///
/// Distance, measured on one Zen 5 core (L = 32768, G = 4, d = 128, `prefetcht0`): no
/// prefetch 8.2-9.8 ms bf16 / 21 ms f32 a step, 4 KiB 5-6 / 10.6-12.8, 8 KiB 4.4 /
/// 9.0-10.0, 16 KiB 4.4 / 10.2, 32 KiB 4.6-4.9 / 10.8-11.6.
///
/// Hint, measured on one Zen 4 core (AMD EPYC family 25 model 17; same shape, 8 KiB,
/// five alternating processes each): `prefetcht0` 21.8 ms f32 / 15.7 ms bf16 median a
/// step, `prefetcht1` 19.4 / 12.5; 4 and 16 KiB with `prefetcht1` within the noise of
/// 8 KiB. Per GEMV against a plain sum of the same bytes in the same process
/// (`prefetcht1`): G = 1 `qk` 0.90-0.95 and `pv` 1.0 of its bandwidth, G = 4 0.75-0.80
/// (`prefetcht0`: 0.54-0.94 and 0.55-0.80). An Intel Xeon (family 6 model 167) also
/// measured `prefetcht1` 5-8% faster.
const PREFETCH: usize = 8192;

/// Rows of V per `pv` k-block: `PV_KC` rows of `dv = 128` f32 are 32 KiB (L1).
pub(crate) const PV_KC: usize = 64;

/// A storage format of keys and values, and how a vector of it is loaded as f32.
pub(crate) trait Widen: Copy {
    /// The stored element (f32, or the bits of a bf16 / f16).
    type E: Copy + Default;
    /// Loads `S::LANES` elements at `p` as f32.
    ///
    /// # Safety
    /// `p .. p + S::LANES` readable, and the CPU has what [`Simd::load_f16`] needs for
    /// f16.
    unsafe fn load<S: Simd>(self, s: S, p: *const Self::E) -> S::V;

    /// One element as f32 (the tails of rows shorter than a vector).
    ///
    /// bf16 and f16 widen with `simd`'s bit-level conversions rather than the `half`
    /// crate's: `half` is an optional dependency and these kernels are built without it
    /// (the decode dispatch names every storage format in every build). The kernel tests
    /// check the conversions against `half` for every 16-bit pattern.
    fn scalar(self, e: Self::E) -> f32;
}

/// f32 storage: loaded as is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct F32;

/// bf16 storage (bits): zero-extended and shifted left by 16.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bf16;

/// f16 storage (bits): IEEE half to single.
#[derive(Debug, Clone, Copy)]
pub(crate) struct F16;

impl Widen for F32 {
    type E = f32;
    #[inline(always)]
    unsafe fn load<S: Simd>(self, s: S, p: *const f32) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { s.load(p) }
    }
    #[inline(always)]
    fn scalar(self, e: f32) -> f32 {
        e
    }
}

impl Widen for Bf16 {
    type E = u16;
    #[inline(always)]
    unsafe fn load<S: Simd>(self, s: S, p: *const u16) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { s.load_bf16(p) }
    }
    #[inline(always)]
    fn scalar(self, e: u16) -> f32 {
        super::simd::bf16_to_f32(e)
    }
}

impl Widen for F16 {
    type E = u16;
    #[inline(always)]
    unsafe fn load<S: Simd>(self, s: S, p: *const u16) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { s.load_f16(p) }
    }
    #[inline(always)]
    fn scalar(self, e: u16) -> f32 {
        super::simd::f16_to_f32(e)
    }
}

/// bf16 storage read as pairs (`vdpbf16ps` operands): one 32-bit slot holds elements
/// `2s` (low half) and `2s + 1` of a row, loaded as they lie in memory; a row of `d`
/// (even) bf16 is `d / 2` slots. `scalar` returns a slot's bits as an f32, for
/// [`Mac::scalar`] of [`super::bf16dot::DotBf16`] to split.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bf16Pairs;

impl Widen for Bf16Pairs {
    type E = [u16; 2];
    #[inline(always)]
    unsafe fn load<S: Simd>(self, s: S, p: *const [u16; 2]) -> S::V {
        // SAFETY: forwarded contract (`LANES` slots of 4 bytes).
        unsafe { s.load(p.cast()) }
    }
    #[inline(always)]
    fn scalar(self, e: [u16; 2]) -> f32 {
        f32::from_bits(u32::from(e[0]) | (u32::from(e[1]) << 16))
    }
}

/// Prefetches the `bytes` following `p + PREFETCH`, one hint per 64-byte line.
#[inline(always)]
fn prefetch_ahead<S: Simd, E>(s: S, p: *const E, bytes: usize) {
    let p = p.cast::<u8>().wrapping_add(PREFETCH);
    let mut off = 0;
    while off < bytes {
        s.prefetch_l2(p.wrapping_add(off));
        off += 64;
    }
}

/// `out[gq * ldo + j] = scale * q[gq] . k[j]` for `G` queries (`q`, stride `ldq`) and
/// `n` keys (`k`, stride `ldk`), head dim `d`, each product and sum by `m` (f32 fused
/// multiply-adds, or `vdpbf16ps` on pair slots, where `d` counts slots).
///
/// # Safety
/// `q` readable for `G` rows of `d` f32 (stride `ldq`), `k` for `n` rows of `d`
/// elements (stride `ldk`), `out` writable at `gq * ldo + j` for `gq < G`, `j < n`; the
/// CPU has what `W` needs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn qk<S: Simd, W: Widen, M: Mac<S>, const G: usize, const R: usize>(
    s: S,
    w: W,
    m: M,
    q: *const f32,
    ldq: usize,
    k: *const W::E,
    ldk: usize,
    n: usize,
    d: usize,
    out: *mut f32,
    ldo: usize,
    scale: f32,
) {
    if n == 0 {
        return;
    }
    if d == 0 {
        for gq in 0..G {
            for j in 0..n {
                // SAFETY: in the caller's output range.
                unsafe { *out.add(gq * ldo + j) = 0.0 };
            }
        }
        return;
    }
    let dims = (d / S::LANES, d % S::LANES);
    let row_bytes = d * std::mem::size_of::<W::E>();
    let mut j = 0;
    while j + R <= n {
        // SAFETY: rows `j .. j + R <= n` of K and columns `j .. j + R` of `out`.
        unsafe {
            let kj = k.add(j * ldk);
            if ldk == d {
                prefetch_ahead(s, kj, R * row_bytes);
            }
            qk_block::<S, W, M, G, R>(s, w, m, q, ldq, kj, ldk, dims, out.add(j), ldo, scale);
        }
        j += R;
    }
    while j < n {
        // SAFETY: as above, for the single row `j < n`.
        unsafe {
            qk_block::<S, W, M, G, 1>(
                s,
                w,
                m,
                q,
                ldq,
                k.add(j * ldk),
                ldk,
                dims,
                out.add(j),
                ldo,
                scale,
            )
        };
        j += 1;
    }
}

/// `out[gq, r] = scale * q[gq] . k[r]` for `G` queries and `R` keys; the head dim is
/// `full` whole vectors plus `rem` more lanes.
///
/// # Safety
/// As [`qk`], for `R` rows of K.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_block<S: Simd, W: Widen, M: Mac<S>, const G: usize, const R: usize>(
    s: S,
    w: W,
    m: M,
    q: *const f32,
    ldq: usize,
    k: *const W::E,
    ldk: usize,
    (full, rem): (usize, usize),
    out: *mut f32,
    ldo: usize,
    scale: f32,
) {
    let mut acc = [[s.zero(); R]; G];
    // SAFETY: whole steps read lanes `c * LANES .. (c + 1) * LANES <= full * LANES`,
    // the tail the `rem` lanes after them: inside each row of `d`.
    unsafe {
        for c in 0..full {
            let off = c * S::LANES;
            let mut kv = [s.zero(); R];
            for (r, x) in kv.iter_mut().enumerate() {
                *x = w.load(s, k.add(r * ldk + off));
            }
            for (gq, row) in acc.iter_mut().enumerate() {
                let qv = s.load(q.add(gq * ldq + off));
                for (x, kr) in row.iter_mut().zip(kv) {
                    *x = m.mac(s, qv, kr, *x);
                }
            }
        }
    }
    // The last `rem` head dims in scalar f32 (no partial vector loads of 16-bit data,
    // and no copy through memory that would keep `acc` out of registers).
    let mut tails = [[0f32; R]; G];
    if rem > 0 {
        let off = full * S::LANES;
        for (gq, row) in tails.iter_mut().enumerate() {
            for (r, t) in row.iter_mut().enumerate() {
                for i in off..off + rem {
                    // SAFETY: head dim `i < d` of query `gq` and key `r`.
                    let (qx, kx) = unsafe { (*q.add(gq * ldq + i), *k.add(r * ldk + i)) };
                    *t = m.scalar(qx, w.scalar(kx), *t);
                }
            }
        }
    }
    // Horizontal sums, LANES accumulators at a time (accumulator `f` is query `f / R`,
    // key `f % R`), zero-padded to whole groups. The accumulators are first copied out
    // with constant indices only (fully unrolled), so that they live in registers in
    // the loop above: a run-time index into `acc` would keep it in memory.
    const { assert!(G * R <= 32) };
    let mut flat = [s.zero(); 32];
    for (gq, row) in acc.iter().enumerate() {
        for (r, &x) in row.iter().enumerate() {
            flat[gq * R + r] = x;
        }
    }
    let l = S::LANES;
    let sc = s.splat(scale);
    let mut f0 = 0;
    while f0 < G * R {
        let mut group = [s.zero(); 16];
        for (x, f) in group.iter_mut().take(l).zip(f0..G * R) {
            *x = flat[f];
        }
        let mut sums = [0f32; 16];
        // SAFETY: `sums` holds 16 >= LANES f32.
        unsafe { s.store(sums.as_mut_ptr(), s.mul(s.transpose_sum(&group[..l]), sc)) };
        for (f, &x) in (f0..G * R).zip(&sums[..l]) {
            let x = if rem > 0 {
                x + tails[f / R][f % R] * scale
            } else {
                x
            };
            // SAFETY: `out` is writable at `gq * ldo + r` for `gq < G`, `r < R`.
            unsafe { *out.add((f / R) * ldo + f % R) = x };
        }
        f0 += l;
    }
}

/// `O += P V` for `G` rows: `p` (`G x n`, stride `ldp`), `v` (`n x dv` elements, stride
/// `ldv`), `o` (`G x dv`, stride `ldo`); `NV` vectors of columns per register block.
///
/// # Safety
/// `p` readable for `G` rows of `n` f32, `v` for `n` rows of `dv` elements, `o`
/// readable and writable for `G` rows of `dv` f32 (their strides); the CPU has what `W`
/// needs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv<S: Simd, W: Widen, const G: usize, const NV: usize>(
    s: S,
    w: W,
    p: *const f32,
    ldp: usize,
    v: *const W::E,
    ldv: usize,
    n: usize,
    dv: usize,
    o: *mut f32,
    ldo: usize,
) {
    if n == 0 || dv == 0 {
        return;
    }
    let l = S::LANES;
    let nr = NV * l;
    let row_bytes = dv * std::mem::size_of::<W::E>();
    for k0 in (0..n).step_by(PV_KC) {
        let kc = PV_KC.min(n - k0);
        // SAFETY (all calls): rows `k0 .. k0 + kc <= n` of V and columns `k0 ..` of P;
        // column ranges below stay inside `dv`.
        unsafe {
            let (pk, vk) = (p.add(k0), v.add(k0 * ldv));
            let mut c0 = 0;
            while c0 + nr <= dv {
                // The first column block streams the rows from memory: prefetch ahead.
                let pf = c0 == 0 && ldv == dv;
                pv_block::<S, W, G, NV>(
                    s,
                    w,
                    pk,
                    ldp,
                    vk.add(c0),
                    ldv,
                    kc,
                    o.add(c0),
                    ldo,
                    pf,
                    row_bytes,
                );
                c0 += nr;
            }
            while c0 + l <= dv {
                let pf = c0 == 0 && ldv == dv;
                pv_block::<S, W, G, 1>(
                    s,
                    w,
                    pk,
                    ldp,
                    vk.add(c0),
                    ldv,
                    kc,
                    o.add(c0),
                    ldo,
                    pf,
                    row_bytes,
                );
                c0 += l;
            }
            if c0 < dv {
                pv_tail::<S, W, G>(s, w, pk, ldp, vk.add(c0), ldv, kc, o.add(c0), ldo, dv - c0);
            }
        }
    }
}

/// One `G x (NV * LANES)` block of `O += P V` over `kc` rows.
///
/// # Safety
/// `p` readable for `G` rows of `kc`, `v` for `kc` rows of `NV * LANES` elements, `o`
/// readable and writable for `G` rows of `NV * LANES` f32 (their strides).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_block<S: Simd, W: Widen, const G: usize, const NV: usize>(
    s: S,
    w: W,
    p: *const f32,
    ldp: usize,
    v: *const W::E,
    ldv: usize,
    kc: usize,
    o: *mut f32,
    ldo: usize,
    prefetch: bool,
    row_bytes: usize,
) {
    let mut acc = [[s.zero(); NV]; G];
    // SAFETY: every offset stays inside the caller's ranges.
    unsafe {
        for (i, row) in acc.iter_mut().enumerate() {
            for (u, x) in row.iter_mut().enumerate() {
                *x = s.load(o.add(i * ldo + u * S::LANES));
            }
        }
        for k in 0..kc {
            let vk = v.add(k * ldv);
            if prefetch {
                prefetch_ahead(s, vk, row_bytes);
            }
            let mut bv = [s.zero(); NV];
            for (u, b) in bv.iter_mut().enumerate() {
                *b = w.load(s, vk.add(u * S::LANES));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let pi = s.splat(*p.add(i * ldp + k));
                for (x, b) in row.iter_mut().zip(bv) {
                    *x = s.fma(pi, b, *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (u, &x) in row.iter().enumerate() {
                s.store(o.add(i * ldo + u * S::LANES), x);
            }
        }
    }
}

/// The last `cols < LANES` columns of `O += P V` over `kc` rows.
///
/// # Safety
/// As [`pv_block`], for `cols` columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tail<S: Simd, W: Widen, const G: usize>(
    _s: S,
    w: W,
    p: *const f32,
    ldp: usize,
    v: *const W::E,
    ldv: usize,
    kc: usize,
    o: *mut f32,
    ldo: usize,
    cols: usize,
) {
    // Scalar f32: the ragged last columns of an odd `dv` only.
    // SAFETY: only the first `cols` elements of each row are read or written.
    unsafe {
        for i in 0..G {
            for c in 0..cols {
                let mut x = *o.add(i * ldo + c);
                for k in 0..kc {
                    x += *p.add(i * ldp + k) * w.scalar(*v.add(k * ldv + c));
                }
                *o.add(i * ldo + c) = x;
            }
        }
    }
}
