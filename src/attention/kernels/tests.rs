//! Unit tests: every instruction set against an f64 oracle and against the portable
//! path, on odd sizes, strides and edge values.
//!
//! Under Miri (`cargo +nightly miri test --lib attention::kernels`) only the portable
//! path exists ([`Kernels::with_isa`]), the size grids are smaller, and the proptest
//! blocks and the OS-clock test are left out, so that Miri checks the pointer
//! arithmetic of every primitive in reasonable time.

use super::simd::expc;
use super::*;
#[cfg(not(miri))]
use proptest::prelude::*;

/// Sizes around every SIMD lane and register-block boundary, plus a few odd ones.
#[cfg(not(miri))]
const SIZES: [usize; 7] = [1, 3, 17, 63, 65, 127, 129];
/// Under Miri: one size below, at and above a vector of every instruction set.
#[cfg(miri)]
const SIZES: [usize; 3] = [1, 3, 17];

/// Step between the f32 bit patterns of `exp`'s dense grid.
const GRID_STEP: u32 = if cfg!(miri) { 9_700_001 } else { 97 };

/// A small deterministic generator (xorshift64*), values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 40) as f32) / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Sentinel written around matrices to catch out-of-bounds writes.
const GUARD: f32 = 1234.5;

/// A strided buffer: `rows x cols` values in a buffer with row stride `stride` and
/// `GUARD` everywhere else (padding and a tail).
struct Buf {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Buf {
    fn new(rng: &mut Rng, rows: usize, cols: usize, pad: usize) -> Buf {
        let stride = cols + pad;
        let mut data = vec![GUARD; rows * stride + 7];
        for i in 0..rows {
            for j in 0..cols {
                data[i * stride + j] = rng.next();
            }
        }
        Buf {
            data,
            rows,
            cols,
            stride,
        }
    }
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.stride + j]
    }
    fn r(&self) -> MatRef<'_> {
        MatRef::new(&self.data, self.rows, self.cols, self.stride).unwrap()
    }
    fn w(&mut self) -> MatMut<'_> {
        MatMut::new(&mut self.data, self.rows, self.cols, self.stride).unwrap()
    }
    /// Every element outside the matrix still holds `GUARD`.
    fn guards_intact(&self) -> bool {
        self.data.iter().enumerate().all(|(x, &v)| {
            let (i, j) = (x / self.stride, x % self.stride);
            (i < self.rows && j < self.cols) || v == GUARD
        })
    }
}

/// Checks `got[i][j]` against `exact` within `tol(d) * sum_abs`.
fn check_close(
    what: &str,
    isa: Isa,
    got: &Buf,
    exact: &[f64],
    sum_abs: &[f64],
    d: usize,
) -> std::result::Result<(), String> {
    let eps = f32::EPSILON as f64;
    for i in 0..got.rows {
        for j in 0..got.cols {
            let e = exact[i * got.cols + j];
            let g = got.at(i, j) as f64;
            // Worst-case f32 summation bound, a little loose: (d + 2) eps sum |a b|.
            let tol = (d as f64 + 2.0) * eps * sum_abs[i * got.cols + j] + 1e-30;
            if (g - e).abs() > tol {
                return Err(format!(
                    "{what} {isa:?} [{i}, {j}]: got {g}, exact {e}, tol {tol}"
                ));
            }
        }
    }
    if !got.guards_intact() {
        return Err(format!("{what} {isa:?}: wrote outside the matrix"));
    }
    Ok(())
}

fn run_qk(
    m: usize,
    n: usize,
    d: usize,
    pads: (usize, usize, usize),
    scale: f32,
    seed: u64,
) -> std::result::Result<(), String> {
    let mut rng = Rng(seed | 1);
    let a = Buf::new(&mut rng, m, d, pads.0);
    let b = Buf::new(&mut rng, n, d, pads.1);
    let mut exact = vec![0f64; m * n];
    let mut sum_abs = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for k in 0..d {
                let p = a.at(i, k) as f64 * b.at(j, k) as f64;
                exact[i * n + j] += p;
                sum_abs[i * n + j] += p.abs();
            }
            exact[i * n + j] *= scale as f64;
            sum_abs[i * n + j] *= (scale as f64).abs();
        }
    }
    let mut outs = Vec::new();
    let mut packed = PackedKeys::new();
    for kern in Kernels::all_supported() {
        kern.pack_keys(b.r(), &mut packed);
        for (what, run) in [("qk_tile", 0), ("qk_gemv", 1), ("qk_tile_packed", 2)] {
            let mut s = Buf::new(&mut rng, m, n, pads.2);
            match run {
                0 => kern.qk_tile(a.r(), b.r(), s.w(), scale).unwrap(),
                1 => kern.qk_gemv(a.r(), b.r(), s.w(), scale).unwrap(),
                _ => kern
                    .qk_tile_packed(a.r(), &packed, 0, s.w(), scale)
                    .unwrap(),
            }
            check_close(what, kern.isa(), &s, &exact, &sum_abs, d)
                .map_err(|e| format!("{e} (m {m}, n {n}, d {d}, pads {pads:?})"))?;
            outs.push(s);
        }
    }
    // Every path agrees with the first (portable) one within twice the bound.
    let twice: Vec<f64> = sum_abs.iter().map(|x| 2.0 * x).collect();
    let portable: Vec<f64> = (0..m * n)
        .map(|x| outs[0].at(x / n, x % n) as f64)
        .collect();
    for s in &outs[1..] {
        check_close("vs portable", Isa::Portable, s, &portable, &twice, d)?;
    }
    Ok(())
}

fn run_pv(
    m: usize,
    k: usize,
    n: usize,
    pads: (usize, usize, usize),
    seed: u64,
) -> std::result::Result<(), String> {
    let mut rng = Rng(seed | 1);
    let p = Buf::new(&mut rng, m, k, pads.0);
    let v = Buf::new(&mut rng, k, n, pads.1);
    let o0 = Buf::new(&mut rng, m, n, pads.2);
    let mut exact = vec![0f64; m * n];
    let mut sum_abs = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let init = o0.at(i, j) as f64;
            exact[i * n + j] = init;
            sum_abs[i * n + j] = init.abs();
            for x in 0..k {
                let t = p.at(i, x) as f64 * v.at(x, j) as f64;
                exact[i * n + j] += t;
                sum_abs[i * n + j] += t.abs();
            }
        }
    }
    for kern in Kernels::all_supported() {
        for gemv in [false, true] {
            let mut o = Buf {
                data: o0.data.clone(),
                ..o0
            };
            if gemv {
                kern.pv_gemv(p.r(), v.r(), o.w()).unwrap();
            } else {
                kern.pv_tile(p.r(), v.r(), o.w()).unwrap();
            }
            let what = if gemv { "pv_gemv" } else { "pv_tile" };
            check_close(what, kern.isa(), &o, &exact, &sum_abs, k + 1)
                .map_err(|e| format!("{e} (m {m}, k {k}, n {n}, pads {pads:?})"))?;
        }
    }
    Ok(())
}

