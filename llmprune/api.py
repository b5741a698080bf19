"""The commands, each a composition of the pipeline's stages (pipeline.py):

    compress  plan -> load -> [dense eval] -> calibrate -> transform -> [recover] -> export -> evaluate saved
    recover   load output -> [eval before] -> recover -> export (dense) -> evaluate saved
    pack      load output -> [calibrate] -> export (packed, RTN or GPTQ) -> [evaluate saved]
    evaluate  load output or model -> evaluate (perplexity, zero-shot) -> merge into its manifest

Every output is written into a temporary sibling, evaluated there through llmprune.load, given its
manifest, and only then renamed into place (outdir.atomic_dir).

    import llmprune
    res = llmprune.compress(model="llama", solver="wanda", sparsity=0.5, eval=("wikitext2",))
"""
from __future__ import annotations

from pathlib import Path

from . import manifest as mf
from . import outdir, pipeline
from .config import (
    DTYPES,
    CompressConfig,
    GPTQConfig,
    RecoverConfig,
    calibration_of,
    check_eval,
    check_hessian_gib,
)
from .errors import LLMPruneError
from .runinfo import memory, pick_device, pick_devices, versions


def compress(config: CompressConfig | None = None, command: str | None = None, **kwargs) -> dict:
    """Prune (or slice) a model, save it, evaluate the saved output. Returns the manifest with `out`.
    `command` (the CLI line) is recorded so the model card can say how to reproduce it. The model
    stays on disk and is walked block by block (onload.py) unless a step needs it whole."""
    cfg = config if config is not None else CompressConfig.from_dict(kwargs)
    t = pipeline.Timer()
    p = pipeline.plan(cfg)
    c = p.cfg
    if c.export:  # refused before any work: an unknown target or an export folder in the way
        from . import export

        export.precheck(c.export, c.export_types, c.export_quant, c.slicegpt)
        outdir.check_out(export.default_out(p.out, c.export), c.overwrite)
    run = _compress_onload if p.onload else _compress_whole
    from . import walker

    with walker.hessian_memory(c.hessian_gib):
        m = run(p, t, command)
    if m is None:  # a DDP replica other than the first (placement.writes_output): that one writes the output
        from . import placement

        return {"out": None, "replica": placement.rank(), "to": str(p.out)}
    res = {**m.to_dict(), "out": str(p.out)}
    if c.export:
        how = f"llmprune export {p.out} --to {c.export}"
        try:
            res["exported"] = _export_after(c, p.out, command)
        except LLMPruneError as e:  # the compressed output is whole: the export alone is to do again
            raise LLMPruneError(f"{p.out} was saved, but its export failed: {e} (then: {how})") from None
        except KeyboardInterrupt:
            import sys

            print(f"llmprune: {p.out} was saved; its export was stopped: run `{how}` to export it", file=sys.stderr)
            raise
    return res


def _measure(m: mf.Manifest, p, t, tmp: Path, windows: int | None, cache: dict, dense: dict) -> None:
    """The saved output's figures into its manifest: perplexity (with the dense model's beside it) and
    zero-shot accuracy, each measured on the folder as written."""
    c = p.cfg
    if c.eval:
        with t("eval_s"):
            m.eval = pipeline.merge_dense(pipeline.evaluate_saved(
                tmp, c.eval, c.eval_seqlen, windows, p.device, c.dtype, c.progress, cache), dense)
    if c.tasks:
        with t("zeroshot_s"):
            m.zeroshot = pipeline.zeroshot_saved(tmp, m.to_dict(), c.tasks, c.tasks_limit, p.device, c.dtype,
                                                 c.progress)


def _finish(m: mf.Manifest, p, t, command) -> None:
    c = p.cfg
    m.timings = t.total()
    m.device = ",".join(p.devices) if len(p.devices) > 1 else p.device
    m.dtype, m.protocol, m.versions, m.config = c.dtype, c.protocol, versions(), c.as_dict()
    m.command = command
    for k, v in memory(m.device).items():
        setattr(m, k, v)


