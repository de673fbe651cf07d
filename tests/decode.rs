//! Decode with a KV cache against the f64 reference kernel: token by token, chunked
//! prefill, every map, GQA, log-n, layouts, partial rotary, ring wrap-around,
//! length-dependent schemes (refresh), Su's re-rotating baseline, and bad input.

use ndarray::{Array3, ArrayView3, Axis, concatenate, s};
use ropex::CacheShape;
use ropex::attention::Attention;
use ropex::attention::decode::{DecodeCache, KvCache, KvCacheRerotating, RefreshPolicy};
use ropex::{Layout, LongRope, PositionMap, RopeConfig, RopeError, Scaling};

mod common;
use common::{max_err, rand3};

const TOL: f32 = 1e-5;

/// One test problem: unrotated q, k, v for `n` tokens.
struct Problem {
    q: Array3<f32>,
    k: Array3<f32>,
    v: Array3<f32>,
}

impl Problem {
    fn new(n: usize, heads_q: usize, heads_kv: usize, head_dim: usize, value_dim: usize) -> Self {
        let seed = (n * 131 + heads_q * 17 + heads_kv * 5 + head_dim) as u64;
        Problem {
            q: rand3((n, heads_q, head_dim), seed),
            k: rand3((n, heads_kv, head_dim), seed + 1),
            v: rand3((n, heads_kv, value_dim), seed + 2),
        }
    }

    fn n(&self) -> usize {
        self.q.dim().0
    }

    /// The prefill the cache must reproduce: reference over the whole sequence.
    fn reference(&self, att: &Attention) -> Array3<f32> {
        let pos: Vec<usize> = (0..self.n()).collect();
        att.reference(self.q.view(), self.k.view(), self.v.view(), &pos, &pos)
            .unwrap()
    }

    /// Row `t` of a prefill of the first `len` tokens (`t < len`).
    fn reference_row(&self, att: &Attention, t: usize, len: usize) -> Array3<f32> {
        let pos: Vec<usize> = (0..len).collect();
        att.reference(
            self.q.slice(s![t..t + 1, .., ..]),
            self.k.slice(s![..len, .., ..]),
            self.v.slice(s![..len, .., ..]),
            &[t],
            &pos,
        )
        .unwrap()
    }
}

fn rows(x: &Array3<f32>, r: std::ops::Range<usize>) -> ArrayView3<'_, f32> {
    x.slice(s![r, .., ..])
}

/// Appends one token at a time and attends its query.
fn decode_tokens<C: DecodeCache>(cache: &mut C, p: &Problem) -> Array3<f32> {
    let mut out = Vec::new();
    for t in 0..p.n() {
        cache
            .append(rows(&p.k, t..t + 1), rows(&p.v, t..t + 1))
            .unwrap();
        out.push(cache.attend(rows(&p.q, t..t + 1), &[t]).unwrap());
    }
    let views: Vec<_> = out.iter().map(|a| a.view()).collect();
    concatenate(Axis(0), &views).unwrap()
}

/// Chunked prefill with chunks of `chunk` tokens (the last may be shorter).
fn prefill_chunks<C: DecodeCache>(cache: &mut C, p: &Problem, chunk: usize) -> Array3<f32> {
    let mut out = Vec::new();
    let mut t = 0;
    while t < p.n() {
        let e = (t + chunk).min(p.n());
        out.push(
            cache
                .prefill_chunk(rows(&p.q, t..e), rows(&p.k, t..e), rows(&p.v, t..e))
                .unwrap(),
        );
        t = e;
    }
    let views: Vec<_> = out.iter().map(|a| a.view()).collect();
    concatenate(Axis(0), &views).unwrap()
}

#[derive(Clone, Copy)]
struct Case {
    map: PositionMap,
    layout: Layout,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    rotary_dim: usize,
    log_n: Option<usize>,
}

impl Case {
    fn config(&self) -> RopeConfig {
        RopeConfig::new(self.head_dim, 10_000.0)
            .unwrap()
            .with_rotary_dim(self.rotary_dim)
            .unwrap()
    }

    fn cache(&self) -> KvCache {
        let c = KvCache::new(
            self.config(),
            self.layout,
            self.map,
            CacheShape {
                heads_kv: self.heads_kv,
                head_dim: self.head_dim,
                value_dim: self.head_dim + 2,
            },
        )
        .unwrap();
        match self.log_n {
            Some(l) => c.with_log_n(l).unwrap(),
            None => c,
        }
    }

