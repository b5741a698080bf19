"""Render the result tables of README.md and docs/*.md from bench/results (made by bench/p_cpu.sh).

    python bench/make_tables.py > bench/results/tables.md
    python bench/make_tables.py --replot    # also re-render results/*/sweep.png from sweep.json
    python bench/make_tables.py --readme    # rewrite every <!-- table:NAME --> span of README.md and docs/*.md
    python bench/make_tables.py --readme solvers slicegpt    # only those spans
    python bench/make_tables.py --readme --check    # exit 1, naming the spans, if regenerating would change a file

A span is a line `<!-- table:NAME -->`, the table, and a line `<!-- /table -->`; its body is TABLES[NAME](). A
span whose NAME is not in TABLES is left as it is, with a warning.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

R = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict | None:
    p = R / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def f(x, spec=".2f", dash="-"):
    return dash if x is None else format(x, spec)


def base_table() -> str:
    rows = ["| model | solver | pattern | sparsity (measured) | dense ppl | ppl | compress s (forward / solve) | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|"]
    for n in ("llama-wanda-50", "llama-sparsegpt-50", "llama-wanda-60", "llama-wanda-70", "llama-wanda-24",
              "llama-sparsegpt-24", "llama-magnitude-50",
              "gemma3-wanda-50", "gemma3-sparsegpt-24", "gemma3-alps-24"):
        m = load(n)
        if not m:
            continue
        ev, t = m.get("eval", {}).get("wikitext2", {}), m["timings"]
        mark = " †" if in_memory_figure(m) else ""
        rows.append(f"| {m['model']['asked']} | {m['solver']} | {m['pattern']} | {m['sparsity']['measured']:.4f} | "
                    f"{f(ev.get('dense_ppl'))} | {f(ev.get('ppl'))}{mark} | {t['compress_s']:.0f} "
                    f"({t.get('forward_s', 0):.0f} / {t.get('solve_s', 0):.0f}) | {m['peak_rss_mib']:.0f} |")
    if any(" †" in r for r in rows):
        rows.append("\n† measured on the model in memory right after pruning, by a release that did not yet evaluate "
                    "the saved file (manifest format 1); not re-measured yet.")
    return "\n".join(rows)


def _tf(m: dict | None) -> str | None:
    """The transformers version a manifest's command ran under (the libraries move the figures)."""
    return ((m or {}).get("versions") or {}).get("transformers")


def _source_run(m: dict | None) -> dict:
    """The run that made the source of a packed or recovered folder, as it was when packed: the last run in
    its `history` (manifest.derive); older manifests copied the source's `versions` (the folder's own)."""
    h = (m or {}).get("history") or []
    return h[-1] if h else (m or {})


def _source_tf(m: dict | None) -> str | None:
    """The transformers version the source of a packed or recovered folder was made under (_source_run)."""
    return _tf(_source_run(m))


def _same_source(src: dict | None, m: dict) -> bool:
    """Whether `src` (a source's manifest as recorded now) is the run `m` was packed or recovered from, as far as
    the figures go: the same transformers version, and the same processor where both record it (the same
    command on another processor rounds differently: bench/results/machine_spread.txt)."""
    if src is None:
        return True
    cpus = [(r.get("versions") or {}).get("cpu") for r in (src, _source_run(m))]
    return _tf(src) == _source_tf(m) and (None in cpus or cpus[0] == cpus[1])


def _bytes(m: dict) -> tuple[int, int]:
    """(packed bytes, fp16 bytes) of the packed linears."""
    layers = m["format"]["layers"]
    return sum(x["bytes"] for x in layers.values()), sum(2 * x["shape"][0] * x["shape"][1] for x in layers.values())


