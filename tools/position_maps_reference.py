#!/usr/bin/env python3
"""Independent reference outputs for Self-Extend, Dual Chunk Attention and StreamingLLM
(tests/data/position_maps_ref/), computed the way the methods' own code computes them, not
through ropex's piece/region description.

Common: inv_freq_t = base^(-2t/d), base 10000, half-split ("rotate_half") layout,
R(p) x = x * cat(cos(p inv), cos(p inv)) + rotate_half(x) * cat(sin(p inv), sin(p inv)),
scale 1/sqrt(d), causal, one softmax per query row.  Everything in float64 (the oracle);
out is cast to float32.

Self-Extend (Jin et al. 2024, LongLM's self_extend_patch construction, written from the
paper's description): two full score matrices and a mask merge,
  S_neigh[i, j] = (R(i) q_i) . (R(j) k_j)
  S_group[i, j] = (R(i // G + W - W // G) q_i) . (R(j // G) k_j)
  S = where(i - j < W, S_neigh, S_group), causal mask, softmax.
  With scale_base: q_i *= max(1, log(i + 1) / log(scale_base)) before both rotations.

Dual Chunk Attention (An et al. 2024, ChunkLlama's three regions): c = chunk_size -
local_window, keys rotated by j % c, three query copies:
  intra  q at i % c                      used where i // c == j // c
  succ   q at min(i % c + c, chunk_size) used where i // c == j // c + 1
  inter  q at min(2c - 1, chunk_size)    used where i // c >= j // c + 2
  one softmax over the merged scores.
  Optional logit scale (ChunkLlama's cos/sin tables of q and k are both multiplied by
  mscale = 0.05 ln(n / L) + 1 for n > L): q and k are scaled by mscale before rotating.

StreamingLLM (Xiao et al. 2023): simulated as the cache it is.  For query i the cache
holds the sinks 0..S-1 and the last W tokens i-W+1..i (deduplicated, in order); every
cached key and the query are rotated by their *place in the cache* (0..m-1, the query at
m-1), and attention runs over the cache only.

Inputs q, k, v ~ N(0, 1) float32 from numpy.random.default_rng(seed).
Files: tests/data/position_maps_ref/<case>/{q,k,v,out}.npy (little-endian float32, C
order, [n, H, d]) and meta.json.

numpy is the only dependency (the same array construction works line for line in
PyTorch; numpy keeps the tool light).  Run: python3 tools/position_maps_reference.py
"""

import json
import math
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "data", "position_maps_ref")
BASE = 10000.0

CASES = [
    {"name": "self_extend_n80_g4_w12", "map": "self-extend:4:12", "G": 4, "W": 12, "seed": 11},
    {"name": "self_extend_n80_g3_w10_b16", "map": "self-extend:3:10:16", "G": 3, "W": 10,
     "scale_base": 16.0, "seed": 12},
    {"name": "dca_n80_c24_l6", "map": "dca:24:6", "chunk_size": 24, "local_window": 6, "seed": 13},
    {"name": "dca_n80_c20_l12", "map": "dca:20:12", "chunk_size": 20, "local_window": 12, "seed": 14},
    {"name": "dca_n80_c24_l6_logit_scale_l32", "map": "dca:24:6", "chunk_size": 24, "local_window": 6,
     "dca_logit_train_len": 32, "seed": 16},
    {"name": "streaming_n80_s4_w16", "map": "streaming:4:16", "S": 4, "W": 16, "seed": 15},
]
N, H, D = 80, 2, 16