    fn su(&self) -> KvCacheRerotating {
        let c = KvCacheRerotating::new(
            self.config(),
            self.layout,
            self.map,
            CacheShape {
                heads_kv: self.heads_kv,
                head_dim: self.head_dim,
                value_dim: self.head_dim + 2,
            },
        )
        .unwrap();
        match self.log_n {
            Some(l) => c.with_log_n(l).unwrap(),
            None => c,
        }
    }

    fn problem(&self, n: usize) -> Problem {
        Problem::new(
            n,
            self.heads_q,
            self.heads_kv,
            self.head_dim,
            self.head_dim + 2,
        )
    }

    fn check(&self, n: usize, chunks: &[usize], with_su: bool) {
        let p = self.problem(n);
        let cache = self.cache();
        let want = p.reference(&cache.attention());
        let label = format!(
            "{:?} {:?} H {}/{} d {}/{} log-n {:?} n {n}",
            self.map,
            self.layout,
            self.heads_q,
            self.heads_kv,
            self.rotary_dim,
            self.head_dim,
            self.log_n
        );
        let e = max_err(&decode_tokens(&mut cache.clone(), &p), &want);
        assert!(e < TOL, "token by token, {label}: {e}");
        for &c in chunks {
            let e = max_err(&prefill_chunks(&mut cache.clone(), &p, c), &want);
            assert!(e < TOL, "chunks of {c}, {label}: {e}");
        }
        if with_su {
            let e = max_err(&decode_tokens(&mut self.su(), &p), &want);
            assert!(e < TOL, "Su token by token, {label}: {e}");
            let e = max_err(&prefill_chunks(&mut self.su(), &p, 3), &want);
            assert!(e < TOL, "Su chunks of 3, {label}: {e}");
        }
    }
}

fn maps(n: usize) -> Vec<PositionMap> {
    vec![
        PositionMap::Rope,
        PositionMap::rerope(1).unwrap(),
        PositionMap::rerope(5).unwrap(),
        PositionMap::rerope(n + 7).unwrap(),
        PositionMap::leaky_rerope(5, 2.0).unwrap(),
        PositionMap::leaky_rerope(5, 16.0).unwrap(),
        PositionMap::leaky_rerope(4, 1.0 / 16.0).unwrap(),
        PositionMap::interpolated(2.0).unwrap(),
        PositionMap::self_extend(3, 5).unwrap(),
        PositionMap::self_extend(1, 4).unwrap(),
        PositionMap::self_extend_scaled(2, 7, 3.0).unwrap(),
        PositionMap::dca(8, 3).unwrap(),
        PositionMap::dca(11, 0).unwrap(),
        PositionMap::dca(n + 5, 3).unwrap(),
        PositionMap::streaming(4, 6).unwrap(),
        PositionMap::streaming(0, 5).unwrap(),
        PositionMap::streaming(2, n).unwrap(),
    ]
}

#[test]
fn every_map_layout_gqa_log_n_and_partial_rotary_match_reference() {
    let n = 29;
    let mut variant = 0;
    for map in maps(n) {
        for layout in [Layout::Half, Layout::Interleaved] {
            for (heads_q, heads_kv, head_dim, rotary_dim, log_n) in [
                (4, 2, 8, 8, None),
                (3, 1, 12, 8, Some(8)),
                (2, 2, 6, 4, Some(4)),
            ] {
                let case = Case {
                    map,
                    layout,
                    heads_q,
                    heads_kv,
                    head_dim,
                    rotary_dim,
                    log_n,
                };
                // All chunk sizes for every case would be redundant; rotate through them.
                let chunks = [[1, 17], [3, 17], [1, 3]][variant % 3];
                case.check(n, &chunks, variant % 2 == 0);
                variant += 1;
            }
        }
    }
}

#[test]
fn ring_wraps_for_long_sequences() {
    for map in [
        PositionMap::rerope(5).unwrap(),
        PositionMap::leaky_rerope(7, 16.0).unwrap(),
        PositionMap::leaky_rerope(3, 1.0 / 16.0).unwrap(),
    ] {
        let case = Case {
            map,
            layout: Layout::Half,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 8,
            rotary_dim: 8,
            log_n: Some(16),
        };
        case.check(200, &[17, 64], false);
    }
}

#[test]
fn attend_at_older_positions_rebuilds_evicted_band_keys() {
    for map in [
        PositionMap::leaky_rerope(6, 4.0).unwrap(),
        PositionMap::self_extend(3, 6).unwrap(),
        PositionMap::dca(9, 2).unwrap(),
        // Not yet full (S + W >= 40): nothing evicted, every position may attend.
        PositionMap::streaming(4, 36).unwrap(),
    ] {
        attend_at_older_positions(map);
    }
}

