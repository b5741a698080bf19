"""compressed-tensors `pack-quantized` W4A16: the int4 checkpoint vLLM and SGLang serve (Marlin kernels)
and transformers loads (decompressing on the CPU).

Each decoder linear is stored as compressed-tensors' own compressor writes it (PackedQuantizationCompressor:
`weight_packed` int32, eight signed int4 codes per word, `weight_scale` fp16 per group, `weight_zero_point`
packed the same way when asymmetric, `weight_shape`); llmprune's codes q in [0, 15] with zero point z are
its signed codes q - 8 with zero point z - 8, so the dequantized weights are the source's, exactly (checked
per layer after packing). The head (and any linear the source left dense) is listed in `ignore`.

Where the codes come from:
  w4g128, w4s24   the stored codes, as they are (w4s24's pruned weights become code z: dense int4 groups
                  of the same size reproduce the 2:4 weights exactly; the 2:4 structure is not kept)
  dense, sparse24 quantized on export by llmprune's RTN or GPTQ (quant/), pruned weights held at code z
  w4s50           refused: its groups of 16 have no vLLM kernel (Marlin takes 32, 64, 128)
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import outdir
from ..errors import LLMPruneError
from .source import Source

NAME = "compressed-tensors"
MARLIN_GROUPS = (32, 64, 128)  # the group sizes vLLM's Marlin W4A16 kernels take
PIP = "pip install 'llmprune[export]'"
ASYM_NOTE = ("asymmetric int4 (zero points): vLLM reads it; transformers 5.25 with compressed-tensors 0.20 cannot "
             "(weight_zero_point size mismatch, an upstream bug): repack with --grid sym for transformers")


# config keys that count a Mixture-of-Experts model's routed experts (Qwen-MoE, OLMoE; Mixtral, gpt-oss; DeepSeek)
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def stored_per_expert(model_type: str) -> bool:
    """Whether the family's checkpoints store its experts one linear per expert (transformers' conversion table
    stacks `experts.*.` tensors at load), the layout vLLM's int4 Mixture-of-Experts kernels read."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    return any("experts.*." in p for c in get_checkpoint_conversion_mapping(model_type) or ()
               for p in getattr(c, "source_patterns", ()))


def check_config(cfg) -> None:
    """What the model's config alone decides: a Mixture-of-Experts model is written one int4 linear per expert
    (the checkpoint's own layout, vLLM's), so its family must store experts that way."""
    experts = next((getattr(cfg, k) for k in EXPERT_COUNTS if getattr(cfg, k, None)), None)
    if not experts:
        return
    if not stored_per_expert(cfg.model_type):
        raise LLMPruneError(f"--to {NAME} writes a Mixture-of-Experts model's experts one int4 linear per expert, "
                            f"but {cfg.model_type} checkpoints store its {experts} experts per layer fused: use "
                            f"--to gguf where it writes the family, or serve the dense output")


def check(src: Source, quant: str | None, group_size, symmetric: bool | None) -> str | None:
    """Refuse what this target cannot express, before any model is loaded; returns the quantizer to run
    (None: the source's own codes)."""
    from transformers import AutoConfig

    check_config(AutoConfig.from_pretrained(src.folder))
    if src.fmt == "w4s50":
        raise LLMPruneError(f"{src.folder} is w4s50: its int4 groups of 16 inputs have no vLLM kernel (Marlin "
                            f"takes {', '.join(map(str, MARLIN_GROUPS))}); export the dense output it was packed "
                            f"from (quantized on export with --quant rtn|gptq), or use --to gguf")
    if src.fmt in ("w4g128", "w4s24"):
        if quant is not None or symmetric is not None or group_size != "auto":
            raise LLMPruneError(f"{src.folder} is already int4 ({src.fmt}): its codes are exported as they are; "
                                f"drop --quant / --grid / --group-size")
        groups = sorted({layer["group_size"] for layer in (src.manifest.format or {}).get("layers", {}).values()})
        bad = [g for g in groups if g not in MARLIN_GROUPS]
        if bad:
            raise LLMPruneError(f"{src.folder} has int4 groups of {bad[0]} inputs, which vLLM's Marlin kernels do "
                                f"not take ({', '.join(map(str, MARLIN_GROUPS))}): repack its dense source with "
                                f"--group-size 128 (or 64, 32), or export that dense output with --quant")
        return None
    if group_size != "auto" and group_size not in MARLIN_GROUPS:
        raise LLMPruneError(f"--group-size {group_size}: vLLM's Marlin kernels take groups of "
                            f"{', '.join(map(str, MARLIN_GROUPS))} (or auto)")
    quant = quant or "rtn"
    if quant not in ("rtn", "gptq"):
        raise LLMPruneError(f"unknown --quant {quant!r}: choose rtn or gptq")
    return quant


