//! Decode with f32 / bf16 / f16 K/V storage, contiguous vs paged, RoPE vs ReRoPE.
//!
//! One query step (H_q = 32, GQA over H_kv = 8, d = d_v = 128) at position `L - 1`
//! against a cache of `L = 32768` tokens, single-threaded, into a caller's buffer with a
//! warm [`DecodeScratch`] (no allocation). Cases: `{rope, rerope}_{f32, bf16, f16}` on
//! the contiguous [`KvCache`], and `{rope, rerope}_{f32, bf16}_paged` on a
//! [`PagedKvCache`] of 16-token blocks. ReRoPE's window is 512. Throughput is the bytes
//! of K and V a plain step reads in that storage type, `S::BYTES H_kv L (d + d_v)`.
//!
//! Criterion runs the cases one after another. The targets are *ratios*, which a noisy
//! machine blurs, so `ROPEX_DECODE_RATIOS=<rounds>` instead times the pairs of each
//! ratio interleaved (`a, b, a, b, ..`, one step each) and prints the median of the
//! per-round ratios: `cargo bench --bench decode_dtypes` with the variable set.
//! `ROPEX_DECODE_PROFILE=rope_bf16` (any case name; `ROPEX_DECODE_STEPS`, default 200)
//! runs one case in a loop, to profile it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use ndarray::Array3;
use ropex::attention::decode::{DecodeScratch, KvCache, PagedKvCache, SeqId};
use ropex::{CacheShape, Element, Layout, PositionMap, RopeConfig};

const L: usize = 32768;
const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const WINDOW: usize = 512;

fn rand3(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array3::from_shape_fn(shape, |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
    })
}

fn map(rerope: bool) -> PositionMap {
    if rerope {
        PositionMap::rerope(WINDOW).expect("window")
    } else {
        PositionMap::Rope
    }
}

/// A decode step that can be timed: a filled cache, its query, output and scratch.
trait Step {
    fn step(&mut self);
}

struct Contiguous<S: Element> {
    cache: KvCache<S>,
    q: Array3<f32>,
    out: Array3<f32>,
    scratch: DecodeScratch,
}

impl<S: Element> Step for Contiguous<S> {
    fn step(&mut self) {
        self.cache
            .attend_into(self.q.view(), &[L - 1], &mut self.out, &mut self.scratch)
            .expect("decode step");
        black_box(&self.out);
    }
}

struct Paged<S: Element> {
    cache: PagedKvCache<S>,
    seq: SeqId,
    q: Array3<f32>,
    out: Array3<f32>,
    scratch: DecodeScratch,
}

impl<S: Element> Step for Paged<S> {
    fn step(&mut self) {
        self.cache
            .attend_into(
                self.seq,
                self.q.view(),
                &[L - 1],
                &mut self.out,
                &mut self.scratch,
            )
            .expect("decode step");
        black_box(&self.out);
    }
}

fn inputs() -> (Array3<f32>, Array3<f32>, Array3<f32>) {
    (
        rand3((1, HQ, D), 1),
        rand3((L, HKV, D), 2),
        rand3((L, HKV, D), 3),
    )
}

fn contiguous<S: Element>(rerope: bool) -> Box<dyn Step> {
    let (q, k, v) = inputs();
    let cfg = RopeConfig::new(D, 10_000.0).expect("config");
    let mut cache =
        KvCache::<S>::new_typed(cfg, Layout::Half, map(rerope), CacheShape::square(HKV, D))
            .expect("cache");
    cache.append(k.view(), v.view()).expect("fill");
    let mut s = Contiguous {
        cache,
        q,
        out: Array3::zeros((1, HQ, D)),
        scratch: DecodeScratch::new(),
    };
    s.step();
    Box::new(s)
}

fn paged<S: Element>(rerope: bool) -> Box<dyn Step> {
    let (q, k, v) = inputs();
    let cfg = RopeConfig::new(D, 10_000.0).expect("config");
    let block = PagedKvCache::<S>::DEFAULT_BLOCK;
    let mut cache = PagedKvCache::<S>::new_typed(
        cfg,
        Layout::Half,
        map(rerope),
        CacheShape::square(HKV, D),
        block,
        L / block,
    )
    .expect("paged cache");
    let seq = cache.add_sequence().expect("sequence");
    cache.append(seq, k.view(), v.view()).expect("fill");
    let mut s = Paged {
        cache,
        seq,
        q,
        out: Array3::zeros((1, HQ, D)),
        scratch: DecodeScratch::new(),
    };
    s.step();
    Box::new(s)
}

