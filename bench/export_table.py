"""The README's export table from bench/results/export (made by bench/export.sh): for each SmolLM2 source,
llmprune's own outputs next to their exports, each file's size and its WikiText-2 perplexity as the reader
named in the row computes it. Rows compared with each other use the same token windows: 16 x 2048 for
llmprune's formats and compressed-tensors, 8 x 2048 (the first 8 of those) for llama.cpp and the
llmprune figure it is compared with; Gemma-3-270M's rows (`export.sh gemma`) 2 x 2048. The Q4_0 file holding a
GPTQ w4g128's own codes (`export.sh q4codes`) is compared with that w4g128 on the same 8 windows; the Q4_0
file GPTQ wrote on export (`export.sh gptqgguf`, groups of 32) with the source on the same 8 windows.

    python bench/export_table.py
"""
from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).resolve().parent / "results" / "export"


def sizes() -> dict[str, int]:
    """"<folder>/<file>" -> bytes, from the `ls -l` listing in sizes.txt."""
    out = {}
    for line in (RES / "sizes.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 9:
            out["/".join(Path(parts[-1]).parts[-2:])] = int(parts[4])
    return out


def manifest_ppl(name: str) -> float | None:
    p = RES / f"{name}.json"
    if not p.exists():
        return None
    return ((json.loads(p.read_text()).get("eval") or {}).get("wikitext2") or {}).get("ppl")


def jsonl() -> list[dict]:
    p = RES / "llamacpp.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def rows(src: str, label: str) -> list[str]:
    sz, runs = sizes(), jsonl()
    lcpp = {"/".join(Path(r["gguf"]).parts[-2:]): r for r in runs if "gguf" in r}
    ref8 = next((r["ppl"] for r in runs if r.get("src", "").endswith(f"/llama-{src}")), None)
    dense16, w4 = manifest_ppl(f"llama-{src}"), manifest_ppl(f"llama-{src}-w4g128")

    def line(what, reader, file, windows, p, ref, ref_name):
        mib = f"{sz[file] / 2**20:.0f}" if file in sz else "-"
        vs = f"{p / ref:.4f} (vs {ref_name})" if p and ref else "-"
        return f"| {label} | {what} | {reader} | {mib} | {windows} | {f'{p:.2f}' if p else '-'} | {vs} |"

    out = [line("llmprune dense (fp32, zeros in place)", "llmprune.load", f"llama-{src}/model.safetensors", 16,
                dense16, None, ""),
           line("llmprune w4g128 (RTN, symmetric)", "llmprune.load", f"llama-{src}-w4g128/model.safetensors", 16,
                w4, dense16, "dense"),
           line("compressed-tensors W4A16 of that w4g128", "transformers", f"llama-{src}-w4g128-ct/model.safetensors",
                16, manifest_ppl(f"llama-{src}-w4g128-ct"), w4, "w4g128"),
           line("llmprune dense (fp32, zeros in place)", "llmprune.load", f"llama-{src}/model.safetensors", 8, ref8,
                None, "")]
    for t in ("F16", "Q8_0", "Q4_0"):
        f = f"llama-{src}-gguf/llama-{src}-{t}.gguf"
        out.append(line(f"GGUF {t}", "llama.cpp", f, 8, (lcpp.get(f) or {}).get("ppl"), ref8, "dense, 8 windows"))
    if manifest_ppl(f"llama-{src}-gptq") is None:  # (`export.sh q4codes`: GGUF Q4_0 holding GPTQ's own codes)
        return out
    gptq8 = next((r["ppl"] for r in runs if r.get("src", "").endswith(f"/llama-{src}-gptq")), None)
    f = f"llama-{src}-gptq-gguf/llama-{src}-gptq-Q4_0.gguf"
    again = f"llama-{src}-gptq-requant/llama-{src}-gptq-Q4_0.gguf"  # (the same export, its codes dropped)
    return [*out, line("llmprune w4g128 (GPTQ, symmetric)", "llmprune.load", f"llama-{src}-gptq/model.safetensors", 8,
                       gptq8, ref8, "dense, 8 windows"),
            line("GGUF Q4_0 holding that w4g128's codes", "transformers", f"llama-{src}-gptq-q4eval/llama-{src}-gptq-"
                 "Q4_0.gguf", 8, manifest_ppl(f"llama-{src}-gptq-q4eval"), gptq8, "w4g128 GPTQ, 8 windows"),
            line("GGUF Q4_0 holding that w4g128's codes", "llama.cpp", f, 8, (lcpp.get(f) or {}).get("ppl"), gptq8,
                 "w4g128 GPTQ, 8 windows"),
            line("GGUF Q4_0 of that w4g128 rounded again by gguf (before)", "llama.cpp", again, 8,
                 (lcpp.get(again) or {}).get("ppl"), gptq8, "w4g128 GPTQ, 8 windows"),
            *(line(f"GGUF {t} holding that w4g128's codes", "llama.cpp", f5, 8, lcpp[f5]["ppl"], gptq8,
                   "w4g128 GPTQ, 8 windows") for t in ("Q5_0", "Q8_0")
              if (f5 := f"llama-{src}-gptq-q5q8/llama-{src}-gptq-{t}.gguf") in lcpp),
            *gptq32_rows(src, line, lcpp, ref8)]


def gptq32_rows(src: str, line, lcpp: dict, ref8: float | None) -> list[str]:
    """`export.sh gptqgguf`: the output exported as Q4_0 by `export --to gguf --quant gptq` (groups of 32),
    read by transformers' GGUF reader and by llama.cpp, against the source's figure on the same 8 windows."""
    name = f"llama-{src}-gptq32-gguf"
    if manifest_ppl(name) is None:
        return []
    f = f"{name}/llama-{src}-Q4_0.gguf"
    what = "GGUF Q4_0, GPTQ on export (groups of 32, symmetric)"
    return [line(what, "transformers", f, 8, manifest_ppl(name), ref8, "dense, 8 windows"),
            line(what, "llama.cpp", f, 8, (lcpp.get(f) or {}).get("ppl"), ref8, "dense, 8 windows")]


def gemma_rows() -> list[str]:
    """Gemma-3-270M unpruned (`bash bench/export.sh gemma`): llmprune's figure and llama.cpp's of its GGUF F16
    and Q8_0 on the same 2 windows (its 262k vocabulary makes a window costly on both sides)."""
    sz, runs = sizes(), jsonl()
    lcpp = {"/".join(Path(r["gguf"]).parts[-2:]): r for r in runs if "gguf" in r}
    ref = next((r["ppl"] for r in runs if r.get("src", "").endswith("/gemma3-dense")), None)
    if ref is None:
        return []
    file = "gemma3-dense/model.safetensors"
    out = [f"| Gemma-3-270M | llmprune dense (fp32) | llmprune.load | {sz[file] / 2**20:.0f} | 2 | {ref:.2f} | - |"
           if file in sz else f"| Gemma-3-270M | llmprune dense (fp32) | llmprune.load | - | 2 | {ref:.2f} | - |"]
    for t in ("F16", "Q8_0"):
        f = f"gemma3-dense-gguf/gemma3-dense-{t}.gguf"
        p = (lcpp.get(f) or {}).get("ppl")
        mib = f"{sz[f] / 2**20:.0f}" if f in sz else "-"
        vs = f"{p / ref:.4f} (vs dense, 2 windows)" if p else "-"
        out.append(f"| Gemma-3-270M | GGUF {t} | llama.cpp | {mib} | 2 | {f'{p:.2f}' if p else '-'} | {vs} |")
    return out


def main() -> None:
    print("| model | artifact | read by | MiB | windows of 2048 | WikiText-2 ppl | ratio |")
    print("|---|---|---|---|---|---|---|")
    for src, label in (("dense", "SmolLM2-135M"), ("wanda-50", "Wanda 50%")):
        print("\n".join(rows(src, label)))
    if gemma_rows():
        print("\n".join(gemma_rows()))


if __name__ == "__main__":
    main()
