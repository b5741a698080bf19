"""Compressed checkpoints: a plain Hugging Face folder (config, safetensors, tokenizer) plus
llmprune.json, the manifest. Written to a temporary sibling folder and renamed at the end, so an
error or Ctrl-C never leaves a half-written output where a good one was expected."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import LLMPruneError

MANIFEST = "llmprune.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "llmprune_version", "model")


def check_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise LLMPruneError(f"output folder {out} exists: pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise LLMPruneError(f"output path {out} is a file: choose another --out")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `out`; on success it replaces `out`, on any error
    (KeyboardInterrupt included) it is removed and `out` is left as it was."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: str | Path, manifest: dict) -> None:
    Path(folder, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder, MANIFEST)
    if not p.exists():
        raise LLMPruneError(f"{folder} has no {MANIFEST}: it is not an llmprune output folder (make one with `llmprune compress`)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LLMPruneError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise LLMPruneError(f"{p} lacks the keys {missing}: the manifest is damaged; recreate the output")
    if int(m["format_version"]) > FORMAT_VERSION:
        raise LLMPruneError(
            f"{p} has format_version {m['format_version']}, newer than this llmprune understands "
            f"({FORMAT_VERSION}): upgrade llmprune"
        )
    return m


def save(model, tokenizer, out: str | Path, manifest: dict, overwrite: bool = False) -> Path:
    """Save a dense (zeros in place) model as a plain HF folder plus the manifest."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest)
    return Path(out)


def update_manifest(folder: str | Path, **sections) -> dict:
    """Merge sections into an existing output's manifest (e.g. eval results), atomically."""
    m = read_manifest(folder)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(m.get(k), dict):
            m[k].update(v)
        else:
            m[k] = v
    tmp = Path(folder, f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    os.replace(tmp, Path(folder, MANIFEST))
    return m


def load(folder: str | Path, dtype="float32", device="cpu"):
    """Load an llmprune output: (model, tokenizer, manifest). Packed formats and per-block
    SliceGPT outputs are rebuilt through their own loaders; plain folders load with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    m = read_manifest(folder)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    fmt = (m.get("format") or {}).get("name", "dense")
    if fmt != "dense":
        from . import packed

        model = packed.load_packed(folder, dtype=dt, device=device)
    elif (m.get("slicegpt") or {}).get("rotation") == "per-block" or (m.get("slicegpt") or {}).get("standard") is False:
        from .transforms import slicegpt

        model = slicegpt.load_sliced(folder, dtype=dt, device=device)
    else:
        if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
            raise LLMPruneError(f"{folder} holds pickle weights (.bin): llmprune loads safetensors only")
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, use_safetensors=True).to(device)
        except (OSError, ValueError, RuntimeError) as e:
            raise LLMPruneError(f"cannot load {folder}: {str(e).splitlines()[0]}") from None
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.eval(), tok, m
