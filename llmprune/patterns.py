"""Sparsity patterns and keep-masks.

One convention everywhere: a keep-mask is True where the weight stays.
Ties in the scores are broken deterministically by a stable sort (lower input index is
pruned first), which matters on checkpoints that sit on a 4-bit grid.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import LLMPruneError


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "nm" | "group"
    n: int = 0  # nm: weights kept in every block of m consecutive inputs
    m: int = 0
    group: int = 0  # group: contiguous input features scored and pruned together

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}", "group": f"group:{self.group}"}[
            self.kind
        ]

    @property
    def implied_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def check_shape(self, in_features: int, name: str = "layer") -> None:
        block = self.m if self.kind == "nm" else self.group if self.kind == "group" else 1
        if in_features % block:
            raise LLMPruneError(
                f"pattern {self} needs in_features divisible by {block}, but {name} has {in_features}: "
                f"pick another pattern or leave the layer dense with --ignore"
            )


def parse(spec: str) -> Pattern:
    """'unstructured' | 'N:M' (keep N of every M) | 'group:G'."""
    s = spec.strip().lower()
    if s in ("unstructured", "none", ""):
        return Pattern("unstructured")
    if m := re.fullmatch(r"(\d+):(\d+)", s):
        n, mm = int(m[1]), int(m[2])
        if not 0 < n < mm:
            raise LLMPruneError(f"pattern {spec!r}: N:M needs 0 < N < M (keep N of every M), e.g. 2:4")
        return Pattern("nm", n=n, m=mm)
    if m := re.fullmatch(r"group:(\d+)", s):
        g = int(m[1])
        if g < 1:
            raise LLMPruneError(f"pattern {spec!r}: the group size must be >= 1, e.g. group:16")
        return Pattern("group", group=g)
    raise LLMPruneError(f"unknown pattern {spec!r}: use unstructured, N:M (e.g. 2:4, 4:8) or group:G (e.g. group:16)")


def resolve_sparsity(pattern: Pattern, sparsity: float | None) -> float:
    """The fraction of weights zeroed; N:M implies 1 - N/M and a contradicting value is an error."""
    implied = pattern.implied_sparsity
    if sparsity is None:
        if implied is None:
            raise LLMPruneError("--sparsity is required for this pattern, e.g. --sparsity 0.5")
        return implied
    if not 0.0 <= sparsity < 1.0:
        raise LLMPruneError(f"--sparsity {sparsity} is outside [0, 1): give the fraction of weights to zero, e.g. 0.5")
    if implied is not None and abs(sparsity - implied) > 1e-9:
        raise LLMPruneError(
            f"--sparsity {sparsity} contradicts pattern {pattern}, which zeroes {implied:g}: drop --sparsity"
        )
    return sparsity


def n_pruned(count: int, sparsity: float) -> int:
    """How many of `count` weights to prune: floor, as the reference implementations do."""
    return int(count * sparsity + 1e-6)


def _prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim with the k lowest scores of each row pruned (stable ties)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=-1, stable=True).indices[..., :k]
        keep.scatter_(-1, idx, False)
    return keep


def keep_mask(score: torch.Tensor, pattern: Pattern, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep-mask (out, in) from importance scores (out, in): higher score = more important.

    scope="row": each output row loses the same number of weights (Wanda's comparison group);
    scope="layer": the whole matrix is ranked at once (magnitude pruning). N:M and group patterns
    are always per row.
    """
    out_f, in_f = score.shape
    score = score.float()
    if pattern.kind == "nm":
        pattern.check_shape(in_f)
        blocks = score.reshape(out_f, in_f // pattern.m, pattern.m)  # (out, in/M, M)
        return _prune_lowest(blocks, pattern.m - pattern.n).reshape(out_f, in_f)
    if pattern.kind == "group":
        pattern.check_shape(in_f)
        g = pattern.group
        gscore = score.reshape(out_f, in_f // g, g).sum(-1)  # (out, in/G)
        gkeep = _prune_lowest(gscore, n_pruned(in_f // g, sparsity))
        return gkeep.repeat_interleave(g, dim=1)  # (out, in)
    if scope == "layer":
        return _prune_lowest(score.reshape(1, -1), n_pruned(score.numel(), sparsity)).reshape(out_f, in_f)
    if scope == "row":
        return _prune_lowest(score, n_pruned(in_f, sparsity))
    raise ValueError(f"unknown scope {scope!r}")


def satisfies(keep: torch.Tensor, pattern: Pattern, sparsity: float, scope: str = "row") -> bool:
    """True when `keep` has exactly the structure and count that keep_mask would produce."""
    out_f, in_f = keep.shape
    if pattern.kind == "nm":
        return bool((keep.reshape(out_f, -1, pattern.m).sum(-1) == pattern.n).all())
    if pattern.kind == "group":
        g = keep.reshape(out_f, -1, pattern.group)
        whole = (g.all(-1) | ~g.any(-1)).all()
        kept = g.all(-1).sum(-1)
        return bool(whole and (kept == in_f // pattern.group - n_pruned(in_f // pattern.group, sparsity)).all())
    if scope == "layer":
        return int((~keep).sum()) == n_pruned(keep.numel(), sparsity)
    return bool(((~keep).sum(-1) == n_pruned(in_f, sparsity)).all())
