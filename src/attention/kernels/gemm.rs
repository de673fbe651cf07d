//! Tile GEMMs, written once against [`Simd`] (the decode GEMVs are in `gemv.rs`).
//!
//! - `qk`: `S = scale * A B^T`. B is packed, transposed, into panels of [`PANEL`] keys
//!   by up to `PANEL_KC` head dims (on the stack, or once for all keys with
//!   `pack_keys`); an `MR x NV` register block of S (`NV` vectors of `LANES` keys)
//!   accumulates `A[i, k] * panel[k, :]` (A broadcast from memory, panel loaded).
//! - `pv`: `O += P V`. V rows are already "k-major", so V is read in place; an
//!   `MR x NV` block of O is loaded, accumulated over `k` and stored.
//!
//! Both are generic over their multiply-accumulate step ([`Mac`]): [`Fma`] for f32
//! operands, or the bf16 dot product of `bf16dot.rs`, whose operands are pairs of bf16
//! in the bits of one f32 slot (a "pair matrix": its columns are pairs along the summed
//! axis), so the same loops, packing and register blocks serve both.

use std::mem::MaybeUninit;

use super::simd::Simd;
use super::{MatMut, MatRef};

/// The multiply-accumulate step of the tile GEMMs: `acc + a b` for `a`, one operand
/// element splatted to every lane, and `b`, a vector of the other operand.
pub(crate) trait Mac<S: Simd>: Copy {
    /// `acc + a b`, lane by lane, in the step's own arithmetic.
    fn mac(self, s: S, a: S::V, b: S::V, acc: S::V) -> S::V;

    /// One lane of [`Mac::mac`] in scalar code (the ragged tails of the decode GEMVs):
    /// `acc + a b` for f32 operands.
    #[inline(always)]
    fn scalar(self, a: f32, b: f32, acc: f32) -> f32 {
        acc + a * b
    }
}

/// f32 operands: one fused multiply-add per lane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fma;

impl<S: Simd> Mac<S> for Fma {
    #[inline(always)]
    fn mac(self, s: S, a: S::V, b: S::V, acc: S::V) -> S::V {
        s.fma(a, b, acc)
    }
}

/// Keys per packed panel, on every instruction set (so packed keys are portable
/// between them): a panel is `kc x PANEL` f32, key `jj` of head dim `kk` at
/// `kk * PANEL + jj`.
pub(crate) const PANEL: usize = 32;

/// f32 in the stack panel of `qk` (32 KiB): up to `PANEL_KC` head dims.
const PANEL_FLOATS: usize = 8192;
/// Head dims per stack panel.
const PANEL_KC: usize = PANEL_FLOATS / PANEL;

/// A cache-line aligned, uninitialised panel.
#[repr(C, align(64))]
struct Panel(MaybeUninit<[f32; PANEL_FLOATS]>);

/// Calls `$f::<S, M, R, ...>` with the run-time row count `$rows` (1..=8) as the const
/// `R`.
macro_rules! by_rows {
    ($rows:expr, $f:ident::<$s:ty, $m:ty, _ $(, $c:tt)*>($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $f::<$s, $m, 1 $(, $c)*>($($arg),*),
            2 => $f::<$s, $m, 2 $(, $c)*>($($arg),*),
            3 => $f::<$s, $m, 3 $(, $c)*>($($arg),*),
            4 => $f::<$s, $m, 4 $(, $c)*>($($arg),*),
            5 => $f::<$s, $m, 5 $(, $c)*>($($arg),*),
            6 => $f::<$s, $m, 6 $(, $c)*>($($arg),*),
            7 => $f::<$s, $m, 7 $(, $c)*>($($arg),*),
            8 => $f::<$s, $m, 8 $(, $c)*>($($arg),*),
            _ => unreachable!("register blocks have 1 to 8 rows"),
        }
    };
}

