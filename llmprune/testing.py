"""Tiny random models and tokenizers for tests: seconds, not minutes, and no download."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256 + 2  # bytes + <bos>, <eos>
# `llmprune compress` options that make a tiny-model run take seconds: little calibration, no evaluation
FAST_CLI = ["--nsamples", "6", "--seqlen", "32", "--calib-batch", "4", "--no-progress", "--eval", "none"]


def byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<bos>"], vocab["<eos>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def tiny_config(arch: str = "llama", **over):
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=True,
    )
    common.update(over)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "gemma3":
        common.setdefault("head_dim", 16)
        common.setdefault("sliding_window", 16)
        common.setdefault("layer_types", ["sliding_attention", "full_attention"][: common["num_hidden_layers"]]
                          if common["num_hidden_layers"] <= 2 else None)
        return Gemma3TextConfig(**common)
    raise ValueError(f"tiny models exist for llama and gemma3, not {arch!r}")


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **over):
    """A random causal LM (hidden 64, 2 layers) with weights scaled so its outputs are not flat."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **over), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0, **over) -> Path:
    """Save a tiny model and its byte tokenizer as a plain HF folder; returns the folder."""
    path = Path(path)
    tiny_model(arch, seed, **over).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def random_text(n_words: int = 2000, seed: int = 0) -> str:
    import random

    rnd = random.Random(seed)
    words = ["the", "model", "prunes", "weights", "of", "a", "layer", "and", "keeps", "quality", "sparse",
             "dense", "tokens", "calibration", "data", "is", "small", "fast", "kernel", "matrix"]
    return " ".join(rnd.choice(words) for _ in range(n_words))
