//! The engine API of the prefill kernels: packed variable-length batches
//! (`Attention::varlen`) equal per-sequence calls bit for bit, both memory layouts give
//! identical results, `_into` equals the allocating form, thread counts change nothing,
//! and bad views / offsets are typed errors.

mod common;

use common::rand3;
use ndarray::{Array3, Axis, concatenate};
use ropex::attention::{Attention, Kernel, TileConfig, VarLen};
use ropex::tensor::{View3, View3Mut};
use ropex::{Layout, PositionMap, RopeConfig, RopeError};

fn kernels() -> Vec<Kernel> {
    vec![
        Kernel::Reference,
        Kernel::TwoPass,
        Kernel::default(),
        Kernel::Tiled(TileConfig::new(16, 32).unwrap()),
        Kernel::Tiled(TileConfig::new(7, 5).unwrap()),
    ]
}

fn attention(map: PositionMap) -> Attention {
    let freqs = RopeConfig::new(16, 10_000.0).unwrap().frequencies();
    Attention::new(freqs, Layout::Half, map)
}

/// A packed batch: per sequence (n_q, n_k) with queries at the last n_q key positions
/// (chunked prefill against a prefix when n_q < n_k), each sequence from position 0.
struct Batch {
    q: Array3<f32>,
    k: Array3<f32>,
    v: Array3<f32>,
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    q_pos: Vec<usize>,
    k_pos: Vec<usize>,
}

fn batch(lens: &[(usize, usize)], heads_q: usize, heads_kv: usize, d: usize) -> Batch {
    let (mut cu_q, mut cu_k, mut q_pos, mut k_pos) = (vec![0], vec![0], vec![], vec![]);
    for &(nq, nk) in lens {
        cu_q.push(cu_q.last().unwrap() + nq);
        cu_k.push(cu_k.last().unwrap() + nk);
        q_pos.extend(nk - nq..nk);
        k_pos.extend(0..nk);
    }
    let (tq, tk) = (q_pos.len(), k_pos.len());
    Batch {
        q: rand3((tq, heads_q, d), 1),
        k: rand3((tk, heads_kv, d), 2),
        v: rand3((tk, heads_kv, d), 3),
        cu_q,
        cu_k,
        q_pos,
        k_pos,
    }
}

fn maps() -> Vec<PositionMap> {
    vec![
        PositionMap::Rope,
        PositionMap::rerope(9).unwrap(),
        PositionMap::leaky_rerope(9, 4.0).unwrap(),
        PositionMap::self_extend(4, 8).unwrap(),
        PositionMap::dca(16, 4).unwrap(),
        PositionMap::streaming(2, 12).unwrap(),
    ]
}

#[test]
fn varlen_equals_each_sequence_alone_bit_for_bit() {
    // an empty sequence, a one-token one, chunked prefill (3 queries over 40 keys), GQA
    let b = batch(
        &[(23, 23), (0, 0), (1, 1), (3, 40), (50, 50), (17, 30)],
        4,
        2,
        16,
    );
    let vl = VarLen::new(&b.cu_q, &b.cu_k, &b.q_pos, &b.k_pos).unwrap();
    assert_eq!(vl.batch(), 6);
    for map in maps() {
        let att = attention(map).with_dca_logit_scale(20).unwrap();
        for kernel in kernels() {
            let got = att
                .varlen(kernel, b.q.view(), b.k.view(), b.v.view(), &vl)
                .unwrap();
            let mut alone = Vec::new();
            for s in 0..vl.batch() {
                let (qr, kr) = (b.cu_q[s]..b.cu_q[s + 1], b.cu_k[s]..b.cu_k[s + 1]);
                let (o, _) = att
                    .run(
                        kernel,
                        b.q.slice(ndarray::s![qr.clone(), .., ..]),
                        b.k.slice(ndarray::s![kr.clone(), .., ..]),
                        b.v.slice(ndarray::s![kr.clone(), .., ..]),
                        &b.q_pos[qr],
                        &b.k_pos[kr],
                    )
                    .unwrap();
                alone.push(o);
            }
            let views: Vec<_> = alone.iter().map(|a| a.view()).collect();
            let want = concatenate(Axis(0), &views).unwrap();
            assert_eq!(got, want, "{map} {kernel:?}");
            // and the batch is not trivially zero
            assert!(got.iter().any(|&x| x != 0.0));
        }
    }
}

