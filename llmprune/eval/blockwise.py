"""Zero-shot scoring of a model that stays on disk: lm-eval's HFLM (its tokenization, truncation and
request bookkeeping, so the prompts and the scored tokens are lm-eval's own) with the forward pass
replaced by a walk over the decoder blocks, one block of weights in memory at a time
(onload.through_blocks). A 70B output is scored on one GPU, or on the CPU, whatever its format.

All requests are walked together: sorted by length, cut into as few passes over the weights as the
activation budget allows (onload.EVAL_ACTIVATIONS of hidden states), each pass padded on the right
(a causal model's tokens never see what follows them; HFLM pads the same way). Each request is then
read off the final hidden states through the head at its continuation's positions only, so a 262k
vocabulary never yields a whole sequence of logits. Log-probabilities are computed in fp32 (as the
perplexity evaluator does; HFLM's default is the model's dtype), which equals HFLM on an fp32 model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from .. import arch, lazy, onload


def passes(lengths: list[int], budget: int) -> list[list[int]]:
    """Request indices, longest first, cut into groups whose padded size (rows x longest row) is at
    most `budget` tokens (a longer single row is a group of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class BlockwiseLM(HFLM):
    """HFLM over a lazy.LazyModel (its model lives on the meta device until a block is walked)."""

    def __init__(self, lz: lazy.LazyModel, tokenizer, batch_size: int, device, progress: bool = True):
        super().__init__(pretrained=lz.model, tokenizer=tokenizer, batch_size=batch_size)
        self.lz, self._device, self.progress = lz, torch.device(device), progress

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        rows = []  # (input tokens, continuation tokens): HFLM's truncation, causal case
        for _, context, continuation in requests:
            assert 0 < len(continuation) <= self.max_length
            rows.append(((context + continuation)[-(self.max_length + 1):][:-1], continuation))
        model = self.lz.model
        budget = max(1, onload.EVAL_ACTIVATIONS // (model.config.hidden_size * self.lz.dtype.itemsize))
        groups = passes([len(r[0]) for r in rows], budget)
        bs = override_bs or self.batch_size
        res: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="zero-shot requests", disable=disable_tqdm or not self.progress)
        for n, group in enumerate(groups):
            width = len(rows[group[0]][0])
            ids = torch.full((len(group), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            for j, i in enumerate(group):
                ids[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
            desc = f"zero-shot pass {n + 1}/{len(groups)}"
            with onload.through_blocks(self.lz, ids, bs, self.device, self.progress, desc) as (norm, hidden):
                for j, i in enumerate(group):
                    inp, cont = rows[i]
                    h = hidden[j // bs][j % bs, len(inp) - len(cont): len(inp)].to(self.device)  # (k, H)
                    logp = F.log_softmax(arch.logits(model, norm(h[None]))[0], dim=-1)  # (k, V) fp32
                    want = torch.tensor(cont, device=logp.device)
                    answer = (float(logp.gather(-1, want[:, None]).sum()), bool((logp.argmax(-1) == want).all()))
                    res[i] = answer
                    if requests[i][0] is not None:  # lm-eval's request cache, as HFLM feeds it
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
        bar.close()
        return res
