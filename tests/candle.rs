//! The candle integration (feature `candle`) against candle itself: rotation against
//! candle-nn's `rope` / `rope_i` with cos/sin computed here from the inverse
//! frequencies, attention against a plain softmax attention written with candle ops
//! (matmul, causal mask, `softmax_last_dim`) on inputs rotated by candle-nn, and the maps
//! candle has no counterpart for (ReRoPE, Leaky ReRoPE) against ropex's f64 reference
//! kernel. bf16/f16 results are checked against the documented one-rounding bound.

mod common;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use ndarray::Array3;
use ropex::attention::{Bf16Products, Kernel};
use ropex::candle::{CandleError, attention, attention_with, rope, rope_with_table};
use ropex::{
    Attention, Frequencies, Layout, PositionMap, RopeConfig, RopeError, RotaryTable, Scaling, Yarn,
};

/// A seeded `(B, H, T, D)` tensor, uniform in `[-1, 1)` (tests/common's generator).
fn rand4(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let (b, h, t, d) = shape;
    let data: Vec<f32> = common::rand3((b * h, t, d), seed).iter().copied().collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// candle-nn's cos/sin inputs, `(T, D/2)`: `m cos(p w_j)` with the angle in f64.
fn cos_sin(freqs: &Frequencies, positions: &[usize]) -> (Tensor, Tensor) {
    let m = freqs.attention_factor();
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for &p in positions {
        for &w in freqs.inv_freq() {
            c.push((m * (p as f64 * w).cos()) as f32);
            s.push((m * (p as f64 * w).sin()) as f32);
        }
    }
    let shape = (positions.len(), freqs.num_pairs());
    (
        Tensor::from_vec(c, shape, &Device::Cpu).unwrap(),
        Tensor::from_vec(s, shape, &Device::Cpu).unwrap(),
    )
}

/// candle-nn's rotation of `x` at `positions` in `layout`.
fn candle_rope(x: &Tensor, freqs: &Frequencies, layout: Layout, positions: &[usize]) -> Tensor {
    let (c, s) = cos_sin(freqs, positions);
    match layout {
        Layout::Half => candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), &c, &s).unwrap(),
        Layout::Interleaved => {
            candle_nn::rotary_emb::rope_i(&x.contiguous().unwrap(), &c, &s).unwrap()
        }
    }
}

/// Largest `|a - b|`, both widened to f32; NaN counts as infinitely wrong.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m: f32, e| {
                if e.is_nan() { f32::INFINITY } else { m.max(e) }
            },
        )
}

/// Checks `|got - want| <= u |want| + abs` elementwise (`want` in f32).
fn within_one_rounding(got: &Tensor, want: &Tensor, u: f64, abs: f64) {
    let got: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let bound = u * w.abs() as f64 + abs;
        assert!(
            ((g - w).abs() as f64) <= bound,
            "element {i}: {g} vs {w}, bound {bound}"
        );
    }
}

fn plain(d: usize) -> Frequencies {
    RopeConfig::new(d, 10_000.0).unwrap().frequencies()
}

fn yarn(d: usize) -> Frequencies {
    // attention factor m = 0.1 ln(4) + 1 != 1: checks it is multiplied into cos/sin
    RopeConfig::new(d, 500_000.0)
        .unwrap()
        .with_scaling(Scaling::Yarn(Yarn::new(4.0, 512)))
        .unwrap()
        .frequencies()
}

#[test]
fn rotation_matches_candle_nn_rope_and_rope_i() {
    let x = rand4((2, 3, 37, 64), 1);
    let positions: Vec<usize> = (1_000..1_037).collect();
    for freqs in [plain(64), yarn(64)] {
        assert!(freqs.attention_factor() >= 1.0);
        for layout in [Layout::Half, Layout::Interleaved] {
            let ours = rope(&x, &freqs, layout, &positions).unwrap();
            let theirs = candle_rope(&x, &freqs, layout, &positions);
            let e = max_diff(&ours, &theirs);
            assert!(
                e < 2e-6,
                "{layout:?}, m = {}: {e}",
                freqs.attention_factor()
            );
            // and the rotation did something: positions >= 1000 move every pair
            assert!(max_diff(&ours, &x) > 0.5);
        }
    }
    // the two layouts pair different dims
    let f = plain(64);
    let half = rope(&x, &f, Layout::Half, &positions).unwrap();
    let inter = rope(&x, &f, Layout::Interleaved, &positions).unwrap();
    assert!(max_diff(&half, &inter) > 0.1);
}

