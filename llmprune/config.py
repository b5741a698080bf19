"""Configuration as frozen, validated dataclasses, one per pipeline stage (pipeline.py), composed
by CompressConfig, the recipe `llmprune compress` runs. Unknown keys are rejected, so a typo in a
Python call or a JSON recipe fails loudly instead of being ignored; each stage's options are
checked where they are defined, once, before any model is loaded. Sub-configs may be given as
dicts (JSON recipes, Python kwargs): they are converted and checked the same way.

Importing this module is cheap: no torch.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import LLMPruneError

CONFIG_VERSION = 2

# Calibration and evaluation settings that defaults come from. "paper" is the SparseGPT/Wanda
# protocol (128 x 2048 C4 windows, every WikiText-2 window); "cpu" (P-cpu) keeps a run on a
# 2-core CPU to minutes: 64 x 512 calibration windows, 16 evaluation windows of 2048.
PROTOCOLS = {
    "paper": {"nsamples": 128, "seqlen": 2048, "eval_windows": 0},
    "cpu": {"nsamples": 64, "seqlen": 512, "eval_windows": 16},
}

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")  # auto: bfloat16 on CUDA, float32 on CPU
TUNE_LR = 1e-3  # scale tuning's relative Adam step (quant/tune.py)
EVAL_DATASETS = ("wikitext2", "c4")


def protocol_of(protocol: str | None, device: str) -> str:
    """The PROTOCOLS entry a run uses: the one named, else (auto, or a folder from before the field) paper on CUDA
    and cpu on the CPU."""
    return protocol if protocol in PROTOCOLS else ("paper" if device.startswith("cuda") else "cpu")


def calibration_of(protocol: str | None, device: str, nsamples: int | None, seqlen: int | None) -> tuple[int, int]:
    """(nsamples, seqlen) of GPTQ's calibration where pack or export quantizes an output: those given, else its
    compress run's protocol's (protocol_of)."""
    p = PROTOCOLS[protocol_of(protocol, device)]
    return nsamples or p["nsamples"], seqlen or p["seqlen"]
EXPERT_FALLBACKS = ("pooled", "magnitude")  # moe.FALLBACKS (kept here: this module imports no torch)


def _from(cls, value, what: str):
    """A sub-config from a dict (unknown keys rejected), an instance, or None."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise LLMPruneError(f"{what} must be a dict of options, not {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise LLMPruneError(f"unknown {what} options {unknown}: valid are {', '.join(sorted(known))}")
    return cls(**value)


@dataclass(frozen=True)
class OwlConfig:
    """OWL outlier-weighted layer-wise sparsity (Yin et al. 2024, arXiv 2310.05175)."""
    m: float = 5.0  # outlier threshold: |W| x ||X|| > m x the layer's mean
    lam: float = 0.08  # layer sparsities vary within target +- lam

    def __post_init__(self):
        if not self.m > 0:
            raise LLMPruneError(f"--owl-m {self.m} must be > 0, e.g. 5")
        if not 0 <= self.lam < 1:
            raise LLMPruneError(f"--owl-lambda {self.lam} must be in [0, 1), e.g. 0.08")


@dataclass(frozen=True)
class SliceConfig:
    """SliceGPT (Ashkboos et al. 2024, arXiv 2401.15024): delete rows and columns."""
    slicing: float = 0.25
    rotation: str = "per-block"
    round_to: int = 8
    slice_head: bool = False  # also slice the head and the last residual (the reference does not)

    def __post_init__(self):
        if not 0.0 < self.slicing < 1.0:
            raise LLMPruneError(f"--slicing must be in (0, 1), the fraction of the hidden size to delete; "
                                f"got {self.slicing}")
        if self.rotation not in ("per-block", "shared"):
            raise LLMPruneError(f"--rotation must be per-block or shared, got {self.rotation!r}")
        if self.round_to < 1:
            raise LLMPruneError(f"--round-to must be a positive integer, got {self.round_to}")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ as `--quant gptq` runs it (defaults: quant/sequential.GPTQ_DEFAULTS) and the optional
    end-to-end scale tuning after it (quant/tune.py)."""
    act_order: bool = True
    sink_weight: float = 16.0
    tune_steps: int = 0
    tune_lr: float = TUNE_LR

    def __post_init__(self):
        if not (isinstance(self.sink_weight, (int, float)) and self.sink_weight >= 1):
            raise LLMPruneError(f"--sink-weight {self.sink_weight}: must be >= 1 (1 counts the first token like any "
                                f"other)")
        if not (isinstance(self.tune_steps, int) and self.tune_steps >= 0):
            raise LLMPruneError(f"--tune-steps {self.tune_steps}: must be a whole number >= 0 (0: no tuning)")
        if not self.tune_lr > 0:
            raise LLMPruneError(f"--tune-lr {self.tune_lr}: must be > 0, e.g. 1e-3")
        object.__setattr__(self, "sink_weight", float(self.sink_weight))
        object.__setattr__(self, "tune_lr", float(self.tune_lr))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def given(cls, options: dict | None, quant: str | None) -> GPTQConfig | None:
        """The GPTQ options a caller gave (None values: not given; the others keep the defaults) for `quant` gptq,
        None for another quant, which any given option contradicts (refused)."""
        given = {k: v for k, v in (options or {}).items() if v is not None}
        if given and quant != "gptq":
            raise LLMPruneError(GPTQ_ONLY)
        return cls(**given) if quant == "gptq" else None


GPTQ_ONLY = "--act-order / --sink-weight / --tune-steps / --tune-lr are GPTQ options: add --quant gptq or drop them"


@dataclass(frozen=True)
class RecoverConfig:
    """PERP retraining after pruning (Zimmer et al. 2023, arXiv 2312.15230); options of perp.recover."""
    method: str = "perp"
    steps: int = 200
    lr: float | None = None  # None: perp's default
    rank: int = 16
    train: tuple[str, ...] = ("norms", "biases", "masklora")
    batch_size: int = 4
    grad_accum: int = 1
    warmup: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_checkpointing: bool = True
    mixed_precision: str = "no"
    seed: int = 0
    data: str | None = None  # None: the pruning's calibration set
    seqlen: int = 512
    nsamples: int | None = None  # None: steps x batch_size x grad_accum (each window seen once)
    resident_gib: float | None = None  # weights each device keeps (None: what fits); the rest streams

    def __post_init__(self):
        if isinstance(self.train, str):
            object.__setattr__(self, "train", tuple(x for x in self.train.split(",") if x))
        if self.method != "perp":
            raise LLMPruneError(f"--recover {self.method!r}: the only recovery method is perp")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.seqlen < 2:
            raise LLMPruneError("PERP needs --steps, --batch and --grad-accum >= 1 and --seqlen >= 2")
        if self.resident_gib is not None and not self.resident_gib > 0:
            raise LLMPruneError(f"--resident-gib {self.resident_gib} must be > 0 (GiB of weights each device keeps), "
                                f"e.g. --resident-gib 60; leave it out to keep what fits")
        if not self.weight_decay >= 0 or (self.warmup is not None and self.warmup < 0) \
                or not 0 <= self.seed < 2**32:
            raise LLMPruneError(f"--weight-decay {self.weight_decay} and --warmup {self.warmup} must be >= 0 and --seed "
                                f"{self.seed} in [0, 2**32): e.g. --weight-decay 0 --seed 0")

    def perp_options(self) -> dict:
        """The keyword arguments of perp.recover / perp.check_options."""
        d = dataclasses.asdict(self)
        for k in ("data", "seqlen", "nsamples"):
            d.pop(k)
        if d["lr"] is None:
            d.pop("lr")
        return d


def check_eval(datasets, seqlen: int, windows: int | None, flag: str = "--eval") -> int | None:
    """A perplexity evaluation's options (`flag`: "--eval" for compress / pack / recover / export, "--ppl" for eval),
    refused before any work. Returns the windows to evaluate as the evaluators take them (0, all: None)."""
    pre = "--" if flag == "--ppl" else f"{flag}-"
    for d in datasets:
        if d not in EVAL_DATASETS:
            raise LLMPruneError(f"unknown {flag} dataset {d!r}: choose from {', '.join(EVAL_DATASETS)}")
    if windows is not None and windows < 0:
        raise LLMPruneError(f"{pre}windows must be >= 1, or 0 for all windows")
    if seqlen < 2:
        raise LLMPruneError(f"{pre}seqlen must be >= 2")
    return windows or None


def check_hessian_gib(gib) -> None:
    """`--hessian-gib`: GiB >= 0 (0: every Hessian a run of its own), or None for the default."""
    if gib is not None and not (isinstance(gib, (int, float)) and gib >= 0):
        raise LLMPruneError(f"--hessian-gib {gib!r}: GiB of Hessians held at once, a number >= 0 (e.g. 8); leave it "
                            f"out for a quarter of the solving devices' memory")


@dataclass(frozen=True)
class CompressConfig:
    """The recipe of `llmprune compress`: load -> calibrate -> prune or slice -> recover -> export
    -> evaluate the saved output -> manifest (pipeline.compress)."""
    model: str = "llama"
    solver: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float | None = None  # None: 0.5, or what an N:M pattern implies
    scope: str = "layer"  # magnitude: "layer" or "global" (Global MP)
    ignore: str | None = None  # regex of linear names left dense
    # Mixture-of-Experts (moe.py): experts with fewer routed calibration tokens than expert_min_tokens
    # take expert_fallback (pooled | magnitude); shared experts' gates stay dense unless prune_gates
    expert_min_tokens: int = 64
    expert_fallback: str = "pooled"
    prune_gates: bool = False
    solver_opts: dict = field(default_factory=dict)  # e.g. damp, blocksize, init, max_cycles
    owl: OwlConfig | None = None
    # calibration
    calib: str = "c4"
    nsamples: int | None = None  # None: from the protocol
    seqlen: int | None = None
    protocol: str = "auto"  # auto: paper on CUDA, cpu on CPU (see PROTOCOLS)
    seed: int = 0
    calib_batch: int = 8
    # run
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "auto"  # compute dtype; statistics (norms, Hessians, covariances) are always fp32 or fp64
    onload: str = "auto"  # blocks: weights read block by block from disk; whole: the model in memory; auto
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    # a killed run's next run goes on from its last checkpoint (resume.py): one every this many seconds of each
    # block-by-block pass (the pruning, GPTQ's after it), and after its last block; None: none
    checkpoint_s: float | None = 600.0
    # GiB of Hessians (SparseGPT, ALPS, GPTQ) collected at once; a Mixture-of-Experts block's experts over it are
    # collected and solved a run at a time (the same weights); None: a quarter of the solving devices' memory
    hessian_gib: float | None = None
    # evaluation (of the saved output)
    eval: tuple[str, ...] = ()
    eval_seqlen: int = 2048
    eval_windows: int | None = None  # None: from the protocol; 0: all windows
    eval_dense: bool = True  # also measure the dense model first (its figure is kept as dense_ppl)
    tasks: tuple[str, ...] = ()  # zero-shot tasks through lm-eval (eval/zeroshot.py), e.g. ("boolq", "piqa")
    tasks_limit: int | None = None  # the first N examples of each task (None: all)
    # transforms, formats, recovery
    slicegpt: SliceConfig | None = None
    format: str = "dense"
    quant: str | None = None  # rtn | gptq, for the int4 formats
    group_size: int | str = "auto"  # int4 scale group; auto: the largest of 128/64/32/16 that divides
    grid: str = "auto"  # int4 grid: sym | asym | auto (the format's default: w4g128 asym, w4s24/w4s50 sym)
    save_dtype: str = "auto"  # stored floats: auto = packed formats float16, dense outputs the source's dtype
    gptq: GPTQConfig | None = None  # None: the defaults, when --quant gptq
    recover: RecoverConfig | None = None
    # export for another engine after the output is written (llmprune/export): "compressed-tensors" | "gguf"
    export: str | None = None
    export_types: str = "f16"  # gguf: comma list of types
    export_quant: str | None = None  # compressed-tensors of an unquantized output: rtn | gptq
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LLMPruneError(f"unknown config keys {unknown}: valid keys are {', '.join(sorted(known))}")
        return cls(**d)

    def __post_init__(self):
        s = object.__setattr__
        if isinstance(self.eval, str):
            s(self, "eval", tuple(x for x in self.eval.split(",") if x and x != "none"))
        s(self, "eval", tuple(self.eval))
        if isinstance(self.tasks, str):
            s(self, "tasks", tuple(x.strip() for x in self.tasks.split(",") if x.strip()))
        s(self, "tasks", tuple(self.tasks))  # (checked with tasks_limit by pipeline.plan)
        s(self, "owl", _from(OwlConfig, self.owl, "--owl"))
        s(self, "slicegpt", _from(SliceConfig, self.slicegpt, "SliceGPT"))
        s(self, "gptq", _from(GPTQConfig, self.gptq, "GPTQ"))
        s(self, "recover", _from(RecoverConfig, self.recover, "--recover"))
        if self.protocol not in ("auto", *PROTOCOLS):
            raise LLMPruneError(f"--protocol {self.protocol!r}: use auto, {', '.join(PROTOCOLS)}")
        if (self.nsamples is not None and self.nsamples < 1) or (self.seqlen is not None and self.seqlen < 2):
            raise LLMPruneError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.calib_batch < 1:
            raise LLMPruneError("--calib-batch must be >= 1")
        if self.checkpoint_s is not None and not (isinstance(self.checkpoint_s, (int, float)) and self.checkpoint_s >= 0):
            raise LLMPruneError(f"--checkpoint-every {self.checkpoint_s!r}: give seconds >= 0 (0: after every block), "
                                f"or off")
        if self.scope not in ("layer", "global"):
            raise LLMPruneError(f"--scope {self.scope!r}: use layer or global")
        if self.scope == "global" and self.solver != "magnitude":
            raise LLMPruneError("--scope global is Global Magnitude Pruning: use it with --solver magnitude")
        if self.dtype not in DTYPES:
            raise LLMPruneError(f"--dtype {self.dtype!r}: use {', '.join(DTYPES)}")
        if self.save_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise LLMPruneError(f"--save-dtype {self.save_dtype!r}: use auto, float16, bfloat16 or float32")
        if self.onload not in ("auto", "blocks", "whole"):
            raise LLMPruneError(f"--onload {self.onload!r}: use auto, blocks or whole")
        if self.grid not in ("auto", "sym", "asym"):
            raise LLMPruneError(f"--grid {self.grid!r}: use sym, asym or auto")
        check_eval(self.eval, self.eval_seqlen, self.eval_windows)
        check_hessian_gib(self.hessian_gib)
        if self.expert_fallback not in EXPERT_FALLBACKS:
            raise LLMPruneError(f"--expert-fallback {self.expert_fallback!r}: use {' or '.join(EXPERT_FALLBACKS)}")
        if not (isinstance(self.expert_min_tokens, int) and self.expert_min_tokens >= 0):
            raise LLMPruneError(f"--expert-min-tokens {self.expert_min_tokens!r} must be a whole number >= 0")
        if self.ignore:
            try:
                re.compile(self.ignore)
            except re.error as e:
                raise LLMPruneError(f"--ignore {self.ignore!r} is not a valid regex ({e})") from None
        if self.group_size != "auto" and not (isinstance(self.group_size, int) and self.group_size > 0):
            raise LLMPruneError(f"--group-size {self.group_size!r}: a positive integer (e.g. 128) or auto")
        if self.format == "dense" and (self.quant is not None or self.grid != "auto"):
            raise LLMPruneError("--quant and --grid quantize the packed int4 formats: add --format w4g128, w4s24 "
                                "or w4s50")
        if self.export not in (None, "compressed-tensors", "gguf"):
            raise LLMPruneError(f"--export {self.export!r}: choose compressed-tensors or gguf")
        if self.export_quant not in (None, "rtn", "gptq"):
            raise LLMPruneError(f"--export-quant {self.export_quant!r}: choose rtn or gptq")
        if self.gptq is not None and self.quant != "gptq" and self.gptq != GPTQConfig():
            raise LLMPruneError(GPTQ_ONLY)

    @property
    def symmetric(self) -> bool | None:
        """--grid as the packer takes it: None = the format's default."""
        return None if self.grid == "auto" else self.grid == "sym"

    def resolved(self, device: str) -> CompressConfig:
        """The config with protocol defaults filled in for the device the run uses."""
        name = protocol_of(self.protocol, device)
        p = PROTOCOLS[name]
        fill = {k: p[k] for k in ("nsamples", "seqlen", "eval_windows") if getattr(self, k) is None}
        if self.dtype == "auto":
            fill["dtype"] = "bfloat16" if device.startswith("cuda") else "float32"
        return dataclasses.replace(self, protocol=name, **fill)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
