"""End-to-end decode of a LLaMA-3-8B-shaped model with random weights: dense fp16 against the packed
formats (run by gpu_kernels.sh). Packed layers get random valid packed tensors (decode speed does
not depend on the values). Static KV cache, one decode step captured in a CUDA graph.

    python3 bench/e2e_decode.py OUT.json [--arch llama3-8b] [--layers 32] [--batch 1,16]
        [--formats sparse24,w4g128,w4s24] [--compile dense,w4s24] [--device cuda]

`--arch qwen3-30b-a3b` (Mixture-of-Experts): the dense model runs transformers' fused experts, the packed ones
one packed linear per expert's projection, stacked per projection (moe.SplitExperts, as llmprune.load runs a
packed MoE folder): decode runs each projection of every (token, expert) pair in one grouped launch, no host
synchronization, captured in the CUDA graph; a format written `w4s24:loop` runs its experts one by one instead
(the path before the grouped kernels, and prefill's). A step reads only the experts its tokens are routed to: its
effective GB/s counts those (read_bytes_per_step: the timed steps replayed untimed, llmprune.bench.decode_steps),
weight_bytes counts them all.

Per model and batch: ms per step (median, p90), tokens/s, effective GB/s (weight bytes per step x
steps/s), peak memory (each model alone: the dense decoder linears are freed before the packed models
run), and at the first batch the kernels of one step (`profile`: count, GPU-busy ms, the costliest).
Also, per format, a step of the decoder's linears alone (every linear of every layer in one CUDA
graph, nothing else): what the kernels cost inside a decode step. With
--compile, the decode step of the named models also runs through torch.compile (inductor fuses
the norms, rotary and residual adds that otherwise cost a kernel launch each; the packed linears
stay our custom ops) and is then captured in the same CUDA graph.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from llmprune.bench import (
    DECODE_COLS,
    _peak_mib,
    _reset_peak,
    _summary,
    bandwidth,
    bytes_per_step,
    decode_steps,
    format_table,
    random_packed,
    weight_bytes,
)
from llmprune.modules import PackedLinear

sys.path.insert(0, "bench")
from make_synthetic import config as arch_config


def dense_model(arch: str, layers: int | None, device: str, **over) -> torch.nn.Module:
    cfg = arch_config(arch, num_hidden_layers=layers, **over)
    dt = torch.float16 if device == "cuda" else torch.float32  # fp32: the CPU dry run
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return m.eval()


def decoder_linears(m: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) of every nn.Linear / PackedLinear inside the decoder layers."""
    return [(mod, child, lin) for name, mod in m.named_modules() if name.startswith("model.layers")
            for child, lin in mod.named_children() if isinstance(lin, (torch.nn.Linear, PackedLinear))]


def packed_copy(m: torch.nn.Module, fmt: str, device: str, grouped: str = "auto") -> torch.nn.Module:
    """A model sharing m's embeddings, norms and head, every decoder linear replaced by PackedLinear
    (m's decoder linears are not read: they may already be dropped, see `drop_linears`); a Mixture-of-Experts
    model's fused experts become moe.SplitExperts (one packed linear per expert's projection, stacked per
    projection, as llmprune.load builds a packed MoE folder; `grouped`: its mode, "never" = expert by expert),
    the routers stay as they are."""
    from llmprune import arch, moe

    dt = next(m.model.norm.parameters()).dtype
    with torch.device("meta"):
        c = AutoModelForCausalLM.from_config(m.config, dtype=dt)
    moe.split(c)
    for name, mod in list(c.named_modules()):
        if not name.startswith("model.layers"):
            continue
        for child, lin in list(mod.named_children()):
            if isinstance(lin, torch.nn.Linear) and not arch.is_router(f"{name}.{child}"):  # routers stay dense
                p = random_packed(fmt, lin.out_features, lin.in_features, dt, device)
                setattr(mod, child, PackedLinear(fmt, p, None, lin.in_features, lin.out_features))
    packed = {k for k, v in c.state_dict().items() if v.device.type != "meta"}
    c.load_state_dict({k: v for k, v in m.state_dict().items() if k in c.state_dict() and k not in packed},
                      assign=True, strict=False)  # shares m's tensors: no copy
    c.tie_weights()
    c.model.rotary_emb = m.model.rotary_emb  # non-persistent buffers are not in the state dict
    left = [k for k, v in c.state_dict().items() if v.device.type == "meta"]
    assert not left, f"packed copy left on meta: {left[:3]}"
    moe.stack_packed(c)
    for s in c.modules():
        if isinstance(s, moe.SplitExperts):
            s.grouped = grouped
    return c.eval()


def drop_linears(m: torch.nn.Module) -> None:
    """Frees m's decoder linear weights (they become meta tensors), so that the packed models measured
    next hold only their own weights: their peak memory is theirs, not theirs plus the dense model's."""
    from llmprune import moe

    for _, _, lin in decoder_linears(m):
        if isinstance(lin, torch.nn.Linear):
            lin.weight = torch.nn.Parameter(lin.weight.to("meta"), requires_grad=False)
    for e in m.modules():
        if moe.is_fused_experts(e):
            for n, w in list(e.named_parameters(recurse=False)):
                setattr(e, n, torch.nn.Parameter(w.to("meta"), requires_grad=False))