fn attend_at_older_positions(map: PositionMap) {
    let case = Case {
        map,
        layout: Layout::Interleaved,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 8,
        rotary_dim: 8,
        log_n: None,
    };
    let p = case.problem(40);
    let mut cache = case.cache();
    cache.append(p.k.view(), p.v.view()).unwrap();
    let want = p.reference(&cache.attention());
    let q_pos = [39usize, 0, 3, 20, 33, 34, 38];
    let q = ndarray::stack(
        Axis(0),
        &q_pos
            .iter()
            .map(|&t| p.q.slice(s![t, .., ..]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let got = cache.attend(q.view(), &q_pos).unwrap();
    for (a, &t) in q_pos.iter().enumerate() {
        let e = max_err(
            &got.slice(s![a..a + 1, .., ..]).to_owned(),
            &want.slice(s![t..t + 1, .., ..]).to_owned(),
        );
        assert!(e < TOL, "{map:?} query at {t}: {e}");
    }
}

#[test]
fn memory_is_plain_cache_plus_window() {
    let (hkv, d, dv) = (2, 8, 6);
    let plain = RopeConfig::new(d, 10_000.0).unwrap();
    let dynamic = plain
        .clone()
        .with_scaling(Scaling::dynamic(2.0, 8))
        .unwrap();
    let p = Problem::new(20, 2, hkv, d, dv);
    // (config, map, window, raw keys kept)
    let cases = [
        (plain.clone(), PositionMap::Rope, 0, false),
        (plain.clone(), PositionMap::rerope(5).unwrap(), 5, false),
        (plain.clone(), PositionMap::rerope(64).unwrap(), 64, false),
        (
            plain.clone(),
            PositionMap::leaky_rerope(5, 16.0).unwrap(),
            5,
            false,
        ),
        (dynamic.clone(), PositionMap::Rope, 0, true),
        (dynamic.clone(), PositionMap::rerope(5).unwrap(), 5, false),
        (
            dynamic,
            PositionMap::leaky_rerope(5, 16.0).unwrap(),
            5,
            true,
        ),
    ];
    for (cfg, map, w, raw) in cases {
        let mut cache = KvCache::new(
            cfg.clone(),
            Layout::Half,
            map,
            CacheShape {
                heads_kv: hkv,
                head_dim: d,
                value_dim: dv,
            },
        )
        .unwrap();
        let mut su = KvCacheRerotating::new(
            cfg,
            Layout::Half,
            map,
            CacheShape {
                heads_kv: hkv,
                head_dim: d,
                value_dim: dv,
            },
        )
        .unwrap();
        assert_eq!(cache.keeps_raw_keys(), raw, "{map:?}");
        for n in [0usize, 1, 4, 20] {
            if n > 0 {
                let prev = cache.len();
                cache
                    .append(rows(&p.k, prev..n), rows(&p.v, prev..n))
                    .unwrap();
                su.append(rows(&p.k, prev..n), rows(&p.v, prev..n)).unwrap();
            }
            let plain_bytes = 4 * hkv * n * (d + dv);
            let want = plain_bytes + 4 * hkv * (n.min(w) * d + if raw { n * d } else { 0 });
            assert_eq!(cache.memory_bytes(), want, "{map:?} n {n}");
            assert_eq!(su.memory_bytes(), plain_bytes);
            assert_eq!(DecodeCache::memory_bytes(&cache), want);
        }
    }
}

/// A StreamingLLM cache keeps at most S + W keys and values whatever the length: its
/// memory is flat over ten times its capacity (with and without raw keys), and every
/// step still equals the reference row of a prefill over the whole sequence.
#[test]
fn streaming_cache_memory_is_flat() {
    let (hkv, d, dv, sinks, window) = (2, 8, 6, 4, 12);
    let cap = sinks + window;
    let n = 10 * cap;
    let p = Problem::new(n, 4, hkv, d, dv);
    let plain = RopeConfig::new(d, 10_000.0).unwrap();
    let dynamic = plain
        .clone()
        .with_scaling(Scaling::dynamic(2.0, 8))
        .unwrap();
    let map = PositionMap::streaming(sinks, window).unwrap();
    for (cfg, raw) in [(plain, false), (dynamic, true)] {
        let mut cache = KvCache::new(
            cfg.clone(),
            Layout::Half,
            map,
            CacheShape {
                heads_kv: hkv,
                head_dim: d,
                value_dim: dv,
            },
        )
        .unwrap();
        assert_eq!(cache.keeps_raw_keys(), raw);
        let flat = 4 * hkv * cap * (d + dv + if raw { d } else { 0 });
        for t in 0..n {
            cache
                .append(rows(&p.k, t..t + 1), rows(&p.v, t..t + 1))
                .unwrap();
            let stored = (t + 1).min(cap);
            assert_eq!(
                cache.memory_bytes(),
                4 * hkv * stored * (d + dv + if raw { d } else { 0 }),
                "step {t}"
            );
            if t % 7 == 0 || t == n - 1 {
                let got = cache.attend(rows(&p.q, t..t + 1), &[t]).unwrap();
                let want = p.reference_row(&cache.attention(), t, t + 1);
                let e = max_err(&got, &want);
                assert!(e < TOL, "step {t}: {e}");
            }
        }
        assert_eq!(cache.memory_bytes(), flat);
        // An older query's window has been evicted: a typed error, not a wrong answer.
        assert!(matches!(
            cache.attend(rows(&p.q, 0..1), &[n - 2]),
            Err(RopeError::InvalidParameter { .. })
        ));
    }
}

/// Shapes that cannot be allocated and windows that would wrap are typed errors or
/// exact answers, never a panic, an abort or a wrong result.
#[test]
fn huge_shapes_and_windows() {
    let cfg = RopeConfig::new(8, 10_000.0).unwrap();
    for heads_kv in [usize::MAX / 2, 1_000_000_000, usize::MAX] {
        for r in [
            KvCache::new(
                cfg.clone(),
                Layout::Half,
                PositionMap::Rope,
                CacheShape::square(heads_kv, 8),
            )
            .map(|_| ()),
            KvCacheRerotating::new(
                cfg.clone(),
                Layout::Half,
                PositionMap::Rope,
                CacheShape::square(heads_kv, 8),
            )
            .map(|_| ()),
        ] {
            assert!(
                matches!(r, Err(RopeError::InvalidParameter { .. })),
                "{heads_kv}"
            );
        }
    }
    for dims in [(8, usize::MAX), (usize::MAX / 2, 8)] {
        let r = KvCache::new(
            cfg.clone(),
            Layout::Half,
            PositionMap::Rope,
            CacheShape {
                heads_kv: 1,
                head_dim: dims.0,
                value_dim: dims.1,
            },
        );
        assert!(
            matches!(r, Err(RopeError::InvalidParameter { .. })),
            "{dims:?}"
        );
    }
    // ReRoPE and Leaky ReRoPE with a window of usize::MAX cover every pair: plain RoPE.
    let p = Problem::new(30, 2, 1, 8, 8);
    let want = p.reference(&Attention::new(
        cfg.frequencies(),
        Layout::Half,
        PositionMap::Rope,
    ));
    for map in [
        PositionMap::rerope(usize::MAX).unwrap(),
        PositionMap::leaky_rerope(usize::MAX, 4.0).unwrap(),
        PositionMap::self_extend(4, usize::MAX).unwrap(),
        PositionMap::dca(usize::MAX, 3).unwrap(),
        PositionMap::streaming(3, usize::MAX - 3).unwrap(),
    ] {
        let mut cache =
            KvCache::new(cfg.clone(), Layout::Half, map, CacheShape::square(1, 8)).unwrap();
        for chunk in [1, 7] {
            let e = max_err(&prefill_chunks(&mut cache.clone(), &p, chunk), &want);
            assert!(e < TOL, "{map:?} chunks of {chunk}: {e}");
        }
        let e = max_err(&decode_tokens(&mut cache, &p), &want);
        assert!(e < TOL, "{map:?}: {e}");
    }
}

fn longrope(l0: usize) -> Scaling {
    Scaling::LongRope(LongRope {
        short_factor: vec![1.0, 1.3, 2.0, 2.5],
        long_factor: vec![1.0, 3.0, 7.0, 16.0],
        original_max_position_embeddings: l0,
        factor: 4.0,
        attention_factor: None,
    })
}

/// Decoding token by token under a length-dependent scheme: each step equals row `t` of a
/// fresh prefill of the `t + 1` cached tokens with the frequencies for the selecting
/// length; returns the number of re-rotations.
fn check_length_dependent(
    scaling: Scaling,
    map: PositionMap,
    policy: RefreshPolicy,
    n: usize,
) -> usize {
    let (hq, hkv, d) = (2, 1, 8);
    let cfg = RopeConfig::new(d, 10_000.0)
        .unwrap()
        .with_scaling(scaling.clone())
        .unwrap();
    let p = Problem::new(n, hq, hkv, d, d);
    let mut cache = KvCache::new(cfg.clone(), Layout::Half, map, CacheShape::square(hkv, d))
        .unwrap()
        .with_refresh_policy(policy);
    let mut su = KvCacheRerotating::new(cfg.clone(), Layout::Half, map, CacheShape::square(hkv, d))
        .unwrap()
        .with_refresh_policy(policy);
    let mut stale_differs = false;
    for t in 0..n {
        let len = t + 1;
        cache
            .append(rows(&p.k, t..len), rows(&p.v, t..len))
            .unwrap();
        su.append(rows(&p.k, t..len), rows(&p.v, t..len)).unwrap();
        let l = policy.frequency_len(&scaling, len);
        assert_eq!(cache.frequency_len(), l);
        let att = Attention::new(cfg.frequencies_for_len(l), Layout::Half, map);
        assert_eq!(&cache.attention(), &att);
        let want = p.reference_row(&att, t, len);
        let got = cache.attend(rows(&p.q, t..len), &[t]).unwrap();
        let e = max_err(&got, &want);
        assert!(e < TOL, "{scaling:?} {map:?} {policy:?} step {t}: {e}");
        let e = max_err(&su.attend(rows(&p.q, t..len), &[t]).unwrap(), &want);
        assert!(e < TOL, "Su, {scaling:?} {map:?} {policy:?} step {t}: {e}");
        // The keys a non-refreshing cache would serve: the initial frequencies.
        let stale = Attention::new(cfg.frequencies(), Layout::Half, map);
        stale_differs |= max_err(&p.reference_row(&stale, t, len), &want) > 1e-3;
    }
    assert!(stale_differs, "the test must exercise a frequency change");

    // Chunked prefill: each chunk uses the frequencies for the length after it.
    for chunk in [3, 17] {
        let mut cache = KvCache::new(cfg.clone(), Layout::Half, map, CacheShape::square(hkv, d))
            .unwrap()
            .with_refresh_policy(policy);
        let mut t = 0;
        while t < n {
            let e = (t + chunk).min(n);
            let got = cache
                .prefill_chunk(rows(&p.q, t..e), rows(&p.k, t..e), rows(&p.v, t..e))
                .unwrap();
            let l = policy.frequency_len(&scaling, e);
            let att = Attention::new(cfg.frequencies_for_len(l), Layout::Half, map);
            for r in t..e {
                let want = p.reference_row(&att, r, e);
                let err = max_err(&got.slice(s![r - t..r - t + 1, .., ..]).to_owned(), &want);
                assert!(
                    err < TOL,
                    "chunk {chunk}, {scaling:?} {map:?} {policy:?} row {r}: {err}"
                );
            }
            t = e;
        }
    }
    cache.refreshes()
}

#[test]
fn longrope_switch_rerotates_once_and_equals_fresh_prefill() {
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(4).unwrap(),
        PositionMap::leaky_rerope(4, 16.0).unwrap(),
    ] {
        for policy in [RefreshPolicy::EveryChange, RefreshPolicy::PowerOfTwo] {
            // L0 = 12 is not a power of two: the switch still happens exactly at 13.
            let refreshes = check_length_dependent(longrope(12), map, policy, 30);
            assert_eq!(refreshes, 1, "{map:?} {policy:?}");
        }
    }
}

#[test]
fn dynamic_ntk_growth_equals_fresh_prefill() {
    let n = 40;
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(5).unwrap(),
        PositionMap::leaky_rerope(3, 2.0).unwrap(),
        PositionMap::self_extend(3, 5).unwrap(),
        PositionMap::dca(8, 3).unwrap(),
        PositionMap::streaming(2, 6).unwrap(),
    ] {
        let every =
            check_length_dependent(Scaling::dynamic(4.0, 8), map, RefreshPolicy::EveryChange, n);
        assert_eq!(every, n - 8, "{map:?}: one re-rotation per append past L0");
        let pow2 =
            check_length_dependent(Scaling::dynamic(4.0, 8), map, RefreshPolicy::PowerOfTwo, n);
        // Lengths 9..=16 -> 16, 17..=32 -> 32, 33..=40 -> 64.
        assert_eq!(pow2, 3, "{map:?}");
    }
}

#[test]
fn refresh_policy_set_after_appends_rerotates() {
    let cfg = RopeConfig::new(8, 10_000.0)
        .unwrap()
        .with_scaling(Scaling::dynamic(2.0, 4))
        .unwrap();
    let map = PositionMap::leaky_rerope(3, 4.0).unwrap();
    let p = Problem::new(11, 2, 1, 8, 8);
    let mut cache = KvCache::new(cfg.clone(), Layout::Half, map, CacheShape::square(1, 8)).unwrap();
    cache.append(p.k.view(), p.v.view()).unwrap();
    assert_eq!(cache.frequency_len(), 11);
    let cache = cache.with_refresh_policy(RefreshPolicy::PowerOfTwo);
    assert_eq!(cache.frequency_len(), 16);
    assert_eq!(cache.refreshes(), 1);
    let att = Attention::new(cfg.frequencies_for_len(16), Layout::Half, map);
    let want = p.reference_row(&att, 10, 11);
    let got = cache.attend(rows(&p.q, 10..11), &[10]).unwrap();
    assert!(max_err(&got, &want) < TOL);
}

#[test]
fn scale_override_and_attention_factor() {
    // YaRN's attention factor goes into the default scale as m^2 / sqrt(head_dim).
    let cfg = RopeConfig::new(8, 10_000.0)
        .unwrap()
        .with_scaling(Scaling::Yarn(ropex::Yarn::new(4.0, 16)))
        .unwrap();
    let map = PositionMap::rerope(3).unwrap();
    let p = Problem::new(12, 2, 1, 8, 8);
    for scale in [None, Some(0.7)] {
        let mut cache =
            KvCache::new(cfg.clone(), Layout::Half, map, CacheShape::square(1, 8)).unwrap();
        let mut att = Attention::new(cfg.frequencies(), Layout::Half, map);
        if let Some(s) = scale {
            cache = cache.with_scale(s).unwrap();
            att = att.with_scale(s).unwrap();
        }
        let got = prefill_chunks(&mut cache, &p, 5);
        assert!(max_err(&got, &p.reference(&att)) < TOL);
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let cfg = RopeConfig::new(8, 10_000.0).unwrap();
    let map = PositionMap::rerope(3).unwrap();
    let is_shape = |r: Result<_, RopeError>| matches!(r, Err(RopeError::ShapeMismatch { .. }));
    let is_invalid = |r: Result<_, RopeError>| matches!(r, Err(RopeError::InvalidParameter { .. }));

    // Construction.
    let new = |map, hkv, d| {
        KvCache::new(
            cfg.clone(),
            Layout::Half,
            map,
            CacheShape {
                heads_kv: hkv,
                head_dim: d,
                value_dim: 8,
            },
        )
        .map(|_| ())
    };
    assert!(is_invalid(new(PositionMap::ReRope { window: 0 }, 1, 8)));
    assert!(is_invalid(new(
        PositionMap::LeakyReRope {
            window: 0,
            leak: 2.0
        },
        1,
        8
    )));
    assert!(is_invalid(new(
        PositionMap::LeakyReRope {
            window: 2,
            leak: f64::NAN
        },
        1,
        8
    )));
    assert!(is_invalid(new(map, 0, 8)));
    assert!(is_shape(new(map, 1, 6)));
    assert!(is_invalid(
        KvCacheRerotating::new(
            cfg.clone(),
            Layout::Half,
            PositionMap::ReRope { window: 0 },
            CacheShape::square(1, 8)
        )
        .map(|_| ())
    ));
    let cache = KvCache::new(
        cfg.clone(),
        Layout::Half,
        map,
        CacheShape {
            heads_kv: 2,
            head_dim: 8,
            value_dim: 4,
        },
    )
    .unwrap();
    assert!(is_invalid(cache.clone().with_scale(0.0).map(|_| ())));
    assert!(is_invalid(cache.clone().with_scale(f64::NAN).map(|_| ())));
    assert!(is_invalid(cache.clone().with_log_n(1).map(|_| ())));

    for mut c in [
        Box::new(cache) as Box<dyn DecodeCache>,
        Box::new(
            KvCacheRerotating::new(
                cfg.clone(),
                Layout::Half,
                map,
                CacheShape {
                    heads_kv: 2,
                    head_dim: 8,
                    value_dim: 4,
                },
            )
            .unwrap(),
        ),
    ] {
        let k = Array3::<f32>::zeros((3, 2, 8));
        let v = Array3::<f32>::zeros((3, 2, 4));
        // Empty cache: no query position is valid.
        assert!(is_invalid(
            c.attend(Array3::zeros((1, 2, 8)).view(), &[0]).map(|_| ())
        ));
        // Append shape mismatches.
        assert!(is_shape(
            c.append(Array3::zeros((3, 1, 8)).view(), v.view())
        ));
        assert!(is_shape(
            c.append(Array3::zeros((3, 2, 7)).view(), v.view())
        ));
        assert!(is_shape(
            c.append(k.view(), Array3::zeros((2, 2, 4)).view())
        ));
        assert!(is_shape(
            c.append(k.view(), Array3::zeros((3, 1, 4)).view())
        ));
        assert!(is_shape(
            c.append(k.view(), Array3::zeros((3, 2, 5)).view())
        ));
        assert_eq!(c.len(), 0);
        assert!(c.is_empty());
        // Prefill with a query count that differs from the chunk: cache unchanged.
        assert!(is_shape(
            c.prefill_chunk(Array3::zeros((2, 2, 8)).view(), k.view(), v.view())
                .map(|_| ())
        ));
        assert!(is_shape(
            c.prefill_chunk(Array3::zeros((3, 3, 8)).view(), k.view(), v.view())
                .map(|_| ())
        ));
        assert_eq!(c.len(), 0);
        c.append(k.view(), v.view()).unwrap();
        // Attend: heads not a multiple, wrong head dim, wrong position count, beyond cache.
        assert!(is_shape(
            c.attend(Array3::zeros((1, 3, 8)).view(), &[2]).map(|_| ())
        ));
        assert!(is_shape(
            c.attend(Array3::zeros((1, 0, 8)).view(), &[2]).map(|_| ())
        ));
        assert!(is_shape(
            c.attend(Array3::zeros((1, 2, 6)).view(), &[2]).map(|_| ())
        ));
        assert!(is_shape(
            c.attend(Array3::zeros((2, 2, 8)).view(), &[2]).map(|_| ())
        ));
        assert!(is_invalid(
            c.attend(Array3::zeros((1, 2, 8)).view(), &[3]).map(|_| ())
        ));
        // Empty appends and empty queries are fine.
        c.append(
            Array3::zeros((0, 2, 8)).view(),
            Array3::zeros((0, 2, 4)).view(),
        )
        .unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.attend(Array3::zeros((0, 4, 8)).view(), &[])
                .unwrap()
                .dim(),
            (0, 4, 4)
        );
    }
}

#[test]
fn nan_propagates_only_to_rows_that_see_it_and_huge_logits_stay_finite() {
    let n = 12;
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(3).unwrap(),
        PositionMap::leaky_rerope(3, 4.0).unwrap(),
    ] {
        let case = Case {
            map,
            layout: Layout::Half,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 8,
            rotary_dim: 8,
            log_n: None,
        };
        let mut p = case.problem(n);
        p.k[[5, 0, 2]] = f32::NAN;
        p.q[[2, 1, 0]] = f32::NAN;
        let want = p.reference(&case.cache().attention());
        for got in [
            decode_tokens(&mut case.cache(), &p),
            prefill_chunks(&mut case.cache(), &p, 4),
            decode_tokens(&mut case.su(), &p),
        ] {
            for t in 0..n {
                for h in 0..2 {
                    let row = got.slice(s![t, h, ..]);
                    let nan_expected = t >= 5 || (t == 2 && h == 1);
                    assert!(
                        want.slice(s![t, h, ..])
                            .iter()
                            .all(|x| x.is_nan() == nan_expected)
                    );
                    assert!(
                        row.iter().all(|x| x.is_nan() == nan_expected),
                        "{map:?} row {t} head {h}"
                    );
                }
            }
        }

        // Logits of about 1e4 stay finite and match the reference.
        let big = Problem {
            q: Array3::from_elem((n, 2, 8), 100.0),
            k: Array3::from_elem((n, 1, 8), 100.0),
            v: case.problem(n).v,
        };
        let want = big.reference(&case.cache().attention());
        let got = decode_tokens(&mut case.cache(), &big);
        assert!(got.iter().all(|x| x.is_finite()));
        assert!(max_err(&got, &want) < 1e-3, "{}", max_err(&got, &want));
    }
}

