"""The pipeline's stages for models that stay on disk (sequential onloading, arXiv-free plumbing in
the spirit of llm-compressor's sequential pipeline and SparseGPT's layer-by-layer `llama_eval`).

The model is a lazy.LazyModel on the meta device; every pass over it (OWL's outlier pass, the
solver's pass, GPTQ's) walks the blocks through walker.onload: a block's weights are read when the
block is reached, in the compute dtype, and freed after it. The pass that finishes a block writes
it straight into the output (dense shards or packed tensors); when another pass follows (PERP or GPTQ
after pruning), blocks go to a scratch folder inside the output's temporary folder instead and are read
back from there. Evaluation walks the saved output the same way. Peak memory: one block, the
calibration (or evaluation) activations, and one unfinished output shard. PERP is the exception that
trains the whole model: its blocks are read straight onto the devices that train them (`load_placed`,
planned by placement.py), only those that stream from CPU memory staying there.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import arch as archmod
from . import lazy, moe, outdir, placement, stored, walker
from .errors import LLMPruneError
from .runinfo import trim_heap

SCRATCH = ".blocks"  # inside the output's temporary folder
CODES = ".codes"  # GPTQ's codes waiting for scale tuning, there too
EVAL_ACTIVATIONS = 2 * 2**30  # evaluation windows walked together: at most this many bytes of hidden states


def eval_budget(device) -> int:
    """Bytes of hidden states an evaluation walks together in one pass over the weights: EVAL_ACTIVATIONS,
    or on a GPU what a walk keeps there (walker.activation_home: inputs and outputs within
    walker.ACTIVATIONS_ON_DEVICE of its memory) when that is more. Fewer passes, fewer reads of the
    model from disk: a 70B model's WikiText-2 windows (141 x 2048 tokens, 4.7 GB in bf16) walk in one
    pass on an 80 GB GPU instead of three."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return EVAL_ACTIVATIONS
    return max(EVAL_ACTIVATIONS, int(walker.ACTIVATIONS_ON_DEVICE * walker.device_memory(dev)) // 2)


def open_model(spec: str, dtype: str):
    """(LazyModel on the meta device, tokenizer, models.ModelInfo) for anything --model accepts."""
    from . import models

    info = models.resolve(spec)
    tok = models.tokenizer(info.path)
    lz = lazy.LazyModel(info.path, getattr(torch, dtype))
    return lz, tok, info


def stored_as_in_memory(lz: lazy.LazyModel) -> str | None:
    """None when every tensor of the model can be read block by block, else why not. Tensors stored under
    other names are read converted as transformers' whole load converts them (a Mixture-of-Experts block's
    experts: stored one linear per expert, fused in memory; stored.py), inside the decoder blocks; what
    converts otherwise only a whole load reads."""
    bad = lz.unreadable()
    if bad:
        return (f"the checkpoint stores {bad} under other names that transformers converts when it loads the "
                f"whole model")
    return None


def open_output(folder: str | Path, dtype: str, manifest: dict) -> tuple[lazy.LazyModel | None, str | None]:
    """(a LazyModel of an llmprune output or model folder, None) when it can be walked block by
    block, else (None, why it only loads whole): some checkpoints store tensors under names transformers
    converts at load. A SliceGPT output's residual shortcuts are rebuilt from its config (sliced.on_meta) and
    stay dense (arch.is_dense: not pruned, quantized or adapted)."""
    packed = (manifest.get("format") or {}).get("name", "dense") != "dense"
    section = manifest.get("format") if packed else None
    lz = lazy.LazyModel(folder, getattr(torch, dtype), section)
    why = stored_as_in_memory(lz)
    return (None, why) if why else (lz, None)


def block_store(lz: lazy.LazyModel, sink=None) -> lazy.BlockStore:
    """What walker.onload needs to walk `lz` block by block (`sink(i, block)`: each finished block)."""
    a = archmod.arch_of(lz.model)
    late = () if lz.tied else (a.head,)
    return lazy.BlockStore(lz, a.blocks, late=(*late, a.norm), sink=sink, read_ahead=True)


def disk_needed(lz: lazy.LazyModel, fmt: str, save_dtype: torch.dtype, scratch: bool, activations: int) -> dict:
    """What a compression from disk writes into its output's folder at most, in bytes, by part: a dense
    output's tensors (exact; a packed output is smaller and not counted), the pruned blocks in the compute
    dtype when another pass follows (`scratch`: GPTQ, PERP), and `activations` (a checkpoint's, twice: the
    next one is written before the last is removed)."""
    meta = lz.model.state_dict(keep_vars=True)
    head = f"{archmod.arch_of(lz.model).head}.weight"
    blocks = f"{archmod.arch_of(lz.model).blocks}."
    parts = {}
    if fmt == "dense":
        parts["the output"] = sum(meta[n].numel() * (save_dtype.itemsize if meta[n].is_floating_point()
                                                     else meta[n].dtype.itemsize)
                                  for n in lz.names() if not (lz.tied and n == head))
    if scratch:
        parts[f"the pruned blocks in {str(lz.dtype).replace('torch.', '')}"] = sum(
            meta[n].numel() * lz.dtype.itemsize for n in lz.names(blocks))
    if activations:
        parts["checkpoints"] = 2 * activations
    return parts


def tune_bytes(model: nn.Module, ids: torch.Tensor, group_size, checkpoints: bool) -> dict:
    """What GPTQ with scale tuning from disk (gptq_tuned) writes into the output's folder besides the output, in
    bytes, by part, at most (every weight matrix of the blocks counted as quantized, `--group-size auto` as the
    smallest group): GPTQ's codes (a byte a weight, 3 bytes a group for its scale and zero point) and the tuned
    scales (fp16); with `checkpoints`, the teacher's hidden states (fp32) and two training checkpoints (a scale
    offset and Adam's two moments a group, fp32)."""
    from .formats import GROUPS

    blocks = f"{archmod.arch_of(model).blocks}."
    n = sum(t.numel() for k, t in model.state_dict(keep_vars=True).items() if k.startswith(blocks) and t.dim() >= 2)
    groups = n // (group_size if isinstance(group_size, int) else min(GROUPS))
    parts = {"GPTQ's codes and tuned scales": n + 3 * groups + 2 * groups}
    if checkpoints:
        parts["the teacher's hidden states"] = ids.numel() * model.config.hidden_size * 4
        parts["scale tuning's checkpoints"] = 2 * 12 * groups
    return parts


# --- the output, written block by block ----------------------------------------------------------

class Output:
    """Receives every finished block (`block`) and, at the end, what lies outside the blocks
    (`outside`); counts the zeros of the pruned linears on the way (measured sparsity)."""

    def __init__(self, lz: lazy.LazyModel, folder: Path, fmt: str, save_dtype: torch.dtype, targets: list[str],
                 packer=None, shard_bytes: int | None = None):
        self.lz, self.folder, self.fmt, self.save_dtype, self.packer = lz, folder, fmt, save_dtype, packer
        self.targets = set(targets)
        self.zeros = self.total = 0
        self.counting = True  # off for a pass after the pruning's (GPTQ rounds some kept weights to 0)
        self.outside_written = False
        a = archmod.arch_of(lz.model)
        self.blocks = a.blocks
        names = lz.names()
        self.out_names: dict[str, str] = {}
        if fmt == "dense":  # the blocks' tensors under the names save_pretrained stores them (stored.py)
            meta = lz.model.state_dict(keep_vars=True)
            head = f"{a.head}.weight"
            units: list[list[str]] = []  # names in state-dict order, a block's together
            for n in names:
                if not (lz.tied and n == head):
                    if units and self._unit(n) is not None and self._unit(n) == self._unit(units[-1][0]):
                        units[-1].append(n)
                    else:
                        units.append([n])
            # (outside the blocks, each tensor alone: renamed where transformers renames it, Nemotron-H's backbone.)
            self.out_names = {u[0]: lz.stored_name(u[0]) for u in units if self._unit(u[0]) is None}
            as_stored = lambda u: (stored.to_stored(lz.model, u) if self._unit(next(iter(u))) is not None else
                                   {self.out_names[n]: t for n, t in u.items()})
            specs = [(n, tuple(t.shape), save_dtype if t.is_floating_point() else t.dtype) for unit in units
                     for n, t in as_stored({n: meta[n] for n in unit}).items()]
            self.writer = lazy.ShardWriter(folder, specs, self._unit, shard_bytes)

    def _unit(self, name: str):
        """The block a tensor belongs to (None: outside the blocks)."""
        return archmod.block_index(self.blocks, name)

    def _count(self, prefix: str, module: nn.Module) -> None:
        """Zeros of this block's pruning targets (linears, parts of fused projections, experts)."""
        from .prune import zeros_of

        if not self.counting:
            return
        zeros, total = zeros_of(self.lz.model, [n for n in self.targets if n.startswith(prefix)])
        self.zeros += zeros
        self.total += total

    @torch.no_grad()
    def block(self, i: int, module: nn.Module, quantized: dict | None = None) -> None:
        prefix = f"{self.blocks}.{i}."
        self._count(prefix, module)
        if self.fmt == "dense":
            self._dense_block(module.state_dict(prefix=prefix))
            return
        done = set()
        with self.packer.out.unit():
            for n, m in module.named_modules():
                if isinstance(m, nn.Linear) and not archmod.is_dense(n):  # stays dense
                    full = prefix + n
                    self.packer.add_linear(full, m, quantized=(quantized or {}).get(full))
                    done |= {f"{n}.weight", f"{n}.bias"}
                elif moe.is_fused_experts(m):
                    done |= {k[len(prefix):] for k in self.packer.add_experts(prefix + n, m, quantized)}
            for n, t in module.state_dict().items():
                if n not in done:
                    self.packer.add_tensor(prefix + n, t)

    def _add(self, name: str, t: torch.Tensor) -> None:
        self.writer.add(name, t.to(self.save_dtype) if t.is_floating_point() else t)

    def _dense_block(self, state: dict[str, torch.Tensor]) -> None:
        """A block's tensors as the checkpoint stores them (stored.py). Fused experts are cut into their stored
        linears one at a time (stored.rows_of), so no more than one of them is held beside the block; a
        conversion that moves more than rows is reverted as a whole."""
        fused = {n: tuple(t.shape) for n, t in state.items() if n not in self.writer.spec}
        rows = None
        if fused:
            parts = stored.to_stored(self.lz.model, {n: torch.empty(s, device="meta") for n, s in fused.items()})
            rows = stored.rows_of(self.lz.model, fused, {k: tuple(t.shape) for k, t in parts.items()})
        if rows is None:
            for n, t in stored.to_stored(self.lz.model, state).items():
                self._add(n, t)
            return
        for n, t in state.items():
            if n not in fused:
                self._add(n, t)
        for k, (n, at, width) in rows.items():
            t = state[n]
            self._add(k, t.reshape(-1, width).index_select(0, at.to(t.device)).reshape(parts[k].shape))

    # --- checkpoints (resume.py) ---

    def ready(self) -> bool:
        """Whether the files hold every block handed over so far (packed: nothing waits in the shard buffer)."""
        return self.fmt == "dense" or not self.packer.out.shard

    def buffer(self) -> lazy.ShardBuffer | None:
        """Packed: the shard buffer whose tensors not yet in a file a checkpoint keeps (resume.py), so that one is
        committed after any block (a small model's output fills no file before its end); dense: None."""
        return None if self.fmt == "dense" else self.packer.out

    def sync(self) -> dict[str, int]:
        """Every file written so far on the disk; their sizes."""
        return self.writer.sync() if self.fmt == "dense" else self.packer.out.sync()

    def snapshot(self) -> dict:
        """What a killed run's next run needs of this output's state besides its files."""
        s = {"zeros": self.zeros, "total": self.total, "outside": self.outside_written}
        if self.fmt != "dense":
            s.update(layers=self.packer.layers, left_dense=self.packer.left_dense, experts=self.packer.experts,
                     files=self.packer.out.files, nbytes=self.packer.out.nbytes)
        return s

    def restore(self, s: dict, start: int) -> None:
        """Go on from a snapshot taken after block `start` - 1: blocks from `start` on are written again."""
        self.zeros, self.total, self.outside_written = s["zeros"], s["total"], s.get("outside", False)
        if self.fmt == "dense":
            prefix = tuple(f"{self.blocks}.{i}." for i in range(start))
            self.writer.written([n for n in self.writer.spec if n.startswith(prefix)])
        else:
            self.packer.layers, self.packer.left_dense = s["layers"], s["left_dense"]
            self.packer.experts = list(s.get("experts", []))
            self.packer.out.restore(s["files"], s["nbytes"])

    @torch.no_grad()
    def outside_tensors(self, in_memory: bool) -> None:
        """Write the tensors outside the blocks: streamed from the source files one at a time (pruning
        does not change them), or, `in_memory`, taken from the loaded model (PERP trains the final norm)."""
        a = archmod.arch_of(self.lz.model)
        head = f"{a.head}.weight"
        state = self.lz.model.state_dict(keep_vars=True) if in_memory else {}
        for n in self.lz.names(exclude=(f"{a.blocks}.",)):
            if self.lz.tied and n == head:
                continue
            t = state[n].detach() if in_memory else None
            if self.fmt != "dense":
                self.packer.add_tensor(n, self.lz.files.get(n) if t is None else t)
                continue
            out = self.out_names.get(n, n)  # (the name save_pretrained gives it)
            if t is not None:
                self._add(out, t)
            elif self.lz.files.scaled(n):  # block-scaled FP8 (fp8.py), MXFP4 (mxfp4.py): dequantized
                self._add(out, self.lz.files.get(n, self.save_dtype))
            else:  # file to file in chunks: a 70B model's embeddings are 2 GiB
                self.writer.copy(out, self.lz.files.where[n], self.lz.files.stored.get(n, n))
        self.outside_written = True

    @torch.no_grad()
    def outside(self, tokenizer, in_memory: bool = False) -> dict | None:
        """Write the tensors outside the blocks (unless `outside_tensors` did), config, generation
        config and tokenizer; returns the packed format section (None for dense)."""
        a = archmod.arch_of(self.lz.model)
        head = f"{a.head}.weight"
        cfg = self.lz.model.config
        section = None
        if not self.outside_written:
            self.outside_tensors(in_memory)
        if self.fmt == "dense":
            self.writer.finish()
            cfg.dtype = str(self.save_dtype).replace("torch.", "")
            outdir.save_side_files(self.folder, cfg, getattr(self.lz.model, "generation_config", None))
        else:
            if self.lz.tied:
                self.packer.tied = {head: f"{a.embed}.weight"}
            section = self.packer.finish(cfg, getattr(self.lz.model, "generation_config", None))
        outdir.save_side_files(self.folder, tokenizer=tokenizer)
        return section


class Scratch:
    """Blocks finished by a pass that is not the last, kept on disk in the compute dtype (exact) and
    read back by the next pass: the LazyModel reads a block from here once it was written. With `counts`
    (the output, which counts the pruning's zeros), it takes checkpoints (resume.py) as an Output does."""

    def __init__(self, lz: lazy.LazyModel, folder: Path, counts: Output | None = None):
        self.lz, self.dir, self.counts = lz, folder / SCRATCH, counts
        self.dir.mkdir(exist_ok=True)  # (a resumed run's is taken over: `restore`)
        self.base = lz.files
        self.files: list[str] = []  # written so far, in order
        self.unsynced: list[str] = []

    def _overlay(self, where: dict[str, Path]) -> None:
        """Have the LazyModel read the tensors of `where` from the scratch files it names."""
        overlay = copy.copy(self.base)  # (FP8 and MXFP4 weights still read from the source are dequantized)
        overlay.where = {**self.lz.files.where, **where}
        overlay.stored = {n: k for n, k in self.lz.files.stored.items() if n not in where}  # (written under n)
        self.lz.files = overlay

    @torch.no_grad()
    def _keep(self, tensors: dict[str, torch.Tensor], stem: str) -> None:
        """Write `tensors` (full names) to a scratch file and have the LazyModel read them from there."""
        from safetensors.torch import save_file

        path = self.dir / f"{stem}.safetensors"
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path))
        self._overlay(dict.fromkeys(tensors, path))
        if path.name not in self.files:
            self.files.append(path.name)
        self.unsynced.append(path.name)

    def block(self, i: int, module: nn.Module) -> None:
        self._keep(module.state_dict(prefix=f"{archmod.arch_of(self.lz.model).blocks}.{i}."), f"block-{i:05d}")

    def outside(self, model: nn.Module) -> None:
        """The tensors outside the blocks (PERP trains the final norm), kept like a block's for a pass
        that follows (a tied head is the embedding: not stored twice)."""
        a = archmod.arch_of(self.lz.model)
        state = model.state_dict(keep_vars=True)
        self._keep({n: state[n] for n in self.lz.names(exclude=(f"{a.blocks}.",))
                    if not (self.lz.tied and n == f"{a.head}.weight")}, "outside")

    # --- checkpoints (resume.py), as Output's ---

    def ready(self) -> bool:
        return True

    def sync(self) -> dict[str, int]:
        lazy.fsync(self.dir / f for f in self.unsynced)
        self.unsynced = []
        return {f"{SCRATCH}/{f}": (self.dir / f).stat().st_size for f in self.files}

    def snapshot(self) -> dict:
        return {"zeros": self.counts.zeros, "total": self.counts.total, "files": list(self.files)}

    def restore(self, s: dict, start: int) -> None:
        """Take over a killed run's scratch files (blocks before `start`, what lies outside them once written)."""
        from safetensors import safe_open

        self.counts.zeros, self.counts.total = s["zeros"], s["total"]
        self.files = list(s["files"])
        where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(str(self.dir / f), framework="pt", device="cpu") as fh:
                where.update(dict.fromkeys(fh.keys(), self.dir / f))
        self._overlay(where)

    def close(self) -> None:
        self.lz.files = self.base
        shutil.rmtree(self.dir, ignore_errors=True)


