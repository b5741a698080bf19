"""Accumulators over a linear layer's inputs X (tokens, in_features), filled by forward hooks.

Which statistics are collected is chosen by the solver (`needs`), so Wanda pays for a norm and
SparseGPT for a Hessian, and nobody pays for what it does not use.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

KINDS = ("norms", "moments", "hessian")
# elements of an input converted to fp64 at a time (128 MiB): a whole calibration batch at once would be 8x the
# batch's bf16 bytes, GBs at a 70B width (8 x 2048 tokens x 28672), for every linear
CHUNK = 1 << 24


def _sum64(x: torch.Tensor, dim: int, square: bool = False) -> torch.Tensor:
    """x (or x^2) summed over `dim` in fp64, converting at most CHUNK elements (or one slice along `dim`) at a time."""
    out = torch.zeros(x.shape[:dim] + x.shape[dim + 1:], dtype=torch.float64, device=x.device)
    for c in x.split(max(1, CHUNK * x.shape[dim] // max(x.numel(), 1)), dim):
        c = c.double()
        out += (c.pow_(2) if square else c).sum(dim)
    return out


class LayerStats:
    def __init__(self, in_features: int, needs: frozenset[str] | set[str], device="cpu", sink_weight: float = 1.0):
        unknown = set(needs) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; valid: {KINDS}")
        self.in_features = in_features
        self.needs = frozenset(needs)
        self.device = torch.device(device)  # where the accumulators live; inputs elsewhere are copied here
        self.slot = 0  # which of the run's devices solves the linears reading these statistics (parallel.py)
        self.n = 0  # tokens seen
        self.n_seqs = 0  # sequences seen (a 2-D input counts as one), for per-sequence averages (DSnoT)
        # the Hessian may count each sequence's first token sink_weight times (see add); its own total
        if not sink_weight > 0:
            raise ValueError(f"sink_weight {sink_weight} must be > 0 (1 counts every token once)")
        self.sink_weight = float(sink_weight)
        self.h_n = 0.0
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)
        self.sum = z(in_features) if "moments" in needs else None
        self.sumsq = z(in_features) if needs & {"norms", "moments"} else None
        # sum over sequences of (the sequence's sum)^2 / its tokens: for the within-sequence variance
        self.seq_sq = z(in_features) if "moments" in needs else None
        # X^T X in fp32: a (tokens x in) @ (in x tokens) product is the dominant cost, fp64 doubles it.
        self.xtx = torch.zeros(in_features, in_features, device=device) if "hessian" in needs else None
        # set by the pruning pass when the linear being solved is these statistics' last reader:
        # take_hessian may then hand X^T X's own memory over instead of copying it
        self.disposable = False

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """x: (batch, seq, in) or (tokens, in). With sink_weight != 1 and a sequence axis, the
        Hessian counts each sequence's first token sink_weight times (the attention-sink token)."""
        if x.device != self.device:  # accumulated on the device that solves the linear (parallel.py)
            x = x.to(self.device, non_blocking=True)
        first = x[:, 0, :] if x.dim() == 3 and self.sink_weight != 1 and self.xtx is not None else None
        self.n_seqs += x.shape[0] if x.dim() == 3 else 1
        if self.seq_sq is not None and x.shape[-2] > 0:  # (an expert may get no token from a batch)
            seq_sum = torch.stack([_sum64(q, 0) for q in x.reshape(-1, *x.shape[-2:])])  # (sequences, in)
            self.seq_sq += seq_sum.pow(2).sum(0) / x.shape[-2]
        x = x.reshape(-1, self.in_features)  # (tokens, in)
        self.n += x.shape[0]
        if self.sumsq is not None:
            self.sumsq += _sum64(x, 0, square=True)
        if self.sum is not None:
            self.sum += _sum64(x, 0)
        if self.xtx is not None:
            xf = x.float()
            self.xtx.addmm_(xf.T, xf)
            self.h_n += x.shape[0]
            if first is not None:
                f0 = first.float()
                self.xtx.addmm_(f0.T, f0, alpha=self.sink_weight - 1)
                self.h_n += (self.sink_weight - 1) * f0.shape[0]

    # --- derived quantities, in the papers' notation ---
    @property
    def sq_norm(self) -> torch.Tensor:
        """||X_j||_2^2 per input feature j (Wanda)."""
        return self.sumsq

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.n, 1) - self.mean.pow(2)).clamp_min(0)

    @property
    def seq_var(self) -> torch.Tensor:
        """Variance within each sequence (about the sequence's own mean), averaged over the tokens: the
        DSnoT reference's `var` (lib/layerwrapper.py: torch.var of each batch of one sequence, averaged
        weighted by tokens). It leaves out the spread of the sequences' means that `var` includes."""
        return ((self.sumsq - self.seq_sq) / max(self.n, 1)).clamp_min(0)

    def take_hessian(self) -> torch.Tensor:
        """The Hessian for a caller that overwrites it: a new matrix, or, when these statistics are
        `disposable`, X^T X's own memory scaled in place and handed over (one n x n matrix less at the
        peak: a 70B down_proj's is 3.3 GB in fp32). Reading the Hessian again then raises."""
        if not self.disposable or self.xtx is None:
            return self.hessian  # (which raises when X^T X was handed over already)
        h, self.xtx = self.xtx, None
        return h.mul_(2.0 / max(self.h_n, 1))

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (SparseGPT, eq. 2, averaged over tokens as in the reference code); with
        sink_weight w each sequence's first token counts w times, in X^T X and in n. A new matrix on
        each call: the caller owns it."""
        if self.xtx is None:
            raise RuntimeError("the Hessian was handed over by take_hessian() to an earlier reader"
                               if "hessian" in self.needs else "these statistics were collected without 'hessian'")
        return self.xtx * (2.0 / max(self.h_n, 1))


def last_readers(stats: dict[str, LayerStats], names) -> Iterator[tuple[str, bool]]:
    """(name, whether it is its statistics' last reader) in order: parts of a fused linear share one
    accumulator, and only the last part solved may take it over (its solve sets `disposable`)."""
    left = Counter(id(stats[n]) for n in names)
    for n in names:
        left[id(stats[n])] -= 1
        yield n, left[id(stats[n])] == 0
