"""End-to-end decode of a LLaMA-7B-shaped model with random weights: dense fp16 vs sparse24 vs
w4s24 (run by gpu_kernels.sh). Packed layers get random valid packed tensors (speed does not
depend on the values). Usage: python bench/e2e_7b.py OUT.json [--layers 32] [--batch 1,16]
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmprune.bench import DECODE_COLS, format_table, random_packed, run_bench
from llmprune.modules import PackedLinear


def dense_model(layers: int, hidden: int, inter: int, device: str) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000,
                      max_position_embeddings=4096)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return m.eval()


def packed_copy(m: torch.nn.Module, fmt: str, device: str) -> torch.nn.Module:
    """A model sharing m's embeddings, norms and head, every decoder linear replaced by PackedLinear."""
    with torch.device("meta"):
        c = AutoModelForCausalLM.from_config(m.config, dtype=torch.float16)
    c.load_state_dict(m.state_dict(), assign=True)  # shares m's tensors: no copy
    for name, mod in list(c.named_modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, torch.nn.Linear) and name.startswith("model.layers"):
                p = random_packed(fmt, lin.out_features, lin.in_features, torch.float16, device)
                setattr(mod, child, PackedLinear(fmt, p, None, lin.in_features, lin.out_features))
    c.model.rotary_emb = m.model.rotary_emb  # non-persistent buffers are not in the state dict
    return c.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    dense = dense_model(a.layers, a.hidden, a.intermediate, a.device)
    res = {}
    for fmt in ("sparse24", "w4s24"):
        comp = packed_copy(dense, fmt, a.device)
        res[fmt] = run_bench(comp, dense if fmt == "sparse24" else None, batches, a.prompt_len, a.new_tokens,
                             a.device, torch.float16)
        print(fmt, f"context {res[fmt]['context_len']}")
        print(format_table(res[fmt]["rows"], DECODE_COLS), flush=True)
        del comp
        if a.device == "cuda":
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