def block_device(devices: tuple[str, ...], where: list[tuple[int, bool]], i: int):
    """Where block i of a placement plan keeps its weights: its device, or CPU memory when they stream."""
    d, streamed = where[i]
    return "cpu" if streamed else devices[d]


def load_placed(lz: lazy.LazyModel, devices: tuple[str, ...], where: list[tuple[int, bool]],
                exclude: dict[int, tuple[str, ...]] | None = None) -> None:
    """Read the model of `lz` from disk straight to where training puts it (a placement plan: per
    block, the index of its device and whether it streams): the embedding, final norm and head on the
    first device, each block on its device, or in CPU memory when its weights stream (`block_device`),
    block i without the tensors `exclude[i]` names. One tensor at a time passes through CPU memory on
    its way to a GPU; a damaged tensor is named."""
    store = lazy.BlockStore(lz, archmod.arch_of(lz.model).blocks)
    store.load_outside(devices[0])
    for i in range(len(where)):
        store.load_block(i, block_device(devices, where, i), (exclude or {}).get(i, ()))


def recover_plan(model: nn.Module, targets: list[str], devices: tuple[str, ...], rcfg) -> list[tuple[int, bool]]:
    """Where PERP will train each block of `model` (perp.plan), worked out on the meta device before any
    weight is read, the linears and experts' projections among the pruning's `targets` adapted (a fused linear's
    part adapts the whole linear); refuses what training would."""
    from .recover import perp

    return perp.plan(model, _adapted(model, targets), devices, rcfg.seqlen, **rcfg.perp_options())


