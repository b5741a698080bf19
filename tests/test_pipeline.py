"""The staged pipeline: every figure an output records is the figure of its saved files; bad inputs
end with one line, exit 2 and no folder; manifests old and new load; the import graph is layered."""
import ast
import json
import math
import os
from pathlib import Path

import pytest
import torch

from llmprune.cli import main
from llmprune.testing import FAST_CLI

EVAL = ["--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
CHEAP = FAST_CLI[:-2]  # FAST_CLI without its "--eval none"


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --- every export: the recorded figure is the saved folder's ---------------------------------------

EXPORTS = [  # (pattern, format, extra flags)
    ("unstructured", "dense", []),
    ("2:4", "sparse24", []),
    ("unstructured", "w4g128", ["--quant", "rtn", "--group-size", "32"]),
    ("unstructured", "w4g128", ["--quant", "gptq", "--group-size", "32"]),
    ("2:4", "w4s24", ["--quant", "rtn", "--group-size", "32"]),
    ("2:4", "w4s24", ["--quant", "gptq", "--group-size", "32"]),
    ("2:4", "w4s24", ["--quant", "gptq", "--group-size", "32", "--tune-steps", "3", "--tune-lr", "1e-3"]),
    ("group:16", "w4s50", ["--quant", "rtn"]),
    ("group:16", "w4s50", ["--quant", "gptq"]),
]


@pytest.mark.parametrize("pattern,fmt,extra", EXPORTS, ids=[f"{f}-{'-'.join(e[1:2]) or 'plain'}{'-tune' if '--tune-steps' in e else ''}"
                                                            for _, f, e in EXPORTS])
def test_compress_records_what_eval_measures_on_the_saved_folder(tmp_path, capsys, tiny_dir, calib_txt, pattern, fmt,
                                                                 extra):
    from llmprune import hub, manifest

    out = tmp_path / "o"
    rc, so, se = _run(capsys, "compress", "--model", tiny_dir, "--pattern", pattern, "--format", fmt, *extra,
                      "--calib", calib_txt, "--out", out, *CHEAP, *EVAL)
    assert rc == 0, se
    m = json.loads((out / "llmprune.json").read_text())
    rec = m["eval"]["wikitext2"]
    assert rec["measured_on"] == manifest.SAVED and "dense_ppl" in rec
    assert m["format_version"] == manifest.VERSION and m["steps"][0] == "prune"
    if fmt != "dense":
        assert m["steps"][-1] == "pack" and ("quantize" in m["steps"]) == (fmt != "sparse24")
    rc, so, _ = _run(capsys, "eval", out, "--ppl", "wikitext2", "--seqlen", "64", "--windows", "2", "--no-progress")
    assert rc == 0
    again = json.loads((out / "llmprune.json").read_text())["eval"]["wikitext2"]
    assert again["ppl"] == pytest.approx(rec["ppl"], rel=1e-6) and again["dense_ppl"] == rec["dense_ppl"]
    card = hub.model_card(m, "me/tiny")
    assert f"{rec['ppl']:.2f}" in card and "measured on these files" in card
    if "--tune-steps" in extra:
        assert ("tune-scales" in m["steps"]) == (m["format"]["quant_options"]["tune"]["kept"] == "tuned")


def test_a_quantized_figure_is_not_the_unquantized_one(tmp_path, capsys, tiny_dir, calib_txt):
    """The packed int4 folder computes something else than the pruned fp32 model: had the figure been
    taken before packing (as llmprune 0.1 did), the two would be equal."""
    ppl = {}
    for fmt, extra in (("dense", []), ("w4s24", ["--quant", "rtn", "--group-size", "32"])):
        rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--pattern", "2:4", "--format", fmt, *extra,
                         "--calib", calib_txt, "--out", tmp_path / fmt, *CHEAP, *EVAL)
        assert rc == 0, se
        ppl[fmt] = json.loads((tmp_path / fmt / "llmprune.json").read_text())["eval"]["wikitext2"]["ppl"]
    assert abs(ppl["w4s24"] / ppl["dense"] - 1) > 1e-4


