//! The paged KV cache against the contiguous `KvCache` and the f64 reference kernel:
//! every map, fork / truncate / rollback programs, pool exhaustion, batched decode,
//! bf16 / f16 storage within a derived error bound, a random-program proptest against a
//! model of the cache, and bad input.

use std::collections::HashSet;

use ndarray::{Array3, ArrayView3, Axis, concatenate, s};
use proptest::prelude::*;
use ropex::attention::decode::{BatchScratch, DecodeScratch, KvCache, PagedKvCache, SeqId};
use ropex::attention::{Attention, Bf16Products};
use ropex::{CacheShape, Element, Layout, PositionMap, RopeConfig, RopeError, Scaling};

mod common;
use common::{max_err, rand3};

const TOL: f32 = 1e-5;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 16;

fn cfg() -> RopeConfig {
    RopeConfig::new(D, 10_000.0).unwrap()
}

/// Every map the paged cache takes (all but StreamingLLM).
fn maps() -> Vec<PositionMap> {
    vec![
        PositionMap::Rope,
        PositionMap::rerope(5).unwrap(),
        PositionMap::leaky_rerope(6, 4.0).unwrap(),
        PositionMap::interpolated(2.0).unwrap(),
        PositionMap::self_extend(3, 5).unwrap(),
        PositionMap::dca(8, 3).unwrap(),
    ]
}

fn paged<S: Element>(map: PositionMap, block: usize, blocks: usize) -> PagedKvCache<S> {
    PagedKvCache::<S>::new_typed(
        cfg(),
        Layout::Half,
        map,
        CacheShape::square(HKV, D),
        block,
        blocks,
    )
    .unwrap()
}

fn rows(x: &Array3<f32>, r: std::ops::Range<usize>) -> ArrayView3<'_, f32> {
    x.slice(s![r, .., ..])
}

/// Row `i` of the reference prefill over `k`, `v` (every token of a sequence).
fn reference_row(
    att: &Attention,
    q: ArrayView3<f32>,
    k: &Array3<f32>,
    v: &Array3<f32>,
    i: usize,
) -> Array3<f32> {
    let pos: Vec<usize> = (0..k.dim().0).collect();
    att.reference(q, k.view(), v.view(), &[i], &pos).unwrap()
}

