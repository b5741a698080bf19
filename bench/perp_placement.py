"""Where `llmprune recover` (PERP) would put Llama-3-8B and Llama-3.3-70B on common GPUs: the planner's
own arithmetic (llmprune/placement.py) on weightless (meta) models with the default PERP setup
(norms, biases, rank-16 MaskLoRA, bf16 weights, batch 4 x 512 tokens). A plan, not a measurement:
the GPU's free memory is taken as its size less 0.5 GiB (CUDA context). The last column is the CPU memory
the weights take: the streamed blocks' frozen weights when each tensor is read from disk straight to where
it trains (`--onload blocks`, the default on a GPU), against the whole model with `--onload whole`.

    python bench/perp_placement.py > bench/results/perp_placement.txt
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic

from llmprune import arch, placement
from llmprune.recover import lora, perp

SETUPS = {  # name: GiB of each GPU
    "1 x 24 GiB": [24], "1 x 48 GiB": [48], "1 x 80 GiB (H100)": [80], "1 x 141 GiB (H200)": [141],
    "2 x 80 GiB": [80, 80], "4 x 80 GiB": [80] * 4,
}


def meta_model(name: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_synthetic.config(name), dtype=torch.bfloat16)
    model.requires_grad_(False)
    chosen, _ = perp._select(model, ("norms", "biases"))
    for p in (p for ps in chosen.values() for p in ps):
        p.data = p.data.float()  # trained in fp32
        p.requires_grad_(True)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    lora.attach(model, dict.fromkeys(names), rank=16)
    return model


def main() -> None:
    batch, seqlen, gib = 4, 512, placement.GiB
    print(f"# PERP placement plans (bench/perp_placement.py): bf16 weights, rank-16 MaskLoRA + norms, batch "
          f"{batch} x {seqlen}")
    print("| model | GPUs | reserve GiB per GPU | blocks resident per GPU | blocks streamed | "
          "GB copied per step | s per step at 25 GB/s | CPU GB of weights (blocks / whole) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for name, label in (("llama3-8b", "Llama-3-8B"), ("llama3-70b", "Llama-3.3-70B")):
        model = meta_model(name)
        blocks = list(arch.blocks(model))
        sizes = [placement.held_bytes(b) for b in blocks]
        frozen = [sum(p.numel() * p.element_size() for p in b.parameters() if not p.requires_grad) for b in blocks]
        base = placement.held_bytes(model) - sum(sizes)
        whole = sum(p.numel() * 2 for n, p in model.named_parameters() if ".lora_" not in n) / 1e9  # bf16 on disk
        reserve = placement.reserve_bytes(model.config, batch, seqlen, len(blocks), 2)
        for setup, gpus in SETUPS.items():
            budgets = [max(0.0, (g - 0.5) * gib - reserve) for g in gpus]
            if base > budgets[0]:
                print(f"| {label} | {setup} | {reserve / gib:.1f} | embedding and head do not fit | | | | |")
                continue
            where = placement.plan(sizes, base, budgets)
            resident = [sum(1 for d, s in where if d == i and not s) for i in range(len(gpus))]
            streamed = [i for i, (_, s) in enumerate(where) if s]
            copied = 2 * sum(frozen[i] for i in streamed) / 1e9  # the forward and the recomputation
            print(f"| {label} | {setup} | {reserve / gib:.1f} | {' + '.join(map(str, resident))} | {len(streamed)} | "
                  f"{copied:.0f} | {copied / 25:.1f} | {copied / 2:.0f} / {whole:.0f} |")


if __name__ == "__main__":
    main()
