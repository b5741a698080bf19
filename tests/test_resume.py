"""A compression killed while pruning goes on from its last checkpoint when the same command runs again, and
writes what a run that never stopped writes: the same tensors, sparsity and figures (resume.py)."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmprune import outdir, prune, resume
from llmprune.cli import main
from llmprune.testing import folder_tensors as _tensors
from llmprune.testing import tiny_model_dir

BLOCKS = 4
ARGS = ["--nsamples", "6", "--seqlen", "32", "--calib-batch", "4", "--no-progress", "--eval", "wikitext2",
        "--eval-seqlen", "64", "--eval-windows", "2", "--onload", "blocks", "--checkpoint-every", "0"]
SHARD_BYTES = 300_000  # two blocks a file: the killed run's last file holds a finished block and an unfinished one

# A killed run: dies by SIGKILL (nothing cleans up) when block KILL_AT of pass STAGE (any: None) is written but its
# checkpoint is not (KILL_AT < 0: during the evaluation of the saved folder, after every block's checkpoint)
KILLER = """
import os, signal, sys
from llmprune import lazy, pipeline, resume
from llmprune.cli import main
lazy.SHARD_BYTES = {shard_bytes}
kill_at, stage = {kill_at}, {stage!r}
after = resume.Checkpoints.after
def dying_after(self, i, *a):
    if i == kill_at and stage in (None, self.stage):
        os.kill(os.getpid(), signal.SIGKILL)
    return after(self, i, *a)
resume.Checkpoints.after = dying_after
if kill_at < 0:
    pipeline.evaluate_saved = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(main({argv!r}))
"""


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("deep") / "llama", "llama", seed=3, num_hidden_layers=BLOCKS)


def _kill(argv: list[str], kill_at: int, shard_bytes: int = SHARD_BYTES, stage: str | None = None) -> None:
    code = KILLER.format(shard_bytes=shard_bytes, kill_at=kill_at, argv=argv, stage=stage)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def _stop(monkeypatch, argv: list[str], kill_at: int, shard_bytes: int = SHARD_BYTES, stage: str | None = None) -> None:
    """As `_kill`, by Ctrl-C in this process (KeyboardInterrupt where `_kill`'s run dies): the run keeps its folder
    (outdir.atomic_dir), which the same command takes over as a killed run's, without a fresh interpreter's start-up
    (seconds of the suite's time a run). `_kill` is the case where nothing cleans up."""
    from llmprune import lazy, pipeline

    after = resume.Checkpoints.after

    def stopping(self, i, *a):
        if i == kill_at and stage in (None, self.stage):
            raise KeyboardInterrupt
        return after(self, i, *a)

    with monkeypatch.context() as m:
        m.setattr(lazy, "SHARD_BYTES", shard_bytes)
        m.setattr(resume.Checkpoints, "after", stopping)
        if kill_at < 0:
            m.setattr(pipeline, "evaluate_saved", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv) == 130


def _stop_training(monkeypatch, argv: list[str], step: int) -> None:
    """A run stopped by Ctrl-C right after its training (PERP's, scale tuning's) committed the checkpoint of `step`."""
    save = resume.Training.save

    def stopping(self, state):
        save(self, state)
        if state["step"] == step:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(resume.Training, "save", stopping)
        assert main(argv) == 130


def _same_output(ref: Path, out: Path) -> tuple[dict, dict]:
    """Assert `out` (resumed) holds `ref`'s tensors, in the same several files to the byte, with no checkpoint or
    killed run's folder left; returns both manifests."""
    assert not outdir.stale(out) and not (out / resume.RESUME).exists()
    a, b = _tensors(ref), _tensors(out)
    assert set(a) == set(b) and len(list(out.glob("*.safetensors"))) > 1
    for k in a:
        assert torch.equal(a[k], b[k]), k
    files = sorted(f.name for f in ref.glob("*.safetensors*"))  # the same files, byte for byte (and index)
    assert files == sorted(f.name for f in out.glob("*.safetensors*"))
    assert all((ref / f).read_bytes() == (out / f).read_bytes() for f in files)
    return tuple(json.loads((f / "llmprune.json").read_text()) for f in (ref, out))


def _solved(monkeypatch) -> list[str]:
    names: list[str] = []
    real = prune._solve

    def solve(mod, name, *a, **k):
        names.append(name)
        return real(mod, name, *a, **k)

    monkeypatch.setattr(prune, "_solve", solve)
    return names


CASES = [  # a stats pass, a sequential solver, no calibration at all, OWL's outlier pass first
    ["--solver", "wanda"],
    ["--solver", "sparsegpt", "--pattern", "2:4"],
    ["--solver", "magnitude"],
    ["--solver", "wanda", "--owl", "--sparsity", "0.6"],
]


@pytest.mark.parametrize("recipe", CASES, ids=["wanda", "sparsegpt-24", "magnitude", "wanda-owl"])
def test_a_killed_run_goes_on_from_its_checkpoint_to_the_same_output(tmp_path, capsys, monkeypatch, deep_dir,
                                                                      calib_txt, recipe):
    from llmprune import lazy

    monkeypatch.setattr(lazy, "SHARD_BYTES", SHARD_BYTES)
    argv = ["compress", "--model", str(deep_dir), *recipe, "--calib", str(calib_txt), *ARGS]
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    capsys.readouterr()

    out = tmp_path / "out"
    if recipe is CASES[0]:  # SIGKILL; the other recipes stopped by Ctrl-C (the same checkpoint, seconds sooner)
        _kill([*argv, "--out", str(out)], kill_at=3)  # blocks 0-3 written, checkpoint after block 2
    else:
        _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=3)
    assert not out.exists()
    (left,) = outdir.stale(out)
    state = json.loads((left / resume.RESUME / resume.STATE).read_text())
    assert state["next_block"] == 3 and state["blocks"] == BLOCKS

    solved = _solved(monkeypatch)
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"resuming {left.name}: blocks 0-2 of {BLOCKS}" in err
    assert solved and all(n.split(".")[2] == "3" for n in solved)  # blocks 0-2 were not pruned again
    ma, mb = _same_output(ref, out)
    assert mb["sparsity"] == ma["sparsity"]
    assert mb.get("owl") == ma.get("owl") and mb.get("damp_raised") == ma.get("damp_raised")
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"]
    assert mb["eval"]["wikitext2"]["dense_ppl"] == ma["eval"]["wikitext2"]["dense_ppl"]
    assert "dense_eval_s" not in mb["timings"]  # the killed run's figure, kept in its checkpoint
    assert ma.get("resumed") is None
    r = mb["resumed"]
    assert r["from_block"] == 3 and r["blocks"] == BLOCKS and r["runs"] == 2 and r["earlier_s"] > 0


@pytest.mark.parametrize("killed,rerun", [(["--hessian-gib", "0"], [])])
def test_a_killed_moe_run_goes_on_to_the_same_per_expert_files(tmp_path, capsys, monkeypatch, calib_txt, killed,
                                                               rerun):
    """A Mixture-of-Experts model read and written block by block (experts fused in memory, one linear
    per expert in the files: stored.py) resumes into the same files, byte for byte; with its Hessians collected a
    run at a time too (--hessian-gib 0), and the manifest counts the runs of the blocks before the kill. The
    budget is not the recipe (it moves no weight): a run killed under one goes on under another (after running
    out of memory, say), to the files of a run under the default, and the count is the blocks' before the kill
    plus the rerun's. (The same budget killed and rerun was a case, the default both times another, dropped for the
    suite's time: this one resumes the same per-expert files.)"""
    from llmprune import lazy

    src = tiny_model_dir(tmp_path / "moe", "qwen3_moe", seed=3, num_hidden_layers=BLOCKS)
    monkeypatch.setattr(lazy, "SHARD_BYTES", 3 * SHARD_BYTES)
    argv = ["compress", "--model", str(src), "--solver", "sparsegpt", "--calib", str(calib_txt), *ARGS]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*argv, *rerun, "--out", str(ref)]) == 0
    _kill([*argv, *killed, "--out", str(out)], kill_at=3, shard_bytes=3 * SHARD_BYTES)
    assert main([*argv, *rerun, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().err
    ma, mb = _same_output(ref, out)
    assert "model.layers.3.mlp.experts.7.gate_proj.weight" in _tensors(out) and mb["sparsity"] == ma["sparsity"]
    per_block = 2 + 7 + 7  # q, k, v apart; 8 experts' gate+up; 8 downs
    # blocks 0-2 under the killed run's budget, block 3 under the default (one run a group)
    assert ma.get("hessian_runs") is None and mb["hessian_runs"]["extra"] == 3 * per_block


def test_a_killed_packed_moe_run_goes_on_to_the_same_files_and_experts(tmp_path, capsys, monkeypatch, calib_txt):
    """`--format w4s24` of a Mixture-of-Experts model (each expert's projections packed): the resumed run writes
    the uninterrupted run's files, and its manifest lists every block's packed experts (the loader splits what it
    lists), not only those of the blocks after the kill."""
    from llmprune import lazy
    from llmprune.packed import load_packed

    src = tiny_model_dir(tmp_path / "moe", "qwen3_moe", seed=3, num_hidden_layers=BLOCKS)
    shard = 40_000  # a packed block is ~25 kB: a file every two blocks
    monkeypatch.setattr(lazy, "SHARD_BYTES", shard)
    argv = ["compress", "--model", str(src), "--pattern", "2:4", "--format", "w4s24", "--calib", str(calib_txt), *ARGS]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*argv, "--out", str(ref)]) == 0
    _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=3, shard_bytes=shard)
    assert main([*argv, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().err
    ma, mb = _same_output(ref, out)
    experts = [f"model.layers.{i}.mlp.experts" for i in range(BLOCKS)]
    assert ma["format"]["experts"] == mb["format"]["experts"] == experts
    assert mb["format"]["layers"] == ma["format"]["layers"]
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"]
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(load_packed(out)(ids).logits, load_packed(ref)(ids).logits)


def test_a_run_killed_after_its_last_block_only_writes_and_measures(tmp_path, capsys, monkeypatch, deep_dir,
                                                                    calib_txt):
    from llmprune import lazy

    monkeypatch.setattr(lazy, "SHARD_BYTES", SHARD_BYTES)
    argv = ["compress", "--model", str(deep_dir), "--solver", "sparsegpt", "--calib", str(calib_txt), *ARGS]
    out = tmp_path / "out"
    _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=-1)  # stopped while evaluating the saved folder
    solved = _solved(monkeypatch)
    assert main([*argv, "--out", str(out), "--no-dense-eval"]) == 0  # evaluation flags are not the recipe
    assert solved == []
    m = json.loads((out / "llmprune.json").read_text())
    assert m["resumed"]["from_block"] == BLOCKS and m["eval"]["wikitext2"]["ppl"] > 0
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref), "--checkpoint-every", "off"]) == 0
    a, b = _tensors(ref), _tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    assert json.loads((ref / "llmprune.json").read_text())["eval"]["wikitext2"]["ppl"] == m["eval"]["wikitext2"]["ppl"]