def _compress_whole(p, t, command) -> mf.Manifest:
    """The model in memory: `--onload whole`, PERP on the CPU alone (or one replica per process), and checkpoints
    whose tensors only transformers' whole load reads. PERP's training commits checkpoints (resume.Training) into the
    output's temporary folder and a killed run's next run goes on from its last one; the pruning before it is not
    checkpointed here (the model is in memory, not written block by block): that run prunes again, to the same
    weights on the CPU. With one replica per process (DDP), the first process writes and measures the output, the
    others return None after the training."""
    import functools
    from contextlib import nullcontext

    from . import arch as archmod
    from . import placement, resume

    c = p.cfg
    windows = c.eval_windows or None  # 0: all
    with t("load_s"):
        model, tok, info = pipeline.load_model(c.model, c.dtype)
    names = pipeline.check_model(p, model)
    _precheck_export(p.cfg, model.config)
    m = mf.Manifest(model=info.as_dict(), onload="whole" + (f": {p.whole_because}" if p.whole_because else ""))
    ids = None
    if p.needs_calibration:
        with t("calib_load_s"):
            ids, m.calibration = pipeline.calibrate(c.calib, tok, c.nsamples, c.seqlen, c.seed)
    src_dtype = pipeline.source_dtype(info.path)
    fp = found = None
    writes = placement.writes_output()
    # PERP's training commits checkpoints and a killed run's is taken over (under DDP the first replica's, which
    # writes the output: perp.recover hands them to the others)
    if c.recover and c.checkpoint_s is not None and info.path and writes:
        fp = resume.fingerprint(c.as_dict(), ids, Path(info.path), p.devices, pipeline.save_dtype(c, src_dtype))
        found = resume.find(p.out, fp)
    cache: dict = {}
    dense, dense_key = _dense_figures(c, windows, found, t, functools.partial(
        _evaluate_dense, info.path, model, tok, c, windows, p.device, cache)) if writes else ({}, None)  # (DDP: one)
    parts = {}
    if c.format == "dense" and not c.slicegpt:  # (a packed or sliced output is smaller)
        item = pipeline.save_dtype(c, src_dtype).itemsize
        parts["the output"] = sum(q.numel() for q in model.parameters()) * item
    if fp:  # (the linears PERP adapts: the pruned ones, or every one of a sliced model, at most these)
        from . import onload

        parts["PERP's training checkpoints"] = onload.recover_bytes(model, names, c.recover)
    outdir.check_space(p.out, parts, outdir.folder_bytes(found[0]) if found else 0)
    with outdir.atomic_dir(p.out, c.overwrite, adopt=found[0] if found else None,
                           sources=pipeline.local_sources(c.model), keep=resume.kept if fp else None) \
            if writes else nullcontext() as tmp:
        checkpoints = None
        if fp:
            checkpoints = resume.Checkpoints(tmp, fp, c.checkpoint_s, len(archmod.blocks(model)),
                                             found[1] if found else None)
            if dense:
                checkpoints.keep["dense"] = {"key": dense_key, "figures": dense}
        sec = pipeline.transform(p, model, names, ids, t)
        m.steps = sec.pop("steps")
        for k, v in sec.items():
            setattr(m, k, v)
        if c.recover:
            from . import prune

            with t("recover_s"):
                m.recover = pipeline.recover(model, tok, c.recover, c.calib, c.seed + 1, p.devices, c.progress,
                                             checkpoint=checkpoints and checkpoints.training(c.recover.steps))
            if not writes:
                return None
            m.steps.append("recover")
            if m.sparsity:
                m.sparsity["measured_after_recover"] = prune.measured_sparsity(model, names)
        if c.format == "dense":
            model.to(pipeline.save_dtype(c, src_dtype))
        m.format = pipeline.export(model, tok, tmp, c.format, p.quant, c.group_size, c.symmetric,
                                   pipeline.save_dtype_name(c, src_dtype), p.gptq, ids, None, p.device,
                                   c.calib_batch, c.progress, t, p.devices)  # GPTQ saw `calibration`
        m.steps += pipeline.export_steps(m.format)
        del model  # evaluation loads the folder; the in-memory model is not needed any more
        mf.write(tmp, m)  # the loader reads the format from it; rewritten below with the figures
        _measure(m, p, t, tmp, windows, cache, dense)
        _finish(m, p, t, command)
        if checkpoints is not None:
            m.resumed = checkpoints.record()
            checkpoints.close()
        mf.write(tmp, m)
    return m


def _dense_figures(c, windows, found, t, measure) -> tuple[dict, list]:
    """The dense model's figures for compress's evaluation ({} without one) and the key they are kept under in a
    checkpoint: those a stopped run (`found`, resume.find) measured on the same source the same way, else
    `measure()`."""
    key = [list(c.eval), c.eval_seqlen, windows]
    kept = found[1]["keep"].get("dense") if found else None
    if not (c.eval and c.eval_dense):
        return {}, key
    if kept and kept["key"] == key:
        return kept["figures"], key
    with t("dense_eval_s"):
        return measure(), key


