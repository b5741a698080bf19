"""Resuming a compression that was killed, from where it stopped.

A 70B model's SparseGPT pass runs for hours, and a run that dies outright (preempted, SIGTERM's or
SIGKILL's default, the OOM killer, a machine going down) cannot clean up: it leaves its temporary
output folder (outdir.py) holding the blocks it finished. While `compress` prunes block by block
(onload.transform) and `pack` packs (onload.pack), each pass over the blocks commits a checkpoint into
that folder (`.resume/`) every `--checkpoint-every` seconds (0: after every block) and after its last block: every
file it wrote synced to the disk (the output's, or the scratch folder's when GPTQ's pass or PERP follows), the
tensors a packed output holds for a file not yet full (`Checkpoints._pending`: a small model's fills none before
its end), the calibration activations entering the next block, what the pass recorded so far (per-layer results,
zeros counted, seconds spent; the dense model's figures, OWL's sparsities, PERP's results) and a
fingerprint of all that decides the weights (the recipe, the calibration tokens, the source files, the
versions and processors, the devices). The next run of the same command finds the folder, checks the
fingerprint, takes the folder over, skips the passes the killed run finished and goes on in the one it
stopped in from the block after the checkpoint: the same tensors and figures as a run that never
stopped (tests/test_resume.py), for at most `--checkpoint-every` seconds of work done twice. PERP's training
and GPTQ's scale tuning commit their own checkpoints on the same clock (`Training`: the trained tensors, the
optimizer's state, the steps done) and go on from the last one; once its result is written it is a finished
pass (scale tuning's GPTQ pass keeps its codes in a scratch folder, block by block, and the teacher's hidden
states it distils from are kept once computed: `Checkpoints.keep_tensor`; a run under another `--tune-lr` or
`--tune-steps` keeps the passes before the tuning and tunes anew: `Checkpoints.retune`). A run that fails or is
interrupted (Ctrl-C, a CUDA out-of-memory error) after a checkpoint keeps the folder too, and says so (`kept`,
outdir.atomic_dir); a run that cannot resume it (another recipe) removes it as a stale one.
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
               "tasks_limit", "export", "export_types", "export_quant", "checkpoint_s", "hessian_gib")
# scale tuning's options (GPTQConfig's): they decide its training and result only (Checkpoints.retune)
TUNING = ("tune_steps", "tune_lr")


def fingerprint(cfg: dict, ids: torch.Tensor | None, source: Path, devices: tuple[str, ...], save_dtype) -> str:
    """What decides the pruned weights, hashed: a checkpoint is resumed only under the same one."""
    from . import placement
    from .lazy import SHARD_BYTES, model_files  # (the output's shard plan, which resumed files follow)
    from .runinfo import versions

    files = model_files(Path(source))
    cfg = {k: v for k, v in cfg.items() if k not in NOT_WEIGHTS}
    if isinstance(cfg.get("gptq"), dict) and "tune_steps" in cfg["gptq"]:  # scale tuning's steps and learning rate
        g = cfg["gptq"]  # decide the tuning alone: a run under others reuses the passes before it (Checkpoints.retune)
        cfg["gptq"] = {**{k: v for k, v in g.items() if k not in TUNING}, "tuned": bool(g["tune_steps"])}
    what = {"config": cfg, "shard_bytes": SHARD_BYTES,
            "source": [str(Path(source).resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            "calibration": None if ids is None else hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest(),
            "devices": list(devices), "save_dtype": str(save_dtype),
            "versions": {k: v for k, v in versions().items() if k != "gpu"}}  # (named once CUDA has started)
    if any(torch.device(d).type == "cuda" for d in devices):
        what["gpus"] = [torch.cuda.get_device_name(torch.device(d)) for d in devices]
    if placement.replicas() > 1:  # DDP: the replicas split each step's windows, so their number decides the updates
        what["replicas"] = placement.replicas()
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RESUME / STATE).read_text())
    except (OSError, ValueError):
        return None


# a pass's part of a checkpoint (the rest is the run's)
PASS = ("stage", "next_block", "hidden", "files", "layers", "experts", "replayed", "out", "pending")
# what a pass did to the blocks, as a resume message says it
DONE = {"prune": "pruned", "pack": "packed", "recover": "retrained (PERP)", "gptq": "quantized (GPTQ)",
        "slice": "sliced (SliceGPT)", "tune": "scale-tuned"}
# the trainings that commit checkpoints of their own (`Training`), by their key in a checkpoint's `keep`: what
# the resume says they are, the manifest's `resumed` key of the step they went on from, their folders' prefix
TRAININGS = {"train": ("PERP", "perp_from_step", "train-"), "tune_train": ("scale tuning", "tune_from_step", "tune-")}


def _files(state: dict):
    """Every file a checkpoint counts on: its pass's and those of the passes finished before."""
    yield from state.get("files", {}).items()
    for st in state.get("done", {}).values():
        yield from st.get("files", {}).items()


