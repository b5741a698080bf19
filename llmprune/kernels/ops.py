"""`linear(fmt, x, packed, bias)`: y = x @ W^T + bias for a weight W stored in a packed format.

Dispatch: Triton kernels (triton_gemm.py) for CUDA tensors, the pure-torch spec
(kernels/reference.py) elsewhere. Each format is a torch custom op `llmprune::<fmt>_linear` with a
fake (meta) implementation, so models using them trace under torch.compile and CUDA graphs
without graph breaks. Triton is imported only when a CUDA kernel runs.

`packed` is the dict of tensors written by llmprune.formats (layouts in triton_gemm.py's
neighbours and formats/): sparse24 {values, meta}; w4g128 {codes, scales, zeros?};
w4s24 {codes, meta, scales, zeros?}; w4s50 {codes, gidx (or bitmap), scales}.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from llmprune.errors import LLMPruneError

FORMATS = ("sparse24", "w4g128", "w4s24", "w4s50")


def _need(packed: Mapping, fmt: str, key: str) -> Tensor:
    if key not in packed:
        raise LLMPruneError(f"packed {fmt} weight lacks {key!r} (has {sorted(packed)}); repack it with "
                            f"llmprune.formats")
    return packed[key]


def _shape_err(fmt: str, what: str, got, want, in_f: int) -> LLMPruneError:
    return LLMPruneError(f"{fmt}: {what} has shape {tuple(got)}, expected {tuple(want)} for {in_f} input "
                         f"features; x's last dimension must equal the packed layer's in_features")


def gidx_from_bitmap(bitmap: Tensor, n_groups: int) -> Tensor:
    """Sorted kept-group indices (out, K) int16 from a w4s50 bitmap (bit j of byte b = group 8b+j)."""
    bits = (bitmap.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=bitmap.device)) & 1  # (out, nb, 8)
    bits = bits.flatten(1)[:, :n_groups].bool()  # (out, n_groups)
    k = int(bits[0].sum()) if bits.shape[0] else 0
    if not bool((bits.sum(1) == k).all()):
        raise LLMPruneError("w4s50: rows keep different numbers of groups; repack with pattern group:16")
    order = torch.argsort((~bits).to(torch.int8), dim=1, stable=True)[:, :k]  # kept groups, ascending
    return order.to(torch.int16)


def unpack_args(fmt: str, x: Tensor, packed: Mapping) -> tuple[tuple[Tensor, ...], int]:
    """Validate shapes against x (..., in) and return the op's tensor arguments and out_features."""
    if fmt not in FORMATS:
        raise LLMPruneError(f"unknown packed format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(packed, Mapping):
        raise LLMPruneError(f"packed weight must be a dict of tensors, got {type(packed).__name__}")
    in_f = x.shape[-1]
    if fmt == "sparse24":
        v, m = _need(packed, fmt, "values"), _need(packed, fmt, "meta")
        out = v.shape[0]
        if in_f % 8:
            raise LLMPruneError(f"sparse24 needs in_features divisible by 8, got {in_f}")
        for name, t, want in (("values", v, (out, in_f // 2)), ("meta", m, (out, in_f // 8))):
            if tuple(t.shape) != want:
                raise _shape_err(fmt, name, t.shape, want, in_f)
        return (v, m), out
    if fmt in ("w4g128", "w4s24"):
        c, s = _need(packed, fmt, "codes"), _need(packed, fmt, "scales")
        z = packed.get("zeros")
        out, ng = s.shape[0], s.shape[1] if s.dim() == 2 else 0
        if ng == 0 or in_f % ng or (in_f // ng) % 8:
            raise LLMPruneError(f"{fmt}: scales {tuple(s.shape)} do not split {in_f} inputs into equal groups "
                                f"of a multiple of 8; use a group size that divides in_features")
        per = 2 if fmt == "w4g128" else 4
        if tuple(c.shape) != (out, in_f // per):
            raise _shape_err(fmt, "codes", c.shape, (out, in_f // per), in_f)
        if z is not None and tuple(z.shape) != tuple(s.shape):
            raise _shape_err(fmt, "zeros", z.shape, s.shape, in_f)
        if fmt == "w4g128":
            return (c, s, z), out
        m = _need(packed, fmt, "meta")
        if tuple(m.shape) != (out, in_f // 8):
            raise _shape_err(fmt, "meta", m.shape, (out, in_f // 8), in_f)
        return (c, m, s, z), out
    # w4s50
    c, s = _need(packed, fmt, "codes"), _need(packed, fmt, "scales")
    if in_f % 16:
        raise LLMPruneError(f"w4s50 needs in_features divisible by 16 (groups of 16), got {in_f}")
    out, k = s.shape[0], (in_f // 16) // 2
    g = packed.get("gidx")
    if g is None:
        g = gidx_from_bitmap(_need(packed, fmt, "bitmap"), in_f // 16)
    for name, t, want in (("scales", s, (out, k)), ("gidx", g, (out, k)), ("codes", c, (out, k * 8))):
        if tuple(t.shape) != want:
            raise _shape_err(fmt, name, t.shape, want, in_f)
    return (c, g, s), out


# --- the pure-torch path: the formats engineer's spec ---------------------------------------------

def _reference(fmt: str, x: Tensor, args: tuple[Tensor | None, ...], bias: Tensor | None) -> Tensor:
    from llmprune.kernels import reference

    keys = {"sparse24": ("values", "meta"), "w4g128": ("codes", "scales", "zeros"),
            "w4s24": ("codes", "meta", "scales", "zeros"), "w4s50": ("codes", "gidx", "scales")}[fmt]
    packed = {k: t for k, t in zip(keys, args) if t is not None}  # w4s50: the reference reads gidx
    return getattr(reference, f"linear_{fmt}")(x, packed, bias)


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
    G, has_z, kg = 16, False, 0
    if fmt == "sparse24":
        tensors = (args[0], args[1], args[1], args[1])
    elif fmt in ("w4g128", "w4s24"):
        s, z = args[1 if fmt == "w4g128" else 2], args[-1]
        G, has_z = in_f // s.shape[1], z is not None
        if G & (G - 1) or G < 16:
            raise LLMPruneError(f"the Triton {fmt} kernel needs a power-of-two group size >= 16, got {G}; "
                                f"repack with --group-size 128")
        zz = z if has_z else s
        tensors = (args[0], args[1], args[2], zz) if fmt == "w4s24" else (args[0], s, zz, s)
    else:
        kg = args[1].shape[1]
        tensors = (args[0], args[1], args[2], args[2])
    tensors = tuple(t.contiguous() for t in tensors)
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

@torch.library.custom_op("llmprune::sparse24_linear", mutates_args=())
def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    return _reference("sparse24", x, (values, meta), bias)


@torch.library.custom_op("llmprune::w4g128_linear", mutates_args=())
def w4g128_linear(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None,
                  bias: Tensor | None) -> Tensor:
    return _reference("w4g128", x, (codes, scales, zeros), bias)


@torch.library.custom_op("llmprune::w4s24_linear", mutates_args=())
def w4s24_linear(x: Tensor, codes: Tensor, meta: Tensor, scales: Tensor, zeros: Tensor | None,
                 bias: Tensor | None) -> Tensor:
    return _reference("w4s24", x, (codes, meta, scales, zeros), bias)


@torch.library.custom_op("llmprune::w4s50_linear", mutates_args=())
def w4s50_linear(x: Tensor, codes: Tensor, gidx: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return _reference("w4s50", x, (codes, gidx, scales), bias)


_OPS = {"sparse24": sparse24_linear, "w4g128": w4g128_linear, "w4s24": w4s24_linear, "w4s50": w4s50_linear}


def _register(fmt: str, op) -> None:
    def cuda_impl(x, *rest):
        *args, bias = rest
        out = args[0].shape[0]
        return _triton(fmt, x, tuple(args), out, bias)

    def fake(x, *rest):
        return x.new_empty((*x.shape[:-1], rest[0].shape[0]))  # out = first packed tensor's rows

    op.register_kernel("cuda")(cuda_impl)
    op.register_fake(fake)


for _fmt, _op in _OPS.items():
    _register(_fmt, _op)


def linear(fmt: str, x: Tensor, packed: Mapping, bias: Tensor | None = None) -> Tensor:
    """y (..., out) = x (..., in) @ W^T + bias, W packed in `fmt`. Triton on CUDA, reference elsewhere."""
    args, _ = unpack_args(fmt, x, packed)
    return _OPS[fmt](x, *args, bias)