#[test]
fn rotation_takes_per_item_positions_and_strided_inputs() {
    let f = plain(32);
    // (B, T, H, D) transposed to (B, H, T, D): strided, not contiguous
    let btd = rand4((2, 9, 4, 32), 2);
    let x = btd.transpose(1, 2).unwrap();
    assert!(!x.is_contiguous());
    let pos: Vec<usize> = (0..9).chain(40..49).collect(); // item 1 starts at 40
    let ours = rope(&x, &f, Layout::Half, &pos).unwrap();
    for b in 0..2 {
        let item = x.i(b..b + 1).unwrap();
        let theirs = candle_rope(&item, &f, Layout::Half, &pos[9 * b..9 * (b + 1)]);
        assert!(max_diff(&ours.i(b..b + 1).unwrap(), &theirs) < 2e-6);
    }
    // a shared table and table rows: the same rotation
    let table = RotaryTable::<f32>::new(&f, 64, Layout::Half).unwrap();
    let by_rows = rope_with_table(&x, &table, &pos).unwrap();
    assert!(max_diff(&by_rows, &ours) < 1e-6);
    // dims past the rotary dim pass through
    let partial = Frequencies::from_inv_freq(f.inv_freq()[..8].to_vec(), 1.0).unwrap();
    let p = rope(&x, &partial, Layout::Half, &pos).unwrap();
    assert_eq!(
        max_diff(
            &p.narrow(D::Minus1, 16, 16).unwrap(),
            &x.narrow(D::Minus1, 16, 16).unwrap()
        ),
        0.0
    );
}

#[test]
fn half_precision_rotation_is_one_rounding_of_f32() {
    let f = yarn(64);
    let pos: Vec<usize> = (2_000..2_023).collect();
    for (dtype, u) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        let x = rand4((1, 2, 23, 64), 3).to_dtype(dtype).unwrap();
        let ours = rope(&x, &f, Layout::Half, &pos).unwrap();
        assert_eq!(ours.dtype(), dtype);
        // f32 rotation of the same (rounded) inputs
        let want = candle_rope(&x.to_dtype(DType::F32).unwrap(), &f, Layout::Half, &pos);
        within_one_rounding(&ours, &want, u, 1e-6);
    }
}

/// Softmax attention written with candle ops on already-rotated `q`, `k`: repeat_kv,
/// `q k^T * scale`, `-inf` where `k_pos[j] > q_pos[i]`, `softmax_last_dim`, times `v`.
/// Every op runs in `q`'s dtype (the mask is cast to it; a no-op for f32).
fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &[usize],
    k_pos: &[usize],
    scale: f64,
) -> Tensor {
    let (b, hq, tq, d) = q.dims4().unwrap();
    let (_, hkv, tk, dv) = v.dims4().unwrap();
    let g = hq / hkv;
    let repeat = |x: &Tensor, w: usize| {
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, hkv, g, tk, w))
            .unwrap()
            .reshape((b, hq, tk, w))
            .unwrap()
    };
    let (k, v) = (repeat(k, d), repeat(v, dv));
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let mask: Vec<f32> = q_pos
        .iter()
        .flat_map(|&i| {
            k_pos
                .iter()
                .map(move |&j| if j <= i { 0.0 } else { f32::NEG_INFINITY })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (tq, tk), &Device::Cpu)
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap();
    let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
    p.matmul(&v).unwrap()
}

