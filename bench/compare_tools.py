"""Wanda 50% unstructured on P-cpu: llmprune against the toolkits users would pick instead.

Same model (the embedded SmolLM2-135M, fp32, CPU), the same calibration tokens for every tool
(C4, 64 windows x 512, seed 0, written once to a .safetensors file of `input_ids`), and for each
tool, in a process of its own:
  llmprune       llmprune.prune.prune with solvers.get("wanda"), tokens read as `--calib FILE` reads them
  reference      the Wanda reference loop (locuslab/wanda lib/prune.py: prepare_calibration_input +
                 prune_wanda) re-stated for this transformers: one sample at a time through each
                 dense block, running-mean column norms from hooks, all linears pruned, outputs
                 recomputed with the pruned block
  llmcompressor  llmcompressor.oneshot with WandaPruningModifier, run by another interpreter
                 (its own venv: it pins an older transformers), see --llmc-python
Measured: wall time of the pruning alone (model load and evaluation excluded), peak RSS of the
process, its RSS once the model and tokens are loaded, and the keep-masks, which are compared
with llmprune's entry by entry. Optionally the WikiText-2 perplexity (llmprune's evaluator,
2048 x 16 windows) of the dense weights with each tool's mask.

    python bench/compare_tools.py                         # all tools, eval llmprune + llmcompressor
    python bench/compare_tools.py --nsamples 2 --out /tmp/ct --eval none   # a smoke test

Writes OUT.json and OUT.md (default bench/results/compare_tools); masks and tokens go to --work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("llmprune", "reference", "llmcompressor")
DIAGNOSTIC = ("reference-fp64",)  # run only when named in --tools
SPARSITY = 0.5


def rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def busy_s() -> float:
    """CPU seconds all processes have spent on this machine since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def block_linears(model) -> dict:
    """Full name -> nn.Linear for every linear inside the decoder blocks (what all tools prune)."""
    from torch import nn

    return {f"model.layers.{i}.{n}": m for i, layer in enumerate(model.model.layers)
            for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def save_masks(model, path: str) -> None:
    from safetensors.torch import save_file

    save_file({n: (m.weight.data != 0).contiguous() for n, m in block_linears(model).items()}, path)


def load_hf(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------- (b) the reference loop, re-stated
def reference_wanda(model, ids, sparsity: float, fp64_sum: bool = False) -> None:
    """locuslab/wanda prune_wanda (unstructured, no variant), adapted to decoder layers that take
    their rotary embeddings as a keyword: the catcher keeps every keyword the model passes to the
    first layer (attention_mask, position_ids, position_embeddings, ...) and replays them.
    fp64_sum: a diagnostic, not the reference: accumulate the column norms as llmprune does (a
    float64 sum of squares instead of the float32 running mean), everything else unchanged."""
    import torch
    from torch import nn

    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers
    nsamples, seqlen = ids.shape

    # prepare_calibration_input: one sample at a time up to the first layer
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=dtype)  # (n, seq, hidden)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    with torch.no_grad():
        for j in range(nsamples):
            try:
                model(ids[j : j + 1])
            except ValueError:
                pass
    layers[0] = layers[0].module
    outs = torch.zeros_like(inps)
    kw = cache["kwargs"]

    # prune_wanda
    for i in range(len(layers)):
        layer = layers[i]
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}  # find_layers
        scaler_row = {n: torch.zeros(m.weight.shape[1], dtype=torch.float64 if fp64_sum else torch.float32)
                      for n, m in subset.items()}
        count = {n: 0 for n in subset}

        def add_batch(name, scaler_row=scaler_row, count=count):
            def hook(_, inp, out):  # WrappedGPT.add_batch
                x = inp[0].data
                if x.dim() == 2:
                    x = x.unsqueeze(0)
                t = x.shape[0]
                x = x.reshape(-1, x.shape[-1]).t()  # (in, tokens)
                if fp64_sum:
                    scaler_row[name] += x.double().pow(2).sum(1)
                    return
                scaler_row[name] *= count[name] / (count[name] + t)
                count[name] += t
                scaler_row[name] += torch.norm(x.type(torch.float32), p=2, dim=1) ** 2 / count[name]
            return hook

        handles = [subset[n].register_forward_hook(add_batch(n)) for n in subset]
        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = layer(inps[j].unsqueeze(0), **kw)[0]
        for h in handles:
            h.remove()

        for name, mod in subset.items():
            W = mod.weight.data
            W_metric = torch.abs(W) * torch.sqrt(scaler_row[name].reshape((1, -1))).float()  # no-op cast in fp32
            W_mask = torch.zeros_like(W_metric) == 1  # True = prune, as in the reference
            sort_res = torch.sort(W_metric, dim=-1, stable=True)
            indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
            W_mask.scatter_(1, indices, True)
            W[W_mask] = 0

        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = layer(inps[j].unsqueeze(0), **kw)[0]
        inps, outs = outs, inps
    model.config.use_cache = use_cache


