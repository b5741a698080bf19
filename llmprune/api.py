"""The orchestration, short: compress(), evaluate(), load().

    import llmprune
    res = llmprune.compress(model="llama", solver="wanda", sparsity=0.5, eval=("wikitext2",))
"""
from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path

from . import __version__, arch, checkpoint, patterns, solvers
from .config import CompressConfig
from .errors import LLMPruneError


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


def peak_gpu_mib(device: str) -> float | None:
    """Peak memory torch allocated on a CUDA device in this process (None elsewhere)."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)


def reset_peak_rss() -> bool:
    """Restart the peak-memory count at the current resident size (Linux >= 4.0: writing 5 to
    /proc/self/clear_refs), so one process can measure the peak of each of several runs. Returns
    False where that is not possible; peak_rss_mib() then stays the process-wide peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMPruneError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def default_out(cfg: CompressConfig, sparsity: float) -> str:
    name = Path(cfg.model).stem if ("/" in cfg.model or cfg.model.endswith(".gguf")) else cfg.model
    method = "slicegpt" if cfg.slicegpt else cfg.solver
    tag = f"{cfg.slicegpt.get('slicing', 0.25):.2f}" if cfg.slicegpt else f"{cfg.pattern.replace(':', 'of')}-{sparsity:.2f}"
    return str(Path("out") / re.sub(r"[^\w.-]+", "_", f"{name}-{method}-{tag}"))


def versions() -> dict:
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def _eval_all(model, tok, names, seqlen, windows, progress, tokens_cache) -> dict:
    from .eval.perplexity import eval_tokens, perplexity

    out = {}
    for d in names:
        if d not in tokens_cache:
            tokens_cache[d] = eval_tokens(d, tok)
        toks, where = tokens_cache[d]
        r = perplexity(model, tok, d, seqlen, windows, progress=progress, tokens=toks)
        r["source"] = where
        out[d] = r
    return out


