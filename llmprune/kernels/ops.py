"""`linear(fmt, x, packed, bias)`: y = x @ W^T + bias for a weight W stored in a packed format.

Dispatch: Triton kernels (triton_gemm.py) for CUDA tensors, the pure-torch spec
(kernels/reference.py) elsewhere. Each format of the registry (llmprune.formats) is a torch custom
op `llmprune::<fmt>_linear(x, <the format's kernel tensors>, bias)` with a fake (meta)
implementation, so models using them trace under torch.compile and CUDA graphs without graph
breaks. Triton is imported only when a CUDA kernel runs.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from llmprune import formats
from llmprune.errors import LLMPruneError

FORMATS = tuple(formats.names())
_FORMATS = {n: formats.get(n) for n in FORMATS}  # resolved once: dynamo traces linear() without imports


def gidx_from_bitmap(bitmap: Tensor, n_groups: int) -> Tensor:
    """Sorted kept-group indices (out, K) int16 from a w4s50 bitmap (bit j of byte b = group 8b+j)."""
    from llmprune.formats.w4s50 import gidx_from_bitmap as g

    return g(bitmap, n_groups)


def unpack_args(fmt: str, x: Tensor, packed: Mapping) -> tuple[tuple[Tensor, ...], int]:
    """Validate shapes against x (..., in) and return the op's tensor arguments and out_features."""
    if fmt not in FORMATS:
        raise LLMPruneError(f"unknown packed format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(packed, Mapping):
        raise LLMPruneError(f"packed weight must be a dict of tensors, got {type(packed).__name__}")
    return _FORMATS[fmt].kernel_args(x.shape[-1], packed)


def kernel_names(fmt: str) -> list[str]:
    """The format's kernel tensors, in the order the ops take them."""
    return [k.rstrip("?") for k in _FORMATS[fmt].kernel]


# --- the pure-torch path: the formats engineer's spec ---------------------------------------------

def _reference(fmt: str, x: Tensor, args: tuple[Tensor | None, ...], bias: Tensor | None) -> Tensor:
    from llmprune.kernels import reference

    packed = {k: t for k, t in zip(kernel_names(fmt), args) if t is not None}  # w4s50: the reference reads gidx
    return reference.linear(fmt, x, packed, bias)


# --- the Triton path ------------------------------------------------------------------------------

def triton_linear(fmt: str, x: Tensor, packed: Mapping, bias: Tensor | None = None, config=None) -> Tensor:
    """Run the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1). Rejects shapes it cannot tile."""
    args, out = unpack_args(fmt, x, packed)
    return _triton(fmt, x, args, out, bias, config)


def _kernel_params(fmt: str, x: Tensor, args: tuple) -> tuple[int, bool, int]:
    """(group size G, zero points?, kept groups KG) the Triton kernels take for `fmt`; rejects what they cannot tile.
    `args` per expert (out, ...) or stacked (experts, out, ...)."""
    in_f = x.shape[-1]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LLMPruneError(f"packed kernels take fp16/bf16/fp32 activations, got {x.dtype}")
    if in_f % 16:
        raise LLMPruneError(f"the Triton {fmt} kernel needs in_features divisible by 16, got {in_f}; "
                            f"leave this layer dense or use the reference path (device cpu)")
    f = _FORMATS[fmt]
    names = kernel_names(fmt)
    G, has_z, kg = 16, False, 0
    if f.quantized and f.fixed_group is None:  # per-group scales over the inputs
        s = args[names.index("scales")]
        G, has_z = in_f // s.shape[-1], args[-1] is not None
        if G & (G - 1) or G < 16:
            raise LLMPruneError(f"the Triton {fmt} kernel needs a power-of-two group size >= 16, got {G}; "
                                f"repack with --group-size 128")
    if "gidx" in names:
        kg = args[names.index("gidx")].shape[-1]
    return G, has_z, kg


def _interpretable(x2d: Tensor, tensors: tuple, bias: Tensor | None) -> tuple:
    """numpy has no bf16: under the interpreter compute through fp32."""
    from llmprune.kernels import triton_gemm as tg

    if tg.interpreting() and x2d.dtype == torch.bfloat16:
        x2d = x2d.float()
        tensors = tuple(t.float() if t.dtype == torch.bfloat16 else t for t in tensors)
        bias = bias.float() if bias is not None else None
    return x2d, tensors, (bias.contiguous() if bias is not None else None)


def _triton(fmt: str, x: Tensor, args: tuple, out: int, bias: Tensor | None, config=None) -> Tensor:
    from llmprune.kernels import triton_gemm as tg

    in_f = x.shape[-1]
    G, has_z, kg = _kernel_params(fmt, x, args)
    x2d, tensors, bias = _interpretable(x.reshape(-1, in_f).contiguous(), tg.pointer_roles(args), bias)  # (M, in)
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], out))
    y = tg.launch(fmt, x2d, tensors, out, in_f, kg, G, has_z, bias, config)  # (M, out)
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


# --- grouped (Mixture-of-Experts decode): one launch for every (token, expert) pair ------------------------

def stack_args(fmt: str, in_features: int, packs: list[Mapping]) -> tuple[tuple[Tensor | None, ...], int]:
    """The experts' kernel tensors (each expert's validated by the format) stacked (experts, out, ...) in the
    format's kernel order, and out_features; the experts must agree in shape (one layer, many experts)."""
    per = [unpack_args(fmt, torch.empty(0, in_features, device="meta"), p) for p in packs]
    outs = {o for _, o in per}
    shapes = {tuple(None if t is None else tuple(t.shape) for t in a) for a, _ in per}
    if len(outs) != 1 or len(shapes) != 1:
        raise LLMPruneError(f"{fmt} experts of different shapes cannot be stacked: {sorted(shapes, key=str)[:2]}")
    stacked = tuple(None if per[0][0][i] is None else torch.stack([a[i] for a, _ in per])
                    for i in range(len(per[0][0])))
    return stacked, outs.pop()


