"""A real-text Mixture-of-Experts model from the embedded SmolLM2-135M: each decoder MLP copied into E experts
of a Mixtral model (top-k of E, a random router), so the MoE computes what SmolLM2 computes (identical experts,
routing weights renormalized to sum to 1 over the top k) and its perplexity is SmolLM2's. Pruning it then prunes
each expert from the tokens its router sends it, and packing it packs each expert: the MoE path on real text
(bench/moe_upcycled.sh), where otherwise only random-weight MoE models exist offline.

    python bench/upcycle_moe.py OUT [--experts 4] [--top-k 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def upcycle(dense, experts: int, top_k: int, seed: int):
    """A MixtralForCausalLM (fp32) holding `dense`'s (a LLaMA) attention, norms, embeddings and, E times, its MLP."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(cfg).eval()
    src = dense.state_dict()
    with torch.no_grad():
        for n, t in moe.state_dict().items():
            if ".mlp.experts." in n or ".mlp.gate." in n:
                continue
            t.copy_(src[n])
        for i, layer in enumerate(dense.model.layers):
            mlp, ex = layer.mlp, moe.model.layers[i].mlp.experts
            ex.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).expand_as(ex.gate_up_proj))
            ex.down_proj.copy_(mlp.down_proj.weight.expand_as(ex.down_proj))
            router = moe.model.layers[i].mlp.gate.weight
            router.normal_(0, 1.0 / c.hidden_size ** 0.5)  # random routing: every expert gets tokens
    return moe


def main(argv=None) -> int:
    from llmprune import models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    dense, tok, _ = models.load("llama")
    moe = upcycle(dense, a.experts, a.top_k, a.seed)
    ids = tok("The capital of France is Paris. The tower", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    moe.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    note = {"from": "SmolLM2-135M-Instruct (llmprune's embedded default)", "experts": a.experts, "top_k": a.top_k,
            "router": f"random, seed {a.seed}", "max_logit_difference_vs_dense": diff,
            "command": "python bench/upcycle_moe.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (Path(a.out) / "upcycled.json").write_text(json.dumps(note, indent=1) + "\n")
    print(json.dumps(note))
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
