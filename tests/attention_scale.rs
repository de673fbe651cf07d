//! The attention logit scale `m^2 / sqrt(d)` (`m` the frequency scheme's attention
//! factor), checked against a computation that shares nothing with the kernels but
//! [`RotaryTable`]: the table multiplies cos and sin by `m`, so the dot product of a
//! rotated query and a rotated key carries `m^2`, and a plain f64 softmax with the
//! textbook `1 / sqrt(d)` written here must then agree with every kernel.
//!
//! The attention factors themselves are checked against their closed forms (YaRN
//! `0.1 ln s + 1`, DeepSeek's ratio of two such terms, LongRoPE
//! `sqrt(1 + ln s / ln L0)`), so a wrong `m` fails here as well as a wrong scale.
//! The relative positions of ReRoPE and Leaky ReRoPE are written out from their
//! definitions (Su, "Transformer upgrade road", post 12), and the query is rotated by
//! that position for every `(i, j)` pair separately.

use ndarray::{Array3, ArrayView3, s};
use ropex::CacheShape;
use ropex::attention::decode::DecodeCache;
use ropex::{
    Attention, KvCache, KvCacheRerotating, Layout, LongRope, PositionMap, RopeConfig, RotaryTable,
    Scaling, TileConfig, Yarn,
};

/// Uniform in `[-amp, amp)`, from a fixed LCG seed.
fn rand3(shape: (usize, usize, usize), seed: u64, amp: f32) -> Array3<f32> {
    let mut s = seed;
    Array3::from_shape_fn(shape, |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32 * amp
    })
}

const D: usize = 16;
const HQ: usize = 4;
const HKV: usize = 2;
const DV: usize = 8;
const N: usize = 40;
/// LongRoPE's `L0`: below `N`, so a prefill uses the long factors and a decode switches
/// from short to long at token `L0`.
const L0: usize = 16;
const BASE: f64 = 10_000.0;

/// One frequency scheme and the attention factor its closed form gives.
struct Case {
    name: &'static str,
    config: RopeConfig,
    m: f64,
}

fn cases() -> Vec<Case> {
    let cfg = || RopeConfig::new(D, BASE).unwrap();
    let ln = f64::ln;
    // YaRN (Peng et al. 2023, eq. 22 as transformers writes it): m = 0.1 ln s + 1.
    let yarn_s = 16.0;
    // DeepSeek-V2's YaRN: m = (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1).
    // DeepSeek's own configs set both to the same value (m = 1); unequal values make
    // the ratio observable.
    let (ds_s, ms, ma) = (40.0, 1.0, 0.5);
    // LongRoPE (Phi-3): m = sqrt(1 + ln s / ln L0), s = factor.
    let lr_s = 8.0;
    let long: Vec<f64> = (0..D / 2).map(|j| 1.0 + 1.5 * j as f64).collect();
    let short: Vec<f64> = (0..D / 2).map(|j| 1.0 + 0.25 * j as f64).collect();
    vec![
        Case {
            name: "plain RoPE",
            config: cfg(),
            m: 1.0,
        },
        Case {
            name: "YaRN s=16",
            config: cfg()
                .with_scaling(Scaling::Yarn(Yarn::new(yarn_s, L0)))
                .unwrap(),
            m: 0.1 * ln(yarn_s) + 1.0,
        },
        Case {
            name: "DeepSeek YaRN s=40 mscale=1 mscale_all_dim=0.5",
            config: cfg()
                .with_scaling(Scaling::Yarn(Yarn::new(ds_s, L0).with_mscale(ms, ma)))
                .unwrap(),
            m: (0.1 * ms * ln(ds_s) + 1.0) / (0.1 * ma * ln(ds_s) + 1.0),
        },
        Case {
            name: "LongRoPE s=8",
            config: cfg()
                .with_scaling(Scaling::LongRope(LongRope {
                    short_factor: short,
                    long_factor: long,
                    original_max_position_embeddings: L0,
                    factor: lr_s,
                    attention_factor: None,
                }))
                .unwrap(),
            m: (1.0 + ln(lr_s) / ln(L0 as f64)).sqrt(),
        },
    ]
}

/// The position maps, with `P(i, j)` for `i >= j` written out from the definitions.
#[derive(Clone, Copy, Debug)]
enum Map {
    Rope,
    ReRope(usize),
    Leaky(usize, f64),
}

impl Map {
    fn ropex(self) -> PositionMap {
        match self {
            Map::Rope => PositionMap::Rope,
            Map::ReRope(w) => PositionMap::rerope(w).unwrap(),
            Map::Leaky(w, k) => PositionMap::leaky_rerope(w, k).unwrap(),
        }
    }

    /// ReRoPE: `r` inside the window, `w` past it. Leaky: `w + (r - w) / k` past it.
    fn relative(self, i: usize, j: usize) -> f64 {
        let r = (i - j) as f64;
        match self {
            Map::Rope => r,
            Map::ReRope(w) if i - j >= w => w as f64,
            Map::Leaky(w, k) if i - j >= w => w as f64 + (r - w as f64) / k,
            _ => r,
        }
    }
}