def recover_bytes(model: nn.Module, targets: list[str], rcfg) -> int:
    """The disk PERP's training checkpoints take at most (two at once: the next is written before the last
    goes), from `model` on the meta device."""
    from .recover import perp

    return 2 * 12 * perp.trainable(model, _adapted(model, targets), **rcfg.perp_options())


def _adapted(model: nn.Module, targets: list[str]) -> dict:
    names = dict.fromkeys(t if moe.parse_view(t) else t.split("[")[0] for t in targets)
    return dict.fromkeys(n for n in names if moe.parse_view(n) or isinstance(archmod.get(model, n), nn.Linear))


def write_model(lz: lazy.LazyModel, tok, folder: Path, save_dtype: torch.dtype) -> None:
    """The model of `lz` as placed and trained in memory (load_placed) written into `folder` block by block (dense,
    `save_dtype`), with its config and tokenizer; its weights then freed."""
    out = Output(lz, folder, "dense", save_dtype, [])
    for i, block in enumerate(archmod.blocks(lz.model)):
        out.block(i, block)
    out.outside(tok, in_memory=True)
    lz.release()
    placement.free_pinned()


def recover_pass(p, lz: lazy.LazyModel, train, names: list[str], out: Output, scratch: Scratch, where,
                 checkpoints=None) -> tuple[dict, float]:
    """PERP after pruning block by block (arXiv 2312.15230): the pruned blocks, read back from the scratch
    folder, and the rest of the model go from disk straight to where they train (`load_placed`),
    `train(model, where)` retrains them in place there (pipeline.recover); then each block is written into `out`, or into the scratch
    folder again when GPTQ's pass follows, and what lies outside the blocks from memory. Returns PERP's
    info and the sparsity measured after it."""
    from . import prune

    model = lz.model
    load_placed(lz, p.devices, where)
    info = train(model, where)
    measured = prune.measured_sparsity(model, names)
    gptq_follows = p.quant == "gptq"
    if gptq_follows and checkpoints is not None:
        checkpoints.drop()
    for i, block in enumerate(archmod.blocks(model)):
        (scratch.block if gptq_follows else out.block)(i, block)
    if gptq_follows:
        scratch.outside(model)
    out.outside_tensors(in_memory=True)
    lz.release()
    trim_heap()
    placement.free_pinned()
    return info, measured


