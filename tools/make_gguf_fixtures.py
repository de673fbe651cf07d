#!/usr/bin/env python3
"""Writes the tiny GGUF fixtures of tests/gguf.rs with the PyPI `gguf` package.

    pip install gguf numpy
    python3 tools/make_gguf_fixtures.py            # writes tests/data/gguf/

Every file is a few KB. For each rope fixture the script also writes the Hugging Face
config.json of the same model, so the test can check that ropex's config reader and its
GGUF reader give the same frequencies. `expected.json` holds, per file, the metadata
values written (with their GGUF value types), the tensor index, and for the tensor
fixture the dequantised values from gguf-py's own `gguf.quants.dequantize`.

Rope metadata is written the way llama.cpp's converter writes it (`{arch}.rope.*` keys,
f32 floats, Llama 3.1's `rope_freqs` tensor of per-pair divisors in float32).
"""

import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gguf"
EXPECTED = {}


def value_json(vtype, value, sub=None):
    """The JSON form tests/gguf.rs reads back: {"type": name, "value": ...}."""
    if vtype == T.ARRAY:
        items = []
        for v in value:
            st = sub if sub is not None else gguf.GGUFValueType.get_type(v)
            items.append(value_json(st, v))
        return {"type": "array", "value": items}
    name = vtype.name.lower()
    if vtype in (T.FLOAT32,):
        value = float(np.float32(value))
    return {"type": name, "value": value}


class Writer:
    """A GGUFWriter that remembers what it wrote for expected.json."""

    def __init__(self, name, arch, alignment=None):
        self.name = name
        self.path = OUT / f"{name}.gguf"
        self.w = gguf.GGUFWriter(str(self.path), arch)
        if alignment is not None:
            self.w.data_alignment = alignment
            self.w.add_uint32("general.alignment", alignment)
        self.meta = {"general.architecture": {"type": "string", "value": arch}}
        if alignment is not None:
            self.meta["general.alignment"] = {"type": "uint32", "value": alignment}
        self.tensors = {}

    def kv(self, key, value, vtype, sub=None):
        self.w.add_key_value(key, value, vtype, sub)
        self.meta[key] = value_json(vtype, value, sub)

    def tensor(self, name, array, raw_dtype=None, shape=None):
        if raw_dtype is None:
            self.w.add_tensor(name, array)
            qtype = {np.dtype(np.float32): Q.F32, np.dtype(np.float16): Q.F16}[array.dtype]
            shape = list(array.shape)
        else:
            self.w.add_tensor(name, array, raw_dtype=raw_dtype)
            qtype = raw_dtype
        # GGUF lists dims fastest-first: the reverse of numpy's shape.
        self.tensors[name] = {"type": qtype.name, "dims": list(reversed(shape))}

    def close(self, version=None):
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()
        if version is not None:
            # gguf-py writes v3; v2 has the same layout (v3 only added big-endian files),
            # so a v2 file is the same bytes with the version field set to 2.
            data = bytearray(self.path.read_bytes())
            data[4:8] = struct.pack("<I", version)
            self.path.write_bytes(bytes(data))
        # Offsets as gguf-py's own reader sees them: an independent parse of the file.
        reader = gguf.GGUFReader(str(self.path))
        for t in reader.tensors:
            self.tensors[t.name]["data_offset"] = int(t.data_offset)
        EXPECTED[self.name] = {
            "version": version or 3,
            "alignment": int(reader.alignment),
            "data_offset": int(reader.data_offset),
            "file_len": self.path.stat().st_size,
            "metadata": self.meta,
            "tensors": self.tensors,
        }


def llama_family(w, arch, *, n_embd, n_head, n_head_kv, ctx, base, rot=None):
    w.kv(f"{arch}.context_length", ctx, T.UINT32)
    w.kv(f"{arch}.embedding_length", n_embd, T.UINT32)
    w.kv(f"{arch}.block_count", 1, T.UINT32)
    w.kv(f"{arch}.attention.head_count", n_head, T.UINT32)
    w.kv(f"{arch}.attention.head_count_kv", n_head_kv, T.UINT32)
    w.kv(f"{arch}.rope.freq_base", base, T.FLOAT32)
    if rot is not None:
        w.kv(f"{arch}.rope.dimension_count", rot, T.UINT32)