@torch.no_grad()
def linears_step(model: torch.nn.Module, batch: int, device, reps: int = 20) -> dict:
    """ms of running every decoder linear once (one CUDA graph), and the bytes they read."""
    lins = [lin for _, _, lin in decoder_linears(model)]
    dt = next(model.parameters()).dtype
    xs = {f: torch.randn(batch, f, device=device, dtype=dt) for f in {m.in_features for m in lins}}

    def run():
        for m in lins:
            m(xs[m.in_features])

    run()
    nbytes = sum(m.nbytes if isinstance(m, PackedLinear) else m.weight.numel() * 2 for m in lins)
    if device.type != "cuda":  # dry run
        t0 = time.perf_counter()
        run()
        ms = (time.perf_counter() - t0) * 1e3
        return {"batch": batch, "n_linears": len(lins), "ms": ms, "bytes": nbytes, "GBps": nbytes / ms / 1e6}
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in ev)
    return {"batch": batch, "n_linears": len(lins), "ms": ms, "bytes": nbytes, "GBps": nbytes / ms / 1e6}


def bench_model(label: str, m, batches, a, device, compiled: bool) -> list[dict]:
    rows = []
    wb = weight_bytes(m)
    step_model = torch.compile(m) if compiled else None
    for b in batches:
        _reset_peak(device)
        t0 = time.time()
        r = decode_steps(m, b, a.prompt_len, a.new_tokens, device, 3, True, step_model=step_model,
                         profile=b == batches[0])
        rb = bytes_per_step(r, wb)
        rows.append({"model": label + (" compiled" if compiled else ""), "batch": b, "weight_bytes": wb,
                     "read_bytes_per_step": rb, "mode": r["mode"], **_summary(r["ms"], b, rb, bandwidth(device)),
                     "peak_mem_MiB": _peak_mib(device), "peak_of": "this model alone", "wall_s": time.time() - t0,
                     **({"profile": r["profile"]} if "profile" in r else {})})
        print(format_table(rows[-1:], DECODE_COLS), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--formats", default="sparse24,w4g128,w4s24")
    ap.add_argument("--compile", default="", help="models whose decode step also runs compiled, e.g. dense,w4s24")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compiled-only", action="store_true", help="skip the eager rows")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide model: the CPU dry run")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    batches = [int(b) for b in a.batch.split(",")]
    compiled = [c for c in a.compile.split(",") if c]
    tiny = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=1000) if a.tiny else {}
    if a.tiny and "a3b" in a.arch:  # the Qwen3-MoE dry run: 16 experts of 128, 8 a token
        tiny.update(num_experts=16, moe_intermediate_size=128, head_dim=64)
    dense = dense_model(a.arch, a.layers, a.device, **tiny)
    moe_keys = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size")
    res = {"arch": a.arch, "config": {k: getattr(dense.config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", *(k for k in moe_keys if getattr(dense.config, k, None)))},
        "experts_implementation": getattr(dense.config, "_experts_implementation", None), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "triton": __import__("triton").__version__, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "dtype": str(next(dense.parameters()).dtype)[6:], "rows": [], "linears": [],
        "command": "python3 bench/e2e_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    order = ["dense", *a.formats.split(",")]

    def save():  # after every model: a stage stopped by its time limit keeps what it has
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    # model by model: dense first (its eager rows, then compiled), then its decoder linears are freed, so
    # each packed model is measured holding only its own weights (gpu_kernels.sh runs the eager and the
    # compiled rows as two stages, two processes)
    for label in order:
        passes = ([] if a.compiled_only else [False]) + ([True] if label in compiled else [])
        m = None
        for compiled_pass in passes:
            try:
                if m is None:  # "w4s24:loop": packed experts run expert by expert (no grouped kernel)
                    fmt, _, how = label.partition(":")
                    m = dense if label == "dense" else packed_copy(dense, fmt, a.device, "never" if how else "auto")
                if not compiled_pass:
                    for b in batches:
                        res["linears"].append({"model": label, **linears_step(m, b, device)})
                        print("linears only", res["linears"][-1], flush=True)
                res["rows"] += bench_model(label, m, batches[:1] if compiled_pass else batches, a, device,
                                           compiled_pass)
            except Exception as e:  # noqa: BLE001  recorded; the other models still run
                res["rows"].append({"model": label + (" compiled" if compiled_pass else ""),
                                    "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print("FAILED:", res["rows"][-1], flush=True)
            if compiled_pass:
                torch._dynamo.reset()
            save()
        if label == "dense":
            drop_linears(dense)
        m = None
        torch.cuda.empty_cache() if device.type == "cuda" else None
    dense_ms = {(r["model"], r["batch"]): r["ms_per_step_median"] for r in res["rows"] if "batch" in r}
    for r in res["rows"]:
        base = dense_ms.get(("dense compiled" if r.get("model", "").endswith("compiled") else "dense", r.get("batch")))
        if base and "ms_per_step_median" in r:
            r["speedup_vs_dense"] = base / r["ms_per_step_median"]
    save()
    print(format_table([r for r in res["rows"] if "batch" in r], DECODE_COLS + ("wall_s",)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