# --- stages ---------------------------------------------------------------------------------------

def global_sparsities(lz: lazy.LazyModel, names: list[str], sparsity: float) -> dict[str, float]:
    """--scope global (Global Magnitude Pruning) from disk: the per-layer sparsities of solvers.magnitude's
    global_sparsities, its passes over the weights each reading the blocks from disk one at a time (five reads
    of the pruned layers, one block in memory) where the whole model would hold every |W| at once."""
    from .solvers.magnitude import global_sparsities as ranked

    blocks = archmod.arch_of(lz.model).blocks
    prefixes = [f"{blocks}.{i}." for i in range(len(lz.model.get_submodule(blocks)))]
    groups = [(pre, [n for n in names if n.startswith(pre)]) for pre in prefixes]
    if sum(len(g) for _, g in groups) != len(names):
        raise LLMPruneError("--scope global from disk prunes the decoder blocks' linears only: use --onload whole")

    class Walk:  # (name, weight) of every target, block by block from disk, each pass again
        def __iter__(self):
            for pre, group in groups:
                lz.load(pre)
                try:
                    yield from ((n, archmod.target(lz.model, n).weight) for n in group)
                finally:
                    lz.release(pre)
                    trim_heap()  # (the allocator kept the released block's pages: RSS crept ~66 MiB a block at 8B)

    return ranked(Walk(), sparsity, {n: archmod.target(lz.model, n).weight.numel() for n in names})


