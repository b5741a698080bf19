"""A solver x sparsity grid on one model, for the README's plots: the dense model, its dense
evaluation and the calibration windows are made once and reused across the points. Points are
not saved (nothing is published as an artifact): each is evaluated as pruned, with the same stage
functions `compress` uses (pipeline.py, onload.py).

The model stays on disk unless it can only load whole (as `compress --onload auto`): each point
prunes it block by block from its files, each pruned block kept in the compute dtype in a scratch
folder inside `out` (onload.Scratch: exact, read back in place of the source's block), then walks
the pruned blocks for its perplexity and zero-shot accuracy, and deletes the folder. Peak memory
is one block and the activations, at 8B as at 70B; the disk holds one pruned copy at a time.
With `onload="whole"` the model is in memory and each point after the first restores the pruned linears'
dense weights before it prunes, read back a block at a time from the folder the model was loaded from (or, for
a block that folder does not give back bit for bit as loaded, from a scratch file in `out`): one block beside
the model, never a second copy of its linears. Both give the same figures (tested)."""
from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from . import arch, patterns, pipeline, solvers, walker
from .errors import LLMPruneError
from .runinfo import peak_rss_mib, pick_device, reset_peak_rss, versions

SCRATCH = ".scratch"  # inside the sweep's folder: the point being measured, pruned


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


class _Whole:
    """The model in memory. Each point after the first restores the pruned linears' dense weights from the
    folder the model was loaded from, one block at a time (a LazyModel of it: one block of the source in memory
    beside the model, not a copy of its linears, which at 70B was the model twice). Before the first point every
    block the folder holds is read once and compared, bit for bit, with the model as loaded; a block it does not
    give back as loaded (or cannot read block by block) has its linears' dense weights kept on disk instead, in
    a scratch file inside `out`, and restored from there."""

    def __init__(self, spec: str, dtype: str, why: str, work: Path):
        self.model, self.tok, self.info = pipeline.load_model(spec, dtype)
        pipeline.check_finite(self.model)
        self.onload = f"whole: {why}"
        self.dtype, self.work = getattr(torch, dtype), work
        self.kept: dict[int, Path] = {}  # block -> the scratch file of its linears' dense weights
        self.lz = self.pruned = None
        self.lacking: list[int] = []  # blocks the source does not give back as loaded (`keep`)

    def keep(self, names: list[str], restores: bool = True) -> None:
        """The targets each point prunes; `restores`: a later point needs them dense again (else nothing is read)."""
        self.names = names
        blocks = arch.arch_of(self.model).blocks
        self.by_block: dict[int, list[str]] = {}
        for n in names:
            self.by_block.setdefault(arch.block_index(blocks, n), []).append(n)
        if not restores:
            return
        from . import lazy

        try:
            self.lz = lazy.LazyModel(self.info.path, self.dtype)
        except LLMPruneError:
            self.lz = None
        self.lacking = [i for i, block in self.by_block.items() if not self._same(i, block)]
        if self.lacking:
            from . import outdir

            need = sum(arch.target(self.model, n).weight.nbytes for i in self.lacking for n in self.by_block[i])
            outdir.check_space(self.work, {f"the dense weights of {len(self.lacking)} blocks the source does not give "
                                           f"back as loaded": need}, name="the sweep")

    def _source(self, i: int, names: list[str]) -> dict | None:
        """Block i's targets' weights as the source folder gives them (None where it cannot read that block);
        the block stays loaded in the LazyModel until `_done`."""
        if self.lz is None:
            return None
        try:
            self.lz.load(f"{arch.arch_of(self.model).blocks}.{i}.")
        except LLMPruneError:  # stored under names only a whole load converts
            self._done(i)
            return None
        return {n: arch.target(self.lz.model, n).weight for n in names}

    def _done(self, i: int) -> None:
        self.lz.release(f"{arch.arch_of(self.model).blocks}.{i}.")

    def _same(self, i: int, names: list[str]) -> bool:
        """Whether the source gives block i's targets back bit for bit as the model holds them now (dense)."""
        got = self._source(i, names)
        if got is None:
            return False
        try:
            return all(got[n].dtype == (w := arch.target(self.model, n).weight).dtype and torch.equal(got[n], w)
                       for n in names)
        finally:
            self._done(i)

    def _keep_dense(self) -> None:
        """Write the dense weights of the targets of the blocks the source does not give back (`keep`) to scratch
        files, a block at a time, from the model as loaded (before the first point prunes it)."""
        from safetensors.torch import save_file

        if self.lacking:
            self.work.mkdir(parents=True, exist_ok=True)
        for i in self.lacking:
            self.kept[i] = self.work / f"dense-{i:05d}.safetensors"
            save_file({n: arch.target(self.model, n).weight.detach().contiguous() for n in self.by_block[i]},
                      str(self.kept[i]))

    @torch.no_grad()
    def _restore(self) -> None:
        """Every target's dense weights back, a block at a time, from the source or the scratch file."""
        from safetensors import safe_open

        for i, names in self.by_block.items():
            if i in self.kept:
                with safe_open(str(self.kept[i]), framework="pt") as f:
                    for n in names:
                        arch.target(self.model, n).weight.copy_(f.get_tensor(n))
                continue
            got = self._source(i, names)
            if got is None:  # (read before the first point: the folder changed since)
                raise LLMPruneError(f"{self.info.path} no longer reads block {i} back: leave the model's folder "
                                    f"alone while a sweep runs")
            for n in names:
                arch.target(self.model, n).weight.copy_(got[n])
            self._done(i)

    @contextmanager
    def point(self):
        if self.pruned:
            self._restore()
        else:
            self._keep_dense()
        self.pruned = True
        yield

    def close(self) -> None:
        if self.kept:
            shutil.rmtree(self.work, ignore_errors=True)

    def walk(self, keep: bool = False):
        return nullcontext()

    def measured(self) -> float:
        from . import prune

        return prune.measured_sparsity(self.model, self.names)

    def evaluate(self, datasets, seqlen: int, windows, device: str, progress: bool, cache: dict) -> dict:
        self.model.to(device)
        try:
            return pipeline.evaluate_model(self.model, self.tok, datasets, seqlen, windows, progress, cache)
        finally:
            self.model.to("cpu")

    def zeroshot(self, tasks: list[str], limit, device: str, progress: bool) -> dict:
        from .eval import zeroshot

        return zeroshot.zeroshot(self.model, self.tok, tasks, limit=limit, device=device, progress=progress)


