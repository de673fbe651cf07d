//! Times `ropex::candle::attention` on bf16 candle tensors (feature `candle`): one batch
//! item, `H` heads (q and kv), `T` tokens, `d = 128`, causal RoPE, default tiled kernel,
//! against the same call on inputs widened to f32 and the result rounded back to bf16
//! (what the module did before it read bf16 storage natively). Medians of interleaved
//! repeats, milliseconds.
//!
//! ```text
//! RAYON_NUM_THREADS=1 taskset -c 1 cargo run --release --features candle --example candle_timing -- [T] [H] [reps]
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ropex::{Attention, Layout, PositionMap, RopeConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (t, h, reps, d) = (arg(1, 2048), arg(2, 8), arg(3, 7), 128);
    let freqs = RopeConfig::new(d, 10_000.0)?.frequencies();
    let attn = Attention::new(freqs, Layout::Half, PositionMap::Rope);
    let x = |seed: u64| -> candle_core::Result<Tensor> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..h * t * d)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, (1, h, t, d), &Device::Cpu)?.to_dtype(DType::BF16)
    };
    let (q, k, v) = (x(1)?, x(2)?, x(3)?);
    let pos: Vec<usize> = (0..t).collect();
    let native = || ropex::candle::attention(&attn, &q, &k, &v, &pos, &pos);
    let widened = || -> Result<Tensor, Box<dyn std::error::Error>> {
        let w = |x: &Tensor| x.to_dtype(DType::F32);
        let o = ropex::candle::attention(&attn, &w(&q)?, &w(&k)?, &w(&v)?, &pos, &pos)?;
        Ok(o.to_dtype(DType::BF16)?)
    };
    native()?;
    widened()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let s = Instant::now();
        std::hint::black_box(native()?);
        a.push(s.elapsed().as_secs_f64() * 1e3);
        let s = Instant::now();
        std::hint::black_box(widened()?);
        b.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let (ma, mb) = (median(a.clone()), median(b.clone()));
    println!(
        "T = {t}, H = {h}, d = {d}, bf16: attention {ma:.2} ms, widen + f32 + narrow {mb:.2} ms, ratio {:.3}",
        ma / mb
    );
    println!("  attention runs: {a:.2?}");
    println!("  widened runs:   {b:.2?}");
    Ok(())
}