def transform(p, lz: lazy.LazyModel, names: list[str], ids, timer, out: Output, folder: Path, recover=None,
              where=None, checkpoints=None) -> dict:
    """Prune block by block (OWL's outlier pass first when asked; PERP's and GPTQ's passes after, through
    the scratch folder: PERP's, `recover(model, where)`, on the devices of `where`, recover_plan); the last pass
    writes each block into `out`. `checkpoints` (resume.Checkpoints): the pruning pass and GPTQ's commit
    checkpoints, or go on from a killed run's; PERP's training commits its own (resume.Training, through
    `recover`) and is skipped when the killed run had finished it and GPTQ's pass follows."""
    from . import prune

    c = p.cfg
    model = lz.model
    ck = checkpoints
    sec: dict = {}
    with timer("compress_s"):
        layer_s = {n: p.sparsity for n in names}
        if c.scope == "global":
            layer_s = global_sparsities(lz, names, p.sparsity)
        elif c.owl and ck is not None and "owl" in ck.keep:
            layer_s = ck.keep["owl"]  # the killed run's outlier pass: the same walk, not done again
        elif c.owl:
            from . import owl

            with walker.onload(model, block_store(lz)):
                layer_s = owl.layer_sparsities(model, names, ids, p.sparsity, batch_size=c.calib_batch,
                                               device=p.device, progress=c.progress, **dataclasses.asdict(c.owl))
            if ck is not None:
                ck.keep["owl"] = layer_s
        if c.owl:
            per_layer = list(layer_s.values())
            sec["owl"] = {**dataclasses.asdict(c.owl), "per_layer": sorted(set(per_layer), key=per_layer.index)}
        scratch = Scratch(lz, folder, out) if p.quant == "gptq" or c.recover else None

        def sink(i, module):
            if scratch is None:
                return out.block(i, module)
            out._count(f"{out.blocks}.{i}.", module)  # the pruning's sparsity, before GPTQ's pass
            scratch.block(i, module)

        with walker.onload(model, block_store(lz, sink)):
            res = prune.prune(model, p.solver, p.pattern, layer_s, ids, c.solver_opts, c.calib_batch, p.device,
                              c.progress, expert_min_tokens=c.expert_min_tokens, expert_fallback=c.expert_fallback,
                              gates=c.prune_gates, devices=p.devices,
                              resume=ck and ck.begin("prune", scratch or out))
    for k, v in res["timings"].items():
        timer.s[k] = v
    if scratch:
        out.counting = False
    recovered = None
    gptq_follows = p.quant == "gptq"
    if c.recover and gptq_follows and ck is not None and ck.finished("recover"):
        recovered = ck.keep["recover"]  # trained and written into the scratch folder by the killed run
        ck.begin("recover", scratch)
        if not ck.reached("gptq"):  # the trained final norm, from there, where PERP's pass puts it
            out.outside_tensors(in_memory=False)
    elif c.recover:
        with timer("recover_s"):
            recovered = recover_pass(p, lz, recover, names, out, scratch, where, ck if gptq_follows else None)
        if gptq_follows and ck is not None:
            ck.keep["recover"] = recovered
            ck.passed("recover", scratch)
    if gptq_follows:
        gptq_pass(lz, ids, out, timer, c.format, c.group_size, c.symmetric, p.gptq, c.calib_batch, p.devices,
                  c.progress, ck)
    if scratch:
        scratch.close()
    sec = prune.manifest_section(p, res, sec, out.zeros / max(out.total, 1), len(names))
    if recovered:
        sec["recover"] = recovered[0]
        sec["steps"].append("recover")
        sec["sparsity"]["measured_after_recover"] = recovered[1]
    return sec


def gptq_pass(lz: lazy.LazyModel, ids, out: Output, timer, fmt: str, group_size, symmetric, gptq, batch_size: int,
              devices: tuple[str, ...], progress: bool, checkpoints=None) -> dict:
    """GPTQ block by block; each block's codes go straight to the packer (never the whole model's), or, with
    scale tuning, to the scratch folder until the scales are tuned (gptq_tuned). `checkpoints`
    (resume.Checkpoints): the pass (and the tuning) commits checkpoints, or goes on from one."""
    from .quant.sequential import gptq_sequential

    info: dict = {}
    pending: dict[int, dict] = {}
    model = lz.model
    if gptq.tune_steps:
        with timer("gptq_s"):
            gptq_tuned(lz, ids, out.folder, fmt, group_size, symmetric, gptq, batch_size, devices, progress,
                       out.packer.dtype, info, out.block, checkpoints)
        out.packer.quant_opts = {**gptq.as_dict(), **info}
        return info
    store = block_store(lz, sink=lambda i, m: out.block(i, m, quantized=pending.pop(i, {})))
    with timer("gptq_s"), walker.onload(model, store):
        gptq_sequential(model, ids, fmt, group_size, symmetric, batch_size=batch_size, device=devices[0],
                        progress=progress, dtype=out.packer.dtype, info=info, on_block=pending.__setitem__,
                        devices=devices, resume=checkpoints and checkpoints.begin("gptq", out), **gptq.as_dict())
    out.packer.quant_opts = {**gptq.as_dict(), **info}
    return info