/// Token by token: the paged cache (blocks of 4, so many blocks and partial tails) and
/// the contiguous cache give the same rows, and both match the reference; a whole-prompt
/// chunked prefill agrees too.
#[test]
fn paged_equals_contiguous_for_every_map() {
    let n = 23;
    let (q, k, v) = (
        rand3((n, HQ, D), 1),
        rand3((n, HKV, D), 2),
        rand3((n, HKV, D), 3),
    );
    for map in maps() {
        let mut contiguous =
            KvCache::new(cfg(), Layout::Half, map, CacheShape::square(HKV, D)).unwrap();
        let mut cache = paged::<f32>(map, 4, 16);
        let a = cache.add_sequence().unwrap();
        let att = cache.attention();
        for t in 0..n {
            contiguous
                .append(rows(&k, t..t + 1), rows(&v, t..t + 1))
                .unwrap();
            cache
                .append(a, rows(&k, t..t + 1), rows(&v, t..t + 1))
                .unwrap();
            let want = contiguous.attend(rows(&q, t..t + 1), &[t]).unwrap();
            let got = cache.attend(a, rows(&q, t..t + 1), &[t]).unwrap();
            assert!(max_err(&got, &want) < TOL, "{map:?} t={t}");
            let reference = reference_row(
                &att,
                rows(&q, t..t + 1),
                &k.slice(s![..t + 1, .., ..]).to_owned(),
                &v.slice(s![..t + 1, .., ..]).to_owned(),
                t,
            );
            assert!(
                max_err(&got, &reference) < TOL,
                "{map:?} t={t} vs reference"
            );
        }
        assert_eq!(cache.pool().used_blocks(), n.div_ceil(4));
        // Queries at every older position (the band keys of plane 1 serve them directly).
        let all: Vec<usize> = (0..n).collect();
        let got = cache.attend(a, q.view(), &all).unwrap();
        let want = contiguous.attend(q.view(), &all).unwrap();
        assert!(max_err(&got, &want) < TOL, "{map:?} older positions");
        // Chunked prefill in chunks of 5 on a fresh sequence.
        let b = cache.add_sequence().unwrap();
        let mut parts = Vec::new();
        for lo in (0..n).step_by(5) {
            let hi = (lo + 5).min(n);
            parts.push(
                cache
                    .prefill_chunk(b, rows(&q, lo..hi), rows(&k, lo..hi), rows(&v, lo..hi))
                    .unwrap(),
            );
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        let chunked = concatenate(Axis(0), &views).unwrap();
        assert!(max_err(&chunked, &want) < TOL, "{map:?} chunked prefill");
    }
}

/// Fork a prompt, decode both branches, roll one back and regrow it: after every step
/// each sequence equals a fresh contiguous cache over its own token list, blocks are
/// shared until written, and the pool's count matches the distinct blocks of the tables.
#[test]
fn fork_truncate_rollback_match_fresh_contiguous_caches() {
    let n = 40;
    let (q, k, v) = (
        rand3((n, HQ, D), 11),
        rand3((n, HKV, D), 12),
        rand3((n, HKV, D), 13),
    );
    for map in maps() {
        let mut cache = paged::<f32>(map, 4, 32);
        let check = |cache: &PagedKvCache, id: SeqId, tokens: &[usize]| {
            let mut fresh =
                KvCache::new(cfg(), Layout::Half, map, CacheShape::square(HKV, D)).unwrap();
            let kk = k.select(Axis(0), tokens);
            let vv = v.select(Axis(0), tokens);
            fresh.append(kk.view(), vv.view()).unwrap();
            let i = tokens.len() - 1;
            let qq = q.select(Axis(0), &[tokens[i]]);
            let want = fresh.attend(qq.view(), &[i]).unwrap();
            let got = cache.attend(id, qq.view(), &[i]).unwrap();
            assert!(max_err(&got, &want) < TOL, "{map:?} tokens {tokens:?}");
        };
        let a = cache.add_sequence().unwrap();
        cache.append(a, rows(&k, 0..10), rows(&v, 0..10)).unwrap();
        let b = cache.fork(a).unwrap();
        assert_eq!(cache.pool().used_blocks(), 3);
        let table = cache.block_table(a).unwrap().to_vec();
        assert_eq!(cache.pool().refcount(table[0]).unwrap(), 2);
        // a grows with tokens 10.., b with tokens 20..: b's partial tail is copied.
        let mut ta: Vec<usize> = (0..10).collect();
        let mut tb = ta.clone();
        for step in 0..7 {
            cache
                .append(
                    a,
                    rows(&k, 10 + step..11 + step),
                    rows(&v, 10 + step..11 + step),
                )
                .unwrap();
            ta.push(10 + step);
            cache
                .append(
                    b,
                    rows(&k, 20 + step..21 + step),
                    rows(&v, 20 + step..21 + step),
                )
                .unwrap();
            tb.push(20 + step);
            check(&cache, a, &ta);
            check(&cache, b, &tb);
        }
        // The two full prompt blocks are still shared.
        let (ba, bb) = (
            cache.block_table(a).unwrap().to_vec(),
            cache.block_table(b).unwrap().to_vec(),
        );
        assert_eq!(ba[..2], bb[..2]);
        assert_ne!(ba[2], bb[2]);
        // Speculative rollback: a drops 6 tokens (into the shared prefix region), then
        // regrows with other tokens.
        cache.truncate(a, 11).unwrap();
        ta.truncate(11);
        check(&cache, a, &ta);
        for t in 30..36 {
            cache
                .append(a, rows(&k, t..t + 1), rows(&v, t..t + 1))
                .unwrap();
            ta.push(t);
            check(&cache, a, &ta);
        }
        check(&cache, b, &tb);
        // Roll b back into the shared blocks and write: copy-on-write keeps a intact.
        cache.truncate(b, 6).unwrap();
        tb.truncate(6);
        let c = cache.fork(b).unwrap();
        let mut tc = tb.clone();
        cache.append(b, rows(&k, 36..38), rows(&v, 36..38)).unwrap();
        tb.extend([36, 37]);
        check(&cache, a, &ta);
        check(&cache, b, &tb);
        check(&cache, c, &tc);
        cache.append(c, rows(&k, 38..40), rows(&v, 38..40)).unwrap();
        tc.extend([38, 39]);
        check(&cache, c, &tc);
        // Pool accounting: used blocks = distinct blocks of the live tables.
        let distinct: HashSet<_> = [a, b, c]
            .iter()
            .flat_map(|&s| cache.block_table(s).unwrap().to_vec())
            .collect();
        assert_eq!(cache.pool().used_blocks(), distinct.len(), "{map:?}");
        assert_eq!(
            cache.pool().used_bytes(),
            distinct.len() * cache.pool().block_bytes()
        );
        for s in [a, b, c] {
            cache.free_sequence(s).unwrap();
        }
        assert_eq!(cache.pool().used_blocks(), 0);
        assert_eq!(cache.pool().free_blocks(), 32);
    }
}

/// Block bytes follow `S::BYTES H_kv B (P d + d_v)`, `P = 2` for band maps.
#[test]
fn memory_formula() {
    let c = paged::<f32>(PositionMap::Rope, 16, 10);
    assert_eq!(c.pool().block_bytes(), 4 * HKV * 16 * (D + D));
    assert_eq!(c.pool().memory_bytes(), 10 * c.pool().block_bytes());
    let c = paged::<half::bf16>(PositionMap::rerope(8).unwrap(), 16, 10);
    assert_eq!(c.pool().key_planes(), 2);
    assert_eq!(c.pool().block_bytes(), 2 * HKV * 16 * (2 * D + D));
    let c = paged::<half::f16>(PositionMap::dca(8, 2).unwrap(), 8, 3);
    assert_eq!(c.pool().block_bytes(), 2 * HKV * 8 * (D + D));
    assert_eq!(c.pool().used_bytes(), 0);
}

/// An append that needs more blocks than are free, or a copy-on-write when none is free,
/// is a typed error that leaves the cache as it was; freeing makes room again.
#[test]
fn pool_exhaustion_is_a_typed_error_and_leaves_the_cache_unchanged() {
    let (k, v) = (rand3((20, HKV, D), 21), rand3((20, HKV, D), 22));
    let q = rand3((1, HQ, D), 23);
    let mut cache = paged::<f32>(PositionMap::rerope(3).unwrap(), 4, 3);
    let a = cache.add_sequence().unwrap();
    cache.append(a, rows(&k, 0..10), rows(&v, 0..10)).unwrap();
    let before = cache.attend(a, q.view(), &[9]).unwrap();
    // 10 + 3 tokens need 4 blocks: one more than the pool has.
    let e = cache.append(a, rows(&k, 10..13), rows(&v, 10..13));
    assert!(
        matches!(
            e,
            Err(RopeError::PoolExhausted {
                needed: 1,
                free: 0,
                capacity: 3
            })
        ),
        "{e:?}"
    );
    assert_eq!(cache.len(a).unwrap(), 10);
    assert_eq!(cache.attend(a, q.view(), &[9]).unwrap(), before);
    // Two more tokens fit the partial block.
    cache.append(a, rows(&k, 10..12), rows(&v, 10..12)).unwrap();
    // A fork whose partial tail is shared needs a block to write: none is free.
    cache.truncate(a, 10).unwrap();
    let b = cache.fork(a).unwrap();
    let e = cache.append(b, rows(&k, 12..13), rows(&v, 12..13));
    assert!(
        matches!(e, Err(RopeError::PoolExhausted { needed: 1, .. })),
        "{e:?}"
    );
    assert_eq!(cache.len(b).unwrap(), 10);
    cache.free_sequence(a).unwrap();
    // Now b holds its blocks alone: it writes in place.
    cache.append(b, rows(&k, 12..13), rows(&v, 12..13)).unwrap();
    assert_eq!(cache.pool().used_blocks(), 3);
}

/// One batched call over sequences of different lengths equals one call per sequence,
/// bit for bit, also inside a caller's 2-thread pool, and reuses its scratch.
#[test]
fn batched_decode_equals_per_sequence_bit_for_bit() {
    let (k, v) = (rand3((64, HKV, D), 31), rand3((64, HKV, D), 32));
    for map in maps() {
        let mut cache = paged::<f32>(map, 4, 64);
        let lens = [1usize, 7, 16, 33, 64, 9];
        let seqs: Vec<SeqId> = lens
            .iter()
            .map(|&n| {
                let s = cache.add_sequence().unwrap();
                cache
                    .append(s, rows(&k, 0..n), rows(&v, 64 - n..64))
                    .unwrap();
                s
            })
            .collect();
        let q = rand3((seqs.len(), HQ, D), 33);
        let mut out = Array3::<f32>::zeros((seqs.len(), HQ, D));
        let mut scratch = BatchScratch::new();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| cache.attend_batch(&seqs, q.view(), &mut out, &mut scratch))
            .unwrap();
        let mut single = DecodeScratch::new();
        for (a, (&s, &n)) in seqs.iter().zip(&lens).enumerate() {
            let mut one = Array3::<f32>::zeros((1, HQ, D));
            cache
                .attend_into(s, rows(&q, a..a + 1), &[n - 1], &mut one, &mut single)
                .unwrap();
            assert_eq!(one, out.slice(s![a..a + 1, .., ..]), "{map:?} seq {a}");
        }
        // Again with the warm scratch, into a head-major bf16 output.
        let mut data = vec![half::bf16::ZERO; seqs.len() * HQ * D];
        let mut strided =
            ropex::View3Mut::new(&mut data, [seqs.len(), HQ, D], [D, seqs.len() * D, 1]).unwrap();
        cache
            .attend_batch(&seqs, q.view(), strided.as_ndarray(), &mut scratch)
            .unwrap();
        for a in 0..seqs.len() {
            for h in 0..HQ {
                for i in 0..D {
                    let got = data[h * seqs.len() * D + a * D + i];
                    assert_eq!(got, half::bf16::from_f32(out[[a, h, i]]));
                }
            }
        }
    }
}