def _grouped_reference(fmt: str, x: Tensor, ids: Tensor, xdiv: int, args: tuple, bias: Tensor | None) -> Tensor:
    """The spec: row p = x[p // xdiv] @ W_{ids[p]}^T (+ b), expert by expert through the reference linear."""
    rows = torch.arange(ids.shape[0], device=ids.device) // xdiv
    y = x.new_empty((ids.shape[0], args[0].shape[1]))
    for e in ids.unique().tolist():
        p = (ids == e).nonzero().squeeze(-1)
        y[p] = _reference(fmt, x[rows[p]], tuple(None if t is None else t[e] for t in args),
                          None if bias is None else bias[e])
    return y


def triton_grouped_linear(fmt: str, x: Tensor, ids: Tensor, xdiv: int, args: tuple, bias: Tensor | None = None,
                          config=None) -> Tensor:
    """The grouped Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1): x (T, in), ids (P,) int32 with
    P = T * xdiv or xdiv = 1, args stacked (stack_args), bias (experts, out) -> y (P, out)."""
    from llmprune.kernels import triton_gemm as tg

    in_f = x.shape[-1]
    G, has_z, kg = _kernel_params(fmt, x, args)
    x2d, tensors, bias = _interpretable(x.contiguous(), tg.pointer_roles(args), bias)
    y = tg.launch_grouped(fmt, x2d, ids.to(torch.int32).contiguous(), xdiv, tensors, args[0].shape[1], in_f, kg,
                          G, has_z, bias, config)
    return y.to(x.dtype)


MAX_PAIRS = 65535  # the grouped launch's grid axis 2


def _check_grouped(x: Tensor, ids: Tensor, xdiv: int) -> None:
    if x.dim() != 2 or ids.dim() != 1 or xdiv < 1 or ids.shape[0] != x.shape[0] * xdiv:
        raise LLMPruneError(f"grouped linear: x (tokens, in) {tuple(x.shape)} and ids (tokens x {xdiv},) "
                            f"{tuple(ids.shape)} do not agree")
    if ids.shape[0] > MAX_PAIRS:
        raise LLMPruneError(f"grouped linear of {ids.shape[0]} (token, expert) pairs: one launch takes at most "
                            f"{MAX_PAIRS}; run the experts one by one (SplitExperts.grouped = 'auto')")


# --- custom ops: one per format, CPU -> reference, CUDA -> Triton, fake -> shape only -------------

def _schema(fmt: str, grouped: bool = False) -> str:
    args = ", ".join(f"Tensor{'?' if k.endswith('?') else ''} {k.rstrip('?')}" for k in _FORMATS[fmt].kernel)
    return f"(Tensor x, {'Tensor ids, int xdiv, ' if grouped else ''}{args}, Tensor? bias) -> Tensor"


def _make_op(fmt: str):
    def impl(x, *rest):  # CPU and any other device: the reference
        *args, bias = rest
        return _reference(fmt, x, tuple(args), bias)

    op = torch.library.custom_op(f"llmprune::{fmt}_linear", impl, mutates_args=(), schema=_schema(fmt))

    def cuda_impl(x, *rest):
        *args, bias = rest
        return _triton(fmt, x, tuple(args), args[0].shape[0], bias)

    def fake(x, *rest):
        return x.new_empty((*x.shape[:-1], rest[0].shape[0]))  # out = first packed tensor's rows

    op.register_kernel("cuda")(cuda_impl)
    op.register_fake(fake)
    return op


_OPS = {fmt: _make_op(fmt) for fmt in FORMATS}


def _make_grouped_op(fmt: str):
    def impl(x, ids, xdiv, *rest):  # CPU and any other device: the reference
        *a, bias = rest
        return _grouped_reference(fmt, x, ids, xdiv, tuple(a), bias)

    op = torch.library.custom_op(f"llmprune::{fmt}_grouped_linear", impl, mutates_args=(), schema=_schema(fmt, True))

    def cuda_impl(x, ids, xdiv, *rest):
        *a, bias = rest
        return triton_grouped_linear(fmt, x, ids, xdiv, tuple(a), bias)

    op.register_kernel("cuda")(cuda_impl)
    op.register_fake(lambda x, ids, xdiv, *rest: x.new_empty((ids.shape[0], rest[0].shape[1])))
    return op


_GROUPED_OPS = {fmt: _make_grouped_op(fmt) for fmt in FORMATS}


def grouped_linear(fmt: str, x: Tensor, ids: Tensor, xdiv: int, args: tuple, bias: Tensor | None = None) -> Tensor:
    """y (P, out): row p = x[p // xdiv] @ W_{ids[p]}^T (+ bias[ids[p]]) for experts' weights packed in `fmt`
    and stacked (stack_args); x (tokens, in), ids (P,) int32 in [0, experts) (not checked: that would read them on
    the host), P = tokens * xdiv. Triton on CUDA (one launch, no host synchronization), the reference elsewhere."""
    _check_grouped(x, ids, xdiv)
    return _GROUPED_OPS[fmt](x, ids, xdiv, *args, bias)


def linear(fmt: str, x: Tensor, packed: Mapping, bias: Tensor | None = None) -> Tensor:
    """y (..., out) = x (..., in) @ W^T + bias, W packed in `fmt`. Triton on CUDA, reference elsewhere."""
    args, _ = unpack_args(fmt, x, packed)
    return _OPS[fmt](x, *args, bias)
