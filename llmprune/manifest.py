"""The manifest, llmprune.json: one schema, read and written here only.

Every output folder holds one. It says what was done to the model (`steps`, in order, and each
step's section), what it was calibrated on, what the stored format is, and what was measured on
the folder itself. Version 2 (this llmprune) guarantees that every `eval` entry was measured on the
saved output, loaded the way a user loads it (`llmprune.load`), and says so in `measured_on`; a
figure of an intermediate model is kept only under its own name (`dense_ppl`: the dense model
before compression; `before_recover_ppl`: the pruned model before PERP).

Version 1 manifests (llmprune <= 0.1 first wave) load: they are migrated in memory, and their eval
entries are marked with what they measured: the model in memory before it was saved (or packed), except a packed
folder's figures taken by `llmprune eval`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import DTYPES
from .errors import LLMPruneError

NAME = "llmprune.json"
VERSION = 2
SAVED = "saved output, loaded with llmprune.load"
EXPORT = "export, loaded with transformers"  # + " (how)": an export's own files, read as another engine's reader does
STEPS = ("prune", "slice", "recover", "quantize", "tune-scales", "pack", "export")


@dataclass
class Manifest:
    model: dict = field(default_factory=dict)  # where the base model came from (models.ModelInfo)
    steps: list[str] = field(default_factory=list)  # what was done, in order (STEPS)
    # pruning
    solver: str | None = None
    solver_opts: dict = field(default_factory=dict)
    scope: str | None = None
    pattern: str | None = None
    ignore: str | None = None
    sparsity: dict | None = None  # {"target", "measured", "linears", ...}
    owl: dict | None = None
    damp_raised: dict | None = None
    experts: dict | None = None  # Mixture-of-Experts: {"min_tokens", "fallback", "fell_back", "per_expert"}
    # groups whose Hessians were collected a run at a time: {"budget_gib" (this run's --hessian-gib or default), "extra":
    # runs beyond one a group, a resumed run's included}
    hessian_runs: dict | None = None
    slicegpt: dict | None = None
    calibration: dict | None = None
    recover: dict | None = None
    format: dict | None = None  # packed formats: packed.FormatSection as a dict
    export: dict | None = None  # a folder for another engine (llmprune/export): {"to", "files", ...}
    # quality, measured on this folder
    eval: dict = field(default_factory=dict)  # dataset -> {"ppl", "seqlen", "windows", ..., "measured_on"}
    zeroshot: dict | None = None
    # how it ran
    timings: dict = field(default_factory=dict)
    peak_rss_mib: float | None = None
    peak_gpu_mib: float | None = None
    io_bytes: dict | None = None  # /proc/self/io of the run: rchar, wchar, read_bytes, write_bytes
    onload: str | None = None  # "blocks": the weights were read block by block; "whole": in memory (why)
    resumed: dict | None = None  # the run went on from a killed run's checkpoint (resume.py): which pass, where, when
    device: str | None = None
    dtype: str | None = None
    protocol: str | None = None
    versions: dict = field(default_factory=dict)  # of the run that wrote this manifest and measured its figures
    history: list = field(default_factory=list)  # the runs that made its source, oldest first (`derive`)
    config: dict | None = None
    command: str | None = None
    recovered_from: str | None = None
    packed_from: str | None = None
    exported_from: str | None = None
    format_version: int = VERSION
    llmprune_version: str = __version__
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    # -- conversion ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format_version": self.format_version, "llmprune_version": self.llmprune_version, "model": self.model,
             "steps": self.steps}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("format_version", "llmprune_version", "extra", "model", "steps") or v in (None, {}, []):
                continue
            d[f.name] = v
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise LLMPruneError(f"{where} must be a JSON object, not {type(d).__name__}: re-create the output")
        missing = [k for k in ("format_version", "llmprune_version", "model") if k not in d]
        if missing:
            raise LLMPruneError(f"{where} lacks the keys {missing}: the manifest is damaged; re-create the output")
        try:
            version = int(d["format_version"])
        except (TypeError, ValueError):
            raise LLMPruneError(f"{where}: format_version {d['format_version']!r} is not a number") from None
        if version > VERSION:
            raise LLMPruneError(f"{where} has format_version {version}, newer than this llmprune reads ({VERSION}): "
                                f"upgrade llmprune")
        if version < 2:
            d = _migrate_v1(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        m = cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})
        for name, kind in (("model", dict), ("eval", dict), ("timings", dict), ("steps", list)):
            if not isinstance(getattr(m, name), kind):
                raise LLMPruneError(f"{where}: {name!r} must be a {kind.__name__}: the manifest is damaged")
        for name, kinds in (("format", (dict,)), ("sparsity", (dict, int, float)), ("zeroshot", (dict,))):
            if getattr(m, name) is not None and not isinstance(getattr(m, name), kinds):  # (None: absent)
                raise LLMPruneError(f"{where}: {name!r} is a {type(getattr(m, name)).__name__}, not a "
                                    f"{' or '.join(k.__name__ for k in kinds)}: the manifest is damaged")
        if m.dtype is not None and m.dtype not in DTYPES:
            raise LLMPruneError(f"{where}: dtype {m.dtype!r} is none of {', '.join(DTYPES)}: the manifest is damaged")
        return m

    # -- what a reader asks ----------------------------------------------------------------------
    @property
    def format_name(self) -> str:
        return (self.format or {}).get("name", "dense")

    @property
    def export_target(self) -> str | None:
        """The engine format an export was written for ("compressed-tensors", "gguf"); None: not an export."""
        return (self.export or {}).get("to", "compressed-tensors") if self.exported_from else None

    def conditions(self) -> dict:
        """How the run that made this folder measured its figures (dtype, device, versions), for an entry that does
        not say (pipeline.measured_alike)."""
        return {"dtype": self.dtype, "device": self.device, "versions": self.versions}

    def get(self, key: str, default: Any = None) -> Any:
        """dict-style access for readers of optional sections."""
        return self.to_dict().get(key, default)


def ppl_protocol(r: dict, m: dict | None = None, words: bool = False) -> str:
    """How a perplexity entry `r` was measured, one spelling for the report, the card and the sweep: window length x
    windows, and with the manifest `m` its dtype (the entry's, else the run's): "2048 x 16, float32"; `words`:
    "2048-token windows x 16, float32", as papers state it."""
    length = f"{r.get('seqlen', '?')}-token windows" if words else r.get("seqlen", "?")
    how = f"{length} x {r.get('windows', '?')}"
    return how if m is None else f"{how}, {r.get('dtype') or m.get('dtype') or '?'}"


def zeroshot_tasks(zs: dict | None) -> dict:
    """The tasks of a zero-shot section (task -> acc, acc_norm, n), not how it was measured (limit, dtype, device,
    versions, command)."""
    return {k: v for k, v in (zs or {}).items() if isinstance(v, dict) and "acc" in v}


def compress_time(m: dict) -> tuple[float | None, int]:
    """(seconds the compression took over every run that did part of it, how many runs): a resumed run's
    compress_s counts its own part only; the earlier runs' work (resumed.earlier_s) is added."""
    s = (m.get("timings") or {}).get("compress_s")
    r = m.get("resumed") or {}
    if not isinstance(s, (int, float)):
        return None, 1
    return float(s) + float(r.get("earlier_s") or 0.0), int(r.get("runs") or 1)