def find(out: Path, fp: str) -> tuple[Path, dict] | None:
    """The temporary folder of a dead run of `out` holding a checkpoint under fingerprint `fp` whose files
    are all there (the one furthest on, if several), with its state; None if there is none. A find is said on
    stderr, progress bars or not (the run does not start from the first block)."""
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
        if any(not (folder / f).is_file() or (folder / f).stat().st_size < n for f, n in _files(state)):
            continue
        if any(not (folder / RESUME / f).is_file() for f in _kept_files(state)):
            continue
        if best is None or _progress(state) > _progress(best[1]):
            best = (folder, state)
    if best:
        print(f"llmprune: resuming {best[0].name}: {_said(best[1])} by a run that stopped (checkpoint of "
              f"{best[1]['time']})", file=sys.stderr)
    return best


def kept(folder: Path) -> str | None:
    """What the checkpoint in a failed run's temporary folder holds, said (outdir.atomic_dir keeps the folder
    then); None without one (the folder goes)."""
    state = _state(folder)
    if not state:
        return None
    return f"{_said(state)} when it stopped (checkpoint of {state['time']})"


def _kept_files(state: dict):
    """The files of `.resume/` a checkpoint counts on: those its `keep` names (trainings' states, kept tensors) and
    the tensors its passes' outputs held unwritten (`pending`)."""
    for v in state.get("keep", {}).values():
        if isinstance(v, dict) and isinstance(v.get("file"), str):
            yield v["file"]
    for st in (state, *state.get("done", {}).values()):
        for f, _ in st.get("pending", []):
            yield f


def _said(state: dict) -> str:
    n = state["blocks"]
    said = [f"blocks 0-{n - 1} of {n} were {DONE[s]}" for s in state.get("done", {})]
    if "next_block" in state:  # (none in `recover`'s checkpoints: its training is all there is)
        said.append(f"blocks 0-{state['next_block'] - 1} of {n} were {DONE[state.get('stage', 'prune')]}")
    for key, (what, _, _) in TRAININGS.items():
        train = state.get("keep", {}).get(key)
        if train:
            said.append(f"{what} had trained {train['step']} of {train['steps']} steps")
    if not said and state.get("keep", {}).get("teacher"):
        said.append("the teacher's hidden states for scale tuning were computed")
    return ", ".join(said)


def _progress(state: dict) -> tuple[int, ...]:
    keep = state.get("keep", {})
    return (len(state.get("done", {})), state.get("next_block", 0),
            *(keep.get(k, {}).get("step", 0) for k in TRAININGS), bool(keep.get("teacher")))