#[test]
fn sequences_never_see_each_others_keys() {
    // Changing the keys of sequence 1 leaves sequence 0's rows unchanged.
    let b = batch(&[(20, 20), (20, 20)], 2, 1, 16);
    let vl = VarLen::new(&b.cu_q, &b.cu_k, &b.q_pos, &b.k_pos).unwrap();
    let att = attention(PositionMap::rerope(5).unwrap());
    let before = att
        .varlen(Kernel::default(), b.q.view(), b.k.view(), b.v.view(), &vl)
        .unwrap();
    let mut k = b.k.clone();
    k.slice_mut(ndarray::s![20.., .., ..])
        .mapv_inplace(|x| -3.0 * x);
    let after = att
        .varlen(Kernel::default(), b.q.view(), k.view(), b.v.view(), &vl)
        .unwrap();
    let s0 = ndarray::s![..20, .., ..];
    let s1 = ndarray::s![20.., .., ..];
    assert_eq!(before.slice(s0), after.slice(s0));
    assert_ne!(before.slice(s1), after.slice(s1));
}

/// `[H, T, d]` memory as candle's `(H, T, D)`, read through a view, against the same
/// numbers in `[T, H, d]` memory.
fn heads_major(x: &Array3<f32>) -> Vec<f32> {
    x.view().permuted_axes([1, 0, 2]).iter().copied().collect()
}

#[test]
fn head_major_layout_equals_token_major_bit_for_bit() {
    let (n, hq, hkv, d) = (37, 4, 2, 16);
    let (q, k, v) = (
        rand3((n, hq, d), 4),
        rand3((n, hkv, d), 5),
        rand3((n, hkv, d), 6),
    );
    let (qh, kh, vh) = (heads_major(&q), heads_major(&k), heads_major(&v));
    let qv = View3::heads_tokens_dim(&qh, hq, n, d).unwrap();
    let kv = View3::heads_tokens_dim(&kh, hkv, n, d).unwrap();
    let vv = View3::heads_tokens_dim(&vh, hkv, n, d).unwrap();
    let pos: Vec<usize> = (0..n).collect();
    for map in maps() {
        let att = attention(map);
        for kernel in kernels() {
            let (a, _) = att
                .run(kernel, q.view(), k.view(), v.view(), &pos, &pos)
                .unwrap();
            let (b, _) = att.run(kernel, qv, kv, vv, &pos, &pos).unwrap();
            assert_eq!(a, b, "{map} {kernel:?}");
            // and written head-major into a caller's buffer
            let mut buf = vec![f32::NAN; n * hq * d];
            att.run_into(
                kernel,
                qv,
                kv,
                vv,
                &pos,
                &pos,
                View3Mut::heads_tokens_dim(&mut buf, hq, n, d).unwrap(),
            )
            .unwrap();
            assert_eq!(buf, heads_major(&a), "{map} {kernel:?}");
        }
    }
}

