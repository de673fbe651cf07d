//! f16 / bf16 rotation (feature `half`): angles still come from f64, so the only error
//! is the storage format's rounding.
#![cfg(feature = "half")]

use half::{bf16, f16};
use ropex::{Layout, RopeConfig, RotaryTable};

fn check<T: num_traits::Float>(tol: f64) {
    let freqs = RopeConfig::new(64, 10_000.0).unwrap().frequencies();
    let t32 = RotaryTable::<f32>::new(&freqs, 70_000, Layout::Half).unwrap();
    let th = RotaryTable::<T>::new(&freqs, 70_000, Layout::Half).unwrap();
    let x: Vec<f32> = (0..64).map(|i| (i as f32 / 64.0) - 0.5).collect();
    for p in [0usize, 1, 4097, 65_535, 69_999] {
        let mut a = x.clone();
        let mut b: Vec<T> = x.iter().map(|&v| T::from(v).unwrap()).collect();
        t32.rotate_slice(&mut a, [1, 1, 64], &[p]).unwrap();
        th.rotate_slice(&mut b, [1, 1, 64], &[p]).unwrap();
        for (u, v) in a.iter().zip(&b) {
            let v = v.to_f64().unwrap();
            assert!((*u as f64 - v).abs() < tol, "p = {p}: {u} vs {v}");
        }
    }
}

#[test]
fn f16_rotation_tracks_f32() {
    check::<f16>(2e-3);
}

#[test]
fn bf16_rotation_tracks_f32() {
    check::<bf16>(1.6e-2);
}

mod common;

use ndarray::Array3;
use ropex::PositionMap;
use ropex::attention::{Attention, Bf16Products, Kernel, TileConfig, VarLen};
use ropex::tensor::{Element, View3, View3Mut};

/// The bound of `ropex::attention`'s module docs for output `[i, h, x]` of a kernel run
/// on inputs rounded to `T`, against the f64 reference on the unrounded inputs: with
/// `eps = c_i (2u + u^2) |q_ih| max_j |k_j|`, `(e^(2 eps) - 1) vmax + u vmax + u |o| +
/// 1e-5` (the last term: the f32 kernels' own error). With `bf16_products`, the bound of
/// bf16 products (module docs, "bf16 products"): the rotated q and k rounded once more,
/// `eps' = c_i (4u + 7u^2) |q_ih| max_j |k_j|`, and the probabilities rounded, another
/// `u vmax`.
fn bound<T: Element>(
    att: &Attention,
    (q, k, v): (&Array3<f32>, &Array3<f32>, &Array3<f32>),
    pos: &[usize],
    reference: &Array3<f32>,
    bf16_products: bool,
) -> Array3<f64> {
    let u = T::UNIT_ROUNDOFF;
    let (product, values) = if bf16_products {
        (4.0 * u + 7.0 * u * u, 2.0)
    } else {
        (2.0 * u + u * u, 1.0)
    };
    let (_, _, d) = q.dim();
    let kmax = k
        .outer_iter()
        .flat_map(|t| t.outer_iter().map(|r| r.dot(&r).sqrt()).collect::<Vec<_>>())
        .fold(0f32, f32::max) as f64;
    let vmax = v.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let scale = att.scale_for(d) * att.length_factor(pos.len());
    Array3::from_shape_fn(reference.dim(), |(i, h, _)| {
        let qn = q.slice(ndarray::s![i, h, ..]);
        let qn = qn.dot(&qn).sqrt() as f64;
        let eps = scale * att.query_factor(pos[i]) * product * qn * kmax;
        ((2.0 * eps).exp() - 1.0) * vmax + values * u * vmax + 1e-5
    }) + reference.mapv(|o| u * o.abs() as f64)
}

fn round<T: Element>(x: &Array3<f32>) -> Array3<T> {
    x.mapv(T::from_f32)
}

/// Every prefill kernel, in f32, bf16 and f16, against the f64 reference on the
/// unrounded f32 inputs, within the documented per-type bound; the bound is tight
/// enough that bf16 needs it (a plain f32 tolerance would fail).
fn kernels_track_reference<T: Element>(map: PositionMap) -> f64 {
    let (n, hq, hkv, d) = (45, 4, 2, 32);
    let freqs = ropex::RopeConfig::new(d, 10_000.0).unwrap().frequencies();
    // f32 products (bf16 products have their own bound and test below).
    let att = Attention::new(freqs, ropex::Layout::Half, map).with_bf16_products(Bf16Products::Off);
    let q = common::rand3((n, hq, d), 21);
    let k = common::rand3((n, hkv, d), 22);
    let v = common::rand3((n, hkv, d), 23);
    let pos: Vec<usize> = (0..n).map(|p| p * 3).collect();
    let want = att
        .reference(q.view(), k.view(), v.view(), &pos, &pos)
        .unwrap();
    let bound = bound::<T>(&att, (&q, &k, &v), &pos, &want, false);
    let (qt, kt, vt) = (round::<T>(&q), round::<T>(&k), round::<T>(&v));
    let mut worst = 0f64;
    for kernel in [
        Kernel::Reference,
        Kernel::TwoPass,
        Kernel::default(),
        Kernel::Tiled(TileConfig::new(16, 8).unwrap()),
    ] {
        let (got, _) = att
            .run(kernel, qt.view(), kt.view(), vt.view(), &pos, &pos)
            .unwrap();
        for ((g, w), b) in got.iter().zip(&want).zip(&bound) {
            let err = (g.to_f32() as f64 - *w as f64).abs();
            assert!(
                err <= *b,
                "{} {kernel:?} {}: {} vs {w} (bound {b})",
                T::NAME,
                att.map(),
                g.to_f32()
            );
            worst = worst.max(err);
        }
    }
    worst
}

