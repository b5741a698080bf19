"""Wanda: Pruning by Weights and activations (Sun et al. 2023, arXiv 2306.11695).

Score S_ij = |W_ij| * ||X_j||_2 (eq. 1), compared within each output row i (sec. 3), or within
each block of M inputs of a row for N:M. No weight update.
"""
from __future__ import annotations

import torch

from ..patterns import Pattern, keep_mask
from . import Solved, Solver


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * sq_norm.sqrt().float()[None, :]  # (out, in)


def wanda(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float, **_) -> Solved:
    keep = keep_mask(wanda_score(weight, stats.sq_norm), pattern, sparsity, scope="row")
    return Solved(weight * keep, keep, {})


SOLVER = Solver("wanda", wanda, needs=frozenset({"norms"}), cite="Sun et al. 2023, arXiv 2306.11695")
