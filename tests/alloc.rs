//! "No allocation proportional to n²" on the tiled prefill and decode paths, checked with
//! a counting global allocator (no wall-clock): the largest single allocation and the
//! peak of live bytes during a call are O(n d), far below the `4 n²` bytes of one score
//! matrix, and grow linearly with `n`. Decode appends are amortised (no per-token copy
//! of the cache).
//!
//! Every scenario runs under one lock, since the counters are process-wide.

use ropex::CacheShape;
use std::sync::Mutex;

use ndarray::s;
use ropex::attention::decode::KvCache;
use ropex::attention::{Attention, TileConfig};
use ropex::{Layout, PositionMap, RopeConfig};

mod common;
use common::rand3;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{Counting, Usage, measure, thread_calls};

#[global_allocator]
static ALLOC: Counting = Counting;

static LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` on a pool of 2 threads (when rayon is on), so per-worker buffers do not
/// scale with the machine's core count.
fn on_two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "rayon")]
    {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("thread pool")
            .install(f)
    }
    #[cfg(not(feature = "rayon"))]
    {
        f()
    }
}

const HEADS: usize = 2;
const D: usize = 32;

fn tiled_usage(n: usize, map: PositionMap, tiles: TileConfig) -> Usage {
    let att = Attention::new(
        RopeConfig::new(D, 10_000.0).unwrap().frequencies(),
        Layout::Half,
        map,
    );
    let q = rand3((n, HEADS, D), 1);
    let k = rand3((n, HEADS, D), 2);
    let v = rand3((n, HEADS, D), 3);
    let pos: Vec<usize> = (0..n).collect();
    let (out, usage) = on_two_threads(|| {
        measure(|| {
            att.tiled_with(q.view(), k.view(), v.view(), &pos, &pos, &tiles)
                .unwrap()
        })
    });
    assert!(out.0.iter().all(|x| x.is_finite()));
    usage
}

/// Tiled prefill at n = 2048 (and 1024): peak live bytes and the largest allocation are
/// a few copies of the inputs (`4 n H d` bytes each), far below one `4 n²` score
/// matrix, and double (not quadruple) when `n` doubles.
#[test]
fn tiled_prefill_allocates_o_n_d() {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(512).unwrap(),
        PositionMap::leaky_rerope(512, 16.0).unwrap(),
    ] {
        for tiles in [TileConfig::DEFAULT, TileConfig::new(16, 8).unwrap()] {
            let small = tiled_usage(1024, map, tiles);
            let n = 2048;
            let big = tiled_usage(n, map, tiles);
            let input = 4 * n * HEADS * D; // bytes of q (or k, or v)
            let n2 = 4 * n * n;
            println!(
                "{map:?} {tiles:?}: n={n}: {big:?} (input {input} B, n^2 matrix {n2} B); n=1024: {small:?}"
            );
            // Two pieces x (rotated q + packed k + scratch) + output + per-task rows.
            assert!(big.peak <= 10 * input, "{map:?}: peak {} B", big.peak);
            assert!(big.peak <= n2 / 4, "{map:?}: peak {} B", big.peak);
            assert!(
                big.largest <= 2 * input,
                "{map:?}: largest {} B",
                big.largest
            );
            assert!(
                (big.peak as f64) < 2.5 * small.peak as f64,
                "{map:?}: peak grows faster than n: {} -> {}",
                small.peak,
                big.peak
            );
        }
    }
}

fn filled_cache(map: PositionMap, n: usize, heads_kv: usize, d: usize) -> KvCache {
    let mut cache = KvCache::new(
        RopeConfig::new(d, 10_000.0).unwrap(),
        Layout::Half,
        map,
        CacheShape::square(heads_kv, d),
    )
    .unwrap();
    let k = rand3((n, heads_kv, d), 4);
    let v = rand3((n, heads_kv, d), 5);
    cache.append(k.view(), v.view()).unwrap();
    cache
}

/// A decode step allocates O(n) (one score row per query head) plus O(H d), nothing
/// proportional to the cache's `n x d` keys, let alone `n²`.
#[test]
fn decode_step_allocates_o_n() {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (heads_q, heads_kv, d) = (8, 2, 64);
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(256).unwrap(),
        PositionMap::leaky_rerope(256, 16.0).unwrap(),
    ] {
        for n in [2048, 8192] {
            let cache = filled_cache(map, n, heads_kv, d);
            let q = rand3((1, heads_q, d), 6);
            let (out, usage) = measure(|| cache.attend(q.view(), &[n - 1]).unwrap());
            assert!(out.iter().all(|x| x.is_finite()));
            let cache_bytes = cache.memory_bytes();
            println!("{map:?} n={n}: decode step {usage:?}; cache {cache_bytes} B");
            // Scores of one GQA group: 4 (H_q / H_kv) n bytes; queries, output: O(H d).
            let scores = 4 * (heads_q / heads_kv) * n;
            assert!(
                usage.total <= 2 * scores + 64 * heads_q * d,
                "{map:?} n={n}: {usage:?}"
            );
            assert!(usage.total < cache_bytes / 8, "{map:?} n={n}: {usage:?}");
        }
    }
}

/// Token-by-token appends are amortised: 1024 single-token appends to a cache of 4096
/// tokens allocate in all at most a few times the final cache size (Vec doubling), not
/// a copy of the cache per token (which would be ~1000x).
#[test]
fn appends_are_amortised() {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (heads_kv, d, n, steps) = (2, 64, 4096, 1024);
    for map in [PositionMap::Rope, PositionMap::rerope(256).unwrap()] {
        let mut cache = filled_cache(map, n, heads_kv, d);
        let k = rand3((steps, heads_kv, d), 7);
        let v = rand3((steps, heads_kv, d), 8);
        let (_, usage) = measure(|| {
            for t in 0..steps {
                cache
                    .append(k.slice(s![t..t + 1, .., ..]), v.slice(s![t..t + 1, .., ..]))
                    .unwrap();
            }
        });
        let final_bytes = cache.memory_bytes();
        println!("{map:?}: {steps} appends: {usage:?}; cache {final_bytes} B");
        assert!(usage.total <= 3 * final_bytes, "{map:?}: {usage:?}");
        assert!(usage.calls <= 64 + 8 * steps, "{map:?}: {usage:?}");
    }
}

/// Zero-allocation decode: after one warm-up step with a caller-held scratch, a decode
/// step into a caller's output allocates nothing, for the contiguous and the paged cache,
/// f32 and bf16 storage, every kind of map (one piece, band, shared-key DCA), and the
/// batched paged step.
#[test]
fn warm_decode_steps_allocate_nothing() {
    use ropex::Element;
    use ropex::attention::decode::{BatchScratch, DecodeScratch, PagedKvCache};
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    fn run<S: Element>() {
        let (heads_q, heads_kv, d, n) = (8, 2, 64, 1000);
        let k = rand3((n, heads_kv, d), 9);
        let v = rand3((n, heads_kv, d), 10);
        let q = rand3((3, heads_q, d), 11);
        for map in [
            PositionMap::Rope,
            PositionMap::rerope(256).unwrap(),
            PositionMap::leaky_rerope(100, 16.0).unwrap(),
            PositionMap::dca(300, 20).unwrap(),
        ] {
            let cfg = RopeConfig::new(d, 10_000.0).unwrap();
            let shape = CacheShape::square(heads_kv, d);
            let mut cache = KvCache::<S>::new_typed(cfg.clone(), Layout::Half, map, shape).unwrap();
            cache.append(k.view(), v.view()).unwrap();
            let mut paged =
                PagedKvCache::<S>::new_typed(cfg, Layout::Half, map, shape, 16, 200).unwrap();
            let seqs: Vec<_> = (0..3)
                .map(|s| {
                    let id = paged.add_sequence().unwrap();
                    let len = n - 100 * s;
                    paged
                        .append(id, k.slice(s![..len, .., ..]), v.slice(s![..len, .., ..]))
                        .unwrap();
                    id
                })
                .collect();
            let one = q.slice(s![..1, .., ..]);
            let mut out = ndarray::Array3::<f32>::zeros((1, heads_q, d));
            let mut batch_out = ndarray::Array3::<f32>::zeros((3, heads_q, d));
            let mut scratch = DecodeScratch::new();
            let mut batch = BatchScratch::new();
            let mut step = |out: &mut ndarray::Array3<f32>| {
                cache
                    .attend_into(one, &[n - 1], &mut *out, &mut scratch)
                    .unwrap();
                paged
                    .attend_into(seqs[0], one, &[n - 1], &mut *out, &mut scratch)
                    .unwrap();
            };
            step(&mut out); // warm-up
            // Counted on this thread: worker threads of other tests' pools may still be
            // winding down and allocating.
            let before = thread_calls();
            for _ in 0..5 {
                step(&mut out);
            }
            let calls = thread_calls() - before;
            assert!(out.iter().all(|x| x.is_finite()));
            println!("{} {map:?}: 5 warm steps: {calls} allocations", S::NAME);
            assert_eq!(calls, 0, "{} {map:?}", S::NAME);
            // The batched step: ropex's buffers are all in the scratch; what rayon's
            // work-stealing queues allocate (a few KiB, not per step) is bounded here.
            let ((), usage) = on_two_threads(|| {
                for _ in 0..2 {
                    paged
                        .attend_batch(&seqs, q.view(), &mut batch_out, &mut batch)
                        .unwrap();
                }
                measure(|| {
                    for _ in 0..20 {
                        paged
                            .attend_batch(&seqs, q.view(), &mut batch_out, &mut batch)
                            .unwrap();
                    }
                })
            });
            println!("{} {map:?}: 20 warm batched steps: {usage:?}", S::NAME);
            assert!(usage.total <= 64 * 1024, "{} {map:?}: {usage:?}", S::NAME);
            #[cfg(not(feature = "rayon"))]
            assert_eq!(usage.calls, 0, "{} {map:?}: {usage:?}", S::NAME);
        }
    }
    run::<f32>();
    #[cfg(feature = "half")]
    run::<half::bf16>();
}

/// A warm [`TiledScratch`] spares a prefill its large buffers: on one thread, a repeated
/// call of the same size (and a smaller one after it) allocates less than a tenth of one
/// f32 input (`n H d` values), where a cold call allocates several inputs' worth (the
/// packed keys of each key function, the value copy, the trigonometry tables).
#[test]
fn warm_tiled_scratch_spares_the_large_buffers() {
    use counting_alloc::measure_thread;
    use ropex::attention::{Kernel, TiledScratch};
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (n, heads, d) = (1024, 4, 64);
    let input_bytes = 4 * n * heads * d;
    let q = rand3((n, heads, d), 1);
    let k = rand3((n, heads, d), 2);
    let v = rand3((n, heads, d), 3);
    let pos: Vec<usize> = (0..n).collect();
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(256).unwrap(),
        PositionMap::leaky_rerope(256, 16.0).unwrap(),
        PositionMap::self_extend(4, 128).unwrap(),
    ] {
        let att = Attention::new(
            RopeConfig::new(d, 10_000.0).unwrap().frequencies(),
            Layout::Half,
            map,
        )
        .with_parallel(false);
        let mut out = ndarray::Array3::<f32>::zeros((n, heads, d));
        let mut scratch = TiledScratch::new();
        let call = |m: usize, out: &mut ndarray::Array3<f32>, scratch: &mut TiledScratch| {
            let (q, k, v) = (
                q.slice(s![..m, .., ..]),
                k.slice(s![..m, .., ..]),
                v.slice(s![..m, .., ..]),
            );
            let out = out.slice_mut(s![..m, .., ..]);
            measure_thread(|| {
                att.run_into_reusing(
                    Kernel::default(),
                    q,
                    k,
                    v,
                    &pos[..m],
                    &pos[..m],
                    out,
                    scratch,
                )
                .unwrap()
            })
            .1
        };
        let cold = call(n, &mut out, &mut scratch);
        let warm = call(n, &mut out, &mut scratch);
        let smaller = call(n / 2, &mut out, &mut scratch);
        assert!(cold > 2 * input_bytes, "{map}: cold call {cold} B");
        assert!(
            warm < input_bytes / 10,
            "{map}: warm call {warm} B vs input {input_bytes} B"
        );
        assert!(
            smaller < input_bytes / 10,
            "{map}: smaller call {smaller} B"
        );
        assert!(
            scratch.capacity_bytes() >= 2 * input_bytes,
            "{map}: {scratch:?}"
        );
    }
}