def _evaluate_dense(path, model, tok, c, windows, device, cache) -> dict:
    """The model's figures before compression. On a GPU, block by block from its folder (onload.evaluate,
    the same figures): the whole model would not fit one GPU at 70B. On the CPU, the model in memory."""
    import torch

    from . import lazy, onload

    if torch.device(device).type != "cpu":
        lz = lazy.LazyModel(path, getattr(torch, c.dtype))
        if not onload.stored_as_in_memory(lz):
            return onload.evaluate(lz, tok, c.eval, c.eval_seqlen, windows, device, c.progress, cache)
    model.to(device)
    try:
        return pipeline.evaluate_model(model, tok, c.eval, c.eval_seqlen, windows, c.progress, cache)
    finally:
        model.to("cpu")


def _compress_onload(p, t, command) -> mf.Manifest:
    """The model on disk, its blocks read, solved, written and freed one at a time."""
    from . import arch as archmod
    from . import onload, packed, resume

    c = p.cfg
    windows = c.eval_windows or None
    with t("load_s"):
        lz, tok, info = onload.open_model(c.model, c.dtype)
    why = onload.stored_as_in_memory(lz)
    if why:  # tensors stored under converted names: only transformers' whole load reads them
        if c.onload == "blocks":
            raise LLMPruneError(f"--onload blocks: {why}: use --onload whole (or auto)")
        import dataclasses

        return _compress_whole(dataclasses.replace(p, onload=False, whole_because=why), t, command)
    names = pipeline.check_model(p, lz.model)
    _precheck_export(p.cfg, lz.model.config)
    # PERP's placement, planned (and refused) before any work: each block then goes from disk to its device
    where = onload.recover_plan(lz.model, names, p.devices, c.recover) if c.recover and not c.slicegpt else None
    m = mf.Manifest(model=info.as_dict(), onload="blocks")
    ids = None
    if p.needs_calibration:
        with t("calib_load_s"):
            ids, m.calibration = pipeline.calibrate(c.calib, tok, c.nsamples, c.seqlen, c.seed)
    save_dtype = pipeline.save_dtype(c, pipeline.source_dtype(lz.folder))
    fp = found = None
    sliced = None
    if c.slicegpt:  # planned on the meta device: refused, or the output's size known, before any work
        from . import onload_slicegpt

        sliced = onload_slicegpt.plan(lz, c.slicegpt, ids)
        if c.recover:  # PERP's placement of the sliced model, planned (and refused) before any work too
            from . import prune

            where = onload.recover_plan(sliced.out, prune.target_linears(sliced.out), p.devices, c.recover)
    # the passes over the blocks and the trainings commit checkpoints; a killed run's is taken over
    if c.checkpoint_s is not None:
        fp = resume.fingerprint(c.as_dict(), ids, lz.folder, p.devices, save_dtype)
        found = resume.find(p.out, fp)
    acts = ids.numel() * lz.model.config.hidden_size * lz.dtype.itemsize if fp and ids is not None else 0
    parts = onload.disk_needed(lz, c.format, save_dtype, p.quant == "gptq" or bool(c.recover), acts) \
        if sliced is None else onload_slicegpt.disk_needed(sliced, c.format, save_dtype, lz.dtype, bool(c.recover), acts)
    if fp and c.recover:
        from . import prune

        trained = sliced.out if sliced is not None else lz.model
        parts["PERP's training checkpoints"] = onload.recover_bytes(
            trained, prune.target_linears(trained) if sliced is not None else names, c.recover)
    if p.quant == "gptq" and p.gptq.tune_steps:
        parts |= onload.tune_bytes(sliced.out if sliced is not None else lz.model, ids, c.group_size, bool(fp))
    there = outdir.folder_bytes(found[0]) if found else 0  # written already
    outdir.check_space(p.out, parts, there)
    cache: dict = {}
    dense, dense_key = _dense_figures(c, windows, found, t, lambda: onload.evaluate(
        lz, tok, c.eval, c.eval_seqlen, windows, p.device, c.progress, cache))
    with outdir.atomic_dir(p.out, c.overwrite, adopt=found[0] if found else None,
                           sources=pipeline.local_sources(c.model), keep=resume.kept if fp else None) as tmp:
        packer = None if c.format == "dense" or c.slicegpt else packed.PackWriter(
            tmp, c.format, p.quant, c.group_size, c.symmetric, save_dtype, p.gptq.as_dict() if p.gptq else None)
        out = None if c.slicegpt else onload.Output(lz, tmp, c.format, save_dtype, names, packer)
        checkpoints = None
        if fp:
            checkpoints = resume.Checkpoints(tmp, fp, c.checkpoint_s, len(archmod.blocks(lz.model)),
                                             found[1] if found else None)
            if dense:
                checkpoints.keep["dense"] = {"key": dense_key, "figures": dense}
        train = (lambda model, where: pipeline.recover(
            model, tok, c.recover, c.calib, c.seed + 1, p.devices, c.progress, where,
            checkpoints and checkpoints.training(c.recover.steps))) if c.recover else None
        if c.slicegpt:  # weights, config and tokenizer written as each part is done
            sec = onload_slicegpt.transform(p, lz, sliced, ids, t, tmp, tok, save_dtype, train, where, checkpoints)
        else:
            sec = onload.transform(p, lz, names, ids, t, out, tmp, train, where, checkpoints)
        m.steps = sec.pop("steps")
        for k, v in sec.items():
            setattr(m, k, v)
        if not c.slicegpt:
            with t("save_s"):
                m.format = out.outside(tok)
        m.steps += pipeline.export_steps(m.format)
        mf.write(tmp, m)  # the loader reads the format from it; rewritten below with the figures
        _measure(m, p, t, tmp, windows, cache, dense)
        _finish(m, p, t, command)
        if checkpoints is not None:
            m.resumed = checkpoints.record()
            checkpoints.close()
        if c.slicegpt:
            onload_slicegpt.remove_scratch(tmp)
        mf.write(tmp, m)
    return m