def scheme_args(group_size: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group_size, symmetric=symmetric,
                            dynamic=False)


def pack_layer(q, scheme) -> dict[str, torch.Tensor]:
    """compressed-tensors' compressor on one layer's codes (quant.Quantized); the result's codes checked."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, unpack_from_int32

    zp = (q.zeros.to(torch.int16) - 8).to(torch.int8)  # (out, in/G): llmprune's z in [0, 15] -> signed
    state = {"weight": q.dequantize(), "weight_scale": q.scales, "weight_zero_point": zp}
    out = PackedQuantizationCompressor.compress(state, scheme)
    signed = (q.codes.to(torch.int16) - 8).to(torch.int8)  # (out, in)
    got = unpack_from_int32(out["weight_packed"], 4, torch.Size(q.codes.shape))
    if not torch.equal(got.to(torch.int8), signed):
        raise LLMPruneError("compressed-tensors packed other int4 codes than llmprune's: this compressed-tensors "
                            f"version differs from the tested one; {PIP}")
    return out


def _groups(grids: dict[str, tuple[int, bool]], blocks: str) -> dict[tuple[int, bool], list[str]]:
    """(group size, symmetric) -> targets: one regex per relative linear name (e.g. mlp.down_proj) when
    every block agrees, else the layers' full names. `grids`: layer -> (group size, symmetric)."""
    by_rel: dict[str, set] = {}
    for name, key in grids.items():
        rel = re.sub(rf"^{re.escape(blocks)}\.\d+\.", "", name)
        by_rel.setdefault(rel, set()).add(key)
    out: dict[tuple[int, bool], list[str]] = {}
    for name, key in grids.items():
        rel = re.sub(rf"^{re.escape(blocks)}\.\d+\.", "", name)
        if len(by_rel[rel]) == 1 and rel != name:
            target = rf"re:.*\.{re.escape(rel)}$"
            if target not in out.setdefault(key, []):
                out[key].append(target)
        else:
            out.setdefault(key, []).append(name)
    return out


def quantization_config(grids: dict[str, tuple[int, bool]], ignore: list[str], blocks: str):
    """One scheme: every linear layer (`targets: ["Linear"]`) but those in `ignore`, as llm-compressor writes
    it and as vLLM finds a Mixture-of-Experts layer's scheme; several: each layer named by its scheme."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups = {}
    keys = set(grids.values())
    by_scheme = {keys.pop(): ["Linear"]} if len(keys) == 1 else _groups(grids, blocks)
    for i, ((g, sym), targets) in enumerate(sorted(by_scheme.items())):
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=scheme_args(g, sym))
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                              ignore=ignore)


def check_marlin(group_size: int) -> None:
    if group_size not in MARLIN_GROUPS:
        raise LLMPruneError(f"a layer's width gives int4 groups of {group_size}, which vLLM's Marlin kernels do not "
                            f"take ({', '.join(map(str, MARLIN_GROUPS))}): pass --group-size 32 (or 64, 128 where "
                            f"they divide every layer)")


def one_scheme_error(why: str) -> LLMPruneError:
    return LLMPruneError(f"vLLM runs a Mixture-of-Experts layer's experts with one int4 scheme, and the model's other "
                         f"layers with the same one when they are listed as \"Linear\", but {why}: pass a --group-size "
                         f"({', '.join(map(str, MARLIN_GROUPS))}) that divides every layer's width")


def moe_group(widths: set[int], group_size) -> int:
    """The one group size of a Mixture-of-Experts export: `group_size`, or for auto the largest Marlin group
    dividing every layer's input width (`widths`); refused when there is none."""
    if group_size == "auto":
        common = [g for g in MARLIN_GROUPS if all(k % g == 0 for k in widths)]
        if not common:
            raise one_scheme_error(f"no group of {', '.join(map(str, MARLIN_GROUPS))} divides every layer's width "
                                   f"({', '.join(map(str, sorted(widths)))})")
        return max(common)
    bad = sorted(k for k in widths if k % group_size)
    if bad:
        raise one_scheme_error(f"groups of {group_size} do not divide a layer of width {bad[0]}")
    return group_size


