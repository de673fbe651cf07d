#!/usr/bin/env python3
"""Golden RoPE reference data for ropex, computed by Hugging Face transformers itself.

Writes (paths relative to the repository root):
  tests/data/hf_golden.json    synthetic configs covering every rope type and the known traps,
                               plus configs transformers rejects ("errors") or only warns about
                               ("warnings");
  tests/data/hf_models.json    real model configs (Llama 3.1 8B, Qwen2.5-7B-Instruct + YaRN,
                               DeepSeek-V3, Phi-3-mini-128k-instruct, gpt-oss-20b);
  tests/data/configs/<name>.json   the raw config.json dicts of those real models.

Nothing here re-implements the RoPE math: every config is turned into the real config object
(`transformers.AutoConfig.for_model(model_type, **config)`, i.e. the model's own config class)
and the inverse frequencies come from transformers' own init functions:
`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]` for the scaled types, and the
model's `<Model>RotaryEmbedding` module for "default" (the default path lives there, not in
ROPE_INIT_FUNCTIONS).  `seq_len` is passed explicitly where the type depends on the length
(dynamic, longrope).  Each value is also cross-checked against the model's RotaryEmbedding
module (its init buffers, and for dynamic/longrope its `forward` with position_ids 0..seq_len-1).

Setup (CPU only):
    pip install torch numpy transformers safetensors
Run from the repository root (or anywhere; paths are resolved from this file):
    python3 tools/hf_golden.py

The output is deterministic for a given transformers/torch version (no randomness, no time).
Floats are written with Python's repr (shortest round-trip), so f32 values are exact.
"""

import copy
import json
import logging
import math
import os
import sys
import warnings

import torch

import transformers
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging as hf_logging

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

# ---------------------------------------------------------------------------------------------
# Phi-3-mini-128k-instruct LongRoPE factors (48 = 96/2 entries each).  Typed in from the model's
# published config.json ("type": "longrope"), NOT downloaded from the Hub (this machine reaches
# only package registries).  All 96 values agree exactly with an independent public copy (the
# LONGROPE_PARAMS of a Microsoft evaluation script); a llama.cpp walkthrough quoting the Hub file
# shows the same leading and trailing entries.  No test checks them against the Hub's current
# revision: the fixtures pin parity with transformers on these lists.  The other real-model
# configs in model_configs() below are typed in the same way (see tools/README.md).
# ---------------------------------------------------------------------------------------------
PHI3_LONG_FACTOR = [
    1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558,
    1.5699999332427979, 1.7999999523162842, 2.129999876022339, 2.129999876022339,
    3.009999990463257, 5.910000324249268, 6.950000286102295, 9.070000648498535,
    9.930000305175781, 10.710000038146973, 11.130000114440918, 14.609999656677246,
    15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875,
    38.599998474121094, 40.12000274658203, 46.20000457763672, 50.940006256103516,
    53.66000747680664, 54.9373893737793, 56.89738845825195, 57.28738784790039,
    59.98738479614258, 60.86738586425781, 60.887386322021484, 61.71739196777344,
    62.91739273071289, 62.957393646240234, 63.41739273071289, 63.8173942565918,
    63.83739471435547, 63.897396087646484, 63.93739700317383, 64.06739807128906,
    64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906,
    64.24435424804688, 64.57435607910156, 64.69000244140625, 64.76000213623047,
]
PHI3_SHORT_FACTOR = [
    1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003,
    1.4000000000000004, 1.5500000000000005, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.0500000000000007,
    2.0500000000000007, 2.0500000000000007, 2.0500000000000007, 2.0500000000000007,
    2.0500000000000007, 2.1000000000000005, 2.1000000000000005, 2.1500000000000004,
    2.25, 2.25, 2.25, 2.25, 2.25, 2.3999999999999995, 2.4499999999999993,
    2.499999999999999, 2.6999999999999984, 2.6999999999999984, 2.7499999999999982,
    2.799999999999998, 2.8999999999999977, 3.049999999999997,
]
assert len(PHI3_LONG_FACTOR) == 48 and len(PHI3_SHORT_FACTOR) == 48

# Half-length lists (24 entries) for a partial-rotary longrope case: every other Phi-3 entry.
HALF_LONG = PHI3_LONG_FACTOR[::2]
HALF_SHORT = PHI3_SHORT_FACTOR[::2]

# model_type -> (modeling module, RotaryEmbedding class) used for the "default" path and checks.
ROTARY_CLASSES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRotaryEmbedding"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RotaryEmbedding"),
    "phi": ("transformers.models.phi.modeling_phi", "PhiRotaryEmbedding"),
    "phi3": ("transformers.models.phi3.modeling_phi3", "Phi3RotaryEmbedding"),
    "stablelm": ("transformers.models.stablelm.modeling_stablelm", "StableLmRotaryEmbedding"),
    "gemma3_text": ("transformers.models.gemma3.modeling_gemma3", "Gemma3RotaryEmbedding"),
    "gemma4_text": ("transformers.models.gemma4.modeling_gemma4", "Gemma4TextRotaryEmbedding"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3RotaryEmbedding"),
    "gpt_oss": ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssRotaryEmbedding"),
}


