"""Time PyTorch attention on the shapes of ropex's attention benches, for comparison.

Measures, single-threaded on CPU, f32, causal, H = 8 heads, d = 128:
  * sdpa_rope:    torch.nn.functional.scaled_dot_product_attention on already-rotated
                  q and k (plain RoPE attention, rotation not timed);
  * naive_rerope: ReRoPE the way Su's bojone/rerope patch computes it: two full score
                  matrices (q, k rotated by their positions; q rotated by w, k unrotated),
                  a |i - j| < w select, causal mask, softmax in f32, times V. Rotation of
                  the second query set is timed, as it is part of the method.

Usage (torch from PyPI: `pip install torch numpy`):
    RAYON_NUM_THREADS=1 taskset -c 0 python3 tools/bench_torch.py [--ns 1024 2048 4096] [--w 512]

Prints a markdown table of median times (ms) and useful causal GFLOP/s
(4 * H * d * n(n+1)/2 flops: Q.K^T and P.V over the causal triangle).
"""

import argparse
import math
import statistics
import time

import torch


def rotate(x, pos, inv_freq):
    # x: [H, n, d], half-split layout; pos: [n] float64
    ang = pos[:, None].double() * inv_freq[None, :].double()
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1).float()
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1).float()
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def naive_rerope(q, k, v, w, inv_freq):
    n = q.shape[1]
    pos = torch.arange(n, dtype=torch.float64)
    scale = 1.0 / math.sqrt(q.shape[-1])
    q1, k1 = rotate(q, pos, inv_freq), rotate(k, pos, inv_freq)
    q2 = rotate(q, torch.full((n,), float(w), dtype=torch.float64), inv_freq)
    s1 = q1 @ k1.transpose(-1, -2) * scale
    s2 = q2 @ k.transpose(-1, -2) * scale
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    s = torch.where((i - j).abs() < w, s1, s2)
    s = s.masked_fill(j > i, float("-inf"))
    p = torch.softmax(s.float(), dim=-1)
    return p @ v


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--w", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inv_freq = 10000.0 ** (-torch.arange(0, args.d, 2, dtype=torch.float64) / args.d)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, H = {args.heads}, d = {args.d}, w = {args.w}\n")
    print("| n | sdpa_rope ms | GFLOP/s | naive_rerope ms | GFLOP/s | naive / sdpa |")
    print("|---|---|---|---|---|---|")
    for n in args.ns:
        q = torch.randn(args.heads, n, args.d)
        k = torch.randn(args.heads, n, args.d)
        v = torch.randn(args.heads, n, args.d)
        flops = 4 * args.heads * args.d * n * (n + 1) / 2
        with torch.no_grad():
            t_sdpa = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), args.reps)
            t_naive = timeit(lambda: naive_rerope(q, k, v, args.w, inv_freq), max(2, args.reps // 2))
        print(f"| {n} | {t_sdpa * 1e3:.1f} | {flops / t_sdpa / 1e9:.1f} | {t_naive * 1e3:.1f} | {flops / t_naive / 1e9:.1f} | {t_naive / t_sdpa:.2f} |")


if __name__ == "__main__":
    main()
