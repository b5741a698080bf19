"""Perplexity, the paper protocol (SparseGPT/Wanda eval): the whole test text tokenized once,
cut into non-overlapping windows of `seqlen`, mean token NLL over the windows, exp.

WikiText-2 raw test rows are joined with "\\n\\n"; C4 joins the first 1,100 validation documents
with " " and keeps at most 256 windows (offline: the shipped docs 0-499, which C4 calibration never
draws; see calibration.sources). `windows` bounds the cost; what was used is returned.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .. import arch
from ..calibration import sources
from ..errors import LLMPruneError

DATASETS = ("wikitext2", "c4")
C4_DOCS = 1100  # the papers' C4 evaluation: the first 1,100 validation documents


_TOKENS: dict[tuple, torch.Tensor] = {}  # (text's digest, tokenizer's) -> ids: a few evaluation texts per process


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """The ids of `text`, tokenized once per process for a given fast tokenizer (its whole definition,
    normalizer to post-processor, is the key): a compress evaluates the dense model and its output, a sweep
    every point, with the same tokenizer, and a 1.3 MB text takes seconds."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    key = tuple(hashlib.sha256(s.encode()).hexdigest() for s in (text, backend.to_str()))
    if key not in _TOKENS:
        if len(_TOKENS) >= 4:
            _TOKENS.pop(next(iter(_TOKENS)))
        _TOKENS[key] = tokenizer(text, return_tensors="pt").input_ids[0]
    return _TOKENS[key].clone()


def cached_tokens(dataset: str, tokenizer, cache: dict) -> tuple[torch.Tensor, str]:
    """eval_tokens, kept in `cache` (dataset -> (tokens, source)) for the evaluations of one command."""
    if dataset not in cache:
        cache[dataset] = eval_tokens(dataset, tokenizer)
    return cache[dataset]


def eval_tokens(dataset: str, tokenizer) -> tuple[torch.Tensor, str]:
    if dataset == "wikitext2":
        text, where = sources.wikitext2("test")
        return _tokenize(tokenizer, text), where
    if dataset == "c4":
        docs, where = sources.c4_docs("validation")
        docs = docs[:C4_DOCS]
        return _tokenize(tokenizer, " ".join(docs)), f"{where}, its first {len(docs):,} docs joined with ' '"
    raise LLMPruneError(f"unknown perplexity dataset {dataset!r}: choose from {', '.join(DATASETS)}")


@torch.no_grad()
def window_nll_from_hidden(model, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed next-token NLL of each row of ids (B, S) from the final (normed) hidden states
    (B, S, H), fp64. The head runs over `chunk` positions at a time, so a 262k vocabulary never
    materializes a whole window's logits."""
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    for s in range(0, ids.shape[1] - 1, chunk):
        e = min(s + chunk, ids.shape[1] - 1)
        logits = arch.logits(model, hidden[:, s:e])  # (B, c, V) fp32, soft-capped where the model does
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, s + 1 : e + 1].flatten(), reduction="none")
        total += nll.view(ids.shape[0], -1).sum(1).double()
    return total


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed next-token NLL of each row of ids (B, S) through the whole model in memory."""
    hidden = arch.base(model)(input_ids=ids, use_cache=False).last_hidden_state  # (B, S, H)
    return window_nll_from_hidden(model, hidden, ids, chunk)


def windows_of(dataset: str, tokens: torch.Tensor, seqlen: int, windows: int | None) -> tuple[torch.Tensor, int]:
    """(the first `windows` non-overlapping windows (n, seqlen), how many the text has)."""
    available = tokens.numel() // seqlen
    if dataset == "c4":
        available = min(available, 256)
    if available == 0:
        raise LLMPruneError(f"{dataset} has {tokens.numel()} tokens, fewer than one window of {seqlen}: lower --eval-seqlen")
    n = available if not windows else min(windows, available)  # None or 0: all
    return tokens[: n * seqlen].view(n, seqlen), available


def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, windows: int | None = None,
               batch_size: int = 1, progress: bool = True, tokens: torch.Tensor | None = None) -> dict:
    from tqdm.auto import tqdm

    if seqlen < 2:
        raise LLMPruneError("--eval-seqlen must be >= 2")
    if windows is not None and windows < 1:
        raise LLMPruneError("--eval-windows must be >= 1 (or leave it out for all windows)")
    where = None
    if tokens is None:
        tokens, where = eval_tokens(dataset, tokenizer)
    data, available = windows_of(dataset, tokens, seqlen, windows)  # (windows, seqlen)
    n = data.shape[0]
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    nll = 0.0
    for batch in tqdm(data.split(batch_size), desc=f"ppl {dataset}", disable=not progress):
        nll += float(window_nll(model, batch.to(device)).sum())
    predicted = n * (seqlen - 1)
    out = {"ppl": math.exp(nll / predicted), "seqlen": seqlen, "windows": n, "windows_available": available,
           "tokens": predicted, "seconds": round(time.perf_counter() - t0, 2)}
    if where:
        out["source"] = where
    return out
