"""Write a random-weight model with a real architecture's shapes as a sharded safetensors folder.

    python bench/make_synthetic.py OUT --arch llama3-8b [--layers N] [--dtype bfloat16] [--seed 0]

The folder is a plain Hugging Face checkpoint (config.json, model-0000i-of-0000n.safetensors,
model.safetensors.index.json, a byte-level tokenizer), deterministic from the seed, written tensor
by tensor: the whole model is never in memory (an 8B model is 16 GB in bf16). Weights are N(0, 0.02)
(norms 1), which is enough to time and size compression: the numbers it gives are speed and
memory, never quality. Presets copy the published configs' shapes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PRESETS = {  # published shapes (config.json of each model)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       rope_theta=500000.0, max_position_embeddings=8192),
    # Mixture-of-Experts: stored one linear per expert, as the published checkpoints are (transformers fuses them)
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, tie_word_embeddings=False, rope_theta=1000000.0,
                         max_position_embeddings=32768),
}
SHARD_BYTES = 2 * 2**30


def config(arch: str, **over):
    from transformers import AutoConfig

    spec = {**PRESETS[arch], **{k: v for k, v in over.items() if v is not None}}
    return AutoConfig.for_model(**spec)


def tensor_shapes(cfg) -> dict[str, tuple[torch.Size, bool]]:
    """name -> (shape, is_matrix) of the model's state dict as save_pretrained stores it (a Mixture-of-Experts
    model's experts one linear per expert), from a weightless (meta) instance."""
    from transformers import AutoModelForCausalLM

    from llmprune import stored

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    sd = m.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    sd = stored.to_stored(m, sd)
    return {k: (v.shape, v.dim() >= 2) for k, v in sd.items()}


def write(out: str | Path, arch: str = "llama3-8b", dtype: str = "bfloat16", seed: int = 0,
          shard_bytes: int = SHARD_BYTES, **over) -> Path:
    """Write the folder; returns it. Peak memory: one shard's tensors."""
    from safetensors.torch import save_file

    from llmprune.testing import byte_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(arch, **over)
    cfg.dtype = dtype
    dt = getattr(torch, dtype)
    shapes = tensor_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    groups, cur, size = [], [], 0
    for name, (shape, _) in shapes.items():
        nb = shape.numel() * dt.itemsize
        if cur and size + nb > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    groups.append(cur)
    n = len(groups)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        shard = {}
        for name in names:
            shape, matrix = shapes[name]
            t = torch.randn(shape, generator=g).mul_(0.02) if matrix else torch.ones(shape)
            shard[name] = t.to(dt)
            weight_map[name] = fname
            total += shard[name].numel() * dt.itemsize
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        del shard
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    (out / "SYNTHETIC.txt").write_text(f"random weights, {arch} shapes, seed {seed}: for speed and memory only\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="override num_hidden_layers (depth scans)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = write(a.out, a.arch, a.dtype, a.seed, num_hidden_layers=a.layers)
    print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
