"""Mixture-of-Experts: the experts of a fused experts module as prunable (out, in) matrices, each
with statistics from the tokens its router sent to it.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, DeepSeek-V3 and most
other MoE families as one 3-D parameter per projection in a module decorated by
`transformers.integrations.moe.use_experts_implementation`, which also records the layout:

    gate_up_proj  (experts, 2 I, H), or (experts, H, 2 I) when is_transposed (gpt-oss)
                  gate and up concatenated ([gate; up], is_concatenated) or interleaved
                  (gate0, up0, gate1, ...: gpt-oss); only `up_proj` when not has_gate
    down_proj     (experts, H, I), or (experts, I, H) when is_transposed
    *_bias        (experts, out) when has_bias (gpt-oss)
    forward(hidden (tokens, H), top_k_index (tokens, k), top_k_weights (tokens, k))

Experts classes transformers does not decorate are described in UNDECORATED instead. Llama 4's
(`Llama4TextExperts`) dispatch densely: forward(hidden (experts * tokens, H)), expert e's rows the
e-th (tokens, H) slice, each token scaled by its router score for e: a zero row where the router did
not pick e (sigmoid(-inf)); every expert computes every row. Its routed tokens are its nonzero rows.

Expert e's projections are exposed as `ExpertProj` views named `<experts>[e].gate_proj`,
`<experts>[e].up_proj`, `<experts>[e].down_proj`: their `.weight` is an (out, in) view into the 3-D
parameter (writes go to the model), and a forward hook on the experts module hands each view the
inputs its expert computes on: gate/up see the hidden states of the tokens routed to e
(top_k_index == e), down sees act(gate) * up of those tokens, recomputed with the current weights
(so a sequential solver's down projection sees its pruned gate/up). The router (`mlp.gate` or
`mlp.router`, not an nn.Linear in these families) is never a target: it stays dense.

An expert that received fewer than `min_tokens` calibration tokens is under-calibrated; the
engine (prune.py) then uses one of FALLBACKS for it and records which in the manifest:
  pooled     statistics over every calibration token that reached the layer (the tokens routed to
             any expert), pushed through this expert (`ExpertProj(..., routed=False)`)
  magnitude  no statistics: |W| decides (magnitude pruning) with the same pattern and sparsity
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

FALLBACKS = ("pooled", "magnitude")
MIN_TOKENS = 64  # default: experts with fewer routed calibration tokens take the fallback
GROUPED_MAX_PAIRS = 256  # packed experts on CUDA: grouped launches up to this many (token, expert) pairs (batch 32, top-8)


# Experts classes that `use_experts_implementation` does not decorate, by class name: the layout flags it would
# record, and `dense` dispatch (see the module docstring)
UNDECORATED: dict[str, dict] = {
    "Llama4TextExperts": dict(is_transposed=True, is_concatenated=True, has_gate=True, has_bias=False, dense=True),
}


def flag(experts: nn.Module, name: str, default=False):
    """A layout flag of an experts module (`is_transposed`, `has_gate`, ...): its own, else UNDECORATED's."""
    return getattr(experts, name, UNDECORATED.get(type(experts).__name__, {}).get(name, default))


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D expert weights and the layout flags of
    `use_experts_implementation` (or an UNDECORATED class)."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, nn.Parameter) and down.dim() == 3 and (
        (hasattr(module, "is_transposed") and hasattr(module, "has_gate")) or type(module).__name__ in UNDECORATED))


def dense_dispatch(experts: nn.Module) -> bool:
    """Whether every expert computes every token (Llama 4: forward(hidden (experts * tokens, H)))."""
    return bool(flag(experts, "dense"))


def projections(experts: nn.Module) -> tuple[str, ...]:
    return ("gate_proj", "up_proj", "down_proj") if flag(experts, "has_gate") else ("up_proj", "down_proj")


def num_experts(experts: nn.Module) -> int:
    return experts.down_proj.shape[0]