def compress_time_text(m: dict, seconds=lambda s: f"{s:.1f} s") -> str | None:
    """e.g. "61.2 s" or "61.2 s (3 runs: resumed)" (`seconds`: how the time itself is written)."""
    s, runs = compress_time(m)
    return None if s is None else seconds(s) + (f" ({runs} runs: resumed)" if runs > 1 else "")


def derive(old: Manifest, versions: dict, device: str | None, **changes) -> Manifest:
    """The manifest of a folder another command (pack, recover, export) made from `old`'s folder: its
    sections carried over, its figures and its run's memory cleared (`eval`, `zeroshot`, peak memory, I/O,
    how the weights were read and whether the run was resumed describe the old folder's run; `changes`
    override more), and that run (steps, command, device, versions, peak memory, onload) appended to
    `history`, so that `device`, `versions`, `onload` and the peaks name the run whose figures this manifest
    holds (the caller sets them again once that run is done: `versions` names the GPU only once CUDA has been
    used)."""
    new = Manifest.from_dict({**old.to_dict(), "eval": {}, "zeroshot": None, "peak_rss_mib": None,
                              "peak_gpu_mib": None, "io_bytes": None, "onload": None, "resumed": None,
                              **changes})
    new.history = [*old.history, {"steps": list(old.steps), "command": old.command, "device": old.device,
                                  "versions": old.versions, "llmprune_version": old.llmprune_version,
                                  **{k: v for k in ("peak_rss_mib", "peak_gpu_mib", "onload")
                                     if (v := getattr(old, k)) is not None}}]
    new.versions, new.device, new.llmprune_version = versions, device, __version__
    return new