class Codes:
    """GPTQ's codes, block by block, kept on disk until the scales are tuned: one safetensors file a
    block (codes, scales, zero points of its quantized linears) in a scratch folder; the tuned scales, once
    trained, in one file more a block (`tuned`), which `get` reads over GPTQ's. Takes checkpoints (resume.py) as
    an Output does: a killed run's next run takes its files over."""

    def __init__(self, folder: Path):
        self.dir = Path(folder) / CODES
        self.dir.mkdir(exist_ok=True)  # (a resumed run's is taken over: `restore`)
        self.blocks: dict[int, dict[str, dict]] = {}  # block -> its layers' group_size / symmetric / damp
        self.is_tuned = False
        self.unsynced: list[Path] = []

    def _path(self, i: int, what: str = "block") -> Path:
        return self.dir / f"{what}-{i:05d}.safetensors"

    def put(self, i: int, codes: dict) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for n, q in codes.items():
            tensors |= {f"{n}.codes": q.codes, f"{n}.scales": q.scales, f"{n}.zeros": q.zeros}
        self.blocks[i] = {n: {"group_size": q.group_size, "symmetric": q.symmetric, "damp": q.damp}
                          for n, q in codes.items()}
        save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, str(self._path(i)))
        self.unsynced.append(self._path(i))

    def tuned(self, scales_of) -> None:
        """The tuned scales (`scales_of(layer)`: its fp16 scales), a block at a time, which `get` gives from now on."""
        from safetensors.torch import save_file

        for i, layers in self.blocks.items():
            save_file({n: scales_of(n).contiguous().cpu() for n in layers}, str(self._path(i, "tuned")))
            self.unsynced.append(self._path(i, "tuned"))
        self.is_tuned = True

    # --- checkpoints (resume.py), as Output's ---

    def ready(self) -> bool:
        return True

    def sync(self) -> dict[str, int]:
        lazy.fsync(self.unsynced)
        self.unsynced = []
        kinds = ("block", "tuned") if self.is_tuned else ("block",)
        files = [self._path(i, k) for k in kinds for i in self.blocks]
        return {f"{CODES}/{f.name}": f.stat().st_size for f in files}

    def snapshot(self) -> dict:
        return {"blocks": {str(i): layers for i, layers in self.blocks.items()}, "tuned": self.is_tuned}

    def restore(self, s: dict, start: int) -> None:
        """Take over a killed run's codes (the blocks before `start`; the tuned scales once trained)."""
        self.blocks = {int(i): layers for i, layers in s["blocks"].items() if int(i) < start}
        self.is_tuned = s.get("tuned", False)

    def meta(self) -> dict:
        """{name: Quantized} of every layer on the meta device (shapes and dtypes only), for planning."""
        from .quant import Quantized

        out = {}
        for i, layers in self.blocks.items():
            head, _ = lazy.safetensors_header(self._path(i))
            spec = {k: torch.empty(head[k]["shape"], dtype=lazy.ST_DTYPES[head[k]["dtype"]], device="meta")
                    for k in head if k != "__metadata__"}
            out |= {n: Quantized(spec[f"{n}.codes"], spec[f"{n}.scales"], spec[f"{n}.zeros"], **opts)
                    for n, opts in layers.items()}
        return out

    def get(self, i: int) -> dict:
        """{name: Quantized} of block i's layers, in CPU memory."""
        from safetensors.torch import load_file

        from .quant import Quantized

        if i not in self.blocks:
            return {}
        t = load_file(str(self._path(i)))
        if self.is_tuned:  # the tuned scales over GPTQ's
            t |= {f"{n}.scales": s for n, s in load_file(str(self._path(i, "tuned"))).items()}
        return {n: Quantized(t[f"{n}.codes"], t[f"{n}.scales"], t[f"{n}.zeros"], **opts)
                for n, opts in self.blocks[i].items()}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@torch.no_grad()
def teacher(lz: lazy.LazyModel, ids, batch_size: int, device, progress: bool) -> torch.Tensor:
    """quant.tune.teacher_states of the model on disk, one block in memory at a time: the final hidden
    states (n, seqlen, hidden) of the model as it is, in CPU memory."""
    from .quant.tune import final_states

    with through_blocks(lz, ids, batch_size, device, progress, "teacher blocks") as (norm, hidden):
        return final_states(norm, hidden, device)


def gptq_tuned(lz: lazy.LazyModel, ids, folder: Path, fmt: str, group_size, symmetric, gptq, batch_size: int,
               devices: tuple[str, ...], progress: bool, dtype, info: dict, sink, checkpoints=None) -> None:
    """GPTQ and then its scales tuned end to end (quant/tune.py, EfficientQAT's E2E-QP), the model never
    whole in CPU memory: the teacher's final hidden states from a walk over the blocks as they are;
    GPTQ's block-sequential pass, each block's codes kept on disk (`Codes`), its weights let go; then
    the tuning places the model (placement.py, planned on the meta device first) and reads it from disk
    straight there, each quantized linear as its int8 levels and scales (the dense weight is not read);
    at the end `sink(i, block, {name: Quantized})` gets every block, its quantized linears holding the
    tuned dequantized weights. What GPTQ and the tuning did goes into `info` (`info["tune"]`).
    `checkpoints` (resume.Checkpoints): the teacher's states are kept once computed, GPTQ's pass commits
    checkpoints of the codes, the tuning its own (`tune_train`), and its result (the tuned scales) as the "tune"
    pass; a killed run's next run goes on from there (only the blocks handed to `sink` are done again)."""
    from .quant.sequential import gptq_sequential

    ck = checkpoints
    if ck is not None and (was := ck.retune({"steps": gptq.tune_steps, "lr": gptq.tune_lr})):
        import sys

        print(f"llmprune: scale tuning starts over from GPTQ's scales: --tune-steps {gptq.tune_steps} --tune-lr "
              f"{gptq.tune_lr:g} where the run that stopped tuned with --tune-steps {was['steps']} --tune-lr "
              f"{was['lr']:g} (the passes before it are reused)", file=sys.stderr)
    targets = ck.kept_tensor("teacher") if ck is not None else None
    if targets is None and not (ck is not None and ck.finished("tune")):  # (a finished tuning needs no teacher)
        targets = teacher(lz, ids, batch_size, devices[0], progress)  # before any weight changes
        if ck is not None:
            ck.keep_tensor("teacher", targets)
    codes = Codes(folder)  # (kept when this fails: a checkpoint may count on it; the output's folder goes without)
    with walker.onload(lz.model, block_store(lz)):
        gptq_sequential(lz.model, ids, fmt, group_size, symmetric, batch_size=batch_size, device=devices[0],
                        progress=progress, dtype=dtype, info=info, on_block=codes.put, devices=devices,
                        resume=ck and ck.begin("gptq", codes), **{**gptq.as_dict(), "tune_steps": 0})
    if codes.blocks:
        info["tune"] = tune_placed(lz, codes, ids, targets, gptq.tune_steps, gptq.tune_lr, devices, progress, sink, ck)
    else:
        each_block(lz, devices[0], lambda i, block: sink(i, block, {}), progress)
    codes.close()


