"""bench/make_tables.py fills the <!-- table:NAME --> spans of README.md and docs/*.md, --check finds stale
ones, unknown names are left alone. A fake table and a temporary tree: nothing of bench/results is read."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "make_tables.py"


@pytest.fixture()
def mt(monkeypatch):
    spec = importlib.util.spec_from_file_location("make_tables_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "TABLES", {"fake": lambda: "| a |\n|---|\n| 1 |"})
    return mod


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n\n<!-- table:fake -->\nold\n<!-- /table -->\n\n"
                                        "<!-- table:nope -->\nhand-made\n<!-- /table -->\n"
                                        "A span is `<!-- table:NAME -->` ... `<!-- /table -->` (prose, not a span)\n")
    (tmp_path / "docs" / "a.md").write_text("text\n<!-- table:fake -->\n<!-- /table -->\nmore\n")
    return tmp_path


FILLED = "<!-- table:fake -->\n| a |\n|---|\n| 1 |\n<!-- /table -->"


def test_fill_check_and_unknown_spans(mt, tmp_path, capsys):
    root = _tree(tmp_path)
    before = {p: p.read_text() for p in (root / "README.md", root / "docs" / "a.md")}

    assert mt.main(["--readme", "--check"], root=root) == 1  # stale: reported, nothing written
    err = capsys.readouterr().err
    assert "README.md: table fake" in err and "docs/a.md: table fake" in err
    assert {p: p.read_text() for p in before} == before

    assert mt.main(["--readme"], root=root) == 0
    err = capsys.readouterr().err
    readme, doc = (root / "README.md").read_text(), (root / "docs" / "a.md").read_text()
    assert FILLED in readme and doc == f"text\n{FILLED}\nmore\n"
    assert "<!-- table:nope -->\nhand-made\n<!-- /table -->" in readme  # unknown: untouched, warned about
    assert "no table named 'nope'" in err and "'NAME'" not in err
    assert "A span is `<!-- table:NAME -->` ... `<!-- /table -->` (prose" in readme

    assert mt.main(["--readme", "--check"], root=root) == 0  # now in step
    assert mt.main(["--check", "fake"], root=root) == 0


def test_only_the_named_tables_are_filled(mt, tmp_path, monkeypatch):
    root = _tree(tmp_path)
    monkeypatch.setitem(mt.TABLES, "other", lambda: "new")
    (root / "docs" / "b.md").write_text("<!-- table:other -->\nold\n<!-- /table -->\n")
    assert mt.main(["--readme", "other"], root=root) == 0
    assert (root / "docs" / "b.md").read_text() == "<!-- table:other -->\nnew\n<!-- /table -->\n"
    assert "\nold\n" in (root / "README.md").read_text()  # fake not asked for: left stale
    assert mt.main(["--check"], root=root) == 1


def test_an_empty_table_says_so(mt, tmp_path, monkeypatch):
    root = _tree(tmp_path)
    monkeypatch.setitem(mt.TABLES, "fake", lambda: "")
    mt.main(["--readme"], root=root)
    assert "<!-- table:fake -->\n(not measured yet)\n<!-- /table -->" in (root / "README.md").read_text()


def _sweep(root: Path, folder: str, transformers: str | None, rows: dict) -> None:
    import json

    d = root / folder
    d.mkdir(parents=True)
    lines = ["model,solver,pattern,target,sparsity,ppl_wikitext2"] + [f"llama,{s},unstructured,0.7,0.7,{p}"
                                                                      for s, p in rows.items()]
    (d / "sweep.csv").write_text("\n".join(lines) + "\n")
    if transformers:
        (d / "sweep_meta.json").write_text(json.dumps({"versions": {"transformers": transformers}}))


def test_seed_ratios_pair_rows_measured_under_the_same_libraries(mt, tmp_path, monkeypatch):
    """A baseline re-measured under newer libraries replaces the older cell (marked * when old), but each
    row is compared with the baseline measured under its own libraries."""
    monkeypatch.setattr(mt, "R", tmp_path)
    _sweep(tmp_path, "solvers-70", "5.23.0", {"sparsegpt": 200, "dsnot+init=sparsegpt": 210})
    _sweep(tmp_path, "solvers-70-alps", "5.25.0", {"alps": 100})
    _sweep(tmp_path, "solvers-70-rerun", "5.25.0", {"sparsegpt": 250})
    _sweep(tmp_path, "solvers-70-seed1", "5.23.0", {"sparsegpt": 300, "dsnot+init=sparsegpt": 270})
    _sweep(tmp_path, "solvers-70-seed1-alps", "5.25.0", {"alps": 150})
    grid = mt.solver_grid()
    assert "| sparsegpt | 250.00 |" in grid and "210.00 * |" in grid and "| alps | 100.00 |" in grid
    rows = {r.split(" | ")[0].lstrip("| "): r for r in mt.seed_table().splitlines()[2:]}
    assert "| 0.400 |" in rows["alps"]  # 100 / 250 (seed 0, same libraries); seed 1 has no 5.25 baseline
    assert "1.050, 0.900" in rows["dsnot+init=sparsegpt (old rules)"]  # 210 / 200, 270 / 300: both under 5.23
    assert "250.00 |" in rows["sparsegpt"] and "300.00 * |" in rows["sparsegpt"]


def test_a_packed_folder_is_compared_with_its_source_as_it_was_when_packed(mt):
    """The libraries a packed folder's source was made under: the last run of its `history` (pack records its
    own run in `versions`), or, in manifests written before `history`, the copied `versions`."""
    now = {"versions": {"transformers": "5.30.0"}}
    assert mt._source_tf({"versions": {"transformers": "5.30.0"},
                          "history": [{"versions": {"transformers": "5.20.0"}}, {"versions": {"transformers": "5.25.0"}}]}) \
        == "5.25.0"
    assert mt._source_tf({"versions": {"transformers": "5.25.0"}}) == "5.25.0"
    assert mt._source_tf(now) != mt._source_tf({**now, "history": [{"versions": {"transformers": "5.25.0"}}]})


def test_a_source_made_again_on_another_processor_is_not_the_one_packed(mt):
    """The same command on another processor rounds differently (bench/results/machine_spread.txt): a pack's
    ratio stands only against the source run it was packed from: same libraries, and the same processor where
    both manifests record one."""
    v = {"transformers": "5.25.0"}
    packed = {"versions": {**v, "cpu": "AMD EPYC"}, "history": [{"versions": {**v, "cpu": "AMD EPYC"}}]}
    assert mt._same_source({"versions": {**v, "cpu": "AMD EPYC"}}, packed)
    assert not mt._same_source({"versions": {**v, "cpu": "Intel Xeon"}}, packed)
    assert not mt._same_source({"versions": {"transformers": "5.30.0", "cpu": "AMD EPYC"}}, packed)
    assert mt._same_source({"versions": v}, packed)  # recorded before manifests named the processor: unknown
    assert mt._same_source({"versions": {**v, "cpu": "Intel Xeon"}}, {"versions": v, "history": [{"versions": v}]})
    assert mt._same_source(None, packed)