def inv_freq(d):
    t = np.arange(0, d // 2, dtype=np.float64)
    return BASE ** (-2.0 * t / d)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotate(x, positions):
    """x [n, H, d] float64 rotated by positions [n] (float64)."""
    ang = positions[:, None] * inv_freq(x.shape[-1])[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return x * np.cos(ang)[:, None, :] + rotate_half(x) * np.sin(ang)[:, None, :]


def scores(qr, kr):
    """[H, n_q, n_k] = (qr . kr) / sqrt(d)."""
    return np.einsum("ihd,jhd->hij", qr, kr) / math.sqrt(qr.shape[-1])


def softmax_out(s, v):
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v)


def causal(n):
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    return i, j, j <= i


def self_extend(q, k, v, G, W, scale_base=None):
    n = q.shape[0]
    pos = np.arange(n, dtype=np.float64)
    if scale_base is not None:
        q = q * np.maximum(1.0, np.log(pos + 1.0) / math.log(scale_base))[:, None, None]
    s_neigh = scores(rotate(q, pos), rotate(k, pos))
    grouped_q = np.floor(pos / G) + W - W // G
    grouped_k = np.floor(pos / G)
    s_group = scores(rotate(q, grouped_q), rotate(k, grouped_k))
    i, j, vis = causal(n)
    s = np.where((i - j) < W, s_neigh, s_group)
    s = np.where(vis, s, -np.inf)
    return softmax_out(s, v)


def dca(q, k, v, chunk_size, local_window, train_len=None):
    n = q.shape[0]
    c = chunk_size - local_window
    if train_len is not None and n > train_len:
        mscale = 0.05 * math.log(n / train_len) + 1.0
        q, k = q * mscale, k * mscale
    pos = np.arange(n)
    kr = rotate(k, (pos % c).astype(np.float64))
    q_intra = (pos % c).astype(np.float64)
    q_succ = np.minimum(pos % c + c, chunk_size).astype(np.float64)
    q_inter = np.full(n, min(2 * c - 1, chunk_size), dtype=np.float64)
    s_intra = scores(rotate(q, q_intra), kr)
    s_succ = scores(rotate(q, q_succ), kr)
    s_inter = scores(rotate(q, q_inter), kr)
    i, j, vis = causal(n)
    dist = i // c - j // c
    s = np.where(dist == 0, s_intra, np.where(dist == 1, s_succ, s_inter))
    s = np.where(vis, s, -np.inf)
    return softmax_out(s, v)


def streaming(q, k, v, S, W):
    n, h, d = q.shape
    out = np.zeros((n, h, v.shape[-1]))
    for i in range(n):
        cache = sorted(set(range(min(S, i + 1))) | set(range(max(0, i - W + 1), i + 1)))
        m = len(cache)
        kr = rotate(k[cache], np.arange(m, dtype=np.float64))
        qr = rotate(q[i:i + 1], np.array([m - 1], dtype=np.float64))
        out[i] = softmax_out(scores(qr, kr), v[cache])[0]
    return out


def main():
    for case in CASES:
        rng = np.random.default_rng(case["seed"])
        q = rng.standard_normal((N, H, D), dtype=np.float32)
        k = rng.standard_normal((N, H, D), dtype=np.float32)
        v = rng.standard_normal((N, H, D), dtype=np.float32)
        q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
        name = case["name"]
        if name.startswith("self_extend"):
            out = self_extend(q64, k64, v64, case["G"], case["W"], case.get("scale_base"))
        elif name.startswith("dca"):
            out = dca(q64, k64, v64, case["chunk_size"], case["local_window"],
                      case.get("dca_logit_train_len"))
        else:
            out = streaming(q64, k64, v64, case["S"], case["W"])
        d = os.path.join(OUT_DIR, name)
        os.makedirs(d, exist_ok=True)
        for fname, arr in [("q", q), ("k", k), ("v", v), ("out", out.astype(np.float32))]:
            np.save(os.path.join(d, fname + ".npy"), np.ascontiguousarray(arr, dtype="<f4"))
        meta = dict(case)
        meta.update({
            "n": N, "H": H, "d": D, "base": BASE, "layout": "half_split", "causal": True,
            "scale": "1/sqrt(d)", "precision": "float64 throughout, out cast to float32",
            "inputs": f"numpy.random.default_rng({case['seed']}).standard_normal(float32): q, k, v",
        })
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(name, "written")


if __name__ == "__main__":
    main()