class Writer:
    """A compressed-tensors folder written as the model's tensors arrive, shard by shard (lazy.ShardBuffer):
    `linear` packs one layer's codes, `tensor` stores anything else in save_dtype, `finish` writes the
    config with its quantization_config. Peak memory: one layer's codes and one unfinished shard."""

    def __init__(self, folder: Path, save_dtype: torch.dtype = torch.float16):
        from ..lazy import ShardBuffer

        self.folder, self.save_dtype = folder, save_dtype
        self.out = ShardBuffer(folder, "model")
        self.grids: dict[str, tuple[int, bool]] = {}  # packed layer -> (group size, symmetric)
        self.schemes: dict[tuple[int, bool], object] = {}
        self.dense: list[str] = []  # layers (as stored) written unquantized: `ignore`
        self.experts: list[str] = []  # packed layers that are experts' projections
        self.expert_dense: list[str] = []  # experts' projections left dense

    @torch.no_grad()
    def linear(self, name: str, q, expert: bool = False) -> None:
        """One layer's codes (quant.Quantized), as compressed-tensors' compressor lays them out; `expert`:
        one expert's projection of a Mixture-of-Experts layer."""
        from compressed_tensors.quantization import QuantizationScheme

        check_marlin(q.group_size)
        key = (q.group_size, q.symmetric)
        if key not in self.schemes:
            self.schemes[key] = QuantizationScheme(targets=["Linear"], weights=scheme_args(*key))
        for k, t in pack_layer(q, self.schemes[key]).items():
            self.out.put(f"{name}.{k}", t)
        self.grids[name] = key
        if expert:
            self.experts.append(name)

    def tensor(self, key: str, t: torch.Tensor, layer: bool = False, expert: bool = False) -> None:
        """Any other tensor, in save_dtype; `layer`: the weight of a layer an engine builds as a linear layer
        (left dense: listed in `ignore`); `expert`: one expert's projection."""
        self.out.put(key, t.to(self.save_dtype) if t.is_floating_point() else t)
        if layer and key.endswith(".weight"):
            (self.expert_dense if expert else self.dense).append(key.removesuffix(".weight"))

    # --- checkpoints (resume.py), as onload.Output's: the files hold whole blocks (each written in `out.unit()`)

    def ready(self) -> bool:
        return not self.out.shard

    def buffer(self):
        """The shard buffer whose tensors not yet in a file a checkpoint keeps (resume.Checkpoints._pending)."""
        return self.out

    def sync(self) -> dict[str, int]:
        return self.out.sync()

    def snapshot(self) -> dict:
        return {"grids": self.grids, "dense": self.dense, "experts": self.experts, "expert_dense": self.expert_dense,
                "files": self.out.files, "nbytes": self.out.nbytes}

    def restore(self, s: dict, _start: int) -> None:
        """Go on from a killed run's snapshot (its files; what it recorded of the layers written)."""
        self.grids = {n: tuple(g) for n, g in s["grids"].items()}
        self.dense, self.experts, self.expert_dense = list(s["dense"]), list(s["experts"]), list(s["expert_dense"])
        self.out.restore(s["files"], s["nbytes"])

    def finish(self, model, tok) -> dict:
        """Config (quantization_config: every nn.Linear not packed is in `ignore`), tokenizer; the
        export section. `model` may be on the meta device."""
        from compressed_tensors.compressors.model_compressors import ModelCompressor

        from .. import arch

        if not self.grids:
            raise LLMPruneError("no linear layer could be packed as int4 groups: nothing to export as W4A16")
        keys = set(self.grids.values())
        if self.experts and (self.expert_dense or len(keys) > 1):
            raise one_scheme_error(f"{self.expert_dense[0]} could not be packed" if self.expert_dense else
                                   f"its layers need int4 groups of {' and '.join(str(g) for g, _ in sorted(keys))}")
        files = self.out.finish()
        written = set(self.dense)  # + linears never written (a tied head)
        ignore = self.dense + [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                               and n not in self.grids and n not in written and f"{n}.weight" not in self.out.files]
        qcfg = quantization_config(self.grids, ignore, arch.arch_of(model).blocks)
        model.config.dtype = self.save_dtype
        outdir.save_side_files(self.folder, model.config, getattr(model, "generation_config", None), tok)
        ModelCompressor(quantization_config=qcfg).update_config(str(self.folder))
        return {"to": NAME, "files": files, "bytes": sum((self.folder / f).stat().st_size for f in files),
                "format": "pack-quantized", "scheme": "W4A16", "layers": len(self.grids), "ignore": ignore,
                "groups": sorted({g for g, _ in keys}), "symmetric": sorted({s for _, s in keys}),
                "dtype": str(self.save_dtype).replace("torch.", ""), "compressed_tensors": _version(),
                **({"note": ASYM_NOTE} if not all(s for _, s in keys) else {})}


def _version() -> str:
    import compressed_tensors

    return compressed_tensors.__version__


def require() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LLMPruneError(f"--to {NAME} needs the compressed-tensors package: {PIP}") from None