def test_another_recipe_starts_over_and_removes_the_killed_runs_folder(tmp_path, capsys, monkeypatch, deep_dir,
                                                                        calib_txt):
    from llmprune import lazy

    monkeypatch.setattr(lazy, "SHARD_BYTES", SHARD_BYTES)
    argv = ["compress", "--model", str(deep_dir), "--solver", "wanda", "--calib", str(calib_txt), *ARGS]
    out = tmp_path / "out"
    _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=1)
    assert outdir.stale(out)
    solved = _solved(monkeypatch)
    assert main([*argv, "--out", str(out), "--sparsity", "0.6"]) == 0
    assert "resuming" not in capsys.readouterr().err
    assert {n.split(".")[2] for n in solved} == {str(i) for i in range(BLOCKS)}
    assert not outdir.stale(out)
    m = json.loads((out / "llmprune.json").read_text())
    assert m.get("resumed") is None and m["sparsity"]["target"] == 0.6


def test_a_finished_run_or_one_that_fails_before_a_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch, tiny_dir,
                                                                            calib_txt):
    argv = ["compress", "--model", str(tiny_dir), "--calib", str(calib_txt), *ARGS]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0
    assert not (out / resume.RESUME).exists() and not outdir.stale(out)

    def failing(self, i, *a):
        raise RuntimeError("boom")  # before the first commit

    monkeypatch.setattr(resume.Checkpoints, "after", failing)
    with pytest.raises(RuntimeError):
        main([*argv, "--out", str(tmp_path / "failed")])
    assert not list(tmp_path.glob(".failed*")) and "kept" not in capsys.readouterr().err


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, "SIGTERM"])
def test_a_run_that_fails_after_a_checkpoint_keeps_it_for_the_same_command(tmp_path, capsys, monkeypatch, deep_dir,
                                                                           calib_txt, error):
    """Ctrl-C, SIGTERM (a scheduler's limit, a preempted instance's notice) or an error (a CUDA out-of-memory) after
    a checkpoint: the folder stays, said in one line, under a name no live run owns, so the same command goes on
    from it - in the same process too (the API's retry)."""
    from llmprune import lazy

    monkeypatch.setattr(lazy, "SHARD_BYTES", SHARD_BYTES)
    argv = ["compress", "--model", str(deep_dir), "--solver", "sparsegpt", "--calib", str(calib_txt), *ARGS]
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    real = resume.Checkpoints.after

    def failing(self, i, *a):
        real(self, i, *a)
        if i == 1 and error == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises errors.Terminated here
        elif i == 1:
            raise error("boom")

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(resume.Checkpoints, "after", failing)
        if error is KeyboardInterrupt:
            assert main([*argv, "--out", str(out)]) == 130
        elif error == "SIGTERM":
            assert main([*argv, "--out", str(out)]) == 128 + signal.SIGTERM
            assert signal.getsignal(signal.SIGTERM) is not None and "terminated" not in \
                getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "")  # the handler before, restored
        else:
            with pytest.raises(RuntimeError):
                main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    if error == "SIGTERM":
        assert err.strip().splitlines()[-1] == "llmprune: terminated (SIGTERM); the output being written was not", err
    (left,) = outdir.stale(out)
    assert f"llmprune: kept {left.name} (" in err and "blocks 0-1 of 4 were pruned when it stopped" in err
    assert not out.exists() and re.fullmatch(r"\.out\.tmp-[0-9a-f]{8}", left.name)
    solved = _solved(monkeypatch)
    assert main([*argv, "--out", str(out)]) == 0
    assert f"resuming {left.name}: blocks 0-1 of {BLOCKS} were pruned" in capsys.readouterr().err
    assert solved and blocks_of(solved) == {"2", "3"}
    _same_output(ref, out)