def formats_table() -> str:
    rows = [("| model | source | format | quant (grid, group) | linears packed | linear bytes vs fp16 | file MiB |"
             " WikiText-2 ppl | vs unpacked |"), "|---|---|---|---|---|---|---|---|---|"]
    # "-plain": GPTQ as the paper runs it (no act-order, every token once), kept for comparison
    sets = [("llama", "llama-sparsegpt-24", [("llama-sparsegpt-24-w4s24-rtn", None), ("llama-sparsegpt-24-w4s24-gptq-plain", None),
                                             ("llama-sparsegpt-24-w4s24-gptq", None), ("llama-sparsegpt-24-w4s24-rtn-g48", None),
                                             ("llama-sparsegpt-24-w4s24-gptq-g48", None),
                                             ("llama-sparsegpt-24-w4s24-gptq-g48-tune64", None),
                                             ("llama-sparsegpt-24-w4s24-gptq-g48-seed1", None),
                                             ("llama-sparsegpt-24-w4s24-gptq-g48-tune64-seed1", None)]),
            ("llama", "llama-wanda-24", [("llama-wanda-24-sparse24", "llama-wanda-24"), ("llama-wanda-24-w4s24-rtn", None),
                                         ("llama-wanda-24-w4s24-gptq-plain", None), ("llama-wanda-24-w4s24-gptq", None),
                                         ("llama-wanda-24-w4s24-gptq-tune64", None)]),
            ("llama", "llama-dense", [("llama-dense-w4g128-rtn", None), ("llama-dense-w4g128-gptq-plain", None),
                                      ("llama-dense-w4g128-gptq", None), ("llama-dense-w4g128-gptq-tune64", None)]),
            ("llama", "llama-wanda-g16", [("llama-wanda-g16-w4s50-rtn", None), ("llama-wanda-g16-w4s50-gptq-plain", None),
                                          ("llama-wanda-g16-w4s50-gptq", None)]),
            ("gemma3", "gemma3-dense", [("gemma3-sparse24", None), ("gemma3-w4s24", None), ("gemma3-w4g128", None),
                                        ("gemma3-w4s50", None), ("gemma3-w4g128-rtn", None), ("gemma3-w4g128-gptq", None)]),
            ("gemma3", "gemma3-sparsegpt-24", [("gemma3-sparsegpt-24-sparse24", "gemma3-sparsegpt-24"),
                                               ("gemma3-sparsegpt-24-w4s24-rtn", None),
                                               ("gemma3-sparsegpt-24-w4s24-gptq", None),
                                               ("gemma3-sparsegpt-24-w4s24-gptq-tune64", None)])]
    for model, src, outs in sets:
        s = base = load(src) if src else None  # base: the manifest base_ppl comes from
        base_ppl = (s or {}).get("eval", {}).get("wikitext2", {}).get("ppl")
        if src == "gemma3-dense" and base_ppl is None and load("gemma3-wanda-50"):
            # measured once, by the Wanda run's dense evaluation (same protocol): not again for 12 min
            base = load("gemma3-wanda-50")
            base_ppl = base["eval"]["wikitext2"].get("dense_ppl")
        what = "-"
        if s:
            what = f"{s['solver']} {s['pattern']}" if s.get("sparsity", {}).get("target") else "unpruned"
        if s:
            rows.append(f"| {model} | {what} | dense (zeros in place) | - | - | 1 (fp32 file: 2x) | {file_mib(src):.0f} | "
                        f"{f(base_ppl)} | 1 |")
        for name, unmeasured in outs:
            m = load(name)
            if not m or "format" not in m:
                continue
            if m.get("solver"):  # what was packed (a source of its own, as Gemma-3's magnitude masks)
                what = f"{m['solver']} {m['pattern']}" if m.get("sparsity", {}).get("target") else "unpruned"
            packed, dense = _bytes(m)
            ppl = (m.get("eval", {}).get("wikitext2") or {}).get("ppl")
            src_m = load(Path(m["packed_from"]).name) if m.get("packed_from") else None
            if src_m and ppl == (src_m.get("eval", {}).get("wikitext2") or {}).get("ppl"):
                ppl = None  # copied from the source by an older `pack`, not measured on the packed model
            # a packed folder's figure is measured on it or not shown: never its source's
            note = " (not measured on the packed folder)" if ppl is None and unmeasured else ""
            fm = m["format"]
            q = "-"
            if fm.get("quant"):
                lay = next(iter(fm["layers"].values()))
                groups = sorted({x["group_size"] for x in fm["layers"].values()})
                q = f"{fm['quant']} ({'sym' if lay['symmetric'] else 'asym'}, {'/'.join(map(str, groups))})"
                if fm["quant"] == "gptq":
                    o = fm.get("quant_options") or {"act_order": False, "sink_weight": 1}  # before the options: plain
                    q += f", {'act-order' if o['act_order'] else 'no act-order'}, sink {o['sink_weight']:g}"
                    if o.get("tune_steps"):  # scale tuning after GPTQ (quant/tune.py); "gptq": it did not help
                        t = o.get("tune", {})
                        q += f", + scales tuned {o['tune_steps']} steps" + (" (not kept)" if t.get("kept") == "gptq" else "")
                    if (o.get("calibration") or {}).get("seed", 0):
                        q += f", calibration seed {o['calibration']['seed']}"
            # a ratio only against the source as it was when packed (a source re-run since, under other
            # libraries, reads differently: `*`, no ratio)
            same = _same_source(s, m) and _same_source(base, m)
            rel = f"{ppl / base_ppl:.3f}" if ppl and base_ppl and same else "-"
            note += "" if same or not ppl else " *"
            rows.append(f"| {model} | {what} | {fm['name']} | {q} | {len(fm['layers'])} | "
                        f"{packed / dense:.3f} | {file_mib(name):.0f} | {f(ppl)}{note} | {rel} |")
    return "\n".join(rows)


FORMAT_NOTES = """Byte ratios count the packed linear layers against fp16; file MiB is the whole safetensors
file (fp16 embeddings and norms). `--group-size auto` picks 64 for SmolLM2's 576-wide inputs and 128
for its 1536-wide `down_proj`. Every GPTQ row is block-sequential (`quant.sequential.gptq_sequential`). Gemma-3's
magnitude rows are sizes only; its quality rows (`bash bench/p_cpu.sh gemma`) use a SparseGPT 2:4 model
and the unpruned one, whose 25.05 comes from the Wanda 50% run's dense evaluation. `*`: packed before its
source was run again (on its saved file, under other libraries): the figure, measured on the packed folder,
stands; the ratio to today's source would mix two library versions and is not given."""


# Whole-file MiB of outputs that no record above holds: measured when runs/ still existed and printed in
# the README's tables then (rounded), before p_cpu.sh recorded sizes in results/file_sizes.json.
RECORDED_MIB = {"gemma3-dense": 1023}


def file_mib(name: str) -> float:
    """The safetensors MiB of runs/NAME; else as recorded in results/file_sizes.json (p_cpu.sh's `run` records
    each output's bytes there: runs/ is not kept); else the file bytes a packed output's manifest records
    (format.bytes.file); else, for an unsliced dense-format output, the bytes of its model's unpruned dense
    output (MODEL-dense: same tensors, same dtype, zeros stored); else RECORDED_MIB; else nan."""
    d = Path(__file__).parents[1] / "runs" / name
    if d.exists():
        return sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**20
    sizes = load("file_sizes") or {}
    if name in sizes:
        return sizes[name] / 2**20
    m = load(name) or {}
    fb = ((m.get("format") or {}).get("bytes") or {}).get("file")
    if fb:
        return fb / 2**20
    model = (m.get("model") or {}).get("asked")
    if m and not m.get("format") and not m.get("slicegpt") and model and name != f"{model}-dense":
        base = load(f"{model}-dense") or {}
        if base.get("dtype") == m.get("dtype"):
            return file_mib(f"{model}-dense")
    return RECORDED_MIB.get(name, float("nan"))


