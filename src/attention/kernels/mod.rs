//! Low-level f32 compute primitives for attention: tile GEMMs, decode GEMVs, a
//! vectorised `exp` and row reductions, with runtime CPU dispatch.
//!
//! This module is the engine room of the tiled and decode kernels; users want
//! [`crate::attention`] instead. It is crate-private: the non-default feature
//! `bench-internals` makes it public as `ropex::attention::kernels`, for the micro-kernel
//! benches (`benches/kernels.rs`) and the reports (`examples/bench_report.rs`) only, with
//! no stability promise. Without the feature the one knob is the environment variable
//! `ROPEX_KERNELS` below, which picks the instruction set of every kernel (benchmarks
//! and tests use it to compare the paths).
//!
//! # Instruction sets and dispatch
//! Every primitive has three implementations, chosen at run time:
//! [`Isa::Avx512`] (AVX-512F, 16 lanes), [`Isa::Avx2`] (AVX2 + FMA, 8 lanes) and
//! [`Isa::Portable`] (plain Rust, vectorised by the compiler for the baseline target),
//! which is also the only one off x86-64. [`Kernels::active`] detects the best one once
//! and caches it; the environment variable `ROPEX_KERNELS` (`portable`, `avx2` or
//! `avx512`, read once) caps the choice, e.g. to check that the portable path gives the
//! same answers. [`Kernels::with_isa`] picks one explicitly (tests do this to compare
//! every path against the portable one).
//!
//! # Matrices
//! Operands are row-major f32 slices with an explicit row stride: [`MatRef`] and
//! [`MatMut`], validated on construction, so the kernels never read or write outside
//! the slices they were given.
//!
//! # Primitives
//! | method | computes | notes |
//! |---|---|---|
//! | [`Kernels::qk_tile`] | `S = scale * A B^T` | scores of a `Bq x Bk` tile, B (keys) packed per call |
//! | [`Kernels::pack_keys`], [`Kernels::qk_tile_packed`] | same, keys packed once | for a flash loop: pack a head's keys once, score every tile |
//! | [`Kernels::pv_tile`] | `O += P V` | accumulates a tile's values |
//! | [`Kernels::qk_gemv`] | `S = scale * Q K^T`, few queries | decode / GQA group: streams K once |
//! | [`Kernels::pv_gemv`] | `O += P V`, few queries | decode / GQA group: streams V once |
//! | [`Kernels::exp`], [`Kernels::exp_sub_sum`], [`Kernels::row_max`], [`Kernels::scale`] | softmax pieces on one row | |
//! | [`Kernels::fma_loop`] | independent FMA chains | the machine's f32 peak, for reports |
//! | [`Bf16Kernels`] ([`Kernels::bf16`]) | the tile GEMMs on bf16 pairs (`vdpbf16ps`) | AVX512_BF16 CPUs; see [`Kernels::bf16_products_pay`] |
//! | [`thread_cpu_time`], [`time_on_cpu`] | on-CPU time of this thread | the clock of the reports and of [`Kernels::fma_peak_gflops`] |
//!
//! # In a flash-attention loop
//! Per head: [`Kernels::pack_keys`] once for the rotated keys; then per query block
//! `i` and key block `j`: [`Kernels::qk_tile_packed`] (scores, scaled) into an
//! `Bq x Bk` buffer; per row [`Kernels::row_max`], the new running max,
//! [`Kernels::scale`] of the output row by `exp(m_old - m_new)`,
//! [`Kernels::exp_sub_sum`] (probabilities in place, and their sum); then
//! [`Kernels::pv_tile`] into the output block. Decode with a cache that keeps its keys
//! packed ([`PackedKeys::append`]) scores a GQA group with [`Kernels::qk_tile_packed`]
//! and sums values with [`Kernels::pv_gemv`]. Nothing here allocates except
//! [`Kernels::pack_keys`] / [`PackedKeys::append`] (into the caller's buffer).
//!
//! # Performance
//! On the reference machine (one Zen 5 core, AVX-512, ~285 GFLOP/s f32 FMA-loop peak
//! on an uncontended core; `cargo bench --features bench-internals --bench kernels` prints the table), single
//! thread, best of interleaved batches: `qk_tile` 64x64x128 ~245 GFLOP/s (86% of
//! peak; packing the keys in the call costs ~7%), `qk_tile_packed` ~260 (92%),
//! `pv_tile` ~255 (90%); `exp` ~6.8 G/s; decode GEMVs at n = 32768, d = 128 read K or
//! V at 75-105 GB/s from L3. The AVX2 path reaches ~87-90% of the AVX2 peak (half the
//! AVX-512 one on that core).
//!
//! # Accuracy
//! GEMM results are f32 sums in an unspecified order (each entry a sum of `d` products,
//! fused multiply-adds on the SIMD paths): within a few `d * ulp` of the exact product.
//! `exp` has relative error below `1e-6` for results in the normal range.
//!
//! # Safety
//! All `unsafe` code of ropex lives in this module: SIMD intrinsics (made safe by
//! tokens that exist only on CPUs with the instructions), raw-pointer loops over
//! bounds checked once per call, and one `clock_gettime` call ([`thread_cpu_time`]).
//! A matrix with no rows or no columns may have any stride over any slice; the kernels
//! return before forming a pointer into it, and the micro-kernels skip the vectors of a
//! ragged edge that hold no column, so no pointer past a slice is ever formed. Under
//! Miri only the portable path exists, so its tests check that arithmetic there.

mod bf16dot;
mod gemm;
mod gemv;
mod peak;
mod simd;
mod softmax;
mod widen;

pub(crate) use softmax::RowsMut;
use widen::{Stored, stored};
pub(crate) use widen::{is_bf16, widen};

#[cfg(test)]
mod tests;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Result, RopeError};
use crate::tensor::Element;
use simd::Portable;
#[cfg(target_arch = "x86_64")]
use simd::{Avx2, Avx512};

/// A SIMD instruction set a [`Kernels`] can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, no target features beyond the compile target's baseline.
    Portable,
    /// x86-64 AVX2 with FMA (8 f32 lanes).
    Avx2,
    /// x86-64 AVX-512F (16 f32 lanes).
    Avx512,
}

impl Isa {
    /// Every instruction set, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Lower-case name, as accepted by `ROPEX_KERNELS`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Portable | Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }

    /// Whether this CPU can run it.
    pub fn is_supported(self) -> bool {
        Kernels::with_isa(self).is_some()
    }

    /// The widest instruction set this CPU supports (ignores `ROPEX_KERNELS`).
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.is_supported())
            .unwrap_or(Isa::Portable)
    }
}

/// The implementation behind a [`Kernels`]: an instruction-set token, which exists only
/// if the CPU supports that instruction set.
#[derive(Debug, Clone, Copy)]
enum Imp {
    Portable(Portable),
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
}

/// Handle to the compute primitives on one instruction set.
///
/// Cheap to copy; obtain it once ([`Kernels::active`]) and call its methods in loops.
///
/// ```
/// # #[cfg(feature = "bench-internals")] {
/// use ropex::attention::kernels::{Kernels, MatMut, MatRef};
/// let k = Kernels::active();
/// // Two queries, three keys, head dim 4: S = 0.5 * Q K^T.
/// let q = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
/// let keys = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
/// let mut s = [0.0f32; 6];
/// k.qk_tile(
///     MatRef::new(&q, 2, 4, 4)?,
///     MatRef::new(&keys, 3, 4, 4)?,
///     MatMut::new(&mut s, 2, 3, 3)?,
///     0.5,
/// )?;
/// assert_eq!(s, [0.5, 2.5, 4.5, 1.0, 3.0, 5.0]);
/// # }
/// # Ok::<(), ropex::RopeError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    imp: Imp,
}

