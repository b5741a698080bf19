"""SliceGPT (arXiv 2401.15024) on a model that stays on disk: the same passes as transforms/slicegpt.py,
each block read when it is reached, its norms fused, rotated and sliced against the calibration
activations the sliced blocks before it produced, written straight into the output and freed. The
embedding is read, rotated and written a chunk of rows at a time before the first block, the head (the
final norm folded into it) after the last. Shared rotation walks the dense blocks once for its covariance
first. Peak memory: one block, the calibration activations and a chunk of the embedding or head being
rotated, whatever the depth of the model; the output's shapes are known before any weight is read (the sliced
config built on the meta device), so its shards are planned up front as for pruning (lazy.ShardWriter).
"""
from __future__ import annotations

import copy
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import arch as archmod
from . import lazy, onload, outdir, walker
from .errors import LLMPruneError
from .sliced import on_meta
from .transforms import fuse, slicegpt

SLICED, RECOVERED = ".sliced", ".recovered"  # scratch folders inside the output's temporary folder


class SlicedOutput:
    """What slicegpt.slice_blocks needs of the model (as slicegpt.InMemory), read from `lz` block by block,
    each finished block written into `folder` in `save_dtype` and freed."""

    def __init__(self, lz: lazy.LazyModel, pl: Plan, dev: torch.device, folder: Path, save_dtype: torch.dtype,
                 checkpoints=None, prefix: str = ""):
        self.lz, self.lay, self.dev, self.folder, self.cfg, self.save_dtype = lz, pl.lay, dev, folder, pl.cfg, save_dtype
        self.model = lz.model
        self.blocks = archmod.get(self.model, pl.lay.blocks)
        self.dtype = lz.dtype
        self.writer = lazy.ShardWriter(folder, specs(pl.out, save_dtype), pl.unit)
        self.unit, self.prefix = pl.unit, prefix  # (the folder's path inside the output's, for the checkpoints)
        self.store = onload.block_store(lz)
        self._skeleton = self._state = None
        # checkpoints (resume.Checkpoints): committed after blocks (with what the blocks after them need) and after
        # the head; a killed run's taken over (`restore`, `resumed`)
        self.ck = checkpoints and checkpoints.begin("slice", self)

    def catch(self, ids, batch_size: int):
        with walker.onload(self.model, onload.block_store(self.lz)):
            return walker.catch(self.model, ids, batch_size, device=self.dev)

    def covariance(self, ids, batch_size: int):
        """The shared rotation's covariance pass over the blocks with their norms folded, as the model in memory
        is fused before it (the same stream, rounded the same way)."""
        store = onload.block_store(self.lz)
        read = store.load_block

        def load_block(i, device, exclude=()):
            read(i, device, exclude)
            self._fold(i)

        store.load_block = load_block
        with walker.onload(self.model, store):
            return slicegpt._shared_cov(self.model, self.lay, ids, batch_size, self.dev)

    def _fold(self, i: int) -> None:
        """Fold block i's norm scales into the linears that read them (fuse.fold), as fuse_norms does."""
        block = self.blocks[i]
        for norm, readers in self.lay.reads:
            if i == 0:  # the norms' class, checked on their weights now that they are read
                fuse.check_norm(self.model, f"{self.lay.blocks}.0.{norm}", archmod.get(block, norm))
            fuse.fold(archmod.get(block, norm), [archmod.get(block, r) for r in readers])

    def block(self, i: int) -> nn.Module:
        self._skeleton = copy.deepcopy(self.blocks[i])  # on meta: what the model holds again once written
        self.store.load_block(i, self.dev)
        self._fold(i)
        return self.blocks[i]

    @torch.no_grad()
    def done(self, i: int, block: nn.Module, state: dict) -> None:
        for n, t in block.state_dict(prefix=f"{self.lay.blocks}.{i}.").items():
            self.writer.add(n, t.to(self.save_dtype) if t.is_floating_point() else t)
        self.store.release_block(i)
        self.blocks[i] = self._skeleton
        self._state = state
        if self.ck is not None and i < len(self.blocks) - 1:  # (after the last block: once the head is written)
            xs = state.get("xs", [])
            self.ck.after(i, [*xs, state["q"], *([state["q_head"]] if "q_head" in state else [])],
                          {"kept": state["kept"], "xs": len(xs)}, {}, 0)

    @torch.no_grad()
    def _rotated(self, src: str, dest: str, q: torch.Tensor, scale: float = 1.0, fold=None) -> None:
        """Tensor `src` (vocabulary rows) rotated (slicegpt._rotated_rows) into `dest`, read and written a chunk of
        slicegpt.ROWS rows at a time: a 70B model's embedding is 4 GiB in fp32, 8 GiB with its rotated copy."""
        n = self.writer.spec[dest][0][0]
        for r in range(0, n, slicegpt.ROWS):
            rows = self.lz.files.rows(src, r, r + slicegpt.ROWS, self.dtype)
            self.writer.add_rows(dest, r, slicegpt._rotated_rows(rows, q, scale, fold).to(self.save_dtype))

    def embedding(self, q: torch.Tensor) -> None:
        name = f"{self.lay.embed}.weight"
        self._rotated(name, name, q)

    @torch.no_grad()
    def head(self, q: torch.Tensor, scale: float, eps: float) -> None:
        """The head, the final norm's scale folded in (fuse.fold) and rotated; the final norm's scale set to 1."""
        norm = copy.deepcopy(archmod.get(self.model, self.lay.norm)).to_empty(device="cpu")
        g = self.lz.files.get(f"{self.lay.norm}.weight", self.dtype)
        norm.weight.copy_(g)
        fuse.check_norm(self.model, self.lay.norm, norm)
        head = f"{self.lay.head}.weight"
        self._rotated(head if head in self.lz.files else f"{self.lay.embed}.weight", head, q, scale, g)  # tied: embed
        self.writer.add(f"{self.lay.norm}.weight", torch.ones(q.shape[1], dtype=self.save_dtype))
        if self.ck is not None:
            self.ck.after(len(self.blocks) - 1, None, {"kept": self._state["kept"]}, {}, 0)

    # --- checkpoints (resume.py), as onload.Output's ---

    def resumed(self) -> tuple[int, dict | None]:
        """(the first block to slice, what the blocks before left: slicegpt.InMemory.resumed) of a killed run."""
        if self.ck is None or not self.ck.start:
            return 0, None
        infos: dict = {}
        self.ck.seed(infos, {})
        state = {"kept": infos["kept"]}
        if self.ck.start < len(self.blocks):
            saved, k = self.ck.hidden("cpu"), infos["xs"]
            state.update(q=saved[k], **({"xs": saved[:k]} if k else {"q_head": saved[k + 1]}))
        return self.ck.start, state

    def ready(self) -> bool:
        return True

    def sync(self) -> dict[str, int]:
        return {f"{self.prefix}{f}": n for f, n in self.writer.sync().items()}

    def snapshot(self) -> dict:
        return {}

    def restore(self, _s: dict, start: int) -> None:
        """Go on after block `start` - 1: the embedding and the blocks before are in the files (the head and the
        final norm too when `start` is past the last block)."""
        def written(name: str) -> bool:
            i = self.unit(name)
            return i < start if i is not None else name == f"{self.lay.embed}.weight" or start == len(self.blocks)

        self.writer.written([n for n in self.writer.spec if written(n)])

    def finish(self, tokenizer) -> None:
        self.writer.finish()
        self.cfg.dtype = str(self.save_dtype).replace("torch.", "")
        outdir.save_side_files(self.folder, self.cfg, getattr(self.model, "generation_config", None), tokenizer)

    def close(self) -> None:
        self.store.close()