#[test]
fn into_equals_allocating_and_overwrites_the_buffer() {
    let (n, hq, hkv, d) = (29, 2, 1, 16);
    let (q, k, v) = (
        rand3((n, hq, d), 7),
        rand3((n, hkv, d), 8),
        rand3((n, hkv, d), 9),
    );
    let pos: Vec<usize> = (3..n + 3).collect();
    let att = attention(PositionMap::leaky_rerope(6, 3.0).unwrap());
    for kernel in kernels() {
        let (want, stats) = att
            .run(kernel, q.view(), k.view(), v.view(), &pos, &pos)
            .unwrap();
        let mut out = Array3::<f32>::from_elem((n, hq, d), f32::NAN);
        let got_stats = att
            .run_into(kernel, q.view(), k.view(), v.view(), &pos, &pos, &mut out)
            .unwrap();
        assert_eq!(out, want, "{kernel:?}");
        assert_eq!(got_stats, stats);
        // a strided output: every other row of a larger buffer
        let mut big = Array3::<f32>::from_elem((2 * n, hq, d), 7.0);
        att.run_into(
            kernel,
            q.view(),
            k.view(),
            v.view(),
            &pos,
            &pos,
            big.slice_mut(ndarray::s![..;2, .., ..]),
        )
        .unwrap();
        assert_eq!(big.slice(ndarray::s![..;2, .., ..]), want);
        assert!(
            big.slice(ndarray::s![1..;2, .., ..])
                .iter()
                .all(|&x| x == 7.0)
        );
    }
    // the named kernels' own _into forms
    let mut out = Array3::<f32>::zeros((n, hq, d));
    att.tiled_into(
        q.view(),
        k.view(),
        v.view(),
        &pos,
        &pos,
        &TileConfig::DEFAULT,
        &mut out,
    )
    .unwrap();
    assert_eq!(
        out,
        att.tiled(q.view(), k.view(), v.view(), &pos, &pos).unwrap()
    );
    att.two_pass_into(q.view(), k.view(), v.view(), &pos, &pos, &mut out)
        .unwrap();
    assert_eq!(
        out,
        att.two_pass(q.view(), k.view(), v.view(), &pos, &pos)
            .unwrap()
    );
    att.reference_into(q.view(), k.view(), v.view(), &pos, &pos, &mut out)
        .unwrap();
    assert_eq!(
        out,
        att.reference(q.view(), k.view(), v.view(), &pos, &pos)
            .unwrap()
    );
}

fn is_shape(e: RopeError) -> bool {
    matches!(e, RopeError::ShapeMismatch { .. })
}

fn is_invalid(e: RopeError) -> bool {
    matches!(e, RopeError::InvalidParameter { .. })
}

#[test]
fn bad_outputs_and_views_are_typed_errors() {
    let (n, hq, d) = (8, 2, 16);
    let q = rand3((n, hq, d), 10);
    let kv = rand3((n, 1, d), 11);
    let pos: Vec<usize> = (0..n).collect();
    let att = attention(PositionMap::rerope(3).unwrap());
    for kernel in kernels() {
        for dims in [(n - 1, hq, d), (n, 1, d), (n, hq, d + 1)] {
            let mut out = Array3::<f32>::zeros(dims);
            let e = att
                .run_into(kernel, q.view(), kv.view(), kv.view(), &pos, &pos, &mut out)
                .unwrap_err();
            assert!(is_shape(e.clone()), "{kernel:?} {dims:?}: {e}");
            assert!(e.to_string().contains("output"), "{e}");
            assert!(out.iter().all(|&x| x == 0.0), "nothing written on an error");
        }
        // value rows that do not match the keys
        let v = rand3((n - 1, 1, d), 12);
        assert!(is_shape(
            att.run(kernel, q.view(), kv.view(), v.view(), &pos, &pos)
                .unwrap_err()
        ));
    }
    // views over slices that are too short, overflow, or alias an output element
    let data = vec![0f32; 100];
    assert!(is_shape(
        View3::tokens_heads_dim(&data, 5, 2, 11).unwrap_err()
    ));
    assert!(is_shape(
        View3::new(&data, [5, 2, 10], [20, 10, 2]).unwrap_err()
    ));
    assert!(is_shape(
        View3::new(&data, [2, 2, 2], [usize::MAX / 2, 1, 1]).unwrap_err()
    ));
    let mut out = vec![0f32; 100];
    assert!(is_shape(
        View3Mut::new(&mut out, [4, 2, 10], [10, 5, 1]).unwrap_err()
    ));
}