/// The bound a bf16 / f16 cache meets against the f32 reference: each stored key and
/// value is rounded once, `|dk| <= u |k|`, `|dv| <= u |v|` elementwise (`u` the unit
/// roundoff). A logit moves by `|ds| <= scale |R q| |dk| <= scale u |q|_2 |k|_2`
/// (rotations keep norms), at most `delta` over the row; softmax weights then move by at
/// most `sum |dp| <= e^{2 delta} - 1` in total, so
/// `|do| <= max|v| (e^{2 delta} - 1) + u max|v| (1 + u)` plus the f32 kernel error.
/// With bf16 products the rotated query is rounded too (`|dq| <= u |q|`), so
/// `|ds| <= scale (2u + u^2) |q|_2 |k|_2` (`query_rounded`).
fn bound(
    u: f64,
    scale: f64,
    (q, k, v): (&Array3<f32>, &Array3<f32>, &Array3<f32>),
    query_rounded: bool,
) -> f64 {
    let norm =
        |x: ndarray::ArrayView1<f32>| x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    let qmax = q.lanes(Axis(2)).into_iter().map(norm).fold(0.0, f64::max);
    let kmax = k.lanes(Axis(2)).into_iter().map(norm).fold(0.0, f64::max);
    let vmax = v.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let rounding = if query_rounded { 2.0 * u + u * u } else { u };
    let delta = scale * rounding * qmax * kmax;
    vmax * ((2.0 * delta).exp_m1() + u * (1.0 + u)) + 1e-5
}