impl PartialEq for Kernels {
    fn eq(&self, other: &Self) -> bool {
        self.isa() == other.isa()
    }
}

impl Eq for Kernels {}

impl Default for Kernels {
    /// [`Kernels::active`].
    fn default() -> Self {
        Kernels::active()
    }
}

/// Environment variable that caps the instruction set of [`Kernels::active`].
pub const ISA_ENV: &str = "ROPEX_KERNELS";

impl Kernels {
    /// The best instruction set of this CPU, capped by `ROPEX_KERNELS` if set to a known
    /// name (`portable`, `avx2`, `avx512`; other values are ignored). Detected once per
    /// process.
    pub fn active() -> Kernels {
        static ACTIVE: OnceLock<Kernels> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Isa::best();
            let cap = std::env::var(ISA_ENV)
                .ok()
                .and_then(|v| Isa::ALL.into_iter().find(|i| i.name() == v.trim()));
            let isa = cap.map_or(best, |c| c.min(best));
            Kernels::with_isa(isa).unwrap_or_else(Kernels::portable)
        })
    }

    /// The portable implementation (available everywhere).
    pub fn portable() -> Kernels {
        Kernels {
            imp: Imp::Portable(Portable),
        }
    }

    /// The implementation for `isa`, or `None` if this CPU cannot run it.
    ///
    /// Under Miri only [`Isa::Portable`] exists (Miri does not interpret most SIMD
    /// intrinsics), so every test that loops over [`Kernels::all_supported`] checks the
    /// portable path's pointer arithmetic there.
    pub fn with_isa(isa: Isa) -> Option<Kernels> {
        if cfg!(miri) && isa != Isa::Portable {
            return None;
        }
        let imp = match isa {
            Isa::Portable => Some(Imp::Portable(Portable)),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Avx2::new().map(Imp::Avx2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Avx512::new().map(Imp::Avx512),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        };
        imp.map(|imp| Kernels { imp })
    }

    /// Every implementation this CPU can run, narrowest first.
    pub fn all_supported() -> Vec<Kernels> {
        Isa::ALL.into_iter().filter_map(Kernels::with_isa).collect()
    }

    /// The instruction set.
    pub fn isa(&self) -> Isa {
        match self.imp {
            Imp::Portable(_) => Isa::Portable,
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2(_) => Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            Imp::Avx512(_) => Isa::Avx512,
        }
    }
}

/// Calls `$f(token, args..)` in the entry-point module of the handle's instruction set.
macro_rules! dispatch {
    ($self:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $self.imp {
            Imp::Portable(t) => entry_portable::$f(t, $($arg),*),
            // SAFETY: the token proves the CPU supports the entry point's features.
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2(t) => unsafe { entry_avx2::$f(t, $($arg),*) },
            // SAFETY: the token proves the CPU supports the entry point's features.
            #[cfg(target_arch = "x86_64")]
            Imp::Avx512(t) => unsafe { entry_avx512::$f(t, $($arg),*) },
        }
    };
}

/// Calls `$f(token, format, args..)` in the decode entry module (`decode_*`) of the
/// handle's instruction set for the storage format of `$rows` (a [`Stored`]), with `KP`
/// in the arguments replaced by the pointer to its data. f16 on AVX2 takes the F16C
/// entry points when the CPU has F16C, else the portable ones.
macro_rules! decode {
    ($self:expr, $rows:expr, $f:ident($($a:tt)*)) => {
        match $rows {
            Stored::F32(x) => decode!(@isa $self, gemv::F32, false, x, $f($($a)*)),
            Stored::Bf16(x) => decode!(@isa $self, gemv::Bf16, false, x, $f($($a)*)),
            Stored::F16(x) => decode!(@isa $self, gemv::F16, true, x, $f($($a)*)),
        }
    };
    (@isa $self:expr, $w:expr, $f16:expr, $x:ident, $f:ident($($a:tt)*)) => {
        match $self.imp {
            Imp::Portable(t) => decode!(@call decode_portable, t, $w, $x, $f($($a)*)),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2(t) if !$f16 => decode!(@call decode_avx2, t, $w, $x, $f($($a)*)),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2(t) if has_f16c() => {
                decode!(@call decode_avx2_f16c, t, $w, $x, $f($($a)*))
            }
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2(_) => decode!(@call decode_portable, Portable, $w, $x, $f($($a)*)),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx512(t) => decode!(@call decode_avx512, t, $w, $x, $f($($a)*)),
        }
    };
    (@call $m:ident, $t:expr, $w:expr, $x:ident,
        $f:ident($g:ident, $p:ident, $ld:ident, KP, $($rest:tt)*)) => {
        $m::$f($t, $w, $g, $p, $ld, $x.as_ptr(), $($rest)*)
    };
}

/// Whether the CPU has F16C (detected once by std).
#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    is_x86_feature_detected!("f16c")
}

