"""`sweep` with the model in memory (llmprune/sweep.py, `onload="whole"`): each point starts from the dense
model, restored from the model's folder a block at a time, never from a second copy of its linears in memory;
a block the folder does not give back as loaded is restored from a scratch file, which goes with the sweep."""
from __future__ import annotations

import gc
import json

import pytest
import torch

from llmprune import arch, lazy, prune, sweep
from llmprune.errors import LLMPruneError

COMMON = dict(solvers_=("magnitude", "wanda"), sparsities=(0.3, 0.6), nsamples=4, seqlen=16, eval_seqlen=64,
              eval_windows=2, calib_batch=4, progress=False)


def _cpu_floats() -> dict[int, int]:
    """Storage address -> bytes of every plain floating CPU tensor alive in the process."""
    gc.collect()
    out = {}
    for t in gc.get_objects():
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_floating_point() and t.device.type == "cpu":
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def _held_floats(model, before: dict[int, int]) -> int:
    """Bytes of floating CPU tensors made since `before` and alive now, besides the model's own (and views)."""
    own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    return sum(n for p, n in _cpu_floats().items() if p not in own and p not in before)


def _watch(monkeypatch) -> dict:
    """Record, as every point starts pruning, the bytes held besides the model and the targets' bytes; and the
    most blocks of the source's LazyModel in memory at once."""
    seen = {"held": [], "targets": 0, "most": 0, "loads": 0, "before": _cpu_floats()}  # (other tests' leftovers)
    real_prune, real_load = prune.prune, lazy.LazyModel.load

    def watched_prune(model, solver, pattern, layer_s, *a, **k):
        seen["targets"] = sum(arch.target(model, n).weight.nbytes for n in layer_s)
        seen["held"].append(_held_floats(model, seen["before"]))
        return real_prune(model, solver, pattern, layer_s, *a, **k)

    def load(self, prefix="", device="cpu", exclude=()):
        real_load(self, prefix, device, exclude)
        held = sum(any(p.device.type != "meta" for p in b.parameters()) for b in arch.blocks(self.model))
        seen["most"], seen["loads"] = max(seen["most"], held), seen["loads"] + 1

    monkeypatch.setattr(prune, "prune", watched_prune)
    monkeypatch.setattr(lazy.LazyModel, "load", load)
    return seen


def test_a_whole_sweep_restores_each_point_from_the_source_not_a_copy(tmp_path, tiny_dir, calib_txt, monkeypatch):
    """Four points in memory: what is held beside the model while a point prunes is far below its linears'
    bytes (a dense copy of them was held before: the model twice at 70B), the source is read one block at a time,
    and the rows are those of the sweep from disk (each point from the dense model)."""
    rows = {}
    with monkeypatch.context() as m:
        seen = _watch(m)
        rows["whole"] = sweep.sweep(str(tiny_dir), out=str(tmp_path / "w"), calib=str(calib_txt), onload="whole",
                                    **COMMON)["rows"]
    rows["blocks"] = sweep.sweep(str(tiny_dir), out=str(tmp_path / "b"), calib=str(calib_txt), onload="blocks",
                                 **COMMON)["rows"]
    assert len(seen["held"]) == 4 and seen["targets"] > 0
    assert max(seen["held"]) < seen["targets"] / 4, seen["held"]  # (was >= the targets' bytes: their dense copy)
    n_blocks = len(arch.blocks(sweep.pipeline.load_model(str(tiny_dir))[0]))
    assert seen["most"] == 1 and seen["loads"] == n_blocks * 4  # compared once, then read for points 2-4
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["sweep.csv", "sweep.json", "sweep.png",
                                                                   "sweep_meta.json"]
    assert len({r["ppl_wikitext2"] for r in rows["whole"]}) == 5
    for w, b in zip(rows["whole"], rows["blocks"]):
        assert w["ppl_wikitext2"] == pytest.approx(b["ppl_wikitext2"], rel=1e-5)
        assert w["sparsity"] == pytest.approx(b["sparsity"], abs=1e-9)


def test_a_block_the_source_does_not_give_back_is_restored_from_a_scratch_file(tmp_path, tiny_dir, calib_txt,
                                                                               monkeypatch):
    """A block the folder gives back other than as loaded (here: one it cannot read, one whose values differ) has
    its linears' dense weights kept in a scratch file in `out`, exact; the figures are unchanged and the file goes
    with the sweep."""
    ref = sweep.sweep(str(tiny_dir), out=str(tmp_path / "ref"), calib=str(calib_txt), onload="whole",
                      **COMMON)["rows"]
    real_load, real_prune = lazy.LazyModel.load, prune.prune
    loads, files = [], []

    def load(self, prefix="", device="cpu", exclude=()):
        loads.append(prefix)
        if prefix.endswith(".0."):
            raise LLMPruneError("stored under names only a whole load converts")
        real_load(self, prefix, device, exclude)
        if prefix.endswith(".1."):  # as if the folder held other values than the model was loaded with
            with torch.no_grad():
                next(arch.blocks(self.model)[1].parameters()).add_(1.0)

    def watched_prune(*a, **k):
        files.append(sorted(p.name for p in (tmp_path / "s" / sweep.SCRATCH).glob("*")))
        return real_prune(*a, **k)

    monkeypatch.setattr(lazy.LazyModel, "load", load)
    monkeypatch.setattr(prune, "prune", watched_prune)
    rows = sweep.sweep(str(tiny_dir), out=str(tmp_path / "s"), calib=str(calib_txt), onload="whole", **COMMON)["rows"]
    assert [r["ppl_wikitext2"] for r in rows] == [r["ppl_wikitext2"] for r in ref]
    assert len(loads) == 2  # both blocks compared once before the first point, neither read from the source again
    assert files == [["dense-00000.safetensors", "dense-00001.safetensors"]] * 4
    assert not (tmp_path / "s" / sweep.SCRATCH).exists()
    assert json.loads((tmp_path / "s" / "sweep_meta.json").read_text())["onload"] == "whole: --onload whole"