@dataclass
class Plan:
    """What SliceGPT makes of `lz`, worked out on the meta device before any weight is read (`plan`)."""
    lay: object  # the layout (arch.Arch)
    hidden: int
    new_dim: int
    head_width: int
    cfg: object  # the sliced model's config
    manifest: dict  # what rebuild_per_block needs (slicegpt.configure)
    out: nn.Module  # the sliced model on the meta device: its tensors' names and shapes

    def unit(self, name: str) -> int | None:
        """The block a tensor belongs to (None: outside the blocks)."""
        return archmod.block_index(self.lay.blocks, name)


def plan(lz: lazy.LazyModel, slicing, ids) -> Plan:
    """SliceGPT of `lz` under the SliceConfig `slicing`, planned; refuses (one line) what it cannot slice from disk."""
    model = lz.model
    lay = slicegpt.check(model, ids, slicing.rotation)
    hidden = archmod.get(model, lay.embed).weight.shape[1]
    d = slicegpt.new_dim_for(hidden, slicing.slicing, slicing.round_to, getattr(model.config, "num_attention_heads", 1))
    head_width = d if slicing.slice_head else hidden
    cfg = copy.deepcopy(model.config)
    head_dim = archmod.get(archmod.get(model, lay.blocks)[0], lay.attn).head_dim
    manifest = slicegpt.configure(cfg, len(archmod.get(model, lay.blocks)), hidden, d, slicing.rotation, head_width,
                                  head_dim)
    pl = Plan(lay, hidden, d, head_width, cfg, manifest, on_meta(cfg, lz.dtype))  # the output's tensors
    extra = sorted({n for n in pl.out.state_dict(keep_vars=True) if pl.unit(n) is None}
                   - {f"{lay.embed}.weight", f"{lay.norm}.weight", f"{lay.head}.weight"})
    if extra:
        raise LLMPruneError(f"SliceGPT from disk writes the embedding, the final norm and the head outside the decoder "
                            f"blocks, and this model also has {extra[0]} there: use --onload whole")
    return pl