def test_pack_and_recover_evaluate_their_own_folders(tmp_path, capsys, pruned_24, calib_txt):
    from llmprune import manifest

    rc, _, se = _run(capsys, "pack", pruned_24, "--format", "w4s24", "--group-size", "32", "--out", tmp_path / "p",
                     "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2", "--no-progress")
    assert rc == 0, se
    m = json.loads((tmp_path / "p" / "llmprune.json").read_text())
    assert m["eval"]["wikitext2"]["measured_on"] == manifest.SAVED and m["packed_from"] == str(pruned_24)
    rc, _, _ = _run(capsys, "eval", tmp_path / "p", "--ppl", "wikitext2", "--seqlen", "64", "--windows", "2",
                    "--no-progress")
    assert json.loads((tmp_path / "p" / "llmprune.json").read_text())["eval"]["wikitext2"]["ppl"] == \
        pytest.approx(m["eval"]["wikitext2"]["ppl"], rel=1e-6)
    rc, _, se = _run(capsys, "recover", pruned_24, "--out", tmp_path / "r", "--steps", "2", "--batch", "1",
                     "--seqlen", "32", "--rank", "2", "--data", calib_txt, "--eval", "wikitext2", "--eval-seqlen",
                     "64", "--eval-windows", "2", "--no-progress", "--no-grad-checkpointing")
    assert rc == 0, se
    r = json.loads((tmp_path / "r" / "llmprune.json").read_text())
    assert r["steps"][-1] == "recover" and r["eval"]["wikitext2"]["measured_on"] == manifest.SAVED
    assert "before_recover_ppl" in r["eval"]["wikitext2"]


def test_a_derived_folder_records_its_own_run_and_its_sources_in_history(tmp_path, capsys, pruned_24, calib_txt):
    """pack / recover / export measure their figures in their own run: their manifest's versions and device
    are that run's, and the runs that made the source (steps, command, device, versions) are kept, oldest
    first, in `history`: a source made under other libraries on another device stays told apart."""
    import shutil

    from llmprune import manifest
    from llmprune.runinfo import versions

    src = tmp_path / "src"
    shutil.copytree(pruned_24, src)
    made = manifest.update(src, versions={"transformers": "0.0-elsewhere"}, device="cuda:7", peak_gpu_mib=12345.0)
    rc, _, se = _run(capsys, "recover", src, "--out", tmp_path / "r", "--steps", "1", "--batch", "1", "--seqlen", "32",
                     "--rank", "2", "--data", calib_txt, "--device", "cpu", "--no-progress")
    assert rc == 0, se
    rc, _, se = _run(capsys, "pack", tmp_path / "r", "--format", "sparse24", "--out", tmp_path / "p", "--no-progress")
    assert rc == 0, se
    rc, _, se = _run(capsys, "export", tmp_path / "p", "--to", "compressed-tensors", "--out", tmp_path / "e",
                     "--no-progress")
    assert rc == 0, se
    here = versions()
    assert made.versions["transformers"] == "0.0-elsewhere"
    first = {"steps": made.steps, "command": made.command, "device": "cuda:7", "versions": made.versions,
             "llmprune_version": made.llmprune_version, "peak_rss_mib": made.peak_rss_mib, "peak_gpu_mib": 12345.0,
             "onload": made.onload}
    r, p, e = (manifest.read(tmp_path / f) for f in ("r", "p", "e"))
    assert made.onload and (r.onload, p.onload, e.onload) == ("whole", "blocks", "blocks")  # how each read its source
    assert [h["onload"] for h in e.history] == [made.onload, "whole", "blocks"]
    assert r.history == [first] and r.device == "cpu" and r.versions["transformers"] == here["transformers"]
    assert r.peak_gpu_mib is None and r.peak_rss_mib and p.history[1]["peak_rss_mib"] == r.peak_rss_mib
    assert p.history[:1] == [first] and len(p.history) == 2 and p.history[1]["steps"] == r.steps
    assert p.history[1]["command"] == r.command and p.history[1]["device"] == "cpu"
    assert [h["steps"] for h in e.history] == [made.steps, r.steps, p.steps] and e.versions["cpu"] == here["cpu"]


# --- bad input: one line, exit 2, nothing left behind ---------------------------------------------

