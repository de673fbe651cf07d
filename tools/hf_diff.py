#!/usr/bin/env python3
"""Differential check of ropex's config reader against Hugging Face transformers.

Generates random but plausible config.json dicts (Llama, Qwen2, Phi, Phi-3, StableLM,
DeepSeek-V3, gpt-oss, Gemma 3 per-layer and legacy forms; every HF rope type, legacy
`type`, top-level vs inner keys, partial rotary, wrong-length LongRoPE lists, ...), computes
inv_freq / attention_factor with transformers (init functions, or the model's
RotaryEmbedding for "default") and with `ropex freqs --json`, and reports:
  - OK/ERR mismatches (one side raises, the other does not),
  - STRICT mismatches (transformers logged a warning iff `ropex freqs --strict` fails),
  - VALUE mismatches (relative error > 5e-6; pairs between 1e-6 and 5e-6 are counted
    separately: transformers' f32 blend rounding, see tests/hf_golden.rs).

Usage (after `cargo build -p ropex-cli`):
    python3 tools/hf_diff.py [SEED] [N] [PATH_TO_ROPEX_BINARY]
"""
import copy, json, random, subprocess, sys, math, logging, os, tempfile, warnings
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging as hl
import importlib
class H(logging.Handler):
    def __init__(self): super().__init__(level=logging.WARNING); self.recs=[]
    def emit(self, r): self.recs.append(r.getMessage())
HND = H()
hl.set_verbosity_warning(); hl.disable_default_handler(); logging.getLogger("transformers").addHandler(HND)
warnings.simplefilter("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[3] if len(sys.argv) > 3 else os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "ropex")
TMP = tempfile.mkdtemp(prefix="ropex-hf-diff-")
ROT = {"llama": ("transformers.models.llama.modeling_llama", "LlamaRotaryEmbedding"),
       "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RotaryEmbedding"),
       "phi": ("transformers.models.phi.modeling_phi", "PhiRotaryEmbedding"),
       "phi3": ("transformers.models.phi3.modeling_phi3", "Phi3RotaryEmbedding"),
       "stablelm": ("transformers.models.stablelm.modeling_stablelm", "StableLmRotaryEmbedding"),
       "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3RotaryEmbedding"),
       "gpt_oss": ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssRotaryEmbedding")}
rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
def pick(*xs): return rng.choice(xs)
def gen_gemma():
    lt = ["sliding_attention"] * 5 + ["full_attention"]
    c = {"model_type": "gemma3_text", "hidden_size": 1024, "num_attention_heads": 8, "head_dim": pick(128, 256),
         "max_position_embeddings": pick(32768, 131072), "num_hidden_layers": 6, "layer_types": lt}
    form = rng.randrange(3)
    t = pick("default", "linear", "dynamic", "yarn")
    d = {"rope_type": t}
    if t != "default": d["factor"] = pick(2.0, 8.0)
    if t == "yarn": d["original_max_position_embeddings"] = 4096
    if rng.random() < 0.3: d["truncate"] = False
    if form == 0:
        c["rope_parameters"] = {"full_attention": dict(d, rope_theta=1e6), "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    elif form == 1:
        c["rope_scaling"] = d; c["rope_theta"] = pick(1e6, 5e5)
        if rng.random() < 0.5: c["rope_local_base_freq"] = 1e4
    else:
        c["rope_parameters"] = {"full_attention": d}
    return c, pick(None, 65536), pick("full_attention", "sliding_attention")
def gen():
    mt = pick("llama", "qwen2", "phi", "phi3", "stablelm", "deepseek_v3", "gpt_oss")
    heads = pick(8, 16, 32)
    hd = pick(32, 64, 80, 96, 128)
    c = {"model_type": mt, "num_attention_heads": heads, "hidden_size": heads * hd}
    if rng.random() < 0.5: c["head_dim"] = pick(hd, 64, 128)
    if mt == "deepseek_v3": c["qk_rope_head_dim"] = pick(32, 64)
    c["max_position_embeddings"] = pick(2048, 4096, 8192, 32768, 131072)
    if rng.random() < 0.3: c["rope_theta"] = pick(10000.0, 500000.0, 1e6, 150000)
    if rng.random() < 0.2: c["partial_rotary_factor"] = pick(0.25, 0.5, 0.75, 1.0)
    if rng.random() < 0.15: c["original_max_position_embeddings"] = pick(2048, 4096)
    t = pick("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
    d = {}
    if rng.random() < 0.5: d["rope_type"] = t
    else: d["type"] = t
    if rng.random() < 0.5: d["rope_theta"] = pick(10000.0, 500000.0, 1e6)
    if t in ("linear", "dynamic", "yarn", "llama3") or rng.random() < 0.2:
        d["factor"] = pick(1.0, 2.0, 4.0, 8.0, 32.0, 40, 0.5)
    if t in ("yarn", "longrope", "llama3") and rng.random() < 0.7:
        d["original_max_position_embeddings"] = pick(1024, 2048, 4096, 8192)
    if t == "yarn":
        for k, vals in [("beta_fast", (32, 16.0, 64)), ("beta_slow", (1, 2.0, 0.5)), ("mscale", (1.0, 0.707, 0)),
                        ("mscale_all_dim", (1.0, 0.5, 0)), ("attention_factor", (1.0, 1.2)), ("truncate", (True, False))]:
            if rng.random() < 0.3: d[k] = pick(*vals)
    if t == "llama3":
        d["low_freq_factor"] = pick(1.0, 2.0); d["high_freq_factor"] = pick(4.0, 8.0, 1.0)
    if t == "longrope":
        hd_eff = c.get("head_dim", hd) if mt != "deepseek_v3" else c["qk_rope_head_dim"]
        prf = c.get("partial_rotary_factor", 1.0)
        n = int(hd_eff * prf) // 2 if rng.random() < 0.9 else 3
        d["short_factor"] = [round(rng.uniform(1, 3), 3) for _ in range(n)]
        d["long_factor"] = [round(rng.uniform(1, 60), 3) for _ in range(n)]
        if rng.random() < 0.3: d["attention_factor"] = pick(1.0, 1.3)
    if t == "proportional" and rng.random() < 0.7: d["partial_rotary_factor"] = pick(0.25, 0.5)
    if rng.random() < 0.1: d["partial_rotary_factor"] = pick(0.5, 0.25)
    key = pick("rope_scaling", "rope_parameters")
    c[key] = d
    seq = pick(None, 1000, 4096, 8193, 100000)
    return c, seq
def hf(c, seq, lt=None):
    hl.warning_once.cache_clear(); HND.recs = []
    d = copy.deepcopy(c); mt = d.pop("model_type")
    try:
        cfg = AutoConfig.for_model(mt, **d)
        rp = cfg.rope_parameters if lt is None else cfg.rope_parameters[lt]
        rt = rp["rope_type"]
        if rt == "default":
            if lt is not None:
                mod, cls = ("transformers.models.gemma3.modeling_gemma3", "Gemma3RotaryEmbedding")
                m = getattr(importlib.import_module(mod), cls)(cfg)
                return [float(x) for x in getattr(m, lt + "_inv_freq")], float(getattr(m, lt + "_attention_scaling"))
            mod, cls = ROT[mt]; m = getattr(importlib.import_module(mod), cls)(cfg)
            return [float(x) for x in m.inv_freq], float(m.attention_scaling)
        inv, att = ROPE_INIT_FUNCTIONS[rt](cfg, None, seq_len=seq, layer_type=lt)
        inv = [float(x) for x in inv]
        if any(map(lambda x: not math.isfinite(x), inv)) or not math.isfinite(float(att)): return "nonfinite"
        return inv, float(att)
    except Exception as e:
        return "ERR " + type(e).__name__ + " " + str(e)[:100].replace("\n", " ")
mism = 0; agree = 0; both_err = 0; prec = []
for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 300):
    lt = None
    if rng.random() < 0.25: c, seq, lt = gen_gemma()
    else: c, seq = gen()
    h = hf(c, seq, lt)
    cpath = os.path.join(TMP, "config.json")
    open(cpath, "w").write(json.dumps(c))
    args = [BIN, "freqs", "--config", cpath, "--json"] + (["--seq-len", str(seq)] if seq else []) + (["--layer-type", lt] if lt else [])
    p = subprocess.run(args, capture_output=True, text=True)
    r = json.loads(p.stdout) if p.returncode == 0 else "ERR " + p.stderr.strip()
    if isinstance(h, str) or isinstance(r, str):
        if isinstance(h, str) and isinstance(r, str): both_err += 1; continue
        mism += 1; print("OK/ERR MISMATCH", json.dumps(c), seq, "\n  hf:", h if isinstance(h, str) else "ok", "\n  ropex:", r if isinstance(r, str) else "ok"); continue
    hw = [m for m in HND.recs]
    ps = subprocess.run(args + ["--strict"], capture_output=True, text=True)
    if (ps.returncode == 0) == bool(hw):
        mism += 1; print("STRICT MISMATCH", json.dumps(c), "\n  hf warnings:", hw, "\n  ropex strict:", ps.stderr.strip()[:300]); continue
    hi, ha = h; ri, ra = r["inv_freq"], r["attention_factor"]
    bad = len(hi) != len(ri) or abs(ra - ha) > 1e-6 * abs(ha) or any((abs(a - b) > 1e-6 * abs(b)) if b != 0 else a != 0 for a, b in zip(ri, hi))
    loose = len(hi) != len(ri) or abs(ra - ha) > 1e-6 * abs(ha) or any((abs(a - b) > 5e-6 * abs(b)) if b != 0 else a != 0 for a, b in zip(ri, hi))
    if loose:
        mism += 1; print("VALUE MISMATCH", json.dumps(c), seq, len(hi), len(ri), ha, ra)
    elif bad:
        prec.append(max(abs(a-b)/abs(b) for a,b in zip(ri,hi) if b)); agree += 1
    else: agree += 1
print(f"agree {agree} (of which {len(prec)} only within 5e-6, max {max(prec) if prec else 0:.2e}), both error {both_err}, mismatch {mism}")