fn every_map() -> Vec<PositionMap> {
    vec![
        PositionMap::Rope,
        PositionMap::rerope(16).unwrap(),
        PositionMap::leaky_rerope(16, 8.0).unwrap(),
        PositionMap::self_extend(4, 24).unwrap(),
        PositionMap::dca(48, 12).unwrap(),
        PositionMap::streaming(3, 30).unwrap(),
    ]
}

#[test]
fn every_kernel_and_map_in_bf16_tracks_the_reference() {
    let mut worst = 0f64;
    for map in every_map() {
        worst = worst.max(kernels_track_reference::<bf16>(map));
    }
    // the rounding is real: bf16 inputs move outputs by far more than f32's 1e-5
    assert!(worst > 1e-4, "bf16 worst error {worst}");
}

#[test]
fn every_kernel_in_f16_and_f32_tracks_the_reference() {
    for map in [PositionMap::Rope, PositionMap::rerope(16).unwrap()] {
        let f16_worst = kernels_track_reference::<f16>(map);
        let f32_worst = kernels_track_reference::<f32>(map);
        assert!(
            f32_worst < 1e-5 && f16_worst > f32_worst,
            "{f16_worst} {f32_worst}"
        );
    }
}

/// bf16 and f16 inputs hold exactly representable values; widening them to f32 and
/// running the f32 kernel gives the f32 result, which the typed kernel then rounds
/// once: the typed output is the f32 output rounded, bit for bit (with f32 products:
/// bf16 products round the operands again).
#[test]
fn typed_output_is_the_f32_result_rounded_once() {
    fn check<T: Element>() {
        let (n, hq, hkv, d) = (40, 2, 1, 16);
        let freqs = ropex::RopeConfig::new(d, 10_000.0).unwrap().frequencies();
        let att = Attention::new(freqs, ropex::Layout::Half, PositionMap::rerope(7).unwrap())
            .with_bf16_products(Bf16Products::Off);
        let (qt, kt, vt) = (
            round::<T>(&common::rand3((n, hq, d), 31)),
            round::<T>(&common::rand3((n, hkv, d), 32)),
            round::<T>(&common::rand3((n, hkv, d), 33)),
        );
        let wide = |x: &Array3<T>| x.mapv(|e| e.to_f32());
        let pos: Vec<usize> = (0..n).collect();
        for kernel in [
            Kernel::TwoPass,
            Kernel::default(),
            Kernel::Tiled(TileConfig::new(8, 64).unwrap()),
        ] {
            let (typed, _) = att
                .run(kernel, qt.view(), kt.view(), vt.view(), &pos, &pos)
                .unwrap();
            let (f, _) = att
                .run(
                    kernel,
                    wide(&qt).view(),
                    wide(&kt).view(),
                    wide(&vt).view(),
                    &pos,
                    &pos,
                )
                .unwrap();
            assert_eq!(typed, f.mapv(T::from_f32), "{} {kernel:?}", T::NAME);
        }
    }
    check::<bf16>();
    check::<f16>();
}

/// A bf16 varlen batch in candle's head-major memory equals per-sequence calls, and
/// `_into` a head-major bf16 buffer equals the allocating form.
#[test]
fn bf16_varlen_head_major_into() {
    let (hq, hkv, d) = (2, 1, 16);
    let cu = [0, 12, 12, 40];
    let pos: Vec<usize> = (0..12).chain(0..28).collect();
    let total = 40;
    let q = round::<bf16>(&common::rand3((total, hq, d), 41));
    let kv = round::<bf16>(&common::rand3((total, hkv, d), 42));
    let freqs = ropex::RopeConfig::new(d, 10_000.0).unwrap().frequencies();
    let att = Attention::new(freqs, ropex::Layout::Half, PositionMap::dca(8, 3).unwrap());
    let vl = VarLen::new(&cu, &cu, &pos, &pos).unwrap();
    let want = att
        .varlen(Kernel::default(), q.view(), kv.view(), kv.view(), &vl)
        .unwrap();
    for s in 0..3 {
        let r = cu[s]..cu[s + 1];
        let alone = att
            .tiled(
                q.slice(ndarray::s![r.clone(), .., ..]),
                kv.slice(ndarray::s![r.clone(), .., ..]),
                kv.slice(ndarray::s![r.clone(), .., ..]),
                &pos[r.clone()],
                &pos[r.clone()],
            )
            .unwrap();
        assert_eq!(want.slice(ndarray::s![r, .., ..]), alone);
    }
    let hm = |x: &Array3<bf16>| -> Vec<bf16> {
        x.view().permuted_axes([1, 0, 2]).iter().copied().collect()
    };
    let (qh, kvh) = (hm(&q), hm(&kv));
    let mut buf = vec![bf16::ZERO; total * hq * d];
    att.varlen_into(
        Kernel::default(),
        View3::heads_tokens_dim(&qh, hq, total, d).unwrap(),
        View3::heads_tokens_dim(&kvh, hkv, total, d).unwrap(),
        View3::heads_tokens_dim(&kvh, hkv, total, d).unwrap(),
        &vl,
        View3Mut::heads_tokens_dim(&mut buf, hq, total, d).unwrap(),
    )
    .unwrap();
    assert_eq!(buf, hm(&want));
}