#[test]
fn bad_cu_seqlens_are_typed_errors() {
    let pos: Vec<usize> = (0..10).collect();
    let ok = [0, 4, 10];
    assert!(VarLen::new(&ok, &ok, &pos, &pos).is_ok());
    // not starting at 0
    let e = VarLen::new(&[1, 4, 10], &ok, &pos, &pos).unwrap_err();
    assert!(
        is_invalid(e.clone()) && e.to_string().contains("cu_seqlens_q[0]"),
        "{e}"
    );
    // decreasing
    let e = VarLen::new(&ok, &[0, 6, 5, 10], &pos, &pos).unwrap_err();
    assert!(
        is_invalid(e.clone()) && e.to_string().contains("cu_seqlens_k[2]"),
        "{e}"
    );
    // past the data
    let e = VarLen::new(&[0, 4, 11], &ok, &pos, &pos).unwrap_err();
    assert!(
        is_shape(e.clone()) && e.to_string().contains("past the data"),
        "{e}"
    );
    // short of the data
    assert!(is_shape(
        VarLen::new(&[0, 4, 9], &ok, &pos, &pos).unwrap_err()
    ));
    // empty
    assert!(is_shape(VarLen::new(&[], &ok, &pos, &pos).unwrap_err()));
    // mismatched batch sizes
    let e = VarLen::new(&ok, &[0, 2, 5, 10], &pos, &pos).unwrap_err();
    assert!(
        is_shape(e.clone()) && e.to_string().contains("cu_seqlens_k"),
        "{e}"
    );

    // packed tensors that do not hold the tokens the offsets describe
    let att = attention(PositionMap::Rope);
    let vl = VarLen::new(&ok, &ok, &pos, &pos).unwrap();
    let (q, kv) = (rand3((10, 2, 16), 1), rand3((10, 1, 16), 2));
    let short = rand3((9, 1, 16), 3);
    for (q, k, v) in [
        (rand3((11, 2, 16), 4), kv.clone(), kv.clone()),
        (q.clone(), short.clone(), kv.clone()),
        (q.clone(), kv.clone(), short.clone()),
    ] {
        let e = att
            .varlen(Kernel::default(), q.view(), k.view(), v.view(), &vl)
            .unwrap_err();
        assert!(
            is_shape(e.clone()) && e.to_string().contains("packed tokens"),
            "{e}"
        );
    }
    // consistent packed tensors are fine ...
    assert!(
        att.varlen(Kernel::default(), q.view(), kv.view(), kv.view(), &vl)
            .is_ok()
    );
    // ... but a bad output buffer is not
    let mut out = Array3::<f32>::zeros((10, 2, 15));
    assert!(is_shape(
        att.varlen_into(
            Kernel::default(),
            q.view(),
            kv.view(),
            kv.view(),
            &vl,
            &mut out
        )
        .unwrap_err()
    ));
}

#[test]
fn single_threaded_option_gives_identical_output() {
    let b = batch(&[(70, 70), (130, 130), (5, 64)], 4, 2, 16);
    let vl = VarLen::new(&b.cu_q, &b.cu_k, &b.q_pos, &b.k_pos).unwrap();
    let att = attention(PositionMap::rerope(20).unwrap());
    let serial = att.clone().with_parallel(false);
    assert!(!serial.parallel());
    for kernel in kernels() {
        let a = att
            .varlen(kernel, b.q.view(), b.k.view(), b.v.view(), &vl)
            .unwrap();
        let s = serial
            .varlen(kernel, b.q.view(), b.k.view(), b.v.view(), &vl)
            .unwrap();
        assert_eq!(a, s, "{kernel:?}");
    }
}

#[cfg(feature = "rayon")]
#[test]
fn caller_thread_pools_give_identical_output() {
    let b = batch(&[(100, 100), (200, 200), (33, 90)], 4, 2, 16);
    let vl = VarLen::new(&b.cu_q, &b.cu_k, &b.q_pos, &b.k_pos).unwrap();
    let att = attention(PositionMap::leaky_rerope(30, 8.0).unwrap());
    let run = || {
        att.varlen(Kernel::default(), b.q.view(), b.k.view(), b.v.view(), &vl)
            .unwrap()
    };
    let global = run();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // The kernels run on the pool they are installed in.
        let (out, n) = pool.install(|| (run(), rayon::current_num_threads()));
        assert_eq!(n, threads);
        assert_eq!(out, global, "{threads} threads");
    }
}

