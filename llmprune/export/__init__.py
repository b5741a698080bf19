"""Export an llmprune output to a format other engines serve: one file per target.

    compressed_tensors.py   pack-quantized W4A16 (vLLM, SGLang; transformers decompresses it)
    gguf.py                 GGUF F16/BF16/Q8_0/Q4_0/... with the tokenizer and chat template (llama.cpp, Ollama):
                            the writer; gguf_arch.py each family as llama.cpp reads it, gguf_tensors.py each
                            tensor's layout, gguf_tokenizer.py the tokenizer

    export(src, to, out)    open the source (source.py: refusals, dense weights, int4 codes) -> check the
                            target's options -> [quantize unquantized sources: RTN or GPTQ for
                            compressed-tensors, GPTQ into GGUF's block types] -> write into a temporary
                            sibling -> manifest (llmprune.json with an "export" section) -> [perplexity
                            through the target's independent reader] -> rename

`llmprune.export(...)` calls `export`: this package is callable (see the end of the file), because
importing `llmprune.export.gguf` makes the attribute `llmprune.export` this module.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

from ..errors import LLMPruneError

TARGETS = ("compressed-tensors", "gguf")


def _target(to: str):
    if to == "compressed-tensors":
        from . import compressed_tensors as t
    elif to == "gguf":
        from . import gguf as t
    else:
        raise LLMPruneError(f"unknown export target {to!r}: choose {' or '.join(TARGETS)}")
    return t


def precheck(to: str, types=("f16",), quant: str | None = None, slicegpt=None) -> None:
    """What `compress --export` can check before it computes: the target, its package, GGUF types, its quantizer,
    and a SliceGPT recipe no engine can express (residual shortcuts: export/source.py refuses the output)."""
    t = _target(to)
    t.require()
    if to == "gguf":
        types = t.parse_types(types)
        if quant is not None:
            t.check_quant_options(quant, "auto", "auto", types)
    if slicegpt is not None and not (slicegpt.rotation == "shared" and slicegpt.slice_head):
        raise LLMPruneError("--export: a SliceGPT output with residual shortcuts (--rotation per-block, or shared "
                            "without --slice-head) has no stock architecture an engine reads: add --rotation shared "
                            "--slice-head, or drop --export")


def precheck_config(to: str, cfg) -> None:
    """What `compress --export` can check once the model's config is read, before it computes: whether the
    target writes this family (GGUF's architectures, what llama.cpp assumes; compressed-tensors' MoE)."""
    _target(to).check_config(cfg)


def default_out(src: str | Path, to: str) -> Path:
    src = Path(src).resolve()  # ("." names no folder: its own name does)
    return src.with_name(f"{src.name}-{to}")


def export(src: str | Path, to: str, out: str | Path | None = None, *, quant: str | None = None,
           group_size: int | str = "auto", grid: str = "auto", types: tuple[str, ...] | str | None = None,
           save_dtype: str = "float16", calib: str = "c4", nsamples: int | None = None, seqlen: int | None = None,
           seed: int = 0,
           gptq: dict | None = None, eval: tuple[str, ...] = (), eval_seqlen: int = 2048,
           eval_windows: int | None = None, device: str | None = None, overwrite: bool = False,
           progress: bool = True, command: str | None = None, hessian_gib: float | None = None,
           checkpoint_s: float | None = None) -> dict:
    """Write the llmprune output `src` as `to` ("compressed-tensors" or "gguf") into `out` (default:
    `<src>-<to>`). compressed-tensors: int4 sources keep their codes; dense and sparse24 sources are
    quantized on export (quant rtn|gptq, group_size, grid sym|asym|auto, GPTQ's calibration options).
    gguf: `types` (e.g. "f16,q8_0"; default f16, q4_0 with quant) are written as one file each; quant gptq:
    GPTQ's int4 codes (group_size 32/64/128, auto 32; grid sym or asym) as the block types' codes. `eval`:
    perplexity of the export read back by transformers (not llmprune's loader). `hessian_gib`: GiB of GPTQ's
    Hessians collected at once (walker.hessian_memory). `checkpoint_s`: compressed-tensors' GPTQ pass from disk
    (and its scale tuning) commits a checkpoint every so many seconds (None: none), and a killed export of the same
    recipe goes on from its last one (resume.py). Returns the export's manifest with `out`."""
    import torch

    from .. import manifest as mf
    from .. import onload, outdir, pipeline, resume, walker
    from ..config import calibration_of, check_eval, check_hessian_gib
    from ..pipeline import Timer
    from ..runinfo import check_memory, memory, pick_device, versions
    from .source import Weights, open_source

    timer = Timer()
    dev = pick_device(device)
    s = open_source(src)
    t = _target(to)
    t.require()
    out = Path(out) if out is not None else default_out(src, to)
    eval_windows = check_eval(eval, eval_seqlen, eval_windows)
    types = types or (("q4_0",) if quant else ("f16",))
    opts = _check(s, t, to, quant, group_size, grid, types, save_dtype, gptq)
    check_hessian_gib(hessian_gib)
    outdir.check_out(out, overwrite, [src])
    weights = Weights(s)  # one decoder block at a time (scale tuning: read to where it trains)
    if eval:
        pipeline.check_context(weights.model, eval_seqlen, "--eval-seqlen")
        if to == "gguf":
            from .gguf_arch import check_readable

            check_readable(weights.model.config)
    edtype = s.manifest.dtype if s.manifest.dtype not in (None, "auto") else "float32"
    if eval:  # transformers reads the whole export to measure it: refused now, not once the export is written
        gguf = to == "gguf"  # transformers dequantizes a GGUF file whole, in CPU memory, in float32
        need = sum(p.numel() for p in weights.model.parameters()) * (4 if gguf else getattr(torch, edtype).itemsize)
        check_memory(need, "cpu" if gguf else dev, "--eval (transformers reads the whole export" +
                     (", dequantized to float32 in CPU memory)" if gguf else f" in {edtype})"),
                     "drop --eval, or export on a machine with more memory", offload=not gguf)
    new = mf.derive(s.manifest, versions(), dev, format=None, onload="blocks" if weights.lazy is not None else
                    "whole: the checkpoint stores tensors under names transformers converts at load")
    new.exported_from, new.command = str(src), command
    steps = []
    calibration = fp = found = ck = None
    gptq_from_disk = opts.get("quant") == "gptq" and weights.lazy is not None
    nsamples, seqlen = calibration_of(s.manifest.protocol, dev, nsamples, seqlen)  # (the compress run's protocol)
    if opts.get("quant") == "gptq":
        pipeline.check_calibration(weights.model, calib, seqlen)
        calibration = pipeline.calibrate(calib, weights.tok, nsamples, seqlen, seed)
    if gptq_from_disk and checkpoint_s is not None and to == "compressed-tensors":  # GPTQ's pass commits checkpoints;
        # a killed run's is taken over (a GGUF file is written in one go: a killed GGUF export starts over)
        recipe = {"to": to, "group_size": group_size, "symmetric": opts["symmetric"], "save_dtype": save_dtype,
                  "gptq": opts["gptq"].as_dict(), "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        fp = resume.fingerprint(recipe, calibration[0], s.folder, (dev,), getattr(torch, save_dtype))
        found = resume.find(out, fp)
    if gptq_from_disk and opts["gptq"].tune_steps:  # GPTQ's codes and the tuning's checkpoints (the export: int4)
        outdir.check_space(out, onload.tune_bytes(weights.model, calibration[0], group_size, bool(fp)),
                           outdir.folder_bytes(found[0]) if found else 0)
    with outdir.atomic_dir(out, overwrite, sources=[src], adopt=found[0] if found else None,
                           keep=resume.kept if fp else None) as tmp:
        if fp:
            from ..arch import blocks

            ck = resume.Checkpoints(tmp, fp, checkpoint_s, len(blocks(weights.model)), found[1] if found else None)
        with timer("write_s"), walker.hessian_memory(hessian_gib):
            if to == "compressed-tensors":
                w = t.Writer(tmp, getattr(torch, save_dtype))
                qinfo = _write_ct(s, weights, w, opts["quant"], group_size, opts["symmetric"], calibration,
                                  opts["gptq"], dev, progress, ck)
                steps += ["quantize"] if opts["quant"] else []
                section = w.finish(weights.model, weights.tok)
                if qinfo:
                    section["quant"] = qinfo
            else:
                quantize = qinfo = None
                if opts.get("quant"):  # GPTQ's codes straight into the block types
                    qinfo = {"quant": opts["quant"], "group_size": opts["group_size"], "symmetric": opts["symmetric"],
                             "calibration": calibration[1], **opts["gptq"].as_dict()}
                    quantize = _gguf_gptq(weights, calibration[0], opts["group_size"], opts["symmetric"],
                                          opts["gptq"], dev, progress, qinfo)
                    steps += ["quantize"]
                section = t.write(weights, tmp, opts["types"], s, progress=progress, quantize=quantize)
                if qinfo:
                    section["quant"] = qinfo
        section["source_format"] = s.describe()
        new.export, new.steps = section, [*s.manifest.steps, *steps, "export"]
        del weights
        mf.write(tmp, new)
        if eval:
            with timer("eval_s"):
                new.eval = evaluate(tmp, eval, eval_seqlen, eval_windows, progress, dev, edtype)
        new.timings = {**(s.manifest.timings or {}), "export": timer.total()}  # the source's, and this command's
        for k, v in memory(dev).items():  # this command's (the source's: its history)
            setattr(new, k, v)
        new.versions = versions()  # now that CUDA has run, if it did
        if ck is not None:
            new.resumed = ck.record()
            ck.close()
        mf.write(tmp, new)
    return {**new.to_dict(), "out": str(out)}


def _check(s, t, to, quant, group_size, grid, types, save_dtype, gptq) -> dict:
    """Every option checked before the model is loaded (the evaluation's: config.check_eval)."""
    from ..config import GPTQConfig

    if grid not in ("auto", "sym", "asym"):
        raise LLMPruneError(f"--grid {grid!r}: use sym, asym or auto")
    if save_dtype not in ("float16", "bfloat16", "float32"):
        raise LLMPruneError(f"--save-dtype {save_dtype!r}: use float16, bfloat16 or float32")
    # compressed-tensors' W4A16 is symmetric, and transformers (5.25, compressed-tensors 0.20) cannot load an
    # asymmetric pack-quantized checkpoint (weight_zero_point size mismatch): auto means symmetric here
    symmetric = True if grid == "auto" else grid == "sym"
    if to == "gguf":
        types = t.check(s, types)
        if quant is None:
            if grid != "auto" or group_size != "auto" or any(v is not None for v in (gptq or {}).values()):
                raise LLMPruneError("--grid / --group-size / GPTQ options quantize a GGUF export with --quant gptq: "
                                    "add it, or drop them (GGUF's types then round the weights themselves)")
            return {"types": types}
        group_size, symmetric = t.check_quant(s, quant, group_size, grid, types)
        cfg = GPTQConfig.given(gptq, quant)
        if cfg.tune_steps:
            raise LLMPruneError("--tune-steps with --to gguf: tune the scales when packing (llmprune pack SRC "
                                "--format w4g128 --grid sym --group-size 32 --quant gptq --tune-steps N), then "
                                "export that output")
        return {"types": types, "quant": quant, "group_size": group_size, "symmetric": symmetric, "gptq": cfg}
    q = t.check(s, quant, group_size, None if grid == "auto" else symmetric)
    return {"quant": q, "symmetric": symmetric, "gptq": GPTQConfig.given(gptq, q)}


def _write_ct(s, weights, w, quant, group_size, symmetric, calibration, gcfg, device, progress,
              checkpoints=None) -> dict:
    """Every tensor of the source into the compressed-tensors Writer `w`, one decoder block in memory at a
    time, under the names the checkpoint stores them (a Mixture-of-Experts block's experts one linear per
    expert: source.Weights.as_stored): int4 sources' linears as their stored codes; dense and sparse24 ones
    quantized here (RTN per layer, or GPTQ's block-sequential pass on `calibration`, (token ids, its record),
    each block written as it is done; `checkpoints`, resume.Checkpoints: that pass, or GPTQ and its scale
    tuning, commit checkpoints, or go on from a killed run's). Returns what quantizing recorded ({} for int4
    sources)."""
    import torch

    from .. import formats
    from ..quant.rtn import rtn
    from .source import stored_code

    layers = weights.linear_like()

    def put(triples, code_of):  # code_of(layer, weight) -> its codes, or None: stored as it is
        for key, t, mem in triples:
            layer = mem.removesuffix(".weight") if mem.endswith(".weight") else None
            q = code_of(layer, t) if layer is not None else None
            expert = layer is not None and ".experts[" in layer
            if q is not None:
                w.linear(key.removesuffix(".weight"), q, expert=expert)
            else:
                w.tensor(key, t, layer=layer is not None and layer in layers, expert=expert)

    if quant is None:
        put(weights.stored_tensors(), lambda name, t: stored_code(s, name, t))
        return {}
    f = formats.get("w4g128")  # dense int4 groups: the grid, defaults and layer checks of llmprune's own w4g128
    base = f.options(group_size, symmetric)
    targets = set(weights.targets())
    if any(".experts[" in n for n in targets):  # one scheme for every layer (vLLM's MoE), known before any work
        from .. import arch
        from .compressed_tensors import moe_group

        group_size = moe_group({arch.target(weights.model, n).weight.shape[1] for n in targets}, group_size)
        base = f.options(group_size, symmetric)
    info = {"quant": quant, "group_size": group_size, "symmetric": base["symmetric"]}
    if quant == "rtn":

        def rtn_code(name, t):
            if name not in targets:
                return None
            t = t.detach().to(torch.float16).float()  # what fp16 storage holds
            opts = f.layer_options(base, t.shape[1])
            if t.shape[1] % opts["group_size"]:
                return None  # left dense (listed in the export's ignore)
            return rtn(t, t != 0, opts["group_size"], opts["symmetric"])

        put(weights.stored_tensors(), rtn_code)
        return info
    from ..quant.sequential import gptq_sequential

    ids, info["calibration"] = calibration
    qinfo: dict = {}
    run = dict(device=device, progress=progress, dtype=torch.float16, info=qinfo, **gcfg.as_dict())

    def write(i, block, codes):  # decoder block i once GPTQ (and the tuning) is done: its tensors, its layers' codes
        with w.out.unit():  # (its files end with it)
            put(weights.as_stored(block.state_dict(prefix=f"{weights.blocks()}.{i}.")), lambda name, t: codes.get(name))

    if weights.lazy is None and gcfg.tune_steps:  # in memory (tensors stored under converted names), tuned: the
        codes = gptq_sequential(weights.model, ids, "w4g128", group_size, symmetric, **run)  # codes all at once
        put(weights.stored_tensors(), lambda name, t: codes.pop(name, None))
    else:  # each block written once GPTQ (and the tuning) is done with it: its codes alone alive
        if weights.lazy is not None and gcfg.tune_steps:
            from ..onload import gptq_tuned

            gptq_tuned(weights.lazy, ids, w.folder, "w4g128", group_size, symmetric, gcfg, 8, (device,), progress,
                       torch.float16, qinfo, write, checkpoints)
        else:
            resume = checkpoints.begin("gptq", w) if checkpoints is not None and weights.lazy is not None else None
            _gptq_blocks(weights, ids, group_size, symmetric, run, write, resume)
        put(weights.stored_tensors(blocks=False), lambda name, t: None)
    info.update(gcfg.as_dict(), **qinfo)
    return info


def _gptq_blocks(weights, ids, group_size: int | str, symmetric: bool, run: dict, done, resume=None) -> None:
    """GPTQ's block-sequential pass over the source's weights (in memory, or from disk one decoder block at a time)
    onto dense int4 groups (w4g128's grid): `done(i, block, codes)` with each decoder block, in order, once its
    weights are final (the dequantized codes), and its layers' codes ({name: quant.Quantized}), one block's alive.
    `run`: gptq_sequential's options; `resume`: its checkpoints (from disk)."""
    from .. import walker
    from ..onload import block_store
    from ..quant.sequential import gptq_sequential

    if weights.lazy is None:  # in memory; a block GPTQ hands no codes for (nothing in it to quantize) too, in order
        blocks = weights.model.get_submodule(weights.blocks())
        handed = []

        def hand(i: int, codes: dict) -> None:
            for j in range(len(handed), i + 1):
                done(j, blocks[j], codes if j == i else {})
                handed.append(j)

        gptq_sequential(weights.model, ids, "w4g128", group_size, symmetric, **run, on_block=hand)
        if handed[-1:] != [len(blocks) - 1]:
            hand(len(blocks) - 1, {})
        return
    pending: dict[int, dict] = {}  # from disk: a block's codes wait from GPTQ's pass until the walk hands it back
    with walker.onload(weights.model, block_store(weights.lazy, lambda i, b: done(i, b, pending.pop(i, {})))):
        gptq_sequential(weights.model, ids, "w4g128", group_size, symmetric, on_block=pending.__setitem__,
                        resume=resume, **run)


def _gguf_gptq(weights, ids, group_size: int, symmetric: bool, gcfg, device, progress: bool, info: dict):
    """`quantize` for gguf.write: the tensors before the decoder blocks (the embedding), each decoder block with
    its GPTQ codes as GPTQ finishes it, then the rest, in the order of `weights.keys`; what GPTQ records goes into
    `info`."""
    import torch

    inside = weights.blocks() + "."
    first = next(i for i, k in enumerate(weights.keys) if k.startswith(inside))
    before = set(weights.keys[:first])
    qinfo: dict = {}
    run = dict(device=device, progress=progress, dtype=torch.float16, info=qinfo, **gcfg.as_dict())

    def quantize(put) -> None:
        def done(i, block, codes):
            for key, t in block.state_dict(prefix=f"{inside}{i}.").items():
                put(key, t, lambda name, w: codes.get(name))

        for key, t in weights.tensors(blocks=False, only=before.__contains__):
            put(key, t, lambda name, w: None)
        _gptq_blocks(weights, ids, group_size, symmetric, run, done)
        for key, t in weights.tensors(blocks=False, only=lambda k: k not in before):
            put(key, t, lambda name, w: None)
        info.update(qinfo)

    return quantize


def evaluate(folder, datasets, seqlen: int, windows: int | None, progress: bool, device: str = "cpu",
             dtype: str = "float32") -> dict:
    """Perplexity of an export as another engine's reader sees it: transformers loads the folder
    (compressed-tensors decompressed, GGUF dequantized), llmprune only computes the protocol; in the
    dtype the source was computed in, on `device` (GPUs: placed by accelerate over all of them)."""
    from ..pipeline import evaluate_model

    model, tok = load(folder, dtype=dtype, device=device)
    res = evaluate_model(model, tok, datasets, seqlen, windows, progress, {})
    from .. import manifest as mf

    return {d: {**r, "measured_on": f"{mf.EXPORT} ({reader(folder)})", "dtype": dtype} for d, r in res.items()}


def reader(folder) -> str:
    from .. import manifest as mf

    e = mf.read(folder).export or {}
    return "gguf_file=" + e["files"][0] if e.get("to") == "gguf" else "from_pretrained"


def load(folder, dtype="float32", device="cpu"):
    """(model, tokenizer) of an export folder, read by transformers alone (GGUF: its first file)."""
    import torch
    from transformers import AutoTokenizer

    from .. import manifest as mf
    from ..models import from_pretrained, one_name_map

    folder = Path(folder)
    e = mf.read(folder).export or {}
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kw = {"gguf_file": e["files"][0]} if e.get("to") == "gguf" else {}
    on_gpu = torch.device(device).type == "cuda"
    why = e.get("note") or "check the installed compressed-tensors / gguf versions (pyproject extra export)"
    with one_name_map():  # (a GGUF's tensor names: one map, not one per submodule)
        model = from_pretrained(folder, fix=why, dtype=dt, device_map="auto" if on_gpu else None, **kw)
    model = (model if on_gpu else model.to(device)).eval()
    for p in model.parameters():  # transformers 5.17 leaves a renamed module of a quantized checkpoint (Mixtral's
        if p.is_floating_point() and p.dtype != dt:  # router) in its stored dtype, which the forward then refuses
            p.data = p.data.to(dt)
    if hasattr(model, "ct_decompress_hook"):  # compressed-tensors decompresses on the whole model's first forward
        with torch.no_grad():  # (a pre-hook); llmprune's perplexity calls model.base_model, so run that one here
            model(torch.zeros(1, 1, dtype=torch.long, device=model.device))
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    return model, tok


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
