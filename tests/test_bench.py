"""Decode benchmark and kernel microbenchmark on CPU (reference path), tiny model, tiny shapes."""
import json

import pytest
import torch

from llmprune import bench
from llmprune.testing import tiny_model


def test_weight_bytes_counts_tied_head_once_and_skips_rotary():
    m = tiny_model("llama", seed=0)
    params = {p.data_ptr(): p.numel() * 4 for p in m.parameters()}
    assert bench.weight_bytes(m) == sum(params.values())  # tied: the embedding is the lm_head
    m2 = tiny_model("llama", seed=0, tie_word_embeddings=False)
    emb = m2.get_input_embeddings().weight
    assert bench.weight_bytes(m2) == sum(p.numel() * 4 for p in m2.parameters()) - emb.numel() * 4


def test_decode_steps_match_generate():
    """The timed loop really decodes: its greedy tokens equal model.generate's."""
    m = tiny_model("llama", seed=1)
    res = bench.decode_steps(m, batch=2, prompt_len=6, new_tokens=4, device="cpu", warmup=1)
    assert len(res["ms"]) == 4 and all(t > 0 for t in res["ms"]) and res["mode"] == "eager"
    ref = m.generate(res["prompt"], attention_mask=torch.ones_like(res["prompt"]), max_new_tokens=6,
                     do_sample=False, pad_token_id=257)
    assert torch.equal(res["tokens"], ref[:, 6:])


