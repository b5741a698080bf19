"""Facts about the run itself for the manifest: device choice, peak memory, library versions."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

from .errors import LLMPruneError


def pick_devices(device: str | None) -> tuple[str, ...]:
    """The devices a run uses, the first one walking the blocks: `None`/"auto" is every visible GPU
    ("cuda" when there is one, "cuda:0", "cuda:1", ... when several: the linears of a block are then
    solved on all of them, parallel.py), else the CPU; "cuda:0,cuda:1" names them."""
    import torch

    if device in (None, "auto"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return ("cpu",) if n == 0 else ("cuda",) if n == 1 else tuple(f"cuda:{i}" for i in range(n))
    names = tuple(d.strip() for d in device.split(","))
    for d in names:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise LLMPruneError(f"--device {device}: {d!r} is not a device: use cpu, cuda, cuda:N or a comma "
                                f"list such as cuda:0,cuda:1") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise LLMPruneError(f"--device {device}: no CUDA device is available here; use --device cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise LLMPruneError(f"--device {device}: {d} does not exist (this machine has "
                                    f"{torch.cuda.device_count()} GPU(s)): use cuda:0 to "
                                    f"cuda:{torch.cuda.device_count() - 1}")
        elif dev.type != "cpu":
            raise LLMPruneError(f"--device {device}: {d!r}: llmprune runs on cpu or cuda devices")
    if len(set(names)) != len(names) and any(torch.device(d).type == "cuda" for d in names):
        raise LLMPruneError(f"--device {device} names a GPU twice: list each GPU once")
    return names


def pick_device(device: str | None) -> str:
    """The one device of a command that runs on one (evaluation, bench): the first of pick_devices."""
    return pick_devices(device)[0]


def peak_rss_mib() -> float:
    """The process's peak resident memory in MiB: Linux's VmHWM (which reset_peak_rss() can restart),
    else getrusage's ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def reset_peak_rss() -> bool:
    """Restart the peak-memory count at the current resident size (Linux >= 4.0: writing 5 to
    /proc/self/clear_refs), so one process can measure the peak of each of several runs. Returns
    False where that is not possible; peak_rss_mib() then stays the process-wide peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_LIBC: list = []


def trim_heap() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's malloc_trim; nothing elsewhere).

    glibc serves allocations below its mmap threshold from the heap and raises that threshold after
    every large free, so the many block-sized tensors of a walk end up in the heap, where freed memory
    stays resident: without a trim after each block, RSS crept up 12 MiB a block in an evaluation and
    about 50 in a SparseGPT walk at the Llama-3-8B width (docs/scale.md)."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)


def peak_gpu_mib(device: str) -> float | None:
    """Peak memory torch allocated on a CUDA device in this process (None elsewhere); for a comma
    list of devices, the largest of their peaks."""
    import torch

    peaks = [torch.cuda.max_memory_allocated(torch.device(d)) for d in str(device).split(",") if d.startswith("cuda")]
    return round(max(peaks) / 2**20, 1) if peaks else None


# Libraries whose version can move a figure, recorded when installed: SparseGPT 2:4 on SmolLM2 went from 80.02
# (2026-11-29, transformers 5.23) to 76.97 (2026-12-04, transformers 5.25 and whatever else had moved) with the
# same llmprune code, and the manifests then named only torch and transformers
_RECORDED = ("transformers", "tokenizers", "datasets", "accelerate", "safetensors", "gguf", "scipy", "numpy", "triton",
             "lm_eval")


def versions() -> dict:
    """The software a figure was computed with, and the processors ("cpu", and "gpu" when this process used
    CUDA): the same code and libraries gave Wanda 50% on SmolLM2 44.74 on the machine that ran the README's
    tables and 44.90 on an AMD EPYC (2026-12-05), so the machine is part of the record."""
    from importlib import metadata

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in _RECORDED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpu = cpu_name()
    if cpu:
        out["cpu"] = cpu
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never starts CUDA just to name it
        out["gpu"] = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}))
    return out


def cpu_name() -> str | None:
    """The processor's model name (Linux /proc/cpuinfo, else platform.processor()), or None."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def io_bytes() -> dict | None:
    """This process's I/O so far (Linux /proc/self/io): bytes read and written through system calls
    (rchar, wchar) and from / to the storage device (read_bytes, write_bytes); None elsewhere."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return {k: int(fields[k]) for k in ("rchar", "wchar", "read_bytes", "write_bytes") if k in fields}


def free_memory(device: str, offload: bool = False) -> int:
    """Bytes a model loaded onto `device` can take now: the CPU's available memory; a GPU's free memory, and with
    `offload` (accelerate's device_map="auto" from there) every GPU's plus the CPU's."""
    import psutil
    import torch

    cpu = psutil.virtual_memory().available
    if torch.device(device).type != "cuda":
        return cpu
    gpus = range(torch.cuda.device_count()) if offload else [torch.device(device).index or 0]
    return sum(torch.cuda.mem_get_info(i)[0] for i in gpus) + (cpu if offload else 0)


def check_memory(need: int, device: str, what: str, fix: str, offload: bool = False) -> None:
    """Refuse, before any work, what would run out of memory later: `what` needs `need` bytes on `device`."""
    import torch

    have = free_memory(device, offload)
    if need > have:
        where = "this machine's memory" if torch.device(device).type != "cuda" else \
            "GPU and CPU memory" if offload else f"{device}'s free memory"
        raise LLMPruneError(f"{what} needs {need / 2**30:.1f} GiB and {where} has {have / 2**30:.1f} GiB: {fix}")


def memory(device: str) -> dict:
    """Manifest fields: peak RSS, peak GPU memory on CUDA, and the process's I/O."""
    out = {"peak_rss_mib": peak_rss_mib()}
    gpu = peak_gpu_mib(device)
    if gpu is not None:
        out["peak_gpu_mib"] = gpu
    io = io_bytes()
    if io is not None:
        out["io_bytes"] = io
    return out