def _precheck_export(c: CompressConfig, model_config) -> None:
    """`compress --export`: the target writes this family, and GGUF the model's tokenizer.json (a GGUF source's own
    tokenizer is copied key by key), known once the config is read, before any compute."""
    if c.export:
        from . import export

        export.precheck_config(c.export, model_config)
        info = pipeline.resolve_model(c.model)
        if c.export == "gguf" and info.source not in ("alias", "gguf") and info.path \
                and (Path(info.path) / "tokenizer.json").is_file():
            from .export.gguf_tokenizer import tokenizer_kind

            tokenizer_kind(Path(info.path))


def _export_after(c: CompressConfig, out: Path, command: str | None) -> dict:
    """`compress --export`: the output just written, exported into OUT-<target> (same calibration for GPTQ)."""
    from . import export

    return export.export(out, c.export, types=c.export_types, quant=c.export_quant, calib=c.calib,
                         nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed, overwrite=c.overwrite,
                         progress=c.progress, command=command, device=c.device, hessian_gib=c.hessian_gib,
                         checkpoint_s=c.checkpoint_s)


def load(path_or_spec: str, dtype="float32", device="cpu"):
    """An llmprune output folder -> (model, tokenizer, manifest); anything --model accepts ->
    (model, tokenizer, None)."""
    p = Path(path_or_spec)
    if p.is_dir() and mf.exists(p) and mf.read(p).export:  # a folder for another engine: read as that engine's
        from . import export  # transformers reader reads it

        model, tok = export.load(p, dtype=dtype, device=device)
        return model, tok, mf.read(p).to_dict()
    if p.is_dir() and mf.exists(p):
        from . import checkpoint

        return checkpoint.load(p, dtype=dtype, device=device)
    model, tok, _ = pipeline.load_model(path_or_spec, dtype=dtype, device=device)
    return model, tok, None


