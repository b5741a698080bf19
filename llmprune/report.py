"""Results side by side: a Markdown table over several outputs' manifests (llmprune.json), and the
sweep files: one flat row per run -> sweep.csv + sweep.json, and a PNG of ppl (and zero-shot mean)
against sparsity, one line per solver.

Rows are flat dicts so the CSV needs no schema; `sweep_row(manifest)` makes one from a manifest:
  model, solver, pattern, target, sparsity (measured, else target), ppl_<dataset>, dense_ppl_<dataset>,
  protocol_<dataset> (window length x windows, dtype), zeroshot_mean, compress_s (every run of a resumed one:
  compress_runs), peak_rss_mib.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import LLMPruneError
from .manifest import compress_time, compress_time_text, ppl_protocol, zeroshot_tasks


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _fmt(x: Any, spec: str = ".2f") -> str:
    return format(v, spec) if (v := _num(x)) is not None else "-"


def _pct(x: Any) -> str:
    return f"{100 * v:.1f}%" if (v := _num(x)) is not None else "-"


def _model_name(m: dict) -> str:
    model = m.get("model")
    if isinstance(model, dict):
        return str(model.get("asked") or model.get("loaded") or model.get("hub_id") or "-")
    return str(model) if model is not None else "-"


def _sparsity(m: dict) -> tuple[float | None, float | None]:
    """(target, measured); a bare number in the manifest is taken as the target."""
    s = m.get("sparsity")
    if isinstance(s, dict):
        return _num(s.get("target")), _num(s.get("measured"))
    return _num(s), None


def _zeroshot_mean(m: dict) -> float | None:
    mean = (m.get("zeroshot") or {}).get("mean")
    return _num(mean.get("acc") if isinstance(mean, dict) else mean)


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")  # a pipe would split the Markdown cell


def _protocol(r: dict, m: dict) -> str:
    """How a perplexity was measured: window length x windows, dtype, and what it was measured on where that is
    not the saved output itself (a version-1 figure of the model in memory, an export as transformers reads it)."""
    from .manifest import SAVED

    how = ppl_protocol(r, m)
    if r.get("source"):  # the text: the offline copy and the Hub's rows give other figures
        how += f", {str(r['source']).split(':')[0]} text"
    on = r.get("measured_on", SAVED)
    return how if on == SAVED else f"{how}, {on}"


def _zeroshot_protocol(m: dict) -> str:
    """The tasks the mean is over, examples a task, dtype: "boolq, rte; every example, float32"."""
    zs = m.get("zeroshot") or {}
    how = f"limit {zs['limit']}" if zs.get("limit") else "every example"
    tasks = ", ".join(sorted(zeroshot_tasks(zs)))
    return f"{tasks}; {how}, {zs.get('dtype') or m.get('dtype') or '?'}"


def markdown_table(manifests: list[dict], names: list[str]) -> str:
    """One row per manifest: name, model, solver, pattern, sparsity target / measured, ppl and dense
    ppl for every dataset any manifest measured, zero-shot mean (when any has one), compress time. How each
    figure was measured (window length x windows, dtype; zero-shot: limit, dtype) is said under the table where
    every row measured it the same way, else in a column of its own."""
    if len(manifests) != len(names):
        raise LLMPruneError(f"markdown_table got {len(manifests)} manifests but {len(names)} names: pass one name each")
    datasets = list(dict.fromkeys(d for m in manifests for d, r in (m.get("eval") or {}).items() if isinstance(r, dict)))
    has_zs = any(_zeroshot_mean(m) is not None for m in manifests)
    hows = {d: [_protocol(r, m) if isinstance(r := (m.get("eval") or {}).get(d), dict) else None for m in manifests]
            for d in datasets}
    if has_zs:
        hows["zero-shot"] = [_zeroshot_protocol(m) if _zeroshot_mean(m) is not None else None for m in manifests]
    mixed = {d for d, h in hows.items() if len(set(h) - {None}) > 1}
    head = ["output", "model", "solver", "pattern", "target", "measured"]
    head += [c for d in datasets for c in (f"{d} ppl", f"{d} dense", *([f"{d} measured as"] * (d in mixed)))]
    head += ["zero-shot mean", *(["zero-shot measured as"] * ("zero-shot" in mixed))] * has_zs + ["compress time"]
    lines = ["| " + " | ".join(map(_cell, head)) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for i, (m, name) in enumerate(zip(manifests, names)):
        target, measured = _sparsity(m)
        ev = m.get("eval") or {}
        row = [name, _model_name(m), m.get("solver") or "-", m.get("pattern") or "-", _pct(target), _pct(measured)]
        for d in datasets:
            row += [_fmt((ev.get(d) or {}).get(k)) for k in ("ppl", "dense_ppl")]
            row += [hows[d][i] or "-"] * (d in mixed)
        if has_zs:
            row += [_fmt(_zeroshot_mean(m), ".3f"), *([hows["zero-shot"][i] or "-"] * ("zero-shot" in mixed))]
        row.append(compress_time_text(m) or "-")
        lines.append("| " + " | ".join(map(_cell, row)) + " |")
    same = [f"{d}: {next(x for x in h if x)}" for d, h in hows.items() if d not in mixed and any(h)]
    if same:
        lines += ["", "Measured as (window length x windows, dtype; zero-shot: tasks; examples a task, dtype): "
                  + "; ".join(same) + "."]
    return "\n".join(lines) + "\n"


def load_manifests(paths: list[str | Path]) -> tuple[list[dict], list[str]]:
    """Read the manifests of output folders (or manifest files); names are the folder names."""
    from .manifest import NAME as MANIFEST
    from .manifest import read

    if not paths:
        raise LLMPruneError("no output given: pass one or more llmprune output folders")
    manifests, names = [], []
    for p in map(Path, paths):
        folder = p.parent if p.is_file() and p.name == MANIFEST else p
        manifests.append(read(folder).to_dict())
        names.append(folder.resolve().name)
    return manifests, names


def sweep_row(manifest: dict) -> dict[str, Any]:
    """Flatten one run's manifest into a sweep row (see the module docstring for the keys)."""
    target, measured = _sparsity(manifest)
    row: dict[str, Any] = {
        "model": _model_name(manifest), "solver": manifest.get("solver"), "pattern": manifest.get("pattern"),
        "target": target, "sparsity": measured if measured is not None else target,
    }
    for d, r in (manifest.get("eval") or {}).items():
        if isinstance(r, dict):
            row[f"ppl_{d}"], row[f"dense_ppl_{d}"] = _num(r.get("ppl")), _num(r.get("dense_ppl"))
            row[f"protocol_{d}"] = ppl_protocol(r, manifest)  # window length x windows, dtype
    row["zeroshot_mean"] = _zeroshot_mean(manifest)
    row["compress_s"], runs = compress_time(manifest)  # a resumed run's earlier runs included
    if runs > 1:
        row["compress_runs"] = runs
    row["peak_rss_mib"] = _num(manifest.get("peak_rss_mib"))
    return row


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)  # a reader never sees half a file