fn dtype_bound<S: Element>() {
    let n = 50;
    let (q, k, v) = (
        rand3((n, HQ, D), 41),
        rand3((n, HKV, D), 42),
        rand3((n, HKV, D), 43),
    );
    for map in maps() {
        // f32 products: the storage rounding alone (bf16 products have their own test).
        let mut contiguous =
            KvCache::<S>::new_typed(cfg(), Layout::Half, map, CacheShape::square(HKV, D))
                .unwrap()
                .with_bf16_products(Bf16Products::Off);
        let mut cache = paged::<S>(map, 16, 8).with_bf16_products(Bf16Products::Off);
        let a = cache.add_sequence().unwrap();
        contiguous.append(k.view(), v.view()).unwrap();
        cache.append(a, k.view(), v.view()).unwrap();
        let att = cache.attention();
        let pos: Vec<usize> = (0..n).collect();
        let want = att
            .reference(q.view(), k.view(), v.view(), &pos, &pos)
            .unwrap();
        let scale = 1.0 / (D as f64).sqrt();
        let b = bound(S::UNIT_ROUNDOFF, scale, (&q, &k, &v), false);
        for got in [
            contiguous.attend(q.view(), &pos).unwrap(),
            cache.attend(a, q.view(), &pos).unwrap(),
        ] {
            let e = max_err(&got, &want) as f64;
            assert!(e <= b, "{} {map:?}: {e} > bound {b}", S::NAME);
            // Storage really is S: the rounding shows (f32 inputs are not bf16-exact).
            assert!(e > 1e-7, "{} {map:?}: {e}", S::NAME);
        }
    }
}