/// DCA's logit scale depends on the length so far: every decode step equals the
/// reference row of a prefill of the tokens cached at that step, with the same scale;
/// the factor is ChunkLlama's `(0.05 ln(n/L) + 1)^2`.
#[test]
fn dca_logit_scale_follows_the_cache_length() {
    use ropex::attention::dca_logit_factor;
    assert_eq!(dca_logit_factor(100, 128), 1.0);
    assert!((dca_logit_factor(512, 128) - (0.05 * 4f64.ln() + 1.0).powi(2)).abs() < 1e-15);
    let cfg = RopeConfig::new(8, 10_000.0).unwrap();
    let map = PositionMap::dca(8, 2).unwrap();
    let p = Problem::new(40, 2, 1, 8, 8);
    let train = 10;
    for mut cache in [
        Box::new(
            KvCache::new(cfg.clone(), Layout::Half, map, CacheShape::square(1, 8))
                .unwrap()
                .with_dca_logit_scale(train)
                .unwrap(),
        ) as Box<dyn DecodeCache>,
        Box::new(
            KvCacheRerotating::new(cfg.clone(), Layout::Half, map, CacheShape::square(1, 8))
                .unwrap()
                .with_dca_logit_scale(train)
                .unwrap(),
        ),
    ] {
        let att = Attention::new(cfg.frequencies(), Layout::Half, map)
            .with_dca_logit_scale(train)
            .unwrap();
        for t in 0..p.n() {
            cache
                .append(rows(&p.k, t..t + 1), rows(&p.v, t..t + 1))
                .unwrap();
            let got = cache.attend(rows(&p.q, t..t + 1), &[t]).unwrap();
            let e = max_err(&got, &p.reference_row(&att, t, t + 1));
            assert!(e < TOL, "step {t}: {e}");
        }
    }
    assert!(
        KvCache::new(cfg, Layout::Half, map, CacheShape::square(1, 8))
            .unwrap()
            .with_dca_logit_scale(0)
            .is_err()
    );
}