def compress(config: CompressConfig | None = None, command: str | None = None, **kwargs) -> dict:
    """Prune (or slice) a model, save it, evaluate it. Returns the manifest with `out`.
    `command` (the CLI line) is recorded so the model card can say how to reproduce it."""
    cfg = config if config is not None else CompressConfig.from_dict(kwargs)
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    cfg = cfg.resolved(device)
    eval_windows = cfg.eval_windows or None  # 0: all
    # --- validate everything that can be checked before a model is loaded ---
    pattern = patterns.parse(cfg.pattern)
    sparsity = patterns.resolve_sparsity(pattern, cfg.sparsity if cfg.sparsity is not None or pattern.kind == "nm" else 0.5)
    solver = None if cfg.slicegpt else solvers.get(cfg.solver)
    from .eval.perplexity import DATASETS

    for d in cfg.eval:
        if d not in DATASETS:
            raise LLMPruneError(f"unknown --eval dataset {d!r}: choose from {', '.join(DATASETS)}")
    if cfg.ignore:
        try:
            re.compile(cfg.ignore)
        except re.error as e:
            raise LLMPruneError(f"--ignore {cfg.ignore!r} is not a valid regex ({e})") from None
    if cfg.owl and pattern.kind == "nm":
        raise LLMPruneError(f"--owl varies the sparsity per layer, but pattern {pattern} fixes it: drop --owl or use unstructured")
    if cfg.recover:
        from .recover import perp

        perp.check_options(**{k: v for k, v in cfg.recover.items() if k not in ("data", "seqlen")})
    if cfg.format == "dense" and (cfg.quant is not None or cfg.grid != "auto"):
        raise LLMPruneError("--quant and --grid quantize the packed int4 formats: add --format w4g128, w4s24 or w4s50")
    gopts = gptq_options(cfg.gptq, cfg.quant)  # once, before any work; also refuses them without --quant gptq
    if cfg.format != "dense":
        from .packed import check_options

        check_options(cfg.format, cfg.quant, _symmetric(cfg.grid))
    out = cfg.out or default_out(cfg, sparsity)
    checkpoint.check_out(out, cfg.overwrite)

    # --- load ---
    from . import models, prune

    t0 = time.perf_counter()
    model, tok, info = models.load(cfg.model, dtype=cfg.dtype)
    timings = {"load_s": round(time.perf_counter() - t0, 2)}
    # everything that can still fail on the input is checked before the long steps
    names = prune.target_linears(model, cfg.ignore)
    if not cfg.slicegpt:
        prune.check_shapes(model, names, pattern)
    else:  # the kept width must exist (and make a config transformers accepts) before any work
        from .transforms.slicegpt import new_dim_for

        new_dim_for(model.config.hidden_size, cfg.slicegpt.get("slicing", 0.25), cfg.slicegpt.get("round_to", 8),
                    getattr(model.config, "num_attention_heads", 1))
    calib_info = None
    calib_ids = None
    if cfg.slicegpt or solver.needs_for(cfg.solver_opts) or cfg.owl or cfg.quant == "gptq":
        from . import calibration

        t0 = time.perf_counter()
        calib_ids, calib_info = calibration.load(cfg.calib, tok, cfg.nsamples, cfg.seqlen, cfg.seed)
        timings["calib_load_s"] = round(time.perf_counter() - t0, 2)
    eval_cache: dict = {}
    results: dict = {}
    if cfg.eval and cfg.eval_dense:
        t0 = time.perf_counter()
        model.to(device)
        dense = _eval_all(model, tok, cfg.eval, cfg.eval_seqlen, eval_windows, cfg.progress, eval_cache)
        model.to("cpu")
        results = {d: {"dense_ppl": r["ppl"]} for d, r in dense.items()}
        timings["dense_eval_s"] = round(time.perf_counter() - t0, 2)

    # --- compress ---
    manifest: dict = {
        "format_version": checkpoint.FORMAT_VERSION,
        "llmprune_version": __version__,
        "model": info.as_dict(),
    }
    t0 = time.perf_counter()
    if cfg.slicegpt:
        from .transforms import slicegpt

        sl = slicegpt.slice_model(model, calib_ids, batch_size=cfg.calib_batch, progress=cfg.progress, **cfg.slicegpt)
        manifest["solver"] = "slicegpt"
        manifest["slicegpt"] = sl
    else:
        if cfg.scope == "global":
            from .solvers.magnitude import global_sparsities

            layer_s = global_sparsities({n: arch.get(model, n).weight.data for n in names}, sparsity)
        elif cfg.owl:
            from . import owl

            layer_s = owl.layer_sparsities(model, names, calib_ids, sparsity, batch_size=cfg.calib_batch,
                                           device=device, progress=cfg.progress, **cfg.owl)
            manifest["owl"] = {**cfg.owl, "per_layer": sorted(set(layer_s.values()), key=list(layer_s.values()).index)}
        else:
            layer_s = {n: sparsity for n in names}
        res = prune.prune(model, solver, pattern, layer_s, calib_ids, cfg.solver_opts, cfg.calib_batch, device,
                          cfg.progress)
        timings.update(res["timings"])
        manifest.update(solver=solver.name, solver_opts=cfg.solver_opts, scope=cfg.scope, pattern=str(pattern),
                        ignore=cfg.ignore)
        manifest["sparsity"] = {"target": sparsity, "measured": prune.measured_sparsity(model, names),
                                "linears": len(names)}
        raised = {n: i["damp_raised"] for n, i in res["layers"].items() if i.get("damp_raised")}
        if raised:
            manifest["damp_raised"] = raised
    timings["compress_s"] = round(time.perf_counter() - t0, 2)
    if calib_info:
        manifest["calibration"] = calib_info

    if cfg.recover:
        from . import calibration
        from .recover import perp

        t0 = time.perf_counter()
        opts = {k: v for k, v in cfg.recover.items() if k not in ("data", "seqlen")}
        n = opts.get("steps", 200) * opts.get("batch_size", 4) * opts.get("grad_accum", 1)
        ids, data_info = calibration.load(cfg.recover.get("data", cfg.calib), tok, n, cfg.recover.get("seqlen", 512),
                                          cfg.seed + 1)  # other windows than the pruning calibration
        model.to(device)
        info = perp.recover(model, ids.to(device), progress=cfg.progress, **opts)
        model.to("cpu")
        info["data"] = data_info
        manifest["recover"] = info
        if "sparsity" in manifest:
            manifest["sparsity"]["measured_after_recover"] = prune.measured_sparsity(model, names)
        timings["recover_s"] = round(time.perf_counter() - t0, 2)

    # --- evaluate the compressed model ---
    if cfg.eval:
        t0 = time.perf_counter()
        model.to(device)
        after = _eval_all(model, tok, cfg.eval, cfg.eval_seqlen, eval_windows, cfg.progress, eval_cache)
        model.to("cpu")
        for d, r in after.items():
            results[d] = {**r, **results.get(d, {})}
        timings["eval_s"] = round(time.perf_counter() - t0, 2)
        manifest["eval"] = results
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    manifest.update(timings=timings, peak_rss_mib=peak_rss_mib(), device=device, dtype=cfg.dtype, protocol=cfg.protocol,
                    versions=versions(), config=cfg.as_dict())
    if peak_gpu_mib(device) is not None:
        manifest["peak_gpu_mib"] = peak_gpu_mib(device)
    if command:
        manifest["command"] = command
    if cfg.format != "dense":
        from . import packed

        quantized, qinfo = None, {}
        if cfg.quant == "gptq":  # block by block, each block seeing the quantized ones before it
            t0 = time.perf_counter()
            quantized = packed.gptq_sequential(model, calib_ids, cfg.format, cfg.group_size, _symmetric(cfg.grid),
                                               batch_size=cfg.calib_batch, device=device, progress=cfg.progress,
                                               dtype=_torch_dtype(cfg.save_dtype), info=qinfo, **gopts)
            timings["gptq_s"] = round(time.perf_counter() - t0, 2)
        manifest["format"] = packed.save_packed(model, out, cfg.format, quant=cfg.quant, quantized=quantized,
                                                tokenizer=tok, manifest=manifest, overwrite=cfg.overwrite,
                                                group_size=cfg.group_size, symmetric=_symmetric(cfg.grid),
                                                progress=cfg.progress,
                                                dtype=_torch_dtype(cfg.save_dtype),
                                                quant_opts={**gopts, **qinfo} if cfg.quant == "gptq" else None)
    else:
        checkpoint.save(model, tok, out, manifest, overwrite=cfg.overwrite)
    manifest["out"] = str(out)
    return manifest


