"""Output folders: a plain Hugging Face folder (config, safetensors, tokenizer) plus llmprune.json.

`save_dense` writes a dense model (pruned weights as zeros) into a folder; `load` opens any llmprune
output the way a user does (`llmprune.load`): packed formats through packed.load_packed, per-block
SliceGPT outputs through their own loader, everything else through transformers. Files are checked
before anything is read into a model: safetensors only (pickle is refused), headers readable.
"""
from __future__ import annotations

from pathlib import Path

from . import manifest as mf
from . import outdir
from .errors import LLMPruneError

MANIFEST = mf.NAME


def save_dense(model, tokenizer, folder: str | Path) -> None:
    """Write a dense (zeros in place) model as a plain HF folder into an existing `folder`."""
    model.save_pretrained(folder, safe_serialization=True)
    outdir.save_side_files(folder, tokenizer=tokenizer)


def save(model, tokenizer, out: str | Path, manifest: dict | mf.Manifest, overwrite: bool = False) -> Path:
    """save_dense into a new output folder that appears whole or not at all, with its manifest."""
    with outdir.atomic_dir(out, overwrite) as tmp:
        save_dense(model, tokenizer, tmp)
        mf.write(tmp, manifest)
    return Path(out)


def check_weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, each header read (cheap): a truncated, damaged or pickle
    file is an LLMPruneError naming it, not a traceback from deep inside a loader."""
    from .lazy import WeightFiles

    return sorted(set(WeightFiles(folder).where.values()))


def load(folder: str | Path, dtype="float32", device="cpu"):
    """Load an llmprune output: (model, tokenizer, manifest as a dict)."""
    import torch

    folder = Path(folder)
    m = mf.read(folder)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if m.format_name != "dense":
        from . import packed

        model = packed.load_packed(folder, dtype=dt, device=device)
    else:
        check_weight_files(folder)
        sl = m.slicegpt or {}
        if sl.get("rotation") == "per-block" or sl.get("standard") is False:  # shortcuts: not a stock class
            from .sliced import load_sliced

            model = load_sliced(folder, dtype=dt, device=device)
        else:
            from .models import from_pretrained

            on_gpu = {"device_map": str(device)} if torch.device(device).type == "cuda" else {}  # read straight there
            model = from_pretrained(folder, dtype=dt, use_safetensors=True, **on_gpu).to(device)
    return model.eval(), load_tokenizer(folder), m.to_dict()


def require_tokenizer(folder: str | Path, command: str) -> None:
    """A command that tokenizes text (eval, recover) refuses an output saved without a tokenizer, before any work."""
    if not (Path(folder) / "tokenizer_config.json").exists():
        raise LLMPruneError(f"{folder} has no tokenizer (tokenizer_config.json), which `llmprune {command}` needs: copy "
                            f"the tokenizer files of the model it was made from into it")


def load_tokenizer(folder: str | Path):
    """The output's tokenizer, or None when it was saved without one."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    return AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