def _write_json(path: Path, obj: dict) -> None:
    """Replace `path` with `obj` atomically and durably: the old state stays until the new one is whole."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpoints:
    """The checkpoints of one run's passes over the blocks (`n_blocks` of them): `begin(stage, out)` starts a
    pass (`DONE`'s names) that writes its blocks into `out` (an onload.Output, or onload.Scratch when another pass
    follows) and returns this object, which the pass then uses: `start`, its first block to do; `hidden(device)`,
    that block's inputs; `seed`, what the blocks before recorded; `after`, called for every finished block,
    commits a checkpoint when `every_s` seconds have passed since the last (and after the last block). `state`:
    a killed run's (`find`); its finished passes are not done again, the one it stopped in goes on. `keep`: more
    of the run to carry over (JSON), e.g. the dense figures."""

    def __init__(self, folder: Path, fp: str, every_s: float, n_blocks: int, state: dict | None = None):
        self.dir = Path(folder) / RESUME
        self.dir.mkdir(exist_ok=True)
        self.fp, self.every, self.n = fp, every_s, n_blocks
        self.found = state or {}
        self.runs = self.found.get("runs", 0) + 1  # this one included
        self.keep: dict = dict(self.found.get("keep", {}))
        self.done: dict[str, dict] = dict(self.found.get("done", {}))  # finished passes: their last states
        self.stage = self.out = None
        self.retuned: dict | None = None  # the killed run's scale tuning recipe, when this run's differs (retune)
        self.state: dict = {}  # the pass's last checkpoint (or the killed run's)
        self.pending: list = []  # [file, names] in .resume/ of what the pass's output holds unwritten (`_pending`)
        self.start = 0
        self.t0 = self.last = time.monotonic()

    def begin(self, stage: str, out) -> Checkpoints:
        """Start pass `stage` into `out`: where the killed run left it, past its end if that run finished it, or
        at the first block. The pass before, finished, is part of every checkpoint from now on."""
        self._finish_pass()
        self.stage, self.out = stage, out
        self.state = self.found if self.found.get("stage", "prune") == stage else self.done.get(stage, {})
        self.start = self.state.get("next_block", 0)
        self.pending = [list(e) for e in self.state.get("pending", [])]
        _remove_but(self.dir, f"pending-{stage}-*", *(Path(f).parent.name for f, _ in self.pending))
        if self.state:  # the blocks before `start` are in the pass's files: write the others into them
            out.restore(self.state["out"], self.start)
            if self.pending:  # and what the output held unwritten goes back where it was
                from safetensors.torch import load_file

                held = {}
                for f, _ in self.pending:
                    held |= load_file(str(self.dir / f))
                out.buffer().hold({n: held[n] for _, names in self.pending for n in names})
        return self

    def _finish_pass(self) -> None:
        """The pass under way has ended: its last checkpoint (after its last block) is a finished pass's."""
        if self.stage is not None and self.stage not in self.done:
            if self.state.get("next_block") != self.n:
                raise RuntimeError(f"internal: the {self.stage} pass ended without its last checkpoint")
            self.done[self.stage] = {k: v for k, v in self.state.items() if k in PASS}

    def finished(self, stage: str) -> bool:
        """Whether the killed run finished pass `stage` (its files and records are in the checkpoint)."""
        return stage in self.done or self.found.get("stage") == stage and self.found["next_block"] == self.n

    def reached(self, stage: str) -> bool:
        """Whether the killed run committed a checkpoint in pass `stage` (or finished it)."""
        return stage in self.done or self.found.get("stage") == stage

    def drop(self) -> None:
        """What is about to be written invalidates the checkpoint on disk (a pass rewriting a finished one's
        files in place): a run killed before the next commit starts over."""
        (self.dir / STATE).unlink(missing_ok=True)

    def passed(self, stage: str, out, forget: tuple[str, ...] = ()) -> None:
        """Commit pass `stage`, done in one go rather than block by block (PERP: trained, then every block
        written into `out`), as finished; the tensors kept under `forget` (`keep_tensor`), which no later run needs
        now, go."""
        self._finish_pass()
        self.stage, self.out = stage, out
        self.state = {"stage": stage, "next_block": self.n, "hidden": None, "files": out.sync(), "layers": {},
                      "experts": {}, "replayed": 0, "out": out.snapshot()}
        # a training's checkpoint goes (its result is now the pass's), and so do the tensors no run needs now
        trained = [k for k in TRAININGS if self.keep.pop(k, None)]
        gone = [self.keep.pop(k)["file"] for k in forget if self.keep.get(k)]
        self.commit()
        for k in trained:
            _remove_but(self.dir, TRAININGS[k][2] + "*")
        for f in gone:
            shutil.rmtree(self.dir / Path(f).parent, ignore_errors=True)

    def retune(self, recipe: dict) -> dict | None:
        """This run tunes GPTQ's scales under `recipe` (TUNING's values), which the fingerprint leaves out: a killed run
        that tuned under another (the rerun after `scale tuning diverged: lower --tune-lr`, or asking more steps)
        has its tuning dropped, its checkpoint or its finished pass, and the passes before it kept (the pruning,
        GPTQ's codes, the teacher's states while kept), so that the new tuning starts from GPTQ's scales instead
        of the whole run starting over. Returns the killed run's recipe when it differs, else None."""
        was = self.keep.get("tune_recipe")
        self.keep["tune_recipe"] = recipe
        tuned = ("tune_train", "tune")
        if was is None or was == recipe or not any(k in self.keep for k in tuned):
            return None  # (the same tuning, or none begun: nothing to drop)
        for k in tuned:
            self.keep.pop(k, None)
        self.done.pop("tune", None)
        found = {**self.found, "keep": {k: v for k, v in self.found.get("keep", {}).items() if k not in tuned},
                 "done": {k: v for k, v in self.found.get("done", {}).items() if k != "tune"}}
        if found.get("stage") == "tune":  # its last checkpoint was the tuning's result: no pass goes on from it
            found["stage"] = None
            found.pop("next_block", None)
        self.found, self.retuned = found, was
        return was

    def training(self, steps: int, key: str = "train") -> Training:
        """The checkpoints of a training of `steps` steps (`TRAININGS`' key: PERP's, or scale tuning's), committed
        with the run's on the same clock."""
        return Training(self, steps, key)

    def keep_tensor(self, key: str, t: torch.Tensor) -> None:
        """Keep `t` (in CPU memory; e.g. the teacher's hidden states of scale tuning) in the checkpoint, synced and
        committed: `kept_tensor(key)` gives it back to the next run."""
        name = key.replace("_", "-")
        shutil.rmtree(self.dir / name, ignore_errors=True)
        _save_hidden(self.dir / name, [t])
        self.keep[key] = {"file": f"{name}/model.safetensors"}
        self.commit()

    def kept_tensor(self, key: str) -> torch.Tensor | None:
        """The tensor a killed run kept under `key` (`keep_tensor`), read into CPU memory; None if it kept none."""
        from .lazy import WeightFiles

        if not self.keep.get(key):
            return None
        return WeightFiles(self.dir / Path(self.keep[key]["file"]).parent).get("h.0")

    def hidden(self, device) -> list[torch.Tensor]:
        from .lazy import WeightFiles

        name = self.state.get("hidden")
        if not name:
            return []
        files = WeightFiles(self.dir / name)
        return [files.get(f"h.{k}").to(device) for k in range(len(files.keys()))]

    def seed(self, infos: dict, experts: dict) -> tuple[int, int]:
        """Fill the pass's records of the blocks before `start`; returns its counts of replayed sublayers and of
        extra Hessian runs (walker.chunks) there."""
        infos.update(self.state.get("layers", {}))
        experts.update(self.state.get("experts", {}))
        return self.state.get("replayed", 0), self.state.get("hessian_extra", 0)

    def after(self, i: int, hidden: list[torch.Tensor] | None, infos: dict, experts: dict, replayed: int,
              hessian_extra: int = 0) -> None:
        done = i + 1
        if done < self.n and time.monotonic() - self.last < self.every:
            return
        buffer = self.out.buffer() if hasattr(self.out, "buffer") else None
        if buffer is None and not self.out.ready():
            return  # (an output that cannot keep what it holds unwritten: after a block that filled a file)
        files = self.out.sync()
        dropped = self._pending(buffer, done) if buffer is not None else []
        name = None
        if done < self.n and hidden is not None:
            name = f"hidden-{done:05d}"
            _save_hidden(self.dir / name, hidden)
        self.state = {"stage": self.stage, "next_block": done, "hidden": name, "files": files, "layers": infos,
                      "experts": experts, "replayed": replayed, "hessian_extra": hessian_extra,
                      "out": self.out.snapshot(), "pending": self.pending}
        self.commit()
        _remove_but(self.dir, "hidden-*", name)
        for f in dropped:
            shutil.rmtree(self.dir / Path(f).parent, ignore_errors=True)

    def _pending(self, buffer, done: int) -> list[str]:
        """Keep in `.resume/` the tensors the output's shard buffer (lazy.ShardBuffer) holds unwritten, so that a
        checkpoint needs no block that fills a file (a small model's packed output fills none before its end):
        those put since the last checkpoint, in one file; the files of those written to the output since are
        dropped (returned, removed once the new state is committed). Each tensor is kept once: at most the
        output's size is written twice."""
        held = set(buffer.shard)
        now = [e for e in self.pending if held.issuperset(e[1])]
        dropped = [e[0] for e in self.pending if e not in now]
        kept = {n for _, names in now for n in names}
        new = [n for n in buffer.shard if n not in kept]
        if new:
            from .lazy import fsync, save_tensors

            folder = self.dir / f"pending-{self.stage}-{done:05d}"
            shutil.rmtree(folder, ignore_errors=True)  # (a killed run's, never committed)
            folder.mkdir()
            save_tensors({n: buffer.shard[n] for n in new}, folder / "model.safetensors", {"format": "pt"})
            fsync([folder / "model.safetensors"])
            now.append([f"{folder.name}/model.safetensors", new])
        self.pending = now
        return dropped

    def commit(self) -> None:
        """Write the state: the current pass's last checkpoint, the finished passes', the run's."""
        seconds = self.found.get("seconds", 0.0) + time.monotonic() - self.t0
        _write_json(self.dir / STATE, {
            **self.state, "fingerprint": self.fp, "blocks": self.n, "done": self.done, "seconds": seconds,
            "runs": self.runs, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "keep": self.keep})
        self.last = time.monotonic()

    def record(self) -> dict | None:
        """The manifest's `resumed` entry: None for a run that started from the first block."""
        if not self.found:
            return None
        keep = self.found.get("keep", {})
        return {"pass": self.found.get("stage"), "from_block": self.found.get("next_block"), "blocks": self.n,
                "passes_done": list(self.found.get("done", {})), "runs": self.runs,
                "checkpoint": self.found.get("time"), "earlier_s": round(self.found.get("seconds", 0.0), 2),
                **{step: keep[k]["step"] for k, (_, step, _) in TRAININGS.items() if keep.get(k)},
                **({"tune_recipe_was": self.retuned} if self.retuned else {})}

    def close(self) -> None:
        """The output is complete: its checkpoints are not part of it."""
        shutil.rmtree(self.dir, ignore_errors=True)


