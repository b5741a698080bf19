"""Render the README's result tables from bench/results (made by bench/p_cpu.sh).

    python bench/make_tables.py > bench/results/tables.md
    python bench/make_tables.py --replot    # also re-render results/*/sweep.png from sweep.json
    python bench/make_tables.py --readme    # rewrite the README's <!-- table:NAME --> spans in place
    python bench/make_tables.py --readme solvers slicegpt    # only those spans
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

R = Path(__file__).parent / "results"


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
        rows.append(f"| {m['model']['asked']} | {m['solver']} | {m['pattern']} | {m['sparsity']['measured']:.4f} | "
                    f"{f(ev.get('dense_ppl'))} | {f(ev.get('ppl'))} | {t['compress_s']:.0f} ({t.get('forward_s', 0):.0f} / "
                    f"{t.get('solve_s', 0):.0f}) | {m['peak_rss_mib']:.0f} |")
    return "\n".join(rows)


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
        s = load(src) if src else None
        base_ppl = (s or {}).get("eval", {}).get("wikitext2", {}).get("ppl")
        if src == "gemma3-dense" and base_ppl is None and load("gemma3-wanda-50"):
            # measured once, by the Wanda run's dense evaluation (same protocol): not again for 12 min
            base_ppl = load("gemma3-wanda-50")["eval"]["wikitext2"].get("dense_ppl")
        what = "-"
        if s:
            what = f"{s['solver']} {s['pattern']}" if s.get("sparsity", {}).get("target") else "unpruned"
        if s:
            rows.append(f"| {model} | {what} | dense (zeros in place) | - | - | 1 (fp32 file: 2x) | {file_mib(src):.0f} | "
                        f"{f(base_ppl)} | 1 |")
        for name, same_ppl_as in outs:
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
            note = ""
            if ppl is None and same_ppl_as and load(same_ppl_as):
                ppl, note = load(same_ppl_as)["eval"]["wikitext2"]["ppl"], " (= the 2:4 model: lossless for its fp16 weights)"
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
            rel = f"{ppl / base_ppl:.3f}" if ppl and base_ppl else "-"
            rows.append(f"| {model} | {what} | {fm['name']} | {q} | {len(fm['layers'])} | "
                        f"{packed / dense:.3f} | {file_mib(name):.0f} | {f(ppl)}{note} | {rel} |")
    return "\n".join(rows)


FORMAT_NOTES = """Byte ratios count the packed linear layers against fp16; file MiB is the whole safetensors
file (fp16 embeddings and norms). `--group-size auto` picks 64 for SmolLM2's 576-wide inputs and 128
for its 1536-wide `down_proj`. The Wanda w4s24 RTN and plain-GPTQ files were written before fp16
storage became the default and keep fp32 embeddings (hence 149 MiB); their linear bytes are
unaffected. That plain-GPTQ row also predates block-sequential GPTQ (every Hessian from the
unquantized model); every other GPTQ row is block-sequential (`packed.gptq_sequential`). Gemma-3's
magnitude rows are sizes only; its quality rows (`bash bench/p_cpu.sh gemma`) use a SparseGPT 2:4 model
and the unpruned one, whose 25.05 comes from the Wanda 50% run's dense evaluation."""


def file_mib(name: str) -> float:
    """The safetensors MiB of runs/NAME, or as recorded in results/file_sizes.json (p_cpu.sh's `run` records
    each output's bytes there: runs/ is not kept; the entries older than that are the README's rounded MiB)."""
    d = Path(__file__).parents[1] / "runs" / name
    if d.exists():
        return sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**20
    sizes = load("file_sizes") or {}
    return sizes[name] / 2**20 if name in sizes else float("nan")


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


def _grid_rows() -> dict:
    """{(base solver, with OWL, column): row} over the solvers-* sweeps."""
    rows = {}
    for folder, col in GRID:
        for p in _overlays(folder):
            for r in (csv.DictReader(p.open()) if p.exists() else []):
                if r["solver"] != "dense":
                    r["label"] = label = _label(r, p.parent.name)
                    rows[(label.replace("+owl", ""), "+owl" in label, col)] = r
    return rows


def _order(label: str) -> tuple:
    name = label.split("+")[0].split(" ")[0]
    return (ORDER.index(name) if name in ORDER else len(ORDER), OLD_DSNOT not in label, label)


