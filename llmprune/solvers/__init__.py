"""Solver registry: name -> Solver. Each solver is a pure function in its own file.

A solver takes one linear layer's weight (out, in), the statistics the engine collected for it,
the pattern and the layer's sparsity, and returns the new weight and its keep-mask. The engine also
passes `layer=` (the linear's full name) and the user's solver options as keywords; a solver
ignores the ones it does not use (`**_`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import LLMPruneError


class Solved(NamedTuple):
    weight: torch.Tensor  # (out, in), zeros where keep is False
    keep: torch.Tensor  # (out, in) bool, True = the weight stays
    info: dict  # per-layer facts for the manifest (e.g. dampening raised)


@dataclass(frozen=True)
class Solver:
    name: str
    fn: Callable[..., Solved]
    needs: frozenset = field(default_factory=frozenset)  # statistics: norms | moments | hessian
    # True: linears of a block are solved group by group (q,k,v -> o -> gate,up -> down) so later
    # groups see inputs from already-pruned ones (SparseGPT's "true sequential").
    sequential: bool = False
    cite: str = ""
    # Optional: statistics needed for given options (e.g. DSnoT's init solver adds its own needs).
    needs_fn: Callable[[dict], frozenset] | None = None
    # Optional: whether the given options make it sequential (DSnoT follows its init solver).
    sequential_fn: Callable[[dict], bool] | None = None

    def needs_for(self, opts: dict) -> frozenset:
        return self.needs_fn(opts) if self.needs_fn else self.needs

    def sequential_for(self, opts: dict) -> bool:
        return self.sequential_fn(opts) if self.sequential_fn else self.sequential


def _registry() -> dict[str, Solver]:
    from . import magnitude, wanda

    solvers = [magnitude.SOLVER, wanda.SOLVER]
    for mod in ("sparsegpt", "alps", "dsnot"):  # added by their own files when present
        try:
            solvers.append(__import__(f"{__name__}.{mod}", fromlist=["SOLVER"]).SOLVER)
        except ModuleNotFoundError:
            pass
    return {s.name: s for s in solvers}


def get(name: str) -> Solver:
    reg = _registry()
    if name not in reg:
        raise LLMPruneError(f"unknown solver {name!r}: choose one of {', '.join(sorted(reg))}")
    return reg[name]


def names() -> list[str]:
    return sorted(_registry())