def test_checkpoints_follow_the_clock(tmp_path, monkeypatch, tiny_dir):
    """One commit per `every_s` seconds and one after the last block; each keeps only its own activations."""
    import torch

    commits = []

    class Out:
        @staticmethod
        def ready():
            return True

        @staticmethod
        def sync():
            commits.append("sync")
            return {}

        @staticmethod
        def snapshot():
            return {"zeros": 0}

        @staticmethod
        def restore(state, start):
            commits.append(("restore", state, start))

    clock = [0.0]
    monkeypatch.setattr(resume.time, "monotonic", lambda: clock[0])
    ck = resume.Checkpoints(tmp_path, "fp", 10.0, n_blocks=5).begin("prune", Out)
    h = [torch.randn(2, 3, 4, dtype=torch.bfloat16), torch.randn(1, 3, 4, dtype=torch.bfloat16)]
    for i, t in enumerate([1.0, 5.0, 12.0, 13.0, 14.0]):
        clock[0] = t
        ck.after(i, h, {}, {}, 0)
    assert commits == ["sync", "sync"]  # at 12 s (block 2) and after the last block
    state = json.loads((tmp_path / resume.RESUME / resume.STATE).read_text())
    assert state["next_block"] == 5 and state["hidden"] is None
    assert not list((tmp_path / resume.RESUME).glob("hidden-*"))
    clock[0] = 30.0
    ck.after(2, h, {}, {}, 0)  # a commit with activations: read back exactly
    again = resume.Checkpoints(tmp_path, "fp", 10.0, n_blocks=5,
                               state=json.loads((tmp_path / resume.RESUME / resume.STATE).read_text()))
    again.begin("prune", Out)
    got = again.hidden("cpu")
    assert commits[-1] == ("restore", {"zeros": 0}, 3)
    assert again.start == 3 and len(got) == 2 and all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(got, h))