def test_run_bench_dense_vs_packed(tmp_path):
    from llmprune.packed import save_packed
    from llmprune.patterns import keep_mask, parse

    dense = tiny_model("llama", seed=2)
    masks = {n: keep_mask(mod.weight.abs(), parse("2:4"), 0.5) for n, mod in dense.named_modules()
             if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers")}
    out = tmp_path / "packed"
    save_packed(dense, out, "sparse24", masks, dtype=None)
    res = bench.run_bench(out, dense_model=dense, batches=(1, 3), prompt_len=8, new_tokens=3, device="cpu",
                          warmup=1)
    assert res["context_len"] == 11 and res["device"] == "cpu"
    rows = {(r["model"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {("dense", 1), ("dense", 3), ("compressed", 1), ("compressed", 3)}
    r = rows[("compressed", 3)]
    assert r["ms_per_step_p90"] >= r["ms_per_step_median"] > 0
    assert r["tokens_per_s"] == pytest.approx(3e3 / r["ms_per_step_median"])
    assert r["effective_GBps"] == pytest.approx(r["weight_bytes"] / r["ms_per_step_median"] / 1e6)
    # 2:4 linears store half the values + 1/16 metadata: fewer bytes than dense
    assert r["weight_bytes"] < rows[("dense", 3)]["weight_bytes"]
    assert "speedup_vs_dense" in r and r["peak_mem_MiB"] > 0
    json.dumps(res)


def test_bench_of_experts_counts_the_experts_each_step_reads(tmp_path):
    """A packed Mixture-of-Experts folder decodes (its greedy tokens are generate's); a step reads only the experts
    its tokens are routed to, so its effective GB/s counts those: at batch 1, top-k of E experts, every layer reads
    exactly k experts (all but E - k of them, sized here from the model's own tensors), at batch 2 between k and
    2k; the same for the dense model's fused experts."""
    from llmprune.packed import load_packed, save_packed

    dense = tiny_model("qwen3_moe", seed=2)
    out = tmp_path / "packed"
    save_packed(dense, out, "w4g128", group_size="auto", dtype=None)
    m = load_packed(out)
    res = bench.decode_steps(m, batch=2, prompt_len=6, new_tokens=4, device="cpu", warmup=1)
    ref = m.generate(res["prompt"], attention_mask=torch.ones_like(res["prompt"]), max_new_tokens=6,
                     do_sample=False, pad_token_id=257)
    assert torch.equal(res["tokens"], ref[:, 6:])
    cfg = dense.config
    E, k, L = cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    assert k < E
    packed_expert = sum(t.numel() * t.element_size() for n, t in m.state_dict().items()
                        if n.startswith("model.layers.0.mlp.experts.0."))
    fused = dense.model.layers[0].mlp.experts
    dense_expert = (fused.gate_up_proj[0].numel() + fused.down_proj[0].numel()) * 4  # fp32
    run = bench.run_bench(out, dense_model=dense, batches=(1, 2), prompt_len=6, new_tokens=3, device="cpu", warmup=1)
    for r in run["rows"]:
        per = packed_expert if r["model"] == "compressed" else dense_expert
        fewest = r["weight_bytes"] - L * (E - k) * per
        if r["batch"] == 1:
            assert r["read_bytes_per_step"] == fewest, r
        else:
            assert fewest <= r["read_bytes_per_step"] <= fewest + L * min(k, E - k) * per, r
        assert r["effective_GBps"] == pytest.approx(r["read_bytes_per_step"] / r["ms_per_step_median"] / 1e6)
    assert "Mixture-of-Experts" in run["notes"]


@pytest.mark.parametrize("fmt", ["sparse24", "w4g128", "w4s24", "w4s50"])
def test_random_packed_is_valid(fmt):
    """The microbench's random weights are valid packed layers: the reference accepts them."""
    from llmprune.kernels import ops

    p = bench.random_packed(fmt, 16, 256, torch.float32)
    y = ops.linear(fmt, torch.randn(2, 256), p)
    assert y.shape == (2, 16) and torch.isfinite(y).all()
    if fmt == "w4s50":
        assert (p["gidx"].diff(dim=1) > 0).all()


def test_kernel_microbench_cpu_and_cli(tmp_path, capsys):
    rows = bench.kernel_microbench({"t": (32, 256)}, Ms=(1, 3), formats=("sparse24", "w4s50"), reps=2)
    assert {(r["M"], r["format"]) for r in rows} == {(m, f) for m in (1, 3) for f in ("dense", "sparse24", "w4s50")}
    assert all(r["ms"] > 0 and r["effective_GBps"] > 0 for r in rows)
    by = {(r["M"], r["format"]): r for r in rows}
    assert by[(1, "sparse24")]["bytes"] == 32 * 128 * 4 + 32 * 32  # values fp32 + meta
    j = tmp_path / "b.json"
    from llmprune.testing import tiny_model_dir

    d = tiny_model_dir(tmp_path / "m", seed=3)
    assert bench.main([str(d), "--batch", "1", "--prompt-len", "4", "--new-tokens", "2", "--json", str(j)]) == 0
    assert "context 6" in capsys.readouterr().out
    assert json.loads(j.read_text())["decode"]["rows"][0]["batch"] == 1


def test_decode_steps_profile_leaves_decoding_alone():
    """profile=True records one step's ops (count, busy time, the costliest) and the tokens stay the same."""
    m = tiny_model("llama", seed=1)
    plain = bench.decode_steps(m, batch=1, prompt_len=5, new_tokens=3, device="cpu", warmup=1)
    res = bench.decode_steps(m, batch=1, prompt_len=5, new_tokens=3, device="cpu", warmup=1, profile=True)
    assert torch.equal(res["tokens"], plain["tokens"])
    p = res["profile"]
    assert p["n_kernels"] >= len(p["top"]) > 0 and p["busy_ms"] > 0
    names = [t["name"] for t in p["top"]]
    assert "aten::linear" in names, names
    assert sum(t["ms"] for t in p["top"]) <= p["busy_ms"] + 1e-9
    json.dumps(p)


def test_e2e_decode_measures_each_model_alone(tmp_path, monkeypatch):
    """bench/e2e_decode.py (CPU dry run): the packed models are built after the dense decoder linears are
    freed (peak memory is each model's own), share the dense embeddings/norms/head, and every row records
    its batch-1 profile."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import e2e_decode

    dense = e2e_decode.dense_model("llama3-8b", 1, "cpu", hidden_size=256, intermediate_size=512,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    ids = torch.randint(0, 300, (1, 5))
    e2e_decode.drop_linears(dense)
    assert all(lin.weight.is_meta for _, _, lin in e2e_decode.decoder_linears(dense))
    c = e2e_decode.packed_copy(dense, "w4s24", "cpu")
    assert not any(t.is_meta for t in c.state_dict().values())
    assert c.model.embed_tokens.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()  # shared
    assert len(e2e_decode.decoder_linears(c)) == 7
    with torch.no_grad():
        assert torch.isfinite(c(ids).logits).all()
    out = tmp_path / "e.json"
    assert e2e_decode.main([str(out), "--device", "cpu", "--tiny", "--layers", "1", "--batch", "1,2",
                            "--new-tokens", "2", "--prompt-len", "3", "--formats", "sparse24,w4s24"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [(m, b) for m in ("dense", "sparse24", "w4s24")
                                                        for b in (1, 2)], rows
    assert all(r["peak_of"] == "this model alone" for r in rows)
    assert [("profile" in r) for r in rows] == [True, False] * 3
    sys.modules.pop("e2e_decode")


def test_e2e_decode_of_a_moe_model_runs_packed_experts(tmp_path, monkeypatch):
    """bench/e2e_decode.py --arch qwen3-30b-a3b (CPU dry run): the dense experts are freed too, the packed copy runs
    each expert's projections as packed linears (moe.SplitExperts, stacked for the grouped launches: the same
    logits as expert by expert), the router stays as it is, `w4s24:loop` rows run expert by expert, and the
    effective GB/s counts the experts a step reads (8 of 16 a layer at batch 1), not all of them."""
    import sys
    from pathlib import Path

    from llmprune import moe
    from llmprune.modules import PackedLinear

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import e2e_decode

    dense = e2e_decode.dense_model("qwen3-30b-a3b", 1, "cpu", hidden_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=128, vocab_size=300)
    e2e_decode.drop_linears(dense)
    assert all(p.is_meta for n, p in dense.named_parameters() if ".experts." in n)
    c = e2e_decode.packed_copy(dense, "w4g128", "cpu")
    assert not any(t.is_meta for t in c.state_dict().values())
    split = c.model.layers[0].mlp.experts
    assert isinstance(split, moe.SplitExperts) and isinstance(split[3].down_proj, PackedLinear)
    assert not isinstance(c.model.layers[0].mlp.gate, PackedLinear)
    assert split._stacked() and split.grouped == "auto"
    assert e2e_decode.packed_copy(dense, "w4g128", "cpu", "never").model.layers[0].mlp.experts.grouped == "never"
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        loop = c(ids).logits
        split.grouped = "always"
        assert torch.isfinite(loop).all()
        torch.testing.assert_close(c(ids).logits, loop, rtol=1e-4, atol=1e-4)
    out = tmp_path / "e.json"
    assert e2e_decode.main([str(out), "--arch", "qwen3-30b-a3b", "--device", "cpu", "--tiny", "--layers", "1",
                            "--batch", "1", "--new-tokens", "2", "--prompt-len", "3", "--formats", "w4s24,w4s24:loop"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["dense", "w4s24", "w4s24:loop"]
    assert all(0 < r["read_bytes_per_step"] < r["weight_bytes"] and r["effective_GBps"] > 0 for r in rows)
    sys.modules.pop("e2e_decode")


def test_bench_cli_compile_and_profile(tmp_path, capsys):
    """`llmprune bench OUT --compile --profile`: the decode step runs through torch.compile and decodes the
    same tokens as the eager step; the first batch's row carries the profile and it is printed."""
    from llmprune.packed import save_packed

    dense = tiny_model("llama", seed=3)
    eager = bench.decode_steps(dense, batch=1, prompt_len=5, new_tokens=3, device="cpu", warmup=1)
    compiled = bench.decode_steps(dense, batch=1, prompt_len=5, new_tokens=3, device="cpu", warmup=1,
                                  step_model=torch.compile(dense))
    assert torch.equal(compiled["tokens"], eager["tokens"])
    out = tmp_path / "packed"
    save_packed(dense, out, "w4g128", None, dtype=None, group_size=64)
    js = tmp_path / "b.json"
    assert bench.main([str(out), "--batch", "1,2", "--prompt-len", "4", "--new-tokens", "2", "--device", "cpu",
                       "--compile", "--profile", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["decode"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["mode"].endswith("+ torch.compile") for r in rows)
    assert "profile" in rows[0] and "profile" not in rows[1]
    assert "top-level CPU ops of one step: " in capsys.readouterr().out


def test_reset_peak_restarts_the_cpu_count():
    """Between the models of one `llmprune bench` run the peak restarts: a 320 MB buffer freed before the
    reset does not count in the next model's peak (it did: VmHWM is process-wide)."""
    from llmprune.runinfo import reset_peak_rss

    cpu = torch.device("cpu")
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here: the peak stays process-wide")
    x = torch.ones(80_000_000)  # 320 MB, touched
    before = bench._peak_mib(cpu)
    del x
    bench._reset_peak(cpu)
    assert bench._peak_mib(cpu) < before - 250


def test_bandwidth_percentages_only_against_the_device_they_describe(monkeypatch):
    """The % of bandwidth columns are of the device's own figures (the issue's 4.3 TB/s target on an H200 only);
    a CPU or an unknown GPU gets none, not a percentage of an H200."""
    from llmprune import bench

    cpu = bench._summary([2.0, 2.0, 4.0], 1, 2 * 10**9, bench.bandwidth("cpu"))
    assert cpu["effective_GBps"] == pytest.approx(1000.0) and cpu["pct_of_spec_bw"] is None
    assert cpu["pct_of_target_bw"] is None
    for name, want in [("NVIDIA H200", (4800.0, 4300.0)), ("NVIDIA H100 80GB HBM3", (3350.0, None)),
                       ("NVIDIA A10G", (None, None))]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert bench.bandwidth("cuda:0") == want
    h200 = bench._summary([2.0], 1, 2 * 10**9, (4800.0, 4300.0))
    assert h200["pct_of_spec_bw"] == pytest.approx(100 * 1000 / 4800) and h200["pct_of_target_bw"] == pytest.approx(
        100 * 1000 / 4300)


def test_a_model_larger_than_the_gpus_free_memory_is_refused_before_it_loads(tmp_path, monkeypatch):
    """`bench` reads each model's size from its safetensors headers (floats in the bench dtype, packed codes as
    stored: the bytes the load puts on the GPU) and refuses, in one line naming the fix, one whose weights alone
    exceed the GPU's free memory, before reading any weight (a 70B dense model would be read whole into CPU memory,
    then run out of GPU memory)."""
    from llmprune import checkpoint
    from llmprune.cli import main
    from llmprune.errors import LLMPruneError
    from llmprune.testing import FAST_CLI, tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", "llama", seed=0, tie_word_embeddings=False)
    out = tmp_path / "packed"
    assert main(["compress", "--model", str(src), "--solver", "magnitude", "--pattern", "2:4", "--format", "w4s24",
                 "--group-size", "16", "--out", str(out), *FAST_CLI]) == 0
    dense = bench._load(str(src), torch.float16, "cpu")
    assert bench.load_bytes(src, torch.float16) == sum(p.numel() * 2 for p in dense.parameters())
    packed = checkpoint.load(out, dtype="float16")[0]
    state = {t.data_ptr(): t.numel() * t.element_size() for t in packed.state_dict().values()}
    assert bench.load_bytes(out, torch.float16) == sum(state.values())
    free = bench.load_bytes(out, torch.float16) + 1  # the packed model fits, the dense one does not
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    cuda = torch.device("cuda", 0)
    bench.check_fits("compressed", out, torch.float16, cuda)
    with pytest.raises(LLMPruneError, match=r"^--dense .*src: its weights take 0\.0 GiB in float16, more than the "
                                            r"0\.0 GiB free on cuda:0: drop --dense"):
        bench.check_fits("dense", src, torch.float16, cuda)
    bench.check_fits("dense", src, torch.float16, torch.device("cpu"))  # CPU memory: not checked here