/// One `TiledScratch` carried through calls of growing, shrinking and GQA shapes, every
/// map, f32 and bf16, one thread and the pool: each call equals the fresh `run_into` bit
/// for bit (a reused buffer never leaks stale keys, values or angles into a later call).
#[test]
fn reused_tiled_scratch_equals_fresh_calls() {
    use ropex::attention::TiledScratch;
    let maps = [
        PositionMap::Rope,
        PositionMap::rerope(24).unwrap(),
        PositionMap::leaky_rerope(24, 8.0).unwrap(),
        PositionMap::self_extend(4, 16).unwrap(),
        PositionMap::dca(40, 8).unwrap(),
        PositionMap::streaming(2, 20).unwrap(),
    ];
    let d = 16;
    let mut scratch = TiledScratch::new();
    let mut seed = 100;
    for (i, &(n, hq, hkv)) in [
        (150, 4, 2),
        (37, 2, 2),
        (200, 6, 3),
        (64, 4, 1),
        (150, 4, 2),
    ]
    .iter()
    .enumerate()
    {
        for (j, map) in maps.iter().enumerate() {
            seed += 3;
            let q = rand3((n, hq, d), seed);
            let k = rand3((n, hkv, d), seed + 1);
            let v = rand3((n, hkv, d), seed + 2);
            let pos: Vec<usize> = (0..n).collect();
            let att = attention(*map).with_parallel((i + j) % 2 == 0);
            for kernel in [
                Kernel::default(),
                Kernel::Tiled(TileConfig::new(16, 32).unwrap()),
            ] {
                let mut fresh = Array3::<f32>::zeros((n, hq, d));
                att.run_into(kernel, q.view(), k.view(), v.view(), &pos, &pos, &mut fresh)
                    .unwrap();
                let mut reused = Array3::<f32>::from_elem((n, hq, d), f32::NAN);
                let (qv, kv, vv) = (q.view(), k.view(), v.view());
                att.run_into_reusing(kernel, qv, kv, vv, &pos, &pos, &mut reused, &mut scratch)
                    .unwrap();
                assert_eq!(fresh, reused, "{map} n={n} {hq}/{hkv} {kernel:?}");
                // bf16 inputs widen into the same reused buffers
                #[cfg(feature = "half")]
                {
                    let (qb, kb, vb) = (
                        q.mapv(half::bf16::from_f32),
                        k.mapv(half::bf16::from_f32),
                        v.mapv(half::bf16::from_f32),
                    );
                    let want = att
                        .run(kernel, qb.view(), kb.view(), vb.view(), &pos, &pos)
                        .unwrap()
                        .0;
                    let mut got = Array3::from_elem((n, hq, d), half::bf16::NAN);
                    att.run_into_reusing(
                        kernel,
                        qb.view(),
                        kb.view(),
                        vb.view(),
                        &pos,
                        &pos,
                        &mut got,
                        &mut scratch,
                    )
                    .unwrap();
                    assert_eq!(want, got, "bf16 {map} n={n} {hq}/{hkv}");
                }
            }
        }
    }
    // a failing call (mismatched dims) leaves the scratch usable
    let att = attention(PositionMap::Rope);
    let (q, k) = (rand3((8, 2, d), 1), rand3((9, 2, d), 2));
    let pos: Vec<usize> = (0..8).collect();
    let mut out = Array3::<f32>::zeros((8, 2, d));
    assert!(
        att.run_into_reusing(
            Kernel::default(),
            q.view(),
            k.view(),
            k.view(),
            &pos,
            &pos,
            &mut out,
            &mut scratch
        )
        .is_err()
    );
    att.run_into_reusing(
        Kernel::default(),
        q.view(),
        q.view(),
        q.view(),
        &pos,
        &pos,
        &mut out,
        &mut scratch,
    )
    .unwrap();
    assert_eq!(
        out,
        att.tiled(q.view(), q.view(), q.view(), &pos, &pos).unwrap()
    );
}