# ---------------------------------------------------------------------------------------------
# Capturing what transformers says (logging + python warnings)
# ---------------------------------------------------------------------------------------------
class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


_HANDLER = _ListHandler()
hf_logging.set_verbosity_warning()
hf_logging.disable_default_handler()  # keep stderr quiet; we record instead
logging.getLogger("transformers").addHandler(_HANDLER)


class Capture:
    """Collects transformers' logger warnings and python warnings raised inside the block."""

    def __enter__(self):
        hf_logging.warning_once.cache_clear()  # `warning_once` is lru_cached: make every case see its own
        _HANDLER.records = []
        self._wctx = warnings.catch_warnings(record=True)
        self._wlist = self._wctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._wctx.__exit__(*exc)
        self.messages = list(_HANDLER.records) + [
            f"{w.category.__name__}: {w.message}" for w in self._wlist
        ]
        return False


# ---------------------------------------------------------------------------------------------
# Building configs and computing with transformers
# ---------------------------------------------------------------------------------------------
def build_config(config):
    d = copy.deepcopy(config)  # transformers mutates the dicts it is given
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def _rope_dict(cfg, layer_type):
    rp = cfg.rope_parameters
    return rp if layer_type is None else rp[layer_type]


def _rotary_module(cfg, model_type):
    import importlib

    mod_name, cls_name = ROTARY_CLASSES[model_type]
    cls = getattr(importlib.import_module(mod_name), cls_name)
    return cls(cfg)


def _module_buffers(module, layer_type):
    prefix = "" if layer_type is None else f"{layer_type}_"
    inv = getattr(module, f"{prefix}inv_freq")
    att = getattr(module, f"{prefix}attention_scaling") if layer_type is not None else module.attention_scaling
    return inv, att


def compute(config, layer_type=None, seq_len=None):
    """Returns (inv_freq tensor, attention_factor, resolved rope dict, rope_type)."""
    model_type = config["model_type"]
    cfg = build_config(config)
    rope_type = _rope_dict(cfg, layer_type)["rope_type"]
    if rope_type == "default":
        # The default path is each model's RotaryEmbedding.compute_default_rope_parameters, called by
        # the module's __init__ (with the per-layer config for heterogeneous models such as gemma4).
        module = _rotary_module(cfg, model_type)
        inv, att = _module_buffers(module, layer_type)
        inv = inv.clone()
    else:
        fn = ROPE_INIT_FUNCTIONS[rope_type]
        inv, att = fn(cfg, None, seq_len=seq_len, layer_type=layer_type)
    resolved = copy.deepcopy(_rope_dict(cfg, layer_type))
    return inv, float(att), resolved, rope_type


def _cross_check(config, layer_type, seq_len, rope_type, inv, att):
    """Checks the init-function call against what the model's RotaryEmbedding module holds."""
    model_type = config["model_type"]
    if model_type not in ROTARY_CLASSES:
        return
    cfg = build_config(config)
    module = _rotary_module(cfg, model_type)
    if seq_len is None:
        m_inv, m_att = _module_buffers(module, layer_type)
    elif rope_type in ("dynamic", "longrope"):
        # The model derives seq_len = max(position_ids) + 1 inside `dynamic_rope_update`.
        x = torch.zeros(1, dtype=torch.float32)
        pos = torch.arange(seq_len)[None, :]
        with torch.no_grad():
            if layer_type is None:
                module(x, pos)
            else:
                module(x, pos, layer_type)
        m_inv, m_att = _module_buffers(module, layer_type)
    else:
        return
    assert torch.equal(m_inv, inv), (config, layer_type, seq_len, m_inv, inv)
    assert float(m_att) == float(att), (config, layer_type, seq_len, m_att, att)


def rotary_dim_of(inv):
    return 2 * int(inv.numel())


# ---------------------------------------------------------------------------------------------
# Case definitions
# ---------------------------------------------------------------------------------------------
def llama(rope=None, legacy=None, max_pos=4096, hidden=4096, heads=32, head_dim=128, **extra):
    """An explicit LlamaConfig dict; `rope` -> v5 `rope_parameters`, `legacy` -> `rope_scaling`."""
    d = {"model_type": "llama", "hidden_size": hidden, "num_attention_heads": heads}
    if head_dim is not None:
        d["head_dim"] = head_dim
    d["max_position_embeddings"] = max_pos
    if rope is not None:
        d["rope_parameters"] = rope
    if legacy is not None:
        d["rope_scaling"] = legacy
    d.update(extra)
    return d


def case(name, config, layer_type=None, seq_len=None, note=None):
    c = {"name": name, "config": config, "layer_type": layer_type, "seq_len": seq_len}
    if note:
        c["note"] = note
    return c


YARN4 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": PHI3_SHORT_FACTOR,
    "long_factor": PHI3_LONG_FACTOR,
    "original_max_position_embeddings": 4096,
}
LLAMA3_META = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]


def gemma3(**extra):
    d = {
        "model_type": "gemma3_text",
        "hidden_size": 1024,
        "num_attention_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "num_hidden_layers": 6,
        "layer_types": GEMMA3_LAYERS,
    }
    d.update(extra)
    return d


