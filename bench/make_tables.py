"""Render the README's result tables from bench/results (made by bench/p_cpu.sh).

    python bench/make_tables.py > bench/results/tables.md
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
    for n in ("llama-wanda-50", "llama-wanda-24", "llama-sparsegpt-24", "llama-magnitude-50", "llama-sparsegpt-50",
              "gemma3-wanda-50"):
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
    rows = ["| model | format | quant | linears packed | linear bytes vs fp16 | file MiB | WikiText-2 ppl |",
            "|---|---|---|---|---|---|---|"]
    sets = [("llama", "llama-wanda-24", [("llama-wanda-24-sparse24", "llama-wanda-24"), ("llama-wanda-24-w4s24-rtn", None),
                                         ("llama-wanda-24-w4s24-gptq", None)]),
            ("llama", "llama-dense", [("llama-dense-w4g128-rtn", None), ("llama-dense-w4g128-gptq", None)]),
            ("llama", "llama-wanda-g16", [("llama-wanda-g16-w4s50-rtn", None), ("llama-wanda-g16-w4s50-gptq", None)]),
            ("gemma3", None, [("gemma3-sparse24", None), ("gemma3-w4s24", None), ("gemma3-w4g128", None),
                              ("gemma3-w4s50", None)])]
    for model, src, outs in sets:
        s = load(src) if src else None
        if s and "eval" in s:
            rows.append(f"| {model} | dense (zeros in place), {s['pattern'] if s.get('sparsity', {}).get('target') else 'unpruned'}"
                        f" | - | - | 1 (fp32 file: 2x) | {file_mib(src):.0f} | {f(s['eval']['wikitext2']['ppl'])} |")
        for name, same_ppl_as in outs:
            m = load(name)
            if not m or "format" not in m:
                continue
            packed, dense = _bytes(m)
            ppl = (m.get("eval", {}).get("wikitext2") or {}).get("ppl")
            src_m = load(Path(m["packed_from"]).name) if m.get("packed_from") else None
            if src_m and ppl == (src_m.get("eval", {}).get("wikitext2") or {}).get("ppl"):
                ppl = None  # copied from the source by an older `pack`, not measured on the packed model
            note = ""
            if ppl is None and same_ppl_as and load(same_ppl_as):
                ppl, note = load(same_ppl_as)["eval"]["wikitext2"]["ppl"], " (= the 2:4 model: lossless for its fp16 weights)"
            rows.append(f"| {model} | {m['format']['name']} | {m['format'].get('quant') or '-'} | {len(m['format']['layers'])} | "
                        f"{packed / dense:.3f} | {file_mib(name):.0f} | {f(ppl)}{note} |")
    return "\n".join(rows)


FORMAT_NOTES = """Byte ratios count the packed linear layers against fp16; file MiB is the whole safetensors
file (fp16 embeddings and norms). `--group-size auto` picks 64 for SmolLM2's 576-wide inputs and 128
for its 1536-wide `down_proj`. The two w4s24 files were written before fp16 storage became the
default and keep fp32 embeddings (hence 149 MiB); their linear bytes are unaffected."""


def file_mib(name: str) -> float:
    d = Path(__file__).parents[1] / "runs" / name
    return sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**20 if d.exists() else float("nan")


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


def zeroshot_table() -> str:
    tasks = ["boolq", "rte", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]
    out = ["| model | " + " | ".join(tasks) + " | mean (7) |", "|---" * (len(tasks) + 2) + "|"]
    for n in ("llama-dense", "llama-wanda-50", "llama-wanda-24"):
        p = R / f"zeroshot-{n}.json"
        if not p.exists():
            continue
        z = json.loads(p.read_text())
        out.append(f"| {n} | " + " | ".join(f(z[t]["acc"], ".3f") for t in tasks) + f" | {z['mean']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print("## Pruning (P-cpu)\n\n" + base_table())
    print("\n## Formats\n\n" + formats_table() + "\n\n" + FORMAT_NOTES)
    for s in ("solvers-50", "solvers-60", "solvers-70", "solvers-24", "sweep"):
        t = sweep_table(s)
        if t:
            print(f"\n## {s}\n\n{t}")
    z = zeroshot_table()
    if z.count("\n") > 1:
        print("\n## Zero-shot (first 100 examples of each task)\n\n" + z)