const MAPS: [Map; 3] = [Map::Rope, Map::ReRope(5), Map::Leaky(5, 4.0)];

/// Causal attention of query `i` (all heads) over keys `0..=i`, in f64: `q` and `k` rotated
/// through `RotaryTable` (which carries `m`), logits `q . k / sqrt(d)`, a plain softmax.
/// Plain RoPE rotates `q_i` by `i` and `k_j` by `j`; the other maps rotate `q_i` by
/// `P(i, j)` and `k_j` by 0 for every pair. With an explicit `scale`, the logit is
/// `scale` times the dot product of the *unscaled* rotation (the table's divided by
/// `m^2`), as `with_scale` documents.
fn independent_row(
    config: &RopeConfig,
    (freq_len, scale): (usize, Option<f64>),
    layout: Layout,
    map: Map,
    (q, k, v): (ArrayView3<f32>, ArrayView3<f32>, ArrayView3<f32>),
    i: usize,
) -> Array3<f64> {
    let freqs = config.frequencies_for_len(freq_len);
    let mut out = Array3::<f64>::zeros((1, HQ, DV));
    for h in 0..HQ {
        let kvh = h / (HQ / HKV);
        let logits: Vec<f64> = (0..=i)
            .map(|j| {
                let (qp, kp) = match map {
                    Map::Rope => (i as f64, j as f64),
                    _ => (map.relative(i, j), 0.0),
                };
                let table = RotaryTable::<f64>::from_positions(&freqs, &[qp, kp], layout).unwrap();
                let mut qr = q.slice(s![i..i + 1, h..h + 1, ..]).mapv(f64::from);
                let mut kr = k.slice(s![j..j + 1, kvh..kvh + 1, ..]).mapv(f64::from);
                table.rotate(qr.view_mut(), &[0]).unwrap();
                table.rotate(kr.view_mut(), &[1]).unwrap();
                let dot = (&qr * &kr).sum();
                let m = table.attention_factor();
                match scale {
                    None => dot / (D as f64).sqrt(),
                    Some(s) => s * dot / (m * m),
                }
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let z: f64 = e.iter().sum();
        for x in 0..DV {
            out[[0, h, x]] = (0..=i).map(|j| e[j] * v[[j, kvh, x]] as f64).sum::<f64>() / z;
        }
    }
    out
}

/// Worst `|got - want|` over one row block.
fn row_err(got: ArrayView3<f32>, want: &Array3<f64>) -> f64 {
    got.iter()
        .zip(want.iter())
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// The kernels' agreement with the independent computation: f32 kernels against an
/// f64 oracle on logits of a few units. The largest error measured is 4.5e-7;
/// a logit scale without `m^2` moves outputs by more than 1e-2 in every case with
/// `m != 1`.
const TOL: f64 = 2e-6;

fn inputs() -> (Array3<f32>, Array3<f32>, Array3<f32>) {
    (
        rand3((N, HQ, D), 11, 2.0),
        rand3((N, HKV, D), 12, 2.0),
        rand3((N, HKV, DV), 13, 1.0),
    )
}

#[test]
fn attention_factors_match_their_closed_forms() {
    for case in cases() {
        let m = case.config.frequencies_for_len(N).attention_factor();
        assert!(
            (m - case.m).abs() < 1e-12,
            "{}: attention factor {m}, closed form {}",
            case.name,
            case.m
        );
        let table =
            RotaryTable::<f64>::new(&case.config.frequencies_for_len(N), 1, Layout::Half).unwrap();
        assert!((table.cos_row(0).unwrap()[0] - case.m).abs() < 1e-12);
    }
}

#[test]
fn prefill_kernels_carry_the_attention_factor_squared() {
    let (q, k, v) = inputs();
    let pos: Vec<usize> = (0..N).collect();
    let tiles = [
        TileConfig::square(4).unwrap(),
        TileConfig::new(8, 16).unwrap(),
    ];
    let mut worst = 0f64;
    for case in cases() {
        let freqs = case.config.frequencies_for_len(N);
        for layout in [Layout::Half, Layout::Interleaved] {
            for map in MAPS {
                let want: Vec<Array3<f64>> = (0..N)
                    .map(|i| {
                        independent_row(
                            &case.config,
                            (N, None),
                            layout,
                            map,
                            (q.view(), k.view(), v.view()),
                            i,
                        )
                    })
                    .collect();
                let att = Attention::new(freqs.clone(), layout, map.ropex());
                let (qv, kv, vv) = (q.view(), k.view(), v.view());
                let mut outs = vec![
                    ("reference", att.reference(qv, kv, vv, &pos, &pos).unwrap()),
                    ("two_pass", att.two_pass(qv, kv, vv, &pos, &pos).unwrap()),
                    ("tiled", att.tiled(qv, kv, vv, &pos, &pos).unwrap()),
                ];
                for t in &tiles {
                    let (o, _) = att.tiled_with(qv, kv, vv, &pos, &pos, t).unwrap();
                    outs.push(("tiled_with", o));
                }
                for (kernel, out) in &outs {
                    for (i, w) in want.iter().enumerate() {
                        let e = row_err(out.slice(s![i..i + 1, .., ..]), w);
                        worst = worst.max(e);
                        assert!(
                            e < TOL,
                            "{} {layout:?} {map:?} {kernel}: row {i} off by {e:.3e}",
                            case.name
                        );
                    }
                }
            }
        }
    }
    println!("prefill kernels vs independent attention: max |err| = {worst:.3e}");
}

/// Decodes token by token (append one key/value, attend its query); step `t` is checked
/// against the independent row with the frequencies of a `t + 1`-token sequence, which
/// for LongRoPE switches from the short to the long factors past `L0`. `scale` is the
/// cache's explicit logit scale, if it has one.
fn decode_errors<C: DecodeCache>(
    mut cache: C,
    (case, scale): (&Case, Option<f64>),
    layout: Layout,
    map: Map,
) -> f64 {
    let (q, k, v) = inputs();
    let mut worst = 0f64;
    for t in 0..N {
        cache
            .append(k.slice(s![t..t + 1, .., ..]), v.slice(s![t..t + 1, .., ..]))
            .unwrap();
        let got = cache.attend(q.slice(s![t..t + 1, .., ..]), &[t]).unwrap();
        let want = independent_row(
            &case.config,
            (t + 1, scale),
            layout,
            map,
            (q.view(), k.view(), v.view()),
            t,
        );
        let e = row_err(got.view(), &want);
        assert!(
            e < TOL,
            "{} {layout:?} {map:?}: step {t} off by {e:.3e}",
            case.name
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn decode_caches_carry_the_attention_factor_squared() {
    let mut worst = 0f64;
    for case in cases() {
        for layout in [Layout::Half, Layout::Interleaved] {
            for map in MAPS {
                let cfg = case.config.clone();
                let ours = KvCache::new(
                    cfg.clone(),
                    layout,
                    map.ropex(),
                    CacheShape {
                        heads_kv: HKV,
                        head_dim: D,
                        value_dim: DV,
                    },
                )
                .unwrap();
                let su = KvCacheRerotating::new(
                    cfg,
                    layout,
                    map.ropex(),
                    CacheShape {
                        heads_kv: HKV,
                        head_dim: D,
                        value_dim: DV,
                    },
                )
                .unwrap();
                worst = worst.max(decode_errors(ours, (&case, None), layout, map));
                worst = worst.max(decode_errors(su, (&case, None), layout, map));
            }
        }
    }
    println!("decode caches vs independent attention: max |err| = {worst:.3e}");
}

/// `with_scale(s)` replaces `m^2 / sqrt(d)` by `s` applied to the dot product of the
/// unscaled rotation, in every kernel and both caches: the attention factor then no
/// longer enters the logits.
#[test]
fn explicit_scale_replaces_the_default() {
    const SCALE: f64 = 0.4;
    let (q, k, v) = inputs();
    let pos: Vec<usize> = (0..N).collect();
    let layout = Layout::Half;
    for case in cases() {
        let freqs = case.config.frequencies_for_len(N);
        for map in [Map::Rope, Map::ReRope(5)] {
            let att = Attention::new(freqs.clone(), layout, map.ropex())
                .with_scale(SCALE)
                .unwrap();
            let (qv, kv, vv) = (q.view(), k.view(), v.view());
            let outs = [
                ("reference", att.reference(qv, kv, vv, &pos, &pos).unwrap()),
                ("two_pass", att.two_pass(qv, kv, vv, &pos, &pos).unwrap()),
                ("tiled", att.tiled(qv, kv, vv, &pos, &pos).unwrap()),
            ];
            for i in 0..N {
                let want =
                    independent_row(&case.config, (N, Some(SCALE)), layout, map, (qv, kv, vv), i);
                for (kernel, out) in &outs {
                    let e = row_err(out.slice(s![i..i + 1, .., ..]), &want);
                    assert!(
                        e < TOL,
                        "{} {map:?} {kernel}: row {i} off by {e:.3e}",
                        case.name
                    );
                }
            }
            let cfg = case.config.clone();
            let ours = KvCache::new(
                cfg.clone(),
                layout,
                map.ropex(),
                CacheShape {
                    heads_kv: HKV,
                    head_dim: D,
                    value_dim: DV,
                },
            )
            .unwrap()
            .with_scale(SCALE)
            .unwrap();
            let su = KvCacheRerotating::new(
                cfg,
                layout,
                map.ropex(),
                CacheShape {
                    heads_kv: HKV,
                    head_dim: D,
                    value_dim: DV,
                },
            )
            .unwrap()
            .with_scale(SCALE)
            .unwrap();
            decode_errors(ours, (&case, Some(SCALE)), layout, map);
            decode_errors(su, (&case, Some(SCALE)), layout, map);
        }
    }
}