#[test]
fn every_isa_is_listed_and_portable_always_exists() {
    let all = Kernels::all_supported();
    assert_eq!(all[0].isa(), Isa::Portable);
    assert!(all.iter().any(|k| k.isa() == Isa::best()));
    assert!(Kernels::active().isa() <= Isa::best());
    assert_eq!(
        Kernels::portable(),
        Kernels::with_isa(Isa::Portable).unwrap()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && !cfg!(miri) {
        assert_eq!(Isa::best(), Isa::Avx512);
    }
}

#[test]
fn env_override_caps_the_active_isa() {
    // Whatever the environment: a known ROPEX_KERNELS caps the choice, anything else
    // leaves the best one. (CI can run the suite with ROPEX_KERNELS=portable.)
    let cap = std::env::var(ISA_ENV)
        .ok()
        .and_then(|v| Isa::ALL.into_iter().find(|i| i.name() == v.trim()));
    let want = cap.map_or(Isa::best(), |c| c.min(Isa::best()));
    assert_eq!(Kernels::active().isa(), want);
}

#[test]
fn qk_odd_sizes() {
    let mut seed = 1;
    for &m in &SIZES {
        for &n in &SIZES {
            for &d in &SIZES {
                seed += 1;
                run_qk(m, n, d, (0, 0, 0), 0.125, seed).unwrap();
            }
        }
    }
}

#[test]
fn qk_strides_and_long_head_dim() {
    // Strides, and a head dim longer than one packed panel (256 for 32-wide panels).
    run_qk(9, 33, 300, (3, 1, 5), 1.0, 7).unwrap();
    run_qk(64, 64, 128, (1, 17, 2), 0.088, 8).unwrap();
    run_qk(128, 64, 128, (0, 0, 3), 1.0, 9).unwrap();
    run_qk(17, 65, 513, (2, 2, 2), -0.5, 10).unwrap();
    // Decode-like: few queries against many keys (qk_gemv splits > 8 queries).
    for g in 1..=12 {
        run_qk(g, 1000, 128, (0, 0, 0), 0.1, 11 + g as u64).unwrap();
    }
}

#[test]
fn qk_packed_key_ranges_and_portable_layout() {
    let mut rng = Rng(5);
    let (m, n, d) = (17, 200, 72);
    let a = Buf::new(&mut rng, m, d, 3);
    let b = Buf::new(&mut rng, n, d, 1);
    let mut packed = PackedKeys::new();
    let mut by_isa = Vec::new();
    for kern in Kernels::all_supported() {
        kern.pack_keys(b.r(), &mut packed);
        assert_eq!((packed.len(), packed.head_dim()), (n, d));
        by_isa.push(packed.clone());
        for (start, len) in [(0, 200), (32, 64), (64, 1), (192, 8), (160, 33), (96, 0)] {
            let mut s = Buf::new(&mut rng, m, len, 2);
            kern.qk_tile_packed(a.r(), &packed, start, s.w(), 0.3)
                .unwrap();
            let keys = MatRef::new(&b.data[start * b.stride..], len, d, b.stride).unwrap();
            let mut want = Buf::new(&mut rng, m, len, 2);
            kern.qk_tile(a.r(), keys, want.w(), 0.3).unwrap();
            // Same micro-kernel, same order of operations: bitwise equal.
            assert_eq!(s.data, want.data, "{:?} keys {start}..+{len}", kern.isa());
        }
        let mut s = vec![0f32; m * 8];
        let err = |start, cols: usize, s: &mut [f32]| {
            kern.qk_tile_packed(
                a.r(),
                &packed,
                start,
                MatMut::contiguous(s, m, cols).unwrap(),
                1.0,
            )
            .is_err()
        };
        assert!(err(1, 8, &mut s)); // not a panel boundary
        assert!(err(224, 1, &mut s)); // past the end
        assert!(err(192, 9, &mut vec![0f32; m * 9])); // 201 > 200 keys
        let short = Buf::new(&mut rng, m, d + 1, 0);
        assert!(
            kern.qk_tile_packed(
                short.r(),
                &packed,
                0,
                MatMut::contiguous(&mut s, m, 8).unwrap(),
                1.0
            )
            .is_err()
        );
    }
    // The packed layout does not depend on the instruction set.
    assert!(by_isa.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn packed_keys_append_matches_pack() {
    let mut rng = Rng(17);
    for (n, d) in [(0, 5), (1, 1), (31, 7), (32, 8), (33, 128), (100, 65)] {
        let b = Buf::new(&mut rng, n, d, 2);
        let mut whole = PackedKeys::new();
        Kernels::active().pack_keys(b.r(), &mut whole);
        // Appended in uneven chunks: 1, 2, 3, ... rows.
        let mut grown = PackedKeys::new();
        let (mut r, mut chunk) = (0, 1);
        while r < n {
            let len = chunk.min(n - r);
            grown.append(b.r().sub_rows(r, len)).unwrap();
            r += len;
            chunk += 1;
        }
        if n == 0 {
            grown.append(b.r()).unwrap();
        }
        assert_eq!(grown, whole, "n {n}, d {d}");
        let other = Buf::new(&mut rng, 1, d + 1, 0);
        assert_eq!(grown.append(other.r()).is_err(), n > 0);
        grown.clear();
        assert!(grown.is_empty());
    }
}

#[test]
fn qk_empty_dims() {
    for k in Kernels::all_supported() {
        // d = 0: scores are zero.
        let mut s = vec![GUARD; 6];
        k.qk_tile(
            MatRef::new(&[], 2, 0, 0).unwrap(),
            MatRef::new(&[], 3, 0, 0).unwrap(),
            MatMut::contiguous(&mut s, 2, 3).unwrap(),
            1.0,
        )
        .unwrap();
        assert_eq!(s, vec![0.0; 6]);
        // No rows or no keys: nothing to do, nothing touched.
        let a = [1.0f32; 8];
        k.qk_tile(
            MatRef::new(&a, 0, 4, 4).unwrap(),
            MatRef::new(&a, 2, 4, 4).unwrap(),
            MatMut::new(&mut [], 0, 2, 2).unwrap(),
            1.0,
        )
        .unwrap();
        k.qk_gemv(
            MatRef::new(&a, 2, 4, 4).unwrap(),
            MatRef::new(&[], 0, 4, 4).unwrap(),
            MatMut::new(&mut [], 2, 0, 0).unwrap(),
            1.0,
        )
        .unwrap();
    }
}

/// `[rows, 0]` matrices may carry any stride over any slice (they hold no element), so
/// no kernel may offset a pointer by `row * stride` for them: a stride of `2^40` over an
/// empty slice must give empty dot products, and a stride near `usize::MAX / 2` (where
/// `row * stride` overflows) must not panic either.
#[test]
fn zero_width_matrices_with_any_stride() {
    for kern in Kernels::all_supported() {
        for stride in [1usize << 40, usize::MAX / 2] {
            let keys = MatRef::new(&[], 9, 0, stride).unwrap();
            for g in [1, 3, 8, 11] {
                let q = MatRef::new(&[], g, 0, stride).unwrap();
                let mut s = vec![GUARD; g * 9];
                kern.qk_gemv(q, keys, MatMut::contiguous(&mut s, g, 9).unwrap(), 2.0)
                    .unwrap();
                assert_eq!(s, vec![0.0; g * 9], "qk_gemv {:?} g {g}", kern.isa());
                let mut s = vec![GUARD; g * 9];
                kern.qk_tile(q, keys, MatMut::contiguous(&mut s, g, 9).unwrap(), 2.0)
                    .unwrap();
                assert_eq!(s, vec![0.0; g * 9], "qk_tile {:?} g {g}", kern.isa());
            }
            // Packing `[9, 0]` keys gives 9 keys of head dim 0 and no data.
            let mut packed = PackedKeys::new();
            kern.pack_keys(keys, &mut packed);
            assert_eq!((packed.len(), packed.head_dim()), (9, 0));
            let mut s = vec![GUARD; 2 * 9];
            kern.qk_tile_packed(
                MatRef::new(&[], 2, 0, stride).unwrap(),
                &packed,
                0,
                MatMut::contiguous(&mut s, 2, 9).unwrap(),
                1.0,
            )
            .unwrap();
            assert_eq!(s, vec![0.0; 18]);
            // `O += P V` with `dv = 0`, and with `k = 0`, touches nothing.
            let p = [1.0f32; 18];
            let mut o: Vec<f32> = Vec::new();
            kern.pv_tile(
                MatRef::contiguous(&p, 2, 9).unwrap(),
                keys,
                MatMut::new(&mut o, 2, 0, stride).unwrap(),
            )
            .unwrap();
            kern.pv_gemv(
                MatRef::contiguous(&p, 2, 9).unwrap(),
                keys,
                MatMut::new(&mut o, 2, 0, stride).unwrap(),
            )
            .unwrap();
            let mut o = vec![3.0f32; 4];
            kern.pv_gemv(
                MatRef::new(&[], 2, 0, stride).unwrap(),
                MatRef::new(&[], 0, 2, 2).unwrap(),
                MatMut::contiguous(&mut o, 2, 2).unwrap(),
            )
            .unwrap();
            assert_eq!(o, vec![3.0; 4]);
            // Zero-width rows are empty slices, whatever the stride.
            assert!(keys.row(8).is_empty());
            assert_eq!(keys.sub_rows(5, 9).rows(), 4);
        }
    }
}

/// Head dim 0 in `pack_keys` and `PackedKeys::append`: keys are counted, nothing is
/// stored, nothing panics; a later append of another head dim is a shape error.
#[test]
fn packed_keys_with_head_dim_zero() {
    for kern in Kernels::all_supported() {
        let empty = MatRef::new(&[], 40, 0, 0).unwrap();
        let mut whole = PackedKeys::new();
        kern.pack_keys(empty, &mut whole);
        let mut grown = PackedKeys::new();
        for chunk in [1, 2, 30, 7] {
            grown.append(empty.sub_rows(0, chunk)).unwrap();
        }
        assert_eq!(grown, whole);
        assert_eq!((grown.len(), grown.head_dim()), (40, 0));
        let one = [1.0f32];
        assert!(
            grown
                .append(MatRef::contiguous(&one, 1, 1).unwrap())
                .is_err()
        );
        let huge = MatRef::new(&[], usize::MAX, 0, 0).unwrap();
        assert!(grown.append(huge).is_err(), "40 + usize::MAX keys");
        assert_eq!(grown.len(), 40);
    }
}

/// Outputs of one to three columns in slices of exactly their size (no slack after the
/// last element), against f64: the masked tail vectors of the micro-kernels must stay
/// inside the slice (under Miri, forming a pointer past it fails the test).
#[test]
fn narrow_outputs_in_exact_slices() {
    let mut rng = Rng(99);
    for kern in Kernels::all_supported() {
        for cols in 1..=3 {
            for rows in [1, 2, 5, 9] {
                let d = 5;
                let a = rng.vec(rows * d);
                let b = rng.vec(cols * d);
                let exact = |i: usize, j: usize| -> f64 {
                    (0..d)
                        .map(|x| a[i * d + x] as f64 * b[j * d + x] as f64)
                        .sum()
                };
                let (ar, br) = (
                    MatRef::contiguous(&a, rows, d).unwrap(),
                    MatRef::contiguous(&b, cols, d).unwrap(),
                );
                let mut packed = PackedKeys::new();
                kern.pack_keys(br, &mut packed);
                for run in 0..3 {
                    let mut s = vec![0f32; rows * cols];
                    let sm = MatMut::contiguous(&mut s, rows, cols).unwrap();
                    match run {
                        0 => kern.qk_tile(ar, br, sm, 1.0).unwrap(),
                        1 => kern.qk_gemv(ar, br, sm, 1.0).unwrap(),
                        _ => kern.qk_tile_packed(ar, &packed, 0, sm, 1.0).unwrap(),
                    }
                    for i in 0..rows {
                        for j in 0..cols {
                            let e = exact(i, j);
                            let g = s[i * cols + j] as f64;
                            assert!(
                                (g - e).abs() < 1e-5,
                                "{:?} run {run}: {g} vs {e}",
                                kern.isa()
                            );
                        }
                    }
                }
                // `O += P V` with V `[d, cols]` and O `[rows, cols]` in exact slices.
                let v = rng.vec(d * cols);
                for gemv in [false, true] {
                    let mut o = vec![1f32; rows * cols];
                    let (pr, vr) = (
                        MatRef::contiguous(&a, rows, d).unwrap(),
                        MatRef::contiguous(&v, d, cols).unwrap(),
                    );
                    let om = MatMut::contiguous(&mut o, rows, cols).unwrap();
                    if gemv {
                        kern.pv_gemv(pr, vr, om).unwrap();
                    } else {
                        kern.pv_tile(pr, vr, om).unwrap();
                    }
                    for i in 0..rows {
                        for j in 0..cols {
                            let e = 1.0
                                + (0..d)
                                    .map(|x| a[i * d + x] as f64 * v[x * cols + j] as f64)
                                    .sum::<f64>();
                            let g = o[i * cols + j] as f64;
                            assert!((g - e).abs() < 1e-5, "{:?} pv: {g} vs {e}", kern.isa());
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn pv_odd_sizes() {
    let mut seed = 100;
    for &m in &SIZES {
        for &k in &SIZES {
            for &n in &SIZES {
                seed += 1;
                run_pv(m, k, n, (0, 0, 0), seed).unwrap();
            }
        }
    }
}

#[test]
fn pv_strides_long_k_and_decode_shapes() {
    run_pv(9, 600, 33, (3, 1, 5), 1).unwrap();
    run_pv(64, 64, 128, (1, 17, 2), 2).unwrap();
    for g in 1..=10 {
        run_pv(g, 1000, 128, (0, 0, 0), 3 + g as u64).unwrap();
        run_pv(g, 300, 80, (2, 3, 1), 30 + g as u64).unwrap();
    }
    // k = 0 leaves O unchanged.
    for kern in Kernels::all_supported() {
        let mut o = vec![2.0f32; 4];
        kern.pv_tile(
            MatRef::new(&[], 2, 0, 0).unwrap(),
            MatRef::new(&[], 0, 2, 2).unwrap(),
            MatMut::contiguous(&mut o, 2, 2).unwrap(),
        )
        .unwrap();
        assert_eq!(o, vec![2.0; 4]);
    }
}

#[test]
fn shape_and_layout_errors() {
    let d = vec![0f32; 16];
    assert!(MatRef::new(&d, 4, 4, 4).is_ok());
    assert!(MatRef::new(&d, 4, 4, 5).is_err()); // 3 * 5 + 4 > 16
    assert!(MatRef::new(&d, 2, 4, 3).is_err()); // stride < cols
    assert!(MatRef::new(&d, 1, 16, 0).is_ok()); // one row: stride unused
    assert!(MatRef::new(&d, usize::MAX, 2, usize::MAX).is_err()); // overflow
    let mut s = vec![0f32; 16];
    let k = Kernels::active();
    let a = MatRef::new(&d, 2, 4, 4).unwrap();
    let b = MatRef::new(&d, 3, 4, 4).unwrap();
    let b5 = MatRef::new(&d, 3, 5, 5).unwrap();
    assert!(
        k.qk_tile(a, b5, MatMut::contiguous(&mut s, 2, 3).unwrap(), 1.0)
            .is_err()
    );
    assert!(
        k.qk_tile(a, b, MatMut::contiguous(&mut s, 3, 2).unwrap(), 1.0)
            .is_err()
    );
    assert!(
        k.qk_gemv(a, b, MatMut::contiguous(&mut s, 2, 4).unwrap(), 1.0)
            .is_err()
    );
    let v = MatRef::new(&d, 4, 3, 3).unwrap();
    assert!(
        k.pv_tile(a, v, MatMut::contiguous(&mut s, 2, 3).unwrap())
            .is_ok()
    );
    assert!(
        k.pv_tile(a, v, MatMut::contiguous(&mut s, 2, 4).unwrap())
            .is_err()
    );
    assert!(
        k.pv_gemv(a, b, MatMut::contiguous(&mut s, 2, 4).unwrap())
            .is_err()
    );
}

/// `exp` on `x` against f64, with the documented special cases.
fn check_exp(isa: Isa, x: f32, got: f32) -> std::result::Result<(), String> {
    let want = (x as f64).exp();
    let ok = if x.is_nan() {
        got.is_nan()
    } else if x < expc::LO {
        got == 0.0 && got.is_sign_positive()
    } else if x > expc::HI {
        got == f32::INFINITY
    } else {
        ((got as f64 - want) / want).abs() < 1e-6
    };
    if ok {
        Ok(())
    } else {
        Err(format!("exp {isa:?}: exp({x:e}) = {got:e}, want {want:e}"))
    }
}

#[test]
fn exp_thresholds_are_the_f32_limits() {
    assert!((expc::LO as f64).exp() >= f32::MIN_POSITIVE as f64);
    assert!(((expc::LO as f64) - 1e-5).exp() < f32::MIN_POSITIVE as f64);
    assert!((expc::HI as f64).exp() <= f32::MAX as f64);
    assert!((f32::from_bits(expc::HI.to_bits() + 1) as f64).exp() > f32::MAX as f64);
}

#[test]
fn exp_is_accurate_on_a_dense_grid_and_edges() {
    // Every GRID_STEP-th f32 in [-87.4, 88.8] (~23M values; about 230 under
    // Miri), plus the edges.
    let mut xs: Vec<f32> = Vec::new();
    let (lo, hi) = (-87.4f32, 88.8f32);
    let mut bits = lo.to_bits();
    while f32::from_bits(bits) < 0.0 {
        xs.push(f32::from_bits(bits));
        bits -= GRID_STEP; // toward zero
    }
    let mut bits = 0u32;
    while f32::from_bits(bits) < hi {
        xs.push(f32::from_bits(bits));
        bits += GRID_STEP;
    }
    xs.extend([
        0.0,
        -0.0,
        1.0,
        -1.0,
        expc::LO,
        expc::HI,
        f32::from_bits(expc::LO.to_bits() + 1),
        f32::from_bits(expc::HI.to_bits() + 1),
        -87.0,
        -100.0,
        -1e4,
        -1e30,
        100.0,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-30,
        0.5 * std::f32::consts::LN_2,
        -0.5 * std::f32::consts::LN_2,
    ]);
    for k in Kernels::all_supported() {
        let mut y = xs.clone();
        k.exp(&mut y);
        for (&x, &g) in xs.iter().zip(&y) {
            check_exp(k.isa(), x, g).unwrap();
        }
        // No subnormal output anywhere.
        assert!(y.iter().all(|v| !v.is_subnormal()), "{:?}", k.isa());
    }
}

#[test]
fn exp_tails_every_length() {
    for k in Kernels::all_supported() {
        for len in 0..40 {
            let xs: Vec<f32> = (0..len).map(|i| -(i as f32) * 0.37).collect();
            let mut y = xs.clone();
            k.exp(&mut y);
            for (&x, &g) in xs.iter().zip(&y) {
                check_exp(k.isa(), x, g).unwrap();
            }
        }
    }
}

#[test]
fn exp_sub_sum_and_row_max() {
    let mut rng = Rng(99);
    for k in Kernels::all_supported() {
        for len in [
            0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 1000,
        ] {
            let xs: Vec<f32> = rng.vec(len).iter().map(|x| x * 30.0).collect();
            let max = k.row_max(&xs);
            let want = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max, want, "{:?} len {len}", k.isa());
            let mut y = xs.clone();
            let sum = k.exp_sub_sum(&mut y, max);
            let mut want_sum = 0f64;
            for (&x, &g) in xs.iter().zip(&y) {
                let e = (x as f64 - max as f64).exp();
                want_sum += e;
                // x - max is rounded in f32 first: allow that rounding too.
                let tol = 1e-6 + (x - max).abs() as f64 * f32::EPSILON as f64;
                assert!(
                    ((g as f64 - e) / e).abs() < tol,
                    "{:?} exp({x} - {max}) = {g}, want {e}",
                    k.isa()
                );
            }
            let tol = 1e-6 * want_sum.max(1.0) + (len as f64) * 1e-7 * want_sum;
            assert!(
                (sum as f64 - want_sum).abs() <= tol,
                "{:?} len {len}: sum {sum}, want {want_sum}",
                k.isa()
            );
        }
    }
}

#[test]
fn masked_rows_nan_and_infinities() {
    for k in Kernels::all_supported() {
        // A fully masked row: max -inf, exps zero, sum zero (never NaN).
        let mut row = vec![f32::NEG_INFINITY; 37];
        let m = k.row_max(&row);
        assert_eq!(m, f32::NEG_INFINITY);
        assert_eq!(k.exp_sub_sum(&mut row, m), 0.0);
        assert!(row.iter().all(|&x| x == 0.0));
        // Partly masked: masked entries exp to exactly 0.
        let mut row: Vec<f32> = (0..37)
            .map(|i| {
                if i % 3 == 0 {
                    f32::NEG_INFINITY
                } else {
                    i as f32 * 0.1
                }
            })
            .collect();
        let m = k.row_max(&row);
        assert_eq!(m, 3.5);
        let sum = k.exp_sub_sum(&mut row, m);
        assert!(sum.is_finite() && sum > 1.0);
        assert!(row.iter().step_by(3).all(|&x| x == 0.0));
        // NaN is ignored by the max but propagates through exp and the sum.
        let mut row = vec![1.0f32; 20];
        row[5] = f32::NAN;
        row[19] = f32::NAN;
        assert_eq!(k.row_max(&row), 1.0);
        assert_eq!(k.row_max(&[f32::NAN; 5]), f32::NEG_INFINITY);
        assert_eq!(k.row_max(&[]), f32::NEG_INFINITY);
        assert!(k.exp_sub_sum(&mut row, 1.0).is_nan());
        assert!(row[5].is_nan() && row[0] == 1.0);
        // Huge finite logits: no NaN after max subtraction.
        let mut row = vec![1e4f32, -1e4, 0.0, 1e4];
        let m = k.row_max(&row);
        let sum = k.exp_sub_sum(&mut row, m);
        assert_eq!(sum, 2.0);
        assert_eq!(row, vec![1.0, 0.0, 0.0, 1.0]);
    }
}

#[test]
fn exp_sub_sum_at_max_zero_is_exp_bit_for_bit() {
    // `exp_sub_sum` takes the x <= 0 exponential: it must agree with `exp` on every
    // non-positive input, the clamps and -inf included (NaN stays NaN).
    let mut xs: Vec<f32> = Vec::new();
    let mut bits = (-104.0f32).to_bits();
    while f32::from_bits(bits) < 0.0 {
        xs.push(f32::from_bits(bits));
        bits -= GRID_STEP * 3;
    }
    xs.extend([
        0.0,
        -0.0,
        expc::LO,
        f32::from_bits(expc::LO.to_bits() + 1),
        f32::from_bits(expc::LO.to_bits() - 1),
        -1e30,
        f32::MIN,
        f32::NEG_INFINITY,
        -f32::MIN_POSITIVE,
        f32::NAN,
    ]);
    for k in Kernels::all_supported() {
        let mut want = xs.clone();
        k.exp(&mut want);
        let mut got = xs.clone();
        k.exp_sub_sum(&mut got, 0.0);
        for ((&x, &w), &g) in xs.iter().zip(&want).zip(&got) {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{:?}: exp({x}) = {w}, exp_sub_sum gave {g}",
                k.isa()
            );
        }
    }
}

/// The online-softmax state of `rows` rows, filled with values a fold meets midway.
fn midway_state(
    rng: &mut Rng,
    rows: usize,
    dv: usize,
) -> (Vec<f32>, Vec<f32>, Vec<bool>, Vec<f32>) {
    let m = (0..rows)
        .map(|a| match a % 4 {
            0 => f32::NEG_INFINITY,
            1 => 40.0,
            _ => rng.next() * 10.0,
        })
        .collect();
    let l = (0..rows)
        .map(|a| {
            if a % 4 == 0 {
                0.0
            } else {
                1.0 + rng.next().abs()
            }
        })
        .collect();
    let seen = (0..rows).map(|a| a % 4 != 0).collect();
    (m, l, seen, rng.vec(rows * dv))
}

#[test]
fn fold_rows_equals_the_row_by_row_update() {
    let mut rng = Rng(2024);
    for k in Kernels::all_supported() {
        for (rows, bk, dv) in [
            (1, 1, 1),
            (7, 17, 3),
            (16, 64, 128),
            (33, 64, 64),
            (64, 31, 5),
            (20, 0, 4),
        ] {
            let scores: Vec<f32> = (0..rows * bk)
                .map(|i| match i % 11 {
                    3 => f32::NEG_INFINITY,
                    _ => rng.next() * 30.0,
                })
                .collect();
            // Every third row sees nothing; one row all -inf.
            let visible: Vec<usize> = (0..rows).map(|a| if a % 3 == 2 { 0 } else { bk }).collect();
            let mut scores = scores;
            if rows > 4 && bk > 0 {
                scores[4 * bk..5 * bk].fill(f32::NEG_INFINITY);
            }
            for vis in [None, Some(&visible[..])] {
                let (m0, l0, seen0, acc0) = midway_state(&mut rng, rows, dv);
                // Reference: the primitives row by row.
                let (mut m1, mut l1, mut seen1, mut acc1, mut s1) = (
                    m0.clone(),
                    l0.clone(),
                    seen0.clone(),
                    acc0.clone(),
                    scores.clone(),
                );
                for a in 0..rows {
                    if bk == 0 || vis.is_some_and(|v| v[a] == 0) {
                        continue;
                    }
                    let row = &mut s1[a * bk..(a + 1) * bk];
                    seen1[a] = true;
                    let m_new = m1[a].max(k.row_max(row));
                    let base = if m_new == f32::NEG_INFINITY {
                        0.0
                    } else {
                        m_new
                    };
                    let corr = (m1[a] - base).exp();
                    m1[a] = m_new;
                    if corr != 1.0 {
                        k.scale(&mut acc1[a * dv..(a + 1) * dv], corr);
                        l1[a] *= corr;
                    }
                    l1[a] += k.exp_sub_sum(row, base);
                }
                let (mut m2, mut l2, mut seen2, mut acc2, mut s2) = (
                    m0.clone(),
                    l0.clone(),
                    seen0.clone(),
                    acc0.clone(),
                    scores.clone(),
                );
                let state = RowsMut {
                    m: &mut m2,
                    l: &mut l2,
                    seen: &mut seen2,
                    acc: &mut acc2,
                    dv,
                };
                k.fold_rows(&mut s2, bk, vis, state);
                let what = format!(
                    "{:?} rows {rows} bk {bk} dv {dv} visible {}",
                    k.isa(),
                    vis.is_some()
                );
                assert_eq!(m1, m2, "{what}");
                assert_eq!(seen1, seen2, "{what}");
                assert_eq!(acc1, acc2, "{what}");
                assert!(
                    s1.iter().zip(&s2).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}"
                );
                // Only the order of a row's additions differs.
                for (a, (&x, &y)) in l1.iter().zip(&l2).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                        "{what} row {a}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn scale_rows() {
    for k in Kernels::all_supported() {
        for len in [0, 1, 5, 16, 17, 100] {
            let mut x: Vec<f32> = (0..len).map(|i| i as f32).collect();
            k.scale(&mut x, 0.5);
            assert!(x.iter().enumerate().all(|(i, &v)| v == i as f32 * 0.5));
        }
    }
}

#[test]
fn fma_loop_counts_flops_and_stays_finite() {
    for k in Kernels::all_supported() {
        let v = k.fma_loop(10_000);
        assert!(v.is_finite() && v > 0.0, "{:?}: {v}", k.isa());
        let per_iter = k.fma_loop_flops(1);
        assert!(per_iter >= 2 * k.isa().lanes() as u64);
        assert_eq!(k.fma_loop_flops(10), 10 * per_iter);
        assert!(k.fma_peak_gflops(Duration::from_millis(5)) > 0.0);
        // The peak is flops over the time the given clock reports: a clock that says
        // 1 ms per run gives exactly `flops(100_000) / 1e-3 / 1e9`.
        let mut runs = 0;
        let peak = k.fma_peak_gflops_with(Duration::ZERO, |f| {
            f();
            runs += 1;
            Duration::from_millis(1)
        });
        assert_eq!(runs, 1);
        assert_eq!(peak, k.fma_loop_flops(100_000) as f64 / 1e-3 / 1e9);
    }
}

/// On-CPU time of this thread advances with work done on it (64-bit Linux) and not
/// with time spent asleep.
#[test]
#[cfg(all(target_os = "linux", target_pointer_width = "64", not(miri)))]
fn thread_cpu_time_counts_work_not_sleep() {
    let a = thread_cpu_time().expect("CLOCK_THREAD_CPUTIME_ID on Linux");
    std::thread::sleep(Duration::from_millis(50));
    let b = thread_cpu_time().unwrap();
    assert!(
        b - a < Duration::from_millis(25),
        "sleep counted: {:?}",
        b - a
    );
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_millis(20) {
        std::hint::black_box(Kernels::portable().fma_loop(1000));
    }
    let c = thread_cpu_time().unwrap();
    assert!(c > b, "work not counted: {b:?} -> {c:?}");
}

#[cfg(not(miri))]
fn any_exp_input() -> impl Strategy<Value = f32> {
    prop_oneof![
        -90.0f32..0.0,
        -0.5f32..0.5,
        0.0f32..90.0,
        any::<f32>(),
        Just(f32::NEG_INFINITY),
        Just(f32::NAN),
    ]
}

#[cfg(not(miri))]
proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn prop_qk_matches_f64(
        m in 1usize..70, n in 1usize..70, d in 1usize..140,
        pads in (0usize..4, 0usize..4, 0usize..4),
        scale in -2.0f32..2.0, seed in any::<u64>(),
    ) {
        run_qk(m, n, d, pads, scale, seed).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn prop_pv_matches_f64(
        m in 1usize..70, k in 1usize..140, n in 1usize..140,
        pads in (0usize..4, 0usize..4, 0usize..4), seed in any::<u64>(),
    ) {
        run_pv(m, k, n, pads, seed).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn prop_exp_matches_f64(xs in proptest::collection::vec(any_exp_input(), 0..50)) {
        for k in Kernels::all_supported() {
            let mut y = xs.clone();
            k.exp(&mut y);
            for (&x, &g) in xs.iter().zip(&y) {
                check_exp(k.isa(), x, g).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn prop_row_max_matches_fold(xs in proptest::collection::vec(any::<f32>(), 0..80)) {
        let want = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for k in Kernels::all_supported() {
            prop_assert!(k.row_max(&xs) == want, "{:?}", k.isa());
        }
    }
}

// decode: the GEMVs on stored bf16 / f16 keys and values, widened in registers.

/// `f16_to_f32` is IEEE half to single and `bf16_to_f32` bf16 to single, as `half`
/// converts them, for every pattern (NaN stays NaN).
#[cfg(feature = "half")]
#[test]
fn scalar_widening_matches_half_for_every_pattern() {
    for h in 0..=u16::MAX {
        for (what, want, got) in [
            ("f16", half::f16::from_bits(h).to_f32(), simd::f16_to_f32(h)),
            (
                "bf16",
                half::bf16::from_bits(h).to_f32(),
                simd::bf16_to_f32(h),
            ),
        ] {
            if want.is_nan() {
                assert!(got.is_nan(), "{what} {h:#06x}");
            } else {
                assert_eq!(want.to_bits(), got.to_bits(), "{what} {h:#06x}");
            }
        }
    }
}

/// Every token's `load_bf16` / `load_f16` widens every 16-bit pattern exactly.
#[cfg(all(feature = "half", not(miri)))]
#[test]
fn widening_loads_match_the_scalar_conversion_for_every_pattern() {
    use simd::Simd;
    fn check<S: Simd>(s: S, f16: bool) {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut out = [0f32; 16];
        for c in all.chunks_exact(S::LANES) {
            // SAFETY: `c` holds LANES u16, `out` 16 >= LANES f32; F16C checked by the
            // callers for AVX2.
            unsafe {
                let v = if f16 {
                    s.load_f16(c.as_ptr())
                } else {
                    s.load_bf16(c.as_ptr())
                };
                s.store(out.as_mut_ptr(), v);
            }
            for (&h, &x) in c.iter().zip(&out) {
                let want = if f16 {
                    half::f16::from_bits(h).to_f32()
                } else {
                    f32::from_bits(u32::from(h) << 16)
                };
                if want.is_nan() {
                    assert!(x.is_nan(), "{h:#06x} f16 {f16}");
                } else {
                    assert_eq!(want.to_bits(), x.to_bits(), "{h:#06x} f16 {f16}");
                }
            }
        }
    }
    for f16 in [false, true] {
        check(Portable, f16);
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(t) = Avx2::new()
                && (!f16 || is_x86_feature_detected!("f16c"))
            {
                check(t, f16);
            }
            if let Some(t) = Avx512::new() {
                check(t, f16);
            }
        }
    }
}

/// Values rounded to `E` and their exact f32 widening.
#[cfg(feature = "half")]
fn rounded<E: Element>(rng: &mut Rng, n: usize) -> (Vec<E>, Vec<f32>) {
    let x: Vec<E> = (0..n).map(|_| E::from_f32(rng.next())).collect();
    let w = x.iter().map(|e| e.to_f32()).collect();
    (x, w)
}

/// `qk_gemv_stored` / `pv_gemv_stored` on bf16 / f16 rows: on every instruction set
/// bit-identical to the f32 GEMV on the widened rows (the widening is exact and the
/// kernels share their operation order), and within the f32 summation bound of an
/// f64 oracle; shapes around every lane and register block (1 to 10 queries, head dims
/// with ragged tails).
#[cfg(feature = "half")]
fn run_stored<E: Element>(seed: u64) {
    let mut rng = Rng(seed | 1);
    let gs: &[usize] = if cfg!(miri) {
        &[1, 3]
    } else {
        &[1, 2, 3, 4, 5, 6, 7, 8, 10]
    };
    let ds: &[usize] = if cfg!(miri) {
        &[3, 17]
    } else {
        &[1, 3, 17, 64, 127, 128, 129]
    };
    let ns: &[usize] = if cfg!(miri) {
        &[1, 9]
    } else {
        &[1, 5, 33, 70, 131]
    };
    for &g in gs {
        for &d in ds {
            for &n in ns {
                let q = Buf::new(&mut rng, g, d, 3);
                let (k, kw) = rounded::<E>(&mut rng, n * d);
                let (v, vw) = rounded::<E>(&mut rng, n * d);
                let p = Buf::new(&mut rng, g, n, 2);
                let o0 = Buf::new(&mut rng, g, d, 1);
                let (mut exact_s, mut abs_s) = (vec![0f64; g * n], vec![0f64; g * n]);
                let (mut exact_o, mut abs_o) = (vec![0f64; g * d], vec![0f64; g * d]);
                for i in 0..g {
                    for j in 0..n {
                        for c in 0..d {
                            let t = q.at(i, c) as f64 * kw[j * d + c] as f64 * 0.5;
                            exact_s[i * n + j] += t;
                            abs_s[i * n + j] += t.abs();
                        }
                    }
                    for c in 0..d {
                        exact_o[i * d + c] = o0.at(i, c) as f64;
                        abs_o[i * d + c] = (o0.at(i, c) as f64).abs();
                        for j in 0..n {
                            let t = p.at(i, j) as f64 * vw[j * d + c] as f64;
                            exact_o[i * d + c] += t;
                            abs_o[i * d + c] += t.abs();
                        }
                    }
                }
                let kmat = MatRef::contiguous(&kw, n, d).unwrap();
                let vmat = MatRef::contiguous(&vw, n, d).unwrap();
                for kern in Kernels::all_supported() {
                    let what = format!("{} g {g} d {d} n {n}", E::NAME);
                    let mut s = Buf::new(&mut rng, g, n, 1);
                    let mut s32 = Buf::new(&mut rng, g, n, 1);
                    kern.qk_gemv_stored(q.r(), &k, s.w(), 0.5).unwrap();
                    kern.qk_gemv(q.r(), kmat, s32.w(), 0.5).unwrap();
                    assert_eq!(s.data, s32.data, "qk stored vs f32 {what} {:?}", kern.isa());
                    check_close("qk_gemv_stored", kern.isa(), &s, &exact_s, &abs_s, d)
                        .map_err(|e| format!("{e} {what}"))
                        .unwrap();
                    let mut o = Buf {
                        data: o0.data.clone(),
                        ..o0
                    };
                    let mut o32 = Buf {
                        data: o0.data.clone(),
                        ..o0
                    };
                    kern.pv_gemv_stored(p.r(), &v, o.w()).unwrap();
                    kern.pv_gemv(p.r(), vmat, o32.w()).unwrap();
                    assert_eq!(o.data, o32.data, "pv stored vs f32 {what} {:?}", kern.isa());
                    check_close("pv_gemv_stored", kern.isa(), &o, &exact_o, &abs_o, n + 1)
                        .map_err(|e| format!("{e} {what}"))
                        .unwrap();
                }
            }
        }
    }
}

#[cfg(feature = "half")]
#[test]
fn stored_bf16_gemvs_match_f32_on_widened_rows_and_the_oracle() {
    run_stored::<half::bf16>(11);
}

#[cfg(feature = "half")]
#[test]
fn stored_f16_gemvs_match_f32_on_widened_rows_and_the_oracle() {
    run_stored::<half::f16>(12);
}

#[test]
fn stored_gemvs_reject_bad_lengths() {
    let k = Kernels::active();
    let q = [1.0f32; 8];
    let keys = [0.5f32; 12];
    let mut s = [0f32; 6];
    let qm = MatRef::contiguous(&q, 2, 4).unwrap();
    // 3 keys of 4 = 12 elements: fine; 11 elements: a typed error.
    k.qk_gemv_stored(qm, &keys, MatMut::contiguous(&mut s, 2, 3).unwrap(), 1.0)
        .unwrap();
    assert_eq!(s, [2.0; 6]);
    assert!(
        k.qk_gemv_stored(
            qm,
            &keys[..11],
            MatMut::contiguous(&mut s, 2, 3).unwrap(),
            1.0
        )
        .is_err()
    );
    assert!(
        k.qk_gemv_stored(qm, &keys, MatMut::contiguous(&mut s, 1, 3).unwrap(), 1.0)
            .is_err()
    );
    let p = [1.0f32; 6];
    let mut o = [0f32; 8];
    let pm = MatRef::contiguous(&p, 2, 3).unwrap();
    k.pv_gemv_stored(pm, &keys, MatMut::contiguous(&mut o, 2, 4).unwrap())
        .unwrap();
    assert_eq!(o, [1.5; 8]);
    assert!(
        k.pv_gemv_stored(pm, &keys[..8], MatMut::contiguous(&mut o, 2, 4).unwrap())
            .is_err()
    );
}

// bf16 tile products (`bf16dot.rs`), on CPUs with AVX512_BF16; elsewhere these tests
// check only that the handle is absent where the instructions are.

/// A value rounded to bf16, as f64.
fn bf16_value(x: f32) -> f64 {
    simd::bf16_to_f32(bf16dot::f32_to_bf16(x)) as f64
}

#[cfg(feature = "half")]
#[test]
fn scalar_bf16_rounding_matches_half() {
    let mut bits = 0u32;
    loop {
        let x = f32::from_bits(bits);
        let got = bf16dot::f32_to_bf16(x);
        let want = half::bf16::from_f32(x).to_bits();
        if x.is_nan() {
            assert!(half::bf16::from_bits(got).is_nan(), "{bits:#010x}");
        } else {
            assert_eq!(got, want, "{bits:#010x}");
        }
        match bits.checked_add(GRID_STEP * 13 + 1) {
            Some(b) => bits = b,
            None => break,
        }
    }
    // Ties go to even, both ways.
    assert_eq!(bf16dot::f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(bf16dot::f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
}

#[test]
fn bf16_handle_exists_only_on_avx512_with_bf16() {
    for kern in Kernels::all_supported() {
        let has = kern.bf16().is_some();
        if kern.isa() != Isa::Avx512 {
            assert!(!has, "{:?}", kern.isa());
        }
    }
    if Kernels::with_isa(Isa::Avx512)
        .and_then(|k| k.bf16())
        .is_none()
    {
        assert!(!Kernels::bf16_products_pay());
    }
}

#[test]
fn round_pairs_and_pair_rows_round_to_nearest_even() {
    let Some(bf) = Kernels::with_isa(Isa::Avx512).and_then(|k| k.bf16()) else {
        return;
    };
    let mut rng = Rng(77);
    for n in [0usize, 1, 2, 3, 31, 32, 33, 63, 64, 65, 100, 129] {
        let mut x: Vec<f32> = rng.vec(n + 5);
        // Exact ties and values that carry into the exponent.
        if n > 3 {
            x[1] = f32::from_bits(0x3f80_8000);
            x[2] = f32::from_bits(0x3f81_8000);
            x[3] = f32::from_bits(0x3fff_ffff);
        }
        let orig = x.clone();
        bf.round_pairs(&mut x, n).unwrap();
        for s in 0..n.div_ceil(2) {
            let lo = bf16dot::f32_to_bf16(orig[2 * s]);
            let hi = if 2 * s + 1 < n {
                bf16dot::f32_to_bf16(orig[2 * s + 1])
            } else {
                0
            };
            assert_eq!(
                x[s].to_bits(),
                bf16dot::pair(lo, hi).to_bits(),
                "n {n} slot {s}"
            );
        }
        // Slots past the pairs keep their values.
        assert_eq!(x[n.div_ceil(2)..n], orig[n.div_ceil(2)..n], "n {n}");
        assert_eq!(x[n..], orig[n..], "n {n}");
        // Two rows interleaved.
        let (r0, r1) = (rng.vec(n), rng.vec(n));
        for second in [true, false] {
            let mut out = vec![GUARD; n];
            bf.pair_rows(&r0, second.then_some(&r1[..]), &mut out)
                .unwrap();
            for c in 0..n {
                let hi = if second {
                    bf16dot::f32_to_bf16(r1[c])
                } else {
                    0
                };
                let want = bf16dot::pair(bf16dot::f32_to_bf16(r0[c]), hi);
                assert_eq!(out[c].to_bits(), want.to_bits(), "n {n} col {c}");
            }
        }
    }
    let mut short = [0f32; 3];
    assert!(bf.round_pairs(&mut short, 4).is_err());
    assert!(bf.pair_rows(&[0.0; 2], None, &mut short).is_err());
    assert!(
        bf.pair_rows(&[0.0; 3], Some(&[0.0; 2]), &mut short)
            .is_err()
    );
}

/// Rows of `b` rounded into pair rows: `[rows, ceil(cols / 2)]` at stride `cols`.
fn pair_matrix(bf: &Bf16Kernels, b: &Buf) -> Vec<f32> {
    let mut out = vec![0f32; b.rows * b.cols.max(1)];
    for i in 0..b.rows {
        let row = &mut out[i * b.cols..(i + 1) * b.cols];
        for (j, x) in row.iter_mut().enumerate() {
            *x = b.at(i, j);
        }
        bf.round_pairs(row, b.cols).unwrap();
    }
    out
}

#[test]
fn bf16_tile_products_match_the_oracle_on_rounded_operands() {
    let Some(bf) = Kernels::with_isa(Isa::Avx512).and_then(|k| k.bf16()) else {
        return;
    };
    let kern = Kernels::with_isa(Isa::Avx512).unwrap();
    let mut rng = Rng(91);
    for (m, n, d) in [
        (1, 1, 1),
        (3, 17, 3),
        (8, 32, 64),
        (17, 63, 17),
        (64, 64, 128),
        (65, 96, 127),
        (129, 33, 128),
    ] {
        let a = Buf::new(&mut rng, m, d, 0);
        let b = Buf::new(&mut rng, n + 32, d, 0);
        let d2 = d.div_ceil(2);
        let (ap, bp) = (pair_matrix(&bf, &a), pair_matrix(&bf, &b));
        let mut packed = PackedKeys::new();
        kern.pack_keys(MatRef::new(&bp, n + 32, d2, d).unwrap(), &mut packed);
        // Keys 32 .. 32 + n: a key range that starts at the second panel.
        let mut s = Buf::new(&mut rng, m, n, 3);
        let scale = 0.375;
        bf.qk_tile_packed(
            MatRef::new(&ap, m, d2, d).unwrap(),
            &packed,
            32,
            s.w(),
            scale,
        )
        .unwrap();
        let mut exact = vec![0f64; m * n];
        let mut sum_abs = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for k in 0..d {
                    let p = bf16_value(a.at(i, k)) * bf16_value(b.at(j + 32, k));
                    exact[i * n + j] += p * scale as f64;
                    sum_abs[i * n + j] += (p * scale as f64).abs();
                }
            }
        }
        check_close("bf16 qk_tile_packed", Isa::Avx512, &s, &exact, &sum_abs, d2)
            .map_err(|e| format!("{e} (m {m}, n {n}, d {d})"))
            .unwrap();

        // P V with P [m, n] and V [n, d] (a tile's probabilities and values).
        let p = Buf::new(&mut rng, m, n, 0);
        let v = Buf::new(&mut rng, n, d, 0);
        let pp = pair_matrix(&bf, &p);
        let n2 = n.div_ceil(2);
        let mut vp = vec![0f32; n2 * d];
        for r in 0..n2 {
            let row = |t: usize| -> Vec<f32> { (0..d).map(|c| v.at(t, c)).collect() };
            let second = (2 * r + 1 < n).then(|| row(2 * r + 1));
            bf.pair_rows(&row(2 * r), second.as_deref(), &mut vp[r * d..(r + 1) * d])
                .unwrap();
        }
        let mut o = Buf::new(&mut rng, m, d, 5);
        let mut exact = vec![0f64; m * d];
        let mut sum_abs = vec![0f64; m * d];
        for i in 0..m {
            for c in 0..d {
                exact[i * d + c] = o.at(i, c) as f64;
                sum_abs[i * d + c] = (o.at(i, c) as f64).abs();
                for t in 0..n {
                    let x = bf16_value(p.at(i, t)) * bf16_value(v.at(t, c));
                    exact[i * d + c] += x;
                    sum_abs[i * d + c] += x.abs();
                }
            }
        }
        bf.pv_tile(
            MatRef::new(&pp, m, n2, n).unwrap(),
            MatRef::new(&vp, n2, d, d).unwrap(),
            o.w(),
        )
        .unwrap();
        check_close("bf16 pv_tile", Isa::Avx512, &o, &exact, &sum_abs, n2 + 1)
            .map_err(|e| format!("{e} (m {m}, n {n}, d {d})"))
            .unwrap();
    }
    // Shape errors.
    let mut s = [0f32; 4];
    let packed = PackedKeys::new();
    let q = [0f32; 4];
    assert!(
        bf.qk_tile_packed(
            MatRef::new(&q, 1, 2, 2).unwrap(),
            &packed,
            0,
            MatMut::new(&mut s, 1, 1, 1).unwrap(),
            1.0
        )
        .is_err()
    );
    assert!(
        bf.pv_tile(
            MatRef::new(&q, 2, 2, 2).unwrap(),
            MatRef::new(&q, 1, 2, 2).unwrap(),
            MatMut::new(&mut s, 2, 2, 2).unwrap()
        )
        .is_err()
    );
}

/// The decode `Q K^T` with bf16 products against a bf16 cache's stored rows: within the
/// f32 summation bound of an f64 oracle on the rounded queries and the stored keys, for
/// 1 to 11 queries (two GQA chunks past 8), even head dims with and without a ragged
/// tail of pair slots, and key counts around every register block. Keys that are not
/// bf16, or of the wrong length, are typed errors.
#[cfg(feature = "half")]
#[test]
fn bf16_decode_products_match_the_oracle_on_rounded_queries() {
    let Some(bf) = Kernels::with_isa(Isa::Avx512).and_then(|k| k.bf16()) else {
        eprintln!("SKIPPED: this CPU has no AVX512_BF16");
        return;
    };
    let mut rng = Rng(97);
    for g in [1, 2, 3, 4, 5, 8, 11] {
        for d in [2, 6, 30, 40, 64, 128, 130] {
            for n in [1, 2, 3, 9, 33] {
                let q = Buf::new(&mut rng, g, d, 0);
                let (k, kw) = rounded::<half::bf16>(&mut rng, n * d);
                let qp = pair_matrix(&bf, &q);
                let scale = 0.625;
                let (mut exact, mut sum_abs) = (vec![0f64; g * n], vec![0f64; g * n]);
                for i in 0..g {
                    for j in 0..n {
                        for c in 0..d {
                            let t = bf16_value(q.at(i, c)) * kw[j * d + c] as f64 * scale as f64;
                            exact[i * n + j] += t;
                            sum_abs[i * n + j] += t.abs();
                        }
                    }
                }
                let mut s = Buf::new(&mut rng, g, n, 1);
                bf.qk_gemv_pairs(MatRef::new(&qp, g, d / 2, d).unwrap(), &k, s.w(), scale)
                    .unwrap();
                check_close("qk_gemv_pairs", Isa::Avx512, &s, &exact, &sum_abs, d)
                    .map_err(|e| format!("{e} (g {g}, d {d}, n {n})"))
                    .unwrap();
                // Not the f32 products on the unrounded queries: the rounding shows.
                let mut s32 = Buf::new(&mut rng, g, n, 1);
                Kernels::with_isa(Isa::Avx512)
                    .unwrap()
                    .qk_gemv_stored(q.r(), &k, s32.w(), scale)
                    .unwrap();
                if d >= 30 {
                    assert_ne!(s.data, s32.data, "g {g}, d {d}, n {n}");
                }
            }
        }
    }
    let q = [0f32; 4];
    let mut s = [0f32; 2];
    let keys = vec![half::bf16::ZERO; 8];
    let qm = MatRef::new(&q, 1, 2, 4).unwrap();
    // Keys of another type, and too few keys.
    let f32_keys = [0f32; 8];
    assert!(
        bf.qk_gemv_pairs(qm, &f32_keys, MatMut::new(&mut s, 1, 2, 2).unwrap(), 1.0)
            .is_err()
    );
    assert!(
        bf.qk_gemv_pairs(qm, &keys[..7], MatMut::new(&mut s, 1, 2, 2).unwrap(), 1.0)
            .is_err()
    );
    bf.qk_gemv_pairs(qm, &keys, MatMut::new(&mut s, 1, 2, 2).unwrap(), 1.0)
        .unwrap();
    assert_eq!(s, [0.0, 0.0]);
}