class Training:
    """A training's checkpoints inside a run's (perp.recover's and quant.tune.train's `checkpoint`; `key`, one of
    `TRAININGS`): when `due` (`every_s` seconds since the run's last commit), `save` writes the training state
    (perp._state: at 70B with rank-16 adapters ~0.8 GB of trained fp32 tensors and twice that of AdamW's moments;
    quant.tune._state: 2.1 GB of scale offsets in groups of 128, 6.4 GB with Adam's moments) into
    `.resume/<prefix><step>/`, synced, and commits it with the run's checkpoint (its `keep`); `resumed` reads back
    the one a killed run committed. Between a pass over the blocks and the next (the pruned or sliced model's
    files, GPTQ's codes, are that pass's)."""

    FILE = "state.pt"

    def __init__(self, ck: Checkpoints, steps: int = 0, key: str = "train"):
        self.ck, self.steps, self.key = ck, steps, key

    def resumed(self) -> dict | None:
        train = self.ck.keep.get(self.key)
        if not train:
            return None
        return torch.load(self.ck.dir / train["file"], map_location="cpu", weights_only=True)

    def due(self) -> bool:
        return time.monotonic() - self.ck.last >= self.ck.every

    def save(self, state: dict) -> None:
        prefix = TRAININGS[self.key][2]
        name = f"{prefix}{state['step']:06d}"
        folder = self.ck.dir / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        with open(folder / self.FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        self.ck.keep[self.key] = {"file": f"{name}/{self.FILE}", "step": state["step"], "steps": self.steps}
        self.ck.commit()
        _remove_but(self.ck.dir, prefix + "*", name)


def _remove_but(folder: Path, pattern: str, *keep: str | None) -> None:
    """Remove the checkpoint folders matching `pattern` in `folder` except `keep` (the ones just committed)."""
    for p in folder.glob(pattern):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


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
