"""Output folders that appear whole or not at all.

Every command writes into a temporary sibling `.<name>.tmp-<pid>-<id>` and renames it over `<name>`
at the end. An error, Ctrl-C or a full disk removes the temporary folder and leaves `<name>` as it
was (a long run that committed a checkpoint keeps it, as `.<name>.tmp-<id>`, and says so); a run killed
outright (SIGKILL, the OOM killer) cannot clean up, so the next run to the same output removes the
siblings whose process is gone (a 70B model leaves 140 GB behind otherwise), or takes one over to go on
from its last checkpoint (resume.py).
`save_side_files` writes what every output carries beside its weights (config, tokenizer).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import LLMPruneError


def check_out(out: str | Path, overwrite: bool, sources=(), marker: str = "llmprune.json") -> Path:
    """Refuse, before any work is done, an output path that cannot be written or whose replacement would lose
    something: an existing output (unless overwrite), a file, a folder under a file, the current folder or one
    above it, a folder that is, holds or lies inside one of the command's `sources`, and (with overwrite) a non-empty folder
    that is not an output of this kind (no `marker` file in it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LLMPruneError(f"output path {out} is a file: choose another --out")
    above = next((q for q in out.absolute().parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise LLMPruneError(f"--out {out}: {above} is a file, not a folder: choose another --out")
    where, here = out.resolve(), Path.cwd().resolve()
    if where == here or where in here.parents:
        raise LLMPruneError(f"--out {out} is the current folder or one above it: give the name of a folder to write")
    for src in map(Path, sources):
        s = src.resolve()
        if s == where or where in s.parents:
            raise LLMPruneError(f"--out {out} {'is' if s == where else 'holds'} the source {src}, which writing the "
                                f"output would delete: choose another --out")
        if s in where.parents and s.is_dir():  # the source's files would change, and a copy of it hold an output
            raise LLMPruneError(f"--out {out} is inside the source {src}, which writing the output would change: "
                                f"choose a folder outside it")
    if out.exists() and not overwrite:
        raise LLMPruneError(f"output folder {out} exists: pass --overwrite or choose another --out")
    check_writable(out, "--out")
    if out.exists() and any(out.iterdir()) and not (out / marker).is_file():
        raise LLMPruneError(f"--overwrite would delete {out}, which holds no {marker} (not an output of this command): "
                            f"remove it yourself or choose another --out")
    return out


def check_writable(path: Path, flag: str, fix: str | None = None) -> None:
    """Refused before any work where this process cannot create `path` (its nearest existing folder read-only)."""
    where = path.absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise LLMPruneError(f"{flag} {path}: no permission to write in {where}: {fix or f'choose another {flag}'}")


def check_file_out(path: str | None, flag: str) -> None:
    """A file a command writes at its end (--json, --md): refused before the work when it cannot be written there,
    or when it would replace a file of an llmprune output (its manifest, weights, config)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir() or not p.absolute().parent.is_dir():
        raise LLMPruneError(f"{flag} {path}: {'a folder' if p.is_dir() else 'its folder does not exist'}; "
                            f"give a file in an existing folder")
    if p.exists() and (p.absolute().parent / "llmprune.json").is_file():
        raise LLMPruneError(f"{flag} {path} would replace a file of the llmprune output {p.absolute().parent}: "
                            f"give a file outside it")
    check_writable(p, flag)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale(out: Path) -> list[Path]:
    """Temporary siblings of `out` left by runs that died (their process no longer exists). Siblings
    named without a pid (older llmprune) count too: no live run can own them."""
    found = []
    if not out.parent.is_dir():
        return found
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{{8}}$")
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and not (m[2] and (_alive(int(m[2])) or int(m[2]) == os.getpid())):
            found.append(p)
    return found


def remove_stale(out: Path, keep: Path | None = None) -> list[Path]:
    """Remove the temporary siblings of `out` left by runs that died, but `keep` (a run resumes it)."""
    removed = []
    for p in stale(out):
        if keep is None or p != keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under `folder`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_space(out: Path, parts: dict[str, int], written: int = 0, name: str | None = None,
                fix: str = "free space there or choose another --out") -> None:
    """Refuse, before any work, a run whose output folder needs more than the free space of its disk (`parts`:
    bytes by what they hold; `written`: already there, a resumed run's): a 70B model's output is 140 GB, and
    finding the disk full after hours of pruning loses them."""
    where = Path(out).absolute().parent
    while not where.exists():
        where = where.parent
    need, free = sum(parts.values()) - written, shutil.disk_usage(where).free
    if need > free:
        what = " + ".join(f"{k} {size(v)}" for k, v in parts.items()) + (f" - {size(written)} written" if written else "")
        raise LLMPruneError(f"{name or Path(out).name} needs {size(need)} ({what}) on the disk of {where.resolve()}, which "
                            f"has {size(free)} free: {fix}")


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # numpy's tofile (the gguf writer's) raises a plain OSError without an errno
    return any(m in str(e) for m in ("No space left on device", "Disk quota exceeded", "Not enough free space"))


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, adopt: Path | None = None, keep=None, sources=(),
               marker: str = "llmprune.json"):
    """Yield a fresh temporary folder next to `out` (or `adopt`, a dead run's, taken over: resume.py); on
    success it replaces `out`, on any error (KeyboardInterrupt included) it is removed and `out` is left as
    it was - unless `keep(tmp)` says what it holds (a checkpoint to go on from: resume.kept): then it stays,
    renamed without this process's id so that any later run, in this process too, may take it over or
    remove it, and that is said on stderr. A full disk becomes a one-line LLMPruneError."""
    out = check_out(out, overwrite, sources, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out, keep=adopt)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.tmp-{tag}")
    if adopt is not None:
        try:
            os.replace(adopt, tmp)  # ours now: no other run removes it as stale
        except FileNotFoundError:
            raise LLMPruneError(f"{adopt.name} was taken over by another run of {out.name} meanwhile: let that one "
                                f"finish, or write another --out") from None
    else:
        tmp.mkdir()
    beside = None
    try:
        yield tmp
        if out.exists() and not overwrite:  # written by another run meanwhile: not replaced without --overwrite
            beside = out.with_name(f"{out.name}.new-{tag}")
            os.replace(tmp, beside)
        elif out.exists():
            old = out.with_name(f".{out.name}.old-{tag}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        said = None if keep is None or _disk_full(e) else keep(tmp)
        if said:
            left = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(tmp, left)
            except OSError:
                said = None
        if said:
            print(f"llmprune: kept {left.name} ({size(folder_bytes(left))}): "
                  f"{said}; the same command goes on from there, any other run writing {out.name} removes it",
                  file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise LLMPruneError(f"no space left on the disk of {out.parent.resolve()} while writing {out.name}: "
                                f"free space there or choose another --out (nothing was left behind)") from None
        raise
    if beside is not None:
        raise LLMPruneError(f"output folder {out} was written by another run while this one worked, and is kept; this "
                            f"run's output is {beside}: rename it, or rerun with --overwrite")


def save_side_files(folder: str | Path, config=None, generation_config=None, tokenizer=None) -> None:
    """config.json, generation_config.json and the tokenizer's files, as transformers writes them
    (each when given): what every writer of weights (dense, packed, exported) puts beside them."""
    for part in (config, generation_config, tokenizer):
        if part is not None:
            part.save_pretrained(folder)