def tune_placed(lz: lazy.LazyModel, codes: Codes, ids, targets, steps: int, lr: float, devices: tuple[str, ...],
                progress: bool, sink, checkpoints=None) -> dict:
    """The tuning of gptq_tuned: the model read to where it trains, its scales tuned (quant.tune.train),
    each block handed to `sink`; returns the tuning's info. A Mixture-of-Experts block's fused experts train as
    quant.tune.scaled_experts: their fused weights are not read where GPTQ's codes cover them (their biases are),
    and the sink gets the fused module back, its quantized rows the tuned codes dequantized. `checkpoints`: the
    training commits its own (resume.Training), its result (`codes.tuned`) is the "tune" pass; when the killed
    run had finished that pass, nothing trains."""
    import time

    from .quant import tune

    tune.check(steps, lr)
    t0 = time.perf_counter()
    model = lz.model
    blocks = list(archmod.blocks(model))  # before the linears are replaced: inference looks for them
    frozen = {p: p.requires_grad for p in model.parameters()}
    originals: dict = {}
    try:
        for p in frozen:
            p.requires_grad_(False)
        originals = tune.scaled_in_place(model, codes.meta(), "meta")
        _, where, _ = tune.placement_of(model, blocks, devices, ids.shape[1])  # before any weight is read
        fused = {n: m for n, m in originals.items() if moe.is_fused_experts(m)}
        tune.restore(model, fused)  # in the model while the loader reads their tensors by name
        skip, biases = _not_read(lz, codes, fused)
        load_placed(lz, devices, where, skip)
        for i in codes.blocks:
            dev = lazy.placed_on(block_device(devices, where, i))  # as lz.load placed the block
            for n in biases.get(i, ()):  # an experts' bias, which the exclusion of its weight's prefix skipped
                lz.load(n, dev)
            layers = {n: q.to(dev) for n, q in codes.get(i).items()}
            views = {n: q for n, q in layers.items() if moe.parse_view(n)}
            for n, q in layers.items():
                if n not in views:  # the meta ScaledLinear holds the bias just read
                    archmod.set_module(model, n, tune.ScaledLinear(q, archmod.get(model, n).bias, dev))
            tune.scaled_in_place(model, views, dev)  # the fused experts (in `originals` already) split
        ck = checkpoints
        if ck is not None and ck.finished("tune"):
            info = ck.keep["tune"]  # trained by the killed run: its scales are in `codes` when they were kept
            codes.is_tuned = info["kept"] == "tuned"
        else:
            kept, info = tune.train(model, ids, targets, steps, lr, devices=devices, progress=progress, blocks=blocks,
                                    where=where, checkpoint=ck and ck.training(steps, "tune_train"))
            if kept:
                codes.tuned(lambda n: model.get_submodule(moe.stored_name(n)).s0.half())
            if ck is not None:
                ck.keep["tune"] = info
                ck.passed("tune", codes, forget=("teacher",))
        trim_heap()  # the training's freed activations back to the OS before the blocks' dense weights are rebuilt
        for i, block in enumerate(blocks):
            layers = codes.get(i)
            # the block's split experts (their int8 levels) let go before their fused weights are rebuilt
            tune.restore(model, {v[0]: originals[v[0]] for v in map(moe.parse_view, layers) if v})
            with _tuned_weights(lz, model, layers, originals):
                sink(i, block, layers)
            tune.restore(model, {n: originals[n] for n in layers if n in originals})  # the levels let go
    finally:
        tune.restore(model, originals)
        for p, rg in frozen.items():
            p.requires_grad_(rg)
        lz.release()
        trim_heap()
        placement.free_pinned()
    return {**info, "seconds": round(time.perf_counter() - t0, 1)}


def _not_read(lz: lazy.LazyModel, codes: Codes, fused: dict[str, nn.Module]):
    """What the tuning does not read from disk, per block: each quantized linear's weight and each fused experts
    parameter whose rows GPTQ's codes all cover (moe.covered_params); and the biases of those parameters, which
    excluding the parameter's name as a prefix also excludes, to be read on their own."""
    skip, biases = {}, {}
    names = set(lz.names())
    for i, layers in codes.blocks.items():
        views: dict[str, set] = {}
        for n in layers:
            v = moe.parse_view(n)
            if v is None:
                skip.setdefault(i, []).append(f"{n}.weight")
            else:
                views.setdefault(v[0], set()).add(v[1:])
        for path, done in views.items():
            for p in moe.covered_params(fused[path], done):
                skip.setdefault(i, []).append(f"{path}.{p}")
                if f"{path}.{p}_bias" in names:
                    biases.setdefault(i, []).append(f"{path}.{p}_bias")
    return {i: tuple(v) for i, v in skip.items()}, biases