def golden_cases():
    C = []
    # ---- default ----
    C.append(case("default_v5", llama({"rope_type": "default", "rope_theta": 10000.0})))
    C.append(case("default_top_level_rope_theta_only", llama(rope_theta=500000.0),
                  note="no rope dict at all: rope_parameters = {rope_type: default, rope_theta: top-level}"))
    C.append(case("default_no_rope_theta_anywhere", llama(),
                  note="rope_theta omitted everywhere -> config class default_theta (10000 for llama)"))
    C.append(case("default_head_dim_derived", llama({"rope_type": "default", "rope_theta": 10000.0},
                                                    hidden=2048, heads=16, head_dim=None),
                  note="head_dim absent -> hidden_size // num_attention_heads = 128"))
    C.append(case("default_head_dim_explicit_differs", llama({"rope_type": "default", "rope_theta": 10000.0},
                                                             hidden=2048, heads=16, head_dim=64),
                  note="explicit head_dim 64 wins over hidden/heads = 128"))
    C.append(case("default_rope_theta_inside_beats_top_level",
                  llama({"rope_type": "default", "rope_theta": 1000000.0}, rope_theta=10000.0),
                  note="rope_parameters['rope_theta'] wins; the top-level value is only a setdefault"))
    C.append(case("default_llama_ignores_partial_rotary_factor",
                  llama({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
                  note="TRAP: LlamaRotaryEmbedding.compute_default_rope_parameters ignores partial_rotary_factor "
                       "(full head_dim rotated); models with partial rotary (phi, stablelm, gpt_neox, phi3...) honour it"))
    C.append(case("default_phi_partial_0_5_class_default",
                  {"model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32, "head_dim": 80,
                   "max_position_embeddings": 2048, "rope_theta": 10000.0},
                  note="PhiConfig sets partial_rotary_factor=0.5 by default -> rotary dim 40"))
    C.append(case("default_stablelm_partial_0_25",
                  {"model_type": "stablelm", "hidden_size": 2560, "num_attention_heads": 32, "head_dim": 80,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                  note="rotary dim = int(80 * 0.25) = 20; exponent 2j/20"))
    # ---- linear ----
    C.append(case("linear_v5", llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})))
    C.append(case("linear_legacy_type_key", llama(legacy={"type": "linear", "factor": 4.0}, rope_theta=10000.0),
                  note="legacy rope_scaling with `type` instead of `rope_type`: same result as linear_v5"))
    C.append(case("linear_partial_odd_rotary_dim",
                  llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.25},
                        hidden=1600, heads=16, head_dim=100),
                  note="dim = int(100*0.25) = 25 (odd): arange(0,25,2) -> 13 frequencies, exponent 2j/25"))
    C.append(case("legacy_rope_scaling_beats_rope_parameters",
                  llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                        legacy={"rope_type": "linear", "factor": 8.0}, rope_theta=10000.0),
                  note="TRAP: when both are given, `rope_scaling` replaces `rope_parameters` entirely (factor 8 used)"))
    # ---- dynamic ----
    dyn = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    C.append(case("dynamic_seq_len_none", llama(dyn), None, None,
                  note="seq_len None -> max_position_embeddings -> bracket 1 -> plain frequencies"))
    C.append(case("dynamic_seq_len_below", llama(dyn), None, 2048, note="clamped up to max_position_embeddings"))
    C.append(case("dynamic_seq_len_equal", llama(dyn), None, 4096))
    C.append(case("dynamic_seq_len_above", llama(dyn), None, 8192,
                  note="base' = 10000 * (2*8192/4096 - 1)^(128/126) = 30527.74"))
    C.append(case("dynamic_legacy_type_key_above", llama(legacy={"type": "dynamic", "factor": 4.0}, rope_theta=10000.0),
                  None, 10000))
    C.append(case("dynamic_partial_0_25_above",
                  llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.25}),
                  None, 8192, note="dim = 32: base' = base * 3^(32/30)"))
    # ---- yarn ----
    C.append(case("yarn_truncate_default_true", llama(YARN4, max_pos=16384)))
    C.append(case("yarn_truncate_false", llama(dict(YARN4, truncate=False), max_pos=16384)))
    C.append(case("yarn_legacy_rope_scaling_type_key",
                  llama(legacy={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
                        rope_theta=10000.0, max_pos=16384),
                  note="same values as yarn_truncate_default_true"))
    C.append(case("yarn_mscale_and_mscale_all_dim",
                  llama(dict(YARN4, factor=40.0, mscale=1.0, mscale_all_dim=0.5), max_pos=163840),
                  note="attention_factor = (0.1*1.0*ln40+1)/(0.1*0.5*ln40+1)"))
    C.append(case("yarn_mscale_equal_mscale_all_dim",
                  llama(dict(YARN4, factor=40.0, mscale=0.707, mscale_all_dim=0.707), max_pos=163840),
                  note="equal mscales -> attention_factor exactly 1.0 (DeepSeek-V2 style)"))
    C.append(case("yarn_mscale_without_mscale_all_dim",
                  llama(dict(YARN4, factor=40.0, mscale=0.707), max_pos=163840),
                  note="TRAP: mscale alone is ignored (`if mscale and mscale_all_dim`) -> 0.1*ln(40)+1"))
    C.append(case("yarn_explicit_attention_factor_1",
                  llama(dict(YARN4, attention_factor=1.0), max_pos=16384), note="explicit 1.0 wins"))
    C.append(case("yarn_beta_fast_beta_slow_given",
                  llama(dict(YARN4, beta_fast=16.0, beta_slow=2.0), max_pos=16384)))
    C.append(case("yarn_partial_rotary_0_5",
                  llama(dict(YARN4, partial_rotary_factor=0.5), max_pos=16384),
                  note="dim = 64 everywhere (frequencies, correction range, clamp high <= dim-1)"))
    C.append(case("yarn_partial_rotary_top_level_0_25",
                  llama(YARN4, max_pos=16384, partial_rotary_factor=0.25),
                  note="top-level partial_rotary_factor is moved into rope_parameters (setdefault)"))
    C.append(case("yarn_head_dim_explicit_64",
                  llama(YARN4, max_pos=16384, hidden=4096, heads=32, head_dim=64),
                  note="explicit head_dim 64 (hidden/heads would be 128)"))
    C.append(case("yarn_factor_null_derived_from_max_pos",
                  llama(dict(YARN4, factor=None), max_pos=32768),
                  note="factor key present but null -> factor = max_position_embeddings / original = 8 "
                       "(key absent is a KeyError instead); warns"))
    C.append(case("yarn_original_inside_mismatch_uses_explicit_factor",
                  llama(dict(YARN4, original_max_position_embeddings=2048), max_pos=16384),
                  note="max_pos/original = 8 != factor 4: warns, but factor 4 is used (with L0 = 2048)"))
    C.append(case("yarn_original_top_level_only",
                  llama(legacy={"rope_type": "yarn", "factor": 4.0}, rope_theta=10000.0, max_pos=8192,
                        original_max_position_embeddings=2048),
                  note="TRAP: top-level original_max_position_embeddings (2048) is used for L0 at compute time; "
                       "factor stays 4.0 (not 8192/2048); at validation time L0 was still max_pos"))
    C.append(case("yarn_original_top_level_beats_inside",
                  llama(legacy={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
                        rope_theta=10000.0, max_pos=16384, original_max_position_embeddings=2048),
                  note="TRAP: top-level 2048 overrides the 4096 inside rope_scaling at compute time"))
    C.append(case("yarn_original_absent_defaults_to_max_pos",
                  llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}, max_pos=4096),
                  note="original_max_position_embeddings absent -> max_position_embeddings (4096)"))
    C.append(case("yarn_factor_1",
                  llama(dict(YARN4, factor=1.0), max_pos=4096),
                  note="factor 1: attention_factor 1.0 (get_mscale(s<=1) = 1) and inv_freq = theta"))
    # ---- longrope ----
    lr_cfg = llama(LONGROPE, max_pos=131072, hidden=3072, heads=32, head_dim=96)
    C.append(case("longrope_seq_len_none_short", lr_cfg, None, None,
                  note="seq_len None -> short_factor; factor derived 131072/4096 = 32 -> sqrt(1+ln32/ln4096)"))
    C.append(case("longrope_short_seq_len_equal_original", lr_cfg, None, 4096, note="seq_len <= original -> short"))
    C.append(case("longrope_long_seq_len_original_plus_1", lr_cfg, None, 4097, note="seq_len > original -> long"))
    C.append(case("longrope_long_seq_len_131072", lr_cfg, None, 131072))
    C.append(case("longrope_explicit_attention_factor",
                  llama(dict(LONGROPE, attention_factor=1.5), max_pos=131072, hidden=3072, heads=32, head_dim=96),
                  None, 131072))
    C.append(case("longrope_explicit_factor_16",
                  llama(dict(LONGROPE, factor=16.0), max_pos=131072, hidden=3072, heads=32, head_dim=96),
                  None, 131072, note="explicit factor (16) beats max_pos/original (32) for the attention factor"))
    C.append(case("longrope_max_pos_equal_original",
                  llama(LONGROPE, max_pos=4096, hidden=3072, heads=32, head_dim=96), None, 4096,
                  note="derived factor 1 -> attention_factor 1.0"))
    C.append(case("longrope_partial_rotary_0_5",
                  llama(dict(LONGROPE, short_factor=HALF_SHORT, long_factor=HALF_LONG, partial_rotary_factor=0.5),
                        max_pos=131072, hidden=3072, heads=32, head_dim=96), None, 8192,
                  note="dim 48 -> 24-entry factor lists"))
    C.append(case("longrope_phi3_legacy_yarn_type",
                  {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
                   "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                   "rope_theta": 10000.0,
                   "rope_scaling": {"type": "yarn", "short_factor": PHI3_SHORT_FACTOR,
                                    "long_factor": PHI3_LONG_FACTOR}},
                  None, 8192, note="Phi3Config maps legacy type 'yarn' (and 'su', which then fails, see errors) "
                                   "to 'longrope'"))
    C.append(case("longrope_phi3_inner_original_overridden",
                  {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
                   "max_position_embeddings": 131072, "rope_theta": 10000.0,
                   "rope_scaling": {"type": "longrope", "short_factor": PHI3_SHORT_FACTOR,
                                    "long_factor": PHI3_LONG_FACTOR, "original_max_position_embeddings": 8192}},
                  None, 6000,
                  note="TRAP: Phi3Config has a top-level original_max_position_embeddings field defaulting to 4096 "
                       "that overrides the 8192 inside rope_scaling: seq_len 6000 > 4096 -> long factors, "
                       "attention factor uses 131072/4096"))
    # ---- llama3 ----
    C.append(case("llama3_meta", llama(LLAMA3_META, max_pos=131072),
                  note="blended band is pairs 29..34; from 35 on theta/8"))
    C.append(case("llama3_legacy_rope_scaling", llama(legacy={k: v for k, v in LLAMA3_META.items() if k != "rope_theta"},
                                                      rope_theta=500000.0, max_pos=131072),
                  note="as shipped in Llama-3.1 config.json: same values as llama3_meta"))
    C.append(case("llama3_llama3_2_factor_32",
                  llama(dict(LLAMA3_META, factor=32.0), max_pos=131072, hidden=2048, heads=32, head_dim=64),
                  note="Llama 3.2 1B style: factor 32, head_dim 64"))
    C.append(case("llama3_inverted_low_high_only_warns",
                  llama(dict(LLAMA3_META, low_freq_factor=4.0, high_freq_factor=1.0), max_pos=131072),
                  note="low/high inverted: only a warning; the blend band is empty (wavelen > L0/4 -> theta/8, else theta)"))
    # ---- proportional ----
    C.append(case("proportional_0_25",
                  llama({"rope_type": "proportional", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25}),
                  note="head_dim/2 = 64 entries: first int(0.25*128//2) = 16 are base^(-2j/head_dim) "
                       "(denominator head_dim, not rotary dim), the other 48 are 0.0"))
    C.append(case("proportional_0_25_factor_2",
                  llama({"rope_type": "proportional", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25,
                         "factor": 2.0}),
                  note="`factor` divides every entry (and is reported as an unrecognized key by validation)"))
    C.append(case("proportional_no_partial_equals_plain",
                  llama({"rope_type": "proportional", "rope_theta": 10000.0}),
                  note="partial_rotary_factor missing -> 1.0 -> plain RoPE; warns"))
    # ---- nested per-layer-type rope_parameters ----
    g3 = gemma3(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    })
    C.append(case("nested_gemma3_full_attention", g3, "full_attention"))
    C.append(case("nested_gemma3_sliding_attention", g3, "sliding_attention"))
    g3_legacy = gemma3(rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling={"rope_type": "linear", "factor": 8.0})
    C.append(case("nested_gemma3_legacy_full_attention", g3_legacy, "full_attention",
                  note="gemma3 legacy: rope_theta -> full_attention, rope_local_base_freq -> sliding_attention, "
                       "rope_scaling merged into full_attention only"))
    C.append(case("nested_gemma3_legacy_sliding_attention", g3_legacy, "sliding_attention"))
    g3_yarn_true = gemma3(rope_parameters={
        "full_attention": dict(YARN4, rope_theta=1000000.0, original_max_position_embeddings=32768),
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    })
    g3_yarn_false = copy.deepcopy(g3_yarn_true)
    g3_yarn_false["rope_parameters"]["full_attention"]["truncate"] = False
    C.append(case("nested_yarn_truncate_default_full_attention", g3_yarn_true, "full_attention"))
    C.append(case("nested_yarn_truncate_false_is_ignored", g3_yarn_false, "full_attention",
                  note="TRAP (transformers bug): yarn reads `truncate` from the top-level config.rope_parameters, "
                       "not the per-layer dict, so nested truncate=false is ignored: identical to "
                       "nested_yarn_truncate_default_full_attention"))
    g3_dyn = gemma3(rope_parameters={
        "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }, max_position_embeddings=32768)
    C.append(case("nested_dynamic_full_attention_above", g3_dyn, "full_attention", 65536))
    C.append(case("nested_keys_without_layer_types_treated_as_flat",
                  llama({"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
                        rope_theta=10000.0),
                  note="TRAP: LlamaConfig has no layer_types, so the dict is flat: default rope with the top-level "
                       "theta; 'full_attention' is reported as an unrecognized key"))
    g4 = {"model_type": "gemma4_text", "hidden_size": 1024, "num_attention_heads": 8, "head_dim": 128,
          "global_head_dim": 256, "max_position_embeddings": 131072, "num_hidden_layers": 6,
          "layer_types": GEMMA3_LAYERS,
          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                 "rope_theta": 1000000.0}}}
    C.append(case("nested_gemma4_proportional_full_attention", g4, "full_attention",
                  note="gemma4: full-attention layers use global_head_dim 256 (per-layer config): 128 entries, "
                       "32 nonzero base^(-2j/256)"))
    C.append(case("nested_gemma4_default_sliding_attention", g4, "sliding_attention"))
    return C


def golden_errors():
    """(name, config, stage, layer_type, seq_len). stage 'config' = config construction raises;
    stage 'init' = the config builds (maybe with warnings) but the rope init function raises."""
    E = []
    E.append(("linear_missing_factor", llama({"rope_type": "linear", "rope_theta": 10000.0}), "config", None, None))
    E.append(("dynamic_missing_factor", llama({"rope_type": "dynamic", "rope_theta": 10000.0}), "config", None, None))
    E.append(("yarn_missing_factor", llama({"rope_type": "yarn", "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 4096}, max_pos=16384),
              "config", None, None))
    E.append(("yarn_missing_factor_legacy_type_key",
              llama(legacy={"type": "yarn", "original_max_position_embeddings": 4096}, rope_theta=10000.0,
                    max_pos=16384), "config", None, None))
    E.append(("longrope_missing_long_factor",
              llama({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_SHORT_FACTOR,
                     "original_max_position_embeddings": 4096}, max_pos=131072, hidden=3072, heads=32, head_dim=96),
              "config", None, None))
    E.append(("llama3_missing_low_freq_factor",
              llama({k: v for k, v in LLAMA3_META.items() if k != "low_freq_factor"}, max_pos=131072),
              "config", None, None))
    E.append(("llama3_missing_factor",
              llama({k: v for k, v in LLAMA3_META.items() if k != "factor"}, max_pos=131072), "config", None, None))
    E.append(("odd_head_dim_full_rotary", llama({"rope_type": "default", "rope_theta": 10000.0},
                                                hidden=2080, heads=32, head_dim=65), "config", None, None))
    E.append(("phi3_short_factor_wrong_length",
              {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
               "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
               "rope_scaling": {"type": "longrope", "short_factor": PHI3_SHORT_FACTOR[:47],
                                "long_factor": PHI3_LONG_FACTOR}}, "config", None, None))
    E.append(("phi3_legacy_su_type_missing_original",
              {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
               "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
               "rope_scaling": {"type": "su", "short_factor": PHI3_SHORT_FACTOR, "long_factor": PHI3_LONG_FACTOR}},
              "config", None, None))
    E.append(("phi3_rope_type_linear_rejected",
              {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
               "max_position_embeddings": 8192, "rope_theta": 10000.0,
               "rope_scaling": {"type": "linear", "factor": 2.0}}, "config", None, None))
    E.append(("unknown_rope_type", llama({"rope_type": "ntk_mixed", "rope_theta": 10000.0, "factor": 4.0}),
              "init", None, None))
    E.append(("longrope_factor_list_wrong_length_llama",
              llama(dict(LONGROPE, short_factor=PHI3_SHORT_FACTOR[:40], long_factor=PHI3_LONG_FACTOR[:40]),
                    max_pos=131072, hidden=3072, heads=32, head_dim=96), "init", None, 4096))
    E.append(("dynamic_rotary_dim_2_division_by_zero",
              llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, hidden=64, heads=32, head_dim=2),
              "init", None, 8192))
    return E


def golden_warnings():
    """(name, config, layer_type, seq_len): configs transformers accepts with a warning.  The values it then
    computes are recorded too (when the rope init function succeeds)."""
    W = []
    W.append(("default_unknown_key", llama({"rope_type": "default", "rope_theta": 10000.0, "foo": 1.0}), None, None))
    W.append(("yarn_unknown_key", llama(dict(YARN4, low_freq_factor=1.0), max_pos=16384), None, None))
    W.append(("linear_factor_below_1", llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 0.5}),
              None, None))
    W.append(("dynamic_factor_below_1", llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 0.5}),
              None, 8192))
    W.append(("yarn_factor_below_1", llama(dict(YARN4, factor=0.5), max_pos=2048), None, None))
    W.append(("yarn_factor_mismatch_implicit", llama(YARN4, max_pos=32768), None, None))
    W.append(("yarn_beta_fast_below_beta_slow", llama(dict(YARN4, beta_fast=1.0, beta_slow=32.0), max_pos=16384),
              None, None))
    W.append(("yarn_attention_factor_int", llama(dict(YARN4, attention_factor=1), max_pos=16384), None, None))
    W.append(("yarn_factor_null", llama(dict(YARN4, factor=None), max_pos=32768), None, None))
    W.append(("dynamic_original_max_pos_is_unrecognized_and_ignored",
              llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0,
                     "original_max_position_embeddings": 2048}, max_pos=4096), None, 8192))
    W.append(("longrope_factor_absent_phi3_style", llama(LONGROPE, max_pos=131072, hidden=3072, heads=32, head_dim=96),
              None, None))
    W.append(("longrope_factor_below_1",
              llama(dict(LONGROPE, factor=0.5), max_pos=131072, hidden=3072, heads=32, head_dim=96), None, None))
    W.append(("longrope_list_wrong_length_config_only_warns",
              llama(dict(LONGROPE, short_factor=[1.0], long_factor=[4.0]),
                    max_pos=131072, hidden=3072, heads=32, head_dim=96), None, 8192))
    W.append(("llama3_low_high_inverted",
              llama(dict(LLAMA3_META, low_freq_factor=4.0, high_freq_factor=1.0), max_pos=131072), None, None))
    W.append(("llama3_low_equals_high",
              llama(dict(LLAMA3_META, low_freq_factor=2.0, high_freq_factor=2.0), max_pos=131072), None, None))
    W.append(("llama3_original_not_below_max_pos", llama(LLAMA3_META, max_pos=8192), None, None))
    W.append(("llama3_original_float", llama(dict(LLAMA3_META, original_max_position_embeddings=8192.0),
                                             max_pos=131072), None, None))
    W.append(("unknown_rope_type_config_only_warns",
              llama({"rope_type": "ntk_mixed", "rope_theta": 10000.0, "factor": 4.0}), None, None))
    W.append(("proportional_without_partial_rotary_factor",
              llama({"rope_type": "proportional", "rope_theta": 10000.0}), None, None))
    W.append(("nested_keys_without_layer_types",
              llama({"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
                    rope_theta=10000.0), None, None))
    return W


# ---------------------------------------------------------------------------------------------
# Real model configs (RoPE-relevant fields of the public config.json files)
# ---------------------------------------------------------------------------------------------
def model_configs():
    return {
        "llama3_1_8b": {
            "model_type": "llama",
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
        },
        "qwen2_5_7b_instruct_yarn": {
            "model_type": "qwen2",
            "hidden_size": 3584,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
        },
        "deepseek_v3": {
            "model_type": "deepseek_v3",
            "hidden_size": 7168,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "max_position_embeddings": 163840,
            "rope_theta": 10000,
            "rope_scaling": {
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 40,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
                "type": "yarn",
            },
        },
        "phi3_mini_128k_instruct": {
            "model_type": "phi3",
            "hidden_size": 3072,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "long_factor": PHI3_LONG_FACTOR,
                "short_factor": PHI3_SHORT_FACTOR,
                "type": "longrope",
            },
        },
        "gpt_oss_20b": {
            "model_type": "gpt_oss",
            "hidden_size": 2880,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "rope_theta": 150000,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
        },
    }