def _migrate_v1(d: dict) -> dict:
    """Version 1 -> 2: steps derived from the sections; eval entries say what they measured."""
    d = dict(d)
    fmt = (d.get("format") or {}).get("name", "dense")
    steps = []
    if d.get("solver") and d.get("solver") != "slicegpt":
        steps.append("prune")
    if d.get("slicegpt"):
        steps.append("slice")
    if d.get("recover"):
        steps.append("recover")
    if fmt != "dense":
        if (d.get("format") or {}).get("quant"):
            steps.append("quantize")
        if ((d["format"].get("quant_options") or {}).get("tune") or {}).get("kept") == "tuned":
            steps.append("tune-scales")
        steps.append("pack")
    d["steps"] = steps
    # v1 compress and recover evaluated the model in memory before saving (and packing); v1 pack measured nothing, so
    # a packed folder's figure came from `llmprune eval` on the folder. A dense folder's figure may have too, but
    # nothing tells it from compress's.
    what = (SAVED if d.get("packed_from") else "model before packing (version 1 manifest)" if fmt != "dense"
            else "model in memory before saving (version 1 manifest)")
    d["eval"] = {k: ({"measured_on": what, **v} if isinstance(v, dict) else v) for k, v in (d.get("eval") or {}).items()}
    if isinstance(d.get("zeroshot"), dict):
        d["zeroshot"] = {"measured_on": what, **d["zeroshot"]}
    d["format_version"] = 2
    return d


def path(folder: str | Path) -> Path:
    return Path(folder) / NAME


def exists(folder: str | Path) -> bool:
    return path(folder).is_file()


def files_stamp(folder: str | Path) -> str:
    """A stamp of the files a figure of `folder` was measured on (weights, config, tokenizer; not the manifest and
    the card, which the figures are written into): a hash of each file's name, size and modification time, as make
    tells a changed file, read from the directory alone (hashing a 70B model's bytes would take minutes). Recorded with
    each figure measured on the folder; a figure whose stamp differs from the folder's now was measured on other
    bytes (weights edited since, or a copy whose files have new times) and is measured again, not reused."""
    import hashlib

    root = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in
                                                                         p.relative_to(root).parts)):
        if f.parent == root and f.name in (NAME, "README.md"):
            continue
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read(folder: str | Path) -> Manifest:
    p = path(folder)
    if not p.exists():
        raise LLMPruneError(f"{folder} has no {NAME}: it is not an llmprune output folder "
                            f"(make one with `llmprune compress`)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LLMPruneError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return Manifest.from_dict(d, str(p))


def write(folder: str | Path, m: Manifest | dict) -> None:
    """Write (atomically: a reader never sees half a manifest)."""
    d = m.to_dict() if isinstance(m, Manifest) else Manifest.from_dict(m).to_dict()
    p = path(folder)
    tmp = p.with_name(f".{NAME}.tmp")
    tmp.write_text(json.dumps(d, indent=2) + "\n")
    os.replace(tmp, p)


def update(folder: str | Path, replace: tuple[str, ...] = (), **sections) -> Manifest:
    """Merge sections into an output's manifest (dict sections merge key by key, except those in `replace`)."""
    m = read(folder)
    d = m.to_dict()
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict) and k not in replace:
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    m = Manifest.from_dict(d)
    write(folder, m)
    return m
