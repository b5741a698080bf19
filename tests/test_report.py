"""report.py: the Markdown table over manifests, sweep CSV/JSON and the PNG plot."""
from __future__ import annotations

import csv
import json
import random

import pytest

from llmprune import report
from llmprune.errors import LLMPruneError


def _manifest(solver: str, target: float, rnd: random.Random, zs: bool = True, pattern: str = "unstructured") -> dict:
    m = {
        "format_version": 1, "llmprune_version": "0.1.0",
        "model": {"asked": "llama", "loaded": "SmolLM2-135M"}, "solver": solver, "pattern": pattern,
        "sparsity": {"target": target, "measured": target - rnd.uniform(0, 0.01)},
        "calibration": {"source": "c4", "nsamples": 8}, "dtype": "float32",
        "timings": {"compress_s": rnd.uniform(1, 100)},
        "eval": {"wikitext2": {"ppl": 20 * (1 + 5 * target ** 3) * rnd.uniform(0.9, 1.1), "dense_ppl": 20.43,
                               "seqlen": 512, "windows": 16},
                 "c4": {"ppl": rnd.uniform(25, 60), "dense_ppl": 24.1, "seqlen": 512, "windows": 16}},
    }
    if zs:
        accs = {t: rnd.uniform(0.2, 0.7) for t in ("piqa", "copa")}
        m["zeroshot"] = {**{t: {"acc": a, "acc_norm": None, "n": 50} for t, a in accs.items()},
                         "mean": sum(accs.values()) / 2}
    return m


def _parse_md(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in md.strip().splitlines()
            if line.startswith("|")]


def test_markdown_table_values():
    rnd = random.Random(0)
    ms = [_manifest("wanda", 0.5, rnd), _manifest("sparsegpt", 0.6, rnd, zs=False), {"model": "x", "solver": "magnitude"}]
    table = _parse_md(report.markdown_table(ms, ["a", "b|c", "d"]))
    head, sep, rows = table[0], table[1], table[2:]
    assert head == ["output", "model", "solver", "pattern", "target", "measured", "wikitext2 ppl", "wikitext2 dense",
                    "c4 ppl", "c4 dense", "zero-shot mean", "compress time"]
    assert len(rows) == 3 and all(len(r) == len(head) for r in rows)
    assert sep[0].split("|") == ["---"] * 4 + ["---:"] * (len(head) - 4)  # numbers right-aligned
    col = {h: i for i, h in enumerate(head)}
    for m, r in zip(ms[:2], rows):
        assert r[col["solver"]] == m["solver"] and r[col["model"]] == "llama"
        assert r[col["target"]] == f"{100 * m['sparsity']['target']:.1f}%"
        assert r[col["measured"]] == f"{100 * m['sparsity']['measured']:.1f}%"
        assert float(r[col["wikitext2 ppl"]]) == pytest.approx(m["eval"]["wikitext2"]["ppl"], abs=0.005)
        assert float(r[col["c4 dense"]]) == pytest.approx(24.1)
        assert r[col["compress time"]] == f"{m['timings']['compress_s']:.1f} s"
    assert float(rows[0][col["zero-shot mean"]]) == pytest.approx(ms[0]["zeroshot"]["mean"], abs=5e-4)
    assert rows[1][col["zero-shot mean"]] == "-" and rows[2][col["c4 ppl"]] == "-"
    assert rows[1][0] == r"b\|c"  # a pipe in a name must not split the row
    assert rows[2][col["target"]] == "-" and rows[2][col["model"]] == "x"
    # measured the same way in every row: said once, under the table
    assert report.markdown_table(ms, ["a", "b", "d"]).endswith(
        "Measured as (window length x windows, dtype; zero-shot: tasks; examples a task, dtype): wikitext2: 512 x 16, "
        "float32; c4: 512 x 16, float32; zero-shot: copa, piqa; every example, float32.\n")


def test_markdown_table_says_how_each_figure_was_measured_where_rows_differ():
    """Figures measured another way (window length, windows, dtype, a version-1 figure of the model in memory,
    a zero-shot limit) are not put in one column unannotated."""
    rnd = random.Random(1)
    a, b, c = (_manifest("wanda", 0.5, rnd) for _ in range(3))
    b["eval"]["wikitext2"].update(seqlen=2048, windows=4, dtype="bfloat16")
    c["eval"]["wikitext2"]["measured_on"] = "model in memory before saving (version 1 manifest)"
    c["zeroshot"]["limit"] = 20
    md = report.markdown_table([a, b, c], ["a", "b", "c"])
    head, _, *rows = _parse_md(md)
    col = {h: i for i, h in enumerate(head)}
    assert [r[col["wikitext2 measured as"]] for r in rows] == [
        "512 x 16, float32", "2048 x 4, bfloat16", "512 x 16, float32, model in memory before saving (version 1 manifest)"]
    assert [r[col["zero-shot measured as"]] for r in rows] == ["copa, piqa; every example, float32"] * 2 + [
        "copa, piqa; limit 20, float32"]
    assert "c4 measured as" not in col and md.rstrip().endswith("c4: 512 x 16, float32.")