def gptq_options(given: dict | None, quant: str | None = "gptq") -> dict:
    """packed.GPTQ_DEFAULTS updated with the user's {"act_order", "sink_weight", "tune_steps", "tune_lr"}, checked."""
    from .packed import GPTQ_DEFAULTS

    given = {k: v for k, v in (given or {}).items() if v is not None}
    if given and quant != "gptq":
        raise LLMPruneError("--act-order / --sink-weight / --tune-steps / --tune-lr are GPTQ options: "
                            "add --quant gptq or drop them")
    unknown = set(given) - set(GPTQ_DEFAULTS)
    if unknown:
        raise LLMPruneError(f"unknown GPTQ options {sorted(unknown)}: valid are {sorted(GPTQ_DEFAULTS)}")
    opts = {**GPTQ_DEFAULTS, **given}
    if not (isinstance(opts["sink_weight"], (int, float)) and opts["sink_weight"] >= 1):
        raise LLMPruneError(f"--sink-weight {opts['sink_weight']}: must be >= 1 (1 counts the first token like any other)")
    opts["sink_weight"] = float(opts["sink_weight"])
    from .quant.tune import check

    check(opts["tune_steps"], opts["tune_lr"])
    opts["tune_lr"] = float(opts["tune_lr"])
    return opts


def _symmetric(grid: str) -> bool | None:
    """--grid sym | asym | auto -> save_packed's symmetric (None: the format's default)."""
    if grid not in ("auto", "sym", "asym"):
        raise LLMPruneError(f"--grid {grid!r}: use sym, asym or auto")
    return None if grid == "auto" else grid == "sym"