#[test]
fn bf16_and_f16_caches_meet_the_derived_bound() {
    dtype_bound::<half::bf16>();
    dtype_bound::<half::f16>();
}

/// bf16 products in a bf16 cache's decode (where the CPU has AVX512_BF16), for every
/// map with a head dim of 40 (a vector of pair slots and a ragged tail; ReRoPE's queries
/// older than the ring score rebuilt f32 keys in the same step): within the bound with
/// the query's extra rounding, contiguous == paged bit for bit at the newest position
/// (the decode step; older ReRoPE queries see the contiguous cache's unrounded rebuilt
/// keys there), and different from f32 products (the path ran); `Off` meets the
/// one-rounding bound.
#[test]
fn bf16_products_in_decode_meet_their_bound() {
    let on_cpu = Bf16Products::On.applies();
    let (n, d) = (37, 40);
    let cfg = RopeConfig::new(d, 10_000.0).unwrap();
    let shape = CacheShape::square(HKV, d);
    let (q, k, v) = (
        rand3((n, HQ, d), 71),
        rand3((n, HKV, d), 72),
        rand3((n, HKV, d), 73),
    );
    let pos: Vec<usize> = (0..n).collect();
    let scale = 1.0 / (d as f64).sqrt();
    let mut moved = false;
    for map in maps() {
        let mut outs = Vec::new();
        for mode in [Bf16Products::On, Bf16Products::Off] {
            let mut contiguous =
                KvCache::<half::bf16>::new_typed(cfg.clone(), Layout::Half, map, shape)
                    .unwrap()
                    .with_bf16_products(mode);
            contiguous.append(k.view(), v.view()).unwrap();
            let mut cache =
                PagedKvCache::<half::bf16>::new_typed(cfg.clone(), Layout::Half, map, shape, 8, 8)
                    .unwrap()
                    .with_bf16_products(mode);
            assert_eq!(cache.bf16_products(), mode);
            let a = cache.add_sequence().unwrap();
            cache.append(a, k.view(), v.view()).unwrap();
            let want = contiguous
                .attention()
                .reference(q.view(), k.view(), v.view(), &pos, &pos)
                .unwrap();
            let got = contiguous.attend(q.view(), &pos).unwrap();
            let paged_out = cache.attend(a, q.view(), &pos).unwrap();
            assert_eq!(
                got.slice(s![n - 1, .., ..]),
                paged_out.slice(s![n - 1, .., ..]),
                "{map:?} {mode:?}: paged != contiguous"
            );
            let e = max_err(&paged_out, &want) as f64;
            let b = bound(
                half::bf16::UNIT_ROUNDOFF,
                scale,
                (&q, &k, &v),
                mode == Bf16Products::On && on_cpu,
            );
            assert!(e <= b, "paged {map:?} {mode:?}: {e} > bound {b}");
            let rounded = mode == Bf16Products::On && on_cpu;
            let b = bound(half::bf16::UNIT_ROUNDOFF, scale, (&q, &k, &v), rounded);
            let e = max_err(&got, &want) as f64;
            assert!(e <= b, "{map:?} {mode:?}: {e} > bound {b}");
            outs.push(got);
        }
        moved |= outs[0] != outs[1];
    }
    assert_eq!(moved, on_cpu, "bf16 products changed the outputs: {moved}");
}

