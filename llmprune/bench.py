"""Decode benchmark: dense vs compressed tokens/s, effective GB/s, peak memory; kernel microbench.

Decode is memory-bound, so the number that matters is bytes of weights read per step x steps/s
(gpt-fast's "effective bandwidth"), compared with the device's bandwidth (H200: 4.8 TB/s spec;
the issue's target uses 4.3 TB/s achievable). KV-cache reads are not counted in those bytes.
Protocol: random prompt of `prompt_len` tokens, prefill, then `new_tokens` greedy decode steps with
a static KV cache; on CUDA one decode step is captured in a CUDA graph and replayed; the first
`warmup` steps are excluded; every step is timed on its own (median and p90).
A Mixture-of-Experts step reads only the experts its tokens are routed to: the timed steps are replayed
afterwards, untimed and eager, with the same input tokens and cache, counting the experts each layer hits
(`read_bytes`); its effective GB/s is the mean of those bytes over the median step time.
"""
from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from pathlib import Path

import torch

H200_SPEC_GBS = 4800.0
H200_TARGET_GBS = 4300.0
# device name -> (spec GB/s, the achievable target GB/s or None): the percentages of bandwidth are given
# only on devices listed here (a CPU's or another GPU's would be a percentage of the wrong figure)
BANDWIDTH_GBS = {"H200": (H200_SPEC_GBS, H200_TARGET_GBS), "H100 80GB HBM3": (3350.0, None)}