def _torch_dtype(name: str):
    import torch

    if name not in ("float16", "bfloat16", "float32"):
        raise LLMPruneError(f"--save-dtype {name!r}: use float16, bfloat16 or float32")
    return getattr(torch, name)


def load(path_or_spec: str, dtype="float32", device="cpu"):
    """An llmprune output folder -> (model, tokenizer, manifest); anything --model accepts ->
    (model, tokenizer, None)."""
    p = Path(path_or_spec)
    if p.is_dir() and (p / checkpoint.MANIFEST).exists():
        return checkpoint.load(p, dtype=dtype, device=device)
    from . import models

    model, tok, _ = models.load(path_or_spec, dtype=dtype, device=device)
    return model, tok, None


def evaluate(target: str, ppl: tuple[str, ...] = ("wikitext2",), seqlen: int = 2048, windows: int | None = None,
             device: str | None = None, progress: bool = True, save: bool = True, tasks: tuple[str, ...] = (),
             limit: int | None = None, tasks_dir: str | None = None, batch_size: int = 8) -> dict:
    """Perplexity and zero-shot accuracy of an output folder (results merged into its manifest)
    or of any model spec. Returns {"eval": {dataset: ...}, "zeroshot": {task: ...}}."""
    from .eval.perplexity import DATASETS

    for d in ppl:
        if d not in DATASETS:
            raise LLMPruneError(f"unknown perplexity dataset {d!r}: choose from {', '.join(DATASETS)}")
    if tasks:
        from .eval import zeroshot

        tasks = tuple(zeroshot.check_tasks(list(tasks)))
        if limit is not None and limit <= 0:
            raise LLMPruneError(f"--limit {limit} must be >= 1 (or leave it out for every example)")
    model, tok, manifest = load(target, device=pick_device(device))
    out: dict = {}
    if ppl:
        results = _eval_all(model, tok, ppl, seqlen, windows, progress, {})
        if manifest is not None:
            old = manifest.get("eval", {})
            for d, r in results.items():  # keep the dense reference measured at compress time
                if d in old and "dense_ppl" in old[d] and (old[d].get("seqlen"), old[d].get("windows")) == (seqlen, r["windows"]):
                    r["dense_ppl"] = old[d]["dense_ppl"]
        out["eval"] = results
    if tasks:
        from .eval import zeroshot

        zs = zeroshot.zeroshot(model, tok, list(tasks), limit=limit, batch_size=batch_size, tasks_dir=tasks_dir)
        zs["limit"] = limit
        out["zeroshot"] = zs
    if manifest is not None and save:
        checkpoint.update_manifest(target, **out)
    return out


def _source_manifest(src: str) -> dict:
    from .checkpoint import read_manifest

    if not Path(src).is_dir():
        raise LLMPruneError(f"{src} is not a folder: give an llmprune output folder (made by `llmprune compress`)")
    return read_manifest(src)