/// [`by_rows!`] with one more const argument, `FULL`, set to the run-time `$full`: whole
/// register blocks (`true`) use plain loads and stores, edge blocks masked ones.
macro_rules! by_rows_full {
    ($rows:expr, $full:expr, $f:ident::<$s:ty, $m:ty, _ $(, $c:tt)*>($($arg:expr),* $(,)?)) => {
        if $full {
            by_rows!($rows, $f::<$s, $m, _ $(, $c)*, true>($($arg),*))
        } else {
            by_rows!($rows, $f::<$s, $m, _ $(, $c)*, false>($($arg),*))
        }
    };
}

/// `S = scale * A B^T` with an `MR x (NV * LANES)` register block (`MR <= 8`,
/// `NV * LANES` dividing [`PANEL`]); B is packed one panel at a time on the stack.
#[inline(always)]
pub(crate) fn qk<S: Simd, M: Mac<S>, const MR: usize, const NV: usize, const U: usize>(
    s: S,
    mac: M,
    a: MatRef<'_>,
    b: MatRef<'_>,
    mut c: MatMut<'_>,
    scale: f32,
) {
    let (m, n, d) = (a.rows(), b.rows(), a.cols());
    debug_assert!(b.cols() == d && c.rows() == m && c.cols() == n);
    if m == 0 || n == 0 {
        return;
    }
    if d == 0 {
        zero_rows(&mut c);
        return;
    }
    let mut panel = Panel(MaybeUninit::uninit());
    let pp = panel.0.as_mut_ptr().cast::<f32>();
    let (bp, ldb) = (b.as_ptr(), b.stride());
    for j0 in (0..n).step_by(PANEL) {
        let ncols = PANEL.min(n - j0);
        let mut k0 = 0;
        while k0 < d {
            let kc = PANEL_KC.min(d - k0);
            // SAFETY: rows `j0 .. j0 + ncols <= n` and columns `k0 .. k0 + kc <= d` of B
            // are inside `b` (MatRef checked `(rows - 1) * stride + cols <= len`); the
            // panel holds `PANEL_KC * PANEL >= kc * PANEL` f32.
            unsafe { s.pack_bt(bp.add(j0 * ldb + k0), ldb, ncols, kc, pp, PANEL) };
            // SAFETY: the panel's first `kc * PANEL` f32 were just written; the column
            // range `j0 .. j0 + ncols` and head dims `k0 .. k0 + kc` are in bounds.
            unsafe {
                qk_panel::<S, M, MR, NV, U>(
                    (s, mac),
                    &a,
                    &mut c,
                    pp.cast_const(),
                    (k0, kc),
                    (j0, ncols),
                    (k0 > 0, (k0 + kc == d).then_some(scale)),
                )
            };
            k0 += kc;
        }
    }
}

/// Packs all of `k` (`[n, d]`) into `out`: `ceil(n / PANEL)` panels of `d x PANEL`,
/// zero-padded; `out` must hold exactly that many f32.
#[inline(always)]
pub(crate) fn pack_keys<S: Simd>(s: S, k: MatRef<'_>, out: &mut [f32]) {
    let (n, d) = (k.rows(), k.cols());
    assert_eq!(out.len(), n.div_ceil(PANEL) * PANEL * d);
    if n == 0 || d == 0 {
        // Nothing to pack (and `out` is empty); no pointer into `k` is formed.
        return;
    }
    let (kp, ldk) = (k.as_ptr(), k.stride());
    for (p, panel) in out.chunks_exact_mut(PANEL * d).enumerate() {
        let j0 = p * PANEL;
        let rows = PANEL.min(n - j0);
        // SAFETY: rows `j0 .. j0 + rows <= n` with `d` columns are inside `k`; `panel`
        // holds `d * PANEL` f32.
        unsafe { s.pack_bt(kp.add(j0 * ldk), ldk, rows, d, panel.as_mut_ptr(), PANEL) };
    }
}

