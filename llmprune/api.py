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

from . import __version__, checkpoint, patterns, solvers
from .config import CompressConfig
from .errors import LLMPruneError


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


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
    import torch

    cfg = config if config is not None else CompressConfig.from_dict(kwargs)
    t_start = time.perf_counter()
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
    out = cfg.out or default_out(cfg, sparsity)
    checkpoint.check_out(out, cfg.overwrite)
    device = pick_device(cfg.device)

    # --- load ---
    from . import models, prune

    t0 = time.perf_counter()
    model, tok, info = models.load(cfg.model, dtype=cfg.dtype)
    timings = {"load_s": round(time.perf_counter() - t0, 2)}
    eval_cache: dict = {}
    results: dict = {}
    if cfg.eval and cfg.eval_dense:
        t0 = time.perf_counter()
        model.to(device)
        dense = _eval_all(model, tok, cfg.eval, cfg.eval_seqlen, cfg.eval_windows, cfg.progress, eval_cache)
        model.to("cpu")
        results = {d: {"dense_ppl": r["ppl"]} for d, r in dense.items()}
        timings["dense_eval_s"] = round(time.perf_counter() - t0, 2)

    # --- calibrate and compress ---
    names = prune.target_linears(model, cfg.ignore)
    calib_info = None
    calib_ids = None
    if cfg.slicegpt or solver.needs_for(cfg.solver_opts) or cfg.owl:
        from . import calibration

        t0 = time.perf_counter()
        calib_ids, calib_info = calibration.load(cfg.calib, tok, cfg.nsamples, cfg.seqlen, cfg.seed)
        timings["calib_load_s"] = round(time.perf_counter() - t0, 2)
    manifest: dict = {
        "format_version": checkpoint.FORMAT_VERSION,
        "llmprune_version": __version__,
        "model": info.as_dict(),
    }
    t0 = time.perf_counter()
    if cfg.slicegpt:
        from .transforms import slicegpt

        sl = slicegpt.slice_model(model, calib_ids, progress=cfg.progress, **cfg.slicegpt)
        manifest["solver"] = "slicegpt"
        manifest["slicegpt"] = sl
    else:
        prune.check_shapes(model, names, pattern)
        if cfg.scope == "global":
            from .solvers.magnitude import global_sparsities

            layer_s = global_sparsities({n: _weight(model, n) for n in names}, sparsity)
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
        from .recover import perp

        t0 = time.perf_counter()
        manifest["recover"] = perp.recover_from_config(model, tok, cfg.recover, progress=cfg.progress)
        timings["recover_s"] = round(time.perf_counter() - t0, 2)

    # --- evaluate the compressed model ---
    if cfg.eval:
        t0 = time.perf_counter()
        model.to(device)
        after = _eval_all(model, tok, cfg.eval, cfg.eval_seqlen, cfg.eval_windows, cfg.progress, eval_cache)
        model.to("cpu")
        for d, r in after.items():
            results[d] = {**r, **results.get(d, {})}
        timings["eval_s"] = round(time.perf_counter() - t0, 2)
        manifest["eval"] = results
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    manifest.update(timings=timings, peak_rss_mib=peak_rss_mib(), device=device, dtype=cfg.dtype,
                    versions=versions(), config=cfg.as_dict())
    if command:
        manifest["command"] = command
    if cfg.format != "dense":
        from . import packed

        packed.save_packed(model, out, cfg.format, quant=cfg.quant, tokenizer=tok, manifest=manifest,
                           overwrite=cfg.overwrite)
    else:
        checkpoint.save(model, tok, out, manifest, overwrite=cfg.overwrite)
    manifest["out"] = str(out)
    return manifest


def _weight(model, name):
    from . import arch

    return arch.get(model, name).weight.data


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
             device: str | None = None, progress: bool = True, save: bool = True) -> dict:
    """Perplexity of an output folder (results merged into its manifest) or of any model spec."""
    model, tok, manifest = load(target, device=pick_device(device))
    results = _eval_all(model, tok, ppl, seqlen, windows, progress, {})
    if manifest is not None and save:
        old = manifest.get("eval", {})
        for d, r in results.items():  # keep the dense reference measured at compress time
            if d in old and "dense_ppl" in old[d] and (old[d].get("seqlen"), old[d].get("windows")) == (seqlen, r["windows"]):
                r["dense_ppl"] = old[d]["dense_ppl"]
        checkpoint.update_manifest(target, eval=results)
    return results
