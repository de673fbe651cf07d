//! The bf16 path of `ropex::candle` makes no f32 copy of its inputs or output, checked
//! with a counting global allocator (no wall-clock), on `(1, H, T, D)` tensors of
//! `n = H T D` elements:
//! - attention: a bf16 call allocates at least `n` bytes less than the same call on f32
//!   tensors (same kernel scratch, a 2 n instead of a 4 n byte output), where one f32
//!   copy (4 n bytes) would make it 2 n more; the widening path allocates over 12 n more;
//! - rotation: the bf16 output (2 n bytes) is the largest allocation and everything
//!   together stays below one f32 copy.
//!
//! Single-threaded (`with_parallel(false)`), so every allocation is on this thread; the
//! counters are thread-local, so the other tests of this binary do not disturb them.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor};
use ropex::{Attention, Layout, PositionMap, RopeConfig};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{Counting, measure_thread as measure};

#[global_allocator]
static ALLOC: Counting = Counting;

fn bf16_tensor(h: usize, t: usize, d: usize, seed: u64) -> Tensor {
    let data: Vec<f32> = (0..h * t * d)
        .map(|i| (((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(data, (1, h, t, d), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

#[test]
fn bf16_attention_and_rotation_make_no_f32_copy() {
    let (h, t, d) = (4, 512, 64);
    let f32_copy = 4 * h * t * d; // bytes of one f32 copy of q (and of the output)
    let freqs = RopeConfig::new(d, 10_000.0).unwrap().frequencies();
    let attn = Attention::new(
        freqs.clone(),
        Layout::Half,
        PositionMap::rerope(64).unwrap(),
    )
    .with_parallel(false);
    // transposed views, as a model's (B, T, H, D) projections arrive
    let q = bf16_tensor(h, t, d, 1)
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap();
    let q = q.transpose(1, 2).unwrap();
    let (k, v) = (bf16_tensor(h, t, d, 2), bf16_tensor(h, t, d, 3));
    assert!(!q.is_contiguous());
    let pos: Vec<usize> = (0..t).collect();
    let n = h * t * d;
    let call = || ropex::candle::attention(&attn, &q, &k, &v, &pos, &pos).unwrap();
    call(); // warm-up
    let (out, bytes, _) = measure(call);
    assert_eq!(out.dtype(), DType::BF16);
    // The same call on f32 tensors allocates the kernel's own scratch (rotated keys per
    // piece, tiles; the same for every dtype) and a 4 n byte output. The bf16 call
    // allocates that scratch and a 2 n byte output: 2 n bytes less, where one f32 copy
    // of q, k, v or the output (4 n bytes each) would make it 2 n bytes more.
    let w = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let (wq, wk, wv) = (w(&q), w(&k), w(&v));
    let (_, in_f32, _) =
        measure(|| ropex::candle::attention(&attn, &wq, &wk, &wv, &pos, &pos).unwrap());
    assert!(
        bytes + n <= in_f32,
        "bf16 call {bytes} bytes, f32 call {in_f32} bytes, n = {n}"
    );
    // what widening allocates, for contrast: q, k, v and the output in f32 (16 n bytes
    // more, less the bf16 tile buffers the f32 call does not need)
    let (_, widened, _) = measure(|| {
        ropex::candle::attention(&attn, &w(&q), &w(&k), &w(&v), &pos, &pos)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    });
    assert!(widened >= bytes + 3 * f32_copy, "{widened} vs {bytes}");
    // the rotation: the bf16 output and one f32 lane of D elements
    let (rot, bytes, largest) =
        measure(|| ropex::candle::rope(&q, &freqs, Layout::Half, &pos).unwrap());
    assert_eq!(rot.dtype(), DType::BF16);
    assert_eq!(largest, 2 * h * t * d, "largest allocation {largest}");
    assert!(
        bytes < f32_copy,
        "{bytes} bytes allocated, an f32 copy is {f32_copy}"
    );
}