def evaluate(target: str, ppl: tuple[str, ...] = ("wikitext2",), seqlen: int = 2048, windows: int | None = None,
             device: str | None = None, progress: bool = True, save: bool = True, tasks: tuple[str, ...] = (),
             limit: int | None = None, tasks_dir: str | None = None, batch_size: int = 8,
             dtype: str | None = None, command: str | None = None) -> dict:
    """Perplexity and zero-shot accuracy of an output folder (results merged into its manifest) or
    of any model spec. dtype None: the dtype the output was computed in (its manifest), so this
    measures what compress recorded. Each figure records how it was measured (dtype, device, versions and
    `command`, the CLI line, which the model card gives beside the commands that made the folder, and the folder's
    files_stamp). A README.md card that `push` wrote is rewritten with the new figures (hub.refresh_card).
    Returns {"eval": {dataset: ...}, "zeroshot": {task: ...}}, and "card": what became of such a card."""
    windows = check_eval(ppl, seqlen, windows, "--ppl")
    if dtype is not None and dtype not in DTYPES:
        raise LLMPruneError(f"--dtype {dtype!r}: use {', '.join(DTYPES)}")
    if tasks:
        from .eval import zeroshot

        tasks = zeroshot.check(tasks, limit, "--limit")
    is_output = Path(target).is_dir() and mf.exists(target)
    old = mf.read(target) if is_output else None
    to = old.export_target if old is not None else None
    if to:  # read by another engine's loader, not llmprune's
        from .export.gguf_arch import READ_BY_TRANSFORMERS

        kind = (old.export or {}).get("model_type")
        if to == "gguf" and kind is not None and kind not in READ_BY_TRANSFORMERS:
            raise LLMPruneError(f"{target} is a GGUF export of a {kind} model, which llmprune eval does not read "
                                f"(nor transformers): measure it with llama.cpp (llama-perplexity -m FILE.gguf -f "
                                f"wiki.test.raw)")
        how = old.command or f"llmprune export {old.exported_from} --to {to} --out {target}"
        raise LLMPruneError(f"{target} is an export for another engine ({to}), which llmprune eval does not read: "
                            f"measure it as transformers reads it by running its command again with --eval "
                            f"wikitext2 --overwrite ({how})")
    if is_output:
        from .checkpoint import require_tokenizer

        require_tokenizer(target, "eval")
        if save:  # the figures go into its manifest: refused now, not once measured
            outdir.check_writable(Path(target) / mf.NAME, "the manifest", "make the output writable: eval records "
                                  "its figures there (or use the Python API with save=False)")
    dev = pick_device(device)
    auto = CompressConfig(dtype="auto").resolved(dev).dtype  # --dtype auto: bfloat16 on CUDA, float32 on CPU
    dtype = auto if dtype == "auto" else dtype or (old.dtype if old is not None and old.dtype not in (None, "auto")
                                                   else auto)
    out: dict = {}
    if ppl:
        results = _perplexity(target, old, ppl, seqlen, windows, dev, dtype, progress)
        saved = {"measured_on": mf.SAVED, "files": mf.files_stamp(target)} if old is not None else {}
        for r in results.values():  # this run's, which the manifest's top-level fields (of the run that made it) are not
            r.update(dtype=dtype, device=dev, versions=versions(), **({"command": command} if command else {}), **saved)
        if old is not None:  # the dense reference of compress
            results = pipeline.merge_dense(results, pipeline.dense_refs(old))
        out["eval"] = results
    if tasks:
        zs = pipeline.zeroshot_saved(_folder(target, old), old.to_dict() if old is not None else {}, tasks, limit, dev,
                                     dtype, progress, batch_size, tasks_dir)
        out["zeroshot"] = {**zs, "device": dev, "versions": versions(), **({"command": command} if command else {})}
    if is_output and save:  # earlier tasks measured another way are dropped, the mean is over those listed
        zs = {"zeroshot": pipeline.merge_zeroshot(old.zeroshot, out["zeroshot"], old.conditions())} if tasks else {}
        mf.update(target, replace=("zeroshot",), **{**out, **zs})
        from . import hub

        if card := hub.refresh_card(target):  # a card push wrote shows the figures now recorded
            out["card"] = card
    return out


def _perplexity(target: str, old: mf.Manifest | None, datasets, seqlen: int, windows: int | None, device: str,
                dtype: str, progress: bool) -> dict:
    """Block by block from disk (one block in memory), unless the output only loads whole."""
    import torch

    from . import onload

    lz, tok = _walkable(target, old, dtype)
    if lz is not None:
        pipeline.check_context(lz.model, seqlen, "--seqlen")
        return onload.evaluate(lz, tok, datasets, seqlen, windows, device, progress, {})
    model, tok, _ = load(target, dtype=dtype, device=device)
    pipeline.check_context(model, seqlen, "--seqlen")
    with torch.no_grad():
        return pipeline.evaluate_model(model, tok, datasets, seqlen, windows, progress, {})


def _folder(target: str, old: mf.Manifest | None) -> Path:
    """The folder of an output, or of the model a spec names."""
    return Path(target) if old is not None else Path(pipeline.resolve_model(target).path)


def _walkable(target: str, old: mf.Manifest | None, dtype: str):
    """(a lazy.LazyModel of the output or model spec, or None when it only loads whole; its tokenizer)."""
    from transformers import AutoTokenizer

    from . import onload

    folder = _folder(target, old)
    lz, _ = onload.open_output(folder, dtype, old.to_dict() if old is not None else {})
    return lz, AutoTokenizer.from_pretrained(folder)


def _source(src: str) -> mf.Manifest:
    if not Path(src).is_dir():
        raise LLMPruneError(f"{src} is not a folder: give an llmprune output folder (made by `llmprune compress`)")
    return mf.read(src)


def _figures_of(m: mf.Manifest, src: str, here: dict) -> dict:
    """The source's own figures of these very weights (measured on its saved folder as its files are now:
    manifest.files_stamp), where measured as this run would measure them (`here`: dataset -> seqlen, windows,
    dtype, device, versions, source; measured_alike)."""
    run, stamp = {**m.conditions(), "dtype": m.dtype or "float32"}, mf.files_stamp(src)
    return {d: r for d, now in here.items() if isinstance(r := m.eval.get(d), dict) and "ppl" in r
            and r.get("measured_on") == mf.SAVED and r.get("files") == stamp
            and pipeline.measured_alike({**run, **r}, now)}