def write_config(name, cfg):
    (OUT / f"{name}.config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def llama3_rope_freqs(base, dim, factor, low, high, old_ctx):
    """Llama 3.1's per-pair divisors as llama.cpp's converter computes them."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def rope_fixtures():
    # Plain llama, SmolLM2-like head (d = 64, base 1e5, 8k).
    w = Writer("llama_plain", "llama")
    llama_family(w, "llama", n_embd=256, n_head=4, n_head_kv=2, ctx=8192, base=100000.0, rot=64)
    w.close()
    write_config("llama_plain", {
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 8192, "rope_theta": 100000.0})

    # Linear (position interpolation) by 4, written with the legacy `type` in config.json.
    w = Writer("llama_linear", "llama")
    llama_family(w, "llama", n_embd=512, n_head=4, n_head_kv=4, ctx=16384, base=10000.0, rot=128)
    w.kv("llama.rope.scaling.type", "linear", T.STRING)
    w.kv("llama.rope.scaling.factor", 4.0, T.FLOAT32)
    w.close()
    write_config("llama_linear", {
        "model_type": "llama", "hidden_size": 512, "num_attention_heads": 4,
        "max_position_embeddings": 16384, "rope_theta": 10000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0}})

    # Llama 3.1 and 3.2 (factor 8 and 32): no scaling keys, a `rope_freqs` F32 tensor.
    # A made-up variant (low 2, high 8, factor 16) needs the ramp fit, not Meta's defaults.
    for name, factor, low, high, base, ctx in [
            ("llama3_1", 8.0, 1.0, 4.0, 500000.0, 131072),
            ("llama3_2", 32.0, 1.0, 4.0, 500000.0, 131072),
            ("llama3_custom", 16.0, 2.0, 8.0, 500000.0, 131072)]:
        w = Writer(name, "llama")
        llama_family(w, "llama", n_embd=512, n_head=4, n_head_kv=2, ctx=ctx, base=base, rot=128)
        w.tensor("rope_freqs.weight", llama3_rope_freqs(base, 128, factor, low, high, 8192))
        w.close()
        write_config(name, {
            "model_type": "llama", "hidden_size": 512, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": ctx, "rope_theta": base,
            "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                             "high_freq_factor": high,
                             "original_max_position_embeddings": 8192}})

    # Plain qwen2 (NeoX / half layout), no dimension_count key: it defaults to the head dim.
    w = Writer("qwen2_plain", "qwen2")
    llama_family(w, "qwen2", n_embd=896, n_head=14, n_head_kv=2, ctx=32768, base=1000000.0)
    w.close()
    write_config("qwen2_plain", {
        "model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
        "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0})

    # Qwen2.5 with YaRN 4x from 32k (as its model card tells users to set).
    w = Writer("qwen2_yarn", "qwen2")
    llama_family(w, "qwen2", n_embd=512, n_head=4, n_head_kv=2, ctx=131072, base=1000000.0, rot=128)
    w.kv("qwen2.rope.scaling.type", "yarn", T.STRING)
    w.kv("qwen2.rope.scaling.factor", 4.0, T.FLOAT32)
    w.kv("qwen2.rope.scaling.original_context_length", 32768, T.UINT32)
    w.close()
    write_config("qwen2_yarn", {
        "model_type": "qwen2", "hidden_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 32768}})

    # YaRN with every optional key: betas, an explicit attention factor, key_length.
    w = Writer("llama_yarn_full", "llama")
    llama_family(w, "llama", n_embd=512, n_head=8, n_head_kv=8, ctx=32768, base=10000.0, rot=96)
    w.kv("llama.attention.key_length", 96, T.UINT32)
    w.kv("llama.rope.scaling.type", "yarn", T.STRING)
    w.kv("llama.rope.scaling.factor", 8.0, T.FLOAT32)
    w.kv("llama.rope.scaling.original_context_length", 4096, T.UINT32)
    w.kv("llama.rope.scaling.yarn_ext_factor", 1.0, T.FLOAT32)
    # 1.1 is not an f32: the reader must widen 1.1f32 back to the decimal 1.1.
    w.kv("llama.rope.scaling.yarn_attn_factor", 1.1, T.FLOAT32)
    w.kv("llama.rope.scaling.yarn_beta_fast", 16.0, T.FLOAT32)
    w.kv("llama.rope.scaling.yarn_beta_slow", 2.0, T.FLOAT32)
    w.close()
    write_config("llama_yarn_full", {
        "model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "head_dim": 96,
        "max_position_embeddings": 32768, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 16.0,
                         "beta_slow": 2.0, "attention_factor": 1.1}})

    # Phi-3 LongRoPE as its converter writes it: no scaling type, the two factor tensors,
    # the original length and the attention factor it computed, as f32.
    short = [round(1.0 + 0.01 * j, 2) for j in range(32)]
    long = [round(1.0 + 0.75 * j, 2) for j in range(32)]
    w = Writer("phi3_longrope", "phi3")
    llama_family(w, "phi3", n_embd=256, n_head=4, n_head_kv=4, ctx=131072, base=10000.0, rot=64)
    w.kv("phi3.rope.scaling.original_context_length", 4096, T.UINT32)
    w.kv("phi3.rope.scaling.attn_factor", math.sqrt(1 + math.log(32) / math.log(4096)), T.FLOAT32)
    w.tensor("rope_factors_long.weight", np.array(long, dtype=np.float32))
    w.tensor("rope_factors_short.weight", np.array(short, dtype=np.float32))
    w.close()
    write_config("phi3_longrope", {
        "model_type": "phi3", "hidden_size": 256, "num_attention_heads": 4,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}})

    # What ropex cannot express: YaRN with a partial extrapolation mix (ext_factor 0.5).
    w = Writer("yarn_ext_half", "llama")
    llama_family(w, "llama", n_embd=256, n_head=4, n_head_kv=4, ctx=8192, base=10000.0, rot=64)
    w.kv("llama.rope.scaling.type", "yarn", T.STRING)
    w.kv("llama.rope.scaling.factor", 2.0, T.FLOAT32)
    w.kv("llama.rope.scaling.yarn_ext_factor", 0.5, T.FLOAT32)
    w.close()


def every_type_fixture(name, version):
    w = Writer(name, "llama", alignment=None)
    w.kv("t.u8", 255, T.UINT8)
    w.kv("t.i8", -128, T.INT8)
    w.kv("t.u16", 65535, T.UINT16)
    w.kv("t.i16", -32768, T.INT16)
    w.kv("t.u32", 4294967295, T.UINT32)
    w.kv("t.i32", -2147483648, T.INT32)
    w.kv("t.u64", 18446744073709551615, T.UINT64)
    w.kv("t.i64", -9223372036854775808, T.INT64)
    w.kv("t.f32", 0.1, T.FLOAT32)
    w.kv("t.f64", 0.1, T.FLOAT64)
    w.kv("t.bool_true", True, T.BOOL)
    w.kv("t.bool_false", False, T.BOOL)
    w.kv("t.string", "héllo, GGUF ✓", T.STRING)
    w.kv("t.empty_string", "", T.STRING)
    w.kv("t.arr_u8", [0, 1, 254, 255], T.ARRAY, T.UINT8)
    w.kv("t.arr_i16", [-3, 7], T.ARRAY, T.INT16)
    w.kv("t.arr_i32", [-1, 0, 2147483647], T.ARRAY, T.INT32)
    w.kv("t.arr_u64", [1, 18446744073709551615], T.ARRAY, T.UINT64)
    w.kv("t.arr_f32", [1.5, -0.25, 3.0e38], T.ARRAY, T.FLOAT32)
    w.kv("t.arr_f64", [math.pi, -1e-300], T.ARRAY, T.FLOAT64)
    w.kv("t.arr_bool", [True, False, True], T.ARRAY, T.BOOL)
    w.kv("t.arr_str", ["a", "", "ünï"], T.ARRAY, T.STRING)
    w.kv("t.arr_nested", [[1, 2], [3], [4, 5, 6]], T.ARRAY)
    w.kv("t.arr_nested2", [[["x"], ["y", "z"]], [["w"]]], T.ARRAY)
    w.tensor("small.weight", np.arange(8, dtype=np.float32))
    w.close(version=version)


def tensor_fixture():
    """Quantised and float tensors at a non-default alignment, with gguf-py's
    dequantisation as the expected values."""
    rng = np.random.default_rng(11)
    w = Writer("tensors", "llama", alignment=64)
    w.kv("llama.context_length", 8192, T.UINT32)
    dequant = {}
    shape = (2, 32)  # 2 rows of one 32-element block
    for name, qtype in [("q8_0.weight", Q.Q8_0), ("q4_1.weight", Q.Q4_1),
                        ("q4_0.weight", Q.Q4_0), ("bf16.weight", Q.BF16)]:
        x = rng.standard_normal(shape).astype(np.float32) * 0.5 + 0.1
        q = gguf.quants.quantize(x, qtype)
        w.tensor(name, q, raw_dtype=qtype, shape=list(shape))
        dequant[name] = [float(v) for v in gguf.quants.dequantize(q, qtype).reshape(-1)]
    x = (rng.standard_normal((2, 5)) * 3).astype(np.float16)
    w.tensor("f16.weight", x)
    dequant["f16.weight"] = [float(v) for v in x.astype(np.float32).reshape(-1)]
    x = rng.standard_normal((7,)).astype(np.float32)
    w.tensor("f32.weight", x)
    dequant["f32.weight"] = [float(v) for v in x.reshape(-1)]
    # A q_proj weight (2 heads of 8 rows, 5 inputs) in Hugging Face row order, and as
    # llama.cpp's converter permutes it for ggml's adjacent-pair rope.
    q_hf = rng.standard_normal((16, 5)).astype(np.float32)
    q_gguf = q_hf.reshape(2, 2, 16 // 2 // 2, 5).swapaxes(1, 2).reshape(q_hf.shape)
    w.tensor("attn_q_permuted.weight", np.ascontiguousarray(q_gguf))
    dequant["attn_q_permuted.weight"] = [float(v) for v in q_gguf.reshape(-1)]
    w.close()
    EXPECTED["tensors"]["dequantised"] = dequant
    EXPECTED["tensors"]["q_proj_hf_order"] = {"n_head": 2, "row_len": 5,
                                              "values": [float(v) for v in q_hf.reshape(-1)]}


SMOLLM2 = Path(os.environ.get("ROPEX_SMOLLM2_GGUF", OUT.parent.parent.parent / "target" / "models"
               / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def smollm2_reference():
    """gguf-py's dequantisation of a few SmolLM2 tensors (first 64 values and the sum
    over the whole tensor), when tools/fetch_smollm2.sh has fetched the model."""
    if not SMOLLM2.exists():
        print(f"{SMOLLM2} absent: smollm2_reference.json not rewritten (run tools/fetch_smollm2.sh)")
        return
    reader = gguf.GGUFReader(str(SMOLLM2))
    ref = {}
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
                      "blk.0.attn_norm.weight", "output_norm.weight"):
            x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32)
            ref[t.name] = {"type": t.tensor_type.name, "n": int(x.size),
                           "head": [float(v) for v in x[:64]],
                           "sum": float(x.astype(np.float64).sum()),
                           "sum_sq": float((x.astype(np.float64) ** 2).sum())}
    (OUT / "smollm2_reference.json").write_text(json.dumps(ref, indent=1) + "\n")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rope_fixtures()
    every_type_fixture("every_type_v3", None)
    every_type_fixture("every_type_v2", 2)
    tensor_fixture()
    smollm2_reference()
    (OUT / "expected.json").write_text(json.dumps(EXPECTED, indent=1, ensure_ascii=False) + "\n")
    for p in sorted(OUT.iterdir()):
        print(f"{p.stat().st_size:7d}  {p.relative_to(OUT.parent.parent.parent)}")


if __name__ == "__main__":
    sys.exit(main())