def test_the_fingerprint_follows_what_decides_the_weights(tmp_path, tiny_dir):
    from llmprune.config import CompressConfig

    cfg = CompressConfig(model=str(tiny_dir)).as_dict()
    ids = torch.arange(64).reshape(2, 32)
    base = resume.fingerprint(cfg, ids, tiny_dir, ("cpu",), torch.float32)
    assert base == resume.fingerprint({**cfg, "eval": ("c4",), "out": "x", "checkpoint_s": 1.0}, ids, tiny_dir,
                                      ("cpu",), torch.float32)
    assert base != resume.fingerprint({**cfg, "sparsity": 0.6}, ids, tiny_dir, ("cpu",), torch.float32)
    assert base != resume.fingerprint(cfg, ids + 1, tiny_dir, ("cpu",), torch.float32)
    assert base != resume.fingerprint(cfg, ids, tiny_dir, ("cpu",), torch.bfloat16)
    fp = lambda **g: resume.fingerprint({**cfg, "gptq": {"act_order": True, "sink_weight": 16.0, **g}}, ids, tiny_dir,
                                        ("cpu",), torch.float32)
    # scale tuning's steps and learning rate decide its own training only (Checkpoints.retune), not whether it runs
    assert fp(tune_steps=5, tune_lr=1e-3) == fp(tune_steps=64, tune_lr=3e-4) != fp(tune_steps=0, tune_lr=1e-3)
    assert fp(tune_steps=5, tune_lr=1e-3) != fp(tune_steps=5, tune_lr=1e-3, act_order=False)
    f = next(tiny_dir.glob("*.safetensors"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source file replaced
    try:
        assert base != resume.fingerprint(cfg, ids, tiny_dir, ("cpu",), torch.float32)
    finally:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_checkpoint_every_takes_seconds_or_off(capsys, tiny_dir):
    rc = main(["compress", "--model", str(tiny_dir), "--checkpoint-every", "soon"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--checkpoint-every 'soon'" in err[0] and "or off" in err[0]
    rc = main(["compress", "--model", str(tiny_dir), "--checkpoint-every", "-5"])
    assert rc == 2 and "seconds >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("onload", ["blocks", "whole"])
def test_a_disk_too_small_for_the_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, tiny_dir,
                                                                     calib_txt, onload):
    import shutil

    argv = ["compress", "--model", str(tiny_dir), "--calib", str(calib_txt), "--onload", onload,
            "--nsamples", "6", "--seqlen", "32", "--no-progress", "--eval", "none"]
    ok = tmp_path / "ok"
    assert main([*argv, "--out", str(ok)]) == 0
    written = sum(f.stat().st_size for f in ok.glob("*.safetensors"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=int(written * 0.95)))
    solved = _solved(monkeypatch)
    capsys.readouterr()
    rc = main([*argv, "--out", str(tmp_path / "small")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("llmprune: error: small needs ") and "MB (the output " in err[0] and \
        "MB free: free space there or choose another --out" in err[0]
    assert solved == [] and not list(tmp_path.glob("*small*"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=written + 2**20))
    assert main([*argv, "--out", str(tmp_path / "fits")]) == 0


def test_a_sweep_from_disk_checks_the_space_of_its_pruned_copy(tmp_path, capsys, monkeypatch, tiny_dir):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc = main(["sweep", "--model", str(tiny_dir), "--solvers", "magnitude", "--sparsity", "0.5", "--eval-windows", "1",
               "--eval-seqlen", "32", "--out", str(tmp_path / "sw"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("llmprune: error: the sweep needs ") and \
        "(the pruned blocks in float32 " in err[0], err


PACKS = {  # packed outputs: a file (and so a checkpoint) after every block with files this small
    "pack-w4s24-gptq": ["pack", "{src}", "--format", "w4s24", "--quant", "gptq", "--group-size", "32", "--calib",
                        "{calib}", "--nsamples", "6", "--seqlen", "32", "--eval", "wikitext2"],
    "compress-w4g128-rtn": ["compress", "--model", "{model}", "--solver", "wanda", "--format", "w4g128", "--quant",
                            "rtn", "--group-size", "32", "--calib", "{calib}", "--nsamples", "6", "--seqlen", "32",
                            "--eval", "wikitext2", "--onload", "blocks"],
    "pack-sparse24": ["pack", "{src}", "--format", "sparse24", "--eval", "wikitext2"],
}


@pytest.mark.parametrize("case", list(PACKS))
def test_a_killed_pack_goes_on_from_its_checkpoint_to_the_same_tensors(tmp_path, capsys, monkeypatch, deep_dir,
                                                                       calib_txt, case):
    from llmprune import lazy

    src = tmp_path / "src"
    assert main(["compress", "--model", str(deep_dir), "--solver", "sparsegpt", "--pattern", "2:4", "--calib",
                 str(calib_txt), "--nsamples", "6", "--seqlen", "32", "--no-progress", "--eval", "none", "--out",
                 str(src)]) == 0
    monkeypatch.setattr(lazy, "SHARD_BYTES", 5_000)
    argv = [a.format(src=src, model=deep_dir, calib=calib_txt) for a in PACKS[case]] + \
        ["--eval-seqlen", "64", "--eval-windows", "2", "--no-progress", "--checkpoint-every", "0"]
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    out = tmp_path / "out"
    _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=2, shard_bytes=5_000)
    (left,) = outdir.stale(out)
    assert json.loads((left / resume.RESUME / resume.STATE).read_text())["next_block"] == 2
    capsys.readouterr()
    solved = []
    from llmprune import packed

    real = packed.PackWriter.add_linear
    monkeypatch.setattr(packed.PackWriter, "add_linear", lambda self, name, *a, **k: (solved.append(name),
                                                                                     real(self, name, *a, **k))[1])
    assert main([*argv, "--out", str(out)]) == 0
    assert f"resuming {left.name}: blocks 0-1 of {BLOCKS}" in capsys.readouterr().err
    assert solved and all(n.split(".")[2] in ("2", "3") for n in solved)
    ma, mb = _same_output(ref, out)
    assert mb["format"] == ma["format"]
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"]
    assert mb["resumed"]["from_block"] == 2 and ma.get("resumed") is None


RECOVER = ["--recover", "perp", "--recover-steps", "2"]
W4S24_GPTQ = ["--format", "w4s24", "--quant", "gptq", "--group-size", "32"]
ALL = {"0", "1", "2", "3"}
TWO_PASSES = {  # compress with a pass after the pruning's, through the scratch folder:
    # recipe, killed at (pass, block), the checkpoint left (pass, next block, passes done), what the resume says,
    # what the next run does again (blocks pruned, PERP trainings, blocks packed)
    "gptq-killed-pruning": (W4S24_GPTQ, ("prune", 2), ("prune", 2, []), "blocks 0-1 of 4 were pruned",
                            ({"2", "3"}, 0, ALL)),
    "gptq-killed-quantizing": (W4S24_GPTQ, ("gptq", 2), ("gptq", 2, ["prune"]),
                               "blocks 0-3 of 4 were pruned, blocks 0-1 of 4 were quantized (GPTQ)",
                               (set(), 0, {"2", "3"})),
    "perp-gptq-killed-quantizing": ([*RECOVER, *W4S24_GPTQ], ("gptq", 2), ("gptq", 2, ["prune", "recover"]),
                                    ("blocks 0-3 of 4 were pruned, blocks 0-3 of 4 were retrained (PERP), blocks 0-1 "
                                     "of 4 were quantized (GPTQ)"), (set(), 0, {"2", "3"})),
    "perp-gptq-killed-before-quantizing": ([*RECOVER, *W4S24_GPTQ], ("gptq", 0), ("recover", 4, ["prune"]),
                                           "blocks 0-3 of 4 were pruned, blocks 0-3 of 4 were retrained (PERP)",
                                           (set(), 0, ALL)),
}  # (PERP killed while pruning was a case: the training checkpoints' test kills pruning + PERP while training)


def _counted(monkeypatch) -> dict[str, list]:
    """What a run does again: linears pruned, PERP trainings, linears packed (after GPTQ, or as written)."""
    from llmprune import packed, pipeline

    did: dict[str, list] = {"pruned": _solved(monkeypatch), "trained": [], "packed": []}
    real_recover, real_add = pipeline.recover, packed.PackWriter.add_linear
    monkeypatch.setattr(pipeline, "recover", lambda *a, **k: (did["trained"].append(1), real_recover(*a, **k))[1])
    monkeypatch.setattr(packed.PackWriter, "add_linear",
                        lambda self, name, *a, **k: (did["packed"].append(name), real_add(self, name, *a, **k))[1])
    return did


def _two_pass_argv(deep_dir, calib_txt, recipe) -> list[str]:
    return ["compress", "--model", str(deep_dir), "--solver", "sparsegpt", "--pattern", "2:4", *recipe, "--calib",
            str(calib_txt), *ARGS]


@pytest.mark.parametrize("case", list(TWO_PASSES))
def test_a_run_killed_in_either_pass_goes_on_from_that_pass(tmp_path, capsys, monkeypatch, deep_dir, calib_txt, case):
    """GPTQ (and PERP) after the pruning: the pruning pass commits checkpoints of the scratch folder, PERP one when it
    has written the trained blocks there, GPTQ's pass checkpoints of the output; a run killed in GPTQ's pass prunes
    and trains nothing again, one killed while pruning prunes from its checkpoint on - to the output of a run never
    stopped."""
    from llmprune import lazy

    recipe, (stage, at), left_at, said, (pruned, trained, packed) = TWO_PASSES[case]
    monkeypatch.setattr(lazy, "SHARD_BYTES", 5_000)  # a packed file, so a checkpoint, after every block
    argv = _two_pass_argv(deep_dir, calib_txt, recipe)
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    out = tmp_path / "out"
    _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=at, shard_bytes=5_000, stage=stage)
    (left,) = outdir.stale(out)
    state = json.loads((left / resume.RESUME / resume.STATE).read_text())
    assert (state["stage"], state["next_block"], list(state["done"])) == left_at
    capsys.readouterr()
    did = _counted(monkeypatch)
    assert main([*argv, "--out", str(out)]) == 0
    assert f"resuming {left.name}: {said} by a run that stopped" in capsys.readouterr().err
    assert (blocks_of(did["pruned"]), len(did["trained"]), blocks_of(did["packed"])) == (pruned, trained, packed)
    ma, mb = _same_output(ref, out)
    assert not (out / onload_scratch()).exists()
    untimed = lambda d: {k: v for k, v in d.items() if k not in ("wall_s", "seconds")} if isinstance(d, dict) else d
    for key in ("sparsity", "format", "recover", "damp_raised", "steps"):
        assert untimed(mb.get(key)) == untimed(ma.get(key)), key
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"]
    r = mb["resumed"]
    assert (r["pass"], r["from_block"], r["passes_done"]) == left_at


def onload_scratch() -> str:
    from llmprune import onload

    return onload.SCRATCH


# dies by SIGKILL while PERP's trained blocks replace the pruned ones in the scratch folder (GPTQ's pass follows)
KILL_REWRITING = """
import os, signal, sys
from llmprune import lazy, onload, pipeline
from llmprune.cli import main
lazy.SHARD_BYTES = 5_000
trained = []
real_recover, real_block = pipeline.recover, onload.Scratch.block
pipeline.recover = lambda *a, **k: (trained.append(1), real_recover(*a, **k))[1]
def block(self, i, module):
    if trained and i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_block(self, i, module)
onload.Scratch.block = block
sys.exit(main({argv!r}))
"""


def test_a_run_killed_while_perp_rewrites_the_pruned_blocks_starts_over(tmp_path, capsys, monkeypatch, deep_dir,
                                                                         calib_txt):
    """The pruning pass's last checkpoint names the scratch files PERP then rewrites in place: it is dropped first,
    so a run killed half-way through cannot take trained blocks for pruned ones; the next run starts over."""
    from llmprune import lazy

    monkeypatch.setattr(lazy, "SHARD_BYTES", 5_000)
    argv = _two_pass_argv(deep_dir, calib_txt, [*RECOVER, *W4S24_GPTQ])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILL_REWRITING.format(argv=[*argv, "--out", str(out)])], check=False,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    (left,) = outdir.stale(out)
    assert (left / onload_scratch() / "block-00001.safetensors").exists()
    assert not (left / resume.RESUME / resume.STATE).exists()
    capsys.readouterr()
    did = _counted(monkeypatch)
    assert main([*argv, "--out", str(out)]) == 0
    assert "resuming" not in capsys.readouterr().err and blocks_of(did["pruned"]) == {"0", "1", "2", "3"}
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref), "--checkpoint-every", "off"]) == 0
    _same_output(ref, out)


def blocks_of(names) -> set[str]:
    return {n.split(".")[2] for n in names}


GPTQ = ["--format", "w4g128", "--group-size", "16", "--quant", "gptq"]
PERP = ["--recover", "perp", "--recover-steps", "2"]
SLICES = {  # recipe, block whose checkpoint is not committed (-1: killed while evaluating, after everything), pass
    "per-block": (["--rotation", "per-block"], 2, "slice"),
    "per-block-head": (["--rotation", "per-block"], BLOCKS - 1, "slice"),  # the last block's is committed with the head
    "shared-perp": (["--rotation", "shared", "--slice-head", *PERP], 1, "slice"),
    "shared-perp-eval": (["--rotation", "shared", "--slice-head", *PERP], -1, "recover"),  # PERP's output kept
    "per-block-perp-gptq": (["--rotation", "per-block", *PERP, *GPTQ], 2, "gptq"),  # PERP's scratch folder kept
}


@pytest.mark.parametrize("case", list(SLICES))
def test_a_killed_slicegpt_run_goes_on_from_its_checkpoint_to_the_same_output(tmp_path, capsys, monkeypatch, deep_dir,
                                                                             calib_txt, case):
    """SliceGPT from disk commits checkpoints after blocks (the next block's inputs and their basis, or the shared
    rotation, and the kept variances so far) and after the head, PERP once its result is written, and GPTQ's pass
    after them (from the scratch folder): a killed run's next run slices only the blocks after the checkpoint (none
    when the pass was finished), trains PERP only if the killed run had not written its result, quantizes only the
    blocks after GPTQ's checkpoint, and writes the files and manifest of a run that never stopped; the scratch
    folders and checkpoints go at the end."""
    from llmprune import lazy, onload_slicegpt, pipeline

    recipe, kill_at, stage = SLICES[case]
    shard = 100_000 if stage == "slice" else 5_000  # (a packed output commits once a block fills a file)
    monkeypatch.setattr(lazy, "SHARD_BYTES", shard)
    argv = ["compress", "--model", str(deep_dir), "--solver", "slicegpt", *recipe, "--calib", str(calib_txt), *ARGS]
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref), "--checkpoint-every", "off"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    _stop(monkeypatch, [*argv, "--out", str(out)], kill_at, shard, None if kill_at < 0 else stage)
    (left,) = outdir.stale(out)
    state = json.loads((left / resume.RESUME / resume.STATE).read_text())
    start = BLOCKS if kill_at < 0 else kill_at
    assert state["stage"] == stage and state["next_block"] == start
    sliced, trained = [], []
    real = onload_slicegpt.SlicedOutput.block
    monkeypatch.setattr(onload_slicegpt.SlicedOutput, "block", lambda self, i: sliced.append(i) or real(self, i))
    recover = pipeline.recover
    monkeypatch.setattr(pipeline, "recover", lambda *a, **k: trained.append(1) or recover(*a, **k))
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    said = {"slice": "sliced (SliceGPT)", "gptq": "quantized (GPTQ)", "recover": "retrained (PERP)"}[stage]
    assert f"resuming {left.name}: " in err and f"blocks 0-{start - 1} of {BLOCKS} were {said} by" in err, err
    assert sliced == (list(range(start, BLOCKS)) if stage == "slice" else [])
    assert trained == ([1] if stage == "slice" and "--recover" in recipe else [])  # PERP done once, by one run
    assert not outdir.stale(out) and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    a, b = _tensors(ref), _tensors(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(out.glob("*.safetensors"))) > 1 or "--format" in recipe
    ma, mb = (json.loads((f / "llmprune.json").read_text()) for f in (ref, out))
    assert mb["resumed"]["pass"] == stage and mb["resumed"]["from_block"] == start
    assert ma["slicegpt"] == mb["slicegpt"] and ma["steps"] == mb["steps"]
    assert ma["eval"]["wikitext2"]["ppl"] == mb["eval"]["wikitext2"]["ppl"]


# dies by SIGKILL right after a training's checkpoint of step KILL_AT is committed (PERP's, scale tuning's), writing
# files of SHARD_BYTES as the uninterrupted run it is compared with
KILL_TRAINING = """
import os, signal, sys
from llmprune import lazy, resume
from llmprune.cli import main
lazy.SHARD_BYTES = {shard_bytes}
save = resume.Training.save
def dying_save(self, state):
    save(self, state)
    if state["step"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
resume.Training.save = dying_save
sys.exit(main({argv!r}))
"""


def _kill_training(argv: list[str], step: int, shard_bytes: int) -> None:
    """A run killed by SIGKILL (in its own process) right after its training committed the checkpoint of `step`."""
    code = KILL_TRAINING.format(kill_at=step, argv=argv, shard_bytes=shard_bytes)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]