@contextmanager
def _tuned_weights(lz: lazy.LazyModel, model: nn.Module, layers: dict, originals: dict):
    """Inside the `with`, the quantized layers of a trained block hold their tuned codes dequantized, the way the
    sink reads a block: each linear as an nn.Linear, each fused experts module (back in the model) as itself, the
    parameters the tuning did not read rebuilt in CPU memory (let go on exit)."""
    made = []  # (fused module, parameter name, its meta Parameter)
    try:
        for n, q in layers.items():
            v = moe.parse_view(n)
            if v is None:
                m = archmod.get(model, n)
                lin = nn.Linear(q.codes.shape[1], q.codes.shape[0], bias=False, device="meta", dtype=lz.dtype)
                lin.weight = nn.Parameter(q.dequantize().to(lz.dtype), requires_grad=False)
                lin.bias = m.bias
                archmod.set_module(model, n, lin)
                continue
            fused = originals[v[0]]
            view = moe.ExpertProj(fused, v[1], v[2])
            p = moe.fused_param(fused, v[2])
            if getattr(fused, p).device.type == "meta":
                made.append((fused, p, getattr(fused, p)))
                fused._parameters[p] = nn.Parameter(torch.zeros(made[-1][2].shape, dtype=lz.dtype), requires_grad=False)
            view.weight.copy_(q.dequantize())
        yield
    finally:
        for fused, p, meta in made:
            fused._parameters[p] = meta


def each_block(lz: lazy.LazyModel, device, sink, progress: bool = False, desc: str = "blocks",
               checkpoints=None) -> None:
    """A pass with no forward (RTN packing, exports): every block read, handed to `sink(i, block)`,
    freed. `checkpoints` (resume.Checkpoints): from its first unfinished block, each finished one handed to it."""
    from tqdm.auto import tqdm

    store = block_store(lz, sink)
    blocks = archmod.blocks(lz.model)
    start = checkpoints.start if checkpoints is not None else 0
    try:
        for i in tqdm(range(start, len(blocks)), desc=desc, disable=not progress, initial=start, total=len(blocks)):
            store.load_block(i, device)
            store.done(i, blocks[i])
            store.release_block(i)
            if checkpoints is not None:
                checkpoints.after(i, None, {}, {}, 0)
    finally:
        store.close()


def pack(lz: lazy.LazyModel, tok, folder: Path, fmt: str, quant: str | None, group_size, symmetric,
         save_dtype: torch.dtype, gptq, ids, calib_info: dict | None, devices: tuple[str, ...], batch_size: int,
         progress: bool, timer, checkpoints=None) -> dict:
    """`llmprune pack` of a saved dense output, block by block: each block read, packed (RTN here, or
    GPTQ's pass on calibration data), written, freed. Returns the manifest's format section.
    `checkpoints` (resume.Checkpoints): the pass commits checkpoints, or goes on from one."""
    from . import packed

    packer = packed.PackWriter(folder, fmt, quant, group_size, symmetric, save_dtype)
    out = Output(lz, folder, fmt, save_dtype, [], packer)
    out.counting = False  # the source's sparsity stands
    if packer.quant == "gptq":
        gptq_pass(lz, ids, out, timer, fmt, group_size, symmetric, gptq, batch_size, devices, progress, checkpoints)
        if calib_info is not None:
            packer.quant_opts["calibration"] = calib_info
    with timer("save_s"):
        if packer.quant != "gptq":
            each_block(lz, devices[0], out.block, progress, desc=f"pack {fmt}",
                       checkpoints=checkpoints and checkpoints.begin("pack", out))
        return out.outside(tok)


@contextmanager
def through_blocks(lz: lazy.LazyModel, ids: torch.Tensor | list[torch.Tensor], batch_size: int, device, progress: bool,
                   desc: str):
    """Walk token ids (walker.batches: (n, T) cut into `batch_size` rows, or a list of batches)
    through every decoder block, one block of weights in memory at a time, then place what follows
    the blocks. Yields (the final norm, the last block's hidden states per batch, possibly in CPU
    memory); the weights are freed on exit."""
    model = lz.model
    a = archmod.arch_of(model)
    with walker.onload(model, block_store(lz)):
        for block in walker.walk(model, ids, batch_size, device, progress, desc=desc):
            pass
        hidden = block.outputs
    lz.load("", device, exclude=(f"{a.blocks}.", a.embed) if not lz.tied else (f"{a.blocks}.",))
    try:
        yield archmod.get(model, a.norm), hidden
    finally:
        lz.release("", exclude=(f"{a.blocks}.",))


@torch.no_grad()
def evaluate(lz: lazy.LazyModel, tok, datasets, seqlen: int, windows: int | None, device: str, progress: bool,
             cache: dict) -> dict:
    """Perplexity with one block of weights in memory at a time (SparseGPT's `llama_eval` for large
    models): every window walks the blocks, then the final norm and the head. The same numbers as
    eval.perplexity on the whole model (tested)."""
    import math
    import time

    from .eval.perplexity import cached_tokens, window_nll_from_hidden, windows_of

    model = lz.model
    out = {}
    for d in datasets:
        tokens, where = cached_tokens(d, tok, cache)
        data, available = windows_of(d, tokens, seqlen, windows)  # (n, seqlen)
        t0 = time.perf_counter()
        per = max(1, eval_budget(device) // (seqlen * model.config.hidden_size * lz.dtype.itemsize))
        nll = 0.0
        for chunk in data.split(per):  # windows walked together, each chunk one pass over the weights
            with through_blocks(lz, chunk, 1, device, progress, f"ppl {d} blocks") as (norm, hidden):
                for ids, h in zip(chunk.split(1), hidden):
                    nll += float(window_nll_from_hidden(model, norm(h.to(device)), ids.to(device)).sum())
        predicted = data.shape[0] * (seqlen - 1)
        out[d] = {"ppl": math.exp(nll / predicted), "seqlen": seqlen, "windows": data.shape[0],
                  "windows_available": available, "tokens": predicted, "seconds": round(time.perf_counter() - t0, 2),
                  "source": where, "blockwise": True}
    return out