def specs(out: nn.Module, save_dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of every tensor of the sliced output, floats in `save_dtype`."""
    return [(n, tuple(t.shape), save_dtype if t.is_floating_point() else t.dtype)
            for n, t in out.state_dict(keep_vars=True).items()]


def disk_needed(pl: Plan, fmt: str, save_dtype: torch.dtype, dtype: torch.dtype, recover: bool,
                activations: int = 0) -> dict:
    """What slicing from disk (`transform`) writes into the output's folder at most, in bytes (exact), by part,
    for the disk check before any work: a dense output's tensors in `save_dtype`, the scratch folders in the compute
    `dtype` (sliced; recovered when a packed format follows PERP: both there at once), and `activations` (a
    checkpoint's, twice); a packed output is smaller and not counted, as for pruning (onload.disk_needed)."""
    size = lambda dt: sum(math.prod(shape) * t.itemsize for _, shape, t in specs(pl.out, dt))
    dt = str(dtype).replace("torch.", "")
    parts = {}
    if fmt != "dense" or recover:
        parts[f"the sliced model in {dt}"] = size(dtype)
    if fmt != "dense" and recover:
        parts[f"the recovered model in {dt}"] = size(dtype)
    if fmt == "dense":
        parts["the output"] = size(save_dtype)
    if activations:
        parts["checkpoints"] = 2 * activations
    return parts


def transform(p, lz: lazy.LazyModel, pl: Plan, ids, timer, folder: Path, tok, save_dtype: torch.dtype, train=None,
              where=None, checkpoints=None) -> dict:
    """Slice the model of `lz` as planned (`plan`) block by block into `folder` (weights, config, tokenizer);
    returns the manifest's sections as pipeline.transform does for the model in memory. PERP (`train`, placed by
    `where`: onload.recover_plan of `pl.out`) and a packed format read the sliced model from a scratch folder in
    the compute dtype (the model in memory's exact weights), as `llmprune recover` and `pack` read a saved output:
    one block at a time from disk (PERP: straight to where it trains); `remove_scratch` removes them.
    `checkpoints` (resume.Checkpoints): the slicing pass commits checkpoints, or goes on from a killed run's, and so
    does packing after it (not with scale tuning); PERP's result counts as a finished pass once written."""
    c = p.cfg
    packs = c.format != "dense"
    dest = folder / SLICED if packs or train else folder
    dest.mkdir(exist_ok=True)
    out = SlicedOutput(lz, pl, torch.device(p.device), dest, save_dtype if dest == folder else lz.dtype, checkpoints,
                       "" if dest == folder else f"{SLICED}/")
    try:
        with timer("compress_s"):
            kept = slicegpt.slice_blocks(out, pl.lay, ids.to(p.device), pl.hidden, pl.new_dim, c.slicegpt.rotation,
                                         c.calib_batch, c.progress, pl.head_width, lz.model.config.rms_norm_eps)
    finally:
        out.close()
    with timer("save_s"):
        out.finish(tok)
    params = lambda m: sum(t.numel() for t in m.parameters())
    info = slicegpt.info_of(c.slicegpt.rotation, pl.hidden, pl.new_dim, pl.head_width, pl.manifest, ids.numel(),
                            lz.tied, params(lz.model), params(pl.out), kept)
    info.update(slicing=c.slicegpt.slicing, round_to=c.slicegpt.round_to, slicing_actual=1 - pl.new_dim / pl.hidden)
    sec = {"solver": "slicegpt", "slicegpt": info, "steps": ["slice"]}
    if train:
        src, dest = dest, folder / RECOVERED if packs else folder
        dest.mkdir(exist_ok=True)
        written = _Written(dest, f"{RECOVERED}/" if packs else "")
        if checkpoints is not None and checkpoints.finished("recover"):  # trained and written by the killed run
            sec["recover"] = checkpoints.keep["recover"]
            checkpoints.begin("recover", written)
        else:
            sl = lazy.LazyModel(src, lz.dtype)
            with timer("recover_s"):
                onload.load_placed(sl, p.devices, where)
                sec["recover"] = train(sl.model, where)
            with timer("save_s"):
                onload.write_model(sl, tok, dest, lz.dtype if packs else save_dtype)
            if checkpoints is not None:
                checkpoints.keep["recover"] = sec["recover"]
                checkpoints.passed("recover", written)
        sec["steps"].append("recover")
    if packs:  # GPTQ sees the calibration the slicing saw (the manifest's `calibration`)
        sl = lazy.LazyModel(dest, lz.dtype)
        sec["format"] = onload.pack(sl, tok, folder, c.format, p.quant, c.group_size, c.symmetric, save_dtype, p.gptq,
                                    ids, None, p.devices, c.calib_batch, c.progress, timer, checkpoints)
    return sec


class _Written:
    """A folder PERP's result was written into in one go, as resume.Checkpoints.passed takes it (onload.Output's
    checkpoint methods): its files synced and counted (`prefix`: its path inside the output's folder)."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix

    def ready(self) -> bool:
        return True

    def sync(self) -> dict[str, int]:
        files = sorted(self.folder.glob("*.safetensors"))
        lazy.fsync(files)
        return {f"{self.prefix}{f.name}": f.stat().st_size for f in files}

    def snapshot(self) -> dict:
        return {}

    def restore(self, _s: dict, _start: int) -> None:
        pass


def remove_scratch(folder: Path) -> None:
    """The scratch folders `transform` left in the output's folder (kept until the output is complete: a killed run's
    checkpoint counts on them)."""
    for name in (SLICED, RECOVERED):
        shutil.rmtree(folder / name, ignore_errors=True)