/// `S = scale * A K^T` for the keys of packed panels `panels` (`d x PANEL` each, the
/// first one holding key column 0 of `c`).
#[inline(always)]
pub(crate) fn qk_packed<S: Simd, M: Mac<S>, const MR: usize, const NV: usize, const U: usize>(
    s: S,
    mac: M,
    a: MatRef<'_>,
    panels: &[f32],
    mut c: MatMut<'_>,
    scale: f32,
) {
    let (m, n, d) = (a.rows(), c.cols(), a.cols());
    assert!(panels.len() >= n.div_ceil(PANEL) * PANEL * d);
    if m == 0 || n == 0 {
        return;
    }
    if d == 0 {
        zero_rows(&mut c);
        return;
    }
    for j0 in (0..n).step_by(PANEL) {
        let ncols = PANEL.min(n - j0);
        // SAFETY: panel `j0 / PANEL` (`d * PANEL` f32) is inside `panels` (asserted);
        // columns `j0 .. j0 + ncols <= n` and all `d` head dims are in bounds.
        unsafe {
            qk_panel::<S, M, MR, NV, U>(
                (s, mac),
                &a,
                &mut c,
                panels.as_ptr().add(j0 * d),
                (0, d),
                (j0, ncols),
                (false, Some(scale)),
            )
        };
    }
}

fn zero_rows(c: &mut MatMut<'_>) {
    for i in 0..c.rows() {
        c.row_mut(i).fill(0.0);
    }
}

/// `C[:, j0 .. j0 + ncols] (+)= A[:, k0 .. k0 + kc] panel`, then `*= scale` if given.
///
/// # Safety
/// `panel` readable for `kc * PANEL` f32; `k0 + kc <= a.cols()`,
/// `j0 + ncols <= c.cols()`, `ncols <= PANEL`.
#[inline(always)]
unsafe fn qk_panel<S: Simd, M: Mac<S>, const MR: usize, const NV: usize, const U: usize>(
    (s, mac): (S, M),
    a: &MatRef<'_>,
    c: &mut MatMut<'_>,
    panel: *const f32,
    (k0, kc): (usize, usize),
    (j0, ncols): (usize, usize),
    mode: (bool, Option<f32>),
) {
    let nr = NV * S::LANES;
    debug_assert!(MR <= 8 && PANEL.is_multiple_of(nr) && ncols <= PANEL);
    let m = a.rows();
    let (ap, lda) = (a.as_ptr(), a.stride());
    let (cp, ldc) = (c.as_mut_ptr(), c.stride());
    for sub in (0..ncols).step_by(nr) {
        let mut masks = [s.mask(0); NV];
        for (u, mk) in masks.iter_mut().enumerate() {
            *mk = s.mask((ncols - sub).saturating_sub(u * S::LANES));
        }
        // Vectors with at least one column inside C; the others are never addressed.
        let active = (ncols - sub).div_ceil(S::LANES).min(NV);
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            // SAFETY: rows `i0 .. i0 + rows <= m` of A (head dims `k0 .. k0 + kc`) and of
            // C (columns `j0 + sub ..`, the first `active` vectors, stores limited to
            // `masks`, i.e. to `j0 + ncols`) are in bounds; the panel columns
            // `sub .. sub + nr <= PANEL` of its `kc` rows are readable (caller).
            unsafe {
                let args = (
                    ap.add(i0 * lda + k0),
                    panel.add(sub),
                    cp.add(i0 * ldc + j0 + sub),
                );
                by_rows_full!(
                    rows,
                    ncols - sub >= nr,
                    qk_micro::<S, M, _, NV, U>(
                        s,
                        mac,
                        args.0,
                        lda,
                        args.1,
                        kc,
                        args.2,
                        ldc,
                        (&masks, active),
                        mode,
                    )
                )
            };
        }
    }
}

/// One `R x (NV * LANES)` block of `C (+)= A panel`, then `C *= scale` if given.
///
/// # Safety
/// `a` readable for `R` rows of `kc` (stride `lda`); `panel` for `kc` rows of
/// `NV * LANES` (stride [`PANEL`]); `c` readable and writable for `R` rows at the lanes
/// of `masks` (stride `ldc`), of which only the first `active` vectors hold any lane:
/// the others are skipped, so no pointer past C's columns is formed.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_micro<
    S: Simd,
    M: Mac<S>,
    const R: usize,
    const NV: usize,
    const U: usize,
    const FULL: bool,