def sweep_table(folder: str) -> str:
    p = R / folder / "sweep.csv"
    if not p.exists():
        return ""
    rows = list(csv.DictReader(p.open()))
    out = ["| solver | pattern | sparsity | WikiText-2 ppl | compress s |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['solver']} | {r['pattern']} | {float(r['sparsity']):.3f} | {float(r['ppl_wikitext2']):.2f} | "
                   f"{r.get('compress_s') or '-'} |")
    return "\n".join(out)


PAPER_TASKS = ["boolq", "rte", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]  # + hellaswag: online only


def sweep_wide(folder: str = "sweep") -> str:
    """One row per sparsity, one ppl column per solver (the table the sweep plot draws)."""
    p = R / folder / "sweep.csv"
    if not p.exists():
        return ""
    rows = [r for r in csv.DictReader(p.open()) if r["solver"] != "dense"]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    grid = {(r["solver"], r["target"]): float(r["ppl_wikitext2"]) for r in rows}
    out = ["| sparsity | " + " | ".join(solvers) + " |", "|---" * (len(solvers) + 1) + "|"]
    for t in dict.fromkeys(r["target"] for r in rows):
        out.append(f"| {float(t):.0%} | " + " | ".join(f(grid.get((s, t)), ",.2f") for s in solvers) + " |")
    return "\n".join(out)


GRID = [("solvers-50", "50%"), ("solvers-60", "60%"), ("solvers-70", "70%"), ("solvers-24", "2:4")]
# Sweeps made before DSnoT followed its reference's rules (per-sequence threshold, no sign rule for
# unstructured, MLP skipped, no error check): their DSnoT rows are kept under this label.
OLD_DSNOT = " (old rules)"
ORDER = ("magnitude", "wanda", "sparsegpt", "alps", "dsnot")


def _label(r: dict, folder: str) -> str:
    new = "-dsnot" in folder  # solvers-COL[-seedK]-dsnot*: measured with the reference's rules
    return r["solver"] + (OLD_DSNOT if r["solver"].startswith("dsnot") and not new else "")


def _overlays(folder: str) -> list[Path]:
    """FOLDER's sweep, then the later ones that add or replace its points (FOLDER-fix*, -alps, -dsnot*)."""
    more = [p for p in sorted(R.glob(f"{folder}-*/sweep.csv")) if "-seed" not in p.parent.name]
    return [R / folder / "sweep.csv", *more]


def _env(folder: str) -> str | None:
    """The transformers version a sweep ran under (its sweep_meta.json): the libraries move the figures
    (SparseGPT 2:4 80.02 under 5.23, 77.18 under 5.25), so rows are compared only within one."""
    p = R / folder / "sweep_meta.json"
    return (json.loads(p.read_text()).get("versions") or {}).get("transformers") if p.exists() else None


def _newest_env() -> str | None:
    envs = {_env(p.parent.name) for p in R.glob("solvers-*/sweep.csv")} - {None}
    return max(envs, key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v))) if envs else None


def _put(rows: dict, key, r: dict) -> None:
    """rows[key] = r; a replaced row measured under other libraries stays reachable in r["older"]."""
    prev = rows.get(key)
    r["older"] = ([prev, *prev.get("older", [])] if prev else [])
    rows[key] = r


def _same_env(r: dict | None, env: str | None) -> dict | None:
    """r, or the row it replaced, measured under `env`."""
    for x in ([r, *r.get("older", [])] if r else []):
        if x.get("env") == env:
            return x
    return None


def _grid_rows() -> dict:
    """{(base solver, with OWL, column): row} over the solvers-* sweeps (row["env"]: its transformers)."""
    rows = {}
    for folder, col in GRID:
        for p in _overlays(folder):
            for r in (csv.DictReader(p.open()) if p.exists() else []):
                if r["solver"] != "dense":
                    r["label"] = label = _label(r, p.parent.name)
                    r["env"] = _env(p.parent.name)
                    _put(rows, (label.replace("+owl", ""), "+owl" in label, col), r)
    return rows


def _order(label: str) -> tuple:
    name = label.split("+")[0].split(" ")[0]
    return (ORDER.index(name) if name in ORDER else len(ORDER), OLD_DSNOT not in label, label)