def recover(src: str, out: str, data: str = "c4", seqlen: int = 512, seed: int = 0, nsamples: int | None = None,
            eval: tuple[str, ...] = (), eval_seqlen: int = 2048, eval_windows: int | None = None,
            device: str | None = None, overwrite: bool = False, progress: bool = True, command: str | None = None,
            dtype: str | None = None, tasks: tuple[str, ...] = (), tasks_limit: int | None = None,
            onload: str = "auto", checkpoint_s: float | None = 600.0, **perp_opts) -> dict:
    """PERP recovery of a pruned output folder into a new folder (arXiv 2312.15230). dtype: the
    weights' dtype while training (None: the one the source was compressed in). With `eval` / `tasks`,
    the new folder's perplexity / zero-shot accuracy as saved. The training commits a checkpoint every
    `checkpoint_s` seconds (None: none) into the new folder's temporary one (resume.Training): a killed
    run's next run goes on from its last one.

    onload "blocks": the placement is planned before any weight is read, every tensor goes from disk
    straight to where it trains (a GPU, or CPU memory for the blocks that stream) and the new folder
    is written block by block from there, so a model larger than CPU memory recovers on GPUs that hold
    it; "whole": the model is loaded into CPU memory first; "auto": blocks when training on a GPU and
    the folder allows, else whole."""
    import dataclasses
    from contextlib import nullcontext

    import torch

    from . import arch, checkpoint, placement, prune, resume
    from . import onload as onl
    from .eval import zeroshot
    from .recover import perp

    old = _source(src)
    if old.format_name != "dense":
        raise LLMPruneError(f"{src} is packed ({old.format_name}): recover the dense output, then pack it")
    checkpoint.require_tokenizer(src, "recover")
    outdir.check_out(out, overwrite, [src])
    from .calibration import token_file_width

    seqlen = token_file_width(data) or seqlen  # a token-id file's windows, used as they are (and planned for)
    rcfg = RecoverConfig(data=data, seqlen=seqlen, nsamples=nsamples, seed=seed, **perp_opts)
    perp.check_options(**rcfg.perp_options())
    eval_windows = check_eval(eval, eval_seqlen, eval_windows)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise LLMPruneError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    if onload not in ("auto", "blocks", "whole"):
        raise LLMPruneError(f"--onload {onload!r}: use auto, blocks or whole")
    placement.check_blocks_onload(onload)
    tasks = zeroshot.check(tasks, tasks_limit, "--tasks-limit")
    dtype = dtype or old.dtype or "float32"
    devs = pick_devices(device)
    dev = devs[0]
    t = pipeline.Timer()
    whole = onload == "whole" or (onload == "auto" and not placement.reads_to_devices(devs))
    lz, why = (None, None) if whole else onl.open_output(src, dtype, old.to_dict())
    if why and onload == "blocks":
        raise LLMPruneError(f"--onload blocks: {why}: use --onload whole (or auto)")
    if lz is None:
        model, tok, _ = checkpoint.load(src, dtype=dtype)
    else:  # on the meta device until placed
        model, tok = lz.model, checkpoint.load_tokenizer(src)
    pipeline.check_calibration(model, data, seqlen)
    if eval:
        pipeline.check_context(model, eval_seqlen, "--eval-seqlen")
    targets = prune.target_linears(model, old.ignore, bool((old.config or {}).get("prune_gates")))
    if lz is not None:  # planned (and refused) before anything is read; the adapted linears: the pruned ones
        where = onl.recover_plan(lz.model, targets, devs, rcfg)
    fp = found = None
    writes = placement.writes_output()  # (DDP: the first replica writes, the others stop after the training)
    if checkpoint_s is not None and writes:  # a killed run of the same training is taken over (DDP: the first's)
        what = {"command": "recover", **dataclasses.asdict(rcfg), "dtype": dtype, "onload": lz is not None}
        fp = resume.fingerprint(what, None, Path(src), devs, dtype)
        found = resume.find(Path(out), fp)
    parts = {"the output": sum(q.numel() for q in model.parameters()) * getattr(torch, dtype).itemsize}
    if fp:
        parts["PERP's training checkpoints"] = onl.recover_bytes(model, targets, rcfg)
    outdir.check_space(out, parts, outdir.folder_bytes(found[0]) if found else 0)
    cache: dict = {}
    before = {}
    if eval and writes:  # (DDP: the other replicas stop after the training)
        # the source's own figures where measured the same way on these weights in this dtype, else
        # measured on the source folder (block by block, as the recovered one is afterwards, so a
        # model larger than the GPU is evaluated too)
        now = {"seqlen": eval_seqlen, "windows": eval_windows, "dtype": dtype, "device": dev, "versions": versions()}
        same = _figures_of(old, src, {d: {**now, "source": where} for d, where in
                                 pipeline.eval_sources(eval, tok, cache).items()})
        todo = tuple(d for d in eval if d not in same)
        before = {**same, **(pipeline.evaluate_saved(Path(src), todo, eval_seqlen, eval_windows, dev, dtype, progress,
                                                     cache) if todo else {})}
    with outdir.atomic_dir(out, overwrite, adopt=found[0] if found else None, sources=[src],
                           keep=resume.kept if fp else None) if writes else nullcontext() as tmp:
        ck = resume.Checkpoints(tmp, fp, checkpoint_s, len(arch.blocks(model)), found[1] if found else None) \
            if fp else None
        if lz is not None:
            with t("load_s"):
                onl.load_placed(lz, devs, where)
        pruned = perp.pruned_linears(model)
        zeros_before = {k: int((arch.get(model, k).weight == 0).sum()) for k in pruned}
        with t("recover_s"):
            info = pipeline.recover(model, tok, rcfg, data, seed, devs, progress, where if lz is not None else None,
                                    ck and ck.training(rcfg.steps))
        info["wall_s"], info["dtype"] = t.s["recover_s"], dtype
        info["onload"] = "whole" if lz is None else "blocks"
        info["zeros_unchanged"] = {k: int((arch.get(model, k).weight == 0).sum()) for k in pruned} == zeros_before
        if not writes:
            return {"recover": info, "out": None, "replica": placement.rank(), "to": str(out)}
        new = mf.derive(old, versions(), ",".join(devs), onload=info["onload"])
        new.recover, new.recovered_from = info, str(src)
        new.steps = [*old.steps, "recover"]
        if new.sparsity:
            new.sparsity = {**new.sparsity, "measured": prune.measured_sparsity(model, targets)}
        if lz is None:
            pipeline.export(model, tok, tmp, timer=t)
        else:  # block by block from where each trained
            with t("save_s"):
                onl.write_model(lz, tok, tmp, getattr(torch, dtype))
        del model
        mf.write(tmp, new)  # the loader reads it; rewritten below with the figures
        if eval:
            with t("eval_s"):
                after = pipeline.evaluate_saved(tmp, eval, eval_seqlen, eval_windows, dev, dtype, progress, cache)
            new.eval = {d: {**r, "before_recover_ppl": before[d]["ppl"]} for d, r in
                        pipeline.merge_dense(after, pipeline.dense_refs(old)).items()}
        if tasks:
            with t("zeroshot_s"):
                new.zeroshot = pipeline.zeroshot_saved(tmp, new.to_dict(), tasks, tasks_limit, dev, dtype, progress)
        new.timings = {**old.timings, "recover": t.total()}
        new.command = command
        for k, v in memory(",".join(devs)).items():  # the largest peak of the GPUs it trained on
            setattr(new, k, v)
        new.versions = versions()  # now that CUDA has run, if it did
        if ck is not None:
            new.resumed = ck.record()
            ck.close()
        mf.write(tmp, new)
    return {**new.to_dict(), "out": str(out)}