# ---------------------------------------------------------------- one tool in one process
def worker(a) -> None:
    import torch
    from safetensors.torch import load_file

    rep: dict = {"tool": a.worker, "python": sys.executable, "torch": torch.__version__,
                 "threads": torch.get_num_threads()}
    import transformers

    rep["transformers"] = transformers.__version__
    if a.worker == "llmprune":
        from llmprune import calibration, models, patterns, prune, solvers

        model, tok, _ = models.load(a.model_path)
        ids, _ = calibration.load(a.calib, tok)  # a .safetensors file: used as is
        rep["rss_loaded_mib"] = rss_now_mib()
        names = prune.target_linears(model)
        t0, c0 = time.perf_counter(), cpu_s()
        res = prune.prune(model, solvers.get("wanda"), patterns.parse("unstructured"), {n: SPARSITY for n in names},
                          ids, batch_size=a.calib_batch, device="cpu", progress=False)
        rep["prune_s"], rep["prune_cpu_s"] = round(time.perf_counter() - t0, 2), round(cpu_s() - c0, 2)
        rep["detail"] = {**res["timings"], "calib_batch": a.calib_batch}
        import llmprune

        rep["version"] = llmprune.__version__
    elif a.worker in ("reference", "reference-fp64"):
        model = load_hf(a.model_path)
        ids = load_file(a.calib)["input_ids"].long()
        rep["rss_loaded_mib"] = rss_now_mib()
        t0, c0 = time.perf_counter(), cpu_s()
        reference_wanda(model, ids, SPARSITY, fp64_sum=a.worker == "reference-fp64")
        rep["prune_s"], rep["prune_cpu_s"] = round(time.perf_counter() - t0, 2), round(cpu_s() - c0, 2)
        rep["version"] = "locuslab/wanda lib/prune.py prune_wanda, re-stated" + (
            "; norms as a float64 sum (diagnostic)" if a.worker == "reference-fp64" else "")
    elif a.worker == "llmcompressor":
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import WandaPruningModifier
        from transformers import AutoTokenizer

        rep["version"] = llmcompressor.__version__
        model = load_hf(a.model_path)
        tok = AutoTokenizer.from_pretrained(a.model_path)
        ids = load_file(a.calib)["input_ids"].long()
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        rep["rss_loaded_mib"] = rss_now_mib()
        recipe = WandaPruningModifier(sparsity=SPARSITY, mask_structure="0:0", targets=["Linear"],
                                      ignore=["re:.*lm_head"])
        t0, c0 = time.perf_counter(), cpu_s()
        oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=a.llmc_batch)
        rep["prune_s"], rep["prune_cpu_s"] = round(time.perf_counter() - t0, 2), round(cpu_s() - c0, 2)
        rep["detail"] = {"batch_size": a.llmc_batch, "pipeline": "independent (default) -> sequential"}
    else:
        raise SystemExit(f"unknown worker {a.worker!r}: choose from {', '.join(TOOLS)}")
    rep["peak_rss_mib"] = peak_rss_mib()
    save_masks(model, a.masks)
    Path(a.report).write_text(json.dumps(rep, indent=2) + "\n")