/// Sliding-window and chunked masks on the caches: decode and chunked prefill equal the
/// masked reference prefill for every non-evicting map; an evicting StreamingLLM cache
/// refuses a mask.
#[test]
fn masks_on_the_caches_match_the_masked_reference() {
    use ropex::attention::Mask;
    let cfg = RopeConfig::new(8, 10_000.0).unwrap();
    let p = Problem::new(37, 4, 2, 8, 6);
    let masks = [
        Mask::NONE.with_sliding_window(7).unwrap(),
        Mask::NONE.with_sliding_window(1).unwrap(),
        Mask::NONE.with_chunked(9).unwrap(),
        Mask::NONE
            .with_sliding_window(5)
            .unwrap()
            .with_chunked(16)
            .unwrap(),
    ];
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(5).unwrap(),
        PositionMap::leaky_rerope(4, 8.0).unwrap(),
        PositionMap::interpolated(2.0).unwrap(),
        PositionMap::self_extend(3, 6).unwrap(),
        PositionMap::dca(10, 3).unwrap(),
    ] {
        for mask in masks {
            let cache = KvCache::new(
                cfg.clone(),
                Layout::Half,
                map,
                CacheShape {
                    heads_kv: 2,
                    head_dim: 8,
                    value_dim: 6,
                },
            )
            .unwrap()
            .with_mask(mask)
            .unwrap();
            let att = cache.attention();
            assert_eq!(att.mask(), mask);
            let want = p.reference(&att);
            let label = format!("{map:?} {mask:?}");
            let e = max_err(&decode_tokens(&mut cache.clone(), &p), &want);
            assert!(e < TOL, "token by token, {label}: {e}");
            for chunk in [4, 37] {
                let e = max_err(&prefill_chunks(&mut cache.clone(), &p, chunk), &want);
                assert!(e < TOL, "chunks of {chunk}, {label}: {e}");
            }
            let su = KvCacheRerotating::new(
                cfg.clone(),
                Layout::Half,
                map,
                CacheShape {
                    heads_kv: 2,
                    head_dim: 8,
                    value_dim: 6,
                },
            )
            .unwrap()
            .with_mask(mask)
            .unwrap();
            let e = max_err(&prefill_chunks(&mut su.clone(), &p, 5), &want);
            assert!(e < TOL, "Su, {label}: {e}");
        }
    }
    let streaming = KvCache::new(
        cfg,
        Layout::Half,
        PositionMap::streaming(2, 8).unwrap(),
        CacheShape {
            heads_kv: 2,
            head_dim: 8,
            value_dim: 6,
        },
    )
    .unwrap();
    assert!(matches!(
        streaming.with_mask(masks[0]),
        Err(RopeError::InvalidParameter { .. })
    ));
}
