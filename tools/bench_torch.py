"""Time PyTorch attention on the shapes of ropex's attention benches, for comparison.

Measures, single-threaded on CPU, f32 (or bf16 with `--dtype bf16`), causal, on the shapes of examples/bench_report.rs
(head dim / query heads / kv heads: 128/8/8; 64/9/3 SmolLM2-135M; 64/32/8 Llama 3.2 1B;
128/32/8 Llama 3.1 8B; `--d D --heads Q:KV` for one shape):
  * sdpa_rope:    torch.nn.functional.scaled_dot_product_attention on already-rotated
                  q and k (plain RoPE attention, rotation not timed);
  * naive_rerope: ReRoPE the way Su's bojone/rerope patch computes it: two full score
                  matrices (q, k rotated by their positions; q rotated by w, k unrotated),
                  a |i - j| < w select, causal mask, softmax in f32, times V. Rotation of
                  the second query set is timed, as it is part of the method.

Grouped-query shapes pass kv heads to SDPA with `enable_gqa=True` (torch >= 2.5); the
naive ReRoPE repeats them per query head (`--no-naive` skips it, it is slow at n = 4096).

Usage (torch from PyPI: `pip install torch numpy`):
    taskset -c 0 python3 tools/bench_torch.py [--ns 1024 2048 4096] [--w 512] [--d 64 --heads 9:3]
        [--no-naive] [--cpu-time] [--threads 1] [--dtype f32|bf16]

Prints the CPU (/proc/cpuinfo) and a markdown table of median times (ms) and useful
causal GFLOP/s (4 * H_q * d * n(n+1)/2 flops: Q.K^T and P.V over the causal triangle).
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
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
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


# Wall-clock by default; `--cpu-time` switches to the on-CPU time of this thread
# (time.thread_time, CLOCK_THREAD_CPUTIME_ID: with one torch thread the kernels run on
# it), the clock of bench_report's 1-thread rows, robust to other jobs on the machine.
CLOCK = time.perf_counter


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return statistics.median(ts)


SHAPES = [(128, 8, 8), (64, 9, 3), (64, 32, 8), (128, 32, 8)]


def cpu_model():
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = line.split(":", 1)
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU"
    return f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--w", type=int, default=512)
    ap.add_argument("--heads", type=str, default=None, help="query:kv heads, e.g. 32:8")
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--cpu-time", action="store_true", help="on-CPU time of this thread")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="q, k, v and output type")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.d is None and args.heads is None:
        shapes = SHAPES
    else:
        hq, hkv = (int(x) for x in (args.heads or "8:8").split(":"))
        shapes = [(args.d or 128, hq, hkv)]
    clock = "on-CPU time" if args.cpu_time else "wall-clock"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"torch {torch.__version__}, {cpu_model()}, threads {torch.get_num_threads()}, {args.dtype}, w = {args.w}, {clock} medians\n")
    print("| shape | n | sdpa_rope ms | GFLOP/s | naive_rerope ms | GFLOP/s | naive / sdpa |")
    print("|---|---|---|---|---|---|---|")
    for d, hq, hkv in shapes:
        inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        for n in args.ns:
            q = torch.randn(hq, n, d).to(dtype)
            k = torch.randn(hkv, n, d).to(dtype)
            v = torch.randn(hkv, n, d).to(dtype)
            flops = 4 * hq * d * n * (n + 1) / 2
            sdpa = torch.nn.functional.scaled_dot_product_attention
            with torch.no_grad():
                if hq == hkv:
                    t_sdpa = timeit(lambda: sdpa(q, k, v, is_causal=True), args.reps)
                else:
                    t_sdpa = timeit(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), args.reps)
                t_naive = None
                if not args.no_naive:
                    t_naive = timeit(lambda: naive_rerope(q, k, v, args.w, inv_freq), max(2, args.reps // 2))
            naive = (
                f"{t_naive * 1e3:.1f} | {flops / t_naive / 1e9:.1f} | {t_naive / t_sdpa:.2f}"
                if t_naive is not None
                else " | | "
            )
            print(f"| d={d} {hq}/{hkv} | {n} | {t_sdpa * 1e3:.1f} | {flops / t_sdpa / 1e9:.1f} | {naive} |", flush=True)


if __name__ == "__main__":
    main()