MODEL_NOTES = {
    "llama3_1_8b": "meta-llama/Llama-3.1-8B(-Instruct) config.json RoPE fields; LlamaConfig.",
    "qwen2_5_7b_instruct_yarn": "Qwen/Qwen2.5-7B-Instruct config.json plus the rope_scaling block its model card "
                                "documents for >32K (YaRN factor 4, original 32768; max_position_embeddings left at "
                                "32768 as the card says, so implicit factor = 1 and no mismatch warning); Qwen2Config.",
    "deepseek_v3": "deepseek-ai/DeepSeek-V3 config.json RoPE fields; DeepseekV3Config. There is no head_dim key: "
                   "DeepseekV3Config.__post_init__ sets head_dim = qk_rope_head_dim (64) (a head_dim given in the "
                   "dict would be overwritten), so the rotary dim is 64 although hidden/heads = 56. "
                   "mscale == mscale_all_dim -> rope attention_factor 1.0; the model instead multiplies the softmax "
                   "scale (qk_head_dim=192)^-0.5 by get_mscale(factor, mscale_all_dim)^2 = (0.1*ln40+1)^2 in "
                   "DeepseekV3Attention (yarn_apply_mscale). rope_interleave defaults to True (interleaved pairs).",
    "phi3_mini_128k_instruct": "microsoft/Phi-3-mini-128k-instruct config.json RoPE fields; Phi3Config. The 48-entry "
                               "long/short factor lists were written from memory of the public config and "
                               "cross-checked against two public copies of those values (not fetched from the Hub); "
                               "they should be exact but are not guaranteed to be the Hub's current revision.",
    "gpt_oss_20b": "openai/gpt-oss-20b config.json RoPE fields; GptOssConfig. gpt-oss applies RoPE without "
                   "cat(freqs,freqs): cos/sin have head_dim/2 entries and the rotation is on (first half, second "
                   "half) chunks, i.e. the same half-split pairing as rotate_half.",
}


