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


def _names(fmt: str) -> list[str]:
    return [k.rstrip("?") for k in _FORMATS[fmt].kernel]


# --- the pure-torch path: the formats engineer's spec ---------------------------------------------

def _reference(fmt: str, x: Tensor, args: tuple[Tensor | None, ...], bias: Tensor | None) -> Tensor:
    from llmprune.kernels import reference

    packed = {k: t for k, t in zip(_names(fmt), args) if t is not None}  # w4s50: the reference reads gidx
    return reference.linear(fmt, x, packed, bias)


# --- the Triton path ------------------------------------------------------------------------------

def triton_linear(fmt: str, x: Tensor, packed: Mapping, bias: Tensor | None = None, config=None) -> Tensor:
    """Run the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1). Rejects shapes it cannot tile."""
    args, out = unpack_args(fmt, x, packed)
    return _triton(fmt, x, args, out, bias, config)


def _triton(fmt: str, x: Tensor, args: tuple, out: int, bias: Tensor | None, config=None) -> Tensor:
    from llmprune.kernels import triton_gemm as tg

    in_f = x.shape[-1]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LLMPruneError(f"packed kernels take fp16/bf16/fp32 activations, got {x.dtype}")
    if in_f % 16:
        raise LLMPruneError(f"the Triton {fmt} kernel needs in_features divisible by 16, got {in_f}; "
                            f"leave this layer dense or use the reference path (device cpu)")
    f = _FORMATS[fmt]
    names = _names(fmt)
    G, has_z, kg = 16, False, 0
    if f.quantized and f.fixed_group is None:  # per-group scales over the inputs
        s = args[names.index("scales")]
        G, has_z = in_f // s.shape[1], args[-1] is not None
        if G & (G - 1) or G < 16:
            raise LLMPruneError(f"the Triton {fmt} kernel needs a power-of-two group size >= 16, got {G}; "
                                f"repack with --group-size 128")
    if "gidx" in names:
        kg = args[names.index("gidx")].shape[1]
    tensors = tg.pointer_roles(args)
    x2d = x.reshape(-1, in_f).contiguous()  # (M, in)
    dtype = x.dtype
    if tg.interpreting() and dtype == torch.bfloat16:  # numpy has no bf16: compute through fp32
        x2d = x2d.float()
        tensors = tuple(t.float() if t.dtype == torch.bfloat16 else t for t in tensors)
        bias = bias.float() if bias is not None else None
    if bias is not None:
        bias = bias.contiguous()
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], out))
    y = tg.launch(fmt, x2d, tensors, out, in_f, kg, G, has_z, bias, config)  # (M, out)
    return y.to(dtype).reshape(*x.shape[:-1], out)


# --- custom ops: one per format, CPU -> reference, CUDA -> Triton, fake -> shape only -------------

def _schema(fmt: str) -> str:
    args = ", ".join(f"Tensor{'?' if k.endswith('?') else ''} {k.rstrip('?')}" for k in _FORMATS[fmt].kernel)
    return f"(Tensor x, {args}, Tensor? bias) -> Tensor"


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


def linear(fmt: str, x: Tensor, packed: Mapping, bias: Tensor | None = None) -> Tensor:
    """y (..., out) = x (..., in) @ W^T + bias, W packed in `fmt`. Triton on CUDA, reference elsewhere."""
    args, _ = unpack_args(fmt, x, packed)
    return _OPS[fmt](x, *args, bias)