#[test]
fn rope_attention_matches_softmax_attention_in_candle_ops() {
    let d = 32;
    let (q, k, v) = (
        rand4((2, 4, 70, d), 4),
        rand4((2, 2, 70, d), 5),
        rand4((2, 2, 70, 16), 6),
    );
    let pos: Vec<usize> = (0..70).collect();
    for freqs in [plain(d), yarn(d)] {
        let m = freqs.attention_factor();
        let attn = Attention::new(freqs.clone(), Layout::Half, PositionMap::Rope);
        let ours = attention(&attn, &q, &k, &v, &pos, &pos).unwrap();
        assert_eq!(ours.dims(), &[2, 4, 70, 16]);
        let (qr, kr) = (
            candle_rope(&q, &freqs, Layout::Half, &pos),
            candle_rope(&k, &freqs, Layout::Half, &pos),
        );
        // candle's rotation carries m into q and k; ropex's scale m^2/sqrt(d) does too
        let theirs = candle_attention(&qr, &kr, &v, &pos, &pos, 1.0 / (d as f64).sqrt());
        let e = max_diff(&ours, &theirs);
        assert!(e < 2e-5, "m = {m}: {e}");
    }
    // a decode-like call: 3 new queries at the end against every key, interleaved pairs
    let f = plain(d);
    let attn = Attention::new(f.clone(), Layout::Interleaved, PositionMap::Rope);
    let qn = q.narrow(2, 67, 3).unwrap();
    let ours = attention(&attn, &qn, &k, &v, &pos[67..], &pos).unwrap();
    let theirs = candle_attention(
        &candle_rope(&qn, &f, Layout::Interleaved, &pos[67..]),
        &candle_rope(&k, &f, Layout::Interleaved, &pos),
        &v,
        &pos[67..],
        &pos,
        1.0 / (d as f64).sqrt(),
    );
    assert!(max_diff(&ours, &theirs) < 2e-5);
}

/// Batch item `b` of a `(B, H, T, D)` tensor as ropex's `[T, H, D]` array.
fn item_thd(x: &Tensor, b: usize) -> Array3<f32> {
    let (_, h, t, d) = x.dims4().unwrap();
    let item = x
        .to_dtype(DType::F32)
        .unwrap()
        .i(b)
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    let data: Vec<f32> = item.flatten_all().unwrap().to_vec1().unwrap();
    Array3::from_shape_vec((t, h, d), data).unwrap()
}