TRAININGS = {  # recipe, what the resume says besides the training's steps
    "wanda-perp": (["--solver", "wanda"], "blocks 0-3 of 4 were pruned, "),
    "slicegpt-perp": (["--solver", "slicegpt", "--rotation", "per-block"], "blocks 0-3 of 4 were sliced (SliceGPT), "),
    # the model in memory (as `--onload auto` runs PERP on the CPU alone): the next run prunes again, then goes on
    "wanda-perp-whole": (["--solver", "wanda", "--onload", "whole"], ""),
    "recover-command": (None, ""),  # `llmprune recover` of a pruned folder
}


@pytest.mark.parametrize("case", list(TRAININGS))
def test_a_run_killed_while_perp_trains_goes_on_from_its_training_checkpoint(tmp_path, capsys, monkeypatch, deep_dir,
                                                                           calib_txt, case):
    """PERP's training commits checkpoints (the trained tensors, AdamW's and the schedule's state, the losses) on
    the run's clock, in `compress --recover perp` and in `recover`: a run killed while training trains only the
    steps after its last one, to the tensors, losses and figures of a run that never stopped; the checkpoint goes
    with the rest at the end."""
    recipe, said = TRAININGS[case]
    if recipe is None:
        src = tmp_path / "pruned"
        assert main(["compress", "--model", str(deep_dir), "--solver", "wanda", "--calib", str(calib_txt), *ARGS,
                     "--out", str(src)]) == 0
        argv = ["recover", str(src), "--steps", "5", "--data", str(calib_txt), "--seqlen", "32", *ARGS[6:]]
    else:
        argv = ["compress", "--model", str(deep_dir), "--recover", "perp", "--recover-steps", "5",
                "--calib", str(calib_txt), *ARGS, *recipe]  # (after ARGS: its --onload blocks, replaced)
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref), "--checkpoint-every", "off"]) == 0
    out = tmp_path / "out"
    if case == "wanda-perp":  # SIGKILL; the others stopped by Ctrl-C after the same checkpoint (seconds sooner)
        from llmprune import lazy

        _kill_training([*argv, "--out", str(out)], step=3, shard_bytes=lazy.SHARD_BYTES)
    else:
        _stop_training(monkeypatch, [*argv, "--out", str(out)], step=3)
    (left,) = outdir.stale(out)
    state = json.loads((left / resume.RESUME / resume.STATE).read_text())
    assert state["keep"]["train"]["step"] == 3 and state.get("next_block", BLOCKS) == BLOCKS
    assert [p.name for p in (left / resume.RESUME).glob("train-*")] == ["train-000003"]  # (the earlier ones went)
    saved = (left / resume.RESUME / state["keep"]["train"]["file"]).stat().st_size
    capsys.readouterr()
    updates = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: updates.append(1) or step(self, *a, **k))
    assert main([*argv, "--out", str(out)]) == 0
    out_err = capsys.readouterr()
    assert f"resuming {left.name}: {said}PERP had trained 3 of 5 steps by a run that stopped" in out_err.err
    assert "PERP's training from step 3, from the checkpoint of" in out_err.out
    assert len(updates) == 2  # steps 4 and 5 only
    assert not outdir.stale(out) and not (out / resume.RESUME).exists()
    a, b = _tensors(ref), _tensors(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((f / "llmprune.json").read_text()) for f in (ref, out))
    assert mb["recover"]["losses"] == ma["recover"]["losses"] and len(mb["recover"]["losses"]) == 5
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"]
    assert mb["resumed"]["perp_from_step"] == 3 and ma.get("resumed") is None
    assert mb["onload"].startswith("whole") == case.endswith("whole"), mb["onload"]
    n = mb["recover"]["n_trainable"]  # fp32 tensors and AdamW's two moments: the disk check's 12 bytes each
    assert 12 * n < saved < 12 * n + 200_000, (saved, n)