>(
    s: S,
    mac: M,
    a: *const f32,
    lda: usize,
    panel: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    (masks, active): (&[S::M; NV], usize),
    (accumulate, scale): (bool, Option<f32>),
) {
    let mut acc = [[s.zero(); NV]; R];
    // SAFETY: every pointer offset stays inside the ranges the caller guarantees.
    unsafe {
        if U == 1 {
            for k in 0..kc {
                let bk = panel.add(k * PANEL);
                let mut bv = [s.zero(); NV];
                for (u, b) in bv.iter_mut().enumerate() {
                    *b = s.load(bk.add(u * S::LANES));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = s.splat(*a.add(i * lda + k));
                    for (x, b) in row.iter_mut().zip(bv) {
                        *x = mac.mac(s, ai, b, *x);
                    }
                }
            }
        } else {
            let rows: [*const f32; R] = std::array::from_fn(|i| a.add(i * lda));
            let step = |acc: &mut [[S::V; NV]; R], k: usize| {
                let bk = panel.add(k * PANEL);
                let mut bv = [s.zero(); NV];
                for (u, b) in bv.iter_mut().enumerate() {
                    *b = s.load(bk.add(u * S::LANES));
                }
                for (row, ai) in acc.iter_mut().zip(rows) {
                    let ai = s.splat(*ai.add(k));
                    for (x, b) in row.iter_mut().zip(bv) {
                        *x = mac.mac(s, ai, b, *x);
                    }
                }
            };
            let mut k = 0;
            // Unrolled by `U`: fewer loop and address updates per FMA (AVX2, where
            // the 16-register file leaves no room for a larger block).
            while k + U <= kc {
                for j in 0..U {
                    step(&mut acc, k + j);
                }
                k += U;
            }
            while k < kc {
                step(&mut acc, k);
                k += 1;
            }
        }
        // A constant for whole blocks, so they store with plain (unmasked) moves: a
        // masked store is one instruction on AVX-512 but microcoded on AVX2 (AMD Zen 3:
        // `vmaskmovps` to memory is many times slower than `vmovups`).
        let active = if FULL { NV } else { active };
        for (i, row) in acc.iter().enumerate() {
            for (u, (&x, &m)) in row.iter().zip(masks).enumerate().take(active) {
                let p = c.add(i * ldc + u * S::LANES);
                let mut y = x;
                if accumulate {
                    y = s.add(y, if FULL { s.load(p) } else { s.load_masked(p, m) });
                }
                if let Some(sc) = scale {
                    y = s.mul(y, s.splat(sc));
                }
                if FULL {
                    s.store(p, y);
                } else {
                    s.store_masked(p, y, m);
                }
            }
        }
    }
}

/// Rows of K per `pv` k-block: keeps the V block hot across column panels.
const PV_KC: usize = 256;