class _Blocks:
    """The model on disk (lazy.LazyModel). Each point prunes it block by block into a scratch folder
    (`walk(keep=True)`), which later walks read in place of the source's blocks until the point ends."""

    onload = "blocks"

    def __init__(self, lz, tok, info, work: Path):
        self.lz, self.model, self.tok, self.info, self.work = lz, lz.model, tok, info, work

    def keep(self, names: list[str], restores: bool = True) -> None:
        self.names = names

    def close(self) -> None:
        pass  # (each point removes its own scratch folder)

    @contextmanager
    def point(self):
        from . import onload

        shutil.rmtree(self.work, ignore_errors=True)  # what a stopped sweep left
        self.work.mkdir(parents=True)
        self.scratch, self.zeros, self.total = onload.Scratch(self.lz, self.work), 0, 0
        try:
            yield
        finally:
            self.scratch.close()  # the source's blocks again
            shutil.rmtree(self.work, ignore_errors=True)

    def walk(self, keep: bool = False):
        """Walks over the blocks read from disk; with `keep`, each finished block counted and kept."""
        from . import onload, prune

        blocks = arch.arch_of(self.model).blocks

        def sink(i, block):
            zeros, total = prune.zeros_of(self.model, [n for n in self.names if n.startswith(f"{blocks}.{i}.")])
            self.zeros, self.total = self.zeros + zeros, self.total + total
            self.scratch.block(i, block)

        return walker.onload(self.model, onload.block_store(self.lz, sink if keep else None))

    def measured(self) -> float:
        return self.zeros / max(self.total, 1)

    def evaluate(self, datasets, seqlen: int, windows, device: str, progress: bool, cache: dict) -> dict:
        from . import onload

        return onload.evaluate(self.lz, self.tok, datasets, seqlen, windows, device, progress, cache)

    def zeroshot(self, tasks: list[str], limit, device: str, progress: bool) -> dict:
        from .eval import zeroshot

        return zeroshot.zeroshot(self.lz, self.tok, tasks, limit=limit, device=device, progress=progress)