TUNE = ["--solver", "wanda", "--format", "w4g128", "--group-size", "16", "--quant", "gptq", "--tune-steps", "5"]
PRUNED_QUANTIZED = "blocks 0-3 of 4 were pruned, blocks 0-3 of 4 were quantized (GPTQ), "
TUNINGS = {  # stopped where, at; what the resume says; what the next run does again (GPTQ's blocks, Adam updates)
    "gptq": (2, "blocks 0-3 of 4 were pruned, blocks 0-1 of 4 were quantized (GPTQ)", ({2, 3}, 5)),
    "train": (3, PRUNED_QUANTIZED + "scale tuning had trained 3 of 5 steps", (set(), 2)),
    "write": (2, PRUNED_QUANTIZED + "blocks 0-3 of 4 were scale-tuned", (set(), 0)),
}


@pytest.fixture(scope="module")
def tuned_ref(deep_dir, calib_txt, tmp_path_factory):
    """The output of a run of TUNE that never stopped (files of 5,000 bytes, as the stopped runs write)."""
    from llmprune import lazy

    ref = tmp_path_factory.mktemp("tuned") / "ref"
    argv = ["compress", "--model", str(deep_dir), *TUNE, "--calib", str(calib_txt), *ARGS]
    saved, lazy.SHARD_BYTES = lazy.SHARD_BYTES, 5_000
    try:
        assert main([*argv, "--out", str(ref), "--checkpoint-every", "off"]) == 0
    finally:
        lazy.SHARD_BYTES = saved
    return argv, ref