def _rows(experts: nn.Module, proj: str, out: int):
    """Which rows of the fused (out, in) matrix hold `proj` (a slice: a view, not a copy)."""
    if proj == "down_proj" or not flag(experts, "has_gate"):
        return slice(None)
    half = out // 2
    if flag(experts, "is_concatenated", True):  # [gate; up]
        return slice(0, half) if proj == "gate_proj" else slice(half, out)
    return slice(0, out, 2) if proj == "gate_proj" else slice(1, out, 2)  # interleaved (gpt-oss)


def fused_param(experts: nn.Module, proj: str) -> str:
    """The name of the fused parameter that holds `proj`'s rows: `gate_up_proj`, `up_proj` or `down_proj`."""
    return "down_proj" if proj == "down_proj" else ("gate_up_proj" if flag(experts, "has_gate") else "up_proj")


def _oi(experts: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """(out, in) view of one expert's stored matrix."""
    return w.T if flag(experts, "is_transposed") else w


def proj_view(experts: nn.Module, proj: str, matrix: torch.Tensor) -> torch.Tensor:
    """`proj`'s (out, in) view of `matrix`, one expert's slice of the fused parameter holding it (the parameter's
    own value, or any tensor laid out as it: an export's dense weight, its int4 grid)."""
    full = _oi(experts, matrix)
    return full[_rows(experts, proj, full.shape[0])]


def apply_gate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of (tokens, 2 I) in the experts' layout, as their class computes it."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)  # UNDECORATED classes: concatenated
    return experts.act_fn(gate) * up


def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden (tokens, H), top_k_index (tokens, k)) from an experts forward call; index None for dense dispatch
    (hidden is then (experts * tokens, H))."""
    vals = list(args) + list(kwargs.values())  # forward(hidden, index, weights) under any parameter names
    index = next((v for v in vals[1:] if isinstance(v, torch.Tensor) and not v.is_floating_point()), None)
    return vals[0], index


def experts_hit(hidden: torch.Tensor, index: torch.Tensor | None, n: int) -> list[int]:
    """The experts (of n) an experts call computes for: those of `index` in range; dense dispatch: those with a
    nonzero row."""
    if index is None:
        return hidden.reshape(n, -1, hidden.shape[-1]).ne(0).any(-1).any(-1).nonzero().flatten().tolist()
    return [e for e in index.unique().tolist() if 0 <= e < n]


class ExpertProj:
    """One projection of one expert as the engine sees a linear: weight (out, in), in_features,
    register_forward_hook (inputs from the tokens routed to the expert; all tokens when not routed)."""

    def __init__(self, experts: nn.Module, index: int, proj: str, routed: bool = True):
        if proj not in projections(experts):
            raise KeyError(f"{proj!r} is not a projection of {type(experts).__name__} "
                           f"(has {', '.join(projections(experts))})")
        if not 0 <= index < num_experts(experts):
            raise KeyError(f"expert {index} out of range: {type(experts).__name__} has {num_experts(experts)}")
        self.experts, self.index, self.proj, self.routed = experts, index, proj, routed
        self.owner = experts  # the module whose forward computes this view's output
        which = "down" if proj == "down_proj" else "in"  # gate and up read the same inputs
        self.stats_key = (id(experts), index, which, routed)  # views with one key share one statistics

    def _full(self) -> torch.Tensor:
        return _oi(self.experts, getattr(self.experts, fused_param(self.experts, self.proj)).data[self.index])

    @property
    def weight(self) -> torch.Tensor:
        param = getattr(self.experts, fused_param(self.experts, self.proj))
        return proj_view(self.experts, self.proj, param.data[self.index])  # (out, in) view into the parameter

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.experts, fused_param(self.experts, self.proj) + "_bias", None)
        if b is None or not getattr(self.experts, "has_bias", False):
            return None
        return b.data[self.index][_rows(self.experts, self.proj, b.shape[-1])]

    @property
    def in_features(self) -> int:
        return self._full().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Positions of the tokens routed to this expert: index (tokens, k) -> (n,)."""
        return (index == self.index).any(-1).nonzero().squeeze(-1)

    @torch.no_grad()
    def inputs(self, hidden: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """This projection's inputs (n, in) for one experts call."""
        x = hidden.reshape(-1, hidden.shape[-1])
        if index is None:  # dense dispatch: this expert's rows, a zero row where the router did not pick it
            xs = x.reshape(num_experts(self.experts), -1, x.shape[-1])  # (experts, tokens, H)
            # routed: its nonzero rows; pooled: every token as the experts picked read it (summed over them: with
            # Llama 4's top-1 router, the token scaled by its score)
            x = xs[self.index][xs[self.index].ne(0).any(-1)] if self.routed else xs.sum(0)  # (n, H)
        elif self.routed:
            x = x[self.tokens(index.reshape(-1, index.shape[-1]))]  # (n, H)
        if self.proj != "down_proj":
            return x
        e, p = self.experts, fused_param(self.experts, "up_proj")
        w = _oi(e, getattr(e, p)[self.index])  # (2I or I, H)
        b = getattr(e, p + "_bias")[self.index] if getattr(e, "has_bias", False) else None
        h = F.linear(x, w, b)  # (n, 2I)
        return apply_gate(e, h) if flag(e, "has_gate") else e.act_fn(h)  # (n, I): what down_proj reads

    def register_forward_hook(self, fn):
        """fn(view, (inputs (n, in),), None) after each experts call in which the expert computed (n > 0)."""
        def hook(mod, args, kwargs, out):
            hidden, index = routing(args, kwargs)
            x = self.inputs(hidden, index)
            if x.shape[0]:
                fn(self, (x,), None)

        return self.experts.register_forward_hook(hook, with_kwargs=True)


def row_markers(experts: nn.Module, rel: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Stand-ins for the fused parameters of `experts` (relative name `rel`): per parameter an (experts, rows, 1)
    int32 tensor holding, row by row, the index into the returned list of the view (`rel[e].proj`) that row
    belongs to. Put through a checkpoint conversion in place of the parameters (stored.to_stored), they show
    which stored tensor holds which view, at the cost of one int per row. Stored (in, out) experts: none."""
    if flag(experts, "is_transposed"):
        return {}, []
    marks, views = {}, []
    for proj in projections(experts):
        p = fused_param(experts, proj)
        full = getattr(experts, p)  # (experts, rows, in)
        mark = marks.setdefault(f"{rel}.{p}", torch.full((full.shape[0], full.shape[1], 1), -1, dtype=torch.int32))
        for e in range(full.shape[0]):
            mark[e, _rows(experts, proj, full.shape[1]), 0] = len(views)
            views.append(f"{rel}[{e}].{proj}")
    return marks, views


def expert_name(view_name: str) -> str:
    """'model.layers.0.mlp.experts[3].down_proj' -> 'model.layers.0.mlp.experts[3]'."""
    return view_name.rsplit(".", 1)[0]


def view_names(experts_rel: str, experts: nn.Module) -> list[str]:
    """Relative names of every expert's projections, expert by expert."""
    return [f"{experts_rel}[{e}].{p}" for e in range(num_experts(experts)) for p in projections(experts)]


def resolve(experts: nn.Module, inner: str, rest: str) -> ExpertProj:
    """'3', '.gate_proj' -> the ExpertProj of expert 3's gate projection."""
    return ExpertProj(experts, int(inner), rest.lstrip("."))


def pooled(view: ExpertProj) -> ExpertProj:
    """The same projection fed every token that reached the layer (the `pooled` fallback)."""
    return ExpertProj(view.experts, view.index, view.proj, routed=False)


def fallbacks(targets: dict, stats: dict, min_tokens: int, fallback: str, record: dict) -> dict[str, str]:
    """{target name: fallback} for the experts' projections among `targets` whose expert received
    fewer than max(min_tokens, 1) routed tokens (an expert without tokens always falls back: its
    statistics are empty). Every expert seen is recorded once in `record`:
    {expert name: {"tokens": routed tokens, "stats": "routed" | fallback}}."""
    use = {}
    for name, t in targets.items():
        if not isinstance(t, ExpertProj):
            continue
        n = stats[name].n
        low = n < max(min_tokens, 1)
        record.setdefault(expert_name(name), {"tokens": n, "stats": fallback if low else "routed"})
        if low:
            use[name] = fallback
    return use


def check_fallback(fallback: str, min_tokens: int) -> None:
    from .errors import LLMPruneError

    if fallback not in FALLBACKS:
        raise LLMPruneError(f"--expert-fallback {fallback!r}: use {' or '.join(FALLBACKS)}")
    if not (isinstance(min_tokens, int) and min_tokens >= 0):
        raise LLMPruneError(f"--expert-min-tokens {min_tokens!r} must be a whole number >= 0 (0: only "
                            f"experts without tokens fall back)")


# ----------------------------------------------------------------------------------------- packed experts
_VIEW = re.compile(r"^(.*)\[(\d+)\]\.([^.\[\]]+)$")  # `<experts>[e].<proj>`


def parse_view(name: str) -> tuple[str, int, str] | None:
    """'model.layers.0.mlp.experts[3].down_proj' -> ('model.layers.0.mlp.experts', 3, 'down_proj'); None for a name
    that is not an expert's projection (a fused projection's part `qkv_proj[q]` is not: its index is no number)."""
    m = _VIEW.match(name)
    return (m[1], int(m[2]), m[3]) if m else None


def stored_name(name: str) -> str:
    """Where a packed output stores layer `name`: an expert's projection 'model.layers.0.mlp.experts[3].down_proj'
    as 'model.layers.0.mlp.experts.3.down_proj' (the name SplitExperts gives the module), any other layer (a
    fused projection's part `qkv_proj[q]` included) under its own name."""
    v = parse_view(name)
    return f"{v[0]}.{v[1]}.{v[2]}" if v else name


def covered_params(experts: nn.Module, views) -> list[str]:
    """Names of the fused parameters of `experts` (`gate_up_proj`, `down_proj`, ...) every row of which belongs to
    one of `views` ({(expert, projection)}): their values can be rebuilt from those views alone."""
    every: dict[str, bool] = {}
    for e in range(num_experts(experts)):
        for proj in projections(experts):
            p = fused_param(experts, proj)
            every[p] = every.get(p, True) and (e, proj) in views
    return [p for p, all_in in every.items() if all_in]


def packable(experts: nn.Module) -> str | None:
    """None when SplitExperts computes what `experts` computes; else why not."""
    if getattr(experts, "has_post_expert_norm", False):
        return "normalizes each expert's output (has_post_expert_norm)"
    return None


class SplitExperts(nn.ModuleList):
    """A fused experts module as one module per expert holding `gate_proj`, `up_proj`, `down_proj` linears
    (`up_proj`, `down_proj` without a gate), so that a packed output stores and runs each expert's projections
    as packed linears (PackedLinear) where the fused module has 3-D parameters. Built on the meta device from the
    fused module (`SplitExperts(fused)`), its linears are then placed by the loader. Its forward is that of
    transformers' eager experts: per expert hit, its tokens through up (and gate, combined by the fused class's
    own `_apply_gate`, so gpt-oss' clamped SwiGLU too), down, times the routing weight, summed per token; dense
    dispatch (Llama 4): each expert's nonzero rows of its slice through it, the other rows zero, as its class does."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        for e in range(num_experts(fused)):
            expert = nn.Module()
            for proj in projections(fused):
                v = ExpertProj(fused, e, proj)
                expert.add_module(proj, nn.Linear(v.in_features, v.out_features, bias=v.bias is not None,
                                                  device="meta", dtype=v.weight.dtype))
            self.append(expert)
        self.has_gate, self.is_concatenated = flag(fused, "has_gate"), flag(fused, "is_concatenated", True)
        self.dense = dense_dispatch(fused)
        self.projections = projections(fused)
        object.__setattr__(self, "_fused", fused)  # for its gate function only: not a submodule, no weights used
        self.grouped = "auto"  # grouped kernels: "auto" (CUDA, up to GROUPED_MAX_PAIRS pairs), "always", "never"
        self._stacks: dict[str, tuple] = {}  # proj -> (format, stacked kernel tensors, stacked bias): stack_()

    # -- the experts' packed tensors stacked, for the grouped kernels -------------------------------------------
    def stack_(self) -> bool:
        """Stack each projection's packed tensors over the experts ((experts, out, ...), the layout of the grouped
        kernels, kernels.ops.grouped_linear) and make every expert's buffers views of the stacks: one copy, not
        two. False, nothing changed, when the experts are not all packed alike (a projection left dense)."""
        from .errors import LLMPruneError
        from .kernels import ops
        from .modules import PackedLinear

        stacks = {}
        for proj in self.projections:
            lins = [getattr(ex, proj) for ex in self]
            if (not all(isinstance(m, PackedLinear) for m in lins) or len({m.format for m in lins}) != 1
                    or len({m.bias is None for m in lins}) != 1):
                return False
            try:
                args, _ = ops.stack_args(lins[0].format, lins[0].in_features, [m.packed for m in lins])
            except LLMPruneError:
                return False
            bias = None if lins[0].bias is None else torch.stack([m.bias.detach() for m in lins])
            stacks[proj] = (lins[0].format, args, bias)
        self._stacks = stacks
        self._bind()
        return True

    def _bound(self):
        """(projection, 'buffer' | 'bias', tensor name, stack) of every stack the experts' tensors are views of."""
        from .kernels import ops

        for proj, (fmt, args, bias) in self._stacks.items():
            for name, t in zip(ops.kernel_names(fmt), args):
                if t is not None:
                    yield proj, "buffer", name, t
            if bias is not None:
                yield proj, "bias", "bias", bias

    def _bind(self) -> None:
        for proj, kind, name, t in self._bound():
            for e, ex in enumerate(self):
                lin = getattr(ex, proj)
                if kind == "bias":
                    lin.bias = nn.Parameter(t[e], requires_grad=False)
                elif name in lin._buffers:  # w4s50: the stored bitmap stays the expert's own
                    lin._buffers[name] = t[e]
        self._probe_key = next(self._bound())[:3]  # looked up on every forward: no generator then
        object.__setattr__(self, "_probe", self._held())  # a plain reference (a Parameter would register)

    def _held(self):
        """The last expert's tensor that the first stack's view was bound to."""
        proj, kind, name = self._probe_key
        lin = getattr(self[-1], proj)
        return lin.bias if kind == "bias" else lin._buffers.get(name)

    def _stacked(self) -> bool:
        """Whether the experts still hold views of the stacks (a tensor moved on its own, not with the module,
        unbinds them; then the experts run one by one)."""
        return bool(self._stacks) and self._held() is self._probe

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .half() ...: apply `fn` to the stacks once and rebind the experts' views (applied to each
        view, the stacks would be copied twice)."""
        if not self._stacked():
            self._stacks = {}
            return super()._apply(fn, recurse)
        for proj, kind, name, _ in self._bound():
            for ex in self:
                (getattr(ex, proj)._parameters if kind == "bias" else getattr(ex, proj)._buffers)[name] = None
        self._stacks = {p: (f, tuple(None if t is None else fn(t) for t in a), None if b is None else fn(b))
                        for p, (f, a, b) in self._stacks.items()}
        super()._apply(fn, recurse)
        self._bind()
        return self

    def _use_grouped(self, x: torch.Tensor, pairs: int) -> bool:
        if self._stacks and not self._stacked():
            self._stacks = {}  # unbound: let the stacks go once the experts no longer view them
        if self.grouped == "never" or not self._stacks:
            return False
        return self.grouped == "always" or (x.is_cuda and pairs <= GROUPED_MAX_PAIRS)

    def _grouped(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every (token, expert) pair at once: three grouped launches (gate, up, down), the experts read on the
        device, no host synchronization (a CUDA graph captures it). An index out of range masks its pair out."""
        from .kernels import ops

        T, k = index.shape
        valid = (index >= 0) & (index < len(self))
        ids = torch.where(valid, index, 0).reshape(-1).to(torch.int32)

        def run(proj, inp, xdiv):
            fmt, args, bias = self._stacks[proj]
            return ops.grouped_linear(fmt, inp, ids, xdiv, args, bias)

        up = run("up_proj", x, k)  # (T k, I)
        h = self._gate(run("gate_proj", x, k), up) if self.has_gate else self._fused.act_fn(up)
        d = run("down_proj", h, 1).reshape(T, k, -1)  # (T, k, H)
        return (d * (weights * valid).to(d.dtype)[..., None]).sum(1).to(x.dtype)

    def _gate(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """act(gate) * up as the fused class computes it from its (tokens, 2 I) layout."""
        h = torch.cat([g, u], -1) if self.is_concatenated else torch.stack([g, u], -1).flatten(-2)
        return apply_gate(self._fused, h)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """forward(hidden (tokens, H), top_k_index (tokens, k), top_k_weights (tokens, k)), any parameter names."""
        if self.dense:
            return self._dense(hidden)
        vals = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
        index = next(v for v in vals if not v.is_floating_point())
        weights = next(v for v in vals if v.is_floating_point())
        x = hidden.reshape(-1, hidden.shape[-1])
        index, weights = index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        if self._use_grouped(x, index.numel()):
            return self._grouped(x, index, weights).reshape(hidden.shape)
        out = torch.zeros_like(x)
        for e in index.unique().tolist():  # experts hit (an index out of range masks a token out)
            if not 0 <= e < len(self):
                continue
            tok, pos = torch.where(index == e)
            ex, xe = self[e], x[tok]
            h = self._gate(ex.gate_proj(xe), ex.up_proj(xe)) if self.has_gate else self._fused.act_fn(ex.up_proj(xe))
            out.index_add_(0, tok, (ex.down_proj(h) * weights[tok, pos, None]).to(out.dtype))
        return out.reshape(hidden.shape)

    def _dense(self, hidden: torch.Tensor) -> torch.Tensor:
        """Dense dispatch: hidden (experts * tokens, H), expert e's the e-th slice; a zero row computes zero (no
        biases), so only the nonzero rows run."""
        xs = hidden.reshape(len(self), -1, hidden.shape[-1])  # (experts, tokens, H)
        out = torch.zeros_like(xs)
        for e in experts_hit(hidden, None, len(self)):
            ex, tok = self[e], xs[e].ne(0).any(-1).nonzero().squeeze(-1)
            xe = xs[e, tok]  # (n, H)
            h = self._gate(ex.gate_proj(xe), ex.up_proj(xe)) if self.has_gate else self._fused.act_fn(ex.up_proj(xe))
            out[e, tok] = ex.down_proj(h).to(out.dtype)
        return out.reshape(hidden.shape)


def view_linear(experts: nn.Module, index: int, proj: str) -> nn.Linear:
    """Expert `index`'s projection `proj` of a fused experts module as an nn.Linear whose weight and bias are
    Parameters viewing the fused parameters' rows (no copy; frozen)."""
    v = ExpertProj(experts, index, proj)
    lin = nn.Linear(v.in_features, v.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(v.weight, requires_grad=False)
    lin.bias = None if v.bias is None else nn.Parameter(v.bias, requires_grad=False)
    return lin


def view_split(experts: nn.Module) -> SplitExperts:
    """A fused experts module as a SplitExperts whose projections are `view_linear`s of its rows."""
    split = SplitExperts(experts)
    for e, expert in enumerate(split):
        for proj in split.projections:
            setattr(expert, proj, view_linear(experts, e, proj))
    return split


def has_zeros(experts: nn.Module) -> bool:
    """Whether any expert weight of a fused experts module holds a zero (was pruned); False on the meta device."""
    return any(p.dim() == 3 and p.device.type != "meta" and not bool(p.detach().all())
               for p in experts.parameters(recurse=False))


@contextmanager
def split_linears(model: nn.Module, paths):
    """Inside the `with`, each fused experts module named in `paths` as its `view_split` (each expert's projection
    an nn.Linear whose weight and bias view the fused rows), so that what works on nn.Linear layers
    (PERP's adapters, its bias training) reaches the experts; their names `<experts>.<e>.<proj>` (stored_name). The
    fused parameters let their storage go meanwhile (the linears hold it). On exit each fused module is back, its
    parameters (the same Parameter objects) rebuilt from the linears' weights and biases as they are then: whatever
    training wrote, whichever device and dtype placement left them on."""
    fused = {p: model.get_submodule(p) for p in dict.fromkeys(paths)}
    done, shapes = {}, {}
    try:
        for path, f in fused.items():
            split = done[path] = view_split(f)
            model.set_submodule(path, split)
            for p in f.parameters(recurse=False):
                shapes[p] = p.shape
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        yield done
    finally:  # one module's experts copied and let go at a time: never a second copy of every expert
        for path in list(done):
            split, f = done.pop(path), fused[path]
            ref = split[0].down_proj.weight
            for p in f.parameters(recurse=False):
                p.data = torch.empty(shapes[p], dtype=p.dtype, device=ref.device)
            with torch.no_grad():
                for e, expert in enumerate(split):
                    for proj in split.projections:
                        v, lin = ExpertProj(f, e, proj), getattr(expert, proj)
                        v.weight.copy_(lin.weight)
                        if lin.bias is not None:
                            v.bias.copy_(lin.bias)
                        for t in (lin.weight, lin.bias):  # (the split's storage, whoever still holds the linear)
                            if t is not None:
                                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            model.set_submodule(path, f)


def packed_experts(model: nn.Module, section: dict, folder) -> dict[str, nn.Module]:
    """{name: fused experts module} of those a packed output lists in its format section's `experts` (PackWriter:
    their experts stored one linear each); one that config.json's model lacks is a damaged folder."""
    from .errors import LLMPruneError

    out = {}
    for n in section.get("experts") or ():
        try:
            out[n] = model.get_submodule(n)
        except AttributeError:
            out[n] = None
        if not is_fused_experts(out[n]):
            raise LLMPruneError(f"{folder}/llmprune.json lists packed experts {n}, which the model of its config.json "
                                f"does not have: the folder is inconsistent, re-create it")
    return out


def stack_packed(model: nn.Module) -> int:
    """SplitExperts.stack_ for every split experts module of `model`; how many were stacked."""
    return sum(m.stack_() for m in model.modules() if isinstance(m, SplitExperts))


def split(model: nn.Module, experts: dict[str, nn.Module] | None = None) -> None:
    """Replace fused experts modules ({name: module}; None: every one of `model`) by their SplitExperts, whose
    linears are on the meta device until placed."""
    if experts is None:
        experts = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    for n, m in experts.items():
        model.set_submodule(n, SplitExperts(m))


def split_packed(model: nn.Module, section: dict, folder) -> None:
    """Replace every fused experts module a packed output lists (packed_experts) by its SplitExperts."""
    split(model, packed_experts(model, section, folder))