def model_cases():
    cfgs = model_configs()
    M = [
        ("llama3_1_8b", "llama3_1_8b", None),
        ("qwen2_5_7b_instruct_yarn", "qwen2_5_7b_instruct_yarn", None),
        ("deepseek_v3", "deepseek_v3", None),
        ("phi3_mini_128k_instruct_short", "phi3_mini_128k_instruct", 4096),
        ("phi3_mini_128k_instruct_long", "phi3_mini_128k_instruct", 131072),
        ("gpt_oss_20b", "gpt_oss_20b", None),
    ]
    out = []
    for name, cfg_name, seq_len in M:
        c = case(name, cfgs[cfg_name], None, seq_len, note=MODEL_NOTES[cfg_name])
        c["config_file"] = f"configs/{cfg_name}.json"
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def run_case(c):
    config_json = copy.deepcopy(c["config"])
    with Capture() as cap:
        inv, att, resolved, rope_type = compute(c["config"], c["layer_type"], c["seq_len"])
    if rope_type != "default":
        _cross_check(c["config"], c["layer_type"], c["seq_len"], rope_type, inv, att)
    out = {
        "name": c["name"],
        "config": config_json,
        "layer_type": c["layer_type"],
        "seq_len": c["seq_len"],
        "inv_freq": [float(x) for x in inv.tolist()],
        "attention_factor": att,
        "rope_type": rope_type,
        "rotary_dim": rotary_dim_of(inv),
        "resolved_rope_parameters": resolved,
        "warnings": cap.messages,
    }
    for k in ("note", "config_file"):
        if k in c:
            out[k] = c[k]
    return out