@pytest.mark.parametrize("case", list(TUNINGS))
def test_a_run_killed_in_scale_tuning_goes_on_from_its_checkpoint(tmp_path, capsys, monkeypatch, tuned_ref, case):
    """GPTQ with its scales tuned (--tune-steps) after pruning: the teacher's hidden states are kept once computed,
    GPTQ's pass commits checkpoints of its codes, the tuning its own (the scale offsets, Adam's state), its result
    a finished pass; the next run after one killed (SIGKILL while training) or interrupted (Ctrl-C in GPTQ's pass,
    or while the tuned blocks are written) prunes, quantizes and trains only what that one had not, to the files and
    figures of a run never stopped."""
    from llmprune import lazy, onload
    from llmprune.quant import sequential

    argv, ref = tuned_ref
    at, said, (quantized, updates) = TUNINGS[case]
    out = tmp_path / "out"
    monkeypatch.setattr(lazy, "SHARD_BYTES", 5_000)
    if case == "train":  # SIGKILL: nothing cleans up
        _kill_training([*argv, "--out", str(out)], step=at, shard_bytes=5_000)
    elif case == "gptq":  # Ctrl-C in this process after a checkpoint: the folder is kept, GPTQ's codes with it
        _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=at, shard_bytes=5_000, stage="gptq")
    else:  # Ctrl-C while the tuned block `at` is written
        block = onload.Output.block

        def interrupted(self, i, *a, **k):
            if i == at:
                raise KeyboardInterrupt
            return block(self, i, *a, **k)

        with monkeypatch.context() as m:
            m.setattr(onload.Output, "block", interrupted)
            assert main([*argv, "--out", str(out)]) == 130
    (left,) = outdir.stale(out)
    assert len(list((left / onload.CODES).glob("block-*"))) >= (2 if case == "gptq" else 4)
    assert (left / resume.RESUME / "teacher").exists() == (case != "write")  # (a finished tuning needs it no more)
    if case == "train":  # the disk check's parts bound what the killed run left there (the output aside)
        parts = onload.tune_bytes(lazy.LazyModel(argv[2], torch.float32).model, torch.zeros(6, 32), 16, True)
        held = lambda pattern: sum(f.stat().st_size for f in left.glob(pattern) if f.is_file())
        codes = held(f"{onload.CODES}/*")
        assert 0.9 * parts["GPTQ's codes and tuned scales"] < codes <= parts["GPTQ's codes and tuned scales"]
        assert 0 < held(f"{resume.RESUME}/teacher/*") - parts["the teacher's hidden states"] < 1000
        (ckpt,) = (left / resume.RESUME).glob("tune-*/*")
        offsets = sum(t.numel() for t in torch.load(ckpt, weights_only=True)["t"].values())  # a scale's each
        assert 0.8 * parts["scale tuning's checkpoints"] < 2 * 12 * offsets <= parts["scale tuning's checkpoints"]
        assert 12 * offsets < ckpt.stat().st_size < 12 * offsets + 100_000  # (Adam's two moments an offset)
    did = {"pruned": _solved(monkeypatch), "teacher": [], "quantized": [], "updates": []}
    teacher, put, step = onload.teacher, onload.Codes.put, torch.optim.Adam.step
    monkeypatch.setattr(onload, "teacher", lambda *a, **k: did["teacher"].append(1) or teacher(*a, **k))
    monkeypatch.setattr(onload.Codes, "put", lambda self, i, c: did["quantized"].append(i) or put(self, i, c))
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: did["updates"].append(1) or step(self, *a, **k))
    assert sequential.GPTQ_DEFAULTS["tune_steps"] == 0  # (the recipe's 5 steps are the CLI's)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert f"resuming {left.name}: {said} by a run that stopped" in capsys.readouterr().err
    assert (did["pruned"], did["teacher"], set(did["quantized"]), len(did["updates"])) == ([], [], quantized, updates)
    ma, mb = _same_output(ref, out)
    assert not (out / onload.CODES).exists() and not (out / onload.SCRATCH).exists()
    untimed = lambda d: {k: v for k, v in d.items() if k != "seconds"}
    ta, tb = ma["format"]["quant_options"].pop("tune"), mb["format"]["quant_options"].pop("tune")
    assert untimed(tb) == untimed(ta) and ta["kept"] == "tuned", (ta, tb)
    assert mb["format"] == ma["format"] and mb["steps"] == ma["steps"]
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"]
    assert mb["resumed"].get("tune_from_step") == (3 if case == "train" else None)


@pytest.mark.parametrize("case", ["diverged", "train", "write"])
def test_a_stopped_tuning_run_again_under_another_tune_lr_reuses_the_passes_before_it(tmp_path, capsys, monkeypatch,
                                                                                      tuned_ref, case):
    """`scale tuning diverged: lower --tune-lr` (or more --tune-steps): the rerun under the new recipe takes the stopped
    run's folder over and tunes anew from GPTQ's scales, without pruning or quantizing again (at 70B, hours), to the
    files of a run of the new recipe never stopped; stopped while training (the teacher's states kept) or after the
    tuning's result (the teacher computed again)."""
    from llmprune import lazy, onload

    argv, _ = tuned_ref
    monkeypatch.setattr(lazy, "SHARD_BYTES", 5_000)
    ref, out = tmp_path / "ref", tmp_path / "out"
    other = [*argv, "--tune-lr", "3e-4"]
    assert main([*other, "--out", str(ref), "--checkpoint-every", "off"]) == 0
    if case == "train":
        _stop_training(monkeypatch, [*argv, "--out", str(out)], step=3)
    elif case == "diverged":  # the tuning's error after its step-3 checkpoint (its scales non-finite at step 4)
        from llmprune.errors import LLMPruneError

        save = resume.Training.save

        def diverging(self, state):
            save(self, state)
            if state["step"] == 3:
                raise LLMPruneError("scale tuning diverged (non-finite scales): lower --tune-lr, e.g. 3e-4")

        with monkeypatch.context() as m:
            m.setattr(resume.Training, "save", diverging)
            assert main([*argv, "--out", str(out)]) == 2
        assert "scale tuning diverged" in capsys.readouterr().err
    else:  # Ctrl-C while the tuned block 2 is written: the tuning is a finished pass, its teacher gone
        block = onload.Output.block
        with monkeypatch.context() as m:
            m.setattr(onload.Output, "block", lambda self, i, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                      if i == 2 else block(self, i, *a, **k))
            assert main([*argv, "--out", str(out)]) == 130
    (left,) = outdir.stale(out)
    did = {"pruned": _solved(monkeypatch), "teacher": [], "quantized": [], "updates": []}
    teacher, put, step = onload.teacher, onload.Codes.put, torch.optim.Adam.step
    monkeypatch.setattr(onload, "teacher", lambda *a, **k: did["teacher"].append(1) or teacher(*a, **k))
    monkeypatch.setattr(onload.Codes, "put", lambda self, i, c: did["quantized"].append(i) or put(self, i, c))
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: did["updates"].append(1) or step(self, *a, **k))
    capsys.readouterr()
    assert main([*other, "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert f"resuming {left.name}: " in said.err
    assert ("scale tuning starts over from GPTQ's scales: --tune-steps 5 --tune-lr 0.0003 where the run that stopped "
            "tuned with --tune-steps 5 --tune-lr 0.001 (the passes before it are reused)") in said.err
    assert "the scale tuning from its start (the run that stopped tuned with --tune-steps 5 --tune-lr 0.001)" in said.out
    assert (did["pruned"], did["quantized"], len(did["updates"])) == ([], [], 5)
    assert len(did["teacher"]) == (case == "write")
    ma, mb = _same_output(ref, out)
    untimed = lambda d: {k: v for k, v in d.items() if k != "seconds"}
    assert untimed(mb["format"]["quant_options"]["tune"]) == untimed(ma["format"]["quant_options"]["tune"])
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"]
    assert mb["resumed"]["tune_recipe_was"] == {"steps": 5, "lr": 1e-3} and "tune_from_step" not in mb["resumed"]


EXPORTS = {  # stopped where (GPTQ's pass at block 2, or the tuning after its step 2), what the resume says
    "gptq": ([], "blocks 0-1 of 4 were quantized (GPTQ)"),
    "tuned": (["--tune-steps", "3"], "blocks 0-3 of 4 were quantized (GPTQ), scale tuning had trained 2 of 3 steps"),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_a_stopped_gptq_export_goes_on_from_its_checkpoint(tmp_path, capsys, monkeypatch, deep_dir, calib_txt, case):
    """`export --to compressed-tensors --quant gptq` of a dense output, read from disk: GPTQ's pass commits checkpoints
    of the export's files (each block's tensors end a file), and with --tune-steps the codes and the tuning's state;
    the same command after a stop goes on from there (quantizes the blocks after the checkpoint, trains the steps
    after it) to the files and figures of an export never stopped."""
    from llmprune import lazy
    from llmprune.export.compressed_tensors import Writer

    extra, said = EXPORTS[case]
    src = tmp_path / "src"
    assert main(["compress", "--model", str(deep_dir), "--solver", "wanda", "--calib", str(calib_txt), "--nsamples",
                 "6", "--seqlen", "32", "--no-progress", "--eval", "none", "--out", str(src)]) == 0
    monkeypatch.setattr(lazy, "SHARD_BYTES", 5_000)  # a file, so a checkpoint, after every block
    argv = ["export", str(src), "--to", "compressed-tensors", "--quant", "gptq", "--calib", str(calib_txt),
            "--nsamples", "6", "--seqlen", "32", "--no-progress", "--checkpoint-every", "0", *extra]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*argv, "--out", str(ref), "--checkpoint-every", "off"]) == 0
    if case == "gptq":
        _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=2, shard_bytes=5_000, stage="gptq")
    else:
        _stop_training(monkeypatch, [*argv, "--out", str(out)], step=2)
    (left,) = outdir.stale(out)
    capsys.readouterr()
    written, updates = [], []
    linear, step = Writer.linear, torch.optim.Adam.step
    monkeypatch.setattr(Writer, "linear", lambda self, name, *a, **k: written.append(name) or linear(self, name, *a, **k))
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: updates.append(1) or step(self, *a, **k))
    assert main([*argv, "--out", str(out)]) == 0
    so, se = capsys.readouterr()
    assert f"resuming {left.name}: {said} by a run that stopped" in se and "resumed " in so
    if case == "gptq":  # the blocks after the checkpoint only
        assert written and {n.split(".")[2] for n in written} == {"2", "3"} and not updates
    else:  # every block written (after the tuning), one update
        assert {n.split(".")[2] for n in written} == set(ALL) and len(updates) == 1
    ma, mb = _same_output(ref, out)
    untimed = lambda d: {k: v for k, v in d.items() if k != "seconds"} if isinstance(d, dict) else d
    qa, qb = ma["export"].pop("quant"), mb["export"].pop("quant")
    assert {k: untimed(v) for k, v in qa.items()} == {k: untimed(v) for k, v in qb.items()}
    assert mb["export"] == ma["export"] and ma.get("resumed") is None and mb["resumed"]["runs"] == 2