/// The per-instruction-set entry points: each calls a generic body with its token
/// under `#[target_feature]`, with that instruction set's register-block sizes.
///
/// - `qk = (MR, NV)`: `qk_tile` block of `MR` rows by `NV` vectors.
/// - `qk_unroll`: head dims per trip of the `qk` loop (1: the plain loop).
/// - `pv = (MR, NV)`: `pv_tile` block.
/// - `pv_prefetch`: whether `pv_tile` prefetches the next column strip of V.
/// - `chains`: FMA chains of `fma_loop`.
///
/// The AVX2 choices (unroll 2, prefetch on) were measured on an AMD EPYC family 25
/// model 1 (Zen 3) core. On an Intel Xeon family 6 model 167 core (two 512-bit FMA
/// ports) the AVX-512 alternatives `qk_unroll = 2`, `pv = (6, 4)` and `pv = (8, 2)` were
/// no faster than the plain loop with `pv = (4, 4)` (interleaved `profile_attention
/// tiled rope 4096` runs, within noise); the AVX-512 path keeps them.
macro_rules! entries {
    (
        $module:ident, $tok:ty, [$(#[$attr:meta])*],
        qk = ($qmr:literal, $qnv:literal),
        qk_unroll = $qu:literal,
        pv = ($pmr:literal, $pnv:literal),
        pv_prefetch = $pf:literal,
        chains = $chains:literal $(,)?
    ) => {
        mod $module {
            use super::{gemm, peak, softmax, MatMut, MatRef};
            #[allow(unused_imports)]
            use super::simd::*;

            $(#[$attr])*
            pub(super) fn qk_tile(t: $tok, a: MatRef<'_>, b: MatRef<'_>, c: MatMut<'_>, sc: f32) {
                gemm::qk::<$tok, _, $qmr, $qnv, $qu>(t, gemm::Fma, a, b, c, sc)
            }

            $(#[$attr])*
            pub(super) fn qk_packed(
                t: $tok,
                a: MatRef<'_>,
                panels: &[f32],
                c: MatMut<'_>,
                sc: f32,
            ) {
                gemm::qk_packed::<$tok, _, $qmr, $qnv, $qu>(t, gemm::Fma, a, panels, c, sc)
            }

            $(#[$attr])*
            pub(super) fn pack_keys(t: $tok, k: MatRef<'_>, out: &mut [f32]) {
                gemm::pack_keys(t, k, out)
            }

            $(#[$attr])*
            pub(super) fn pv_tile(t: $tok, p: MatRef<'_>, v: MatRef<'_>, o: MatMut<'_>) {
                gemm::pv::<$tok, _, $pmr, $pnv, $pf>(t, gemm::Fma, p, v, o)
            }

            $(#[$attr])*
            pub(super) fn exp(t: $tok, x: &mut [f32]) {
                softmax::exp(t, x)
            }

            $(#[$attr])*
            pub(super) fn exp_sub_sum(t: $tok, x: &mut [f32], max: f32) -> f32 {
                softmax::exp_sub_sum(t, x, max)
            }

            $(#[$attr])*
            pub(super) fn row_max(t: $tok, x: &[f32]) -> f32 {
                softmax::row_max(t, x)
            }

            $(#[$attr])*
            pub(super) fn scale(t: $tok, x: &mut [f32], alpha: f32) {
                softmax::scale(t, x, alpha)
            }

            $(#[$attr])*
            pub(super) fn fold_rows(
                t: $tok,
                scores: &mut [f32],
                bk: usize,
                visible: Option<&[usize]>,
                state: softmax::RowsMut<'_>,
            ) {
                softmax::fold_rows(t, scores, bk, visible, state)
            }

            $(#[$attr])*
            pub(super) fn fma_loop(t: $tok, iters: u64) -> f32 {
                peak::fma_loop::<$tok, $chains>(t, iters)
            }

            pub(super) const FMA_CHAINS: usize = $chains;
        }
    };
}

entries!(
    entry_portable,
    Portable,
    [],
    qk = (4, 1),
    qk_unroll = 1,
    pv = (4, 1),
    pv_prefetch = false,
    chains = 8,
);

#[cfg(target_arch = "x86_64")]
entries!(
    entry_avx2, Avx2, [#[target_feature(enable = "avx2,fma")]],
    qk = (6, 2),
    qk_unroll = 2,
    pv = (6, 2),
    pv_prefetch = true,
    chains = 12,
);

#[cfg(target_arch = "x86_64")]
entries!(
    entry_avx512, Avx512, [#[target_feature(enable = "avx512f,avx2,fma")]],
    qk = (8, 2),
    qk_unroll = 1,
    pv = (4, 4),
    pv_prefetch = false,
    chains = 16,
);

/// The decode entry points (`gemv.rs`), per instruction set and storage format `W`:
/// - `dot = [R1, .., R8]`: keys per `qk` block for 1 ..= 8 queries;
/// - `pvnv = [NV1, .., NV8]`: vectors of columns per `pv` block for 1 ..= 8 rows
///   (`G * NV` accumulators and `NV` value vectors fit the register file).
macro_rules! decode_entries {
    (
        $module:ident, $tok:ty, [$(#[$attr:meta])*],
        dot = [$r1:literal, $r2:literal, $r3:literal, $r4:literal,
               $r5:literal, $r6:literal, $r7:literal, $r8:literal],
        pvnv = [$n1:literal, $n2:literal, $n3:literal, $n4:literal,
                $n5:literal, $n6:literal, $n7:literal, $n8:literal] $(,)?
    ) => {
        mod $module {
            use super::gemv::{self, Widen};
            #[allow(unused_imports)]
            use super::simd::*;

            /// `g` (1 ..= 8) queries, f32 fused multiply-adds; the contract of
            /// [`gemv::qk`].
            $(#[$attr])*
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn qk<W: Widen>(
                t: $tok, w: W, g: usize, q: *const f32, ldq: usize, k: *const W::E,
                ldk: usize, n: usize, d: usize, o: *mut f32, ldo: usize, sc: f32,
            ) {
                // SAFETY: forwarded contract.
                unsafe { qk_with(t, w, super::gemm::Fma, g, q, ldq, k, ldk, n, d, o, ldo, sc) }
            }

            /// `g` (1 ..= 8) queries, products and sums by `m`; the contract of
            /// [`gemv::qk`].
            $(#[$attr])*
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn qk_with<W: Widen, M: super::gemm::Mac<$tok>>(
                t: $tok, w: W, m: M, g: usize, q: *const f32, ldq: usize, k: *const W::E,
                ldk: usize, n: usize, d: usize, o: *mut f32, ldo: usize, sc: f32,
            ) {
                // SAFETY: forwarded contract.
                unsafe {
                    match g {
                        1 => gemv::qk::<$tok, W, M, 1, $r1>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        2 => gemv::qk::<$tok, W, M, 2, $r2>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        3 => gemv::qk::<$tok, W, M, 3, $r3>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        4 => gemv::qk::<$tok, W, M, 4, $r4>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        5 => gemv::qk::<$tok, W, M, 5, $r5>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        6 => gemv::qk::<$tok, W, M, 6, $r6>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        7 => gemv::qk::<$tok, W, M, 7, $r7>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        8 => gemv::qk::<$tok, W, M, 8, $r8>(t, w, m, q, ldq, k, ldk, n, d, o, ldo, sc),
                        _ => unreachable!("query groups have 1 to 8 rows"),
                    }
                }
            }

            /// `g` (1 ..= 8) rows; the contract of [`gemv::pv`].
            $(#[$attr])*
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn pv<W: Widen>(
                t: $tok, w: W, g: usize, p: *const f32, ldp: usize, v: *const W::E,
                ldv: usize, n: usize, dv: usize, o: *mut f32, ldo: usize,
            ) {
                // SAFETY: forwarded contract.
                unsafe {
                    match g {
                        1 => gemv::pv::<$tok, W, 1, $n1>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        2 => gemv::pv::<$tok, W, 2, $n2>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        3 => gemv::pv::<$tok, W, 3, $n3>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        4 => gemv::pv::<$tok, W, 4, $n4>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        5 => gemv::pv::<$tok, W, 5, $n5>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        6 => gemv::pv::<$tok, W, 6, $n6>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        7 => gemv::pv::<$tok, W, 7, $n7>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        8 => gemv::pv::<$tok, W, 8, $n8>(t, w, p, ldp, v, ldv, n, dv, o, ldo),
                        _ => unreachable!("query groups have 1 to 8 rows"),
                    }
                }
            }
        }
    };
}

decode_entries!(
    decode_portable,
    Portable,
    [],
    dot = [4, 2, 1, 1, 1, 1, 1, 1],
    pvnv = [2, 2, 1, 1, 1, 1, 1, 1],
);

#[cfg(target_arch = "x86_64")]
decode_entries!(
    decode_avx2, Avx2, [#[target_feature(enable = "avx2,fma")]],
    dot = [8, 4, 2, 2, 1, 1, 1, 1],
    pvnv = [8, 4, 2, 2, 1, 1, 1, 1],
);

// f16 on AVX2 needs F16C's `vcvtph2ps`: the same kernels compiled with it, called only
// when the CPU has it.
#[cfg(target_arch = "x86_64")]
decode_entries!(
    decode_avx2_f16c, Avx2, [#[target_feature(enable = "avx2,fma,f16c")]],
    dot = [8, 4, 2, 2, 1, 1, 1, 1],
    pvnv = [8, 4, 2, 2, 1, 1, 1, 1],
);

#[cfg(target_arch = "x86_64")]
decode_entries!(
    decode_avx512, Avx512, [#[target_feature(enable = "avx512f,avx2,fma")]],
    dot = [8, 4, 3, 2, 2, 2, 1, 1],
    pvnv = [8, 8, 4, 4, 4, 4, 2, 2],
);

// bf16 pair products (`vdpbf16ps`) for the decode `Q K^T` of a bf16 cache: the AVX-512
// kernels compiled with AVX512_BF16, called only through [`Bf16Kernels`] (whose token
// proves the CPU has it). Only `qk_with` is used.
#[cfg(target_arch = "x86_64")]
decode_entries!(
    decode_avx512_bf16, Avx512,
    [#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")] #[allow(dead_code)]],
    dot = [8, 4, 3, 2, 2, 2, 1, 1],
    pvnv = [8, 8, 4, 4, 4, 4, 2, 2],
);

/// The row groups the decode entry points take, `(first row, rows)`: `rows` split into
/// runs of at most 8 (the queries of a GQA group the register blocks are built for).
fn decode_groups(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(8).map(move |g0| (g0, (rows - g0).min(8)))
}

fn shape_err(what: &str, expected: String, got: String) -> RopeError {
    RopeError::shape(what, expected, got)
}

fn check_dims(what: &str, expected: (usize, usize), got: (usize, usize)) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(shape_err(
            what,
            format!("[{}, {}]", expected.0, expected.1),
            format!("[{}, {}]", got.0, got.1),
        ))
    }
}

impl Kernels {
    /// Scores of one tile: `S = scale * A B^T`, `A: [m, d]` (queries), `B: [n, d]`
    /// (keys), `S: [m, n]` (overwritten).
    ///
    /// Built for attention tiles (`m, n` 32 to 128, `d` 64 to 128, any sizes work):
    /// each call packs B transposed, 32 keys by up to 256 head dims at a time, on the
    /// stack (no allocation), and runs register-blocked FMA micro-kernels over it.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if the shapes do not agree.
    pub fn qk_tile(&self, a: MatRef<'_>, b: MatRef<'_>, s: MatMut<'_>, scale: f32) -> Result<()> {
        check_dims("qk_tile B [n, d]", (b.rows, a.cols), (b.rows, b.cols))?;
        check_dims("qk_tile S [m, n]", (a.rows, b.rows), (s.rows, s.cols))?;
        dispatch!(self, qk_tile(a, b, s, scale));
        Ok(())
    }

    /// Packs keys `k: [n, d]` for [`Kernels::qk_tile_packed`] into `out` (its
    /// allocation is reused). Pack a head's keys once, then score every query tile
    /// against slices of them with no per-tile packing; the layout is the same on every
    /// instruction set. [`PackedKeys::append`] grows a packed buffer key by key.
    pub fn pack_keys(&self, k: MatRef<'_>, out: &mut PackedKeys) {
        out.reset(k.rows, k.cols);
        self.pack_keys_at(k, out, 0);
    }

    /// Packs `k: [m, d]` as keys `first .. first + m` of `out`, which
    /// [`PackedKeys::reset`] sized for at least that many keys of head dim `d`; `first`
    /// is a multiple of [`PackedKeys::PANEL`]. Packing a long key list a chunk of rows
    /// at a time gives what [`Kernels::pack_keys`] gives for all of it.
    pub(crate) fn pack_keys_at(&self, k: MatRef<'_>, out: &mut PackedKeys, first: usize) {
        let (p, d) = (PackedKeys::PANEL, out.d);
        debug_assert!(first.is_multiple_of(p) && first + k.rows <= out.n && k.cols == d);
        let len = k.rows.div_ceil(p) * p * d;
        let panels = &mut out.as_mut_slice()[first * d..first * d + len];
        dispatch!(self, pack_keys(k, panels));
    }

    /// [`Kernels::qk_tile`] against packed keys: `S = scale * A K^T` for keys
    /// `key_start .. key_start + S.cols` of `keys`, `A: [m, d]`, `S: [m, n]`
    /// (overwritten). `key_start` must be a multiple of [`PackedKeys::PANEL`] (tile
    /// boundaries at multiples of 32 keys are).
    ///
    /// Also a decode scoring for a GQA group (2 to 8 queries against one kv head) when
    /// the cache keeps its keys packed (measured about 1.8x the previous
    /// [`Kernels::qk_gemv`] at 8 queries; not re-measured against the current one).
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if `A` and `keys` differ in head dim, `S` does not
    /// have `m` rows, or the key range is outside `keys`;
    /// [`RopeError::InvalidParameter`] if `key_start` is not a multiple of the panel.
    pub fn qk_tile_packed(
        &self,
        a: MatRef<'_>,
        keys: &PackedKeys,
        key_start: usize,
        s: MatMut<'_>,
        scale: f32,
    ) -> Result<()> {
        let panels = keys.panels_from("qk_tile_packed", &a, key_start, &s)?;
        dispatch!(self, qk_packed(a, panels, s, scale));
        Ok(())
    }

    /// Values of one tile: `O += P V`, `P: [m, k]` (probabilities), `V: [k, dv]`,
    /// `O: [m, dv]` (accumulated into).
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if the shapes do not agree.
    pub fn pv_tile(&self, p: MatRef<'_>, v: MatRef<'_>, o: MatMut<'_>) -> Result<()> {
        check_dims("pv_tile V [k, dv]", (p.cols, v.cols), (v.rows, v.cols))?;
        check_dims("pv_tile O [m, dv]", (p.rows, v.cols), (o.rows, o.cols))?;
        dispatch!(self, pv_tile(p, v, o));
        Ok(())
    }

    /// Decode scores: `S = scale * Q K^T` for a few queries `Q: [g, d]` (one query, or
    /// the query heads of a GQA group sharing one kv head) against many keys
    /// `K: [n, d]`; `S: [g, n]` (overwritten).
    ///
    /// Dot products along `d`, up to 8 queries per pass over K (K is read
    /// `ceil(g / 8)` times, from memory or cache, and never packed). For many queries
    /// use [`Kernels::qk_tile`].
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if the shapes do not agree.
    pub fn qk_gemv(&self, q: MatRef<'_>, k: MatRef<'_>, s: MatMut<'_>, scale: f32) -> Result<()> {
        check_dims("qk_gemv K [n, d]", (k.rows, q.cols), (k.rows, k.cols))?;
        check_dims("qk_gemv S [g, n]", (q.rows, k.rows), (s.rows, s.cols))?;
        self.qk_rows(q, Stored::F32(k.data), k.stride, s, scale);
        Ok(())
    }

    /// [`Kernels::qk_gemv`] against keys stored as `E` (f32, bf16 or f16), widened to
    /// f32 in registers as they are loaded: `k` holds `S.cols` contiguous rows of
    /// `d = Q.cols` elements.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if `S` does not have `Q.rows` rows or `k` is not
    /// `S.cols * d` elements.
    pub(crate) fn qk_gemv_stored<E: Element>(
        &self,
        q: MatRef<'_>,
        k: &[E],
        s: MatMut<'_>,
        scale: f32,
    ) -> Result<()> {
        let n = s.cols;
        check_dims("qk_gemv_stored S [g, n]", (q.rows, n), (s.rows, s.cols))?;
        if Some(k.len()) != n.checked_mul(q.cols) {
            return Err(shape_err(
                "qk_gemv_stored K [n, d]",
                format!("{n} x {} elements", q.cols),
                k.len().to_string(),
            ));
        }
        self.qk_rows(q, stored(k), q.cols, s, scale);
        Ok(())
    }

    /// `S = scale * Q K^T` for `K` = `S.cols` rows of `Q.cols` elements at stride `ldk`
    /// in `k` (shapes checked by the callers).
    fn qk_rows(&self, q: MatRef<'_>, k: Stored<'_>, ldk: usize, mut s: MatMut<'_>, scale: f32) {
        let (n, d) = (s.cols, q.cols);
        if q.rows == 0 || n == 0 {
            return;
        }
        if d == 0 {
            // Empty dot products; no pointer into K is formed.
            for i in 0..s.rows {
                s.row_mut(i).fill(0.0);
            }
            return;
        }
        // The bounds every kernel below relies on (MatRef / MatMut checked Q and S).
        assert!(
            ldk >= d && k.len() >= (n - 1) * ldk + d,
            "decode keys in bounds"
        );
        for (g0, g) in decode_groups(q.rows) {
            let (qp, ldq) = (q.sub_rows(g0, g).as_ptr(), q.stride);
            let ldo = s.stride;
            let op = s.sub_rows_mut(g0, g).as_mut_ptr();
            // SAFETY: Q has `g` rows of `d` from `qp` (stride `ldq`), S `g` rows of `n`
            // from `op` (stride `ldo`), K `n` rows of `d` at stride `ldk` (asserted);
            // `decode!` passes f16 only to entry points compiled for, and run on, CPUs
            // with a conversion instruction (or to the portable ones).
            unsafe { decode!(self, k, qk(g, qp, ldq, KP, ldk, n, d, op, ldo, scale)) };
        }
    }

    /// Decode values: `O += P V` for a few queries `P: [g, n]` against many values
    /// `V: [n, dv]`; `O: [g, dv]` (accumulated into).
    ///
    /// Same result as [`Kernels::pv_tile`] up to summation order, with register blocks
    /// for 1 to 8 rows and V streamed once, 64 rows at a time.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if the shapes do not agree.
    pub fn pv_gemv(&self, p: MatRef<'_>, v: MatRef<'_>, o: MatMut<'_>) -> Result<()> {
        check_dims("pv_gemv V [n, dv]", (p.cols, v.cols), (v.rows, v.cols))?;
        check_dims("pv_gemv O [g, dv]", (p.rows, v.cols), (o.rows, o.cols))?;
        self.pv_rows(p, Stored::F32(v.data), v.stride, o);
        Ok(())
    }

    /// [`Kernels::pv_gemv`] against values stored as `E`, widened in registers: `v`
    /// holds `P.cols` contiguous rows of `dv = O.cols` elements.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if `O` does not have `P.rows` rows or `v` is not
    /// `P.cols * dv` elements.
    pub(crate) fn pv_gemv_stored<E: Element>(
        &self,
        p: MatRef<'_>,
        v: &[E],
        o: MatMut<'_>,
    ) -> Result<()> {
        let dv = o.cols;
        check_dims("pv_gemv_stored O [g, dv]", (p.rows, dv), (o.rows, o.cols))?;
        if Some(v.len()) != p.cols.checked_mul(dv) {
            return Err(shape_err(
                "pv_gemv_stored V [n, dv]",
                format!("{} x {dv} elements", p.cols),
                v.len().to_string(),
            ));
        }
        self.pv_rows(p, stored(v), dv, o);
        Ok(())
    }

    /// `O += P V` for `V` = `P.cols` rows of `O.cols` elements at stride `ldv` in `v`.
    fn pv_rows(&self, p: MatRef<'_>, v: Stored<'_>, ldv: usize, mut o: MatMut<'_>) {
        let (n, dv) = (p.cols, o.cols);
        if p.rows == 0 || n == 0 || dv == 0 {
            return;
        }
        assert!(
            ldv >= dv && v.len() >= (n - 1) * ldv + dv,
            "decode values in bounds"
        );
        for (g0, g) in decode_groups(p.rows) {
            let (pp, ldp) = (p.sub_rows(g0, g).as_ptr(), p.stride);
            let ldo = o.stride;
            let op = o.sub_rows_mut(g0, g).as_mut_ptr();
            // SAFETY: P has `g` rows of `n` (stride `ldp`), O `g` rows of `dv` (stride
            // `ldo`), V `n` rows of `dv` at stride `ldv` (asserted); f16 as in `qk_rows`.
            unsafe { decode!(self, v, pv(g, pp, ldp, KP, ldv, n, dv, op, ldo)) };
        }
    }

    /// `x[i] = e^x[i]`, relative error below `1e-6` wherever the result is a normal
    /// f32. Below `ln(f32::MIN_POSITIVE) ~ -87.34` (including `-inf`) the result is
    /// exactly 0 (no subnormals are produced, so no subnormal slowdowns); above
    /// `ln(f32::MAX) ~ 88.72` it is `+inf`; NaN stays NaN.
    pub fn exp(&self, x: &mut [f32]) {
        dispatch!(self, exp(x))
    }

    /// The softmax numerator of one row, in place: `x[i] = e^(x[i] - max)`, returning
    /// `sum_i x[i]` (the new values). `max` is normally [`Kernels::row_max`] of the row;
    /// `max = -inf` (every entry masked) is treated as `0`, giving zeros rather than
    /// NaN. Accuracy as [`Kernels::exp`]. `max` must be at least every entry (as the
    /// row max is): the exponent is computed for `x - max <= 0` only.
    pub fn exp_sub_sum(&self, x: &mut [f32], max: f32) -> f32 {
        dispatch!(self, exp_sub_sum(x, max))
    }

    /// The largest element of `x`, ignoring NaN; `-inf` if `x` is empty or all NaN.
    pub fn row_max(&self, x: &[f32]) -> f32 {
        dispatch!(self, row_max(x))
    }

    /// `x[i] *= alpha` (rescaling an output row when the running max grows).
    pub fn scale(&self, x: &mut [f32], alpha: f32) {
        dispatch!(self, scale(x, alpha))
    }

    /// The online-softmax update of one tile's rows ([`softmax::fold_rows`]): per row
    /// with a visible entry, the new max, the rescale of its output and sum, and the
    /// probabilities `e^(s - m')` written over the scores; one call per tile.
    pub(crate) fn fold_rows(
        &self,
        scores: &mut [f32],
        bk: usize,
        visible: Option<&[usize]>,
        state: RowsMut<'_>,
    ) {
        dispatch!(self, fold_rows(scores, bk, visible, state))
    }

    /// Runs independent chains of fused multiply-adds (`x = x * a + b`) for `iters`
    /// rounds, [`Kernels::fma_loop_flops`] flops in all, and returns a value that
    /// depends on every chain. Timing it gives this instruction set's f32 peak (see
    /// [`Kernels::fma_peak_gflops`]).
    pub fn fma_loop(&self, iters: u64) -> f32 {
        dispatch!(self, fma_loop(iters))
    }

    /// Flops of [`Kernels::fma_loop`]`(iters)` (two per lane per FMA).
    pub fn fma_loop_flops(&self, iters: u64) -> u64 {
        let chains = match self.imp {
            Imp::Portable(_) => entry_portable::FMA_CHAINS,
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2(_) => entry_avx2::FMA_CHAINS,
            #[cfg(target_arch = "x86_64")]
            Imp::Avx512(_) => entry_avx512::FMA_CHAINS,
        };
        iters * (chains * self.isa().lanes() * 2) as u64
    }

    /// Measures the f32 FMA peak of the current thread in GFLOP/s: the best of
    /// repeated [`Kernels::fma_loop`] runs of about 1 ms each, for about `budget` of
    /// wall-clock time in all. Each run is timed in on-CPU time of this thread
    /// ([`thread_cpu_time`]) where the OS gives it, so that time the core spends on
    /// other jobs does not lower the peak; else in wall-clock time.
    pub fn fma_peak_gflops(&self, budget: Duration) -> f64 {
        self.fma_peak_gflops_with(budget, time_on_cpu)
    }

    /// [`Kernels::fma_peak_gflops`] with the clock of the caller: `time(f)` runs `f`
    /// once and returns how long it took (a benchmark passes the clock it times its
    /// cases with, so the peak and the cases are measured alike).
    pub fn fma_peak_gflops_with(
        &self,
        budget: Duration,
        mut time: impl FnMut(&mut dyn FnMut()) -> Duration,
    ) -> f64 {
        let iters = 100_000u64;
        let start = Instant::now();
        let mut best = 0f64;
        loop {
            let dt = time(&mut || {
                std::hint::black_box(self.fma_loop(std::hint::black_box(iters)));
            })
            .as_secs_f64();
            if dt > 0.0 {
                best = best.max(self.fma_loop_flops(iters) as f64 / dt / 1e9);
            }
            if start.elapsed() >= budget {
                return best;
            }
        }
    }
}

/// The tile GEMMs on bf16 operands with f32 accumulation: `vdpbf16ps` (AVX512_BF16)
/// as the multiply-accumulate of the AVX-512 `qk` and `pv` loops.
///
/// Operands are *pair matrices* (`bf16dot.rs`): f32 memory in which each slot holds two
/// bf16, the lower half the even element of a pair that the product sums together
/// (along the head dim for `Q K^T`, along the keys for `P V`). [`Bf16Kernels::round_pairs`]
/// turns an f32 row into one in place, [`Bf16Kernels::pair_rows`] interleaves two value
/// rows; keys are packed from pair rows by [`Kernels::pack_keys`] like any f32 keys
/// (the packing moves bits only).
///
/// Each product of two bf16 is exact in f32, and the pairs' sums accumulate in f32, so
/// the only new error against the f32 GEMMs is rounding the operands to bf16 (unit
/// roundoff `2^-8`). The instruction flushes subnormal operands to zero.
///
/// ```
/// # #[cfg(feature = "bench-internals")] {
/// use ropex::attention::kernels::{Kernels, MatMut, MatRef, PackedKeys};
/// let Some(bf) = Kernels::active().bf16() else { return Ok(()) }; // no AVX512_BF16 here
/// // One query of head dim 4 against two keys, all exact in bf16.
/// let mut q = [1.0f32, 2.0, 0.5, -1.0];
/// let mut k = [1.0f32, 0.0, 2.0, 4.0, 0.25, 1.0, 1.0, 0.0];
/// bf.round_pairs(&mut q, 4)?; // q[..2] now holds the pairs
/// for row in k.chunks_mut(4) {
///     bf.round_pairs(row, 4)?;
/// }
/// let mut packed = PackedKeys::new();
/// Kernels::active().pack_keys(MatRef::new(&k, 2, 2, 4)?, &mut packed);
/// let mut s = [0.0f32; 2];
/// bf.qk_tile_packed(MatRef::new(&q, 1, 2, 4)?, &packed, 0, MatMut::new(&mut s, 1, 2, 2)?, 1.0)?;
/// assert_eq!(s, [1.0 + 1.0 - 4.0, 0.25 + 2.0 + 0.5]);
/// # }
/// # Ok::<(), ropex::RopeError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Bf16Kernels {
    tok: bf16dot::Bf16Dot,
}

/// How much faster (in flops per second) `vdpbf16ps` must run than `vfmadd231ps` for
/// [`Kernels::bf16_products_pay`]: the two cores measured are far on either side (1.9 and
/// 0.5), and the bf16 tile loop also spends time outside the products.
const BF16_PAYS: f64 = 1.3;

impl Kernels {
    /// The bf16 tile products, if this handle is the AVX-512 one and the CPU has
    /// AVX512_BF16 (and AVX-512BW).
    pub fn bf16(&self) -> Option<Bf16Kernels> {
        if self.isa() != Isa::Avx512 || cfg!(miri) {
            return None;
        }
        bf16dot::Bf16Dot::new().map(|tok| Bf16Kernels { tok })
    }

    /// Whether bf16 tile products are worth using on this core: [`Kernels::bf16`] exists
    /// and a register-only loop of `vdpbf16ps` runs at least 1.3x the flop rate of the
    /// f32 FMA loop ([`Kernels::fma_loop`]). Measured once per process (about 1 ms, five
    /// interleaved rounds of each, best on-CPU rate).
    ///
    /// The instruction's speed differs by vendor: 1.9x the FMA rate on an AMD Zen 4 core
    /// (236 against 126 GFLOP/s), 0.5x on an Intel Xeon family 6 model 167.
    pub fn bf16_products_pay() -> bool {
        static PAY: OnceLock<bool> = OnceLock::new();
        *PAY.get_or_init(|| {
            let Some(f) = Kernels::with_isa(Isa::Avx512) else {
                return false;
            };
            let Some(b) = f.bf16() else {
                return false;
            };
            let iters = 20_000;
            let (mut fma, mut dot) = (0f64, 0f64);
            for _ in 0..5 {
                let t = time_on_cpu(&mut || {
                    std::hint::black_box(f.fma_loop(std::hint::black_box(iters)));
                });
                fma = fma.max(f.fma_loop_flops(iters) as f64 / t.as_secs_f64().max(1e-9));
                let t = time_on_cpu(&mut || {
                    std::hint::black_box(b.dot_loop(std::hint::black_box(iters)));
                });
                dot = dot.max(b.dot_loop_flops(iters) as f64 / t.as_secs_f64().max(1e-9));
            }
            dot >= BF16_PAYS * fma
        })
    }
}

impl Bf16Kernels {
    /// Rounds `x[..n]` to bf16, in place, into a pair-matrix row: slot `s < ceil(n / 2)`
    /// then holds `(x[2s], x[2s + 1])` (a zero bf16 past `n`); later slots are left as
    /// they were.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if `n > x.len()`.
    pub fn round_pairs(&self, x: &mut [f32], n: usize) -> Result<()> {
        if n > x.len() {
            return Err(shape_err(
                "round_pairs row",
                format!(">= {n} values"),
                x.len().to_string(),
            ));
        }
        self.round_pairs_unchecked(x, n);
        Ok(())
    }

    /// [`Bf16Kernels::round_pairs`] for `n <= x.len()`, checked by the caller.
    pub(crate) fn round_pairs_unchecked(&self, x: &mut [f32], n: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token proves the CPU has the entry point's features.
        unsafe {
            bf16dot::round_pairs(self.tok, x, n)
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self.tok {}
    }

    /// The pair-matrix row of two rows of values: `out[c] = (r0[c], r1[c])` rounded to
    /// bf16 for `c < out.len()`; with `r1 = None` the second element is zero (an odd
    /// last key).
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if `r0` or `r1` is shorter than `out`.
    pub fn pair_rows(&self, r0: &[f32], r1: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
        let short = r0.len().min(r1.map_or(usize::MAX, <[f32]>::len));
        if short < out.len() {
            return Err(shape_err(
                "pair_rows rows",
                format!(">= {} values", out.len()),
                short.to_string(),
            ));
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token proves the CPU has the entry point's features.
        unsafe {
            bf16dot::pair_rows(self.tok, r0, r1, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self.tok {}
        Ok(())
    }

    /// [`Kernels::qk_tile_packed`] on pair matrices: `S = scale * A K^T`, `A: [m,
    /// ceil(d/2)]` pairs of rotated queries, `keys` packed from pair rows of the keys
    /// (so its head dim counts pairs too).
    ///
    /// # Errors
    /// As [`Kernels::qk_tile_packed`].
    pub fn qk_tile_packed(
        &self,
        a: MatRef<'_>,
        keys: &PackedKeys,
        key_start: usize,
        s: MatMut<'_>,
        scale: f32,
    ) -> Result<()> {
        let panels = keys.panels_from("bf16 qk_tile_packed", &a, key_start, &s)?;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token proves the CPU has the entry point's features.
        unsafe {
            bf16dot::qk_packed(self.tok, a, panels, s, scale)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (panels, scale);
            match self.tok {}
        }
        Ok(())
    }

    /// [`Kernels::pv_tile`] on pair matrices: `O += P V`, `P: [m, ceil(k/2)]` pairs of
    /// probabilities, `V: [ceil(k/2), dv]` from [`Bf16Kernels::pair_rows`], `O: [m, dv]`
    /// f32.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if the shapes do not agree.
    pub fn pv_tile(&self, p: MatRef<'_>, v: MatRef<'_>, o: MatMut<'_>) -> Result<()> {
        check_dims("bf16 pv_tile V [k, dv]", (p.cols, v.cols), (v.rows, v.cols))?;
        check_dims("bf16 pv_tile O [m, dv]", (p.rows, v.cols), (o.rows, o.cols))?;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token proves the CPU has the entry point's features.
        unsafe {
            bf16dot::pv(self.tok, p, v, o)
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self.tok {}
        Ok(())
    }

    /// The decode `S = scale * Q K^T` with bf16 products against a bf16 cache: `q` holds
    /// `[g, d / 2]` pair rows of the rotated queries ([`Bf16Kernels::round_pairs`]), `k`
    /// `n` stored rows of `d` bf16 keys (a bf16 row is a pair row as it lies in memory),
    /// `S` is `[g, n]`. Each product is exact and every sum f32 (`vdpbf16ps`), so the
    /// only rounding beyond the f32 path's is the queries'.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if `k` is not bf16 or the shapes do not agree.
    pub(crate) fn qk_gemv_pairs<E: Element>(
        &self,
        q: MatRef<'_>,
        k: &[E],
        mut s: MatMut<'_>,
        scale: f32,
    ) -> Result<()> {
        let (n, slots) = (s.cols, q.cols);
        check_dims("qk_gemv_pairs S [g, n]", (q.rows, n), (s.rows, s.cols))?;
        let Stored::Bf16(bits) = stored(k) else {
            return Err(shape_err(
                "qk_gemv_pairs keys",
                "bf16".into(),
                E::NAME.into(),
            ));
        };
        let want = n.checked_mul(slots).and_then(|x| x.checked_mul(2));
        if want != Some(bits.len()) {
            return Err(shape_err(
                "qk_gemv_pairs K [n, d]",
                format!("{n} x {} elements", 2 * slots),
                bits.len().to_string(),
            ));
        }
        if q.rows == 0 || n == 0 {
            return Ok(());
        }
        let kp = bits.as_ptr().cast::<[u16; 2]>();
        for (g0, g) in decode_groups(q.rows) {
            let (qp, ldq, ldo) = (q.sub_rows(g0, g).as_ptr(), q.stride, s.stride);
            let op = s.sub_rows_mut(g0, g).as_mut_ptr();
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token proves the CPU has the entry point's features; Q has `g`
            // rows of `slots` from `qp` (stride `ldq`), S `g` rows of `n` from `op`
            // (stride `ldo`), K `n` rows of `slots` pair slots (`2 n slots` u16, checked).
            unsafe {
                decode_avx512_bf16::qk_with(
                    self.tok.avx(),
                    gemv::Bf16Pairs,
                    bf16dot::DotBf16(self.tok),
                    g,
                    qp,
                    ldq,
                    kp,
                    slots,
                    n,
                    slots,
                    op,
                    ldo,
                    scale,
                )
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (qp, ldq, ldo, op, kp, scale);
                match self.tok {}
            }
        }
        Ok(())
    }

    /// Independent chains of `vdpbf16ps` for `iters` rounds ([`Bf16Kernels::dot_loop_flops`]
    /// flops); returns a value that depends on every chain.
    pub fn dot_loop(&self, iters: u64) -> f32 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token proves the CPU has the entry point's features.
        unsafe {
            bf16dot::dot_loop(self.tok, iters)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = iters;
            match self.tok {}
        }
    }

    /// Flops of [`Bf16Kernels::dot_loop`]`(iters)`: two products and two sums per lane
    /// per instruction.
    pub fn dot_loop_flops(&self, iters: u64) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            iters * (bf16dot::DOT_CHAINS * 16 * 4) as u64
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = iters;
            match self.tok {}
        }
    }
}

/// Time the calling thread has spent on a CPU (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`
/// on 64-bit Linux; `None` elsewhere). Unlike wall-clock time it does not count the time
/// other jobs on a shared machine hold the core: the clock of ropex's benchmark reports.
pub fn thread_cpu_time() -> Option<Duration> {
    #[cfg(all(target_os = "linux", target_pointer_width = "64", not(miri)))]
    {
        #[repr(C)]
        struct Timespec {
            tv_sec: i64,
            tv_nsec: i64,
        }
        unsafe extern "C" {
            fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec (two 64-bit fields on 64-bit Linux).
        let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        let ok = rc == 0 && ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec);
        ok.then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    #[cfg(not(all(target_os = "linux", target_pointer_width = "64", not(miri))))]
    {
        None
    }
}

/// Runs `f` once; its on-CPU time on this thread ([`thread_cpu_time`]), or its
/// wall-clock time where that clock is unavailable (or did not advance).
pub fn time_on_cpu(f: &mut dyn FnMut()) -> Duration {
    let cpu = thread_cpu_time();
    let wall = Instant::now();
    f();
    let wall = wall.elapsed();
    match (cpu, thread_cpu_time()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => wall,
    }
}

/// f32 per cache line.
const LINE: usize = 16;

const _: () = assert!(gemm::PANEL.is_multiple_of(LINE));

/// One cache line of f32, 64-byte aligned: the storage unit of [`PackedKeys`], so that
/// every panel row (128 bytes) starts on a line boundary.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(64))]
struct Line([f32; LINE]);

/// Keys packed by [`Kernels::pack_keys`] for [`Kernels::qk_tile_packed`]: `K^T` in
/// panels of [`PackedKeys::PANEL`] keys (`d x PANEL` f32 each, zero-padded), 64-byte
/// aligned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedKeys {
    /// `ceil(n / PANEL) * PANEL * d / LINE` lines (`PANEL * d` is a multiple of `LINE`).
    data: Vec<Line>,
    n: usize,
    d: usize,
}

impl PackedKeys {
    /// Keys per panel (the same on every instruction set).
    pub const PANEL: usize = gemm::PANEL;

    /// Bytes of memory held (capacity, not length).
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<Line>()
    }

    /// An empty buffer, to be filled by [`Kernels::pack_keys`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Head dim.
    pub fn head_dim(&self) -> usize {
        self.d
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` around `[f32; LINE]` (size 64, no padding), so the
        // lines are `data.len() * LINE` contiguous, initialised f32.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast(), self.data.len() * LINE) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`; the slice borrows `self` mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.as_mut_ptr().cast(), self.data.len() * LINE)
        }
    }

    /// The panels from key `key_start` on, after checking a packed-key product's
    /// operands: `a` has the keys' head dim, `s` has `a`'s rows and its columns are keys
    /// of this buffer, `key_start` is a multiple of the panel.
    fn panels_from(
        &self,
        what: &str,
        a: &MatRef<'_>,
        key_start: usize,
        s: &MatMut<'_>,
    ) -> Result<&[f32]> {
        if !key_start.is_multiple_of(Self::PANEL) {
            return Err(RopeError::invalid(
                format!("{what} key_start"),
                key_start,
                format!("must be a multiple of {}", Self::PANEL),
            ));
        }
        if a.cols != self.d {
            return Err(shape_err(
                &format!("{what} keys [n, d]"),
                format!("[{}, {}]", self.n, a.cols),
                format!("[{}, {}]", self.n, self.d),
            ));
        }
        if s.rows != a.rows || key_start.saturating_add(s.cols) > self.n {
            return Err(shape_err(
                &format!("{what} S [m, n]"),
                format!("{} rows, key_start + cols <= {}", a.rows, self.n),
                format!("[{}, {}] from key {key_start}", s.rows, s.cols),
            ));
        }
        Ok(&self.as_slice()[key_start * self.d..])
    }

    /// Sizes the buffer for `n` keys of head dim `d`, reusing the allocation, for
    /// [`Kernels::pack_keys_at`]: lines already there keep stale values (only new ones
    /// are zeroed), so every panel must then be packed.
    pub(crate) fn reset(&mut self, n: usize, d: usize) {
        let len = n.div_ceil(Self::PANEL) * Self::PANEL * d;
        self.data.truncate(len / LINE);
        self.data.resize(len / LINE, Line([0.0; LINE]));
        self.n = n;
        self.d = d;
    }

    /// Removes every key (keeps the allocation and the head dim).
    pub fn clear(&mut self) {
        self.data.clear();
        self.n = 0;
    }

    /// Appends keys `k: [m, d]` after the current ones (a KV cache growing by chunks
    /// during decode): the result is what [`Kernels::pack_keys`] gives for all keys.
    /// The first append to an empty buffer sets the head dim.
    ///
    /// Keys of head dim 0 hold no data: appending them only counts them.
    ///
    /// # Errors
    /// [`RopeError::ShapeMismatch`] if the buffer holds keys of another head dim;
    /// [`RopeError::InvalidParameter`] if the key count would overflow `usize`.
    pub fn append(&mut self, k: MatRef<'_>) -> Result<()> {
        if self.n == 0 {
            self.d = k.cols;
        } else if k.cols != self.d {
            return Err(shape_err(
                "PackedKeys::append head dim",
                self.d.to_string(),
                k.cols.to_string(),
            ));
        }
        let total = self.n.checked_add(k.rows).ok_or_else(|| {
            RopeError::invalid(
                "PackedKeys::append rows",
                k.rows,
                format!("must keep the key count ({} + rows) within usize", self.n),
            )
        })?;
        if self.d == 0 {
            self.n = total;
            return Ok(());
        }
        let (p, d) = (Self::PANEL, self.d);
        for r in 0..k.rows {
            let (j, row) = (self.n, k.row(r));
            if j % p == 0 {
                self.data.resize((j + p) * d / LINE, Line([0.0; LINE]));
            }
            let panel = &mut self.as_mut_slice()[(j / p) * p * d..(j / p + 1) * p * d];
            for (x, &v) in panel[j % p..].iter_mut().step_by(p).zip(row) {
                *x = v;
            }
            self.n += 1;
        }
        Ok(())
    }
}

/// A read-only row-major f32 matrix: `rows x cols` elements of `data`, row `i` starting
/// at `i * stride`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

/// A mutable row-major f32 matrix: `rows x cols` elements of `data`, row `i` starting at
/// `i * stride`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

/// Checks that `rows x cols` with `stride` fits in `len` f32.
fn check_layout(rows: usize, cols: usize, stride: usize, len: usize) -> Result<()> {
    if rows > 1 && stride < cols {
        return Err(RopeError::invalid(
            "matrix stride",
            stride,
            format!("must be >= cols ({cols}) when rows > 1"),
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let need = (rows - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(cols));
    match need {
        Some(need) if need <= len => Ok(()),
        _ => Err(shape_err(
            "matrix slice length",
            format!(">= (rows - 1) * stride + cols for [{rows}, {cols}] with stride {stride}"),
            len.to_string(),
        )),
    }
}

impl<'a> MatRef<'a> {
    /// `rows x cols` with row stride `stride` over `data`.
    ///
    /// # Errors
    /// If `stride < cols` (with more than one row) or `data` is shorter than
    /// `(rows - 1) * stride + cols`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Result<Self> {
        check_layout(rows, cols, stride, data.len())?;
        Ok(MatRef {
            data,
            rows,
            cols,
            stride,
        })
    }

    /// A contiguous `rows x cols` matrix (stride `cols`).
    ///
    /// # Errors
    /// If `data` is shorter than `rows * cols`.
    pub fn contiguous(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        MatRef::new(data, rows, cols, cols)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row stride, in elements.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Row `i` (`cols` elements).
    ///
    /// # Panics
    /// If `i >= rows`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        assert!(i < self.rows, "row {i} of {}", self.rows);
        if self.cols == 0 {
            // `[rows, 0]` may have any stride over any slice: no offset is formed.
            return &self.data[..0];
        }
        &self.data[i * self.stride..i * self.stride + self.cols]
    }

    /// Rows `start .. start + len` (clamped to the matrix).
    pub fn sub_rows(&self, start: usize, len: usize) -> MatRef<'a> {
        let start = start.min(self.rows);
        let len = len.min(self.rows - start);
        let off = start.saturating_mul(self.stride).min(self.data.len());
        MatRef {
            data: &self.data[off..],
            rows: len,
            cols: self.cols,
            stride: self.stride,
        }
    }

    fn as_ptr(&self) -> *const f32 {
        self.data.as_ptr()
    }
}

impl<'a> MatMut<'a> {
    /// `rows x cols` with row stride `stride` over `data`.
    ///
    /// # Errors
    /// If `stride < cols` (with more than one row) or `data` is shorter than
    /// `(rows - 1) * stride + cols`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, stride: usize) -> Result<Self> {
        check_layout(rows, cols, stride, data.len())?;
        Ok(MatMut {
            data,
            rows,
            cols,
            stride,
        })
    }

    /// A contiguous `rows x cols` matrix (stride `cols`).
    ///
    /// # Errors
    /// If `data` is shorter than `rows * cols`.
    pub fn contiguous(data: &'a mut [f32], rows: usize, cols: usize) -> Result<Self> {
        MatMut::new(data, rows, cols, cols)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row stride, in elements.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Row `i` (`cols` elements).
    ///
    /// # Panics
    /// If `i >= rows`.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows, "row {i} of {}", self.rows);
        if self.cols == 0 {
            return &mut self.data[..0];
        }
        &mut self.data[i * self.stride..i * self.stride + self.cols]
    }

    /// A read-only view.
    pub fn view(&self) -> MatRef<'_> {
        MatRef {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            stride: self.stride,
        }
    }

    /// Reborrows rows `start .. start + len` (clamped to the matrix).
    pub fn sub_rows_mut(&mut self, start: usize, len: usize) -> MatMut<'_> {
        let start = start.min(self.rows);
        let len = len.min(self.rows - start);
        let off = start.saturating_mul(self.stride).min(self.data.len());
        MatMut {
            data: &mut self.data[off..],
            rows: len,
            cols: self.cols,
            stride: self.stride,
        }
    }

    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.data.as_mut_ptr()
    }
}