def pack(src: str, out: str, fmt: str, quant: str | None = None, group_size="auto", calib: str = "c4",
         nsamples: int | None = None, seqlen: int | None = None, seed: int = 0, overwrite: bool = False, progress: bool = True,
         command: str | None = None, save_dtype: str = "float16", grid: str = "auto", gptq: dict | None = None,
         eval: tuple[str, ...] = (), eval_seqlen: int = 2048, eval_windows: int | None = None,
         device: str | None = None, onload: str = "auto", tasks: tuple[str, ...] = (),
         tasks_limit: int | None = None, checkpoint_s: float | None = 600.0, hessian_gib: float | None = None) -> dict:
    """Pack a dense output folder (zeros in place) into a smaller format; GPTQ quantizes block by
    block on calibration data first (quant.sequential.gptq_sequential). The source stays on disk and
    is read one block at a time (onload.pack; scale tuning, --tune-steps, reads it from disk to where it
    trains: onload.gptq_tuned), unless `onload` is "whole" or the folder only loads whole. With `eval` /
    `tasks`, the packed folder's perplexity / zero-shot accuracy as saved. Block by block (scale tuning's
    training included), a checkpoint every `checkpoint_s` seconds (None: none): a killed pack goes on from its
    last one when run again (resume.py). `hessian_gib`: GiB of GPTQ's Hessians collected at once (walker.hessian_memory)."""
    from . import arch as archmod
    from . import checkpoint, formats, resume, walker
    from . import onload as onl
    from .eval import zeroshot

    old = _source(src)
    if old.format_name != "dense":
        raise LLMPruneError(f"{src} is already packed ({old.format_name}): pack the dense output it came from")
    symmetric = CompressConfig(format=fmt, grid=grid, save_dtype=save_dtype).symmetric  # checks the options
    save_dtype = "float16" if save_dtype == "auto" else save_dtype  # a packed output's default
    quant = formats.get(fmt).check_options(quant, symmetric)  # before loading anything
    gcfg = GPTQConfig.given(gptq, quant)
    check_hessian_gib(hessian_gib)
    eval_windows = check_eval(eval, eval_seqlen, eval_windows)
    if onload not in ("auto", "blocks", "whole"):
        raise LLMPruneError(f"--onload {onload!r}: use auto, blocks or whole")
    tasks = zeroshot.check(tasks, tasks_limit, "--tasks-limit")
    outdir.check_out(out, overwrite, [src])
    devs = pick_devices(device)
    t = pipeline.Timer()
    dtype = old.dtype or "float32"
    lz = why = None
    if onload != "whole":
        lz, why = onl.open_output(src, dtype, old.to_dict())
    if why:
        if onload == "blocks":
            raise LLMPruneError(f"--onload blocks: {why}: use --onload whole (or auto)")
        lz = None
    if lz is None:
        model, tok, _ = checkpoint.load(src, dtype=dtype)
    else:
        model, tok = lz.model, checkpoint.load_tokenizer(src)  # the model on the meta device
    from .packed import check_packable

    check_packable(model, fmt, group_size)  # before GPTQ's work
    if eval:
        pipeline.check_context(model, eval_seqlen, "--eval-seqlen")
    ids = cinfo = None
    nsamples, seqlen = calibration_of(old.protocol, devs[0], nsamples, seqlen)  # (the compress run's protocol)
    if quant == "gptq":
        pipeline.check_calibration(model, calib, seqlen)
        ids, cinfo = pipeline.calibrate(calib, tok, nsamples, seqlen, seed)
    # the source's quality figures describe the unpacked weights: they do not carry over
    new = mf.derive(old, versions(), ",".join(devs), onload="blocks" if lz is not None else
                    "whole" + (f": {why}" if why else ""))
    new.packed_from, new.command = str(src), command
    fp = found = None
    if lz is not None and checkpoint_s is not None:
        import torch

        recipe = {"fmt": fmt, "quant": quant, "group_size": group_size, "symmetric": symmetric, "save_dtype": save_dtype,
                  "gptq": gcfg.as_dict() if gcfg else None, "calib": calib, "nsamples": nsamples, "seqlen": seqlen,
                  "seed": seed}
        fp = resume.fingerprint(recipe, ids, lz.folder, tuple(devs), getattr(torch, save_dtype))
        found = resume.find(Path(out), fp)
    if lz is not None and gcfg and gcfg.tune_steps:  # (the packed output, smaller than its source, is not counted)
        outdir.check_space(Path(out), onl.tune_bytes(lz.model, ids, group_size, bool(fp)),
                           outdir.folder_bytes(found[0]) if found else 0)
    ck = None
    with outdir.atomic_dir(out, overwrite, adopt=found[0] if found else None, sources=[src],
                           keep=resume.kept if fp else None) as tmp:
        with walker.hessian_memory(hessian_gib):
            if lz is None:
                new.format = pipeline.export(model, tok, tmp, fmt, quant, group_size, symmetric, save_dtype, gcfg, ids,
                                             cinfo, devs[0], 8, progress, t, devs)
            else:
                import torch

                if fp:
                    ck = resume.Checkpoints(tmp, fp, checkpoint_s, len(archmod.blocks(lz.model)),
                                            found[1] if found else None)
                new.format = onl.pack(lz, tok, tmp, fmt, quant, group_size, symmetric, getattr(torch, save_dtype),
                                      gcfg, ids, cinfo, devs, 8, progress, t, ck)
        new.steps = [*old.steps, *pipeline.export_steps(new.format)]
        del model, lz
        mf.write(tmp, new)  # the loader reads the format from it; rewritten below with the figures
        if eval:
            with t("eval_s"):
                new.eval = pipeline.evaluate_saved(tmp, eval, eval_seqlen, eval_windows, devs[0], old.dtype or "float32",
                                                   progress, {})
        if tasks:
            with t("zeroshot_s"):
                new.zeroshot = pipeline.zeroshot_saved(tmp, new.to_dict(), tasks, tasks_limit, devs[0],
                                                       old.dtype or "float32", progress)
        new.timings = {**old.timings, "pack": t.total()}
        for k, v in memory(devs[0]).items():  # this command's, as its timings (the source's: its history)
            setattr(new, k, v)
        new.versions = versions()  # now that CUDA has run, if it did
        if ck is not None:
            new.resumed = ck.record()
            ck.close()
        mf.write(tmp, new)
    return {**new.to_dict(), "out": str(out)}
