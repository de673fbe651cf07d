#!/usr/bin/env python3
"""PyTorch reference outputs for ReRoPE and Leaky ReRoPE attention (tests/data/rerope_ref/).

Construction (the two-pass scheme of Su Jianlin's bojone/rerope `rerope_patch.py`, written from the
description in /work/shared/design/ROPE_MATH.md sections 3-4, not copied):

  inv_freq_j = base^(-2j/d), j = 0..d/2-1, base = 10000
  R(p) x     = x * cat(cos(p*inv), cos(p*inv)) + rotate_half(x) * cat(sin(p*inv), sin(p*inv)),
               rotate_half(x) = cat(-x[d/2:], x[:d/2])          (half-split "NeoX/HF" layout)
  S1[h,i,j]  = (R(i) q_i) . (R(j) k_j) / sqrt(d)                 piece 1: q, k at their own positions
  S2[h,i,j]  = (R(f(i)) q_i) . (R(g(j)) k_j) / sqrt(d)           piece 2:
                 ReRoPE:       f(i) = w,                 g(j) = 0   (keys unrotated)
                 Leaky ReRoPE: f(i) = i/k + w (1 - 1/k), g(j) = j/k (fractional positions)
  S          = where(i - j < w, S1, S2); causal mask (j > i -> -inf); softmax over j in float32
  out[i,h,:] = sum_j softmax(S)[h,i,j] v[j,h,:]

So the effective relative position is min(i-j, w) (ReRoPE) or i-j if i-j < w else w + (i-j-w)/k
(Leaky).  No log-n query scaling is applied (Su's patch multiplies queries by
max(1, log(pos+1)/log(train_len)); that is a separate, per-query scalar and is left out here).

Precision: angles p*inv_freq and cos/sin are computed in float64 and cast to float32; rotation,
scores, softmax and P.V are float32 (like the patch with an f32 model).  A float64 pipeline
of the same construction and an independent per-(i,j) float64 check (q . R(P(i,j)) k) are run too;
their max |difference| to out.npy is written to meta.json as a tolerance hint.

Inputs q, k, v ~ N(0, 1) float32 from numpy.random.default_rng(seed).

Files: tests/data/rerope_ref/<case>/{q,k,v,out}.npy  (little-endian float32, C order, shape [n, H, d])
       tests/data/rerope_ref/<case>/meta.json

Setup: pip install torch numpy      Run: python3 tools/rerope_reference.py   (CPU, deterministic)
"""

import json
import math
import os

import numpy as np
import torch

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "data", "rerope_ref")
BASE = 10000.0

CASES = [
    {"name": "rerope_n64_h2_d32_w16", "kind": "rerope", "n": 64, "H": 2, "d": 32, "w": 16, "seed": 1},
    {"name": "rerope_n200_h4_d64_w48", "kind": "rerope", "n": 200, "H": 4, "d": 64, "w": 48, "seed": 2},
    {"name": "leaky_rerope_n128_h2_d32_w16_k8", "kind": "leaky_rerope", "n": 128, "H": 2, "d": 32, "w": 16,
     "k": 8, "seed": 3},
]


