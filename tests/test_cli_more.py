"""The other subcommands end to end on a tiny model: recover, pack, eval --tasks, sweep, report."""
import json
import os

import pytest
import torch
from PIL import Image

from llmprune import checkpoint, patterns
from llmprune.cli import main
from llmprune.testing import FAST_CLI


@pytest.mark.parametrize("a,b,alike", [
    ({}, {}, True),
    ({"dtype": "float32"}, {}, True),  # a field one entry lacks: measured by the run its manifest records
    ({"dtype": "float32"}, {"dtype": "bfloat16"}, False),
    ({"windows": 3}, {}, False), ({"seqlen": 32}, {}, False),
    ({"source": "offline:wikitext2_test.raw"}, {"source": "hub:wikitext"}, False),
    ({"device": "cpu"}, {"device": "cuda:0"}, False), ({"device": "cuda:0,cuda:1"}, {"device": "cuda:1"}, True),
    ({"versions": {"transformers": "5.23.0"}}, {"versions": {"transformers": "5.25.0"}}, False),
    ({"versions": {"torch": "2.13.0", "numpy": "1"}}, {"versions": {"torch": "2.13.0", "numpy": "2"}}, True),
    ({"device": "cpu", "versions": {"cpu": "AMD EPYC"}}, {"device": "cpu", "versions": {"cpu": "Intel Xeon"}}, False),
    ({"device": "cuda", "versions": {"cpu": "AMD EPYC", "gpu": "H200"}},
     {"device": "cuda", "versions": {"cpu": "Intel Xeon", "gpu": "H200"}}, True),  # on a GPU its name counts
    ({"device": "cuda", "versions": {"gpu": "H100"}}, {"device": "cuda", "versions": {"gpu": "H200"}}, False)])
def test_measured_alike(a, b, alike):
    from llmprune.pipeline import measured_alike

    base = {"seqlen": 64, "windows": 2}
    assert measured_alike({**base, **a}, {**base, **b}) is alike and measured_alike({**base, **b}, {**base, **a}) is alike