def test_markdown_table_marks_zeroshot_means_over_other_tasks_and_counts_every_run_of_a_resumed_one():
    """A zero-shot mean over other tasks is another measurement (said in its column); a resumed compression's time
    is every run's (manifest.compress_time), in the table and the sweep row."""
    rnd = random.Random(2)
    a, b = (_manifest("wanda", 0.5, rnd) for _ in range(2))
    del b["zeroshot"]["copa"]
    b["resumed"] = {"earlier_s": 100.0, "runs": 2}
    head, _, *rows = _parse_md(report.markdown_table([a, b], ["a", "b"]))
    col = {h: i for i, h in enumerate(head)}
    assert [r[col["zero-shot measured as"]] for r in rows] == ["copa, piqa; every example, float32",
                                                               "piqa; every example, float32"]
    t = b["timings"]["compress_s"]
    assert rows[1][col["compress time"]] == f"{t + 100:.1f} s (2 runs: resumed)"
    assert report.sweep_row(b)["compress_s"] == pytest.approx(t + 100) and report.sweep_row(b)["compress_runs"] == 2
    assert "compress_runs" not in report.sweep_row(a)

def test_markdown_table_without_zeroshot_and_bare_sparsity():
    m = {"model": "m", "solver": "wanda", "pattern": "2:4", "sparsity": 0.5}
    head, _, row = _parse_md(report.markdown_table([m], ["o"]))
    assert "zero-shot mean" not in head and row[head.index("target")] == "50.0%"


def test_markdown_table_name_count_mismatch():
    with pytest.raises(LLMPruneError, match="one name each"):
        report.markdown_table([{}], [])


def test_load_manifests(tmp_path):
    from llmprune.manifest import write as write_manifest

    rnd = random.Random(1)
    for name in ("run_a", "run_b"):
        (tmp_path / name).mkdir()
        write_manifest(tmp_path / name, _manifest("wanda", 0.5, rnd))
    ms, names = report.load_manifests([tmp_path / "run_a", tmp_path / "run_b" / "llmprune.json"])
    assert names == ["run_a", "run_b"] and all(m["solver"] == "wanda" for m in ms)
    with pytest.raises(LLMPruneError, match="no llmprune.json"):
        report.load_manifests([tmp_path])
    with pytest.raises(LLMPruneError, match="no output given"):
        report.load_manifests([])


def _sweep_rows(seed: int = 0, zs: bool = True) -> list[dict]:
    rnd = random.Random(seed)
    ms = [_manifest(s, t, rnd, zs=zs) for s in ("magnitude", "wanda", "sparsegpt") for t in (0.3, 0.6, 0.5)]
    return [report.sweep_row(m) for m in ms]


def test_sweep_row_flattens():
    m = _manifest("wanda", 0.5, random.Random(2))
    r = report.sweep_row(m)
    assert r["sparsity"] == m["sparsity"]["measured"] and r["target"] == 0.5
    assert r["ppl_wikitext2"] == m["eval"]["wikitext2"]["ppl"] and r["dense_ppl_c4"] == 24.1
    assert r["protocol_wikitext2"] == "512 x 16, float32"  # the row says how its figure was measured
    assert r["zeroshot_mean"] == m["zeroshot"]["mean"] and r["compress_s"] == m["timings"]["compress_s"]


def test_write_sweep_csv_json(tmp_path):
    rows = _sweep_rows()
    rows[0]["extra"] = {"nested": [1, 2]}  # a key only one row has, and a nested value
    rows[1]["zeroshot_mean"] = None
    csv_path, json_path = report.write_sweep(rows, tmp_path / "sweep")
    with open(csv_path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows)
    assert list(got[0]) == list(dict.fromkeys(k for r in rows for k in r))
    for g, r in zip(got, rows):
        assert g["solver"] == r["solver"] and float(g["ppl_wikitext2"]) == r["ppl_wikitext2"]
    assert json.loads(got[0]["extra"]) == {"nested": [1, 2]} and got[1]["extra"] == "" and got[1]["zeroshot_mean"] == ""
    assert json.loads(json_path.read_text()) == rows
    assert not list((tmp_path / "sweep").glob(".*tmp"))


@pytest.mark.parametrize("rows", [[], [1, 2], None])
def test_write_sweep_bad_rows(rows, tmp_path):
    with pytest.raises(LLMPruneError, match="non-empty list of row dicts"):
        report.write_sweep(rows, tmp_path)


@pytest.mark.parametrize("zs", [True, False])
def test_plot_sweep_png(tmp_path, zs):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    rows = _sweep_rows(3, zs=zs)
    rows[0]["ppl_wikitext2"] = float("inf")  # a diverged run is skipped, not a crash
    path = report.plot_sweep(rows, tmp_path / "plots" / "sweep.png", dense_ppl={"wikitext2": 20.43})
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    panels = 2 + zs  # wikitext2, c4, (zero-shot)
    assert w == pytest.approx(panels * 5.5 * 110, rel=0.05) and h == pytest.approx(4.2 * 110, rel=0.05)
    assert img[..., :3].std() > 0.05  # something was drawn


def test_plot_sweep_bad_rows(tmp_path):
    with pytest.raises(LLMPruneError, match="at least one row"):
        report.plot_sweep([], tmp_path / "x.png")
    with pytest.raises(LLMPruneError, match="no ppl_<dataset> values"):
        report.plot_sweep([{"solver": "wanda", "sparsity": 0.5}], tmp_path / "x.png")


def test_peak_rss_restarts_per_run():
    """sweep reports each point's peak memory: after reset_peak_rss() the peak drops back below a
    large buffer freed earlier (where the platform allows the reset)."""
    import numpy as np

    from llmprune.runinfo import peak_rss_mib, reset_peak_rss

    buf = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    high = peak_rss_mib()
    del buf
    if not reset_peak_rss():
        pytest.skip("this kernel cannot restart the peak-memory count")
    assert peak_rss_mib() < high - 300
