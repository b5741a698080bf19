"""Solving a block's linears on several devices at once (parallel.py), checked with two CPU slots:
one thread per slot, results equal to solving them one after another."""
import json
import threading

import pytest
import torch

from llmprune import arch, parallel, patterns, prune, runinfo
from llmprune.errors import LLMPruneError
from llmprune.solvers import get
from llmprune.testing import FAST_CLI, tiny_model


def test_slots_take_devices_in_turn_and_shared_keys_share_one():
    assert parallel.slots(["q", "k", "q", "v", "o", "k"], ["a", "b"]) == {"q": 0, "k": 1, "v": 0, "o": 1}
    assert parallel.slots(["x", "y"], ["a"]) == {"x": 0, "y": 0}


def test_run_keeps_order_per_slot_runs_slots_at_once_and_reraises():
    seen = []
    both = threading.Barrier(2, timeout=10)  # passes only when both slots' first jobs run at the same time

    def job(i):
        def f():
            if i < 2:
                both.wait()
            seen.append(i)
            return i * 10
        return f

    jobs = [(i % 2, job(i)) for i in range(6)]
    assert parallel.run(jobs, ["cpu", "cpu"]) == [0, 10, 20, 30, 40, 50]
    assert [i for i in seen if i % 2 == 0] == [0, 2, 4] and [i for i in seen if i % 2] == [1, 3, 5]
    main = threading.current_thread()
    assert parallel.run([(0, lambda: threading.current_thread())], ["cpu"]) == [main]  # one slot: here

    def boom():
        raise ValueError("solver failed")
    with pytest.raises(ValueError, match="solver failed"):
        parallel.run([(0, job(3)), (1, boom)], ["cpu", "cpu"])


def _pruned(name, solver, devices, pat="unstructured", **opts):
    m = tiny_model(name, seed=3)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    names = prune.target_linears(m)
    res = prune.prune(m, get(solver), patterns.parse(pat), {n: 0.5 for n in names}, ids, opts, batch_size=3,
                      progress=False, devices=devices)
    return m, res


@pytest.mark.parametrize("name,solver,pat,opts", [
    ("llama", "sparsegpt", "2:4", {}),
    ("llama", "wanda", "unstructured", {}),
    ("llama", "dsnot", "unstructured", {"init": "sparsegpt", "skip": "none"}),
    ("phi3", "sparsegpt", "unstructured", {}),  # fused qkv / gate_up: parts share one accumulator
    ("qwen2_moe", "sparsegpt", "unstructured", {}),  # experts and shared experts
])
def test_two_slots_give_the_single_device_result(name, solver, pat, opts):
    one, r1 = _pruned(name, solver, None, pat, **opts)
    two, r2 = _pruned(name, solver, ("cpu", "cpu"), pat, **opts)
    sd1, sd2 = one.state_dict(), two.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert list(r1["layers"]) == list(r2["layers"]) and r1["layers"] == r2["layers"]
    assert any(not torch.equal(v, sd1[k]) for k, v in tiny_model(name, seed=3).state_dict().items())  # pruned


def test_statistics_live_on_their_slot_and_follow_the_fused_key():
    from llmprune import walker

    m = tiny_model("phi3")
    mods = {n: arch.target(m, n) for n in prune.target_linears(m) if n.startswith("model.layers.0.")}
    with walker.collect(mods, {"hessian"}, devices=("cpu", "cpu")) as stats:
        pass
    keys = {n: getattr(mods[n], "stats_key", None) or n for n in mods}
    for a in mods:
        for b in mods:
            assert (stats[a] is stats[b]) == (keys[a] == keys[b])
    assert {s.slot for s in stats.values()} == {0, 1}


def test_gptq_on_two_slots_equals_one():
    from llmprune.quant.sequential import gptq_sequential

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    outs = []
    for devices in (None, ("cpu", "cpu")):
        m = tiny_model("llama", seed=4)
        q = gptq_sequential(m, ids, "w4g128", 32, batch_size=2, devices=devices)
        outs.append((q, m.state_dict()))
    (q1, sd1), (q2, sd2) = outs
    assert list(q1) == list(q2)
    for n in q1:
        assert torch.equal(q1[n].codes, q2[n].codes) and torch.equal(q1[n].scales, q2[n].scales), n
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_pick_devices():
    assert runinfo.pick_devices("cpu") == ("cpu",)
    assert runinfo.pick_devices("cpu, cpu") == ("cpu", "cpu")
    assert runinfo.pick_device("cpu,cpu") == "cpu"
    with pytest.raises(LLMPruneError, match="not a device"):
        runinfo.pick_devices("gpu0")
    with pytest.raises(LLMPruneError, match="cpu or cuda"):
        runinfo.pick_devices("meta")
    if not torch.cuda.is_available():
        assert runinfo.pick_devices(None) == ("cpu",)
        with pytest.raises(LLMPruneError, match="no CUDA device"):
            runinfo.pick_devices("cuda:0,cuda:1")


def test_compress_on_two_slots_records_them(tmp_path, tiny_dir, calib_txt):
    from llmprune.cli import main

    outs = {}
    for dev in ("cpu", "cpu,cpu"):
        out = tmp_path / dev.replace(",", "-")
        assert main(["compress", "--model", str(tiny_dir), "--solver", "sparsegpt", "--calib", str(calib_txt),
                     "--device", dev, "--out", str(out), *FAST_CLI]) == 0
        outs[dev] = out
    man = json.loads((outs["cpu,cpu"] / "llmprune.json").read_text())
    assert man["device"] == "cpu,cpu"
    from safetensors.torch import load_file

    a = load_file(outs["cpu"] / "model.safetensors")
    b = load_file(outs["cpu,cpu"] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