type Make = fn(bool) -> Box<dyn Step>;

/// `(name, constructor, bytes per element)`.
fn cases() -> Vec<(&'static str, Make, usize)> {
    vec![
        ("f32", contiguous::<f32> as Make, 4),
        ("bf16", contiguous::<half::bf16>, 2),
        ("f16", contiguous::<half::f16>, 2),
        ("f32_paged", paged::<f32>, 4),
        ("bf16_paged", paged::<half::bf16>, 2),
    ]
}

fn criterion_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("decode_dtypes/L={L}"));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for rerope in [false, true] {
        for (name, make, bytes) in cases() {
            let mut step = make(rerope);
            group.throughput(Throughput::Bytes((bytes * HKV * L * 2 * D) as u64));
            let id = format!("{}_{name}", if rerope { "rerope" } else { "rope" });
            group.bench_function(BenchmarkId::from_parameter(id), |b| b.iter(|| step.step()));
        }
    }
    group.finish();
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

fn time(s: &mut dyn Step) -> f64 {
    let t = Instant::now();
    s.step();
    t.elapsed().as_secs_f64()
}

/// Interleaved ratios of the targets, medians over `rounds`.
fn ratios(rounds: usize) {
    let pairs: [(&str, Make, bool, Make, bool, f64); 6] = [
        (
            "bf16 / f32 (rope)",
            contiguous::<half::bf16>,
            false,
            contiguous::<f32>,
            false,
            0.55,
        ),
        (
            "f16 / f32 (rope)",
            contiguous::<half::f16>,
            false,
            contiguous::<f32>,
            false,
            0.55,
        ),
        (
            "bf16 / f32 (rerope)",
            contiguous::<half::bf16>,
            true,
            contiguous::<f32>,
            true,
            0.55,
        ),
        (
            "rerope / rope (bf16)",
            contiguous::<half::bf16>,
            true,
            contiguous::<half::bf16>,
            false,
            1.05,
        ),
        (
            "paged / contiguous (bf16 rope)",
            paged::<half::bf16>,
            false,
            contiguous::<half::bf16>,
            false,
            1.05,
        ),
        (
            "paged / contiguous (f32 rope)",
            paged::<f32>,
            false,
            contiguous::<f32>,
            false,
            1.05,
        ),
    ];
    println!(
        "interleaved decode ratios, L = {L}, H_q = {HQ}, H_kv = {HKV}, d = {D}, {rounds} rounds"
    );
    for (name, make_a, ra, make_b, rb, target) in pairs {
        let (mut a, mut b) = (make_a(ra), make_b(rb));
        let (mut ta, mut tb, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let x = time(a.as_mut());
            let y = time(b.as_mut());
            ta.push(x);
            tb.push(y);
            r.push(x / y);
        }
        println!(
            "{name:32} median ratio {:.3} (target <= {target}); medians {:.2} ms / {:.2} ms",
            median(r),
            median(ta) * 1e3,
            median(tb) * 1e3
        );
    }
}

/// Runs one case (`{rope,rerope}_<name>`, e.g. `rope_bf16`) for `steps` steps and
/// prints its median step time: a loop to profile (`perf record`).
fn profile(case: &str, steps: usize) {
    let (rerope, name) = match case.split_once('_') {
        Some(("rerope", n)) => (true, n),
        Some((_, n)) => (false, n),
        None => (false, case),
    };
    let Some((_, make, bytes)) = cases().into_iter().find(|c| c.0 == name) else {
        eprintln!("unknown case {case}");
        return;
    };
    let mut s = make(rerope);
    let t: Vec<f64> = (0..steps).map(|_| time(s.as_mut())).collect();
    let m = median(t);
    let gb = (bytes * HKV * L * 2 * D) as f64 / m / 1e9;
    println!(
        "{case}: median {:.3} ms over {steps} steps, {gb:.1} GB/s of K/V",
        m * 1e3
    );
}

fn main() {
    if let Ok(case) = std::env::var("ROPEX_DECODE_PROFILE") {
        let steps = std::env::var("ROPEX_DECODE_STEPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        profile(&case, steps);
        return;
    }
    if let Some(rounds) = std::env::var("ROPEX_DECODE_RATIOS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        ratios(rounds.max(1));
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