# ---------------------------------------------------------------- the driver
def wait_for_cpu(flag: str, timeout_s: float) -> dict:
    if not flag:
        return {"waited_s": 0}
    t0 = time.time()
    while not os.path.exists(flag) and time.time() - t0 < timeout_s:
        time.sleep(30)
    return {"flag": flag, "found": os.path.exists(flag), "waited_s": round(time.time() - t0)}


def others_load(window_s: float = 10.0) -> float:
    """Cores kept busy by other processes over a window in which this process sleeps."""
    b0 = busy_s()
    time.sleep(window_s)
    return (busy_s() - b0) / window_s


def wait_quiet(max_load: float, budget: dict) -> dict:
    """Sleep until other processes use less than max_load cores (10 s windows), within the
    shared budget (seconds left in budget["left"]); returns what was seen."""
    t0 = time.time()
    load = others_load()
    while load > max_load and budget["left"] - (time.time() - t0) > 0:
        load = others_load()
    budget["left"] -= time.time() - t0
    return {"waited_s": round(time.time() - t0), "load_before": round(load, 2)}


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def make_calib(tok, n: int, seqlen: int, path: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from llmprune import calibration

    if path.exists():
        ids = load_file(str(path))["input_ids"]
        if tuple(ids.shape) == (n, seqlen):
            return {"file": str(path), "reused": True}
    ids, info = calibration.load("c4", tok, n, seqlen, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.to(torch.int64).contiguous()}, str(path))
    return {"file": str(path), **info}


def compare(ref: dict, other: dict) -> dict:
    agree = total = 0
    worst, first = [], None
    for n in sorted(ref, key=lambda s: (int(s.split(".")[2]), s)):  # block order
        k = ref[n]
        o = other[n]
        same = int((k == o).sum())
        agree += same
        total += k.numel()
        if same != k.numel():
            worst.append((k.numel() - same, n))
            first = first or {"linear": n, "entries": k.numel() - same}
    worst.sort(reverse=True)
    return {"equal": agree == total, "agree": agree, "total": total, "agree_frac": agree / total,
            "differing": total - agree, "linears_differing": len(worst), "first_differing": first,
            "most_differing": [{"linear": n, "entries": d} for d, n in worst[:5]]}


def run_tool(tool: str, a, calib: Path, work: Path, model_path: str) -> dict:
    py = a.llmc_python if tool == "llmcompressor" else sys.executable
    masks, report = work / f"masks-{tool}.safetensors", work / f"report-{tool}.json"
    for p in (masks, report):
        p.unlink(missing_ok=True)
    cmd = [py, str(Path(__file__).resolve()), "--worker", tool, "--calib", str(calib), "--model-path", model_path,
           "--masks", str(masks), "--report", str(report), "--calib-batch", str(a.calib_batch),
           "--llmc-batch", str(a.llmc_batch)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) if tool != "llmcompressor" else ""}
    log = work / f"log-{tool}.txt"
    quiet = wait_quiet(a.quiet_load, a.quiet_budget)
    print(f"[compare_tools] {tool} ({quiet}): {' '.join(cmd)}", flush=True)
    t0, b0 = time.perf_counter(), busy_s()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False).returncode
    wall = round(time.perf_counter() - t0, 2)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    # other processes' CPU while the tool ran, in cores (0 = the tool had the machine to itself)
    contention = {**quiet, "others_cores_during": round(max(busy_s() - b0 - child, 0.0) / max(wall, 1e-9), 2)}
    if rc != 0 or not report.exists():
        tail = log.read_text(errors="replace").splitlines()[-25:]
        return {"tool": tool, "ok": False, "rc": rc, "process_wall_s": wall, "contention": contention, "log_tail": tail}
    return {"tool": tool, "ok": True, "process_wall_s": wall, "contention": contention,
            **json.loads(report.read_text()), "masks": str(masks)}