def bandwidth(device) -> tuple[float | None, float | None]:
    """(spec, target) GB/s of `device` where BANDWIDTH_GBS knows it, else (None, None)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((bw for key, bw in BANDWIDTH_GBS.items() if key in name), (None, None))

LLAMA_SHAPES = {  # name -> (out, in) of the fused linears
    "7b.qkv": (12288, 4096), "7b.o": (4096, 4096), "7b.gate_up": (22016, 4096), "7b.down": (4096, 11008),
    "70b.qkv": (10240, 8192), "70b.o": (8192, 8192), "70b.gate_up": (57344, 8192), "70b.down": (8192, 28672),
}


def _load(model, dtype, device):
    """An nn.Module, an llmprune output folder (packed or dense), or a model spec for models.load."""
    if isinstance(model, torch.nn.Module):
        return model.to(device).eval()
    p = Path(str(model))
    if (p / "llmprune.json").is_file():
        from llmprune import checkpoint
        from llmprune import manifest as mf
        from llmprune.errors import LLMPruneError

        m = mf.read(p)
        to = m.export_target
        if to:  # another engine's files: llmprune's runtime would not be what is timed
            raise LLMPruneError(f"{p} is an export for another engine ({to}), which llmprune bench does not time: "
                                f"bench the llmprune output it came from ({m.exported_from}), or time the export "
                                f"where it is served (vLLM, SGLang, llama.cpp)")
        return checkpoint.load(p, dtype=dtype, device=device)[0]
    from llmprune import models

    return models.load(str(model), dtype=dtype, device=device)[0]


def load_bytes(spec, dtype: torch.dtype) -> int | None:
    """The bytes `_load` puts in memory for the weights of `spec` (an llmprune output folder or a model spec), from
    its safetensors headers before any weight is read: floating-point tensors in `dtype`, the others (packed codes)
    as stored. None for an nn.Module, or a spec without safetensors files."""
    import math

    from llmprune import lazy

    if isinstance(spec, torch.nn.Module):
        return None
    p = Path(str(spec))
    if not (p / "llmprune.json").is_file():
        from llmprune import models

        p = Path(models.resolve(str(spec)).path)
    files = lazy.model_files(p)  # (the files transformers reads: not a consolidated.safetensors beside them)
    total = 0
    for f in files:
        head, _ = lazy.safetensors_header(f)
        for name, e in head.items():
            if name != "__metadata__":
                t = lazy.ST_DTYPES[e["dtype"]]
                total += math.prod(e["shape"]) * (dtype.itemsize if t.is_floating_point else t.itemsize)
    return total if files else None


def check_fits(label: str, spec, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse in one line, before any weight is read, a model whose weights alone take more than the GPU's free
    memory (a 70B dense model in fp16 is 140 GB: read whole into CPU memory first, then out of memory on the GPU)."""
    from llmprune.errors import LLMPruneError

    if device.type != "cuda":
        return
    need = load_bytes(spec, dtype)
    free = torch.cuda.mem_get_info(device)[0]
    if need is not None and need > free:
        fix = "drop --dense (the compressed model is timed alone)" if label == "dense" else "bench it on a larger GPU"
        raise LLMPruneError(f"{'--dense ' if label == 'dense' else ''}{spec}: its weights take {need / 2**30:.1f} GiB "
                            f"in {str(dtype).replace('torch.', '')}, more than the {free / 2**30:.1f} GiB free on "
                            f"{device}: {fix}")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter/buffer once (tied ones once), minus
    input embeddings not shared with the output head (a step reads only its tokens' rows) and
    rotary tables (not weights)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    skip = set()
    if emb is not None and (head is None or head.weight.data_ptr() != emb.weight.data_ptr()):
        skip.add(emb.weight.data_ptr())
    skip |= {t.data_ptr() for n, t in model.named_buffers() if "rotary" in n or n.endswith("inv_freq")}
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in skip:
            skip.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    """Restart the peak-memory count, so that the next _peak_mib is this run's: the CUDA allocator's
    peak, or on CPU the process's resident peak after handing freed heap back to the OS (else a model
    measured earlier in the same process would count in the next one's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    import gc

    from .runinfo import reset_peak_rss, trim_heap

    gc.collect()
    trim_heap()
    reset_peak_rss()


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from .runinfo import peak_rss_mib

    return peak_rss_mib()


def expert_bytes(model: torch.nn.Module) -> dict[torch.nn.Module, list[int]]:
    """{experts module: the bytes of each expert's weights} for every experts module of `model`: a fused one
    (3-D parameters, (experts, ...)) or a packed one (moe.SplitExperts: each expert's own tensors)."""
    from . import moe

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    out = {}
    for m in model.modules():
        if isinstance(m, moe.SplitExperts):
            out[m] = [nbytes([*ex.parameters(), *ex.buffers()]) for ex in m]
        elif moe.is_fused_experts(m):
            n = moe.num_experts(m)
            out[m] = [nbytes(t[0] for t in m.parameters(recurse=False) if t.shape[0] == n)] * n
    return out


@contextlib.contextmanager
def counting_reads(model: torch.nn.Module):
    """Inside the `with`, a list that gets, per call of `step` (`reads.step(fn)`), the weight bytes that call
    read: every weight but the experts (weight_bytes), plus the experts each experts module was routed to."""
    from . import moe

    sizes = expert_bytes(model)
    base = weight_bytes(model) - sum(sum(v) for v in sizes.values())
    hit: list[int] = []

    def hook(mod, args, kwargs, out):
        hidden, index = moe.routing(args, kwargs)
        n = len(sizes[mod])  # dense dispatch (Llama 4): the fused module reads every expert, the packed ones those hit
        hit.append(sum(sizes[mod][e] for e in (range(n) if index is None and moe.is_fused_experts(mod)
                                                else moe.experts_hit(hidden, index, n))))

    class Reads(list):
        def step(self, fn):
            hit.clear()
            fn()
            self.append(base + sum(hit))

    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in sizes]
    try:
        yield Reads()
    finally:
        for h in hooks:
            h.remove()


def bytes_per_step(r: dict, wbytes: int) -> int:
    """The weight bytes a timed step of decode_steps' result `r` read: `wbytes` (all of them), or the mean over
    the timed steps of what they read (a Mixture-of-Experts model: `read_bytes`)."""
    return round(statistics.mean(r["read_bytes"])) if r.get("read_bytes") else wbytes


@torch.no_grad()
def decode_steps(model, batch: int, prompt_len: int, new_tokens: int, device, warmup: int = 3,
                 cuda_graphs: bool = True, seed: int = 0, step_model=None, profile: bool = False) -> dict:
    """Per-step decode latencies (ms) after a prefill, static KV cache, CUDA graph when possible.
    `step_model`: what runs the decode steps (e.g. a torch.compile'd model), default `model`.
    `profile`: also the kernels of one step (`profile_step`), under "profile". A model with experts: the
    weight bytes each timed step read, under "read_bytes" (the steps replayed untimed, eager, with their inputs)."""
    from transformers import StaticCache

    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + warmup)
    pos = torch.arange(prompt_len, device=device)
    # the cache argument: `cache` in newer transformers (5.25 here), `past_key_values` before (gone in 5.40)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(input_ids=ids, **{kw: cache}, cache_position=pos, use_cache=True).logits
    tok = logits[:, -1:].argmax(-1)  # (batch, 1) static input of the decode step
    cpos = torch.tensor([prompt_len], device=device)  # updated in place: graph replays read it
    # transformers' static layers write at their own running counter, not at cache_position (5.17+):
    # every step, the warm-up and capture steps included, advances it; so each step is put back at
    # its position (in place, so a graph replay reads it), else the extra steps run past the cache
    counters = [c for c in (getattr(layer, "cumulative_length", None) for layer in getattr(cache, "layers", ()))
                if torch.is_tensor(c)]

    def seek(p: int) -> None:
        cpos.fill_(p)
        for c in counters:
            c.fill_(p)

    stepper = model if step_model is None else step_model

    def step():
        out = stepper(input_ids=tok, **{kw: cache}, cache_position=cpos, use_cache=True).logits
        return out[:, -1:].argmax(-1)

    graph, note = None, "eager"
    cuda = device.type == "cuda"
    s = torch.cuda.Stream(device) if cuda else None
    if cuda:
        s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s) if cuda else contextlib.nullcontext():  # warm-up on a side stream, as capture requires
        for _ in range(2):
            seek(prompt_len)
            step()
    if cuda:
        torch.cuda.current_stream(device).wait_stream(s)
    if cuda_graphs and cuda:
        try:
            graph = torch.cuda.CUDAGraph()
            seek(prompt_len)
            with torch.cuda.graph(graph):
                nxt = step()
            note = "cuda_graph"
        except Exception as e:  # noqa: BLE001  a model that cannot be captured still gets an (eager) number
            graph, note = None, f"eager (CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]})"
            torch.cuda.synchronize(device)
    # the warm-up/capture steps above wrote cache slots at prompt_len; the timed steps overwrite them
    times, toks = [], [tok.clone()]
    for i in range(warmup + new_tokens):
        seek(prompt_len + i)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            if graph is not None:
                graph.replay()
                tok.copy_(nxt)
            else:
                tok.copy_(step())
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            tok.copy_(step())
            ms = (time.perf_counter() - t0) * 1e3
        toks.append(tok.clone())
        if i >= warmup:
            times.append(ms)
    out = {"ms": times, "mode": note, "prompt": ids.cpu(), "tokens": torch.cat(toks, 1).cpu()}
    if has_experts(model):  # after the timed steps: the hooks' host synchronizations cannot touch them
        with counting_reads(model) as reads:
            for i in range(warmup, warmup + new_tokens):
                seek(prompt_len + i)
                tok.copy_(toks[i])  # step i's input: the cache holds what the timed step i saw
                reads.step(lambda: model(input_ids=tok, **{kw: cache}, cache_position=cpos, use_cache=True))
        out["read_bytes"] = list(reads)
    if profile:  # after the timed steps, so that the profiler cannot touch the capture or the timings
        seek(prompt_len)
        try:
            out["profile"] = profile_step(step, device)
        except Exception as e:  # noqa: BLE001  a profiler that fails must not cost the timing
            out["profile"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def profile_step(step, device, top: int = 15) -> dict:
    """The kernels one call of `step` launches, run eagerly under torch.profiler: how many, their summed
    time (GPU-busy ms) and the costliest by name. Set against the CUDA-graph step time, busy time is
    what the kernels take and the rest is the gaps between them. On CPU (dry runs): top-level ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        evs = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        evs = [e for e in p.events() if e.cpu_parent is None]
    by_name: dict[str, list] = {}
    for e in evs:
        c = by_name.setdefault(e.name[:100], [0, 0.0])
        c[0] += 1
        c[1] += e.time_range.elapsed_us() / 1e3
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"n_kernels": len(evs), "busy_ms": sum(c[1] for c in by_name.values()),
            "top": [{"name": n, "count": c, "ms": ms} for n, (c, ms) in ranked[:top]],
            "what": "GPU kernels of one eager step" if cuda else "top-level CPU ops of one step"}


def _pct(gbs: float | None, ref: float | None) -> float | None:
    return None if gbs is None or ref is None else 100 * gbs / ref


def _summary(times: list[float], batch: int, wbytes: int | None, bw: tuple = (None, None)) -> dict:
    """wbytes: the weight bytes one step reads (bytes_per_step); None when unknown: no GB/s is given. bw: the
    device's (spec, target) GB/s (`bandwidth`)."""
    med = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    gbs = None if wbytes is None else wbytes / (med / 1e3) / 1e9  # weights are read once per step, whatever the batch
    return {"ms_per_step_median": med, "ms_per_step_p90": p90, "tokens_per_s": batch * 1e3 / med,
            "effective_GBps": gbs, "pct_of_spec_bw": _pct(gbs, bw[0]), "pct_of_target_bw": _pct(gbs, bw[1])}


def has_experts(model: torch.nn.Module) -> bool:
    """Whether a decode step reads only some of the weights (the experts its tokens are routed to)."""
    from . import moe

    return any(moe.is_fused_experts(m) or isinstance(m, moe.SplitExperts) for m in model.modules())


def run_bench(model, dense_model=None, batches=(1, 16), prompt_len: int = 128, new_tokens: int = 128,
              device: str | None = None, dtype=None, warmup: int = 3, cuda_graphs: bool = True,
              compile: bool = False, profile: bool = False) -> dict:
    """End-to-end decode of `model` (and `dense_model` if given): one row per (model, batch).
    compile: the decode step through torch.compile (fuses the norms, rotary and residual adds; the
    packed linears stay llmprune's custom ops), then captured in the CUDA graph as usual.
    profile: the kernels of one step at the first batch (`profile_step`), in that row's "profile"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    rows, routed, bw = [], False, bandwidth(device)
    for label, spec in (("dense", dense_model), ("compressed", model)):
        if spec is None:
            continue
        check_fits(label, spec, dtype, device)
        m = _load(spec, dtype, device)
        ctx = getattr(m.config, "max_position_embeddings", None)
        if ctx and prompt_len + new_tokens > ctx:  # (past it: an index error in OPT, positions never trained in others)
            from .errors import LLMPruneError

            raise LLMPruneError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} is longer than {label}'s "
                                f"context ({ctx} tokens): use a total of {ctx} or less")
        wb = weight_bytes(m)
        routed = routed or has_experts(m)
        step_model = torch.compile(m) if compile else None
        for b in batches:
            _reset_peak(device)
            r = decode_steps(m, b, prompt_len, new_tokens, device, warmup, cuda_graphs, step_model=step_model,
                             profile=profile and b == batches[0])
            rb = bytes_per_step(r, wb)
            rows.append({"model": label, "batch": b, "weight_bytes": wb, "read_bytes_per_step": rb,
                         "mode": r["mode"] + (" + torch.compile" if compile else ""),
                         **_summary(r["ms"], b, rb, bw), "peak_mem_MiB": _peak_mib(device),
                         **({"profile": r["profile"]} if "profile" in r else {})})
        del m, step_model
        if compile:
            torch._dynamo.reset()
        _reset_peak(device)  # frees the model just measured before the next one loads
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "models": {"compressed": str(model), "dense": None if dense_model is None else str(dense_model)},
           "dtype": str(dtype).replace("torch.", ""), "prompt_len": prompt_len, "new_tokens": new_tokens,
           "context_len": prompt_len + new_tokens, "warmup_steps": warmup, "rows": rows,
           "bandwidth_reference_GBps": dict(zip(("spec", "target"), bw)),
           "notes": "effective_GBps = weight bytes read per step / median step time; KV-cache reads excluded"
                    + ("; a Mixture-of-Experts step reads only the experts its tokens are routed to: "
                       "read_bytes_per_step is the mean over the timed steps, replayed untimed to count them "
                       "(weight_bytes counts every expert)" if routed else "")}
    dense = {r["batch"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        if r["model"] == "compressed" and r["batch"] in dense:
            r["speedup_vs_dense"] = dense[r["batch"]]["ms_per_step_median"] / r["ms_per_step_median"]
    return out


# --- kernel microbenchmark -----------------------------------------------------------------------

def random_packed(fmt: str, out: int, n_in: int, dtype=torch.float16, device="cpu", seed: int = 0) -> dict:
    """Valid packed tensors of a random weight, built directly by the format (packing a 28672 x 8192
    weight just to time it would dominate the benchmark)."""
    from .formats import get

    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed)  # generated where used: 70B shapes are large
    return get(fmt).random(out, n_in, dtype, device, g)


def _time(fn, device, reps: int, flush) -> float:
    """Median ms of fn() over reps, L2 flushed before each run on CUDA."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def kernel_microbench(shapes: dict | None = None, Ms=(1, 2, 4, 8, 16, 512),
                      formats: tuple[str, ...] | None = None, device: str | None = None,
                      dtype=None, reps: int = 20) -> list[dict]:
    """ms of ops.linear per (shape, M, format) vs dense F.linear (and 2:4 to_sparse_semi_structured
    on CUDA), with effective GB/s of the bytes each reads."""
    import torch.nn.functional as F

    from llmprune.kernels import ops

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    shapes = shapes or LLAMA_SHAPES
    if formats is None:
        from .formats import names

        formats = tuple(names())
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    rows = []
    for name, (out, n_in) in shapes.items():
        w = (torch.randn(out, n_in, device=device) * 0.02).to(dtype)
        semi = None
        if device.type == "cuda" and "sparse24" in formats:
            try:
                from torch.sparse import to_sparse_semi_structured

                w24 = w.view(out, n_in // 4, 4).clone()
                w24[..., 2:] = 0  # any valid 2:4 mask times the same
                semi = to_sparse_semi_structured(w24.view(out, n_in))
            except Exception as e:  # noqa: BLE001  older GPUs / builds without cuSPARSELt or CUTLASS 2:4
                semi = f"unavailable: {type(e).__name__}"
        packs = {f: random_packed(f, out, n_in, dtype, device) for f in formats}
        for M in Ms:
            x = torch.randn(M, n_in, device=device).to(dtype)
            dense_ms = _time(lambda: F.linear(x, w), device, reps, flush)  # noqa: B023  called at once
            base = {"shape": name, "out": out, "in": n_in, "M": M, "dtype": str(dtype).replace("torch.", "")}
            rows.append({**base, "format": "dense", "ms": dense_ms, "bytes": w.numel() * w.element_size(),
                         "speedup_vs_dense": 1.0})
            if semi is not None and not isinstance(semi, str):
                try:
                    ms = _time(lambda: F.linear(x, semi), device, reps, flush)  # noqa: B023
                    rows.append({**base, "format": "torch_semi_structured", "ms": ms,
                                 "bytes": w.numel() * w.element_size() * 9 // 16,
                                 "speedup_vs_dense": dense_ms / ms})
                except Exception as e:  # noqa: BLE001  recorded, not fatal
                    rows.append({**base, "format": "torch_semi_structured", "error": str(e)[:200]})
            for f, p in packs.items():
                ms = _time(lambda: ops.linear(f, x, p), device, reps, flush)  # noqa: B023
                nbytes = sum(t.numel() * t.element_size() for t in p.values())
                rows.append({**base, "format": f, "ms": ms, "bytes": nbytes, "speedup_vs_dense": dense_ms / ms})
    spec = bandwidth(device)[0]
    for r in rows:
        if "ms" in r:
            r["effective_GBps"] = r["bytes"] / (r["ms"] / 1e3) / 1e9
            r["pct_of_spec_bw"] = _pct(r["effective_GBps"], spec)
    return rows


def format_table(rows: list[dict], cols: tuple[str, ...]) -> str:
    """A plain-text table of the given columns (floats to 3 significant digits)."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)

    body = [[cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


DECODE_COLS = ("model", "batch", "mode", "ms_per_step_median", "ms_per_step_p90", "tokens_per_s",
               "effective_GBps", "pct_of_target_bw", "peak_mem_MiB", "speedup_vs_dense")
MICRO_COLS = ("shape", "M", "format", "ms", "effective_GBps", "pct_of_spec_bw", "speedup_vs_dense")


def main(argv: list[str] | None = None) -> int:
    """python -m llmprune.bench OUT [--dense MODEL] ... (the flags `llmprune bench` takes)."""
    import json

    from .errors import ArgumentParser

    ap = ArgumentParser(prog="llmprune bench", description="decode benchmark, dense vs compressed")
    ap.add_argument("model", nargs="?", help="compressed output folder (or any model spec)")
    ap.add_argument("--dense", help="dense model to compare with")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="run the decode step through torch.compile (fuses the small ops between the linears)")
    ap.add_argument("--profile", action="store_true",
                    help="also list the kernels of one decode step at the first batch (count, busy ms, costliest)")
    ap.add_argument("--kernels", action="store_true", help="also run the kernel microbenchmark")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    from . import outdir
    from .errors import LLMPruneError
    from .runinfo import pick_device, versions

    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        batches = [0]
    if min(batches) < 1:
        raise LLMPruneError(f"--batch {a.batch!r}: positive whole numbers, e.g. 1,16")
    if a.prompt_len < 1 or a.new_tokens < 1:
        raise LLMPruneError("--prompt-len and --new-tokens must be >= 1")
    if not a.model and not a.kernels:
        raise LLMPruneError("nothing to time: give an output folder (or a model), or --kernels")
    a.device = pick_device(a.device)
    outdir.check_file_out(a.json, "--json")
    dtype = getattr(torch, a.dtype) if a.dtype else None
    res = {}
    if a.model:
        res["decode"] = run_bench(a.model, a.dense, batches, a.prompt_len,
                                  a.new_tokens, a.device, dtype, cuda_graphs=not a.no_cuda_graphs,
                                  compile=a.compile, profile=a.profile)
        d = res["decode"]
        print(f"decode on {d['device']} ({d['dtype']}), context {d['context_len']} "
              f"(prompt {d['prompt_len']} + {d['new_tokens']} new)")
        print(format_table(d["rows"], DECODE_COLS))
        for r in d["rows"]:
            if "profile" in r and "error" not in r["profile"]:
                p = r["profile"]
                print(f"{r['model']} batch {r['batch']}, {p['what']}: {p['n_kernels']}, "
                      f"{p['busy_ms']:.3f} ms busy; costliest: "
                      + ", ".join(f"{t['name'][:40]} x{t['count']} {t['ms']:.3f} ms" for t in p["top"][:5]))
    if a.kernels:
        res["kernels"] = kernel_microbench(device=a.device, dtype=dtype)
        print(format_table(res["kernels"], MICRO_COLS))
    if a.json:  # with what ran it: the command, the machine and the software
        import shlex
        import sys

        dev = torch.device(a.device)
        res["run"] = {"command": shlex.join(["llmprune", "bench", *(sys.argv[1:] if argv is None else argv)]),
                      "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                      "threads": torch.get_num_threads(), "versions": versions()}
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
