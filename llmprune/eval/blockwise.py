"""Zero-shot scoring of a model that stays on disk: lm-eval's HFLM (its tokenization, truncation and
request bookkeeping, so the prompts and the scored tokens are lm-eval's own) with the forward pass
replaced by a walk over the decoder blocks, one block of weights in memory at a time
(onload.through_blocks). A 70B output is scored on one GPU, or on the CPU, whatever its format.

All requests are walked together: sorted by length and batched as HFLM batches them (each batch padded
on the right to its longest row: a causal model's tokens never see what follows them), the batches
grouped into as few passes over the weights as the activation budget allows (onload.eval_budget:
2 GiB of hidden states, or on a GPU the room a walk keeps its activations in there). Each request is
then read off the final hidden states through the head at its continuation's positions only, so a
262k vocabulary never yields a whole sequence of logits.
Log-probabilities are computed in fp32 (as the perplexity evaluator does; HFLM's default is the
model's dtype), which equals HFLM on an fp32 model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from .. import arch, lazy, onload, walker


def plan(lengths: list[int], batch_size: int, budget: int) -> list[list[list[int]]]:
    """Request indices, longest first, cut into batches of `batch_size` (each padded to its longest
    row, as HFLM batches), the batches grouped into passes over the weights of at most `budget` padded
    tokens each (a larger batch is a pass of its own). Returns passes -> batches -> indices."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    runs = walker.within([len(b) * lengths[b[0]] for b in batches], budget)
    return [[batches[i] for i in run] for run in runs]


class BlockwiseLM(HFLM):
    """HFLM over a lazy.LazyModel (its model lives on the meta device until a block is walked)."""

    def __init__(self, lz: lazy.LazyModel, tokenizer, batch_size: int, device, progress: bool = True):
        super().__init__(pretrained=lz.model, tokenizer=tokenizer, batch_size=batch_size)
        self.lz, self._device, self.progress = lz, torch.device(device), progress

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        inputs: dict[tuple, list[int]] = {}  # input tokens (HFLM's truncation, causal case) -> its requests
        for r, (_, context, continuation) in enumerate(requests):
            assert 0 < len(continuation) <= self.max_length
            inputs.setdefault(tuple((context + continuation)[-(self.max_length + 1):][:-1]), []).append(r)
        rows = list(inputs)  # each distinct input walked once (the choices of a one-token answer share it)
        model = self.lz.model
        budget = max(1, onload.eval_budget(self._device) // (model.config.hidden_size * self.lz.dtype.itemsize))
        passes = plan([len(x) for x in rows], override_bs or self.batch_size, budget)
        res: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="zero-shot requests", disable=disable_tqdm or not self.progress)
        for n, batches in enumerate(passes):
            ids = []
            for b in batches:
                ids.append(torch.full((len(b), len(rows[b[0]])), self.tokenizer.pad_token_id or 0, dtype=torch.long))
                for j, i in enumerate(b):
                    ids[-1][j, : len(rows[i])] = torch.tensor(rows[i])
            desc = f"zero-shot pass {n + 1}/{len(passes)}"
            with onload.through_blocks(self.lz, ids, 1, self.device, self.progress, desc) as (norm, hidden):
                for b, h_b in zip(batches, hidden):
                    for j, i in enumerate(b):
                        for r in inputs[rows[i]]:
                            res[r] = self._score(h_b[j, : len(rows[i])], requests[r][2], norm)
                            if requests[r][0] is not None:  # lm-eval's request cache, as HFLM feeds it
                                self.cache_hook.add_partial("loglikelihood", requests[r][0], res[r])
                            bar.update(1)
        bar.close()
        return res

    def _score(self, hidden: torch.Tensor, cont: list[int], norm) -> tuple[float, bool]:
        """(log-likelihood of `cont`, whether it is the greedy continuation) from the last block's
        hidden states of its input (T, H): the head at the continuation's positions only."""
        h = hidden[len(hidden) - len(cont):].to(self.device)  # (k, H)
        logp = F.log_softmax(arch.logits(self.lz.model, norm(h[None]))[0], dim=-1)  # (k, V) fp32
        want = torch.tensor(cont, device=logp.device)
        return float(logp.gather(-1, want[:, None]).sum()), bool((logp.argmax(-1) == want).all())