def _nothing_left(parent: Path, name: str) -> bool:
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_a_file_named_gguf_that_is_not_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"\x00" * 64)
    rc, _, se = _run(capsys, "compress", "--model", fake, "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and "not a GGUF file" in se and len(se.strip().splitlines()) == 1
    assert _nothing_left(tmp_path, "o")


def test_a_gguf_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """The cache key of a GGUF (its sha256, also recorded in manifests) is remembered under the file's
    path, size and mtime: a 40 GB file is not read again by every command that names it."""
    import hashlib
    import os

    from llmprune import models

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    reads = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    want = real(f.read_bytes()).hexdigest()
    assert models._sha256(f) == want and models._sha256(f) == want and len(reads) == 1
    f.write_bytes(b"GGUF" + bytes(64))  # changed (size and time): hashed again
    os.utime(f, ns=(1, 1))
    assert models._sha256(f) == real(f.read_bytes()).hexdigest() and len(reads) == 2
    (tmp_path / "cache" / "sha256.json").write_text("{not json")  # a damaged book is rebuilt, not fatal
    assert models._sha256(f) == real(f.read_bytes()).hexdigest() and len(reads) == 3


def test_a_gguf_whose_dequantized_copy_would_not_fit_the_cache_disk_is_refused_first(tmp_path, capsys, monkeypatch):
    """Dequantizing a GGUF writes its quantized and F32 weights in fp32 into the cache (a 40 GB Q4_K 70B file:
    280 GB), F16 ones as they are: a disk without room for that is refused in one line naming LLMPRUNE_CACHE,
    before anything is dequantized."""
    import gguf
    import numpy as np

    from llmprune import outdir

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_tensor("token_embd.weight", np.zeros((300, 100), dtype=np.float16))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((200, 100), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    usage = outdir.shutil.disk_usage
    free = lambda n: lambda p: usage(p)._replace(free=n)
    need = 2 * 300 * 100 + 4 * 200 * 100  # the F16 embedding in fp16, the F32 matrix in fp32
    monkeypatch.setattr(outdir.shutil, "disk_usage", free(need - 1))
    rc, _, se = _run(capsys, "compress", "--model", f, "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and len(se.strip().splitlines()) == 1, se
    assert "the cached copy of m.gguf needs 0.1 MB (its weights dequantized to fp32, F16/BF16 kept 0.1 MB)" \
        in se and "LLMPRUNE_CACHE" in se
    assert not any((tmp_path / "cache" / "models").glob("*")) and _nothing_left(tmp_path, "o")
    monkeypatch.setattr(outdir.shutil, "disk_usage", free(need))  # room: read, and refused as a model without most
    rc, _, se = _run(capsys, "compress", "--model", f, "--out", tmp_path / "o", *FAST_CLI)  # of its tensors
    assert rc == 2 and len(se.strip().splitlines()) == 1, se
    assert "m.gguf: transformers' GGUF reader takes it for a llama model, whose model.layers.0.self_attn.q_proj" in se
    assert not any((tmp_path / "cache" / "models").glob("*")) and _nothing_left(tmp_path, "o")


@pytest.mark.parametrize("onload", ["blocks", "whole"])
def test_disk_full_while_saving(tmp_path, capsys, tiny_dir, calib_txt, monkeypatch, onload):
    import errno

    from llmprune import checkpoint, lazy

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    if onload == "blocks":  # the shards are written tensor by tensor as blocks finish
        monkeypatch.setattr(lazy.ShardWriter, "_file", full)
    else:
        monkeypatch.setattr(checkpoint, "save_dense", full)
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", tmp_path / "o",
                     "--onload", onload, *FAST_CLI)
    assert rc == 2 and "no space left" in se and "--out" in se and len(se.strip().splitlines()) == 1
    assert _nothing_left(tmp_path, "o")


@pytest.mark.parametrize("fmt", ["dense", "sparse24"])
def test_eval_of_a_truncated_folder(tmp_path, capsys, tiny_dir, calib_txt, fmt):
    out = tmp_path / "o"
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--pattern", "2:4", "--format", fmt, "--calib",
                     calib_txt, "--out", out, *FAST_CLI)
    assert rc == 0, se
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    rc, _, se = _run(capsys, "eval", out, "--seqlen", "64", "--windows", "1", "--no-progress")
    assert rc == 2 and "corrupted or truncated" in se and "re-create" in se and len(se.strip().splitlines()) == 1


def test_windows_longer_than_the_context_are_refused_at_once(tmp_path, capsys, tiny_dir, calib_txt):
    for flags in (["--seqlen", "100000"], ["--eval", "wikitext2", "--eval-seqlen", "100000"]):
        rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--solver", "sparsegpt", "--calib", calib_txt,
                         "--out", tmp_path / "o", *FAST_CLI, *flags)
        assert rc == 2 and "longer than the model's context (512 tokens" in se, se
        assert _nothing_left(tmp_path, "o")
    rc, _, se = _run(capsys, "eval", tiny_dir, "--seqlen", "100000")
    assert rc == 2 and "context" in se