def tool_info(py: str) -> dict:
    """What llm-compressor version sits in the other interpreter and whether it has the modifiers."""
    code = ("import json,importlib.metadata as m;d={}\n"
            "for p in ('llmcompressor','transformers','torch','compressed-tensors'):\n"
            "  try: d[p]=m.version(p)\n  except Exception as e: d[p]=None\n"
            "try:\n  from llmcompressor.modifiers.pruning import WandaPruningModifier, SparseGPTModifier;d['modifiers']=True\n"
            "except Exception as e: d['modifiers']=repr(e)\nprint(json.dumps(d))")
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, check=False)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


NAMES = {"llmprune": "llmprune (engine, Wanda solver)", "reference": "Wanda reference loop (re-stated)",
         "reference-fp64": "reference loop, norms as fp64 sums (diagnostic)",
         "llmcompressor": "llm-compressor oneshot + WandaPruningModifier"}


def write_md(res: dict, path: Path) -> None:
    c = res["config"]
    lines = [
        "# Wanda 50% unstructured on P-cpu: llmprune vs. the alternatives",
        "",
        (f"Model: {res['model']}, fp32, CPU ({res['machine']}). Calibration: C4, {c['nsamples']} x {c['seqlen']}, "
         f"seed 0, one `input_ids` file read by every tool. Perplexity: WikiText-2, {c['eval_seqlen']} x "
         f"{c['eval_windows']} windows, llmprune's evaluator, dense weights with each tool's mask."),
        "",
    ]
    busy = [r for r in res["tools"] if r.get("ok") and r["contention"]["others_cores_during"] > c["quiet_load"]]
    if busy:
        lines += [(f"**Contended timings:** other processes kept ~{max(r['contention']['others_cores_during'] for r in busy):.1f} "
                   f"of the {os.cpu_count()} cores busy while {', '.join(r['tool'] for r in busy)} ran, so those walls "
                   "and CPU seconds are inflated and their ratios are not a fair comparison; masks and perplexities "
                   "do not depend on it. Rerun on an idle machine for timings (perplexities are cached)."), ""]
    lines += [
        ("| tool | version | prune wall (s) | vs llmprune | prune CPU (s) | other load (cores) | peak RSS (MiB) "
         "| RSS loaded (MiB) | masks vs llmprune | WikiText-2 ppl |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    base = next((r for r in res["tools"] if r["tool"] == "llmprune" and r.get("ok")), None)
    for r in res["tools"]:
        if not r.get("ok"):
            lines.append(f"| {NAMES[r['tool']]} | {r.get('version', '')} | failed (rc {r.get('rc')}) | | | | | | | |")
            continue
        m = r.get("mask_vs_llmprune")
        mtxt = "(itself)" if r["tool"] == "llmprune" else (
            "identical" if m and m["equal"] else f"{m['agree_frac']:.6%} agree ({m['differing']:,} differ)" if m else "")
        ratio = f"{r['prune_s'] / base['prune_s']:.2f}x" if base else ""
        ppl = f"{r['ppl']['ppl']:.3f}" if r.get("ppl") else ("= llmprune (same masks)" if m and m["equal"] else "")
        lines.append(f"| {NAMES[r['tool']]} | {r.get('version', '')} | {r['prune_s']:.1f} | {ratio} | "
                     f"{r['prune_cpu_s']:.0f} | {r['contention']['others_cores_during']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['rss_loaded_mib']:.0f} | {mtxt} | {ppl} |")
    if res.get("dense_ppl"):
        lines.append(f"| dense (no pruning) | | | | | | | | | {res['dense_ppl']['ppl']:.3f} |")
    lines += ["", "Command:", "", "```", res["command"], "```", "", "Notes:", ""]
    lines += [f"- {n}" for n in res["notes"]]
    path.write_text("\n".join(lines) + "\n")


def driver(a) -> None:
    import torch
    from safetensors.torch import load_file

    from llmprune import models

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tools = [t for t in a.tools.split(",") if t]
    info = models.resolve("llama")
    calib = work / f"calib-c4-{a.nsamples}x{a.seqlen}-seed0.safetensors"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info.path)
    calib_info = make_calib(tok, a.nsamples, a.seqlen, calib)
    res: dict = {"command": "python bench/compare_tools.py " + " ".join(sys.argv[1:]), "model": info.loaded,
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "calibration": calib_info,
                 "config": {"sparsity": SPARSITY, "pattern": "unstructured", "nsamples": a.nsamples, "seqlen": a.seqlen,
                            "calib_batch_llmprune": a.calib_batch, "batch_llmcompressor": a.llmc_batch,
                            "eval_seqlen": a.eval_seqlen, "eval_windows": a.eval_windows,
                            "quiet_load": a.quiet_load, "quiet_max_s": a.quiet_max_s},
                 "cpu_wait": wait_for_cpu(a.wait_flag, a.wait_max_s), "tools": [], "notes": []}
    if "llmcompressor" in tools:
        res["llmcompressor_env"] = {"python": a.llmc_python, **tool_info(a.llmc_python)}
    a.quiet_budget = {"left": a.quiet_max_s}
    for t in tools:
        res["tools"].append(run_tool(t, a, calib, work, info.path))
        print(f"[compare_tools] {t}: " + json.dumps({k: v for k, v in res["tools"][-1].items()
                                                     if k in ("ok", "prune_s", "peak_rss_mib", "rc")}), flush=True)
    masks = {r["tool"]: load_file(r["masks"]) for r in res["tools"] if r.get("ok")}
    if "llmprune" in masks:
        for r in res["tools"]:
            if r.get("ok") and r["tool"] != "llmprune":
                if set(masks[r["tool"]]) != set(masks["llmprune"]):
                    r["mask_vs_llmprune"] = {"error": "different linear sets",
                                             "only_here": sorted(set(masks[r["tool"]]) - set(masks["llmprune"]))[:5]}
                    continue
                r["mask_vs_llmprune"] = compare(masks["llmprune"], masks[r["tool"]])
    for r in res["tools"]:
        if r.get("ok"):
            m = masks[r["tool"]]
            r["sparsity"] = 1 - sum(int(k.sum()) for k in m.values()) / sum(k.numel() for k in m.values())
    evals = [t for t in a.eval.split(",") if t and t != "none"]
    # Perplexity depends only on the mask (and the dense weights), not on how long pruning took, so
    # results are cached by the mask file's hash: a rerun for timings does not re-evaluate.
    cache_path = work / "ppl-cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    setting = f"wikitext2-{a.eval_seqlen}x{a.eval_windows}"
    keys = {r["tool"]: f"{setting}-{file_sha256(r['masks'])}" for r in res["tools"] if r.get("ok")}
    todo = [t for t in evals if t in keys and keys[t] not in cache]
    if todo or (a.eval_dense and f"{setting}-dense" not in cache):
        from llmprune.eval.perplexity import eval_tokens, perplexity

        model, tok, _ = models.load("llama")
        dense = {n: m.weight.data.clone() for n, m in block_linears(model).items()}
        toks, _ = eval_tokens("wikitext2", tok)
        if a.eval_dense and f"{setting}-dense" not in cache:
            cache[f"{setting}-dense"] = perplexity(model, tok, "wikitext2", a.eval_seqlen, a.eval_windows,
                                                   progress=False, tokens=toks)
        for t in todo:
            for n, mod in block_linears(model).items():
                mod.weight.data.copy_(dense[n] * masks[t][n])
            cache[keys[t]] = perplexity(model, tok, "wikitext2", a.eval_seqlen, a.eval_windows, progress=False,
                                        tokens=toks)
            print(f"[compare_tools] ppl {t}: {cache[keys[t]]['ppl']:.3f}", flush=True)
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
        del model
        cache_path.write_text(json.dumps(cache, indent=2) + "\n")
    if a.eval_dense:
        res["dense_ppl"] = cache[f"{setting}-dense"]
    for r in res["tools"]:
        if r["tool"] in evals and r["tool"] in keys:
            r["ppl"] = cache[keys[r["tool"]]]
    res["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__}
    res["notes"] = notes(res)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    write_md(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


def notes(res: dict) -> list[str]:
    c = res["config"]
    n = [
        ("Prune wall = pruning only, from the first forward of calibration data to the last pruned block "
         "(model load, token load and evaluation excluded); each tool runs in a fresh process, one at a time."),
        ("Prune CPU = user + system CPU seconds of the tool's process over the same span (2 threads, so up to "
         "2x the wall). Other load = cores kept busy by other processes while the tool ran (from /proc/stat; "
         f"before each tool the script waits, {res['config']['quiet_max_s']:.0f} s at most in all, until it is "
         f"below {res['config']['quiet_load']}); a wall measured with other load above ~0.3 is inflated."),
        ("Peak RSS = the process's ru_maxrss (includes the ~520 MiB fp32 model); RSS loaded = VmRSS after "
         "the model and tokens were loaded, before pruning."),
        ("All run each block twice over the calibration set (statistics with the dense weights, then the "
         f"pruned block's outputs). llmprune pushes {c['calib_batch_llmprune']} samples through a block at once "
         "(its default --calib-batch) and stops the statistics pass after the block's last linear; the reference "
         "loop pushes one sample at a time; llm-compressor's sequential pipeline (chosen by its default "
         f"'independent' pipeline) ran with batch_size={c['batch_llmcompressor']} (its default)."),
        ("Masks are compared as `weight != 0` over the 210 block linears; the evaluated models are the dense "
         "weights times each mask (Wanda changes no kept weight)."),
    ]
    env = res.get("llmcompressor_env")
    if env:
        n.append(f"llm-compressor {env.get('llmcompressor')} in its own venv ({env.get('python')}), with "
                 f"transformers {env.get('transformers')}, torch {env.get('torch')}, compressed-tensors "
                 f"{env.get('compressed-tensors')}; WandaPruningModifier/SparseGPTModifier importable: "
                 f"{env.get('modifiers')}.")
    by = {r["tool"]: r for r in res["tools"] if r.get("ok")}
    ref, f64 = by.get("reference", {}).get("mask_vs_llmprune"), by.get("reference-fp64", {}).get("mask_vs_llmprune")
    if ref and not ref.get("equal") and "first_differing" in ref:
        n.append(f"The reference loop's masks first differ from llmprune's at {ref['first_differing']['linear']} "
                 f"({ref['first_differing']['entries']} entries); from there the pruned blocks' outputs differ, so "
                 "later blocks see other inputs and the differences grow block by block.")
    if f64 and f64.get("equal"):
        n.append("The same reference loop with the column norms accumulated as llmprune does (float64 sum of "
                 "squares instead of the float32 running mean; tool reference-fp64) gives masks identical to "
                 "llmprune's: the loops agree, and what differs is float32 rounding in the reference's running mean, "
                 "which swaps a pair of weights whose scores tie to within one float32 ulp.")
    for r in res["tools"]:
        if not r.get("ok"):
            n.append(f"{r['tool']} failed (rc {r.get('rc')}): " + " / ".join(r.get("log_tail", [])[-3:]))
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-batch", type=int, default=8, help="llmprune's --calib-batch")
    p.add_argument("--llmc-batch", type=int, default=1, help="llm-compressor's batch_size (its default: 1)")
    p.add_argument("--llmc-python", default="/tmp/llmc/bin/python", help="interpreter of the llm-compressor venv")
    p.add_argument("--eval", default="llmprune,llmcompressor", help="tools whose result gets a ppl, or none")
    p.add_argument("--eval-dense", action="store_true")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "bench/results/compare_tools"), help="OUT.json and OUT.md")
    p.add_argument("--work", default=str(ROOT / "runs/compare_tools"), help="tokens, masks, logs")
    p.add_argument("--wait-flag", default="", help="wait until this file exists before pruning (poll 30 s)")
    p.add_argument("--wait-max-s", type=float, default=3600)
    p.add_argument("--quiet-load", type=float, default=0.3,
                   help="before each tool, wait until other processes use fewer cores than this")
    p.add_argument("--quiet-max-s", type=float, default=1800, help="total seconds to spend waiting for quiet")
    # worker mode (internal)
    p.add_argument("--worker", choices=TOOLS + DIAGNOSTIC, help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--masks", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
    else:
        driver(a)


if __name__ == "__main__":
    main()