def run_error(name, config, stage, layer_type, seq_len):
    config_json = copy.deepcopy(config)
    try:
        with Capture() as cap:
            if stage == "config":
                build_config(config)
            else:
                compute(config, layer_type, seq_len)
    except Exception as e:  # noqa: BLE001 - we record whatever transformers raised
        err = e
    else:
        raise AssertionError(f"error case {name!r} did not raise")
    config_warnings = cap.messages
    cause = err.__cause__ if err.__cause__ is not None else None
    out = {
        "name": name,
        "config": config_json,
        "message": str(err),
        "exception_type": type(err).__name__,
        "stage": stage,
        "layer_type": layer_type,
        "seq_len": seq_len,
    }
    if cause is not None:
        out["cause_type"] = type(cause).__name__
        out["cause_message"] = str(cause)
    if stage == "init":
        out["config_warnings"] = config_warnings
    return out


def run_warning(name, config, layer_type, seq_len):
    config_json = copy.deepcopy(config)
    with Capture() as cap:
        build_config(config)
    config_msgs = cap.messages
    assert config_msgs, f"warning case {name!r} produced no warning at config time"
    out = {
        "name": name,
        "config": config_json,
        "message": "\n".join(config_msgs),
        "messages": config_msgs,
        "layer_type": layer_type,
        "seq_len": seq_len,
    }
    try:
        with Capture() as cap2:
            inv, att, resolved, rope_type = compute(config, layer_type, seq_len)
        out["inv_freq"] = [float(x) for x in inv.tolist()]
        out["attention_factor"] = att
        out["rope_type"] = rope_type
        out["rotary_dim"] = rotary_dim_of(inv)
        out["resolved_rope_parameters"] = resolved
    except Exception as e:  # noqa: BLE001
        out["init_error"] = f"{type(e).__name__}: {e}"
    return out