def test_stale_folders_of_dead_runs_are_removed(tmp_path, capsys, tiny_dir, calib_txt):
    dead = tmp_path / ".o.tmp-999999999-deadbeef"  # no such process
    old_style = tmp_path / ".o.tmp-0badf00d"  # llmprune 0.1 (no pid)
    alive = tmp_path / ".o.tmp-1-feedface"  # pid 1 exists: another run may own it
    for d in (dead, old_style, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 0, se
    assert not dead.exists() and not old_style.exists() and alive.exists()
    assert (tmp_path / "o" / "llmprune.json").exists()


def test_nan_weights_are_named(tmp_path, capsys):
    from llmprune.testing import tiny_model, tiny_model_dir

    src = tiny_model_dir(tmp_path / "m", seed=3)
    m = tiny_model(seed=3)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    m.save_pretrained(src)
    rc, _, se = _run(capsys, "compress", "--model", src, "--solver", "sparsegpt", "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and "model.layers.1.mlp.up_proj.weight holds NaN/inf" in se and "damaged" in se
    assert _nothing_left(tmp_path, "o")


def test_an_option_the_solver_would_ignore_is_refused(tmp_path, capsys, tiny_dir):
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--solver", "wanda", "--damp", "0.1",
                     "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and "--damp is not an option of --solver wanda" in se


# --- manifests ------------------------------------------------------------------------------------

def test_version_1_manifests_load_and_say_what_their_figures_measured():
    from llmprune import manifest
    from llmprune.errors import LLMPruneError

    v1 = {"format_version": 1, "llmprune_version": "0.1.0", "model": {"asked": "llama"}, "solver": "sparsegpt",
          "pattern": "2:4", "sparsity": {"target": 0.5, "measured": 0.5},
          "eval": {"wikitext2": {"ppl": 80.0, "dense_ppl": 20.4, "seqlen": 2048, "windows": 16}},
          "format": {"format_version": 1, "name": "w4s24", "quant": "gptq", "layers": {}},
          "some_future_key": [1, 2]}
    m = manifest.Manifest.from_dict(v1)
    assert m.steps == ["prune", "quantize", "pack"] and m.format_name == "w4s24"
    assert m.eval["wikitext2"]["measured_on"].startswith("model before packing")
    assert m.to_dict()["some_future_key"] == [1, 2] and m.to_dict()["format_version"] == manifest.VERSION
    # v1 compress measured the model in memory before saving; v1 pack measured nothing, so a packed folder's
    # figure came from `llmprune eval` on it
    dense = manifest.Manifest.from_dict({**v1, "format": None, "zeroshot": {"boolq": {"acc": 0.6}, "mean": 0.6}})
    assert dense.eval["wikitext2"]["measured_on"] == "model in memory before saving (version 1 manifest)"
    assert dense.zeroshot["measured_on"] == dense.eval["wikitext2"]["measured_on"]
    assert manifest.Manifest.from_dict({**v1, "packed_from": "x"}).eval["wikitext2"]["measured_on"] == manifest.SAVED
    with pytest.raises(LLMPruneError, match="newer than this llmprune"):
        manifest.Manifest.from_dict({**v1, "format_version": 99})
    with pytest.raises(LLMPruneError, match="lacks the keys"):
        manifest.Manifest.from_dict({"format_version": 2})


# --- the import graph -----------------------------------------------------------------------------

PKG = Path(__file__).resolve().parents[1] / "llmprune"
STORAGE = {"checkpoint", "packed", "manifest", "outdir", "modules", "formats", "kernels"}
ALGORITHMS = {"solvers", "prune", "walker", "owl", "transforms", "recover", "pipeline", "api", "sweep", "calibration",
              "quant.gptq", "quant.sequential", "quant.tune"}


def _imports() -> dict[str, set[str]]:
    """module -> the llmprune modules it imports (anywhere in the file, lazy imports included)."""
    mods = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = name if rel.name == "__init__" else ".".join(rel.parts[:-1])
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".") if pkg else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
                elif node.module and node.module.startswith("llmprune"):
                    mod = node.module[len("llmprune."):] if node.module != "llmprune" else ""
                else:
                    continue
                for a in node.names:  # `from . import x` imports the module x
                    deps.add(f"{mod}.{a.name}".strip(".") if f"{mod}.{a.name}".strip(".") in _all() else mod)
            elif isinstance(node, ast.Import):
                deps |= {a.name[len("llmprune."):] for a in node.names if a.name.startswith("llmprune.")}
        mods[name] = {d for d in deps if d and d != name}
    return mods


def _all() -> set[str]:
    out = set()
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        out.add(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return out


def _group(mod: str) -> str:
    return mod.split(".")[0]


def test_no_import_cycles_between_modules():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if d.startswith(n + ".") or n.startswith(d + "."):
                continue  # a package and its own submodules
            if state.get(d) == 1:
                raise AssertionError(" -> ".join([*path, n, d]))
            if state.get(d) is None:
                visit(d, [*path, n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_storage_imports_no_algorithm():
    graph = _imports()
    for mod, deps in graph.items():
        if _group(mod) in STORAGE:
            bad = {d for d in deps if d in ALGORITHMS or _group(d) in ALGORITHMS - {"quant"}}
            assert not bad, f"{mod} imports {sorted(bad)}"


def test_import_llmprune_is_cheap():
    import subprocess
    import sys

    code = "import sys, llmprune; print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(PKG.parent)}).stdout.strip()
    assert out == "[]"
    assert math.isfinite(1.0)


def test_zeroshot_results_merge_only_with_tasks_measured_the_same_way():
    """`eval --tasks` adds to an output's zero-shot section: earlier tasks stay where measured the same way (limit,
    dtype, device, lm-eval: the manifest's run's where a section does not say them), the mean is over all listed."""
    from llmprune.pipeline import merge_zeroshot

    new = {"piqa": {"acc": 0.5, "n": 4}, "mean": 0.5, "limit": 4, "blockwise": True, "dtype": "float32"}
    old = {"boolq": {"acc": 0.25, "n": 4}, "rte": {"acc": 0.75, "n": 4}, "mean": 0.5, "limit": 4}
    run = {"dtype": "float32", "versions": {"lm_eval": "0.4.13"}}
    got = merge_zeroshot(old, new, run)
    assert set(got) == {"boolq", "rte", "piqa", "mean", "limit", "blockwise", "dtype"}
    assert got["mean"] == pytest.approx(0.5) and got["limit"] == 4
    for other in ({**old, "limit": 8}, {**old, "dtype": "bfloat16"}, {**old, "measured_on": "model in memory"}):
        assert merge_zeroshot(other, new, run) == new
    assert merge_zeroshot(old, new, {"dtype": "bfloat16"}) == new and merge_zeroshot(None, new) == new
    # another lm-eval (the section's own, else the run's) or device: measured another way
    later = {**new, "versions": {"lm_eval": "0.4.14"}, "device": "cpu"}
    assert merge_zeroshot(old, later, run) == later and merge_zeroshot(old, later, {"dtype": "float32"})["mean"] == 0.5
    assert merge_zeroshot({**old, "device": "cuda:0"}, later, {"dtype": "float32"}) == later


def test_pack_and_export_calibrate_as_their_source_was_compressed():
    """GPTQ's calibration in pack and export defaults to the source's compress protocol (P-cpu: 64 x 512), not the
    paper's 128 x 2048 under a manifest saying cpu; flags given win; a folder without one: by the device."""
    from llmprune.cli import build_parser
    from llmprune.config import calibration_of

    assert calibration_of("cpu", "cuda:0", None, None) == (64, 512)
    assert calibration_of("paper", "cpu", None, None) == (128, 2048)
    assert calibration_of(None, "cpu", None, None) == (64, 512) and calibration_of(None, "cuda", None, None) == (128, 2048)
    assert calibration_of("cpu", "cpu", 8, None) == (8, 512) and calibration_of("paper", "cpu", None, 64) == (128, 64)
    for argv in (["pack", "x", "--format", "w4s24", "--out", "y"], ["export", "x", "--to", "compressed-tensors"]):
        a = build_parser().parse_args(argv)
        assert (a.nsamples, a.seqlen) == (None, None), argv