/// `O += P V` with an `MR x (NV * LANES)` register block (`MR <= 8`).
#[inline(always)]
pub(crate) fn pv<S: Simd, M: Mac<S>, const MR: usize, const NV: usize, const PREFETCH: bool>(
    s: S,
    mac: M,
    p: MatRef<'_>,
    v: MatRef<'_>,
    mut o: MatMut<'_>,
) {
    let (m, kd, n) = (p.rows(), p.cols(), v.cols());
    debug_assert!(MR <= 8 && v.rows() == kd && o.rows() == m && o.cols() == n);
    if m == 0 || n == 0 || kd == 0 {
        return;
    }
    let nr = NV * S::LANES;
    let (pp, ldp) = (p.as_ptr(), p.stride());
    let (vp, ldv) = (v.as_ptr(), v.stride());
    let (op, ldo) = (o.as_mut_ptr(), o.stride());
    for k0 in (0..kd).step_by(PV_KC) {
        let kc = PV_KC.min(kd - k0);
        for j0 in (0..n).step_by(nr) {
            let ncols = nr.min(n - j0);
            if PREFETCH && j0 + nr < n {
                // The next strip of V's rows, while this one runs over every row block.
                for k in 0..kc {
                    s.prefetch(vp.wrapping_add((k0 + k) * ldv + j0 + nr).cast());
                }
            }
            let mut masks = [s.mask(0); NV];
            for (u, mk) in masks.iter_mut().enumerate() {
                *mk = s.mask(ncols.saturating_sub(u * S::LANES));
            }
            // The masks, and how many vectors hold a column inside O and V.
            let edge = (&masks, ncols.div_ceil(S::LANES).min(NV));
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let args = (
                    // SAFETY (all three): rows `i0 .. i0 + rows <= m` of P (columns
                    // `k0 .. k0 + kc <= kd`) and of O (columns `j0 .. j0 + ncols <= n`),
                    // rows `k0 .. k0 + kc` of V (same columns) are in bounds by the
                    // MatRef / MatMut checks.
                    unsafe { pp.add(i0 * ldp + k0) },
                    unsafe { vp.add(k0 * ldv + j0) },
                    unsafe { op.add(i0 * ldo + j0) },
                );
                // SAFETY: as above; when `ncols < nr` the partial kernel touches only
                // the `ncols` columns selected by `masks`.
                unsafe {
                    by_rows_full!(
                        rows,
                        ncols == nr,
                        pv_micro::<S, M, _, NV>(
                            s, mac, args.0, ldp, args.1, ldv, kc, args.2, ldo, edge
                        )
                    )
                }
            }
        }
    }
}

/// One `R x (NV * LANES)` block of `O += P V`. With `FULL`, all `NV` vectors are
/// whole; otherwise only the lanes of `masks` are read and written.
///
/// # Safety
/// `p` readable for `R` rows of `kc` (stride `ldp`); `v` for `kc` rows (stride `ldv`)
/// and `o` readable and writable for `R` rows (stride `ldo`), each at `NV * LANES`
/// columns (`FULL`) or the lanes of `masks`, of which only the first `active` vectors
/// hold any lane: the others are skipped, so no pointer past the columns is formed.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_micro<S: Simd, M: Mac<S>, const R: usize, const NV: usize, const FULL: bool>(
    s: S,
    mac: M,
    p: *const f32,
    ldp: usize,
    v: *const f32,
    ldv: usize,
    kc: usize,
    o: *mut f32,
    ldo: usize,
    (masks, active): (&[S::M; NV], usize),
) {
    // A constant for whole blocks, so their loops compile exactly as without the skip.
    let active = if FULL { NV } else { active };
    let mut acc = [[s.zero(); NV]; R];
    // SAFETY: every pointer offset stays inside the ranges the caller guarantees.
    unsafe {
        for (i, row) in acc.iter_mut().enumerate() {
            for (u, x) in row.iter_mut().enumerate().take(active) {
                let q = o.add(i * ldo + u * S::LANES);
                *x = if FULL {
                    s.load(q)
                } else {
                    s.load_masked(q, masks[u])
                };
            }
        }
        for k in 0..kc {
            let vk = v.add(k * ldv);
            let mut bv = [s.zero(); NV];
            for (u, b) in bv.iter_mut().enumerate().take(active) {
                *b = if FULL {
                    s.load(vk.add(u * S::LANES))
                } else {
                    s.load_masked(vk.add(u * S::LANES), masks[u])
                };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let pi = s.splat(*p.add(i * ldp + k));
                for (x, b) in row.iter_mut().zip(bv) {
                    *x = mac.mac(s, pi, b, *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (u, &x) in row.iter().enumerate().take(active) {
                let q = o.add(i * ldo + u * S::LANES);
                if FULL {
                    s.store(q, x);
                } else {
                    s.store_masked(q, x, masks[u]);
                }
            }
        }
    }
}