/// bf16 memory is half the f32 figure, for the contiguous and the paged cache.
#[test]
fn half_storage_halves_memory() {
    let (k, v) = (rand3((40, HKV, D), 51), rand3((40, HKV, D), 52));
    let map = PositionMap::leaky_rerope(8, 4.0).unwrap();
    let mut c32 = KvCache::new(cfg(), Layout::Half, map, CacheShape::square(HKV, D)).unwrap();
    let mut c16 =
        KvCache::<half::bf16>::new_typed(cfg(), Layout::Half, map, CacheShape::square(HKV, D))
            .unwrap();
    c32.append(k.view(), v.view()).unwrap();
    c16.append(k.view(), v.view()).unwrap();
    assert_eq!(2 * c16.memory_bytes(), c32.memory_bytes());
    assert_eq!(c32.memory_bytes(), 4 * HKV * (40 * 2 * D + 8 * D));
    let p32 = paged::<f32>(map, 16, 4);
    let p16 = paged::<half::bf16>(map, 16, 4);
    assert_eq!(2 * p16.pool().memory_bytes(), p32.pool().memory_bytes());
}

#[test]
fn bad_input_gives_typed_errors() {
    let (k, v) = (rand3((9, HKV, D), 61), rand3((9, HKV, D), 62));
    let q = rand3((1, HQ, D), 63);
    let map = PositionMap::rerope(4).unwrap();
    // Construction: StreamingLLM, a length-dependent scheme, zero-token blocks.
    let invalid =
        |r: Result<PagedKvCache, RopeError>| matches!(r, Err(RopeError::InvalidParameter { .. }));
    let shape = CacheShape::square(HKV, D);
    assert!(invalid(PagedKvCache::new(
        cfg(),
        Layout::Half,
        PositionMap::streaming(2, 4).unwrap(),
        shape,
        4,
        4
    )));
    let dynamic = cfg().with_scaling(Scaling::dynamic(2.0, 16)).unwrap();
    assert!(invalid(PagedKvCache::new(
        dynamic,
        Layout::Half,
        map,
        shape,
        4,
        4
    )));
    assert!(invalid(PagedKvCache::new(
        cfg(),
        Layout::Half,
        map,
        shape,
        0,
        4
    )));
    assert!(matches!(
        PagedKvCache::new(
            cfg(),
            Layout::Half,
            map,
            shape,
            usize::MAX / 4,
            usize::MAX / 4
        ),
        Err(RopeError::InvalidParameter { .. } | RopeError::Allocation { .. })
    ));

    let mut cache = paged::<f32>(map, 4, 8);
    let a = cache.add_sequence().unwrap();
    cache.append(a, k.view(), v.view()).unwrap();
    let mut out = Array3::<f32>::zeros((1, HQ, D));
    let mut sc = DecodeScratch::new();
    // Lengths past the data.
    assert!(matches!(
        cache.attend(a, q.view(), &[9]),
        Err(RopeError::InvalidParameter { .. })
    ));
    assert!(matches!(
        cache.truncate(a, 10),
        Err(RopeError::InvalidParameter { .. })
    ));
    let table = cache.block_table(a).unwrap().to_vec();
    assert!(matches!(
        cache.attend_table(&table, 13, q.view(), &[12], &mut out, &mut sc),
        Err(RopeError::ShapeMismatch { .. })
    ));
    cache
        .attend_table(&table, 9, q.view(), &[8], &mut out, &mut sc)
        .unwrap();
    assert_eq!(out, cache.attend(a, q.view(), &[8]).unwrap());
    // Shapes: k heads, output dims, batch query count.
    assert!(matches!(
        cache.append(a, rand3((2, 1, D), 1).view(), rand3((2, 1, D), 2).view()),
        Err(RopeError::ShapeMismatch { .. })
    ));
    let mut wrong = Array3::<f32>::zeros((1, HQ, D + 1));
    assert!(matches!(
        cache.attend_into(a, q.view(), &[8], &mut wrong, &mut sc),
        Err(RopeError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        cache.attend_batch(&[a, a], q.view(), &mut out, &mut BatchScratch::new()),
        Err(RopeError::ShapeMismatch { .. })
    ));
    let empty = cache.add_sequence().unwrap();
    assert!(matches!(
        cache.attend_batch(&[empty], q.view(), &mut out, &mut BatchScratch::new()),
        Err(RopeError::InvalidParameter { .. })
    ));
    // A table from another pool.
    let mut other = paged::<f32>(map, 4, 8);
    let o = other.add_sequence().unwrap();
    other.append(o, k.view(), v.view()).unwrap();
    let foreign = other.block_table(o).unwrap().to_vec();
    let e = cache.attend_table(&foreign, 9, q.view(), &[8], &mut out, &mut sc);
    assert!(
        matches!(&e, Err(RopeError::BadBlock { reason, .. }) if reason.contains("another pool")),
        "{e:?}"
    );
    // Freed sequences and their blocks.
    cache.free_sequence(a).unwrap();
    let e = cache.attend_table(&table, 9, q.view(), &[8], &mut out, &mut sc);
    assert!(
        matches!(&e, Err(RopeError::BadBlock { reason, .. }) if reason.contains("freed")),
        "{e:?}"
    );
    assert!(matches!(
        cache.pool().refcount(table[0]),
        Err(RopeError::BadBlock { .. })
    ));
    // The freed blocks are reused by a new sequence: the stale ids are still refused.
    let b = cache.add_sequence().unwrap();
    cache.append(b, k.view(), v.view()).unwrap();
    assert!(matches!(
        cache.attend_table(&table, 9, q.view(), &[8], &mut out, &mut sc),
        Err(RopeError::BadBlock { .. })
    ));
    for r in [
        cache.len(a).map(|_| ()),
        cache.append(a, k.view(), v.view()),
        cache.fork(a).map(|_| ()),
        cache.truncate(a, 0),
        cache.free_sequence(a),
    ] {
        assert!(matches!(r, Err(RopeError::UnknownSequence { .. })), "{r:?}");
    }
}

/// One step of a random program.
#[derive(Debug, Clone)]
enum Op {
    /// Append `n` fresh tokens to sequence `s % live`.
    Append(usize, usize),
    /// Fork sequence `s % live`.
    Fork(usize),
    /// Truncate sequence `s % live` to `len * frac / 8`.
    Truncate(usize, usize),
    /// Free sequence `s % live` (if more than one is live).
    Free(usize),
    /// Attend sequence `s % live` at its newest position and at position `len * frac / 8`.
    Attend(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..8usize, 1..7usize).prop_map(|(s, n)| Op::Append(s, n)),
        1 => (0..8usize).prop_map(Op::Fork),
        1 => (0..8usize, 0..8usize).prop_map(|(s, f)| Op::Truncate(s, f)),
        1 => (0..8usize).prop_map(Op::Free),
        2 => (0..8usize, 0..8usize).prop_map(|(s, f)| Op::Attend(s, f)),
    ]
}

