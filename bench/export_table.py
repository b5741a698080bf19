"""The README's export table from bench/results/export (made by bench/export.sh): for each SmolLM2 source,
llmprune's own outputs next to their exports, each file's size and its WikiText-2 perplexity as the
reader named in the row computes it (16 windows of 2048, the same tokens everywhere).

    python bench/export_table.py
"""
from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).resolve().parent / "results" / "export"


def sizes() -> dict[str, int]:
    """file name (runs/export/<folder>/<file>) -> bytes, from `ls -l` in sizes.txt."""
    out = {}
    for line in (RES / "sizes.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 9:
            out["/".join(Path(parts[-1]).parts[-2:])] = int(parts[4])
    return out


def ppl(name: str) -> float | None:
    m = json.loads((RES / f"{name}.json").read_text())
    return (m.get("eval", {}).get("wikitext2") or {}).get("ppl")


def llamacpp() -> dict[str, float]:
    rows = [json.loads(x) for x in (RES / "llamacpp.jsonl").read_text().splitlines() if x.strip()]
    return {"/".join(Path(r["gguf"]).parts[-2:]): r["ppl"] for r in rows}


def rows(src: str, label: str) -> list[str]:
    sz, lc = sizes(), llamacpp()
    base = ppl(f"llama-{src}")
    w4 = ppl(f"llama-{src}-w4g128")

    def line(what, reader, file, p, ref, ref_name):
        mib = f"{sz[file] / 2**20:.0f}" if file in sz else "-"
        vs = f"{p / ref:.4f} ({ref_name})" if p and ref else "-"
        return f"| {label} | {what} | {reader} | {mib} | {p:.2f} | {vs} |" if p else \
            f"| {label} | {what} | {reader} | {mib} | - | - |"

    out = [line("llmprune dense (fp32, zeros in place)", "llmprune.load", f"llama-{src}/model.safetensors", base,
                None, ""),
           line("llmprune w4g128 (RTN, symmetric)", "llmprune.load", f"llama-{src}-w4g128/model.safetensors", w4,
                base, "dense"),
           line("compressed-tensors W4A16 (its codes)", "transformers", f"llama-{src}-w4g128-ct/model.safetensors",
                ppl(f"llama-{src}-w4g128-ct"), w4, "w4g128")]
    for t in ("F16", "Q8_0", "Q4_0"):
        f = f"llama-{src}-gguf/llama-{src}-{t}.gguf"
        out.append(line(f"GGUF {t}", "llama.cpp", f, lc.get(f), base, "dense"))
    return out


def main() -> None:
    print("| model | artifact | read by | MiB | WikiText-2 ppl | ratio (to) |")
    print("|---|---|---|---|---|---|")
    for src, label in (("dense", "SmolLM2-135M"), ("wanda-50", "Wanda 50%")):
        print("\n".join(rows(src, label)))


if __name__ == "__main__":
    main()
