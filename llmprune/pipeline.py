"""The stages every command composes (api.py): plan -> load -> calibrate -> transform -> recover ->
export -> evaluate the saved output -> manifest.

    plan(cfg)                   every check that needs no model: options, formats, the output path
    load_model / check_model    the model, then the checks that need it (shapes, context, finite weights)
    calibrate                   token windows, seeded
    transform                   prune (solver, OWL, global magnitude) or slice (SliceGPT), in place
    recover                     PERP retraining, optional
    export                      write a dense HF folder or a packed format (RTN or GPTQ, + scale tuning)
    evaluate_saved              perplexity of the folder as written, block by block from disk or loaded whole
    zeroshot_saved              its zero-shot accuracy (lm-eval), the same way
The figures an output publishes come from `evaluate_saved` and `zeroshot_saved`, so they describe the
files, not the model before it was packed; a figure of an intermediate model keeps its own name (dense_ppl).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import manifest as mf
from . import outdir, patterns, solvers
from .config import CompressConfig, GPTQConfig
from .errors import LLMPruneError
from .runinfo import pick_devices, versions

if TYPE_CHECKING:
    import torch


class Timer:
    """Stage timings for the manifest: `with t("load_s"):`."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.s: dict[str, float] = {}

    def __call__(self, key: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.s[key] = round(timer.s.get(key, 0.0) + time.perf_counter() - self.t, 2)

        return _Span()

    def total(self) -> dict:
        return {**self.s, "total_s": round(time.perf_counter() - self.t0, 2)}


# --- plan: everything that can be checked before a model is loaded ------------------------------

@dataclass(frozen=True)
class Plan:
    cfg: CompressConfig  # protocol defaults filled in
    device: str
    pattern: patterns.Pattern
    sparsity: float
    solver: solvers.Solver | None  # None: SliceGPT
    quant: str | None  # what the packer runs: None (dense, sparse24), rtn, gptq
    gptq: GPTQConfig | None  # with quant == "gptq"
    out: Path
    onload: bool  # the model stays on disk, its blocks read one at a time (onload.py)
    whole_because: str | None = None  # why the model is loaded whole, when it is
    devices: tuple[str, ...] = ()  # every device the solves use (parallel.py), `device` first

    @property
    def needs_calibration(self) -> bool:
        c = self.cfg
        return bool(c.slicegpt or c.owl or self.quant == "gptq" or self.solver.needs_for(c.solver_opts))


def default_out(cfg: CompressConfig, sparsity: float) -> str:
    name = Path(cfg.model).stem if ("/" in cfg.model or cfg.model.endswith(".gguf")) else cfg.model
    method = "slicegpt" if cfg.slicegpt else cfg.solver
    tag = f"{cfg.slicegpt.slicing:.2f}" if cfg.slicegpt else f"{cfg.pattern.replace(':', 'of')}-{sparsity:.2f}"
    fmt = "" if cfg.format == "dense" else f"-{cfg.format}" + (f"-{cfg.quant}" if cfg.quant else "")
    return str(Path("out") / re.sub(r"[^\w.-]+", "_", f"{name}-{method}-{tag}{fmt}"))


def check_solver_options(solver: solvers.Solver, opts: dict) -> None:
    """Every option must be a parameter of the solver (or, for DSnoT, of its initial solver):
    an option a solver would silently ignore is refused, naming the valid ones."""
    def params(fn) -> set[str]:
        ps = inspect.signature(fn).parameters
        return {n for n, p in list(ps.items())[4:] if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    fns = [solver.fn]  # DSnoT's options include its initial solver's
    if "init" in params(solver.fn):
        fns.append(solvers.get(opts.get("init") or inspect.signature(solver.fn).parameters["init"].default).fn)
    valid = set().union(*map(params, fns))
    bad = sorted(set(opts) - valid)
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        raise LLMPruneError(f"{flags} {'is' if len(bad) == 1 else 'are'} not an option of --solver {solver.name} "
                            f"(its options: {', '.join(sorted(valid)) or 'none'}): drop {flags}")
    defaults = {n: p.default for fn in fns for n, p in inspect.signature(fn).parameters.items()}
    for k, v in opts.items():  # a number where the solver's default is one (sweep's name+key=value specs)
        d = defaults.get(k)
        if isinstance(d, (int, float)) and not isinstance(d, bool) and not isinstance(v, (int, float)):
            raise LLMPruneError(f"solver option {k}={v!r} of {solver.name} must be a number (its default: {d})")


def plan(cfg: CompressConfig) -> Plan:
    """Resolve the protocol and check every option that needs no model; raises LLMPruneError."""
    from . import formats, placement

    placement.check_one_process("compress", bool(cfg.recover))  # (under torchrun; the API's callers too)
    devices = pick_devices(cfg.device)
    device = devices[0]
    cfg = cfg.resolved(device)
    if cfg.tasks or cfg.tasks_limit is not None:
        from .eval import zeroshot

        cfg = dataclasses.replace(cfg, tasks=zeroshot.check(cfg.tasks, cfg.tasks_limit, "--tasks-limit"))
    pattern = patterns.parse(cfg.pattern)
    default = cfg.sparsity if cfg.sparsity is not None or pattern.kind == "nm" else 0.5
    sparsity = patterns.resolve_sparsity(pattern, default)
    solver = None
    if not cfg.slicegpt:
        solver = solvers.get(cfg.solver)
        check_solver_options(solver, cfg.solver_opts)
    else:  # options of pruning, which SliceGPT would ignore
        given = [f for f, on in (("--sparsity", cfg.sparsity is not None), ("--pattern", cfg.pattern != "unstructured"),
                                 ("--owl", bool(cfg.owl)), ("--scope global", cfg.scope == "global"),
                                 (f"--solver {cfg.solver}", cfg.solver not in ("slicegpt", "wanda")),
                                 ("--ignore", cfg.ignore is not None), ("--prune-gates", cfg.prune_gates),
                                 *((f"--{k.replace('_', '-')}", True) for k in cfg.solver_opts)) if on]
        if given:
            raise LLMPruneError(f"SliceGPT deletes rows and columns (its size is --slicing) instead of pruning "
                                f"weights: drop {', '.join(given)}")
    if cfg.owl and pattern.kind == "nm":
        raise LLMPruneError(f"--owl varies the sparsity per layer, but pattern {pattern} fixes it: drop --owl or "
                            f"use unstructured")
    if cfg.recover:
        from .recover import perp

        perp.check_options(**cfg.recover.perp_options())
    quant = None
    if cfg.format != "dense":
        quant = formats.get(cfg.format).check_options(cfg.quant, cfg.symmetric)
    gptq = (cfg.gptq or GPTQConfig()) if quant == "gptq" else None
    out = Path(cfg.out or default_out(cfg, sparsity))
    outdir.check_out(out, cfg.overwrite, local_sources(cfg.model))
    onload, why = _onload(cfg, devices)
    return Plan(cfg, device, pattern, sparsity, solver, quant, gptq, out, onload, why, devices)


def _onload(cfg: CompressConfig, devices: tuple[str, ...]) -> tuple[bool, str | None]:
    """Blocks from disk one at a time unless a step needs the whole model in memory. PERP (--recover)
    trains the whole model, each block read from disk straight to where it trains (onload.recover_pass);
    on the CPU alone, auto loads it whole instead: transformers' load leaves it backed by the files. SliceGPT
    followed by packing or PERP slices into a scratch folder the next pass reads (onload_slicegpt.transform)."""
    from . import placement

    if cfg.onload == "whole":
        return False, "--onload whole"
    if cfg.recover:
        placement.check_blocks_onload(cfg.onload)
    if cfg.onload == "auto" and cfg.recover and not placement.reads_to_devices(devices):
        return False, ("PERP (--recover) on the CPU: the whole load keeps the model backed by its files"
                       if all(d.startswith("cpu") for d in devices) else
                       "PERP (--recover) with one replica per process (WORLD_SIZE > 1): each process loads it whole")
    return True, None


# --- load -----------------------------------------------------------------------------------------

def local_sources(spec: str) -> list[str]:
    """The model's own folder or file when --model names one on disk (an output must not replace it)."""
    return [spec] if Path(spec).exists() else []


def resolve_model(spec: str):
    """models.ModelInfo (with the local folder) for anything --model accepts, nothing loaded."""
    from . import models

    return models.resolve(spec)


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, models.ModelInfo) for anything --model accepts."""
    from . import models

    return models.load(spec, dtype=dtype, device=device)


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_context(model, seqlen: int, flag: str) -> None:
    """A window longer than the model's context is refused before it computes for hours."""
    ctx = context_length(model)
    if ctx and seqlen > ctx:
        raise LLMPruneError(f"{flag} {seqlen} is longer than the model's context ({ctx} tokens, "
                            f"max_position_embeddings): use {flag} {ctx} or less")


def check_calibration(model, spec: str, seqlen: int, flag: str = "--seqlen") -> None:
    """check_context of the calibration windows: a token-id file's own width (used as is, whatever `flag` says),
    else `seqlen`."""
    from . import calibration

    if calibration.check_width(spec, context_length(model)) is None:  # (not a token-id file)
        check_context(model, seqlen, flag)


def check_finite(model) -> None:
    """A NaN or inf in the weights is named (a damaged file), not found later as a singular Hessian."""
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise LLMPruneError(f"{name} holds NaN/inf values: the model file is damaged; re-download or "
                                f"re-create it")


def check_family(p: Plan, model) -> None:
    """What the model family allows (arch.py): its blocks must be found (else a one-line error naming
    what to add), SliceGPT needs a rotation-invariant residual stream, and the packed formats refuse experts
    they cannot run (packed.check_packable)."""
    from . import arch

    arch.arch_of(model)  # blocks found, or the one-line error naming what to add
    if p.cfg.slicegpt:
        from .transforms.fuse import layout_of

        layout_of(model)
    if p.cfg.format != "dense":  # before any work, not when writing
        from .packed import check_packable

        check_packable(model, p.cfg.format, p.cfg.group_size)


def check_model(p: Plan, model) -> list[str]:
    """The checks that need the model (its config and shapes; the weights too when in memory: on
    disk, each block is checked as it is read); returns the names of the linears to prune."""
    from . import prune

    c = p.cfg
    if not p.onload:
        check_finite(model)
    check_family(p, model)
    names = prune.target_linears(model, c.ignore, c.prune_gates)
    if c.slicegpt:  # the kept width must exist (and make a config transformers accepts) before any work
        from .transforms.slicegpt import new_dim_for

        new_dim_for(model.config.hidden_size, c.slicegpt.slicing, c.slicegpt.round_to,
                    getattr(model.config, "num_attention_heads", 1))
    else:
        prune.check_shapes(model, names, p.pattern)
    if p.needs_calibration or c.export_quant == "gptq":  # (the export's GPTQ calibrates as the pruning would)
        check_calibration(model, c.calib, c.seqlen)
    if c.recover:
        check_calibration(model, c.recover.data or c.calib, c.recover.seqlen, "--recover-seqlen")
    if c.eval:
        check_context(model, c.eval_seqlen, "--eval-seqlen")
    return names


def source_dtype(folder) -> torch.dtype:
    """The dtype a checkpoint stores its weights in: what its safetensors files hold (the floating
    dtype with the most bytes; FP8 aside: a block-scaled FP8 checkpoint's unquantized tensors say what
    its dequantized weights are written in, fp8.py), not the loaded model's config, which says the
    compute dtype. float32 when the folder is unknown (a model given in memory)."""
    import torch

    from . import lazy

    if folder is None:
        return torch.float32
    by: dict = {}
    for f in lazy.model_files(Path(folder)):  # (the files transformers reads)
        head, _ = lazy.safetensors_header(f)
        for k, e in head.items():
            dt = lazy.ST_DTYPES.get(e.get("dtype")) if k != "__metadata__" else None
            if dt is not None and dt.is_floating_point and dt.itemsize > 1:
                a, b = e["data_offsets"]
                by[dt] = by.get(dt, 0) + b - a
    return max(by, key=by.get) if by else torch.float32


def save_dtype(cfg: CompressConfig, src_dtype):
    """--save-dtype: auto stores dense outputs in the source checkpoint's dtype, packed formats'
    floats in float16 (the baseline their sizes are measured against)."""
    import torch

    if cfg.save_dtype != "auto":
        return getattr(torch, cfg.save_dtype)
    return src_dtype if cfg.format == "dense" else torch.float16


def save_dtype_name(cfg: CompressConfig, src_dtype) -> str:
    return str(save_dtype(cfg, src_dtype)).replace("torch.", "")


# --- calibrate ------------------------------------------------------------------------------------

def calibrate(spec: str, tok, nsamples: int, seqlen: int, seed: int):
    """(input_ids (nsamples, seqlen), source facts for the manifest)."""
    from . import calibration

    return calibration.load(spec, tok, nsamples, seqlen, seed)


# --- transform ------------------------------------------------------------------------------------

def transform(p: Plan, model, names: list[str], ids, timer: Timer) -> dict:
    """Prune (or slice) the model in place; returns its manifest sections."""
    c = p.cfg
    if c.slicegpt:
        from .transforms import slicegpt

        with timer("compress_s"):
            info = slicegpt.slice_model(model, ids, batch_size=c.calib_batch, progress=c.progress, device=p.device,
                                        **dataclasses.asdict(c.slicegpt))
        return {"solver": "slicegpt", "slicegpt": info, "steps": ["slice"]}
    from . import arch, prune

    sec: dict = {}
    with timer("compress_s"):
        if c.scope == "global":
            from .solvers.magnitude import global_sparsities

            layer_s = global_sparsities({n: arch.target(model, n).weight.data for n in names}, p.sparsity)
        elif c.owl:
            from . import owl

            layer_s = owl.layer_sparsities(model, names, ids, p.sparsity, batch_size=c.calib_batch,
                                           device=p.device, progress=c.progress, **dataclasses.asdict(c.owl))
            per_layer = list(layer_s.values())
            sec["owl"] = {**dataclasses.asdict(c.owl), "per_layer": sorted(set(per_layer), key=per_layer.index)}
        else:
            layer_s = {n: p.sparsity for n in names}
        res = prune.prune(model, p.solver, p.pattern, layer_s, ids, c.solver_opts, c.calib_batch, p.device,
                          c.progress, expert_min_tokens=c.expert_min_tokens, expert_fallback=c.expert_fallback,
                          gates=c.prune_gates, devices=p.devices)
    for k, v in res["timings"].items():
        timer.s[k] = v
    return prune.manifest_section(p, res, sec, prune.measured_sparsity(model, names), len(names))


# --- recover --------------------------------------------------------------------------------------

def recover(model, tok, rcfg, calib: str, seed: int, devices: tuple[str, ...], progress: bool, where=None,
            checkpoint=None) -> dict:
    """PERP in place on training windows drawn apart from the pruning calibration (seed + 1), on
    `devices` (placement.py; `where`: the plan the model was read onto the devices by); every tensor
    ends where it came from. `checkpoint`: the training's checkpoints (resume.Training), or None."""
    from . import placement, prune
    from .recover import perp

    opts = rcfg.perp_options()
    # each window seen once (by one of the replicas, under torchrun)
    n = rcfg.nsamples or rcfg.steps * rcfg.batch_size * rcfg.grad_accum * placement.replicas()
    ids, data_info = calibrate(rcfg.data or calib, tok, n, rcfg.seqlen, seed)
    # the pruned linears adapted; with none (a SliceGPT output has no zeros) every linear of the blocks: MaskLoRA
    # with all-ones masks is LoRA, as SliceGPT recovers its sliced models (arXiv 2401.15024, "recovery fine-tuning")
    masks = None if perp.pruned_linears(model) else dict.fromkeys(prune.target_linears(model))
    info = perp.recover(model, ids, keep_masks=masks, progress=progress, devices=tuple(devices), where=where,
                        checkpoint=checkpoint, **opts)
    info["data"] = data_info
    return info


# --- export ---------------------------------------------------------------------------------------

def export(model, tok, folder: Path, fmt: str = "dense", quant: str | None = None, group_size="auto",
           symmetric: bool | None = None, save_dtype: str = "float16", gptq: GPTQConfig | None = None,
           ids=None, calib_info: dict | None = None, device: str = "cpu", batch_size: int = 8,
           progress: bool = False, timer: Timer | None = None, devices: tuple[str, ...] | None = None) -> dict | None:
    """Write the model into `folder`: a dense HF folder, or packed (when quant == "gptq", each block packed as
    GPTQ's block-by-block pass finishes it, on all `devices` at once when several). Returns the packed format
    section (None for dense)."""
    import torch

    from . import checkpoint, packed

    timer = timer or Timer()
    if fmt == "dense":
        with timer("save_s"):
            checkpoint.save_dense(model, tok, folder)
        return None
    dtype = getattr(torch, save_dtype)
    quantized, qinfo = None, {}
    packer = packed.ModelPacker(model, folder, fmt, quant=quant, group_size=group_size, symmetric=symmetric,
                                dtype=dtype)
    if quant == "gptq":
        from .quant.sequential import gptq_sequential

        # each block packed as GPTQ finishes it (its codes then let go), unless the tuning needs them all after
        with timer("gptq_s"):
            quantized = gptq_sequential(model, ids, fmt, group_size, symmetric, batch_size=batch_size, device=device,
                                        progress=progress, dtype=dtype, info=qinfo, devices=devices,
                                        on_block=None if gptq.tune_steps else packer.block, **gptq.as_dict())
        if calib_info is not None:
            qinfo["calibration"] = calib_info
        packer.w.quant_opts = {**gptq.as_dict(), **qinfo}
    with timer("save_s"):
        section = packer.finish(quantized, progress)
        outdir.save_side_files(folder, tokenizer=tok)
    return section


def export_steps(section: dict | None) -> list[str]:
    if not section:
        return []
    tune = (section.get("quant_options") or {}).get("tune") or {}
    return [*(["quantize"] if section.get("quant") else []), *(["tune-scales"] if tune.get("kept") == "tuned" else []),
            "pack"]


# --- evaluate -------------------------------------------------------------------------------------

def eval_sources(datasets, tok, cache: dict) -> dict:
    """Each dataset's evaluation text as its entries name it (`source`), its tokens kept in `cache` for the
    evaluations that follow (eval.perplexity.cached_tokens)."""
    from .eval.perplexity import cached_tokens

    return {d: cached_tokens(d, tok, cache)[1] for d in datasets}


def evaluate_model(model, tok, datasets, seqlen: int, windows: int | None, progress: bool, cache: dict) -> dict:
    """Perplexity of a model in memory, per dataset (test tokens cached across calls in `cache`)."""
    from .eval.perplexity import cached_tokens, perplexity

    out = {}
    for d in datasets:
        toks, where = cached_tokens(d, tok, cache)
        r = perplexity(model, tok, d, seqlen, windows, progress=progress, tokens=toks)
        r["source"] = where
        out[d] = r
    return out


def evaluate_saved(folder: Path, datasets, seqlen: int, windows: int | None, device: str, dtype: str,
                   progress: bool, cache: dict) -> dict:
    """Perplexity of an output folder as a user loads it, each entry marked so: block by block from
    disk (onload.evaluate) where the output allows it, else through llmprune.load."""
    from . import checkpoint, onload

    lz, _ = onload.open_output(folder, dtype, mf.read(folder).to_dict())
    if lz is not None:
        from transformers import AutoTokenizer

        res = onload.evaluate(lz, AutoTokenizer.from_pretrained(folder), datasets, seqlen, windows, device, progress,
                              cache)
    else:
        model, tok, _ = checkpoint.load(folder, dtype=dtype, device=device)
        res = evaluate_model(model, tok, datasets, seqlen, windows, progress, cache)
    how = {"measured_on": mf.SAVED, "dtype": dtype, "device": device, "versions": versions(),
           "files": mf.files_stamp(folder)}
    return {d: {**r, **how} for d, r in res.items()}


def zeroshot_saved(folder: Path, manifest: dict, tasks, limit: int | None, device: str, dtype: str, progress: bool,
                   batch_size: int = 8, tasks_dir: str | None = None) -> dict:
    """Zero-shot accuracy (eval/zeroshot.py) of a folder as saved: block by block from disk where it
    allows (eval/blockwise.py), else the whole model: dense folders placed by accelerate
    (device_map="auto": the GPUs, then CPU memory, then disk), packed or SliceGPT ones through llmprune.load."""
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from . import checkpoint, onload
    from .eval import zeroshot
    from .models import from_pretrained

    lz, _ = onload.open_output(folder, dtype, manifest)
    with tempfile.TemporaryDirectory(prefix="llmprune-offload-") as offload:
        if lz is not None:
            model = lz
        elif (manifest.get("format") or {}).get("name", "dense") != "dense" or manifest.get("slicegpt"):
            model = checkpoint.load(folder, dtype=dtype, device=device)[0]
        else:
            model = from_pretrained(folder, dtype=getattr(torch, dtype), device_map="auto",
                                    offload_folder=offload).eval()
        zs = zeroshot.zeroshot(model, AutoTokenizer.from_pretrained(folder), list(tasks), limit=limit,
                               batch_size=batch_size, tasks_dir=tasks_dir, device=device if lz is not None else None,
                               progress=progress)
    zs["limit"], zs["blockwise"], zs["dtype"], zs["files"] = limit, lz is not None, dtype, mf.files_stamp(folder)
    return zs


def merge_zeroshot(old: dict | None, new: dict, run: dict | None = None) -> dict:
    """A zero-shot run's results (`new`, zeroshot_saved) merged into an output's earlier ones: the earlier tasks stay
    only where measured the same way (the same --limit and lm-eval, on the saved folder's same files
    (manifest.files_stamp), measured_alike; else they are dropped, not mixed), and the mean is over every task listed. `run`: the dtype, device and versions of the
    run that made the folder, for a section that does not say them (it was measured by that run)."""
    tasks = mf.zeroshot_tasks
    was = {**(run or {}), **(old or {})}
    same = bool(old) and old.get("limit") == new.get("limit") and "measured_on" not in old \
        and old.get("files", new.get("files")) == new.get("files") \
        and measured_alike(was, new, ("torch", "transformers", "lm_eval"))
    kept = {**(tasks(old) if same else {}), **tasks(new)}
    rest = {k: v for k, v in new.items() if k not in kept and k != "mean"}
    return {**kept, **rest, "mean": sum(v["acc"] for v in kept.values()) / len(kept)}


def measured_alike(a: dict, b: dict, libraries: tuple[str, ...] = ("torch", "transformers")) -> bool:
    """Whether two perplexity results were measured the same way, so that one may stand beside the other (dense_ppl,
    before_recover_ppl): the same windows (seqlen, windows) of the same text (source: the Hub's WikiText-2 and the
    offline copy differ, 20.43 against 20.82 for SmolLM2), in the same dtype, with the same torch and transformers
    (`libraries`; they moved SparseGPT 2:4 80.02 -> 76.97), on the same kind of device and processor (44.74 against
    44.90). Each
    field is compared where both record it: an entry without one was measured by the run its manifest records."""
    def same(x, y) -> bool:
        return x is None or y is None or x == y

    kind = [str(r.get("device") or "").split(",")[0].split(":")[0] or None for r in (a, b)]
    va, vb = a.get("versions") or {}, b.get("versions") or {}
    return (a.get("seqlen"), a.get("windows")) == (b.get("seqlen"), b.get("windows")) \
        and same(a.get("dtype"), b.get("dtype")) and same(a.get("source"), b.get("source")) and same(*kind) \
        and all(same(va.get(k), vb.get(k)) for k in (*libraries, "gpu" if "cuda" in kind else "cpu"))


def merge_dense(results: dict, dense: dict) -> dict:
    """Attach the dense model's figure (dense_ppl) where it was measured alike (measured_alike). `dense`: dataset ->
    the dense model's result (its "ppl")."""
    for d, r in results.items():
        ref = dense.get(d)
        if ref and measured_alike(ref, r):
            r["dense_ppl"] = ref["ppl"]
    return results


def dense_refs(old: mf.Manifest) -> dict:
    """The dense figures an output's manifest recorded, in merge_dense's form: what an entry does not say of how it
    was measured (dtype, device, versions) is the manifest's, whose run measured both."""
    return {d: {**old.conditions(), **r, "ppl": r["dense_ppl"]} for d, r in old.eval.items()
            if isinstance(r, dict) and "dense_ppl" in r}
