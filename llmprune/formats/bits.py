"""Bit-level helpers shared by the formats: int4 nibbles, 2:4 metadata, group bitmaps.

Pure torch, vectorized over rows; the layouts are the ones documented in formats/__init__.py.
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..patterns import Pattern, keep_mask


def check_2d(weight: torch.Tensor, what: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LLMPruneError(f"{what} must be a 2-D (out, in) tensor, got {getattr(weight, 'shape', type(weight))}")


def check_keep(weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
    if keep is None:
        return None
    if tuple(keep.shape) != tuple(weight.shape):
        raise LLMPruneError(f"keep-mask shape {tuple(keep.shape)} differs from the weight's {tuple(weight.shape)}")
    return keep.to(device=weight.device, dtype=torch.bool)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., n) integers in [0, 15] -> (..., n/2) uint8; the low nibble holds the even position."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)  # (..., n/2)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """(..., n/2) uint8 -> (..., n) uint8 in [0, 15] (inverse of pack_nibbles)."""
    return torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)  # (..., n)


def keep_24(weight: torch.Tensor, keep: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """The 2:4 keep-mask to pack with: `keep` checked, or inferred from the weight's non-zeros.

    Inference pads blocks with fewer than two non-zeros with zero entries (packed exactly), and
    rejects a block with more than two non-zeros (the weight is not 2:4 pruned).
    """
    out_f, in_f = weight.shape
    if in_f % 8:
        raise LLMPruneError(
            f"{fmt} needs in_features divisible by 8 (one metadata byte per 8 inputs), got {in_f}: "
            f"leave this layer dense or use --format w4g128"
        )
    if keep is None:
        nz = weight != 0
        keep = keep_mask(nz.float(), Pattern("nm", n=2, m=4), 0.5)  # non-zeros first, zeros pad
        if (nz & ~keep).any():
            raise LLMPruneError(
                f"{fmt}: the weight has more than 2 non-zeros in some block of 4 inputs: prune it with "
                f"--pattern 2:4 first, or pass its keep-mask"
            )
        return keep
    if not bool((keep.reshape(out_f, in_f // 4, 4).sum(-1) == 2).all()):
        raise LLMPruneError(f"{fmt}: the keep-mask is not 2:4 (exactly 2 kept in every 4 inputs): prune with --pattern 2:4")
    return keep


def kept_index_24(keep: torch.Tensor) -> torch.Tensor:
    """(out, in) 2:4 keep-mask -> (out, in/2) int64 column indices of the kept weights, ascending."""
    out_f, in_f = keep.shape
    blocks = keep.reshape(out_f, in_f // 4, 4)  # (out, in/4, 4)
    # stable sort of 0 (kept) before 1 (pruned): the two kept positions, in input order
    pos = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices[..., :2]  # (out, in/4, 2)
    base = torch.arange(0, in_f, 4, device=keep.device)[None, :, None]
    return (pos + base).reshape(out_f, in_f // 2)  # (out, in/2)


def encode_meta_24(idx: torch.Tensor) -> torch.Tensor:
    """(out, in/2) kept column indices -> (out, in/8) uint8 metadata.

    Per group of 4 inputs a nibble: first kept position in bits 0-1, second in bits 2-3; the even
    group of a byte in its low nibble.
    """
    out_f, half = idx.shape
    pos = (idx % 4).to(torch.uint8).reshape(out_f, half // 2, 2)  # (out, in/4, 2)
    nib = pos[..., 0] | (pos[..., 1] << 2)  # (out, in/4)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)  # (out, in/8)


def decode_meta_24(meta: torch.Tensor) -> torch.Tensor:
    """(out, in/8) uint8 metadata -> (out, in/2) int64 column indices of the kept weights."""
    out_f, nbytes = meta.shape
    nib = torch.stack((meta & 15, meta >> 4), dim=-1).reshape(out_f, 2 * nbytes)  # (out, in/4)
    pos = torch.stack((nib & 3, (nib >> 2) & 3), dim=-1).long()  # (out, in/4, 2)
    base = torch.arange(0, 8 * nbytes, 4, device=meta.device)[None, :, None]
    return (pos + base).reshape(out_f, 4 * nbytes)  # (out, in/2)


def meta_24_valid(meta: torch.Tensor) -> bool:
    """Every nibble names two distinct positions in ascending order (a corrupted file fails this)."""
    nib = torch.stack((meta & 15, meta >> 4), dim=-1)
    return bool(((nib & 3) < ((nib >> 2) & 3)).all())


def pack_bitmap(bits: torch.Tensor) -> torch.Tensor:
    """(out, n) bool -> (out, ceil(n/8)) uint8; bit j of byte b is entry 8b + j."""
    out_f, n = bits.shape
    pad = torch.zeros(out_f, -n % 8, dtype=torch.bool, device=bits.device)
    b = torch.cat((bits, pad), 1).reshape(out_f, -1, 8).to(torch.uint8)  # (out, ceil(n/8), 8)
    weights = (1 << torch.arange(8, device=bits.device)).to(torch.uint8)
    return (b * weights).sum(-1, dtype=torch.uint8)  # (out, ceil(n/8)), no overflow: bits are distinct


def unpack_bitmap(bitmap: torch.Tensor, n: int) -> torch.Tensor:
    """(out, ceil(n/8)) uint8 -> (out, n) bool."""
    shifts = torch.arange(8, device=bitmap.device, dtype=torch.uint8)
    bits = (bitmap[..., None] >> shifts) & 1  # (out, ceil(n/8), 8)
    return bits.reshape(bitmap.shape[0], -1)[:, :n].bool()


def nbytes(packed: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


def quantized(weight: torch.Tensor, keep: torch.Tensor, group_size: int, symmetric: bool, quant, fmt: str):
    """The int4 codes to pack: `quant` (e.g. from GPTQ) checked against the layer, or RTN of the weight."""
    from ..quant.rtn import check_group, rtn

    check_group(weight.shape[1], group_size)
    if quant is None:
        return rtn(weight, keep, group_size, symmetric)
    if tuple(quant.codes.shape) != tuple(weight.shape) or quant.group_size != group_size:
        raise LLMPruneError(
            f"{fmt}: the quantized codes {tuple(quant.codes.shape)} / group {quant.group_size} do not match the "
            f"layer {tuple(weight.shape)} / group {group_size}: quantize with the same --group-size"
        )
    if quant.symmetric != symmetric:
        raise LLMPruneError(f"{fmt}: codes are {'' if quant.symmetric else 'a'}symmetric but the format wants "
                            f"{'' if symmetric else 'a'}symmetric: quantize with the format's setting")
    return quant


# --- shared by the formats' kernel_args / random -------------------------------------------------
def need(packed, fmt: str, key: str) -> torch.Tensor:
    if key not in packed:
        raise LLMPruneError(f"packed {fmt} weight lacks {key!r} (has {sorted(packed)}); repack it with "
                            f"llmprune.formats")
    return packed[key]


def shape_err(fmt: str, what: str, got, want, in_f: int) -> LLMPruneError:
    return LLMPruneError(f"{fmt}: {what} has shape {tuple(got)}, expected {tuple(want)} for {in_f} input "
                         f"features; x's last dimension must equal the packed layer's in_features")


def check_shapes(fmt: str, in_f: int, tensors: dict) -> None:
    """tensors: name -> (tensor, expected shape)."""
    for name, (t, want) in tensors.items():
        if tuple(t.shape) != tuple(want):
            raise shape_err(fmt, name, t.shape, want, in_f)


def group_count(fmt: str, in_f: int, scales: torch.Tensor) -> int:
    """Scale groups per row, checked: equal groups of a multiple of 8 inputs."""
    ng = scales.shape[1] if scales.dim() == 2 else 0
    if ng == 0 or in_f % ng or (in_f // ng) % 8:
        raise LLMPruneError(f"{fmt}: scales {tuple(scales.shape)} do not split {in_f} inputs into equal groups "
                            f"of a multiple of 8; use a group size that divides in_features")
    return ng


_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def random_meta_24(out_f: int, in_f: int, device, g) -> torch.Tensor:
    """Valid random 2:4 metadata (out, in/8)."""
    pairs = torch.tensor(_PAIRS, device=device)
    sel = pairs[torch.randint(6, (out_f, in_f // 4), generator=g, device=device)]  # (out, in/4, 2)
    nib = sel[..., 0] | (sel[..., 1] << 2)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)  # (out, in/8)


def random_u8(shape, device, g) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=g, dtype=torch.int32, device=device).to(torch.uint8)


def random_scales(shape, device, g) -> torch.Tensor:
    return (torch.rand(*shape, generator=g, device=device) * 0.01 + 1e-3).half()
