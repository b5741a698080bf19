"""Configuration as frozen, validated dataclasses. Unknown keys are rejected, so a typo in a
Python call or a JSON recipe fails loudly instead of being ignored."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import LLMPruneError

CONFIG_VERSION = 1

# Calibration and evaluation settings that defaults come from. "paper" is the SparseGPT/Wanda
# protocol (128 x 2048 C4 windows, every WikiText-2 window); "cpu" (P-cpu) keeps a run on a
# 2-core CPU to minutes: 64 x 512 calibration windows, 16 evaluation windows of 2048.
PROTOCOLS = {
    "paper": {"nsamples": 128, "seqlen": 2048, "eval_windows": 0},
    "cpu": {"nsamples": 64, "seqlen": 512, "eval_windows": 16},
}


@dataclass(frozen=True)
class CompressConfig:
    model: str = "llama"
    solver: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float | None = None  # None: 0.5, or what an N:M pattern implies
    scope: str = "layer"  # magnitude: "layer" or "global" (Global MP)
    ignore: str | None = None  # regex of linear names left dense
    solver_opts: dict = field(default_factory=dict)  # e.g. damp, blocksize, init, max_cycles
    owl: dict | None = None  # {"m": 5.0, "lam": 0.08} for OWL layer-wise sparsity
    # calibration
    calib: str = "c4"
    nsamples: int | None = None  # None: from the protocol
    seqlen: int | None = None
    protocol: str = "auto"  # auto: paper on CUDA, cpu on CPU (see PROTOCOLS)
    seed: int = 0
    calib_batch: int = 8
    # run
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "float32"
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    # evaluation
    eval: tuple[str, ...] = ()
    eval_seqlen: int = 2048
    eval_windows: int | None = None  # None: from the protocol; 0: all windows
    eval_dense: bool = True
    # transforms, formats, recovery (each validated by its own module)
    slicegpt: dict | None = None  # {"slicing": 0.25, "rotation": "per-block", "round_to": 8}
    format: str = "dense"
    quant: str | None = None  # rtn | gptq, for the int4 formats
    group_size: int | str = "auto"  # int4 scale group; auto: the largest of 128/64/32/16 that divides
    grid: str = "auto"  # int4 grid: sym | asym | auto (the format's default: w4g128 asym, w4s24/w4s50 sym)
    save_dtype: str = "float16"  # floating tensors of packed formats (dense outputs keep --dtype)
    gptq: dict | None = None  # {"act_order": bool, "sink_weight": float}: overrides packed.GPTQ_DEFAULTS
    recover: dict | None = None  # {"method": "perp", "steps": 200, ...}
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LLMPruneError(f"unknown config keys {unknown}: valid keys are {', '.join(sorted(known))}")
        return cls(**d)

    def __post_init__(self):
        if isinstance(self.eval, str):
            object.__setattr__(self, "eval", tuple(x for x in self.eval.split(",") if x))
        if self.protocol not in ("auto", *PROTOCOLS):
            raise LLMPruneError(f"--protocol {self.protocol!r}: use auto, {', '.join(PROTOCOLS)}")
        if (self.nsamples is not None and self.nsamples < 1) or (self.seqlen is not None and self.seqlen < 2):
            raise LLMPruneError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.calib_batch < 1:
            raise LLMPruneError("--calib-batch must be >= 1")
        if self.scope not in ("layer", "global"):
            raise LLMPruneError(f"--scope {self.scope!r}: use layer or global")
        if self.scope == "global" and self.solver != "magnitude":
            raise LLMPruneError("--scope global is Global Magnitude Pruning: use it with --solver magnitude")
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise LLMPruneError(f"--dtype {self.dtype!r}: use float32, float16, bfloat16 or float64")
        if self.eval_windows is not None and self.eval_windows < 0:
            raise LLMPruneError("--eval-windows must be >= 1, or 0 for all windows")

    def resolved(self, device: str) -> CompressConfig:
        """The config with protocol defaults filled in for the device the run uses."""
        name = self.protocol if self.protocol != "auto" else ("paper" if device.startswith("cuda") else "cpu")
        p = PROTOCOLS[name]
        fill = {k: p[k] for k in ("nsamples", "seqlen", "eval_windows") if getattr(self, k) is None}
        return dataclasses.replace(self, protocol=name, **fill)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