def _open(spec: str, dtype: str, onload_: str, work: Path):
    """The model as the points will read it: on disk unless `onload_` is whole or its checkpoint
    only loads whole (compress's rule, onload.stored_as_in_memory)."""
    if onload_ == "whole":
        return _Whole(spec, dtype, "--onload whole", work)
    from . import onload

    lz, tok, info = onload.open_model(spec, dtype)
    why = onload.stored_as_in_memory(lz)
    if why and onload_ == "blocks":
        raise LLMPruneError(f"--onload blocks: {why}: use --onload whole (or auto)")
    if why:
        return _Whole(spec, dtype, why, work)
    from . import outdir

    outdir.check_space(work, onload.disk_needed(lz, "none", lz.dtype, True, 0), name="the sweep")  # a point's copy
    return _Blocks(lz, tok, info, work)


def sweep(model: str = "llama", solvers_: tuple[str, ...] = ("magnitude", "wanda"), sparsities=(0.5,),
          pattern: str = "unstructured", out: str = "sweep", calib: str = "c4", nsamples: int | None = None,
          seqlen: int | None = None, seed: int = 0, eval: tuple[str, ...] = ("wikitext2",), eval_seqlen: int = 2048,
          eval_windows: int | None = None, tasks: tuple[str, ...] = (), limit: int | None = None,
          device: str | None = None, calib_batch: int = 8, progress: bool = True, protocol: str = "auto",
          onload: str = "auto", dtype: str = "auto", hessian_gib: float | None = None,
          overwrite: bool = False) -> dict:
    """Run a solver x sparsity grid on one model: the dense model, its dense evaluation and the
    calibration windows are made once and reused; each point prunes the dense model, evaluates
    it. Writes sweep.csv, sweep.json and sweep.png into `out` (the rows after every point: a stopped sweep keeps
    what it measured). An existing `out` is refused unless `overwrite`, which replaces an earlier sweep's files
    (never a folder without a sweep.csv). `hessian_gib`: GiB of Hessians collected at once (walker.hessian_memory)."""
    import dataclasses

    from . import outdir, prune, report, walker
    from .config import CompressConfig, OwlConfig

    dev = pick_device(device)
    cfg = CompressConfig(model=model, calib=calib, nsamples=nsamples, seqlen=seqlen, protocol=protocol,
                         eval_windows=eval_windows, eval=eval, eval_seqlen=eval_seqlen, onload=onload,
                         dtype=dtype, hessian_gib=hessian_gib).resolved(dev)
    pat = patterns.parse(pattern)
    grid = [(*parse_solver_spec(s), patterns.resolve_sparsity(pat, sp)) for s in solvers_ for sp in sparsities]
    if any(owl_opts is not None for _, _, owl_opts, _, _ in grid) and pat.kind == "nm":
        raise LLMPruneError(f"+owl varies the sparsity per layer, but pattern {pat} fixes it: drop +owl")
    if tasks:
        from .eval import zeroshot

        tasks = tuple(zeroshot.check_tasks(list(tasks)))
    if not sparsities:
        raise LLMPruneError("--sparsity gives no point: use start:stop:step with start <= stop (e.g. 0.3:0.8:0.1) "
                            "or a list (0.5,0.6)")
    if overwrite and Path(out).is_dir() and [q.name for q in Path(out).iterdir()] == [SCRATCH]:
        shutil.rmtree(Path(out) / SCRATCH)  # a sweep stopped before its first point: nothing of it to keep
    outdir.check_out(out, overwrite, pipeline.local_sources(model), marker="sweep.csv")
    src = _open(model, cfg.dtype, cfg.onload, Path(out) / SCRATCH)
    try:
        m, tok, info = src.model, src.tok, src.info
        names = prune.target_linears(m)
        prune.check_shapes(m, names, pat)
        pipeline.check_calibration(m, calib, cfg.seqlen)
        pipeline.check_context(m, eval_seqlen, "--eval-seqlen")
        src.keep(names, restores=len(grid) > 1)
        ids, calib_info = pipeline.calibrate(calib, tok, cfg.nsamples, cfg.seqlen, seed)
        for f in ("sweep.csv", "sweep.json", "sweep.png", "sweep_meta.json"):  # an earlier sweep's, replaced (once every
            (Path(out) / f).unlink(missing_ok=True)                            # check above has passed)
        windows = cfg.eval_windows or None
        cache: dict = {}

        def measure() -> dict:
            r: dict = {"eval": src.evaluate(cfg.eval, eval_seqlen, windows, dev, progress, cache)}
            if tasks:
                r["zeroshot"] = src.zeroshot(list(tasks), limit, dev, progress)
            return r

        dense = measure()
        Path(out).mkdir(parents=True, exist_ok=True)
        rows = [report.sweep_row({"model": info.as_dict(), "solver": "dense", "pattern": "dense", "dtype": cfg.dtype,
                                  "sparsity": {"target": 0.0}, **dense})]  # (its own zeros not counted)
        for label, solver, owl_opts, opts, sp in grid:
            with src.point():
                reset_peak_rss()  # where the platform cannot restart the count, this stays the process's peak
                t0 = time.perf_counter()
                layer_s = {n: sp for n in names}
                if owl_opts is not None:
                    from . import owl

                    with src.walk():
                        layer_s = owl.layer_sparsities(m, names, ids, sp, batch_size=calib_batch, device=dev,
                                                       progress=progress, **dataclasses.asdict(OwlConfig(**owl_opts)))
                with src.walk(keep=True), walker.hessian_memory(hessian_gib):
                    prune.prune(m, solver, pat, layer_s, ids, opts, calib_batch, dev, progress)
                took = time.perf_counter() - t0
                rss = peak_rss_mib()  # of the pruning only: the calibration windows (and the model when whole) included
                r = measure()
                measured = src.measured()
            for d, x in r["eval"].items():
                x["dense_ppl"] = dense["eval"][d]["ppl"]
            man = {"model": info.as_dict(), "solver": label, "pattern": str(pat), "dtype": cfg.dtype,
                   "sparsity": {"target": sp, "measured": measured},
                   "timings": {"compress_s": round(took, 2)}, "peak_rss_mib": rss, **r}
            rows.append(report.sweep_row(man))
            report.write_sweep(rows, out)  # after every point: a stopped sweep keeps what it measured
        csv_path, json_path = report.write_sweep(rows, out)
        png = report.plot_sweep([r for r in rows if r["solver"] != "dense"], Path(out) / "sweep.png",
                                {d: dense["eval"][d]["ppl"] for d in cfg.eval})
        kept = ("the pruned model in memory (dense weights with zeros" if src.onload.startswith("whole") else
                "the pruned blocks, kept in a scratch folder and walked one at a time (dense weights with zeros")
        meta = {"model": info.as_dict(), "calibration": calib_info, "protocol": cfg.protocol, "eval_seqlen": eval_seqlen,
                "eval_windows": windows, "tasks": list(tasks), "limit": limit, "onload": src.onload, "dtype": cfg.dtype,
                "versions": versions(), "measured_on": f"{kept}, --dtype {cfg.dtype}); not saved"}
        (Path(out) / "sweep_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return {"rows": rows, "csv": str(csv_path), "json": str(json_path), "png": str(png)}
    finally:
        src.close()  # (the dense weights a whole model's points restore from, when kept on disk)