const POOL_TOKENS: usize = 400;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random append / fork / truncate / free / attend programs against a model: a list
    /// of token indices per live sequence, attended with the reference kernel over the
    /// sequence's tokens. Pool exhaustion must leave the sequence unchanged, and the pool
    /// must always count exactly the distinct blocks of the live tables.
    #[test]
    fn random_programs_match_the_model(map_ix in 0..6usize, block in 1..6usize, ops in proptest::collection::vec(op(), 1..40)) {
        let map = maps()[map_ix];
        let (q, k, v) = (rand3((POOL_TOKENS, HQ, D), 71), rand3((POOL_TOKENS, HKV, D), 72), rand3((POOL_TOKENS, HKV, D), 73));
        let mut cache = paged::<f32>(map, block, 24);
        let att = cache.attention();
        let first = cache.add_sequence().unwrap();
        let mut live: Vec<(SeqId, Vec<usize>)> = vec![(first, Vec::new())];
        let mut next = 0usize;
        for op in ops {
            match op {
                Op::Append(s, n) => {
                    let s = s % live.len();
                    let toks: Vec<usize> = (next..next + n).map(|t| t % POOL_TOKENS).collect();
                    next += n;
                    let (kk, vv) = (k.select(Axis(0), &toks), v.select(Axis(0), &toks));
                    match cache.append(live[s].0, kk.view(), vv.view()) {
                        Ok(()) => live[s].1.extend(toks),
                        Err(RopeError::PoolExhausted { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                Op::Fork(s) => {
                    let s = s % live.len();
                    let id = cache.fork(live[s].0).unwrap();
                    let toks = live[s].1.clone();
                    live.push((id, toks));
                }
                Op::Truncate(s, f) => {
                    let s = s % live.len();
                    let len = live[s].1.len() * f / 8;
                    cache.truncate(live[s].0, len).unwrap();
                    live[s].1.truncate(len);
                }
                Op::Free(s) => {
                    if live.len() > 1 {
                        let (id, _) = live.swap_remove(s % live.len());
                        cache.free_sequence(id).unwrap();
                    }
                }
                Op::Attend(s, f) => {
                    let (id, toks) = &live[s % live.len()];
                    if toks.is_empty() {
                        continue;
                    }
                    let (kk, vv) = (k.select(Axis(0), toks), v.select(Axis(0), toks));
                    let n = toks.len();
                    for i in [n - 1, (n - 1) * f / 8] {
                        let qq = q.select(Axis(0), &[toks[i]]);
                        let want = reference_row(&att, qq.view(), &kk, &vv, i);
                        let got = cache.attend(*id, qq.view(), &[i]).unwrap();
                        prop_assert!(max_err(&got, &want) < TOL, "{map:?} {toks:?} at {i}");
                    }
                }
            }
            for (id, toks) in &live {
                prop_assert_eq!(cache.len(*id).unwrap(), toks.len());
                prop_assert_eq!(cache.block_table(*id).unwrap().len(), toks.len().div_ceil(block));
            }
            let distinct: HashSet<_> = live.iter().flat_map(|(id, _)| cache.block_table(*id).unwrap().to_vec()).collect();
            prop_assert_eq!(cache.pool().used_blocks(), distinct.len());
        }
    }
}