def recover(src: str, out: str, data: str = "c4", seqlen: int = 512, seed: int = 0, nsamples: int | None = None,
            eval: tuple[str, ...] = (), eval_seqlen: int = 2048, eval_windows: int | None = None,
            device: str | None = None, overwrite: bool = False, progress: bool = True, command: str | None = None,
            **perp_opts) -> dict:
    """PERP recovery of a pruned output folder into a new folder (arXiv 2312.15230)."""
    from . import calibration
    from .recover import perp

    manifest = _source_manifest(src)
    if (manifest.get("format") or {}).get("name", "dense") != "dense":
        raise LLMPruneError(f"{src} is packed ({manifest['format']['name']}): recover the dense output, then pack it")
    checkpoint.check_out(out, overwrite)
    perp.check_options(**perp_opts)
    dev = pick_device(device)
    model, tok, _ = checkpoint.load(src)
    steps, batch, accum = perp_opts.get("steps", 200), perp_opts.get("batch_size", 4), perp_opts.get("grad_accum", 1)
    n = nsamples or steps * batch * accum  # each window seen once
    ids, data_info = calibration.load(data, tok, n, seqlen, seed)
    cache: dict = {}
    before = {}
    if eval:
        # the source's own figures describe these very weights: reuse them when measured the same way
        old = manifest.get("eval", {})
        same = {d: old[d] for d in eval if "ppl" in old.get(d, {}) and old[d].get("seqlen") == eval_seqlen
                and eval_windows is not None and old[d].get("windows") == eval_windows}
        todo = tuple(d for d in eval if d not in same)
        model.to(dev)
        before = {**same, **(_eval_all(model, tok, todo, eval_seqlen, eval_windows, progress, cache) if todo else {})}
        model.to("cpu")
    keep = perp.derive_keep_masks(model)
    zeros_before = {k: int((~v).sum()) for k, v in keep.items()}
    t0 = time.perf_counter()
    model.to(dev)
    info = perp.recover(model, ids.to(dev), keep, progress=progress, **perp_opts)
    model.to("cpu")
    info["wall_s"] = round(time.perf_counter() - t0, 2)
    info["data"] = data_info
    zeros_after = {k: int((arch.get(model, k).weight == 0).sum()) for k in keep}
    info["zeros_unchanged"] = zeros_after == zeros_before
    new = {k: v for k, v in manifest.items() if k not in ("eval", "out")}
    if eval:
        model.to(dev)
        after = _eval_all(model, tok, eval, eval_seqlen, eval_windows, progress, cache)
        model.to("cpu")
        old = manifest.get("eval", {})
        new["eval"] = {d: {**r, "before_recover_ppl": before[d]["ppl"],
                           **({"dense_ppl": old[d]["dense_ppl"]} if "dense_ppl" in old.get(d, {})
                              and old[d].get("seqlen") == r["seqlen"] and old[d].get("windows") == r["windows"] else {})}
                       for d, r in after.items()}
    if "sparsity" in new:
        from . import prune

        names = prune.target_linears(model, manifest.get("ignore"))
        new["sparsity"] = {**new["sparsity"], "measured": prune.measured_sparsity(model, names)}
    new["recover"] = info
    new["recovered_from"] = str(src)
    new["peak_rss_mib"] = peak_rss_mib()
    if command:
        new["command"] = command
    checkpoint.save(model, tok, out, new, overwrite=overwrite)
    new["out"] = str(out)
    return new


def pack(src: str, out: str, fmt: str, quant: str | None = None, group_size="auto", calib: str = "c4",
         nsamples: int = 128, seqlen: int = 2048, seed: int = 0, overwrite: bool = False, progress: bool = True,
         command: str | None = None, save_dtype: str = "float16", grid: str = "auto", gptq: dict | None = None) -> dict:
    """Pack a dense output folder (zeros in place) into a smaller format; GPTQ quantizes block by
    block on calibration data first (packed.gptq_sequential)."""
    from . import packed

    manifest = _source_manifest(src)
    packed.check_options(fmt, quant, _symmetric(grid))  # before loading anything
    gopts = gptq_options(gptq, quant)
    checkpoint.check_out(out, overwrite)
    model, tok, _ = checkpoint.load(src)
    quantized, qinfo = None, {}
    if quant == "gptq":
        from . import calibration

        ids, cinfo = calibration.load(calib, tok, nsamples, seqlen, seed)
        qinfo["calibration"] = cinfo  # what GPTQ (and the tuning) saw; the source's is the pruning's
        quantized = packed.gptq_sequential(model, ids, fmt, group_size, _symmetric(grid), progress=progress,
                                           device=pick_device(None), dtype=_torch_dtype(save_dtype), info=qinfo,
                                           **gopts)
    # the source's quality figures describe the unpacked weights: they do not carry over
    new = {k: v for k, v in manifest.items() if k not in ("out", "eval", "zeroshot")}
    if command:
        new["command"] = command
    new["packed_from"] = str(src)
    section = packed.save_packed(model, out, fmt, quant=quant, quantized=quantized, tokenizer=tok, manifest=new,
                                 overwrite=overwrite, group_size=group_size, symmetric=_symmetric(grid),
                                 progress=progress,
                                 dtype=_torch_dtype(save_dtype),
                                 quant_opts={**gopts, **qinfo} if quant == "gptq" else None)
    return {**new, "format": section, "out": str(out)}