def write_sweep(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write rows to out_dir/sweep.csv (columns: union of the rows' keys, first-seen order; nested
    values as JSON) and out_dir/sweep.json (the rows as given). Returns (csv_path, json_path)."""
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise LLMPruneError("write_sweep needs a non-empty list of row dicts (one per sweep run)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v) for k, v in r.items()})
    csv_path, json_path = out / "sweep.csv", out / "sweep.json"
    _atomic_write(csv_path, buf.getvalue())
    _atomic_write(json_path, json.dumps(rows, indent=2) + "\n")
    return csv_path, json_path


def plot_sweep(rows: list[dict], png_path: str | Path, dense_ppl: dict[str, float] | None = None) -> Path:
    """PNG of ppl (log axis) against sparsity, one panel per dataset and one line per solver (per
    solver and pattern when rows mix patterns), dense ppl as a dashed horizontal line; plus a panel
    of zero-shot mean accuracy when any row has one. dense_ppl defaults to the rows' dense_ppl_*."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state to leak
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if not rows:
        raise LLMPruneError("plot_sweep needs at least one row")
    datasets = list(dict.fromkeys(k[4:] for r in rows for k in r if k.startswith("ppl_")))
    if not datasets:
        raise LLMPruneError("plot_sweep rows have no ppl_<dataset> values: evaluate perplexity in the sweep")
    dense = dict(dense_ppl or {})
    for d in datasets:  # fill from the rows what the caller did not give
        vals = [v for r in rows if (v := _num(r.get(f"dense_ppl_{d}"))) is not None]
        if d not in dense and vals:
            dense[d] = vals[0]
    mixed = len({str(r.get("pattern")) for r in rows}) > 1
    lines: dict[str, list[dict]] = {}
    for r in rows:
        label = str(r.get("solver")) + (f" {r.get('pattern')}" if mixed else "")
        lines.setdefault(label, []).append(r)
    has_zs = any(_num(r.get("zeroshot_mean")) is not None for r in rows)

    panels = len(datasets) + has_zs
    fig = Figure(figsize=(5.5 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, key, title in [(axes[i], f"ppl_{d}", d) for i, d in enumerate(datasets)] + \
            ([(axes[-1], "zeroshot_mean", "zero-shot")] if has_zs else []):
        for label, rs in lines.items():
            pts = sorted((x, y) for r in rs if (x := _num(r.get("sparsity"))) is not None
                         and (y := _num(r.get(key))) is not None and (key == "zeroshot_mean" or y > 0))
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        if key == "zeroshot_mean":
            ax.set_ylabel("mean accuracy")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (log)")
            if _num(dense.get(title)) is not None:
                ax.axhline(dense[title], color="gray", linestyle="--", label=f"dense {dense[title]:.2f}")
            plain = FuncFormatter(lambda y, _: f"{y:g}")  # 30, 40 rather than 3x10^1, 4x10^1
            ax.yaxis.set_major_formatter(plain)
            lo, hi = ax.get_ylim()
            # label the 2..9 ticks too only when the axis spans little more than a decade: beyond
            # that they overlap, and the powers of ten say enough
            ax.yaxis.set_minor_formatter(plain if hi / lo < 30 else NullFormatter())
        ax.set_xlabel("sparsity (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path
