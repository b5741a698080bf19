"""Resuming a compression that was killed, from where it stopped.

A 70B model's SparseGPT pass runs for hours, and a run that dies outright (preempted, SIGTERM's or
SIGKILL's default, the OOM killer, a machine going down) cannot clean up: it leaves its temporary
output folder (outdir.py) holding the blocks it finished. While `compress` prunes block by block
straight into a dense output (onload.transform), it commits a checkpoint into that folder
(`.resume/`) every `--checkpoint-every` seconds and after the last block: every output file synced
to the disk, the calibration activations entering the next block, what the pass recorded so far
(per-layer results, zeros counted, seconds spent; the dense model's figures and OWL's sparsities)
and a fingerprint of all that decides the weights (the recipe, the calibration tokens, the source
files, the versions and processors, the devices). The next run of the same command finds the folder,
checks the fingerprint, takes the folder over and goes on from the block after the checkpoint: the
same tensors and figures as a run that never stopped (tests/test_resume.py), for at most
`--checkpoint-every` seconds of work done twice. An error or Ctrl-C still removes the folder
(outdir.atomic_dir), and a run that cannot resume it (another recipe) removes it as a stale one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

RESUME = ".resume"  # inside the output's temporary folder
STATE = "state.json"
# what the recipe may change without changing the pruned weights (evaluation, export, display)
NOT_WEIGHTS = ("out", "overwrite", "progress", "eval", "eval_seqlen", "eval_windows", "eval_dense", "tasks",
               "tasks_limit", "export", "export_types", "export_quant", "checkpoint_s")


def fingerprint(cfg: dict, ids: torch.Tensor | None, source: Path, devices: tuple[str, ...], save_dtype) -> str:
    """What decides the pruned weights, hashed: a checkpoint is resumed only under the same one."""
    from .lazy import SHARD_BYTES  # the output's shard plan, which the files taken over must follow
    from .runinfo import versions

    files = sorted(Path(source).glob("*.safetensors"))
    what = {"config": {k: v for k, v in cfg.items() if k not in NOT_WEIGHTS}, "shard_bytes": SHARD_BYTES,
            "source": [str(Path(source).resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            "calibration": None if ids is None else hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest(),
            "devices": list(devices), "save_dtype": str(save_dtype),
            "versions": {k: v for k, v in versions().items() if k != "gpu"}}  # (named once CUDA has started)
    if any(torch.device(d).type == "cuda" for d in devices):
        what["gpus"] = [torch.cuda.get_device_name(torch.device(d)) for d in devices]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RESUME / STATE).read_text())
    except (OSError, ValueError):
        return None


def find(out: Path, fp: str, done: str) -> tuple[Path, dict] | None:
    """The temporary folder of a dead run of `out` holding a checkpoint under fingerprint `fp` whose files
    are all there (the one furthest on, if several), with its state; None if there is none. A find is said on
    stderr, progress bars or not (the run does not start from the first block; `done`: what the blocks were)."""
    import sys

    from . import outdir

    best = None
    for folder in outdir.stale(out):
        state = _state(folder)
        if not state or state.get("fingerprint") != fp:
            continue
        hidden = state.get("hidden")
        if hidden and not (folder / RESUME / hidden / "model.safetensors").is_file():
            continue
        if any(not (folder / f).is_file() or (folder / f).stat().st_size < n for f, n in state["files"].items()):
            continue
        if best is None or state["next_block"] > best[1]["next_block"]:
            best = (folder, state)
    if best:
        print(f"llmprune: resuming {best[0].name}: blocks 0-{best[1]['next_block'] - 1} of {best[1]['blocks']} were "
              f"{done} by a run that stopped (checkpoint of {best[1]['time']})", file=sys.stderr)
    return best


def _write_json(path: Path, obj: dict) -> None:
    """Replace `path` with `obj` atomically and durably: the old state stays until the new one is whole."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpoints:
    """The checkpoints of one pruning pass into `out` (an onload.Output writing a dense folder): `start`, the
    first block to prune; `hidden(device)`, its inputs; `seed`, what the blocks before recorded; `after`, called
    by the pass for every finished block, commits a checkpoint when `every_s` seconds have passed since the
    last (and after the last block). `keep`: more of the run to carry over (JSON), e.g. the dense figures."""

    def __init__(self, folder: Path, fp: str, every_s: float, out, n_blocks: int, state: dict | None = None):
        self.dir = Path(folder) / RESUME
        self.dir.mkdir(exist_ok=True)
        self.fp, self.every, self.out, self.n = fp, every_s, out, n_blocks
        self.state = state or {}
        self.start = self.state.get("next_block", 0)
        self.runs = self.state.get("runs", 0) + 1  # this one included
        self.keep: dict = dict(self.state.get("keep", {}))
        self.t0 = self.last = time.monotonic()
        if state:  # the blocks before `start` are in the output's files: write the others into them
            out.restore(state["out"], self.start)

    def hidden(self, device) -> list[torch.Tensor]:
        from .lazy import WeightFiles

        name = self.state.get("hidden")
        if not name:
            return []
        files = WeightFiles(self.dir / name)
        return [files.get(f"h.{k}").to(device) for k in range(len(files.keys()))]

    def seed(self, infos: dict, experts: dict) -> int:
        """Fill the pass's records of the blocks before `start`; returns its count of replayed sublayers."""
        infos.update(self.state.get("layers", {}))
        experts.update(self.state.get("experts", {}))
        return self.state.get("replayed", 0)

    def after(self, i: int, hidden: list[torch.Tensor] | None, infos: dict, experts: dict, replayed: int) -> None:
        done = i + 1
        if done < self.n and time.monotonic() - self.last < self.every or not self.out.ready():
            return  # (a packed output is ready after a block that filled a file: onload.Output.ready)
        files = self.out.sync()
        name = None
        if done < self.n and hidden is not None:
            name = f"hidden-{done:05d}"
            _save_hidden(self.dir / name, hidden)
        seconds = self.state.get("seconds", 0.0) + time.monotonic() - self.t0
        _write_json(self.dir / STATE, {
            "fingerprint": self.fp, "next_block": done, "blocks": self.n, "hidden": name, "files": files,
            "layers": infos, "experts": experts, "replayed": replayed, "out": self.out.snapshot(), "seconds": seconds, "runs": self.runs,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "keep": self.keep})
        for p in self.dir.glob("hidden-*"):
            if p.name != name:
                shutil.rmtree(p, ignore_errors=True)
        self.last = time.monotonic()

    def record(self) -> dict | None:
        """The manifest's `resumed` entry: None for a run that started from the first block."""
        if not self.state:
            return None
        return {"from_block": self.start, "blocks": self.n, "runs": self.runs,
                "checkpoint": self.state.get("time"), "earlier_s": round(self.state.get("seconds", 0.0), 2)}

    def close(self) -> None:
        """The output is complete: its checkpoints are not part of it."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _save_hidden(folder: Path, hidden: list[torch.Tensor]) -> None:
    """The activations entering the next block, batch by batch, as one safetensors file written in place
    (lazy.ShardWriter: one batch copied to the CPU at a time) and synced."""
    from .lazy import ShardWriter

    folder.mkdir()
    specs = [(f"h.{k}", tuple(h.shape), h.dtype) for k, h in enumerate(hidden)]
    size = sum(h.numel() * h.element_size() for h in hidden)
    w = ShardWriter(folder, specs, lambda _n: None, shard_bytes=size + 1)
    for k, h in enumerate(hidden):
        w.add(f"h.{k}", h)
    w.sync()
    w.finish()