def solver_grid(key: str = "ppl_wikitext2", spec: str = ",.2f") -> str:
    """Solvers down, sparsity (uniform, +OWL) across: WikiText-2 ppl, or another sweep.csv column."""
    rows = _grid_rows()
    if not rows:
        return ""
    newest = _newest_env()
    solvers = sorted(dict.fromkeys(b for b, _, _ in rows), key=_order)
    cols = [(c, o) for _, c in GRID for o in ((False, True) if c != "2:4" else (False,))
            if any((b, o, c) in rows for b in solvers)]
    out = ["| solver | " + " | ".join(f"{c}{' +OWL' if o else ''}" for c, o in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for b in solvers:
        cells = []
        for c, o in cols:
            r = rows.get((b, o, c), {})
            x = r.get(key) or None
            cells.append(f(float(x) if x is not None else None, spec) + (" *" if x and r.get("env") != newest else ""))
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _against(n: str) -> str | None:
    """What a row is compared with under the same seed: DSnoT with its initial mask's solver, ALPS with
    SparseGPT, +OWL with uniform."""
    n = n.replace(OLD_DSNOT, "")
    if n.startswith("dsnot+init="):
        init, *opts = n.removeprefix("dsnot+init=").split("+")
        return init + ("+owl" if "owl" in opts else "")
    if n.startswith("alps"):
        return n.replace("alps", "sparsegpt", 1)
    return n.removesuffix("+owl") if n.endswith("+owl") else None


def seed_table(col: str = "70%") -> str:
    """The solvers re-run with other calibration seeds (solvers-COL-seedK*): ppl per seed, the mean, and
    each row against its baseline under the same seed (a paired ratio; see _against)."""
    import re

    key = col.rstrip("%").replace(":", "")
    seeds = {0: {r["label"]: r for (_, _, c), r in _grid_rows().items() if c == col}}
    for p in sorted(R.glob(f"solvers-{key}-seed*/sweep.csv")):
        k = int(re.search(r"-seed(\d+)", p.parent.name)[1])
        for r in csv.DictReader(p.open()):
            if r["solver"] != "dense":
                r["env"] = _env(p.parent.name)
                _put(seeds.setdefault(k, {}), _label(r, p.parent.name), r)
    if len(seeds) < 2:
        return ""
    newest = _newest_env()
    ks = sorted(seeds)
    names = sorted(dict.fromkeys(n for k in ks[1:] for n in seeds[k]), key=_order)
    ppl = lambda r: float(r["ppl_wikitext2"])
    out = [f"| {col} solver | " + " | ".join(f"seed {k}" for k in ks) + " | mean | against | ratio per seed | ratio of means |",
           "|---" * (len(ks) + 5) + "|"]
    for n in names:
        rows = [seeds[k].get(n) for k in ks]
        got = [ppl(r) for r in rows if r]
        b = _against(n)
        # each seed's row against its baseline measured with the same seed under the same libraries
        pairs = [(r, base) for k, r in zip(ks, rows) if r and b and (base := _same_env(seeds[k].get(b), r["env"]))]
        ratios = [f"{ppl(r) / ppl(base):.3f}" for r, base in pairs]
        rm = (sum(ppl(r) for r, _ in pairs) / sum(ppl(base) for _, base in pairs)) if pairs else None
        cells = [f(ppl(r), ",.2f") + (" *" if r["env"] != newest else "") if r else "-" for r in rows]
        out.append(f"| {n} | " + " | ".join(cells) + f" | {sum(got) / len(got):,.2f} | "
                   f"{b or '-'} | {', '.join(ratios) or '-'} | {f(rm, '.3f')} |")
    return "\n".join(out)


def quant_ablation_table() -> str:
    a = load("quant_ablation")
    if not a:
        return ""
    base = a["rows"][0]["ppl"]
    out = ["| int4 of the SparseGPT 2:4 model (quantizer:grid:group[:seq][:act][:sinkW][ nN]) | WikiText-2 ppl | vs unquantized |",
           "|---|---|---|"]
    for r in a["rows"]:
        out.append(f"| {r['config']} | {r['ppl']:.2f} | {r['ppl'] / base:.3f} |")
    return "\n".join(out)


def zeroshot_table() -> str:
    """acc per task; the mean of the six of the papers' seven tasks that run offline (HellaSwag and
    LAMBADA have no offline copy), then PIQA and the mean of all seven that ran."""
    tasks = PAPER_TASKS + ["piqa"]
    out = ["| model | " + " | ".join(tasks[:-1]) + " | mean (6 paper tasks) | piqa | mean (7 run) | limit | wall s |",
           "|---" * (len(tasks) + 5) + "|"]
    for n in ("llama-dense", "llama-wanda-50", "llama-wanda-24"):
        p = R / f"zeroshot-{n}.json"
        if not p.exists():
            continue
        z = json.loads(p.read_text())
        paper = sum(z[t]["acc"] for t in PAPER_TASKS) / len(PAPER_TASKS)
        wall = (load(f"zeroshot-{n}-time") or {}).get("wall_s")
        out.append(f"| {n} | " + " | ".join(f(z[t]["acc"], ".3f") for t in PAPER_TASKS) + f" | {paper:.3f} | "
                   f"{f(z['piqa']['acc'], '.3f')} | {z['mean']:.3f} | {z[PAPER_TASKS[0]]['n']} | {f(wall, '.0f')} |")
    return "\n".join(out)


def slicegpt_table() -> str:
    out = ["| rotation | slicing | hidden | LM head | params | params vs dense | WikiText-2 ppl | file MiB (fp32) | compress s |",
           "|---|---|---|---|---|---|---|---|---|"]
    dense = load("llama-dense")
    if dense:
        out.append(f"| dense | 0 | 576 | 576 | - | 1 | {dense['eval']['wikitext2']['ppl']:.2f} | {file_mib('llama-dense'):.0f} | - |")
    for r in ("shared", "per-block"):
        for tail in ("", "-slicehead"):  # the head at full width (the default, as the reference), then sliced
            for s in ("0.1", "0.2", "0.25", "0.3"):
                name = f"llama-slicegpt-{r}-{s}{tail}"
                m = load(name)
                if not m:
                    continue
                sl = m["slicegpt"]
                head = sl.get("head_width", sl["new_dim"])  # manifests before the option sliced the head
                out.append(f"| {r} | {s} | {sl['new_dim']} | {head}{' (sliced)' if head == sl['new_dim'] else ''} | "
                           f"{sl['params_after']:,} | {sl['params_after'] / sl['params_before']:.3f} | "
                           f"{m['eval']['wikitext2']['ppl']:.2f} | {file_mib(name):.0f} | {m['timings']['compress_s']:.0f} |")
    return "\n".join(out)


def slicegpt_bench_table() -> str:
    out = ["| model | batch | ms / token (median) | tokens/s | speedup vs dense |", "|---|---|---|---|---|"]
    for r in ("shared", "per-block"):
        b = load(f"bench-slicegpt-{r}-0.25")
        if not b:
            continue
        for row in b["decode"]["rows"]:
            out.append(f"| {row['model'] if row['model'] == 'dense' else f'slicegpt {r} 0.25'} | {row['batch']} | "
                       f"{row['ms_per_step_median']:.1f} | {row['tokens_per_s']:.1f} | {f(row.get('speedup_vs_dense'))} |")
    return "\n".join(out)


# PERP's rows: (label, the compressed output, its recovered one)
PERPS = [(f"Wanda {s}%", f"llama-wanda-{s}", f"llama-wanda-{s}-perp") for s in ("60", "70")] + [
    ("SliceGPT per-block 25%", "llama-slicegpt-per-block-0.25", "llama-slicegpt-per-block-0.25-perp")]


def perp_table() -> str:
    out = [("| compressed | ppl before | ppl after PERP | dense ppl | gap closed | steps | adapted linears | trainable "
            "| wall s | peak RSS MiB | sparsity before / after |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = (load("llama-dense") or {}).get("eval", {}).get("wikitext2", {}).get("ppl")
    for label, a, b in PERPS:
        src, m = load(a), load(b)
        if not (src and m):
            continue
        ev, rc = m["eval"]["wikitext2"], m["recover"]
        before, after = ev["before_recover_ppl"], ev["ppl"]
        closed = (before - after) / (before - dense) if dense else None
        sp = f"{src['sparsity']['measured']:.4f} / {m['sparsity']['measured']:.4f}" if src.get("sparsity") else "-"
        out.append(f"| {label} | {before:.2f} | {after:.2f} | {f(dense)} | {f(closed, '.0%')} | {rc['steps']} | "
                   f"{rc['adapted_linears']} | {rc['fraction']:.3%} | {rc['wall_s']:.0f} | {m['peak_rss_mib']:.0f} | {sp} |")
    return "\n".join(out)


def replot() -> None:
    """Re-render each sweep's PNG from its sweep.json (what `llmprune sweep` plotted at the end)."""
    from llmprune import report

    for d in sorted(p.parent for p in R.glob("*/sweep.json")):
        rows = json.loads((d / "sweep.json").read_text())
        report.plot_sweep([r for r in rows if r["solver"] != "dense"], d / "sweep.png")


# --- headline tables (README): SmolLM2-135M, P-cpu, one row per saved output -----------------------------

def _ppl(m: dict | None) -> float | None:
    return ((m or {}).get("eval", {}).get("wikitext2") or {}).get("ppl")


def pack_wall(name: str, log: str = "p_cpu.log") -> float | None:
    """Wall seconds of the `llmprune pack` (or other) command that made runs/NAME, from `log` (p_cpu.log): the
    last `### NAME` section (a rerun's header may add a note in parentheses); None when that section has no
    `wall` line (a command run by hand)."""
    p = R / log
    if not p.exists():
        return None
    mine, wall = False, None
    for line in p.read_text(errors="replace").splitlines():
        if line.startswith("### "):
            mine = bool(re.match(rf"### {re.escape(name)}(\s\s|\s\(|$)", line))
            if mine:
                wall = None  # a later run of NAME replaces the earlier one
        elif mine and (w := re.match(r"wall ([\d.]+) s", line)):
            wall = float(w[1])
    return wall


PRUNE_ROWS = [("llama-dense", "unpruned"), ("llama-magnitude-50", "magnitude 50%"), ("llama-wanda-50", "Wanda 50%"),
              ("llama-sparsegpt-50", "SparseGPT 50%"), ("llama-wanda-60", "Wanda 60%"), ("llama-wanda-70", "Wanda 70%"),
              ("llama-wanda-24", "Wanda 2:4"), ("llama-sparsegpt-24", "SparseGPT 2:4"),
              # bash bench/p_cpu.sh alps_speed: ALPS and SparseGPT back to back, alone on the machine
              ("llama-alps-24", "ALPS 2:4"), ("llama-sparsegpt-70", "SparseGPT 70%"), ("llama-alps-70", "ALPS 70%")]


def head_prune() -> str:
    """Pruned SmolLM2, saved dense (zeros in place, fp32): ppl, file, compress time."""
    out = ["| SmolLM2-135M | sparsity (measured) | WikiText-2 ppl | file MiB | compress s | manifest |",
           "|---|---|---|---|---|---|"]
    dagger = False
    for name, label in PRUNE_ROWS:
        m = load(name)
        if not m:
            continue
        pruned = bool(m.get("sparsity", {}).get("target"))
        mark = "" if in_memory_figure(m) is False else " †"
        dagger |= bool(mark)
        out.append(f"| {label} | {m['sparsity']['measured']:.4f} | {f(_ppl(m))}{mark} | {file_mib(name):.0f} | "
                   f"{f(m['timings']['compress_s'] if pruned else None, '.0f')} | `{name}` |")
    if dagger:
        out.append("\n† measured on the model in memory right after pruning, by a release that did not yet evaluate "
                   "the saved file (manifest format 1); not re-measured yet.")
    return "\n".join(out)


def in_memory_figure(m: dict) -> bool:
    """Whether a dense output's WikiText-2 figure was taken on the model in memory (format-1 manifests
    of `compress`), not on the saved folder (every newer manifest says `measured_on`)."""
    e = (m.get("eval") or {}).get("wikitext2") or {}
    return "measured_on" not in e and not (m.get("format") or {}).get("layers")


FORMAT_ROWS = ["llama-dense", "llama-dense-w4g128-rtn", "llama-dense-w4g128-gptq", "llama-dense-w4g128-gptq-tune64",
               "llama-wanda-24-sparse24", "llama-sparsegpt-24-w4s24-rtn-g48", "llama-sparsegpt-24-w4s24-gptq-g48",
               "llama-sparsegpt-24-w4s24-gptq-g48-tune64", "llama-wanda-g16-w4s50-gptq"]


def head_formats() -> str:
    """SmolLM2 packed: format, what it packs, quantizer; ppl of the packed folder, file, time to make it."""
    out = [("| format | from | int4 (grid, group) | WikiText-2 ppl | vs source | file MiB | compress s (prune + pack) "
            "| manifest |"), "|---|---|---|---|---|---|---|---|"]
    for name in FORMAT_ROWS:
        m = load(name)
        if not m:
            continue
        fm = m.get("format") or {}
        src = load(Path(m["packed_from"]).name) if m.get("packed_from") else m
        pruned = bool((src or {}).get("sparsity", {}).get("target"))
        what = f"{src['solver']} {src['pattern']}" if pruned else "unpruned"
        q = "-"
        if fm.get("quant"):
            lay = next(iter(fm["layers"].values()))
            groups = "/".join(map(str, sorted({x["group_size"] for x in fm["layers"].values()})))
            q = f"{fm['quant']} ({'sym' if lay['symmetric'] else 'asym'}, {groups})"
            o = fm.get("quant_options") or {}
            if o.get("tune_steps"):
                q += f" + scales tuned {o['tune_steps']} steps" + (" (not kept)" if o.get("tune", {}).get("kept") == "gptq"
                                                                     else "")
        ppl, note = _ppl(m), ""  # measured on the packed folder, or not shown (never the source's figure)
        same = _same_source(src, m)  # else the source was re-run since, under other libraries: no ratio
        rel = f"{ppl / _ppl(src):.3f}" if ppl and _ppl(src) and src is not m and same else "-"
        note += "" if same else " *"
        parts = [f(src["timings"]["compress_s"], ".0f")] if pruned else []  # the source's pruning
        if src is not m:
            parts.append(f(pack_wall(name), ".0f"))  # this pack command ("-": not in p_cpu.log)
        t = " + ".join(parts) or "-"
        out.append(f"| {fm.get('name', 'dense (fp32)')} | {what} | {q} | {f(ppl)}{note} | {rel} | "
                   f"{file_mib(name):.0f} | {t} | `{name}` |")
    if any(" * |" in r for r in out):
        out.append("\n`*`: packed before its source was run again under other libraries: no ratio to it.")
    return "\n".join(out)


def head_slicegpt() -> str:
    out = ["| rotation | slicing | hidden | WikiText-2 ppl | params vs dense | file MiB (fp32) | compress s | manifest |",
           "|---|---|---|---|---|---|---|---|"]
    for r in ("shared", "per-block"):
        for s in ("0.1", "0.2", "0.25", "0.3"):
            for tail in ("", "-slicehead"):
                name = f"llama-slicegpt-{r}-{s}{tail}"
                m = load(name)
                if not m:
                    continue
                sl = m["slicegpt"]
                head = sl.get("head_width", sl["new_dim"])
                out.append(f"| {r}{', head sliced' if head == sl['new_dim'] else ''} | {s} | {sl['new_dim']} | "
                           f"{f(_ppl(m))} | {sl['params_after'] / sl['params_before']:.3f} | {file_mib(name):.0f} | "
                           f"{m['timings']['compress_s']:.0f} | `{name}` |")
    return "\n".join(out)


def head_perp() -> str:
    out = ["| compressed | ppl before | ppl after PERP | file MiB | compress s (compress + recover) | manifest |",
           "|---|---|---|---|---|---|"]
    for label, a, b in PERPS:
        src, m = load(a), load(b)
        if not (src and m):
            continue
        ev = m["eval"]["wikitext2"]
        out.append(f"| {label} | {ev['before_recover_ppl']:.2f} | {ev['ppl']:.2f} | {file_mib(b):.0f} "
                   f"| {src['timings']['compress_s']:.0f} + {m['recover']['wall_s']:.0f} | `{b}` |")
    return "\n".join(out)


def gpu_section(heading: str) -> str:
    """The first Markdown table under `## HEADING...` of results/gpu/SUMMARY.md (bench/gpu_summary.py)."""
    p = R / "gpu" / "SUMMARY.md"
    if not p.exists():
        return ""
    lines, inside, table = p.read_text().splitlines(), False, []
    for line in lines:
        if line.startswith("## "):
            if table:
                break
            inside = line[3:].startswith(heading)
        elif inside and line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


def export_table() -> str:
    """bench/export_table.py's table (bench/results/export, made by bench/export.sh)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_table", Path(__file__).parent / "export_table.py")
    et = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(et)
    if not (et.RES / "sizes.txt").exists():
        return ""
    rows = ["| model | artifact | read by | MiB | windows of 2048 | WikiText-2 ppl | ratio |", "|---|---|---|---|---|---|---|"]
    for src, label in (("dense", "SmolLM2-135M"), ("wanda-50", "Wanda 50%")):
        rows += et.rows(src, label)
    return "\n".join(rows + et.gemma_rows())


def scale_table() -> str:
    """The Llama-3-8B-shaped runs of bench/scale_cpu.sh (random weights, bf16 on disk, fp32 compute on
    this 2-core CPU, 8 x 256 calibration): time, peak RSS, bytes read and written."""
    rows = []
    for p in sorted((R / "scale").glob("*.json")):
        m = json.loads(p.read_text())
        if (p.name.startswith("old-") or m.get("packed_from") or m.get("exported_from") or m.get("recovered_from")
                or p.stem.startswith("zeroshot-")):
            continue  # (packs and exports: scale_pack_table; PERP: scale_perp_table; scale_zeroshot_table)
        cfg = m.get("model", {})
        layers = (m.get("config") or {}).get("model", "")
        n = re.search(r"-l(\d+)$", str(layers))
        io = m.get("io_bytes") or {}
        t = m["timings"]
        sl = m.get("slicegpt") or {}
        pattern = f"{sl['rotation']} {sl['slicing']:.0%}" if sl else m.get("pattern")  # SliceGPT: rotation, slicing
        fmt = m.get("format") or {}
        if fmt.get("name", "dense") != "dense":  # (compress --format)
            pattern = f"{pattern} + {fmt['name']} {fmt.get('quant', '')}".rstrip()
        rows.append((int(n[1]) if n else 32, p.stem, m.get("solver"), pattern, t.get("compress_s"),
                     t.get("total_s"), m.get("peak_rss_mib"), io.get("read_bytes"), io.get("write_bytes"), _ppl(m),
                     m.get("onload"), cfg))
    if not rows:
        return ""
    out = ["| run | blocks | solver | evaluated | compress s | total s | peak RSS MiB | disk read GB | written GB |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for n, name, solver, pat, cs, ts, rss, rd, wr, ppl, onl, _ in sorted(rows, key=lambda r: (r[1][:5], r[0])):
        out.append(f"| `{name}` | {n} | {solver} {pat} | {'ppl, 2 x 256' if ppl else 'no'} | {f(cs, '.0f')} | "
                   f"{f(ts, '.0f')} | {f(rss, ',.0f')} | {f(rd / 1e9 if rd else None, '.1f')} | "
                   f"{f(wr / 1e9 if wr else None, '.1f')} |")
    return "\n".join(out)


def _blocks(p: Path) -> int | None:
    """The depth in a scale run's name (pack-l16-w4g128 -> 16)."""
    n = re.search(r"-l(\d+)-", p.stem)
    return int(n[1]) if n else None


def scale_pack_table() -> str:
    """bench/scale_cpu.sh pack_export: pack and export of a saved 8B-width output, 4 and 16 blocks; each
    command's own peak RSS (its manifest) and wall time (scale.log)."""
    out = ["| run | blocks | command | reads the source | wall s | peak RSS MiB | disk read GB | written GB |",
           "|---|---:|---|---|---:|---:|---:|---:|"]
    for p in sorted((R / "scale").glob("*.json"), key=lambda p: (re.sub(r"-l\d+-", "-", p.stem), _blocks(p) or 0)):
        m = json.loads(p.read_text())  # by command, then depth
        if not (m.get("packed_from") or m.get("exported_from")):
            continue
        n = _blocks(p)
        e = m.get("export") or {}
        what = (f"export --to {e['to']}" + (f" --type {','.join(e['types'])}" if e.get("types") else "")
                + (f" --quant {e['quant']['quant']}" if e.get("quant") else "")
                + f" (from {e.get('source_format', '').split(' ')[0]})") if e else \
            f"pack --format {m['format']['name']} ({m['format'].get('quant') or 'rtn'})"
        io = m.get("io_bytes") or {}
        rd, wr = io.get("read_bytes"), io.get("write_bytes")
        out.append(f"| `{p.stem}` | {n or '-'} | {what} | {'whole' if 'whole' in p.stem else 'block by block'} "
                   f"| {f(pack_wall(p.stem, 'scale/scale.log'), '.0f')} | {f(m.get('peak_rss_mib'), ',.0f')} | "
                   f"{f(rd / 1e9 if rd else None, '.1f')} | {f(wr / 1e9 if wr else None, '.1f')} |")
    return "\n".join(out) if len(out) > 2 else ""


def scale_perp_table() -> str:
    """bench/scale_cpu.sh perp: PERP of a saved 8B-width output (2 steps of 1 x 128 tokens), each run's own
    peak RSS against the bytes of its weights in the dtype it trained in; old-perp-*: the same command
    before the frozen weights stayed in their dtype."""
    out = ["| run | code | blocks | parameters | loaded in | frozen weights while training | their GB | peak RSS MiB | recover s |",
           "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for p in sorted((R / "scale").glob("*perp-*.json"), key=lambda p: (p.stem.startswith("old-"), _blocks(p) or 0, p.stem)):
        m = json.loads(p.read_text())  # the current code first, then by depth
        r = m.get("recover")
        if not r:
            continue
        n = _blocks(p)
        dtype = r.get("dtype") or m.get("dtype")
        frozen = r.get("frozen_dtype") or "float32 (upcast)"
        nbytes = r["n_total"] * (2 if frozen in ("bfloat16", "float16") else 4)
        out.append(f"| `{p.stem}` | {'before' if p.stem.startswith('old-') else 'now'} | {n or '-'} | "
                   f"{r['n_total'] / 1e9:.2f}B | {dtype} | {frozen} | {nbytes / 1e9:.1f} | "
                   f"{f(m.get('peak_rss_mib'), ',.0f')} | {f(r.get('wall_s'), '.0f')} |")
    return "\n".join(out) if len(out) > 2 else ""


def scale_zeroshot_table() -> str:
    """bench/scale_cpu.sh zeroshot: `llmprune eval --tasks` of a saved 8B-width output, 4 and 16 blocks; wall
    time and peak RSS from /usr/bin/time (NAME.time); old-zeroshot-*: the same command before it walked the
    blocks (the whole model placed by accelerate)."""
    out = ["| run | code | blocks | loaded in | how | tasks (examples) | wall s | peak RSS MiB |",
           "|---|---|---:|---|---|---|---:|---:|"]
    for p in sorted((R / "scale").glob("*zeroshot-*.json"), key=lambda p: (p.stem.startswith("old-"), _blocks(p) or 0)):
        zs, t = json.loads(p.read_text()), p.with_suffix(".time")
        wall, rss = (re.search(r"wall ([\d.]+) s, max RSS (\d+) KiB", t.read_text()).groups() if t.exists()
                     else (None, None))
        old = p.stem.startswith("old-")
        tasks = ", ".join(f"{k} ({v['n']})" for k, v in zs.items() if isinstance(v, dict) and "acc" in v)
        out.append(f"| `{p.stem}` | {'before' if old else 'now'} | {_blocks(p) or '-'} | {p.stem.rsplit('-', 1)[-1]} | "
                   f"{'whole (accelerate device_map)' if old else 'block by block'} | {tasks} | "
                   f"{f(float(wall) if wall else None, '.0f')} | {f(int(rss) / 1024 if rss else None, ',.0f')} |")
    return "\n".join(out) if len(out) > 2 else ""


def script_table(script: str, *args) -> str:
    """The Markdown table a bench script prints: bench/scale_estimate.py's per-GPU memory, bench/perp_placement.py's
    PERP plans (arithmetic from the public configs and llmprune's own planner, not measurements)."""
    import contextlib
    import importlib
    import io

    sys.path.insert(0, str(Path(__file__).parent))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        importlib.import_module(script).main(*args)
    return "\n".join(line for line in buf.getvalue().splitlines() if line.startswith("|"))


TABLES = {"base": base_table, "formats": formats_table, "sweep": sweep_wide, "quant": quant_ablation_table,
          "zeroshot": zeroshot_table, "slicegpt": slicegpt_table, "slicegpt-bench": slicegpt_bench_table,
          "perp": perp_table, "solvers-seeds": seed_table, "solvers-seeds-24": lambda: seed_table("2:4"),
          "solvers-seeds-50": lambda: seed_table("50%"), "solvers-24": lambda: sweep_table("solvers-24"), "solvers": solver_grid,
          "solvers-time": lambda: solver_grid("compress_s", ".0f"),
          "solvers-rss": lambda: solver_grid("peak_rss_mib", ",.0f"),
          "head-prune": head_prune, "head-formats": head_formats, "head-slicegpt": head_slicegpt, "head-perp": head_perp,
          "gpu-kernels": lambda: gpu_section("Kernels against the targets"),
          "gpu-decode": lambda: gpu_section("End-to-end decode"), "gpu-shapes": lambda: gpu_section("Kernel times per shape"),
          "gpu-linears": lambda: gpu_section("The decoder linears alone"), "export": export_table,
          "scale": scale_table, "scale-pack": scale_pack_table,
          "scale-perp": scale_perp_table, "scale-zeroshot": scale_zeroshot_table, "scale-estimate": lambda: script_table("scale_estimate", []),
          "scale-perp-placement": lambda: script_table("perp_placement")}

SPAN = re.compile(r"^<!-- table:([\w-]+) -->.*?^<!-- /table -->", re.DOTALL | re.MULTILINE)  # markers open lines


def pages(root: Path = ROOT) -> list[Path]:
    """The files whose spans are filled: README.md and every docs/*.md."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def fill(paths: list[Path], only: set[str] | None = None, write: bool = True, root: Path | None = None) -> list[str]:
    """Replace each `<!-- table:NAME -->` ... `<!-- /table -->` span of the files with TABLES[NAME]() (only the
    NAMEs in `only`, when given). Returns "FILE: table NAME" for each span whose text changes (or would, with
    write=False); unknown NAMEs are left as they are, with a warning on stderr. Each table is computed once."""
    cache: dict[str, str] = {}
    changed: list[str] = []
    for path in paths:
        text = path.read_text()
        shown = path.relative_to(root) if root and path.is_relative_to(root) else path

        def one(m, shown=shown):
            name = m.group(1)
            if only and name not in only:
                return m.group(0)
            if name not in TABLES:
                print(f"make_tables: warning: {shown}: no table named {name!r}; span left as it is", file=sys.stderr)
                return m.group(0)
            if name not in cache:
                cache[name] = TABLES[name]() or "(not measured yet)"
            new = f"<!-- table:{name} -->\n{cache[name]}\n<!-- /table -->"
            if new != m.group(0):
                changed.append(f"{shown}: table {name}")
            return new

        new_text = SPAN.sub(one, text)
        if write and new_text != text:
            path.write_text(new_text)
    return changed


def fill_readme(path: Path, only: set[str] | None = None) -> None:
    """One file's spans (kept for callers of the single-file version)."""
    fill([path], only)


def print_all() -> None:
    print("## Pruning (P-cpu)\n\n" + base_table())
    print("\n## Formats\n\n" + formats_table() + "\n\n" + FORMAT_NOTES)
    for s in ("solvers-50", "solvers-60", "solvers-70", "solvers-24", "sweep"):
        t = sweep_table(s)
        if t:
            print(f"\n## {s}\n\n{t}")
    for title, t in (("Sweep (WikiText-2 ppl; bench/results/sweep/sweep.png)", sweep_wide()),
                     ("int4 grid ablation (bench/quant_ablation.py)", quant_ablation_table()),
                     ("Zero-shot (first `limit` examples of each task, offline task copies)", zeroshot_table()),
                     ("SliceGPT (P-cpu)", slicegpt_table()), ("SliceGPT decode on this CPU", slicegpt_bench_table()),
                     ("PERP recovery (P-cpu)", perp_table()),
                     ("70% across calibration seeds", seed_table())):
        if t.count("\n") > 1:
            print(f"\n## {title}\n\n{t}")


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Render the result tables from bench/results.")
    ap.add_argument("--replot", action="store_true", help="re-render results/*/sweep.png from sweep.json")
    ap.add_argument("--readme", action="store_true", help="fill the table spans of README.md and docs/*.md")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a span would change")
    ap.add_argument("tables", nargs="*", help="only these span names (default: every span)")
    a = ap.parse_args(argv)
    if a.replot:
        replot()
    if a.readme or a.check:
        changed = fill(pages(root), set(a.tables) or None, write=not a.check, root=root)
        if a.check:
            if changed:
                print("make_tables: stale (run `python bench/make_tables.py --readme`):\n  " + "\n  ".join(changed),
                      file=sys.stderr)
                return 1
            print("make_tables: every table span matches bench/results")
        else:
            print("make_tables: " + (f"rewrote {len(changed)} span(s): " + ", ".join(changed) if changed
                                     else "every table span already matched"))
        return 0
    if not a.replot:
        print_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