def _sanity_checks(golden):
    """A few values from ROPE_MATH.md section 5, to catch a broken environment early."""
    by = {c["name"]: c for c in golden["cases"]}
    yt = by["yarn_truncate_default_true"]
    assert abs(yt["inv_freq"][30] - 0.0094885179) < 1e-9, yt["inv_freq"][30]
    assert abs(yt["attention_factor"] - 1.1386294) < 1e-7
    yf = by["yarn_truncate_false"]
    assert abs(yf["inv_freq"][30] - 0.0095744612) < 1e-9, yf["inv_freq"][30]
    lr = by["longrope_long_seq_len_131072"]
    assert abs(lr["attention_factor"] - 1.19024) < 1e-5
    l3 = by["llama3_meta"]
    theta = [500000.0 ** (-2 * j / 128) for j in range(64)]
    ratios = [theta[j] / l3["inv_freq"][j] for j in range(64)]
    blended = [j for j in range(64) if 1.0001 < ratios[j] < 7.999]
    assert blended == list(range(29, 35)), blended
    assert by["nested_yarn_truncate_false_is_ignored"]["inv_freq"] == \
        by["nested_yarn_truncate_default_full_attention"]["inv_freq"]
    assert by["yarn_truncate_false"]["inv_freq"] != by["yarn_truncate_default_true"]["inv_freq"]
    dyn = by["dynamic_seq_len_above"]
    base2 = 10000.0 * 3.0 ** (128 / 126)
    assert abs(base2 - 30527.74) < 0.01
    assert abs(dyn["inv_freq"][1] - base2 ** (-2 / 128)) < 1e-6