/// bf16 products (where the CPU has AVX512_BF16) for every map, several tile shapes
/// (whole, diagonal with odd prefixes, straddling, hidden-entry tiles), GQA, an odd key
/// count and a head dim that is not a multiple of the vector: within their own bound of
/// the f64 reference on the unrounded inputs, and different from f32 products (the
/// path ran).
#[test]
fn bf16_products_track_the_reference_within_their_bound() {
    if !Bf16Products::On.applies() {
        eprintln!("SKIPPED: this CPU has no AVX512_BF16; bf16 products are never used here");
        return;
    }
    let (n, hq, hkv, d) = (77, 4, 2, 40);
    let freqs = ropex::RopeConfig::new(d, 10_000.0).unwrap().frequencies();
    let q = common::rand3((n, hq, d), 51);
    let k = common::rand3((n, hkv, d), 52);
    let v = common::rand3((n, hkv, d), 53);
    let (qt, kt, vt) = (round::<bf16>(&q), round::<bf16>(&k), round::<bf16>(&v));
    let pos: Vec<usize> = (0..n).map(|p| 2 * p + p / 10).collect();
    let mut worst = 0f64;
    let mut moved = false;
    for map in every_map() {
        let att = Attention::new(freqs.clone(), ropex::Layout::Half, map);
        let want = att
            .reference(q.view(), k.view(), v.view(), &pos, &pos)
            .unwrap();
        let bound = bound::<bf16>(&att, (&q, &k, &v), &pos, &want, true);
        for kernel in [
            Kernel::default(),
            Kernel::Tiled(TileConfig::new(16, 32).unwrap()),
            Kernel::Tiled(TileConfig::new(24, 64).unwrap()),
        ] {
            let on = att.clone().with_bf16_products(Bf16Products::On);
            let (got, _) = on
                .run(kernel, qt.view(), kt.view(), vt.view(), &pos, &pos)
                .unwrap();
            let off = att.clone().with_bf16_products(Bf16Products::Off);
            let (f32_products, _) = off
                .run(kernel, qt.view(), kt.view(), vt.view(), &pos, &pos)
                .unwrap();
            moved |= got != f32_products;
            for ((g, w), b) in got.iter().zip(&want).zip(&bound) {
                let err = (g.to_f32() as f64 - *w as f64).abs();
                assert!(
                    err <= *b,
                    "{kernel:?} {map}: {} vs {w} (bound {b})",
                    g.to_f32()
                );
                worst = worst.max(err);
            }
        }
    }
    assert!(moved, "bf16 products gave exactly the f32-product outputs");
    assert!(worst > 1e-4, "bf16 products worst error {worst}");
}

/// With bf16 products a NaN value stays out of the rows that cannot see its key, also
/// where the diagonal pairs keys two by two.
#[test]
fn bf16_products_keep_hidden_nan_values_out() {
    if !Bf16Products::On.applies() {
        eprintln!("SKIPPED: this CPU has no AVX512_BF16");
        return;
    }
    let (n, h, d) = (70, 2, 16);
    let freqs = ropex::RopeConfig::new(d, 10_000.0).unwrap().frequencies();
    let att = Attention::new(freqs, ropex::Layout::Half, PositionMap::Rope)
        .with_bf16_products(Bf16Products::On);
    let q = round::<bf16>(&common::rand3((n, h, d), 61));
    let k = round::<bf16>(&common::rand3((n, h, d), 62));
    let pos: Vec<usize> = (0..n).collect();
    for bad in [1usize, 33, 40, 69] {
        let mut v = round::<bf16>(&common::rand3((n, h, d), 63));
        v[[bad, 1, 3]] = bf16::NAN;
        let out = att.tiled(q.view(), k.view(), v.view(), &pos, &pos).unwrap();
        for i in 0..n {
            let row_nan = out.slice(ndarray::s![i, 1, ..]).iter().any(|x| x.is_nan());
            assert_eq!(row_nan, i >= bad, "NaN value at key {bad}, query {i}");
            assert!(
                out.slice(ndarray::s![i, 0, ..])
                    .iter()
                    .all(|x| x.is_finite())
            );
        }
    }
}