def inv_freq_f64(d, base=BASE):
    j = torch.arange(0, d // 2, dtype=torch.float64)
    return base ** (-2.0 * j / d)


def cos_sin(positions_f64, d):
    """positions [n] float64 -> (cos, sin) [n, d] float64, half-split duplicated."""
    ang = positions_f64[:, None] * inv_freq_f64(d)[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return torch.cos(ang), torch.sin(ang)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rotate(x, cos, sin):
    """x [n, H, d]; cos/sin [n, d] broadcast over heads."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def piece2_positions(kind, n, w, k):
    i = torch.arange(n, dtype=torch.float64)
    if kind == "rerope":
        return torch.full((n,), float(w), dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    return i / k + w * (1.0 - 1.0 / k), i / k


def two_pass_attention(q, k, v, w, kind, leak, dtype):
    """The bojone/rerope-style computation. q, k, v: [n, H, d] tensors; returns [n, H, d]."""
    n, H, d = q.shape
    q = q.to(dtype)
    k = k.to(dtype)
    v = v.to(dtype)
    pos = torch.arange(n, dtype=torch.float64)
    c1, s1 = cos_sin(pos, d)
    fq, gk = piece2_positions(kind, n, w, leak)
    c2q, s2q = cos_sin(fq, d)
    c2k, s2k = cos_sin(gk, d)
    c1, s1, c2q, s2q, c2k, s2k = (t.to(dtype) for t in (c1, s1, c2q, s2q, c2k, s2k))

    q1, k1 = rotate(q, c1, s1), rotate(k, c1, s1)
    q2, k2 = rotate(q, c2q, s2q), rotate(k, c2k, s2k)
    scale = 1.0 / math.sqrt(d)
    # [H, n, n] score matrices
    S1 = torch.einsum("ihd,jhd->hij", q1, k1) * scale
    S2 = torch.einsum("ihd,jhd->hij", q2, k2) * scale
    ii = torch.arange(n)[:, None]
    jj = torch.arange(n)[None, :]
    band = (ii - jj) < w
    S = torch.where(band[None], S1, S2)
    S = S.masked_fill((jj > ii)[None], float("-inf"))
    P = torch.softmax(S, dim=-1, dtype=torch.float32 if dtype == torch.float32 else torch.float64).to(dtype)
    return torch.einsum("hij,jhd->ihd", P, v)


def direct_reference_f64(q, k, v, w, kind, leak):
    """Independent check: score(i,j) = q_i . R(P(i,j)) k_j / sqrt(d) with the relative-position map P."""
    n, H, d = q.shape
    q = q.double()
    k = k.double()
    v = v.double()
    inv = inv_freq_f64(d)
    out = torch.empty(n, H, d, dtype=torch.float64)
    for i in range(n):
        r = i - torch.arange(i + 1, dtype=torch.float64)  # relative distances for j = 0..i
        if kind == "rerope":
            P = torch.clamp(r, max=float(w))
        else:
            P = torch.where(r < w, r, w + (r - w) / leak)
        # (R(a) q) . (R(b) k) depends on a - b only: rotate the key by -P (equivalently q by +P).
        ang = P[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        c, s = torch.cos(ang), torch.sin(ang)
        qi = q[i]  # [H, d]
        qrot = qi[None] * c[:, None, :] + rotate_half(qi)[None] * s[:, None, :]  # [i+1, H, d]
        scores = (qrot * k[: i + 1]).sum(-1) / math.sqrt(d)  # [i+1, H]
        p = torch.softmax(scores, dim=0)
        out[i] = torch.einsum("jh,jhd->hd", p, v[: i + 1])
    return out


def main():
    for c in CASES:
        n, H, d, w = c["n"], c["H"], c["d"], c["w"]
        leak = c.get("k")
        rng = np.random.default_rng(c["seed"])
        q = rng.standard_normal((n, H, d), dtype=np.float32)
        k = rng.standard_normal((n, H, d), dtype=np.float32)
        v = rng.standard_normal((n, H, d), dtype=np.float32)
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

        out32 = two_pass_attention(tq, tk, tv, w, c["kind"], leak, torch.float32)
        out64 = two_pass_attention(tq, tk, tv, w, c["kind"], leak, torch.float64)
        direct = direct_reference_f64(tq, tk, tv, w, c["kind"], leak)
        diff_f64 = float((out32.double() - out64).abs().max())
        diff_direct = float((out64 - direct).abs().max())
        assert diff_direct < 1e-12, diff_direct
        assert diff_f64 < 1e-5, diff_f64

        out = out32.numpy().astype("<f4", copy=False)
        d_out = os.path.join(OUT_DIR, c["name"])
        os.makedirs(d_out, exist_ok=True)
        for fname, arr in (("q", q), ("k", k), ("v", v), ("out", out)):
            arr = np.ascontiguousarray(arr, dtype="<f4")
            assert arr.shape == (n, H, d)
            np.save(os.path.join(d_out, f"{fname}.npy"), arr)

        if c["kind"] == "rerope":
            piece2 = {"query_position": "w", "key_position": "0 (keys unrotated)",
                      "relative_position": "min(i - j, w)"}
        else:
            piece2 = {"query_position": "i/k + w*(1 - 1/k)", "key_position": "j/k",
                      "relative_position": "i - j if i - j < w else w + (i - j - w)/k"}
        meta = {
            "kind": c["kind"],
            "n": n,
            "H": H,
            "d": d,
            "w": w,
            "base": BASE,
            "layout": "half_split",
            "layout_detail": "rotate_half: R(p)x = x*cat(cos,cos) + cat(-x[d/2:], x[:d/2])*cat(sin,sin), "
                             "pair j = (x[j], x[j+d/2]) rotated by p*inv_freq_j",
            "inv_freq": "base^(-2j/d), j = 0..d/2-1",
            "causal": True,
            "scale": "1/sqrt(d)",
            "band": "piece 1 (q at i, k at j) where i - j < w, else piece 2",
            "piece2": piece2,
            "log_n_scaling": False,
            "shapes": "q, k, v, out: [n, H, d] little-endian float32, C order",
            "inputs": f"numpy.random.default_rng({c['seed']}).standard_normal(dtype=float32) for q, then k, then v",
            "precision": "angles and cos/sin in float64, cast to float32; rotation, scores, softmax, P.V in float32",
            "max_abs_diff_vs_float64_pipeline": diff_f64,
            "max_abs_diff_float64_pipeline_vs_direct_relative_map": diff_direct,
            "seed": c["seed"],
        }
        if leak is not None:
            meta["k"] = leak
        with open(os.path.join(d_out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        print(f"{c['name']}: max|out32-out64| = {diff_f64:.3e}, max|two-pass-direct| (f64) = {diff_direct:.3e}")

    total = 0
    for root, _, files in os.walk(OUT_DIR):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"total size of {OUT_DIR}: {total} bytes")


if __name__ == "__main__":
    main()
