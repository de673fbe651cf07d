#!/usr/bin/env python3
"""Writes the SmolLM2 parity fixture for lm/tests/smollm2_parity.rs (offline tool).

Reference side, independent of ropex:
- tokenizer: the `tokenizers` Python package, built from the GGUF's own
  tokenizer.ggml.tokens / merges (read with the `gguf` package) with the pre-tokenizer
  llama.cpp uses for `pre = "smollm"`: Sequence[Digits(individual_digits=True),
  ByteLevel(add_prefix_space=False, use_regex=True)], control tokens as special tokens;
- model: transformers' LlamaForCausalLM loaded from the same GGUF
  (`from_pretrained(dir, gguf_file=...)`, which dequantises Q4_1 / Q8_0 with gguf-py and
  un-permutes Q/K into the Hugging Face half-split layout), run in float32.

Output (lm/tests/data/smollm2/):
- reference.json: sample texts with their token ids (and how many ids transformers' own
  GGUF tokenizer conversion, which drops the digit split, gets differently); the
  passage, its ids, per-position log-sum-exp and target NLL, top-K ids and logits;
- full_rows.f32: little-endian f32, full logit rows at positions FULL_ROWS.

    pip install torch transformers gguf tokenizers
    tools/fetch_smollm2.sh
    python3 tools/smollm2_reference.py [GGUF]
"""
import json
import os
import sys

import numpy as np
import torch
from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "lm/tests/data/smollm2")
TOP_K = 16
FULL_ROWS = [0, 100, 199]

SAMPLES = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi and 1,000,000 is a million.",
    "  leading spaces, trailing tabs\t\tand\nnew lines\n\n",
    "def add(a, b):\n    return a + b  # 42\n",
    "Ünïcödé: naïve café, 東京, Ελληνικά, emoji 🎉.",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
]

PASSAGE = (
    "A package manager keeps track of which files belong to which program. When the "
    "administrator installs version 2.4.1 of a library, the manager records its 37 files, "
    "checks that the 5 packages it depends on are present, and refuses to overwrite a file "
    "owned by another package. Removing the library later deletes exactly those files and "
    "nothing else, so the system stays consistent. Configuration files are treated "
    "differently: a change made by the administrator is never silently replaced, and the "
    "manager asks what to do when a new version ships its own copy. Most distributions "
    "publish their archive on mirrors around the world; a client downloads the index of "
    "available packages, compares it with what is installed, and computes the smallest set "
    "of upgrades that satisfies every dependency. In 1998 this took minutes on a typical "
    "machine; today it takes a few seconds, even for an archive of more than 60000 "
    "packages. Security updates follow the same path, which is why keeping the index fresh "
    "matters."
)


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def gguf_tokenizer(path):
    reader = GGUFReader(path)
    tokens = field_strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field_strings(reader, "tokenizer.ggml.merges")]
    tf = reader.fields["tokenizer.ggml.token_type"]
    types = [int(tf.parts[i][0]) for i in tf.data]
    pre = bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode()
    assert pre == "smollm", pre
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ROPEX_SMOLLM2_GGUF", DEFAULT)
    tok = gguf_tokenizer(path)
    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    samples = []
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False).ids
        hf = hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text, text
        samples.append({"text": text, "ids": ids, "transformers_gguf_ids_differ": hf != ids})

    torch.set_num_threads(2)
    model = LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
    ).eval()
    rope = getattr(model.config, "rope_parameters", None) or {"rope_theta": model.config.rope_theta}
    assert rope["rope_theta"] == 100000.0, rope
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb, head), "tied embeddings expected (the file has no output.weight)"
    ids = tok.encode(PASSAGE, add_special_tokens=False).ids[:201]
    inp, target = ids[:-1], ids[1:]
    with torch.no_grad():
        logits = model(torch.tensor([inp])).logits[0].double()
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits[torch.arange(len(target)), torch.tensor(target)]
    top = torch.topk(logits, TOP_K, dim=-1)
    fixture = {
        "model": os.path.basename(path),
        "reference": f"transformers {__import__('transformers').__version__} LlamaForCausalLM, "
        f"torch {torch.__version__}, float32, weights dequantised from the GGUF",
        "samples": samples,
        "passage": PASSAGE,
        "ids": ids,
        "logsumexp": lse.tolist(),
        "nll": nll.tolist(),
        "mean_nll": float(nll.mean()),
        "top_k": TOP_K,
        "top_ids": top.indices.tolist(),
        "top_logits": top.values.float().tolist(),
        "full_rows": FULL_ROWS,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(fixture, f, ensure_ascii=False)
    logits[FULL_ROWS].float().numpy().astype("<f4").tofile(os.path.join(OUT, "full_rows.f32"))
    print(f"{len(inp)} positions, mean NLL {nll.mean():.4f} nats/token")
    for s in samples:
        print(len(s["ids"]), s["transformers_gguf_ids_differ"], repr(s["text"][:40]))


if __name__ == "__main__":
    main()