def solver_grid(key: str = "ppl_wikitext2", spec: str = ",.2f") -> str:
    """Solvers down, sparsity (uniform, +OWL) across: WikiText-2 ppl, or another sweep.csv column."""
    rows = _grid_rows()
    if not rows:
        return ""
    solvers = sorted(dict.fromkeys(b for b, _, _ in rows), key=_order)
    cols = [(c, o) for _, c in GRID for o in ((False, True) if c != "2:4" else (False,))
            if any((b, o, c) in rows for b in solvers)]
    out = ["| solver | " + " | ".join(f"{c}{' +OWL' if o else ''}" for c, o in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for b in solvers:
        cells = [rows.get((b, o, c), {}).get(key) or None for c, o in cols]
        cells = [float(x) if x is not None else None for x in cells]
        out.append(f"| {b} | " + " | ".join(f(x, spec) for x in cells) + " |")
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
                seeds.setdefault(k, {})[_label(r, p.parent.name)] = r
    if len(seeds) < 2:
        return ""
    ks = sorted(seeds)
    names = sorted(dict.fromkeys(n for k in ks[1:] for n in seeds[k]), key=_order)
    ppl = {(n, k): float(seeds[k][n]["ppl_wikitext2"]) for k in ks for n in seeds[k]}
    out = [f"| {col} solver | " + " | ".join(f"seed {k}" for k in ks) + " | mean | against | ratio per seed | ratio of means |",
           "|---" * (len(ks) + 5) + "|"]
    for n in names:
        vals = [ppl.get((n, k)) for k in ks]
        got = [v for v in vals if v is not None]
        b = _against(n)
        paired = [k for k in ks if b and (n, k) in ppl and (b, k) in ppl]
        ratios = [f"{ppl[(n, k)] / ppl[(b, k)]:.3f}" for k in paired]
        rm = (sum(ppl[(n, k)] for k in paired) / sum(ppl[(b, k)] for k in paired)) if paired else None
        out.append(f"| {n} | " + " | ".join(f(v, ",.2f") for v in vals) + f" | {sum(got) / len(got):,.2f} | "
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


def perp_table() -> str:
    out = [("| pruned | ppl pruned | ppl after PERP | dense ppl | gap closed | steps | trainable | wall s | peak RSS MiB |"
            " sparsity before / after |"), "|---|---|---|---|---|---|---|---|---|---|"]
    dense = (load("llama-dense") or {}).get("eval", {}).get("wikitext2", {}).get("ppl")
    for s in ("60", "70"):
        src, m = load(f"llama-wanda-{s}"), load(f"llama-wanda-{s}-perp")
        if not (src and m):
            continue
        ev, rc = m["eval"]["wikitext2"], m["recover"]
        before, after = ev["before_recover_ppl"], ev["ppl"]
        closed = (before - after) / (before - dense) if dense else None
        out.append(f"| Wanda {s}% | {before:.2f} | {after:.2f} | {f(dense)} | {f(closed, '.0%')} | {rc['steps']} | "
                   f"{rc['fraction']:.3%} | {rc['wall_s']:.0f} | {m['peak_rss_mib']:.0f} | "
                   f"{src['sparsity']['measured']:.4f} / {m['sparsity']['measured']:.4f} |")
    return "\n".join(out)


def replot() -> None:
    """Re-render each sweep's PNG from its sweep.json (what `llmprune sweep` plotted at the end)."""
    from llmprune import report

    for d in sorted(p.parent for p in R.glob("*/sweep.json")):
        rows = json.loads((d / "sweep.json").read_text())
        report.plot_sweep([r for r in rows if r["solver"] != "dense"], d / "sweep.png")


TABLES = {"base": base_table, "formats": formats_table, "sweep": sweep_wide, "quant": quant_ablation_table,
          "zeroshot": zeroshot_table, "slicegpt": slicegpt_table, "slicegpt-bench": slicegpt_bench_table,
          "perp": perp_table, "solvers-seeds": seed_table, "solvers-seeds-24": lambda: seed_table("2:4"),
          "solvers-seeds-50": lambda: seed_table("50%"), "solvers-24": lambda: sweep_table("solvers-24"), "solvers": solver_grid,
          "solvers-time": lambda: solver_grid("compress_s", ".0f"),
          "solvers-rss": lambda: solver_grid("peak_rss_mib", ",.0f")}


def fill_readme(path: Path, only: set[str] | None = None) -> None:
    """Replace each `<!-- table:NAME -->` ... `<!-- /table -->` span of the README with TABLES[NAME]()
    (only the NAMEs in `only`, when given)."""
    import re

    text = path.read_text()

    def fill(m):
        if only and m.group(1) not in only:
            return m.group(0)
        body = TABLES[m.group(1)]()
        return f"<!-- table:{m.group(1)} -->\n{body or '(not measured yet)'}\n<!-- /table -->"

    path.write_text(re.sub(r"<!-- table:([\w-]+) -->.*?<!-- /table -->", fill, text, flags=re.DOTALL))


if __name__ == "__main__":
    import sys

    if "--replot" in sys.argv:
        replot()
    if "--readme" in sys.argv:  # --readme [TABLE ...]: only those tables
        names = set(sys.argv[sys.argv.index("--readme") + 1:]) - {"--replot"}
        fill_readme(Path(__file__).parents[1] / "README.md", names or None)
        sys.exit(0)
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