/// `(B, H, T, D)` from one `[T, H, D]` array per item.
fn from_items(items: &[Array3<f32>]) -> Tensor {
    let (t, h, d) = items[0].dim();
    let flat: Vec<f32> = items
        .iter()
        .flat_map(|a| {
            a.view()
                .permuted_axes([1, 0, 2])
                .iter()
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    Tensor::from_vec(flat, (items.len(), h, t, d), &Device::Cpu).unwrap()
}

#[test]
fn rerope_and_leaky_through_candle_match_the_reference_kernel() {
    let d = 64;
    let (q, k, v) = (
        rand4((2, 4, 150, d), 7),
        rand4((2, 1, 150, d), 8),
        rand4((2, 1, 150, d), 9),
    );
    // item 0 at 0..150, item 1 continues a sequence at 500..650
    let pos: Vec<usize> = (0..150).chain(500..650).collect();
    for map in [
        PositionMap::rerope(32).unwrap(),
        PositionMap::leaky_rerope(32, 8.0).unwrap(),
    ] {
        let attn = Attention::new(plain(d), Layout::Half, map);
        let ours = attention(&attn, &q, &k, &v, &pos, &pos).unwrap();
        let reference: Vec<Array3<f32>> = (0..2)
            .map(|b| {
                let p = &pos[150 * b..150 * (b + 1)];
                attn.reference(
                    item_thd(&q, b).view(),
                    item_thd(&k, b).view(),
                    item_thd(&v, b).view(),
                    p,
                    p,
                )
                .unwrap()
            })
            .collect();
        let e = max_diff(&ours, &from_items(&reference));
        assert!(e < 1e-5, "{map}: {e}");
        // the candle path with the reference kernel is the same computation
        let via = attention_with(&attn, Kernel::Reference, &q, &k, &v, &pos, &pos).unwrap();
        assert!(max_diff(&via, &from_items(&reference)) < 1e-6);
        // and ReRoPE differs from RoPE past its window
        let rope_attn = Attention::new(plain(d), Layout::Half, PositionMap::Rope);
        assert!(
            max_diff(
                &ours,
                &attention(&rope_attn, &q, &k, &v, &pos, &pos).unwrap()
            ) > 1e-3
        );
    }
}

#[test]
fn views_of_one_fused_qkv_storage_and_transposes_are_read_in_place() {
    let d = 16;
    // a fused projection (B, T, 3 H, D) narrowed into q, k, v and transposed to (B, H, T, D)
    let fused = rand4((2, 33, 6, d), 10);
    let part = |i: usize| fused.narrow(2, 2 * i, 2).unwrap().transpose(1, 2).unwrap();
    let (q, k, v) = (part(0), part(1), part(2));
    assert!(!q.is_contiguous());
    let pos: Vec<usize> = (0..33).collect();
    let attn = Attention::new(plain(d), Layout::Half, PositionMap::rerope(8).unwrap());
    let strided = attention(&attn, &q, &k, &v, &pos, &pos).unwrap();
    let c = |x: &Tensor| x.contiguous().unwrap();
    let copied = attention(&attn, &c(&q), &c(&k), &c(&v), &pos, &pos).unwrap();
    assert_eq!(max_diff(&strided, &copied), 0.0);
    // q = k = v: one tensor three times
    let same = attention(&attn, &q, &q, &q, &pos, &pos).unwrap();
    let same_copied = attention(&attn, &c(&q), &c(&q), &c(&q), &pos, &pos).unwrap();
    assert_eq!(max_diff(&same, &same_copied), 0.0);
}

#[test]
fn half_precision_attention_is_one_rounding_of_the_reference() {
    let d = 64;
    // f32 products (bf16 products round the operands again: the test below).
    let attn = Attention::new(plain(d), Layout::Half, PositionMap::rerope(16).unwrap())
        .with_bf16_products(Bf16Products::Off);
    let pos: Vec<usize> = (0..90).collect();
    for (dtype, u) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        let cast = |x: Tensor| x.to_dtype(dtype).unwrap();
        let (q, k, v) = (
            cast(rand4((1, 2, 90, d), 11)),
            cast(rand4((1, 2, 90, d), 12)),
            cast(rand4((1, 2, 90, d), 13)),
        );
        let ours = attention(&attn, &q, &k, &v, &pos, &pos).unwrap();
        assert_eq!(ours.dtype(), dtype);
        // the f64 oracle on the same rounded inputs
        let want = attn
            .reference(
                item_thd(&q, 0).view(),
                item_thd(&k, 0).view(),
                item_thd(&v, 0).view(),
                &pos,
                &pos,
            )
            .unwrap();
        within_one_rounding(&ours, &from_items(&[want]), u, 1e-5);
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let f = plain(16);
    let attn = Attention::new(f.clone(), Layout::Half, PositionMap::Rope);
    let x = rand4((2, 2, 5, 16), 14);
    let pos = [0, 1, 2, 3, 4];
    let shape_of = |e: CandleError, what: &str| match e {
        CandleError::Rope(RopeError::ShapeMismatch { what: w, .. }) => {
            assert!(w.contains(what), "{w}")
        }
        other => panic!("expected a shape error about {what}, got {other}"),
    };
    // dtype: integers and f64 are refused, q/k/v must agree
    let ints = x.to_dtype(DType::U32).unwrap();
    assert!(matches!(
        rope(&ints, &f, Layout::Half, &pos),
        Err(CandleError::DType {
            what: "x",
            got: DType::U32,
            ..
        })
    ));
    let f64s = x.to_dtype(DType::F64).unwrap();
    assert!(matches!(
        attention(&attn, &f64s, &f64s, &f64s, &pos, &pos),
        Err(CandleError::DType { what: "q", .. })
    ));
    let bf = x.to_dtype(DType::BF16).unwrap();
    let e = attention(&attn, &x, &bf, &x, &pos, &pos).unwrap_err();
    assert!(
        matches!(
            e,
            CandleError::DType {
                what: "k",
                got: DType::BF16,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("F32"), "{e}");
    // rank, batch and position counts
    let rank3 = x.i(0).unwrap();
    shape_of(
        rope(&rank3, &f, Layout::Half, &pos).unwrap_err(),
        "x (B, H, T, D)",
    );
    shape_of(
        rope(&x, &f, Layout::Half, &pos[..4]).unwrap_err(),
        "positions",
    );
    shape_of(
        attention(&attn, &x, &x.i(0..1).unwrap(), &x, &pos, &pos).unwrap_err(),
        "batch",
    );
    shape_of(
        attention(&attn, &x, &x, &x, &pos, &[0; 7]).unwrap_err(),
        "k_pos",
    );
    // errors of the kernel come back typed through the custom op: 3 query heads, 2 kv heads
    let q3 = rand4((2, 3, 5, 16), 15);
    shape_of(
        attention(&attn, &q3, &x, &x, &pos, &pos).unwrap_err(),
        "query heads",
    );
    // a head dim below the rotary dim
    shape_of(
        rope(&x.narrow(D::Minus1, 0, 8).unwrap(), &f, Layout::Half, &pos).unwrap_err(),
        "head_dim",
    );
    // a table row past the table
    let table = RotaryTable::<f32>::new(&f, 4, Layout::Half).unwrap();
    assert!(matches!(
        rope_with_table(&x, &table, &pos),
        Err(CandleError::Rope(RopeError::PositionOutOfTable {
            index: 4,
            len: 4,
            ..
        }))
    ));
    // a map that needs causal attention
    let bidir =
        Attention::new(f, Layout::Half, PositionMap::streaming(1, 2).unwrap()).with_causal(false);
    assert!(matches!(
        attention(&bidir, &x, &x, &x, &pos, &pos),
        Err(CandleError::Rope(RopeError::InvalidParameter { .. }))
    ));
    // into candle's error, for `?` in candle code
    let as_candle: candle_core::Error = rope(&ints, &plain(16), Layout::Half, &pos)
        .unwrap_err()
        .into();
    assert!(as_candle.to_string().contains("U32"), "{as_candle}");
}

#[test]
fn empty_tensors_give_empty_results() {
    let f = plain(8);
    let attn = Attention::new(f.clone(), Layout::Half, PositionMap::Rope);
    let q = Tensor::zeros((0, 2, 3, 8), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        rope(&q, &f, Layout::Half, &[0, 1, 2]).unwrap().dims(),
        &[0, 2, 3, 8]
    );
    assert_eq!(
        attention(&attn, &q, &q, &q, &[0, 1, 2], &[0, 1, 2])
            .unwrap()
            .dims(),
        &[0, 2, 3, 8]
    );
    // no keys: every query row is zero
    let q = rand4((1, 2, 3, 8), 16);
    let none = Tensor::zeros((1, 2, 0, 8), DType::F32, &Device::Cpu).unwrap();
    let out = attention(&attn, &q, &none, &none, &[0, 1, 2], &[]).unwrap();
    assert_eq!(out.dims(), &[1, 2, 3, 8]);
    assert_eq!(max_diff(&out, &out.zeros_like().unwrap()), 0.0);
}

/// candle-nn's rotation in `x`'s dtype (cos/sin rounded to it, as a bf16 model keeps them).
fn candle_rope_in(x: &Tensor, freqs: &Frequencies, layout: Layout, positions: &[usize]) -> Tensor {
    let (c, s) = cos_sin(freqs, positions);
    let (c, s) = (
        c.to_dtype(x.dtype()).unwrap(),
        s.to_dtype(x.dtype()).unwrap(),
    );
    let x = x.contiguous().unwrap();
    match layout {
        Layout::Half => candle_nn::rotary_emb::rope(&x, &c, &s).unwrap(),
        Layout::Interleaved => candle_nn::rotary_emb::rope_i(&x, &c, &s).unwrap(),
    }
}

/// Largest `|x|` of a tensor, widened to f32.
fn max_abs(x: &Tensor) -> f64 {
    let v: Vec<f32> = x
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter().fold(0f64, |m, x| m.max(x.abs() as f64))
}

#[test]
fn half_precision_rotation_agrees_with_candle_nn_in_that_dtype() {
    let f = yarn(64);
    let m = f.attention_factor();
    let pos: Vec<usize> = (3_000..3_029).collect();
    for (dtype, u) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        let x = rand4((2, 3, 29, 64), 20).to_dtype(dtype).unwrap();
        for layout in [Layout::Half, Layout::Interleaved] {
            let ours = rope(&x, &f, layout, &pos).unwrap();
            assert_eq!(ours.dtype(), dtype);
            // (a) the f32 rotation of the widened inputs, rounded once
            let wide = rope(&x.to_dtype(DType::F32).unwrap(), &f, layout, &pos).unwrap();
            within_one_rounding(&ours, &wide, u, 1e-7);
            // (b) candle-nn in the same dtype rounds cos/sin (u m each) and its products
            // and sum (about 3 u |x|): |x' - ours| <= (2 m + 4) u max|x| per element
            let theirs = candle_rope_in(&x, &f, layout, &pos);
            assert_eq!(theirs.dtype(), dtype);
            let e = max_diff(&ours, &theirs) as f64;
            let bound = (2.0 * m + 4.0) * u * max_abs(&x);
            assert!(e <= bound, "{dtype:?} {layout:?}: {e} > {bound}");
        }
    }
}

#[test]
fn half_precision_attention_agrees_with_the_f32_path_and_candle_ops() {
    let d = 32;
    let pos: Vec<usize> = (0..70).collect();
    for (dtype, u) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        let cast = |x: Tensor| x.to_dtype(dtype).unwrap();
        // GQA: 4 query heads on 2 kv heads, no repeat_kv
        let (q, k, v) = (
            cast(rand4((2, 4, 70, d), 21)),
            cast(rand4((2, 2, 70, d), 22)),
            cast(rand4((2, 2, 70, 16), 23)),
        );
        let w = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let plain_attn = Attention::new(plain(d), Layout::Half, PositionMap::Rope);
        let wide = attention(&plain_attn, &w(&q), &w(&k), &w(&v), &pos, &pos).unwrap();
        // (b) candle ops in the same dtype: rope, matmul, softmax all round to it. Their
        // error against the f32 result is many roundings (scores of size |q||k|/sqrt(d),
        // weights, the value sum).
        let theirs = candle_attention(
            &candle_rope_in(&q, &plain(d), Layout::Half, &pos),
            &candle_rope_in(&k, &plain(d), Layout::Half, &pos),
            &v,
            &pos,
            &pos,
            1.0 / (d as f64).sqrt(),
        );
        assert_eq!(theirs.dtype(), dtype);
        let e_theirs = max_diff(&theirs, &wide) as f64;
        let scale = max_abs(&v);
        // With f32 products and, where the CPU has them, bf16 products.
        let mut modes = vec![Bf16Products::Off];
        if dtype == DType::BF16 && Bf16Products::On.applies() {
            modes.push(Bf16Products::On);
        }
        for mode in modes {
            let attn = plain_attn.clone().with_bf16_products(mode);
            let ours = attention(&attn, &q, &k, &v, &pos, &pos).unwrap();
            assert_eq!((ours.dtype(), ours.dims()), (dtype, &[2, 4, 70, 16][..]));
            if mode == Bf16Products::Off {
                // (a) the f32 path on the widened inputs: one rounding of the output apart
                within_one_rounding(&ours, &wide, u, 1e-6);
                // ... and that rounding is the f32 result's own (at most one ulp, 2 u |o|)
                let rounded = wide.to_dtype(dtype).unwrap();
                within_one_rounding(&ours, &w(&rounded), 2.0 * u, 1e-7);
            }
            // Ours is one rounding (f32 products) or a few (bf16 products: q, k and the
            // weights once more), theirs many: ours stays closer to the f32 result, and
            // the two within 4 u max|v|.
            let e_ours = max_diff(&ours, &wide) as f64;
            let e = max_diff(&ours, &theirs) as f64;
            assert!(
                e <= 4.0 * u * scale && e_ours <= e_theirs,
                "{dtype:?} {mode:?}: |ours - candle| {e}, |ours - f32| {e_ours}, |candle - f32| {e_theirs}"
            );
        }
    }
}

#[test]
fn bf16_transposed_and_narrowed_inputs_are_read_in_place() {
    let d = 32;
    // a fused bf16 projection (B, T, 3 H, D): q, k, v narrowed out of it and transposed
    let fused = rand4((2, 41, 6, d), 24).to_dtype(DType::BF16).unwrap();
    let part = |i: usize| fused.narrow(2, 2 * i, 2).unwrap().transpose(1, 2).unwrap();
    let (q, k, v) = (part(0), part(1), part(2));
    assert!(!q.is_contiguous() && q.dtype() == DType::BF16);
    let c = |x: &Tensor| x.contiguous().unwrap();
    let pos: Vec<usize> = (0..41).collect();
    let attn = Attention::new(
        plain(d),
        Layout::Half,
        PositionMap::leaky_rerope(8, 4.0).unwrap(),
    );
    let strided = attention(&attn, &q, &k, &v, &pos, &pos).unwrap();
    let copied = attention(&attn, &c(&q), &c(&k), &c(&v), &pos, &pos).unwrap();
    assert_eq!(strided.dtype(), DType::BF16);
    assert_eq!(max_diff(&strided, &copied), 0.0);
    assert!(max_abs(&strided) > 0.05); // not trivially zero
    // a strided value dim: the second half of each head (narrowed on the last axis)
    let v_half = v.narrow(D::Minus1, 16, 16).unwrap();
    let o = attention(&attn, &q, &k, &v_half, &pos, &pos).unwrap();
    let o_c = attention(&attn, &c(&q), &c(&k), &c(&v_half), &pos, &pos).unwrap();
    assert_eq!(max_diff(&o, &o_c), 0.0);
    // rotation of the strided bf16 view and of its contiguous copy, and a narrowed-token
    // view (a decode-like tail of 5 tokens)
    for layout in [Layout::Half, Layout::Interleaved] {
        let f = plain(d);
        assert_eq!(
            max_diff(
                &rope(&q, &f, layout, &pos).unwrap(),
                &rope(&c(&q), &f, layout, &pos).unwrap()
            ),
            0.0
        );
        let tail = q.narrow(2, 36, 5).unwrap();
        assert_eq!(
            max_diff(
                &rope(&tail, &f, layout, &pos[36..]).unwrap(),
                &rope(&c(&q), &f, layout, &pos)
                    .unwrap()
                    .narrow(2, 36, 5)
                    .unwrap()
            ),
            0.0
        );
    }
}

#[test]
fn the_op_refuses_mismatched_dtypes_itself() {
    // the public functions check dtypes before the op; a rope on an f64 tensor and an
    // attention with f16 values under bf16 q/k are typed errors either way
    let f = plain(16);
    let attn = Attention::new(f.clone(), Layout::Half, PositionMap::Rope);
    let x = rand4((1, 2, 5, 16), 25);
    let pos = [0, 1, 2, 3, 4];
    let bf = x.to_dtype(DType::BF16).unwrap();
    let hf = x.to_dtype(DType::F16).unwrap();
    assert!(matches!(
        attention(&attn, &bf, &bf, &hf, &pos, &pos),
        Err(CandleError::DType {
            what: "v",
            got: DType::F16,
            ..
        })
    ));
    assert!(matches!(
        rope(&x.to_dtype(DType::F64).unwrap(), &f, Layout::Half, &pos),
        Err(CandleError::DType {
            what: "x",
            got: DType::F64,
            ..
        })
    ));
}
