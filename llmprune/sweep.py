"""A solver x sparsity grid on one model, for the README's plots: the dense model, its dense
evaluation and the calibration windows are made once and reused across the points. Points are
not saved (nothing is published as an artifact): each is evaluated in memory, with the same stage
functions `compress` uses (pipeline.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import arch, patterns, pipeline, solvers
from .errors import LLMPruneError
from .runinfo import peak_rss_mib, pick_device, reset_peak_rss, versions


def parse_solver_spec(spec: str):
    """'wanda', 'dsnot+init=sparsegpt', 'sparsegpt+owl', 'wanda+owl+owl_lambda=0.1' ->
    (label, Solver, OWL options or None, solver options)."""
    name, *parts = spec.split("+")
    solver = solvers.get(name)
    opts, owl_opts = {}, None
    for p in parts:
        if p == "owl":
            owl_opts = owl_opts or {}
        elif "=" in p:
            k, v = p.split("=", 1)
            try:
                v = int(v) if v.isdigit() else float(v)
            except ValueError:
                pass  # a word, such as init=sparsegpt
            if k in ("owl_m", "owl_lambda"):
                owl_opts = {**(owl_opts or {}), {"owl_m": "m", "owl_lambda": "lam"}[k]: float(v)}
            else:
                opts[k] = v
        else:
            raise LLMPruneError(f"solver spec {spec!r}: options look like name+key=value or name+owl")
    pipeline.check_solver_options(solver, opts)
    return spec, solver, owl_opts, opts


def sweep(model: str = "llama", solvers_: tuple[str, ...] = ("magnitude", "wanda"), sparsities=(0.5,),
          pattern: str = "unstructured", out: str = "sweep", calib: str = "c4", nsamples: int | None = None,
          seqlen: int | None = None, seed: int = 0, eval: tuple[str, ...] = ("wikitext2",), eval_seqlen: int = 2048,
          eval_windows: int | None = None, tasks: tuple[str, ...] = (), limit: int | None = None,
          device: str | None = None, calib_batch: int = 8, progress: bool = True, protocol: str = "auto") -> dict:
    """Run a solver x sparsity grid on one model: the dense model, its dense evaluation and the
    calibration windows are made once and reused; each point restores the dense weights, prunes,
    evaluates. Writes sweep.csv, sweep.json and sweep.png into `out`."""
    import dataclasses

    from . import prune, report
    from .config import CompressConfig, OwlConfig

    dev = pick_device(device)
    cfg = CompressConfig(model=model, calib=calib, nsamples=nsamples, seqlen=seqlen, protocol=protocol,
                         eval_windows=eval_windows, eval=eval, eval_seqlen=eval_seqlen).resolved(dev)
    pat = patterns.parse(pattern)
    grid = [(*parse_solver_spec(s), patterns.resolve_sparsity(pat, sp)) for s in solvers_ for sp in sparsities]
    if any(owl_opts is not None for _, _, owl_opts, _, _ in grid) and pat.kind == "nm":
        raise LLMPruneError(f"+owl varies the sparsity per layer, but pattern {pat} fixes it: drop +owl")
    if tasks:
        from .eval import zeroshot

        tasks = tuple(zeroshot.check_tasks(list(tasks)))
    m, tok, info = pipeline.load_model(model)
    pipeline.check_finite(m)
    names = prune.target_linears(m)
    prune.check_shapes(m, names, pat)
    pipeline.check_context(m, cfg.seqlen, "--seqlen")
    pipeline.check_context(m, eval_seqlen, "--eval-seqlen")
    # pruning changes only the target linears' weights: their dense copies restore the model between points
    # (a copy of those alone, not of the whole state dict: embeddings and head are a large share of it)
    dense_state = {n: arch.target(m, n).weight.detach().clone() for n in names}
    ids, calib_info = pipeline.calibrate(calib, tok, cfg.nsamples, cfg.seqlen, seed)
    windows = cfg.eval_windows or None
    cache: dict = {}

    def measure(model_) -> dict:
        model_.to(dev)
        r: dict = {"eval": pipeline.evaluate_model(model_, tok, cfg.eval, eval_seqlen, windows, progress, cache)}
        if tasks:
            from .eval import zeroshot

            r["zeroshot"] = zeroshot.zeroshot(model_, tok, list(tasks), limit=limit)
        model_.to("cpu")
        return r

    dense = measure(m)
    Path(out).mkdir(parents=True, exist_ok=True)
    rows = [report.sweep_row({"model": info.as_dict(), "solver": "dense", "pattern": "dense",
                              "sparsity": {"target": 0.0, "measured": 0.0}, **dense})]
    for label, solver, owl_opts, opts, sp in grid:
        for n, w in dense_state.items():
            arch.target(m, n).weight.data.copy_(w)
        reset_peak_rss()  # where the platform cannot restart the count, this stays the process's peak
        t0 = time.perf_counter()
        layer_s = {n: sp for n in names}
        if owl_opts is not None:
            from . import owl

            layer_s = owl.layer_sparsities(m, names, ids, sp, batch_size=calib_batch, device=dev, progress=progress,
                                           **dataclasses.asdict(OwlConfig(**owl_opts)))
        prune.prune(m, solver, pat, layer_s, ids, opts, calib_batch, dev, progress)
        took = time.perf_counter() - t0
        rss = peak_rss_mib()  # of the pruning only: the dense copy and the calibration windows included
        r = measure(m)
        for d, x in r["eval"].items():
            x["dense_ppl"] = dense["eval"][d]["ppl"]
        man = {"model": info.as_dict(), "solver": label, "pattern": str(pat),
               "sparsity": {"target": sp, "measured": prune.measured_sparsity(m, names)},
               "timings": {"compress_s": round(took, 2)}, "peak_rss_mib": rss, **r}
        rows.append(report.sweep_row(man))
        report.write_sweep(rows, out)  # after every point: a stopped sweep keeps what it measured
    csv_path, json_path = report.write_sweep(rows, out)
    png = report.plot_sweep([r for r in rows if r["solver"] != "dense"], Path(out) / "sweep.png",
                            {d: dense["eval"][d]["ppl"] for d in cfg.eval})
    meta = {"model": info.as_dict(), "calibration": calib_info, "protocol": cfg.protocol, "eval_seqlen": eval_seqlen,
            "eval_windows": windows, "tasks": list(tasks), "limit": limit, "versions": versions(),
            "measured_on": "the pruned model in memory (dense weights with zeros, --dtype float32); not saved"}
    (Path(out) / "sweep_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"rows": rows, "csv": str(csv_path), "json": str(json_path), "png": str(png)}