SMALL = {  # GPTQ's pass into a packed output that fills no file before its end (the default shards: 2 GiB)
    "compress": ["compress", "--model", "{model}", "--solver", "sparsegpt", "--pattern", "2:4", "--format", "w4s24",
                 "--quant", "gptq", "--group-size", "32", "--calib", "{calib}", *ARGS],
    "pack": ["pack", "{src}", "--format", "w4s24", "--quant", "gptq", "--group-size", "32", "--calib", "{calib}",
             "--nsamples", "6", "--seqlen", "32", "--no-progress", "--checkpoint-every", "0"],
    "export": ["export", "{src}", "--to", "compressed-tensors", "--quant", "gptq", "--calib", "{calib}", "--nsamples",
               "6", "--seqlen", "32", "--no-progress", "--checkpoint-every", "0"],
}


@pytest.mark.parametrize("case", list(SMALL))
def test_checkpoint_every_0_commits_gptq_checkpoints_of_an_output_that_fills_no_file(tmp_path, capsys, monkeypatch,
                                                                                    deep_dir, calib_txt, case):
    """--checkpoint-every 0 is a checkpoint after every block. GPTQ's pass into a packed output committed one only
    after a block that completed a file, so a model whose output fills none before its end got none at all, and a
    stopped run started over. The tensors waiting for their file are kept in the checkpoint (each once), and the
    same command goes on from it to the same files."""
    from llmprune import lazy, packed
    from llmprune.export.compressed_tensors import Writer

    src = tmp_path / "src"
    if case != "compress":
        assert main(["compress", "--model", str(deep_dir), "--solver", "sparsegpt", "--pattern", "2:4", "--calib",
                     str(calib_txt), "--nsamples", "6", "--seqlen", "32", "--no-progress", "--eval", "none", "--out",
                     str(src)]) == 0
    argv = [a.format(src=src, model=deep_dir, calib=calib_txt) for a in SMALL[case]]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*argv, "--out", str(ref)]) == 0
    _stop(monkeypatch, [*argv, "--out", str(out)], kill_at=2, shard_bytes=lazy.SHARD_BYTES, stage="gptq")
    (left,) = outdir.stale(out)
    state = json.loads((left / resume.RESUME / resume.STATE).read_text())
    assert (state["stage"], state["next_block"]) == ("gptq", 2)
    assert not [f for f in left.glob("*.safetensors")]  # no file of the output was written: its tensors are kept
    kept = {n for _, names in state["pending"] for n in names}
    assert {n.split(".")[2] for n in kept if n.startswith("model.layers.")} == {"0", "1"}
    capsys.readouterr()
    written = []
    add, linear = packed.PackWriter.add_linear, Writer.linear
    monkeypatch.setattr(packed.PackWriter, "add_linear", lambda self, n, *a, **k: (written.append(n),
                                                                                    add(self, n, *a, **k))[1])
    monkeypatch.setattr(Writer, "linear", lambda self, n, *a, **k: (written.append(n), linear(self, n, *a, **k))[1])
    assert main([*argv, "--out", str(out)]) == 0
    assert f"resuming {left.name}: " in capsys.readouterr().err
    assert blocks_of(written) == {"2", "3"}  # blocks 0-1 were not quantized again
    assert not outdir.stale(out) and not (out / resume.RESUME).exists()
    files = sorted(f.name for f in ref.glob("*.safetensors*"))
    assert files == sorted(f.name for f in out.glob("*.safetensors*")) == ["model.safetensors"]
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    ma, mb = (json.loads((f / "llmprune.json").read_text()) for f in (ref, out))
    assert mb["resumed"]["from_block"] == 2 and ma.get("resumed") is None