def test_a_reference_figure_stands_only_beside_one_measured_alike(tmp_path, monkeypatch, tiny_dir, calib_txt):
    """The dense figure beside `eval`'s and the source's figure as recover's "before" come from the manifest only
    where measured alike: another text (the Hub's WikiText-2 where the first run read the offline copy) or other
    library versions drop the dense figure and make recover measure the source folder itself."""
    from llmprune.calibration import sources

    src = tmp_path / "src"
    assert main(["compress", "--model", str(tiny_dir), "--calib", str(calib_txt), "--out", str(src), *FAST_CLI[:-2],
                 "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]) == 0
    from llmprune.manifest import files_stamp

    stamp = json.loads((src / "llmprune.json").read_text())["eval"]["wikitext2"]["files"]
    assert stamp == files_stamp(src)  # compress's figure, stamped with the files of the folder as it was made
    flags = ["--seqlen", "64", "--windows", "2", "--no-progress"]
    assert main(["eval", str(src), *flags]) == 0
    m = json.loads((src / "llmprune.json").read_text())
    dense, ppl = m["eval"]["wikitext2"]["dense_ppl"], m["eval"]["wikitext2"]["ppl"]
    offline = sources.wikitext2

    def hub(split):  # what a machine reaching the Hub reads: its rows, blank ones kept
        text, _ = offline(split)
        return text.replace("\n\n", "\n\n\n\n"), f"hub:wikitext/wikitext-2-raw-v1:{split}"

    with monkeypatch.context() as mp:
        mp.setattr(sources, "wikitext2", hub)
        assert main(["eval", str(src), *flags]) == 0
    e = json.loads((src / "llmprune.json").read_text())["eval"]["wikitext2"]
    assert e["source"].startswith("hub:") and e["ppl"] != ppl and "dense_ppl" not in e
    assert main(["eval", str(src), *flags]) == 0  # the offline text again: the dense figure is gone for good
    assert "dense_ppl" not in json.loads((src / "llmprune.json").read_text())["eval"]["wikitext2"]

    def recover(name, transformers):  # the source's recorded figure made 1.0: reused only if measured alike
        m = json.loads((src / "llmprune.json").read_text())
        m["eval"]["wikitext2"] = {**m["eval"]["wikitext2"], "ppl": 1.0, "dense_ppl": dense}
        m["eval"]["wikitext2"]["versions"] = {**m["eval"]["wikitext2"]["versions"], "transformers": transformers}
        (src / "llmprune.json").write_text(json.dumps(m))
        out = tmp_path / name
        assert main(["recover", str(src), "--out", str(out), "--steps", "1", "--batch", "2", "--data", str(calib_txt),
                     "--seqlen", "32", "--rank", "4", "--eval", "wikitext2", "--eval-seqlen", "64",
                     "--eval-windows", "2", "--no-progress"]) == 0
        return json.loads((out / "llmprune.json").read_text())["eval"]["wikitext2"]

    import transformers
    same = recover("same", transformers.__version__)
    assert same["before_recover_ppl"] == 1.0 and same["dense_ppl"] == dense
    other = recover("other", "0.0.1")
    assert other["before_recover_ppl"] == pytest.approx(ppl, rel=1e-9) and "dense_ppl" not in other
    # the weights edited after the figure was measured (here by hand): measured again, on the edited bytes
    from safetensors.torch import load_file, save_file

    weights = load_file(src / "model.safetensors")
    name = next(n for n in weights if n.endswith("layers.0.mlp.down_proj.weight"))
    weights[name] = weights[name] * 0.5
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    edited = recover("edited", transformers.__version__)["before_recover_ppl"]
    model, tok, _ = checkpoint.load(src)
    from llmprune.eval.perplexity import perplexity

    assert edited == pytest.approx(perplexity(model, tok, "wikitext2", 64, 2, progress=False)["ppl"], rel=1e-9)
    assert edited != pytest.approx(ppl, rel=1e-6)


def test_recover_keeps_zeros_and_records(tmp_path, capsys, pruned_24, calib_txt):
    out = tmp_path / "rec"
    rc = main(["recover", str(pruned_24), "--out", str(out), "--steps", "3", "--batch", "2", "--data", str(calib_txt),
               "--seqlen", "32", "--rank", "4", "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "llmprune.json").read_text())
    assert m["recover"]["zeros_unchanged"] is True and m["recover"]["steps"] == 3
    assert 0 < m["recover"]["fraction"] < 1
    assert "before_recover_ppl" in m["eval"]["wikitext2"]
    a, _, _ = checkpoint.load(pruned_24)
    b, _, _ = checkpoint.load(out)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        if x.dim() == 2 and "layers" in n:
            assert torch.equal(x == 0, y == 0), n
            assert patterns.satisfies(y != 0, patterns.parse("2:4"), 0.5)



def test_recover_streams_the_blocks_beyond_the_budget(tmp_path, capsys, pruned_24, calib_txt):
    """--resident-gib below one block: every block streams from CPU memory, the manifest says so and what
    it copied, and the folder is the one training every block in place writes, bit for bit."""
    outs = {}
    for extra in ([], ["--resident-gib", "0.0001"]):
        out = outs[bool(extra)] = tmp_path / f"rec{len(extra)}"
        rc = main(["recover", str(pruned_24), "--out", str(out), "--steps", "2", "--batch", "2", "--data",
                   str(calib_txt), "--seqlen", "32", "--rank", "4", "--device", "cpu", "--no-progress", *extra])
        assert rc == 0, capsys.readouterr().err
    assert "2 of 2 blocks streamed from CPU memory" in capsys.readouterr().out
    p = json.loads((outs[True] / "llmprune.json").read_text())["recover"]["placement"]
    assert (p["streamed_blocks"], p["resident_blocks"], p["resident_gib"]) == (2, {"cpu": 0}, 0.0001)
    assert p["streamed_gb"] > 0
    a, _, _ = checkpoint.load(outs[False])
    b, _, _ = checkpoint.load(outs[True])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("extra", [[], ["--resident-gib", "0.0001"], ["--device", "cpu,cpu:0", "--resident-gib", "0.0004"]])
def test_recover_reads_each_block_straight_to_where_it_trains(tmp_path, capsys, monkeypatch, pruned_24, calib_txt,
                                                              extra):
    """--onload blocks (auto's choice on a GPU): the source is never loaded whole, each block is read from disk onto
    the device of the plan made before anything was read, which is the plan training then makes (nothing
    moves), and the folder written block by block equals the one a whole load writes, bit for bit,
    config and manifest figures included. Resident, every block streamed, and split over two devices."""
    from llmprune import lazy, onload, placement
    from llmprune.lazy import WeightFiles

    base = ["recover", str(pruned_24), "--steps", "2", "--batch", "2", "--data", str(calib_txt), "--seqlen", "32",
            "--rank", "4", "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2", "--no-progress", *extra]
    # auto loads whole when every device is the CPU (transformers' load, backed by the files)
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0, capsys.readouterr().err

    plans, loads, placing = [], [], []
    real_plan, real_load, real_placed, real_ckpt = placement.plan_model, lazy.LazyModel.load, onload.load_placed, \
        checkpoint.load

    def plan(*a, **k):  # what was planned, and (once a plan is given) what a planner would make afresh
        fresh = real_plan(*a, **{**k, "where": None})[1] if k.get("where") is not None else None
        res = real_plan(*a, **k)
        plans.append((k.get("where"), res[1], fresh))
        return res
    monkeypatch.setattr(placement, "plan_model", plan)
    monkeypatch.setattr(onload, "load_placed", lambda *a: placing.append(1) or real_placed(*a) or placing.clear())
    monkeypatch.setattr(lazy.LazyModel, "load", lambda self, prefix="", device="cpu", exclude=():
                        (loads.append((prefix, str(device))) if placing else None) or
                        real_load(self, prefix, device, exclude))

    def whole(folder, *a, **k):  # the evaluations load the saved folders block by block too
        raise AssertionError(f"{folder} loaded whole")
    monkeypatch.setattr(checkpoint, "load", whole)
    assert main([*base, "--out", str(tmp_path / "blocks"), "--onload", "blocks"]) == 0, capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "load", real_ckpt)

    # the plan made on the meta device before anything was read is the one training keeps, and it is the one a
    # planner given the loaded model makes afresh (the adapters estimated from the pruning's targets are exact)
    (given, before, _), (kept, during, fresh) = plans[0], plans[-1]
    assert given is None and kept == before == during == fresh
    devices = (extra[extra.index("--device") + 1] if "--device" in extra else "cpu").split(",")
    assert loads[0] == ("", devices[0]) and dict(loads[1:]) == {
        f"model.layers.{i}.": "cpu" if streams else devices[d] for i, (d, streams) in enumerate(during)}
    if "cpu:0" in devices:
        assert {d for d, _ in during} == {0, 1}, "the two devices should each train a block"
    ma, mb = (json.loads((tmp_path / f / "llmprune.json").read_text()) for f in ("whole", "blocks"))
    assert (ma["recover"]["onload"], mb["recover"]["onload"]) == ("whole", "blocks")
    timeless = lambda m: {d: {k: v for k, v in e.items() if k not in ("seconds", "files")} for d, e in m["eval"].items()}
    assert ma["recover"]["losses"] == mb["recover"]["losses"] and timeless(ma) == timeless(mb)
    assert ma["sparsity"] == mb["sparsity"] and mb["recover"]["zeros_unchanged"] is True
    wa, wb = (WeightFiles(tmp_path / f) for f in ("whole", "blocks"))
    names = sorted(wa.keys())
    assert names == sorted(wb.keys()) and all(torch.equal(wa.get(k), wb.get(k)) for k in names)
    ca, cb = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("whole", "blocks"))
    assert {k: v for k, v in ca.items() if k != "transformers_version"} == \
        {k: v for k, v in cb.items() if k != "transformers_version"}


def test_recover_onload_blocks_refuses_what_only_loads_whole(tmp_path, capsys, monkeypatch, tiny_dir, calib_txt):
    """A folder that only loads whole (a tensor stored under a name only transformers' whole load converts, here
    said so by a stand-in): --onload blocks says so in one line and writes nothing; auto recovers it loaded whole
    and records that. A SliceGPT output with per-block shortcuts is read block by block (it only loaded whole
    until 2026-12-06)."""
    from llmprune import onload

    src = tmp_path / "sliced"
    assert main(["compress", "--model", str(tiny_dir), "--solver", "slicegpt", "--calib", str(calib_txt),
                 "--out", str(src), *FAST_CLI]) == 0
    base = ["recover", str(src), "--steps", "1", "--batch", "1", "--data", str(calib_txt), "--seqlen", "32",
            "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "c"), "--onload", "blocks"]) == 0
    assert json.loads((tmp_path / "c" / "llmprune.json").read_text())["recover"]["onload"] == "blocks"
    capsys.readouterr()
    why = "the checkpoint stores model.norm.weight (and 0 more) under other names that transformers converts"
    monkeypatch.setattr(onload, "stored_as_in_memory", lambda lz: why)
    assert main([*base, "--out", str(tmp_path / "b"), "--onload", "blocks"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "--onload whole" in err
    assert not (tmp_path / "b").exists()
    assert main([*base, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "llmprune.json").read_text())["recover"]["onload"] == "whole"


def test_recover_before_figure_is_the_sources_or_measured(tmp_path, capsys, tiny_dir, calib_txt):
    """The ppl before recovery is the source manifest's when measured the same way (same weights),
    and measured afresh otherwise; both equal a direct evaluation of the source."""
    from llmprune.eval.perplexity import perplexity

    src = tmp_path / "src"
    ev = ["--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
    assert main(["compress", "--model", str(tiny_dir), "--sparsity", "0.5", "--calib", str(calib_txt), "--out", str(src),
                 *FAST_CLI[:-2], *ev]) == 0
    model, tok, _ = checkpoint.load(src)
    for windows in ("2", "3"):
        out = tmp_path / f"rec{windows}"
        rc = main(["recover", str(src), "--out", str(out), "--steps", "1", "--batch", "1", "--data", str(calib_txt),
                   "--seqlen", "32", "--rank", "2", *ev[:-1], windows, "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        before = json.loads((out / "llmprune.json").read_text())["eval"]["wikitext2"]["before_recover_ppl"]
        direct = perplexity(model, tok, "wikitext2", 64, int(windows), progress=False)["ppl"]
        assert before == pytest.approx(direct, rel=1e-9)

def test_recover_in_bf16_keeps_the_weights_in_bf16(tmp_path, capsys, tiny_dir, calib_txt):
    """--dtype bfloat16: trained with the frozen weights in bf16 under autocast; the before figure is
    measured in bf16 (not the source's fp32 one), both figures equal direct bf16 evaluations."""
    from llmprune.eval.perplexity import perplexity

    src, out = tmp_path / "src", tmp_path / "rec"
    ev = ["--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
    assert main(["compress", "--model", str(tiny_dir), "--pattern", "2:4", "--calib", str(calib_txt), "--out", str(src),
                 *FAST_CLI[:-2], *ev]) == 0
    rc = main(["recover", str(src), "--out", str(out), "--steps", "2", "--batch", "2", "--data", str(calib_txt),
               "--seqlen", "32", "--rank", "2", "--dtype", "bfloat16", *ev, "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "llmprune.json").read_text())
    r = m["recover"]
    assert (r["dtype"], r["frozen_dtype"], r["autocast"], r["zeros_unchanged"]) == ("bfloat16", "bfloat16", "bf16", True)
    for folder, key in ((src, "before_recover_ppl"), (out, "ppl")):
        model, tok, _ = checkpoint.load(folder, dtype="bfloat16")
        direct = perplexity(model, tok, "wikitext2", 64, 2, progress=False)["ppl"]
        assert m["eval"]["wikitext2"][key] == pytest.approx(direct, rel=1e-9), key


def test_recover_bad_inputs(tmp_path, capsys, pruned_24):
    (tmp_path / "plain").mkdir()
    for argv, msg in [([str(tmp_path / "plain")], "not an llmprune output"),
                      ([str(pruned_24), "--lr", "0"], "--lr"),
                      ([str(pruned_24), "--steps", "0"], "--steps"),
                      ([str(pruned_24), "--dtype", "float8"], "--dtype"),
                      ([str(pruned_24), "--resident-gib", "0"], "--resident-gib 0.0 must be > 0"),
                      ([str(pruned_24), "--resident-gib", "0.00001"], "embedding, head and final norm"),
                      ([str(pruned_24), "--resident-gib", "0.0001", "--no-grad-checkpointing"],
                       "needs activation checkpointing")]:
        rc = main(["recover", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and not (tmp_path / "o").exists(), err


def test_recover_refuses_a_disk_too_small_before_training(tmp_path, capsys, monkeypatch, pruned_24, calib_txt):
    """The new folder (in the training dtype) and two of the training's checkpoints must fit the output's disk:
    refused in one line before any training, nothing written; `pack --tune-steps` the same."""
    import shutil

    from llmprune import pipeline

    real, trained = shutil.disk_usage, []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    monkeypatch.setattr(pipeline, "recover", lambda *a, **k: trained.append(1))
    rc = main(["recover", str(pruned_24), "--out", str(tmp_path / "o"), "--steps", "3", "--data", str(calib_txt),
               "--seqlen", "32", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("llmprune: error: o needs "), err
    assert "(the output " in err[0] and " + PERP's training checkpoints " in err[0] and "choose another --out" in err[0]
    assert not trained and [p.name for p in tmp_path.iterdir()] == []
    # `pack` with scale tuning, the same way: GPTQ's codes in its scratch folder, the teacher's states and the tuning's
    # checkpoints (each part's size: tests/test_resume.py's scale tuning test)
    rc = main(["pack", str(pruned_24), "--out", str(tmp_path / "q"), "--format", "w4s24", "--quant", "gptq",
               "--tune-steps", "2", "--calib", str(calib_txt), "--seqlen", "32", "--nsamples", "4", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("llmprune: error: q needs "), err
    assert all(f"{part} " in err[0] for part in ("(GPTQ's codes and tuned scales", "the teacher's hidden states",
                                                 "scale tuning's checkpoints")), err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_onload_blocks_is_refused_with_one_replica_per_process(tmp_path, capsys, monkeypatch, pruned_24, tiny_dir,
                                                               calib_txt):
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) every process trains its own replica: reading one model
    onto the devices of each process would load it once per process, so --onload blocks is refused in one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["recover", str(pruned_24), "--onload", "blocks"],
                 ["compress", "--model", str(tiny_dir), "--recover", "perp", "--onload", "blocks", "--calib",
                  str(calib_txt)]):
        rc = main([*argv, "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "WORLD_SIZE" in err and "--onload whole" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def test_ddp_replicas_train_together_and_the_first_alone_writes(tmp_path, pruned_24, tiny_dir, calib_txt):
    """`torchrun --nproc_per_node 2 -m llmprune.cli recover ...` (and `compress --recover perp`): two processes train a
    replica each (DDP over gloo on the CPU, their gradients averaged), and only process 0 writes and measures the
    output: one folder, written once, its manifest saying two processes trained it; the other process says so and
    writes nothing (before, both wrote the same folder and raced to rename it)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *argv: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                        "--standalone", "-m", "llmprune.cli", *map(str, argv), "--no-progress"],
                                       check=False, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    ev = ["--eval-seqlen", "32", "--eval-windows", "2"]  # measured by process 0 alone, before and after
    for name, argv in (("rec", ["recover", pruned_24, "--steps", "3", "--data", calib_txt, "--seqlen", "32",
                                "--batch", "2", "--eval", "wikitext2", *ev]),
                       ("comp", ["compress", "--model", tiny_dir, "--calib", calib_txt, "--nsamples", "4", "--seqlen",
                                 "32", "--eval", "wikitext2", *ev, "--recover", "perp", "--recover-steps", "3"])):
        r = run(*argv, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count(f"saved {tmp_path / name}") == 1, r.stdout
        assert r.stdout.count(f"replica 1: trained; process 0 writes {tmp_path / name}") == 1, r.stdout
        assert sorted(q.name for q in tmp_path.iterdir() if name in q.name) == [name]  # no temporary sibling left
        m = json.loads((tmp_path / name / "llmprune.json").read_text())
        assert m["recover"]["processes"] == 2 and len(m["recover"]["losses"]) == 3, m["recover"]
        e = m["eval"]["wikitext2"]
        assert e["ppl"] > 1 and (e["before_recover_ppl"] if name == "rec" else e["dense_ppl"]) > 1, e
        if name == "rec":  # 3 steps of 2 windows on each of 2 processes: each window seen once
            assert m["recover"]["data"]["nsamples"] == 3 * 2 * 2
            assert m["recover"]["zeros_unchanged"] and m["recover"]["onload"] == "whole"
        else:  # (PERP with a replica per process loads the model whole in each)
            assert m["onload"].startswith("whole") and m["sparsity"]["measured_after_recover"] == 0.5
    a, b = load_file(pruned_24 / "model.safetensors"), load_file(tmp_path / "rec" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if "norm" in k)  # trained


DYING = """
import os, signal, sys
from llmprune import resume
from llmprune.cli import main
save = resume.Training.save
def dying_save(self, state):
    save(self, state)
    if state["step"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
resume.Training.save = dying_save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["recover", "compress"])
def test_ddp_training_killed_goes_on_from_the_first_replicas_checkpoint(tmp_path, pruned_24, tiny_dir, calib_txt,
                                                                        command):
    """Under torchrun the first process commits PERP's checkpoints (with every replica's random state): killed by
    SIGKILL after step 2 of 4 (torchrun stops the other), the next torchrun run hands that checkpoint to both
    replicas and trains steps 3 and 4 alone, to the tensors and losses of a run never stopped (`recover`: of a
    model with attention dropout, whose masks the random state decides)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from llmprune import outdir, resume

    (tmp_path / "dying.py").write_text(DYING)
    src = tmp_path / "src"
    shutil.copytree(pruned_24, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.3}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda script, *argv: subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *script,
         *map(str, argv), "--no-progress"], check=False, capture_output=True, text=True, timeout=600, env=env,
        cwd=tmp_path)
    if command == "recover":
        argv = ["recover", src, "--steps", "4", "--data", calib_txt, "--seqlen", "32", "--batch", "1"]
    else:
        argv = ["compress", "--model", tiny_dir, "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32", "--eval",
                "none", "--recover", "perp", "--recover-steps", "4"]
    cli = ["-m", "llmprune.cli"]
    r = run(cli, *argv, "--checkpoint-every", "off", "--out", tmp_path / "ref")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([str(tmp_path / "dying.py")], *argv, "--checkpoint-every", "0", "--out", tmp_path / "out")
    assert r.returncode != 0 and f"exitcode  : {-signal.SIGKILL}" in r.stderr, r.stderr[-3000:]
    (left,) = outdir.stale(tmp_path / "out")
    state = json.loads((left / resume.RESUME / resume.STATE).read_text())
    assert state["keep"]["train"]["step"] == 2
    saved = torch.load(left / resume.RESUME / state["keep"]["train"]["file"], weights_only=True)
    assert isinstance(saved["rng"], list) and len(saved["rng"]) == 2  # every replica's
    r = run(cli, *argv, "--checkpoint-every", "0", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("PERP's training from step 2, from the checkpoint of") == 1, r.stdout
    assert not outdir.stale(tmp_path / "out")
    a, b = (load_file(tmp_path / f / "model.safetensors") for f in ("ref", "out"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / f / "llmprune.json").read_text()) for f in ("ref", "out"))
    assert mb["recover"]["losses"] == ma["recover"]["losses"] and len(ma["recover"]["losses"]) == 4
    assert mb["resumed"]["perp_from_step"] == 2 and mb["recover"]["processes"] == 2


def test_under_torchrun_only_perps_training_runs(tmp_path, capsys, monkeypatch, pruned_24, tiny_dir):
    """Every other command under WORLD_SIZE > 1 would run once per process, each writing the same output: refused in
    one line before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "o")],
                 ["pack", str(pruned_24), "--format", "sparse24", "--out", str(tmp_path / "o")],
                 ["eval", str(pruned_24)], ["bench", str(pruned_24)]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"2 processes (WORLD_SIZE: torchrun or accelerate launch) run `llmprune {argv[0]}` once each" in err
    import llmprune
    from llmprune.errors import LLMPruneError

    with pytest.raises(LLMPruneError, match="only PERP's training"):  # the Python API's callers too
        llmprune.compress(model=str(tiny_dir), out=str(tmp_path / "o"))
    assert not any(tmp_path.iterdir())


def test_recover_onload_blocks_refuses_a_plan_before_reading_a_weight(tmp_path, capsys, monkeypatch, pruned_24):
    from llmprune import lazy

    monkeypatch.setattr(lazy.WeightFiles, "get", lambda *a, **k: pytest.fail("a weight was read"))
    for extra, msg in [(["--resident-gib", "0.00001"], "embedding, head and final norm"),
                       (["--resident-gib", "0.0001", "--no-grad-checkpointing"], "needs activation checkpointing"),
                       (["--rank", "100000"], "exceeds min(out, in) of every adapted linear")]:
        rc = main(["recover", str(pruned_24), "--onload", "blocks", *extra, "--out", str(tmp_path / "o"),
                   "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists(), err


def test_pack_sparse24_roundtrip(tmp_path, capsys, pruned_24):
    out = tmp_path / "packed"
    assert main(["pack", str(pruned_24), "--format", "sparse24", "--out", str(out), "--save-dtype", "float32",
                 "--no-progress"]) == 0
    m = json.loads((out / "llmprune.json").read_text())
    assert m["format"]["name"] == "sparse24" and m["solver"] == "wanda"
    dense, _, _ = checkpoint.load(pruned_24)
    small, _, _ = checkpoint.load(out)
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(dense(ids).logits, small(ids).logits)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert size(out) < size(pruned_24)


def test_compress_with_format_and_gptq(tmp_path, capsys, tiny_dir, calib_txt):
    out = tmp_path / "w4"
    rc = main(["compress", "--model", str(tiny_dir), "--pattern", "2:4", "--calib", str(calib_txt), "--out", str(out),
               "--format", "w4s24", "--quant", "gptq", "--group-size", "32", *FAST_CLI])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "llmprune.json").read_text())
    assert m["format"]["name"] == "w4s24" and m["format"]["quant"] == "gptq"
    assert m["format"]["quant_options"] == {"act_order": True, "sink_weight": 16.0, "tune_steps": 0,
                                              "tune_lr": 1e-3}  # the defaults, recorded
    model, _, _ = checkpoint.load(out)
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()



def test_pack_gptq_options_reach_the_manifest(tmp_path, capsys, pruned_24, calib_txt):
    out = tmp_path / "g"
    rc = main(["pack", str(pruned_24), "--format", "w4s24", "--quant", "gptq", "--group-size", "32", "--no-act-order",
               "--sink-weight", "1", "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "16", "--out", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "llmprune.json").read_text())
    o = m["format"]["quant_options"]
    assert {k: o[k] for k in ("act_order", "sink_weight", "tune_steps", "tune_lr")} == \
        {"act_order": False, "sink_weight": 1.0, "tune_steps": 0, "tune_lr": 1e-3}
    assert {k: o["calibration"][k] for k in ("nsamples", "seqlen", "seed")} == {"nsamples": 4, "seqlen": 16, "seed": 0}


def test_pack_grid_asym_w4s24_matches_the_rtn_reference(tmp_path, capsys, pruned_24):
    """--grid asym stores a zero point per group; the packed model computes with exactly the
    asymmetric RTN weights (quant.rtn), and the zeros of the 2:4 mask stay."""
    from llmprune.quant.rtn import rtn

    out = tmp_path / "asym"
    assert main(["pack", str(pruned_24), "--format", "w4s24", "--grid", "asym", "--group-size", "16", "--save-dtype", "float32",
                 "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "llmprune.json").read_text())
    layer = next(iter(m["format"]["layers"].values()))
    assert layer["symmetric"] is False and layer["group_size"] == 16
    dense, _, _ = checkpoint.load(pruned_24)
    ref, _, _ = checkpoint.load(pruned_24)
    for name in m["format"]["layers"]:
        lin = ref.get_submodule(name)
        w = lin.weight.detach()
        lin.weight.data = rtn(w, w != 0, 16, symmetric=False).dequantize()
    small, _, _ = checkpoint.load(out)
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(small(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(small(ids).logits, dense(ids).logits, atol=1e-4)  # it did quantize
    capsys.readouterr()
    # the grid is for int4 formats; w4s50 has no asymmetric layout
    assert main(["pack", str(pruned_24), "--format", "sparse24", "--grid", "asym", "--out", str(tmp_path / "x")]) == 2
    assert "drop --grid" in capsys.readouterr().err
    assert main(["pack", str(pruned_24), "--format", "w4s50", "--grid", "asym", "--out", str(tmp_path / "y")]) == 2
    assert "--grid sym" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

def test_eval_tasks_and_report(tmp_path, capsys, pruned_24, monkeypatch):
    """`eval --tasks` of an output scores it block by block from its folder (the whole model is never
    loaded) and records what lm-eval gives the whole model."""
    from llmprune.eval.zeroshot import zeroshot
    from llmprune.testing import hold_one_block

    with monkeypatch.context() as m:
        most = hold_one_block(m)
        rc = main(["eval", str(pruned_24), "--tasks", "copa,rte", "--limit", "3", "--json", str(tmp_path / "zs.json"),
                   "--no-progress"])
    so = capsys.readouterr().out
    assert rc == 0 and "copa" in so and "mean" in so and most[0] == 1
    zs = json.loads((tmp_path / "zs.json").read_text())
    assert zs["copa"]["n"] == 3 and 0 <= zs["mean"] <= 1
    model, tok, _ = checkpoint.load(pruned_24)
    assert zs["blockwise"] and zeroshot(model, tok, "copa,rte", limit=3) == {
        k: v for k, v in zs.items() if k not in ("limit", "blockwise", "dtype", "device", "versions", "command", "files")}
    assert zs["command"].startswith("llmprune eval ") and zs["versions"]["lm_eval"]  # how it was measured
    saved = json.loads((pruned_24 / "llmprune.json").read_text())["zeroshot"]
    assert saved["rte"]["n"] == 3 and (saved["limit"], saved["dtype"]) == (3, "float32")
    # another task measured the same way joins them, the mean is over all three; another --limit replaces them
    assert main(["eval", str(pruned_24), "--tasks", "piqa", "--limit", "3", "--no-progress"]) == 0
    saved = json.loads((pruned_24 / "llmprune.json").read_text())["zeroshot"]
    accs = [saved[t]["acc"] for t in ("copa", "rte", "piqa")]
    assert saved["mean"] == pytest.approx(sum(accs) / 3) and saved["limit"] == 3
    assert main(["eval", str(pruned_24), "--tasks", "piqa", "--limit", "2", "--no-progress"]) == 0
    saved = json.loads((pruned_24 / "llmprune.json").read_text())["zeroshot"]
    assert "copa" not in saved and "rte" not in saved and saved["limit"] == 2
    assert saved["mean"] == saved["piqa"]["acc"] and saved["piqa"]["n"] == 2
    for argv, msg in [(["--tasks", "nope"], "unknown"), (["--tasks", "copa", "--limit", "0"], "limit")]:
        assert main(["eval", str(pruned_24), *argv, "--no-progress"]) == 2
        assert msg in capsys.readouterr().err
    assert main(["report", str(pruned_24)]) == 0
    assert "| " in capsys.readouterr().out


def test_compress_tasks_score_the_saved_output(tmp_path, capsys, tiny_dir, calib_txt):
    """`compress --tasks` records the zero-shot accuracy of the folder it wrote (packed here), scored block
    by block, equal to lm-eval on that folder loaded whole; a bad task or limit stops before any work."""
    from llmprune.eval.zeroshot import zeroshot

    out = tmp_path / "o"
    rc = main(["compress", "--model", str(tiny_dir), "--pattern", "2:4", "--format", "w4s24", "--quant", "rtn",
               "--group-size", "32", "--calib", str(calib_txt), "--out", str(out), "--tasks", "copa,rte",
               "--tasks-limit", "3", *FAST_CLI])
    so = capsys.readouterr().out
    assert rc == 0 and "copa" in so and "mean" in so
    m = json.loads((out / "llmprune.json").read_text())
    zs = m["zeroshot"]
    assert zs["blockwise"] and zs["limit"] == 3 and zs["copa"]["n"] == 3 and m["timings"]["zeroshot_s"] > 0
    model, tok, _ = checkpoint.load(out)
    assert zeroshot(model, tok, "copa,rte", limit=3) == {k: v for k, v in zs.items()
                                                         if k not in ("limit", "blockwise", "dtype", "files")}
    capsys.readouterr()
    for argv, msg in [(["--tasks", "copa,nope"], "unknown zero-shot task nope"),
                      (["--tasks", "copa", "--tasks-limit", "0"], "--tasks-limit 0 must be >= 1")]:
        assert main(["compress", "--model", str(tiny_dir), "--calib", str(calib_txt), "--out", str(tmp_path / "x"),
                     *argv, *FAST_CLI]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("cmd", ["pack", "recover"])
def test_pack_and_recover_tasks_score_the_folder_they_write(cmd, tmp_path, capsys, pruned_24):
    """`pack --tasks` / `recover --tasks` record the zero-shot accuracy of the new folder as saved (the
    source's is not carried over); a limit without tasks stops before any work."""
    from llmprune.eval.zeroshot import zeroshot

    out = tmp_path / cmd
    extra = (["--format", "sparse24"] if cmd == "pack" else
             ["--steps", "2", "--seqlen", "32", "--nsamples", "2", "--data", "wikitext2"])
    assert main([cmd, str(pruned_24), *extra, "--out", str(out), "--tasks", "copa", "--tasks-limit", "4",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert "copa" in capsys.readouterr().out
    zs = json.loads((out / "llmprune.json").read_text())["zeroshot"]
    assert zs["blockwise"] and zs["copa"]["n"] == 4
    model, tok, _ = checkpoint.load(out)
    assert zeroshot(model, tok, "copa", limit=4) == {k: v for k, v in zs.items()
                                                     if k not in ("limit", "blockwise", "dtype", "files")}
    capsys.readouterr()
    assert main([cmd, str(pruned_24), *extra, "--out", str(tmp_path / "x"), "--tasks-limit", "4"]) == 2
    assert "--tasks-limit limits the zero-shot tasks: add --tasks" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sweep_writes_csv_json_png(tmp_path, capsys, tiny_dir, calib_txt):
    out = tmp_path / "sw"
    rc = main(["sweep", "--model", str(tiny_dir), "--solvers", "magnitude,wanda", "--sparsity", "0.3:0.5:0.2",
               "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "64",
               "--eval-windows", "2", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    lines = (out / "sweep.csv").read_text().splitlines()
    assert len(lines) == 1 + 1 + 4  # header, dense, 2 solvers x 2 sparsities
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["solver"] for r in rows] == ["dense", "magnitude", "magnitude", "wanda", "wanda"]
    assert all(abs(r["sparsity"] - r["target"]) < 0.01 for r in rows)
    assert {r["protocol_wikitext2"] for r in rows} == {"64 x 2, float32"}  # how each figure was measured
    assert all(r["peak_rss_mib"] > 50 for r in rows[1:])  # each point's own peak (Linux), or the process's
    with Image.open(out / "sweep.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    # the last point (after three restores of the dense weights) is what compress makes from the model
    rc = main(["compress", "--model", str(tiny_dir), "--solver", "wanda", "--sparsity", "0.5", "--calib", str(calib_txt),
               "--nsamples", "4", "--seqlen", "32", "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2",
               "--no-dense-eval", "--out", str(tmp_path / "c"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    ref = json.loads((tmp_path / "c" / "llmprune.json").read_text())["eval"]["wikitext2"]["ppl"]
    assert rows[-1]["ppl_wikitext2"] == pytest.approx(ref, rel=1e-5)



def test_sweep_from_disk_gives_the_in_memory_figures(tmp_path, capsys, tiny_dir, calib_txt, monkeypatch):
    """`sweep --onload blocks` (auto's choice) never loads the model whole nor holds more than one block,
    and its rows (perplexity, measured sparsity, zero-shot) are those of the model in memory; each point
    starts from the dense model (SparseGPT's, then Wanda+OWL's after it) and the scratch folder is gone. With
    `--hessian-gib 0` (blocks; each Hessian a run of its own) the same figures."""
    from llmprune import walker
    from llmprune.testing import hold_one_block

    argv = ["sweep", "--model", str(tiny_dir), "--solvers", "sparsegpt,wanda+owl", "--sparsity", "0.4,0.6",
            "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "64", "--eval-windows",
            "2", "--tasks", "copa", "--limit", "3", "--no-progress"]
    rows = {}
    real = walker.stats_budget
    for how in ("blocks", "whole"):
        out = tmp_path / how
        budgets: list[int] = []
        with monkeypatch.context() as m:
            most = hold_one_block(m) if how == "blocks" else [1]
            m.setattr(walker, "stats_budget", lambda devices, seen=budgets: seen.append(real(devices)) or seen[-1])
            rc = main([*argv, "--onload", how, "--out", str(out), *(["--hessian-gib", "0"] if how == "blocks" else [])])
        assert rc == 0 and most[0] == 1, capsys.readouterr().err
        assert budgets and (set(budgets) == {0} if how == "blocks" else min(budgets) > 2**20), budgets
        rows[how] = [{k: v for k, v in r.items() if k not in ("compress_s", "peak_rss_mib")}
                     for r in json.loads((out / "sweep.json").read_text())]
        assert json.loads((out / "sweep_meta.json").read_text())["onload"].startswith(how)
        assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png", "sweep_meta.json"]
    assert [r["solver"] for r in rows["blocks"]] == ["dense", *["sparsegpt"] * 2, *["wanda+owl"] * 2]
    assert len({r["ppl_wikitext2"] for r in rows["blocks"]}) == 5 and rows["blocks"][1]["zeroshot_mean"] is not None
    for b, w in zip(rows["blocks"], rows["whole"]):
        num = [k for k, v in w.items() if isinstance(v, float)]
        assert {k: b[k] for k in num} == pytest.approx({k: w[k] for k in num}, rel=1e-5), (b, w)
        assert {k: v for k, v in b.items() if k not in num} == {k: v for k, v in w.items() if k not in num}


def test_sweep_refuses_an_existing_out_and_an_empty_grid(tmp_path, capsys, tiny_dir, calib_txt, monkeypatch):
    """A second sweep into the same --out overwrote the first's files (and mixed them when stopped): refused unless
    --overwrite, which replaces only an earlier sweep; a grid without a point failed after the dense evaluation."""
    from llmprune import sweep

    out = tmp_path / "sw"
    argv = ["sweep", "--model", str(tiny_dir), "--solvers", "magnitude", "--calib", str(calib_txt), "--nsamples",
            "4", "--seqlen", "32", "--eval-seqlen", "64", "--eval-windows", "1", "--out", str(out), "--no-progress"]
    assert main([*argv, "--sparsity", "0.5"]) == 0
    first = (out / "sweep.csv").read_text()
    assert main([*argv, "--sparsity", "0.3"]) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "sweep.csv").read_text() == first
    # --overwrite with a command refused by a check that needs the model: the earlier sweep's files stay
    assert main([*argv, "--sparsity", "0.3", "--overwrite", "--seqlen", "100000"]) == 2
    assert "longer than the model's context" in capsys.readouterr().err and (out / "sweep.csv").read_text() == first
    assert main([*argv, "--sparsity", "0.3", "--overwrite"]) == 0
    assert json.loads((out / "sweep.json").read_text())[1]["target"] == 0.3
    (tmp_path / "early" / ".scratch").mkdir(parents=True)  # a sweep stopped before its first point
    assert main([*argv[:-3], "--out", str(tmp_path / "early"), "--no-progress", "--sparsity", "0.5"]) == 2
    assert main([*argv[:-3], "--out", str(tmp_path / "early"), "--no-progress", "--sparsity", "0.5", "--overwrite"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main([*argv[:-3], "--out", str(tmp_path / "mine"), "--no-progress", "--sparsity", "0.5", "--overwrite"]) == 2
    assert "holds no sweep.csv" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").exists()
    monkeypatch.setattr(sweep, "_open", lambda *a, **k: pytest.fail("loaded the model"))
    for bad in ("0.8:0.3:0.1", "0.3:0.8:0", ","):
        assert main([*argv[:-3], "--out", str(tmp_path / "new"), "--sparsity", bad]) == 2
        assert "--sparsity" in capsys.readouterr().err and not (tmp_path / "new").exists()
    bad = [*argv[:-3], "--out", str(tmp_path / "new"), "--sparsity", "0.5"]
    bad[bad.index("magnitude")] = "sparsegpt+damp=x"
    assert main(bad) == 2  # (was a traceback after the dense evaluation, leaving an empty --out)
    assert "damp='x' of sparsegpt must be a number" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_sweep_of_an_nm_pattern_needs_no_sparsity(tmp_path, capsys, tiny_dir, calib_txt):
    """`--pattern 2:4` implies 50%: the default range is not applied to it."""
    out = tmp_path / "sw24"
    rc = main(["sweep", "--model", str(tiny_dir), "--solvers", "magnitude", "--pattern", "2:4", "--calib", str(calib_txt),
               "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "64", "--eval-windows", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["solver"], r["target"]) for r in rows] == [("dense", 0.0), ("magnitude", 0.5)]

def test_push_cli_refuses_a_plain_folder_offline(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["push", str(tmp_path / "plain"), "--repo", "user/name"]) == 2
    err = capsys.readouterr().err
    assert "not an llmprune output" in err and len(err.strip().splitlines()) == 1


def test_bench_cli_on_a_tiny_output(tmp_path, capsys, pruned_24):
    js = tmp_path / "b.json"
    assert main(["bench", str(pruned_24), "--batch", "1", "--prompt-len", "4", "--new-tokens", "3",
                 "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["decode"]["rows"]
    assert rows and rows[0]["tokens_per_s"] > 0


def test_bench_help_and_errors_go_through_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "-h"])
    assert e.value.code == 0 and "--new-tokens" in capsys.readouterr().out
    assert main(["bench", "/nonexistent/folder-xyz", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmprune: error:") and "Traceback" not in err
    # argparse's own refusals: one line too, naming the help to read
    for argv, msg in [(["pack", "x", "--format", "w4s24"], "required: --out: see `llmprune pack -h`"),
                      (["export", "x", "--to", "onnx"], "invalid choice: 'onnx'"), (["compres"], "see `llmprune -h`"),
                      (["bench", "x", "--batchx", "1"], "unrecognized arguments: --batchx 1: see `llmprune bench -h`")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("llmprune: error:") and msg in err, err
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra,msg", [(["--format", "sparse24", "--quant", "gptq"], "drop --quant"),
                                       (["--quant", "rtn"], "add --format"),
                                       (["--format", "w4s50", "--grid", "asym"], "--grid sym"),
                                       (["--format", "w4s24", "--quant", "awq"], "rtn or gptq"),
                                       (["--format", "w4s24", "--quant", "rtn", "--sink-weight", "8"], "add --quant gptq"),
                                       (["--sink-weight", "8"], "add --quant gptq"),
                                       (["--format", "w4s24", "--quant", "gptq", "--sink-weight", "0.5"], "must be >= 1")])
def test_compress_rejects_format_options_before_any_work(tmp_path, capsys, tiny_dir, extra, msg):
    out = tmp_path / "o"
    assert main(["compress", "--model", str(tiny_dir), "--out", str(out), *extra, *FAST_CLI]) == 2
    err = capsys.readouterr().err
    assert msg in err and "saved" not in err and not out.exists(), err


def test_bad_flags_are_one_line_errors_before_any_work(tmp_path, capsys, pruned_24, tiny_dir, calib_txt):
    """Each was a traceback, most of them after the work was done (pack's evaluation after packing, eval's --json
    after evaluating, bench's after timing), or a flag silently ignored."""
    import shutil

    notok = shutil.copytree(tiny_dir, tmp_path / "notok")
    for f in notok.glob("tokenizer*"):
        f.unlink()
    x = str(tmp_path / "x")
    c = ["--calib", str(calib_txt), *FAST_CLI]
    cases = [
        (["compress", "--model", tiny_dir, "--format", "w4g128", "--group-size", "64x", "--out", x, *c], "--group-size"),
        (["pack", pruned_24, "--format", "w4s24", "--group-size", "abc", "--out", x], "--group-size 'abc'"),
        (["pack", pruned_24, "--format", "w4s24", "--quant", "gptq", "--group-size", "48", "--tune-steps", "2",
          "--nsamples", "4", "--seqlen", "32", "--out", x], "int4 group size 48 must be even and divide"),
        (["pack", pruned_24, "--format", "sparse24", "--eval", "wikitext2", "--eval-windows", "-1", "--out", x],
         "--eval-windows must be >= 1"),
        (["pack", pruned_24, "--format", "sparse24", "--eval", "wikitext2", "--eval-seqlen", "0", "--out", x],
         "--eval-seqlen must be >= 2"),
        (["pack", pruned_24, "--format", "sparse24", "--eval", "wikitext2", "--eval-seqlen", "100000", "--out", x],
         "longer than the model's context"),
        (["recover", pruned_24, "--eval", "wikitext2", "--eval-seqlen", "1", "--out", x], "--eval-seqlen must be >= 2"),
        (["export", pruned_24, "--to", "gguf", "--eval", "wikitext2", "--eval-windows", "-1", "--out", x],
         "--eval-windows must be >= 1"),
        (["eval", pruned_24, "--seqlen", "1"], "--seqlen must be >= 2"),
        (["eval", pruned_24, "--windows", "-2"], "--windows must be >= 1"),
        (["eval", pruned_24, "--dtype", "float8"], "--dtype 'float8'"),
        (["eval", pruned_24, "--json", str(tmp_path / "nowhere" / "r.json")], "its folder does not exist"),
        (["eval", pruned_24, "--json", pruned_24 / "llmprune.json"], "would replace a file of the llmprune output"),
        (["report", pruned_24, "--md", pruned_24 / "config.json"], "would replace a file of the llmprune output"),
        (["report", pruned_24, "--md", str(tmp_path)], "a folder"),
        (["bench", pruned_24, "--batch", "0"], "--batch '0'"),
        (["bench", pruned_24, "--batch", "abc"], "--batch 'abc'"),
        (["bench", pruned_24, "--new-tokens", "0"], "must be >= 1"),
        (["bench", pruned_24, "--prompt-len", "500", "--new-tokens", "20"], "longer than compressed's context (512"),
        (["bench", pruned_24, "--device", "foo"], "is not a device"),
        (["bench"], "nothing to time"),
        (["bench", pruned_24, "--json", str(tmp_path / "nowhere" / "b.json")], "its folder does not exist"),
        (["compress", "--model", notok, "--out", x, *c], "has no tokenizer transformers can read"),
        (["compress", "--model", tiny_dir, "--solver", "slicegpt", "--pattern", "2:4", "--out", x, *c],
         "drop --pattern"),
        (["compress", "--model", tiny_dir, "--solver", "sparsegpt", "--slicing", "0.2", "--out", x, *c],
         "drop --solver sparsegpt"),
        (["compress", "--model", tiny_dir, "--solver", "slicegpt", "--ignore", "q_proj", "--out", x, *c],
         "drop --ignore"),
        (["compress", "--model", tiny_dir, "--recover", "perp", "--recover-lr", "0", "--out", x, *c], "must be > 0"),
        (["compress", "--model", tiny_dir, "--owl-lambda", "0.1", "--out", x, *c],
         "--owl-lambda has no effect without --owl"),
        (["compress", "--model", tiny_dir, "--rotation", "shared", "--out", x, *c], "without --solver slicegpt"),
        (["compress", "--model", tiny_dir, "--recover-steps", "5", "--out", x, *c], "without --recover perp"),
        (["compress", "--model", tiny_dir, "--export", "compressed-tensors", "--export-type", "q8_0", "--out", x, *c],
         "--export-type has no effect without --export gguf"),
        (["export", pruned_24, "--to", "compressed-tensors", "--type", "q4_0", "--out", x], "without --to gguf"),
        (["export", pruned_24, "--to", "gguf", "--eval", "wikitext2", "--eval-seqlen", "100000", "--out", x],
         "longer than the model's context"),
        (["export", pruned_24, "--to", "compressed-tensors", "--quant", "gptq", "--seqlen", "100000", "--out", x],
         "longer than the model's context"),
        (["recover", pruned_24, "--weight-decay", "-1", "--out", x], "--weight-decay -1.0"),
        (["recover", pruned_24, "--seed", "-1", "--out", x], "in [0, 2**32)"),
    ]
    for argv, msg in cases:
        rc = main([str(v) for v in argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*")), argv


def _stub_commands(monkeypatch) -> type:
    """Replace what each command calls once its flags are read: reaching it raises the returned exception."""
    from llmprune import api, export, sweep

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    for mod, name in ((api, "compress"), (api, "pack"), (api, "recover"), (api, "evaluate"), (export, "export"),
                      (sweep, "sweep")):
        monkeypatch.setattr(mod, name, reached)
    return Reached


def test_a_flag_nothing_reads_is_refused_by_what_the_command_line_gave(tmp_path, capsys, monkeypatch):
    """Each was accepted without a word, its value read by nothing in that combination (pack's sparse24 takes no
    calibration, GGUF no --save-dtype, ...). A flag's default never counts, even one equal to a value typed: a flag
    is refused for being given, and the combinations that read it are not refused."""
    from safetensors.torch import save_file

    from llmprune.cli import build_parser

    reached = _stub_commands(monkeypatch)
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.zeros(2, 16, dtype=torch.long)}, str(ids))
    o = ["--out", str(tmp_path / "x")]
    refused = [
        (["compress", "--eval", "none", "--eval-windows", "3"],
         "--eval-windows has no effect with --eval none: drop --eval-windows"),
        (["compress", "--eval", "none", "--eval-seqlen", "64"], "--eval-seqlen has no effect with --eval none"),
        (["compress", "--scope", "layer"], "--scope has no effect without --solver magnitude"),
        (["compress", "--format", "sparse24", "--group-size", "64"], "--group-size has no effect with --format sparse24"),
        (["compress", "--grid", "auto"], "--grid has no effect with --format dense"),
        (["compress", "--format", "w4s24", "--no-act-order"], "--act-order has no effect without --quant gptq"),
        (["compress", "--calib", ids, "--seqlen", "64"], f"--seqlen has no effect with --calib {ids} (token ids"),
        (["pack", "s", "--format", "sparse24", "--nsamples", "8"], "--nsamples has no effect without --quant gptq"),
        (["pack", "s", "--format", "w4s24", "--hessian-gib", "1"], "--hessian-gib has no effect without --quant gptq"),
        (["pack", "s", "--format", "w4s50", "--group-size", "32"], "whose groups are fixed (16): drop --group-size"),
        (["pack", "s", "--format", "sparse24", "--eval-windows", "2"], "--eval-windows has no effect without --eval"),
        (["pack", "s", "--format", "sparse24", "--onload", "whole", "--checkpoint-every", "0"],
         "--checkpoint-every has no effect with --onload whole"),
        (["compress", "--onload", "whole", "--checkpoint-every", "60"], "--checkpoint-every has no effect"),
        (["export", "s", "--to", "gguf", "--save-dtype", "float16"], "--save-dtype has no effect with --to gguf"),
        (["export", "s", "--to", "gguf", "--calib", "c4"], "--calib has no effect without --quant gptq"),
        (["export", "s", "--to", "gguf", "--grid", "sym"], "--grid has no effect with --to gguf without --quant gptq"),
        (["export", "s", "--to", "compressed-tensors", "--seqlen", "64"], "--seqlen has no effect without --quant gptq"),
        (["export", "s", "--to", "compressed-tensors", "--checkpoint-every", "0"], "--checkpoint-every has no effect"),
        (["eval", "s", "--limit", "3"], "--limit has no effect without --tasks: add --tasks or drop --limit"),
        (["eval", "s", "--tasks", "copa", "--windows", "2"], "--windows has no effect without --ppl"),
        (["eval", "s", "--ppl", "none", "--seqlen", "64", "--tasks", "copa"], "--seqlen has no effect with --ppl none"),
        (["eval", "s", "--batch-size", "4"], "--batch-size has no effect without --tasks"),
        (["recover", "s", "--train", "norms", "--rank", "4"], "--rank has no effect with --train norms"),
        (["recover", "s", "--eval-seqlen", "64"], "--eval-seqlen has no effect without --eval"),
        (["recover", "s", "--data", ids, "--nsamples", "4"], "--nsamples has no effect with --data"),
        (["sweep", "--limit", "3"], "--limit has no effect without --tasks"),
    ]
    for argv, msg in refused:
        rc = main([str(v) for v in (*argv, *(o if argv[0] not in ("eval", "sweep") else ()))])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    read = [  # the same flags where something reads them
        ["compress", "--eval-windows", "3", "--eval-seqlen", "64", "--no-dense-eval", "--calib", ids],
        ["compress", "--solver", "magnitude", "--scope", "global"],
        ["compress", "--onload", "whole", "--recover", "perp", "--checkpoint-every", "0"],
        ["compress", "--format", "w4s24", "--quant", "gptq", "--group-size", "64", "--grid", "sym", "--no-act-order"],
        ["pack", "s", "--format", "w4s24", "--quant", "gptq", "--nsamples", "8", "--seed", "1", "--hessian-gib", "1"],
        ["pack", "s", "--format", "w4g128", "--group-size", "32", "--eval", "wikitext2", "--eval-windows", "2"],
        ["export", "s", "--to", "compressed-tensors", "--quant", "gptq", "--seqlen", "64", "--save-dtype", "float16",
         "--checkpoint-every", "0"],
        ["export", "s", "--to", "gguf", "--type", "q8_0"],
        ["export", "s", "--to", "gguf", "--quant", "gptq", "--group-size", "64", "--grid", "sym", "--calib", "c4"],
        ["eval", "s", "--tasks", "copa", "--limit", "3", "--batch-size", "4", "--ppl", "wikitext2", "--windows", "2"],
        ["recover", "s", "--train", "norms,masklora", "--rank", "4", "--eval", "wikitext2", "--eval-windows", "2"],
        ["sweep", "--tasks", "copa", "--limit", "3"],
        # flags that ask for nothing where nothing is done: no contradiction (bench/gpu_kernels.sh passes them)
        ["compress", "--eval", "none", "--no-dense-eval"], ["compress", "--onload", "whole", "--checkpoint-every", "off"],
        ["export", "s", "--to", "gguf", "--checkpoint-every", "off"],
    ]
    for argv in read:
        with pytest.raises(reached):
            main([str(v) for v in (*argv, *(o if argv[0] not in ("eval", "sweep") else ()))])
    given = build_parser().parse_args(["export", "s", "--to", "gguf", "--no-act-order"]).given
    assert given == {"command", "src", "to", "act_order"}  # (argparse's defaults are not "given")


def test_every_llmprune_command_of_the_gpu_script_passes_the_cli_checks(tmp_path, capsys, monkeypatch):
    """bench/gpu_kernels.sh's stages run llmprune's CLI on the lent GPU, where a refused flag costs device time (its
    `--eval none --no-dense-eval` was refused for a while): every command its CPU-side stages would run, recorded by
    a stand-in python (the stages' other scripts skipped), passes the CLI's checks and reaches the work."""
    import subprocess
    from pathlib import Path

    reached = _stub_commands(monkeypatch)
    log, py = tmp_path / "argv.txt", tmp_path / "py"
    py.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m llmprune.cli" ]; then shift 2; printf "%s\\0" "$@" >> {log}; '
                  f'echo >> {log}; fi\nexit 0\n')
    py.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    stages = "compress compress_scale compress_moe perp tune_scale moe_train"
    env = {**os.environ, "DEVICE": "cpu", "NS": "2", "SL": "64", "PY": str(py), "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", str(root / "bench" / "gpu_kernels.sh"), *stages.split()], cwd=root, env=env,
                   capture_output=True, timeout=300, check=False)  # (the stages fail: no output was written)
    calls = [line.split("\0")[:-1] for line in log.read_text().splitlines() if line]
    assert len(calls) >= 20 and {c[0] for c in calls} == {"compress", "pack", "recover"}, calls
    for argv in calls:
        with pytest.raises(reached):
            main(argv)
        assert "error" not in capsys.readouterr().err


def test_a_token_id_file_wider_than_the_context_is_refused_before_any_work(tmp_path, capsys, monkeypatch, tiny_dir,
                                                                          pruned_24):
    """Its width (used as is) was not checked, only --seqlen's (which it ignores): the tiny model (context 512)
    calibrated on 600-token windows. Refused before the file is read, whichever command calibrates on it."""
    from safetensors.torch import save_file

    from llmprune import calibration, pipeline

    wide, narrow = tmp_path / "wide.safetensors", tmp_path / "narrow.safetensors"
    save_file({"input_ids": torch.randint(0, 250, (2, 600))}, str(wide))
    save_file({"input_ids": torch.randint(0, 250, (2, 40))}, str(narrow))
    assert calibration.token_file_width(str(wide)) == 600 and calibration.token_file_width("c4") is None
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibrated before the refusal"))
    x = str(tmp_path / "x")
    cases = [["compress", "--model", tiny_dir, "--solver", "sparsegpt", "--calib", wide, "--eval", "none"],
             ["compress", "--model", tiny_dir, "--solver", "sparsegpt", "--calib", wide, "--eval", "none", "--onload",
              "whole"],
             ["compress", "--model", tiny_dir, "--solver", "magnitude", "--recover", "perp", "--calib", wide, "--eval",
              "none"],
             ["compress", "--model", tiny_dir, "--solver", "magnitude", "--export", "compressed-tensors",
              "--export-quant", "gptq", "--calib", wide, "--eval", "none"],
             ["pack", pruned_24, "--format", "w4s24", "--quant", "gptq", "--calib", wide],
             ["export", pruned_24, "--to", "compressed-tensors", "--quant", "gptq", "--calib", wide],
             ["recover", pruned_24, "--data", wide],
             ["sweep", "--model", tiny_dir, "--calib", wide]]
    for argv in cases:
        rc = main([str(v) for v in (*argv, "--out", x, "--no-progress")])
        err = capsys.readouterr().err
        assert rc == 2 and f"calibration file {wide} holds windows of 600 tokens, longer than the model's context (512" \
            in err and "cut its input_ids to 512 tokens" in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not list(tmp_path.glob("*x*")), argv
    # a narrow file passes the check, whatever the protocol's --seqlen default (here 2048 > 512: paper)
    with pytest.raises(pytest.fail.Exception, match="calibrated before the refusal"):
        main([str(v) for v in ("compress", "--model", tiny_dir, "--solver", "sparsegpt", "--calib", narrow, "--eval",
                               "none", "--protocol", "paper", "--out", x, "--no-progress")])


def test_eval_windows_0_is_every_window():
    """As in compress, 0 windows means all of them (eval --windows 0 was a traceback)."""
    from llmprune.config import check_eval
    from llmprune.eval.perplexity import windows_of

    assert check_eval(("wikitext2",), 64, 0, "--ppl") is None and check_eval((), 64, 3) == 3  # as the evaluators take it
    for windows in (None, 0):
        w, available = windows_of("wikitext2", torch.arange(1050), 100, windows)
        assert available == 10 and w.shape == (10, 100) and torch.equal(w.flatten(), torch.arange(1000))
    assert windows_of("wikitext2", torch.arange(1050), 100, 3)[0].shape == (3, 100)


def test_pack_and_export_gptq_calibrate_by_the_sources_protocol(tmp_path, capsys, monkeypatch, pruned_24):
    """Without --nsamples / --seqlen, pack's and export's GPTQ calibrate as the source's compress run did (its
    protocol: cpu, 64 x 512), not with the paper's 128 x 2048 (the calibration stopped where it starts)."""
    from llmprune import pipeline
    from llmprune.errors import LLMPruneError

    assert json.loads((pruned_24 / "llmprune.json").read_text())["protocol"] == "cpu"

    def calibrate(calib, tok, nsamples, seqlen, seed):
        raise LLMPruneError(f"calibrating {nsamples} x {seqlen}")

    monkeypatch.setattr(pipeline, "calibrate", calibrate)
    for argv in (["pack", pruned_24, "--format", "w4s24", "--quant", "gptq", "--out", tmp_path / "p"],
                 ["export", pruned_24, "--to", "compressed-tensors", "--quant", "gptq", "--out", tmp_path / "e"]):
        assert main([str(a) for a in argv]) == 2
        assert "calibrating 64 x 512" in capsys.readouterr().err, argv


def test_an_output_another_run_wrote_meanwhile_is_not_replaced_and_an_unwritable_out_is_refused(tmp_path, capsys,
                                                                                                monkeypatch, tiny_dir,
                                                                                                calib_txt):
    """Two runs writing one --out: the one finishing second does not replace the first's without --overwrite (its
    own output kept beside, said in one line); a folder this process cannot write in is refused before any work."""
    import os

    from llmprune import outdir
    from llmprune.errors import LLMPruneError

    out = tmp_path / "race"
    with pytest.raises(LLMPruneError, match="was written by another run while this one worked") as e, \
            outdir.atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("this run")
        out.mkdir()  # the other run's rename
        (out / "llmprune.json").write_text("{}")
    (beside,) = tmp_path.glob("race.new-*")
    assert str(beside) in str(e.value) and (beside / "mine.txt").read_text() == "this run"
    assert (out / "llmprune.json").read_text() == "{}" and not list(tmp_path.glob(".race*"))
    with outdir.atomic_dir(out, overwrite=True) as tmp:  # --overwrite: replaced, as before
        (tmp / "llmprune.json").write_text('{"x": 1}')
    assert (out / "llmprune.json").read_text() == '{"x": 1}'
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    (tmp_path / "ro").mkdir()
    assert main(["compress", "--model", str(tiny_dir), "--calib", str(calib_txt), "--out", str(tmp_path / "ro" / "o"),
                 *FAST_CLI]) == 2
    err = capsys.readouterr().err
    assert f"no permission to write in {tmp_path / 'ro'}" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("edit,msg", [({"format": "w4g128"}, "'format' is a str, not a dict"),
                                      ({"dtype": "float64x"}, "dtype 'float64x' is none of"),
                                      ({"sparsity": "half"}, "'sparsity' is a str")])
def test_a_hand_edited_manifest_is_refused_in_one_line(tmp_path, capsys, pruned_24, edit, msg):
    """Values of the wrong type in llmprune.json were tracebacks in pack, eval and export (one after writing the
    whole output): refused in one line when the manifest is read."""
    import shutil

    src = shutil.copytree(pruned_24, tmp_path / "src")
    m = json.loads((src / "llmprune.json").read_text())
    (src / "llmprune.json").write_text(json.dumps({**m, **edit}))
    for argv in (["pack", src, "--format", "sparse24", "--out", tmp_path / "p"], ["eval", src, "--windows", "1"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


def test_export_of_the_current_folder(tmp_path, capsys, pruned_24, monkeypatch):
    """`llmprune export . --to gguf` from inside the output ('.' names no folder: it was a traceback)."""
    import shutil

    src = shutil.copytree(pruned_24, tmp_path / "w24")
    monkeypatch.chdir(src)
    assert main(["export", ".", "--to", "gguf", "--no-progress"]) == 0
    assert list((tmp_path / "w24-gguf").glob("*.gguf"))


def test_a_config_that_does_not_match_the_weights_is_one_line(tmp_path, capsys, tiny_dir, calib_txt):
    """config.json edited to another intermediate size than the stored weights: accelerate's traceback before, now
    one line naming the tensor, nothing written."""
    import shutil

    m = shutil.copytree(tiny_dir, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    out = tmp_path / "o"
    assert main(["compress", "--model", str(m), "--calib", str(calib_txt), "--out", str(out), *FAST_CLI]) == 2
    err = capsys.readouterr().err
    assert "is stored as (128, 64), but config.json makes it (96, 64)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_an_output_without_tokenizer_or_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys,
                                                                                         monkeypatch, pruned_24,
                                                                                         calib_txt):
    """eval and recover of a folder saved without its tokenizer were tracebacks; eval of an output whose manifest
    cannot be written measured first and lost the figures at the end: each refused in one line, first."""
    import os
    import shutil

    from llmprune import api

    bare = shutil.copytree(pruned_24, tmp_path / "bare")
    for f in bare.glob("tokenizer*"):
        f.unlink()
    for argv, cmd in ((["eval", bare, "--windows", "1"], "eval"),
                      (["recover", bare, "--out", tmp_path / "r", "--data", calib_txt, "--steps", "1"], "recover")):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert f"has no tokenizer (tokenizer_config.json), which `llmprune {cmd}` needs" in err, err
        assert len(err.strip().splitlines()) == 1
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(pruned_24) else real(p, mode))
    monkeypatch.setattr(api, "_perplexity", lambda *a, **k: pytest.fail("measured"))
    assert main(["eval", str(pruned_24), "--windows", "1", "--seqlen", "32", "--no-progress"]) == 2
    assert f"no permission to write in {pruned_24}" in capsys.readouterr().err