def _dump(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")


def main():
    header = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    note = (
        "Computed by tools/hf_golden.py with transformers itself on CPU: config object = "
        "AutoConfig.for_model(model_type, **config) (the model's own config class); inv_freq/attention_factor = "
        "ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len, layer_type=layer_type) for scaled types, "
        "and the model's RotaryEmbedding module buffers for rope_type 'default'. transformers computes inv_freq in "
        "float32 (exponent arange(0,dim,2)/dim in f32, base**exponent in f32, then 1/x or blends in f32); values "
        "here are those f32 numbers converted exactly to Python floats. attention_factor is a Python (f64) float. "
        "Every scaled value was cross-checked against the RotaryEmbedding module (init buffers; for dynamic/"
        "longrope with seq_len, after forward() over position_ids 0..seq_len-1). Extra fields beyond the required "
        "ones: rope_type, rotary_dim, resolved_rope_parameters (dict after transformers' standardization), "
        "warnings (messages logged while building/computing), note; errors carry exception_type, stage "
        "('config' = constructing the config raises, 'init' = config builds but the rope init function raises), "
        "cause_*; warnings carry messages (list) and the values computed despite the warning."
    )
    cases = [run_case(c) for c in golden_cases()]
    errors = [run_error(*e) for e in golden_errors()]
    warns = [run_warning(*w) for w in golden_warnings()]
    golden = dict(header, note=note, cases=cases, errors=errors, warnings=warns)
    _sanity_checks(golden)
    _dump(golden, os.path.join(DATA, "hf_golden.json"))

    models = dict(header, note=note + " Configs are the RoPE-relevant fields of public config.json files.",
                  cases=[run_case(c) for c in model_cases()], errors=[], warnings=[])
    _dump(models, os.path.join(DATA, "hf_models.json"))
    for name, cfg in model_configs().items():
        _dump(cfg, os.path.join(DATA, "configs", f"{name}.json"))
    print(f"wrote {len(cases)} cases, {len(errors)} errors, {len(warns)} warnings to tests/data/hf_golden.json; "
          f"{len(models['cases'])} model cases to tests/data/hf_models.json", file=sys.stderr)


if __name__ == "__main__":
    main()
