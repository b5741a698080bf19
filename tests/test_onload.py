"""Sequential onloading: the model stays on disk and is walked block by block. It must compute
exactly what the in-memory path computes, write standard sharded folders, evaluate block by block
to the same figure, and keep its memory flat in the model's depth."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.testing import FAST_CLI, hold_one_block
from llmprune.testing import folder_tensors as _tensors

EVAL = ["--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
CHEAP = FAST_CLI[:-2]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err



CASES = [  # every pass the sequential path runs: stats pass, sequential solver, no-stats, OWL first, GPTQ after
    ("wanda", "unstructured", "dense", []),
    ("sparsegpt", "2:4", "dense", []),
    ("magnitude", "unstructured", "dense", []),
    ("wanda", "unstructured", "dense", ["--owl", "--sparsity", "0.6"]),
    ("alps", "2:4", "dense", ["--max-iter", "20"]),
    ("wanda", "2:4", "sparse24", []),
    ("sparsegpt", "2:4", "w4s24", ["--quant", "gptq", "--group-size", "32"]),
    ("wanda", "unstructured", "w4g128", ["--quant", "rtn", "--group-size", "32"]),
    ("wanda", "2:4", "w4s24", ["--quant", "gptq", "--group-size", "32", "--tune-steps", "4", "--tune-lr", "5e-3"]),
]


@pytest.mark.parametrize("solver,pattern,fmt,extra", CASES, ids=[f"{s}-{p}-{f}{'-' + e[0] if e else ''}"
                                                                 for s, p, f, e in CASES])
def test_blocks_from_disk_compute_what_the_whole_model_computes(tmp_path, capsys, tiny_dir, calib_txt, solver,
                                                                pattern, fmt, extra, monkeypatch):
    from llmprune import lazy

    monkeypatch.setattr(lazy, "SHARD_BYTES", 30_000)  # several shards even for the tiny model
    outs = {}
    for mode in ("whole", "blocks", "ahead"):  # ahead: blocks, each walk reading its next block ahead (as on a GPU)
        outs[mode] = tmp_path / mode
        with monkeypatch.context() as m:
            m.setattr(lazy, "READ_AHEAD", mode == "ahead")
            rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--solver", solver, "--pattern", pattern,
                             "--format", fmt, *extra, "--calib", calib_txt, "--out", outs[mode], "--onload",
                             mode.replace("ahead", "blocks"), *CHEAP, *EVAL)
        assert rc == 0, se
    a, b, c = _tensors(outs["whole"]), _tensors(outs["blocks"]), _tensors(outs["ahead"])
    assert set(a) == set(b) == set(c)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]), k
    assert json.loads((outs["ahead"] / "llmprune.json").read_text())["eval"]["wikitext2"]["ppl"] == \
        json.loads((outs["blocks"] / "llmprune.json").read_text())["eval"]["wikitext2"]["ppl"]
    ma, mb = (json.loads((outs[m] / "llmprune.json").read_text()) for m in ("whole", "blocks"))
    assert mb["onload"] == "blocks" and ma["onload"].startswith("whole")
    assert mb["sparsity"]["measured"] == pytest.approx(ma["sparsity"]["measured"], abs=1e-12)
    ea, eb = ma["eval"]["wikitext2"], mb["eval"]["wikitext2"]
    assert eb["blockwise"] and eb["ppl"] == pytest.approx(ea["ppl"], rel=1e-6)
    assert eb["dense_ppl"] == pytest.approx(ea["dense_ppl"], rel=1e-6)
    files = sorted(p.name for p in outs["blocks"].glob("*.safetensors"))
    assert len(files) > 1 and (outs["blocks"] / "model.safetensors.index.json").exists()
    if fmt == "dense":  # a standard sharded folder: plain transformers loads it
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(outs["blocks"])
        ids = torch.randint(0, 256, (2, 12))
        from llmprune import checkpoint

        ref, _, _ = checkpoint.load(outs["whole"])
        assert torch.equal(plain(ids).logits, ref(ids).logits)


def test_blockwise_perplexity_equals_the_whole_model_forward(tiny_dir):
    from llmprune import lazy, onload
    from llmprune.eval.perplexity import perplexity
    from llmprune.models import load
    from llmprune.testing import byte_tokenizer

    tok = byte_tokenizer()
    model, _, _ = load(str(tiny_dir))
    whole = perplexity(model, tok, "wikitext2", 64, 3, progress=False)
    lz = lazy.LazyModel(tiny_dir, torch.float32)
    blocks = onload.evaluate(lz, tok, ("wikitext2",), 64, 3, "cpu", False, {})["wikitext2"]
    assert blocks["ppl"] == whole["ppl"] and blocks["windows"] == whole["windows"] == 3
    assert all(p.device.type == "meta" for p in lz.model.parameters())  # every block released again


def test_dense_figures_of_a_whole_load_walk_the_folder_on_a_gpu(tiny_dir, monkeypatch):
    """compress's whole-model path (SliceGPT, PERP, ...) measures the dense model before compressing: on a
    GPU block by block from its folder (a 70B model in memory does not fit one GPU), on the CPU in place."""
    from llmprune import api, onload
    from llmprune.config import CompressConfig
    from llmprune.models import load
    from llmprune.testing import byte_tokenizer

    model, _, _ = load(str(tiny_dir))
    c = CompressConfig(eval=("wikitext2",), eval_seqlen=64).resolved("cpu")
    on_cpu = api._evaluate_dense(tiny_dir, model, byte_tokenizer(), c, 3, "cpu", {})["wikitext2"]
    seen, real = {}, onload.evaluate

    def walked(lz, tok, datasets, seqlen, windows, device, progress, cache):  # (this machine has no GPU)
        seen["device"] = device
        return real(lz, tok, datasets, seqlen, windows, "cpu", progress, cache)

    monkeypatch.setattr(onload, "evaluate", walked)
    monkeypatch.setattr(model, "to", lambda *a, **k: pytest.fail("the whole model was moved to the GPU"))
    on_gpu = api._evaluate_dense(tiny_dir, model, byte_tokenizer(), c, 3, "cuda:0", {})["wikitext2"]
    assert seen["device"] == "cuda:0" and on_gpu["blockwise"]
    assert on_gpu["ppl"] == pytest.approx(on_cpu["ppl"], rel=1e-6)


RECOVER = ["--recover", "perp", "--recover-steps", "2"]


@pytest.mark.parametrize("fmt,extra", [("dense", []), ("w4s24", ["--quant", "rtn", "--group-size", "32"]),
                                       ("w4s24", ["--quant", "gptq", "--group-size", "32"])], ids=["dense", "rtn", "gptq"])
def test_compress_recover_block_by_block_computes_what_the_whole_model_computes(tmp_path, capsys, tiny_dir, calib_txt,
                                                                                fmt, extra, monkeypatch):
    """`compress --recover perp --onload blocks` (auto's choice on a GPU): pruned block by block into the scratch
    folder, PERP on every tensor read from there straight to its device, each block then written (or passed
    to GPTQ through the scratch folder, with the trained final norm): the folder, the losses and the figures
    are the whole path's, and the model is never loaded whole. On the CPU alone auto loads it whole."""
    from llmprune import lazy, pipeline

    monkeypatch.setattr(lazy, "SHARD_BYTES", 30_000)
    outs = {m: tmp_path / m for m in ("auto", "blocks")}
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--pattern", "2:4", "--format", fmt, *extra, *RECOVER,
                     "--calib", calib_txt, "--out", outs["auto"], *CHEAP, *EVAL)
    assert rc == 0, se
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded whole"))
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--pattern", "2:4", "--format", fmt, *extra, *RECOVER,
                     "--calib", calib_txt, "--out", outs["blocks"], "--onload", "blocks", *CHEAP, *EVAL)
    assert rc == 0, se
    a, b = _tensors(outs["auto"]), _tensors(outs["blocks"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((outs[m] / "llmprune.json").read_text()) for m in ("auto", "blocks"))
    assert ma["onload"] == "whole: PERP (--recover) on the CPU: the whole load keeps the model backed by its files"
    assert mb["onload"] == "blocks" and ma["steps"] == mb["steps"] and ma["steps"][:2] == ["prune", "recover"]
    assert ma["recover"]["losses"] == mb["recover"]["losses"] and ma["sparsity"] == mb["sparsity"]
    assert mb["sparsity"]["measured_after_recover"] == 0.5
    strip = lambda e: {k: v for k, v in e["wikitext2"].items() if k not in ("seconds", "files")}
    assert strip(ma["eval"]) == strip(mb["eval"])


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_compress_recover_of_experts_block_by_block_computes_what_the_whole_model_computes(tmp_path, capsys, calib_txt,
                                                                                           family):
    """PERP adapts the experts' projections too (moe.split_linears), planned on the meta device by their view names
    and read from disk to where they train: the folder and the losses are the whole path's, every expert adapted."""
    from llmprune.testing import tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", family)
    outs = {m: tmp_path / m for m in ("whole", "blocks")}
    for m, out in outs.items():
        rc, _, se = _run(capsys, "compress", "--model", src, "--pattern", "2:4", *RECOVER, "--calib", calib_txt,
                         "--out", out, "--onload", m, *CHEAP, "--eval", "none")
        assert rc == 0, se
    a, b = _tensors(outs["whole"]), _tensors(outs["blocks"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((outs[m] / "llmprune.json").read_text()) for m in ("whole", "blocks"))
    assert ma["recover"]["losses"] == mb["recover"]["losses"]
    assert ma["recover"]["adapted_linears"] == mb["recover"]["adapted_linears"] == ma["sparsity"]["linears"]
    assert mb["sparsity"]["measured_after_recover"] == 0.5


# experts stored per expert, fused in memory (DeepSeek-V3 and GLM-4.5: block 0 dense, 1 and 2 Mixture-of-Experts)
CONVERTED = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "glm4_moe", "qwen3_next", "minimax_m2")


@pytest.mark.parametrize("family", CONVERTED)
@pytest.mark.parametrize("into_place", [True, False])
def test_a_block_of_experts_reads_and_writes_as_transformers_does(tmp_path, family, into_place, monkeypatch):
    """A Mixture-of-Experts checkpoint stores one linear per expert; transformers' whole load fuses them
    (the oracle: from_pretrained's tensors), save_pretrained splits them again (the oracle: the files it
    wrote). One block read from disk holds exactly the first, and writes back exactly the second; read into
    place row by row (the default) or converted as a whole (what a conversion that moves more than rows gets)."""
    from transformers import AutoModelForCausalLM

    from llmprune import lazy, stored
    from llmprune.testing import tiny_model_dir

    if not into_place:
        monkeypatch.setattr(stored, "rows_of", lambda model, memory, parts: None)
    src = tiny_model_dir(tmp_path / "m", family)
    whole = AutoModelForCausalLM.from_pretrained(src).state_dict()
    files = _tensors(src)
    lz = lazy.LazyModel(src, torch.float32)
    assert lz.unreadable() is None
    prefix = "model.layers.1."
    lz.load(prefix)
    block = {n: t for n, t in lz.model.state_dict().items() if n.startswith(prefix)}
    assert any(t.dim() == 3 for t in block.values())  # fused experts
    assert set(block) == {n for n in whole if n.startswith(prefix)}
    for n, t in block.items():
        assert torch.equal(t, whole[n]), n
    back = stored.to_stored(lz.model, block)
    assert set(back) == {k for k in files if k.startswith(prefix)} and any(".experts.3." in k for k in back)
    for k, t in back.items():
        assert torch.equal(t, files[k]), k
    lz.release(prefix)
    assert all(t.device.type == "meta" for n, t in lz.model.state_dict().items() if n.startswith(prefix))


@pytest.mark.parametrize("family", CONVERTED)
def test_experts_are_read_into_place_one_stored_tensor_at_a_time(tmp_path, family, monkeypatch):
    """A block's fused expert tensors are allocated once and every stored expert linear is copied into its
    rows as it is read: no earlier expert tensor read is alive when the next is read (converting them all at
    once held every one of them beside the fused copy: the block's experts twice)."""
    import weakref

    from llmprune import lazy
    from llmprune.testing import tiny_model_dir

    lz = lazy.LazyModel(tiny_model_dir(tmp_path / "m", family), torch.float32)
    live, most, reads, get = weakref.WeakSet(), [0], [0], lz.files.get

    def counting_get(name, dtype=None):
        most[0] = max(most[0], len(live))
        t = get(name, dtype)
        if ".experts." in name:
            live.add(t)
            reads[0] += 1
        return t

    monkeypatch.setattr(lz.files, "get", counting_get)
    lz.load("model.layers.1.")
    assert reads[0] >= 3 * 8 and most[0] == 0, (reads, most)


@pytest.mark.parametrize("family", CONVERTED)
def test_experts_are_written_one_stored_tensor_at_a_time(tmp_path, capsys, family, monkeypatch):
    """The dense output cuts a block's fused experts into their stored linears one at a time: no expert tensor
    handed to the writer is alive when the next is handed over (reverting them all at once held every split
    copy beside the block), and the files hold what the whole load's save_pretrained writes."""
    import weakref

    from llmprune import lazy
    from llmprune.testing import tiny_model_dir

    live, most, adds, add = weakref.WeakSet(), [0], [0], lazy.ShardWriter.add

    def counting_add(self, name, tensor):
        if ".experts." in name:
            most[0] = max(most[0], len(live))
            live.add(tensor)
            adds[0] += 1
        add(self, name, tensor)

    src = tiny_model_dir(tmp_path / "m", family)
    for mode in ("whole", "blocks"):
        with monkeypatch.context() as m:
            if mode == "blocks":
                m.setattr(lazy.ShardWriter, "add", counting_add)
            rc, _, se = _run(capsys, "compress", "--model", src, "--solver", "magnitude", "--onload", mode,
                             "--out", tmp_path / mode, *FAST_CLI)
        assert rc == 0, se
    assert adds[0] >= 2 * 3 * 8 and most[0] == 0, (adds, most)
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("onload", ["whole", "blocks"])
def test_hessians_collected_a_run_at_a_time_are_recorded(tmp_path, capsys, calib_txt, onload):
    """Under a Hessian budget of 0 (--hessian-gib 0) every Hessian of a block is its own run (tests/
    test_walker.py: to the same weights); the manifest says how many runs beyond one a group there were: per
    block of tiny Qwen3-MoE q, k, v apart (2), 8 experts' gate+up (7), 8 downs (7). Without the flag: one run a
    group, the same files."""
    from llmprune.testing import tiny_model_dir

    src = tiny_model_dir(tmp_path / "m", "qwen3_moe")
    rc, _, se = _run(capsys, "compress", "--model", src, "--solver", "sparsegpt", "--calib", calib_txt,
                     "--onload", onload, "--out", tmp_path / "o", "--hessian-gib", "0", *FAST_CLI)
    assert rc == 0, se
    m = json.loads((tmp_path / "o" / "llmprune.json").read_text())
    assert m["hessian_runs"] == {"budget_gib": 0.0, "extra": 2 * (2 + 7 + 7)} and m["onload"].startswith(onload)
    rc, _, se = _run(capsys, "compress", "--model", src, "--solver", "sparsegpt", "--calib", calib_txt,
                     "--onload", onload, "--out", tmp_path / "d", *FAST_CLI)  # the default budget: one run a group
    assert rc == 0, se
    assert "hessian_runs" not in json.loads((tmp_path / "d" / "llmprune.json").read_text())
    a, b = _tensors(tmp_path / "o"), _tensors(tmp_path / "d")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_moe_blocks_from_disk_compute_and_write_what_the_whole_model_does(tmp_path, capsys, calib_txt, family,
                                                                          monkeypatch):
    """Compressed block by block (read ahead or not), a Mixture-of-Experts model gives the whole load's
    output file for file: the same per-expert tensor names save_pretrained writes, the same values."""
    from llmprune import lazy
    from llmprune.testing import tiny_model_dir

    src = tiny_model_dir(tmp_path / "m", family)
    outs = {}
    for mode in ("whole", "blocks", "ahead"):
        outs[mode] = tmp_path / mode
        with monkeypatch.context() as m:
            m.setattr(lazy, "READ_AHEAD", mode == "ahead")
            rc, _, se = _run(capsys, "compress", "--model", src, "--solver", "sparsegpt", "--calib", calib_txt,
                             "--out", outs[mode], "--onload", mode.replace("ahead", "blocks"), *CHEAP, *EVAL)
        assert rc == 0, se
    a, b, c = _tensors(outs["whole"]), _tensors(outs["blocks"]), _tensors(outs["ahead"])
    assert set(a) == set(b) == set(c) and "model.layers.1.mlp.experts.7.down_proj.weight" in b
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]), k
    ma, mb = (json.loads((outs[m] / "llmprune.json").read_text()) for m in ("whole", "blocks"))
    assert mb["onload"] == "blocks" and ma["onload"].startswith("whole") and mb["sparsity"] == ma["sparsity"]
    assert mb["eval"]["wikitext2"]["ppl"] == pytest.approx(ma["eval"]["wikitext2"]["ppl"], rel=1e-6)


@pytest.mark.parametrize("family,lost", [("llama", "model.layers.1.mlp.up_proj.weight"),
                                         ("qwen3_moe", "model.layers.1.mlp.experts.5.up_proj.weight")])
@pytest.mark.parametrize("onload", ["blocks", "whole"])
def test_a_tensor_missing_from_the_checkpoint_is_refused(tmp_path, capsys, family, lost, onload):
    """transformers' whole load fills a missing tensor with random values and goes on after a warning; a
    block-by-block read has nothing to read. Either way the run stops in one line and writes nothing."""
    from safetensors.torch import save_file

    from llmprune.testing import tiny_model_dir

    src = tiny_model_dir(tmp_path / "m", family)
    t = load_file(src / "model.safetensors")
    del t[lost]
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    rc, _, se = _run(capsys, "compress", "--model", src, "--onload", onload, "--out", tmp_path / "o", *FAST_CLI)
    err = [ln for ln in se.splitlines() if ln.startswith("llmprune: error:")]
    assert rc == 2 and len(err) == 1 and err[0].endswith("re-create or re-download the folder"), se
    assert f"lacks {lost} (and 0 more)" in se or (family != "llama" and onload == "whole"), se
    assert not (tmp_path / "o").exists()


SLICES = [("per-block", False, True, "llama"), ("per-block", True, False, "llama"), ("shared", False, True, "llama"),
          ("shared", True, False, "llama"), ("per-block", False, False, "qwen2"), ("shared", False, True, "qwen3"),
          ("per-block", True, True, "apertus")]


@pytest.mark.parametrize("rotation,slice_head,tied,family", SLICES,
                         ids=[f"{f}-{r}{'-slicehead' if h else ''}{'-tied' if t else ''}" for r, h, t, f in SLICES])
def test_slicegpt_from_disk_writes_what_the_whole_model_writes(tmp_path, capsys, monkeypatch, calib_txt, rotation,
                                                               slice_head, tied, family):
    """SliceGPT block by block (one block in memory; the embedding rotated before the first block, the head
    with the final norm folded in after the last) writes the whole model's files bit for bit, in shards,
    with its config and manifest, and its output is evaluated block by block (its residual shortcuts walked)
    to the figure the whole load gives. Norm scales and biases (qwen2's q/k/v) are random, so a fold left out
    or done twice shows; qwen3 normalizes q and k inside its attention; apertus names its norms otherwise and has no
    gate (arch.OVERRIDES)."""
    from llmprune import checkpoint, lazy
    from llmprune.eval.perplexity import perplexity
    from llmprune.lazy import WeightFiles
    from llmprune.testing import byte_tokenizer, tiny_model
    from llmprune.transforms import slicegpt

    model = tiny_model(family, seed=1, tie_word_embeddings=tied, num_hidden_layers=3)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() == 1:  # norms' scales about 1, biases about 0
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3
                        + (1.0 if "norm" in name else 0.0))
    src = tmp_path / "src"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    monkeypatch.setattr(lazy, "SHARD_BYTES", 30_000)
    monkeypatch.setattr(slicegpt, "ROWS", 100)  # the 258 vocabulary rows read, rotated and written in 3 chunks
    how = ["--solver", "slicegpt", "--rotation", rotation, *(["--slice-head"] if slice_head else []),
           "--calib", calib_txt, *CHEAP, *EVAL]
    grad = []  # whether autograd recorded the signals (a graph through every block holds every block: a leak)
    real_add = slicegpt._Cov.add
    for mode in ("whole", "blocks"):
        with monkeypatch.context() as m:
            most = hold_one_block(m) if mode == "blocks" else [1]
            m.setattr(slicegpt._Cov, "add", lambda self, x: grad.append(x.requires_grad) or real_add(self, x))
            rc, _, se = _run(capsys, "compress", "--model", src, *how, "--onload", mode, "--out", tmp_path / mode)
        assert rc == 0 and most[0] == 1, se
    assert grad and not any(grad)
    wa, wb = (WeightFiles(tmp_path / m) for m in ("whole", "blocks"))
    names = wa.keys()
    assert sorted(names) == sorted(wb.keys()) and all(torch.equal(wa.get(k), wb.get(k)) for k in names)
    assert len(list((tmp_path / "blocks").glob("*.safetensors"))) > 1
    ca, cb = (json.loads((tmp_path / m / "config.json").read_text()) for m in ("whole", "blocks"))
    assert ca == cb and ca["tie_word_embeddings"] is False and ca["hidden_size"] < 64
    ma, mb = (json.loads((tmp_path / m / "llmprune.json").read_text()) for m in ("whole", "blocks"))
    assert mb["onload"] == "blocks" and ma["onload"] == "whole: --onload whole"
    assert ma["slicegpt"] == mb["slicegpt"] and mb["slicegpt"]["untied_head"] is tied
    ea, eb = ma["eval"]["wikitext2"], mb["eval"]["wikitext2"]
    assert eb["blockwise"] and eb["ppl"] == ea["ppl"] and eb["dense_ppl"] == pytest.approx(ea["dense_ppl"], rel=1e-6)
    model, tok, _ = checkpoint.load(tmp_path / "blocks")  # the whole load, as a user's
    whole = perplexity(model, tok, "wikitext2", 64, 2, progress=False)["ppl"]
    assert eb["ppl"] == pytest.approx(whole, rel=1e-6)


def test_slicegpt_from_disk_refuses_tensors_it_would_not_write(tmp_path, capsys, monkeypatch, tiny_dir, calib_txt):
    """A family with a tensor outside the blocks besides the embedding, final norm and head (which the pass would not
    rotate) is refused before any work, in one line naming it; nothing is written."""
    from llmprune import onload_slicegpt

    real = onload_slicegpt.on_meta

    def with_extra(cfg, dtype=None):
        m = real(cfg, dtype)
        m.model.register_parameter("extra", torch.nn.Parameter(torch.empty(3, device="meta")))
        return m

    monkeypatch.setattr(onload_slicegpt, "on_meta", with_extra)  # the sliced output's plan only
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--solver", "slicegpt", "--calib", calib_txt,
                     "--onload", "blocks", "--out", tmp_path / "o", *FAST_CLI)
    err = [ln for ln in se.splitlines() if ln.startswith("llmprune: error:")]
    assert rc == 2 and len(err) == 1 and "model.extra" in err[0] and err[0].endswith("use --onload whole"), se
    assert list(tmp_path.iterdir()) == []


def test_a_packed_slicegpt_output_loads_with_its_shortcuts_dense(tmp_path, capsys, tiny_dir, calib_txt):
    """A per-block SliceGPT output packed (`llmprune pack`, or `compress --format`, which slices in memory) keeps its
    residual shortcuts dense (small basis changes on the stream every later block reads; they were quantized, and
    the packed folder then failed to load: its config has no shortcut linears) and loads and evaluates; both ways
    write the same tensors."""
    from llmprune import checkpoint
    from llmprune.modules import PackedLinear

    how = ["--solver", "slicegpt", "--calib", calib_txt, *FAST_CLI]
    ev = ["--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
    assert _run(capsys, "compress", "--model", tiny_dir, *how, "--out", tmp_path / "dense")[0] == 0
    rc, _, se = _run(capsys, "pack", tmp_path / "dense", "--format", "w4g128", "--group-size", "16", *ev, "--no-progress",
                     "--out", tmp_path / "packed")
    assert rc == 0, se
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, *how, "--format", "w4g128", "--group-size", "16",
                     "--out", tmp_path / "direct")
    assert rc == 0, se
    a, b = _tensors(tmp_path / "packed"), _tensors(tmp_path / "direct")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.attn_shortcut.weight"].dtype == torch.float16  # dense, in the packed formats' float dtype
    model, _, man = checkpoint.load(tmp_path / "packed")
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)
    assert not isinstance(model.model.layers[0].attn_shortcut, PackedLinear)
    assert 1 < man["eval"]["wikitext2"]["ppl"] < 1e4


def test_slicegpt_stopped_midway_leaves_nothing(tmp_path, capsys, monkeypatch, tiny_dir, calib_txt):
    """SIGTERM (or Ctrl-C) in the middle of SliceGPT's pass from disk, before its first checkpoint, removes the
    output's temporary folder, says so in one line and exits 143; the folder asked for is not there."""
    import signal

    from llmprune import onload_slicegpt

    real = onload_slicegpt.SlicedOutput.done

    def done(self, i, block, state):
        real(self, i, block, state)
        if i == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(onload_slicegpt.SlicedOutput, "done", done)
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--solver", "slicegpt", "--calib", calib_txt,
                     "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 143 and se.strip().splitlines()[-1] == "llmprune: terminated (SIGTERM); the output being written was not", se
    assert list(tmp_path.iterdir()) == []


def test_slicegpt_keeps_the_sources_dtype(tmp_path, capsys, monkeypatch, calib_txt):
    """A SliceGPT output is stored in the source's dtype (--save-dtype auto; it was the compute dtype, a bf16
    model sliced on the CPU came out twice its size), from disk (the vocabulary rows read a chunk at a time,
    converted to the compute dtype) as whole."""
    from llmprune.testing import byte_tokenizer, tiny_model
    from llmprune.transforms import slicegpt

    monkeypatch.setattr(slicegpt, "ROWS", 70)

    src = tmp_path / "bf16"
    tiny_model("llama", 1, dtype=torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    how = ["--solver", "slicegpt", "--calib", calib_txt, *FAST_CLI]
    for mode in ("whole", "blocks"):
        rc, _, se = _run(capsys, "compress", "--model", src, *how, "--onload", mode, "--out", tmp_path / mode)
        assert rc == 0, se
        assert {t.dtype for t in _tensors(tmp_path / mode).values()} == {torch.bfloat16}
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rc, _, se = _run(capsys, "compress", "--model", src, *how, "--save-dtype", "float32", "--out", tmp_path / "f32")
    assert rc == 0 and {t.dtype for t in _tensors(tmp_path / "f32").values()} == {torch.float32}


@pytest.mark.parametrize("then", [["--format", "w4g128", "--group-size", "16"],
                                  ["--format", "w4g128", "--group-size", "16", "--quant", "gptq"],
                                  ["--recover", "perp", "--recover-steps", "2"],
                                  ["--recover", "perp", "--recover-steps", "2", "--format", "w4g128", "--group-size",
                                   "16", "--quant", "gptq"]],
                         ids=["rtn", "gptq", "perp", "perp-gptq"])
def test_slicegpt_then_packing_or_perp_from_disk_writes_what_the_whole_model_writes(tmp_path, capsys, monkeypatch,
                                                                                    tiny_dir, calib_txt, then):
    """SliceGPT followed by a packed format (RTN, GPTQ) or PERP, from disk: sliced into a scratch folder in the
    compute dtype, which packing reads one block at a time (PERP: each block straight to where it trains), as
    `llmprune pack` / `recover` read a saved output; the same files and manifest sections as slicing, training and
    packing the whole model in memory, the scratch folders gone, the packed output evaluated block by block;
    `pack` and `recover` of a saved SliceGPT output from disk write the same as the whole load's."""
    base = ["--solver", "slicegpt", "--calib", calib_txt, *CHEAP, *EVAL, "--no-dense-eval"]
    how = [*base, *then]
    perp = "--recover" in then
    for mode in ("whole", "blocks"):
        with monkeypatch.context() as m:
            most = hold_one_block(m, None if perp else 1) if mode == "blocks" else [1]
            rc, so, se = _run(capsys, "compress", "--model", tiny_dir, *how, "--onload", mode, "--out", tmp_path / mode)
        assert rc == 0 and (perp or most[0] == 1), se
        assert "ppl: of the saved output, read block by block from its files" in so  # (either way: the saved folder)
        assert sorted(p.name for p in (tmp_path / mode).iterdir() if p.name.startswith(".")) == []
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((tmp_path / m / "config.json").read_text()) for m in ("whole", "blocks"))
    assert ca == cb
    ma, mb = (json.loads((tmp_path / m / "llmprune.json").read_text()) for m in ("whole", "blocks"))
    assert mb["onload"] == "blocks" and ma["steps"] == mb["steps"] and ma["steps"][0] == "slice"
    timed = ("wall_s", "seconds", "tokens_per_s", "samples_per_s")
    strip = lambda d: {x: y for x, y in d.items() if x not in timed} if isinstance(d, dict) else d
    for k in ("slicegpt", "format", "recover"):
        assert strip(ma.get(k)) == strip(mb.get(k)), k
    assert ("recover" in ma) == perp and ((ma.get("format") or {}).get("name") == "w4g128") == ("--format" in then)
    if perp:  # no zeros to keep: every linear of the blocks adapted (LoRA), its shortcuts left alone
        assert ma["recover"]["adapted_linears"] == 7 * 2
    assert mb["eval"]["wikitext2"]["ppl"] == ma["eval"]["wikitext2"]["ppl"] and mb["eval"]["wikitext2"]["blockwise"]
    if not perp and "gptq" not in then:  # a saved SliceGPT output packed and retrained from disk
        assert _run(capsys, "compress", "--model", tiny_dir, *base, "--out", tmp_path / "sliced")[0] == 0
        rec = ["--steps", "2", "--data", calib_txt, "--nsamples", "4", "--seqlen", "32", "--no-progress"]
        for mode in ("whole", "blocks"):
            with monkeypatch.context() as m:
                most = hold_one_block(m) if mode == "blocks" else [1]
                rc, _, se = _run(capsys, "pack", tmp_path / "sliced", *then, "--quant", "gptq", "--calib", calib_txt,
                                 "--nsamples", "4", "--seqlen", "32", "--no-progress", "--onload", mode,
                                 "--out", tmp_path / f"pack-{mode}")
            assert rc == 0 and most[0] == 1, se
            rc, _, se = _run(capsys, "recover", tmp_path / "sliced", *rec, "--onload", mode,
                             "--out", tmp_path / f"perp-{mode}")
            assert rc == 0, se
        for x in ("pack", "perp"):
            a, b = _tensors(tmp_path / f"{x}-whole"), _tensors(tmp_path / f"{x}-blocks")
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), x
            assert json.loads((tmp_path / f"{x}-blocks" / "llmprune.json").read_text())["onload"] == "blocks"


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_global_magnitude_from_disk_holds_one_block_and_prunes_as_the_whole_model(tmp_path, capsys, monkeypatch,
                                                                                  family):
    """--scope global ranks every weight of the model at once, but reads them a block at a time (the radix
    select's passes, one block in memory; experts through their views): the same files as the whole model's."""
    from llmprune.testing import hold_one_block, tiny_model_dir

    src = tiny_model_dir(tmp_path / "m", family, num_hidden_layers=3)
    args = ["--solver", "magnitude", "--scope", "global", "--sparsity", "0.6", *FAST_CLI]
    for mode in ("whole", "blocks"):
        with monkeypatch.context() as m:
            most = hold_one_block(m) if mode == "blocks" else [None]
            rc, _, se = _run(capsys, "compress", "--model", src, "--onload", mode, "--out", tmp_path / mode, *args)
        assert rc == 0 and most[0] in (None, 1), se
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sp = [json.loads((tmp_path / x / "llmprune.json").read_text())["sparsity"]["measured"] for x in ("whole", "blocks")]
    assert sp[0] == sp[1] == pytest.approx(0.6, abs=1e-4)


def test_a_nan_in_a_block_read_from_disk_is_named(tmp_path, capsys):
    from llmprune.testing import tiny_model, tiny_model_dir

    src = tiny_model_dir(tmp_path / "m", seed=5)
    m = tiny_model(seed=5)
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    m.save_pretrained(src)
    rc, _, se = _run(capsys, "compress", "--model", src, "--onload", "blocks", "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and "model.layers.1.self_attn.o_proj.weight holds NaN/inf" in se


PEAK = """
import json, sys
from llmprune import api, lazy
lazy.SHARD_BYTES = 20 * 2**20  # shards of about one block: the writer buffers one unfinished shard
from llmprune.runinfo import peak_rss_mib
m = api.compress(model=sys.argv[1], out=sys.argv[2], calib=sys.argv[3], nsamples=2, seqlen=32, calib_batch=2,
                 onload=sys.argv[4], progress=False, eval=())
print(json.dumps({"peak": peak_rss_mib()}))
"""


SHAPES = {  # (preset, overrides, parameters a block): a dense block and a Mixture-of-Experts one of about 17 MB
    "llama": ("llama3-8b", dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
                                vocab_size=1000), 4.2e6),
    "moe": ("qwen3-30b-a3b", dict(hidden_size=256, moe_intermediate_size=320, num_experts=16, num_experts_per_tok=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000), 4.2e6),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_peak_memory_does_not_grow_with_depth(tmp_path, calib_txt, shape, layers=(2, 12)):
    """The same width with 2 and 12 blocks (fp32, about 17 MB a block): loaded whole, the deeper
    model costs its extra weights; walked from disk, nothing, also when each block's experts are stored
    one linear per expert and fused as the block is read. (glibc's dynamic mmap threshold would keep freed
    mid-size tensors, these 4 MB ones, in the heap and let the peak creep; a real model's tensors are above
    its 32 MB maximum and go back to the system: the threshold is fixed here.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from make_synthetic import write

    preset, over, per_block = SHAPES[shape]
    peaks = {}
    modes = ("whole", "blocks") if shape == "llama" else ("blocks",)  # (the whole load's growth shown once)
    for n in layers:
        src = write(tmp_path / f"m{n}", preset, "float32", seed=0, num_hidden_layers=n, **over)
        for mode in modes:
            out = subprocess.run([sys.executable, "-c", PEAK, str(src), str(tmp_path / f"o{n}{mode}"), str(calib_txt),
                                  mode], capture_output=True, text=True, check=False, timeout=600,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
            assert out.returncode == 0, out.stderr[-2000:]
            peaks[(n, mode)] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    extra_blocks_mib = (layers[1] - layers[0]) * per_block * 4 / 2**20  # 10 blocks of 4.2M fp32 parameters
    grow_blocks = peaks[(layers[1], "blocks")] - peaks[(layers[0], "blocks")]
    if "whole" in modes:  # (the measure sees the deeper model's weights where they are held)
        assert peaks[(layers[1], "whole")] - peaks[(layers[0], "whole")] > 0.5 * extra_blocks_mib, peaks
    assert grow_blocks < 0.1 * extra_blocks_mib, peaks


def test_shard_writer_writes_at_offsets_and_streams_copies(tmp_path, monkeypatch):
    """Tensors arrive in any order and go straight to their offsets; `copy` streams a source tensor
    in small chunks converting its dtype; safetensors reads every shard back exactly."""
    from safetensors.torch import save_file

    from llmprune import lazy

    g = torch.Generator().manual_seed(0)
    src = {"emb": torch.randn(37, 16, generator=g).to(torch.bfloat16), "head": torch.randn(37, 16, generator=g)}
    save_file(src, str(tmp_path / "src.safetensors"))
    blocks = {f"b.{i}.w": torch.randn(8, 16, generator=g) for i in range(3)}
    extra = {"b.1.mask": torch.rand(8, 16, generator=g) > 0.5, "b.2.idx": torch.arange(5, dtype=torch.int32)}
    out = tmp_path / "out"
    out.mkdir()
    specs = [("emb", (37, 16), torch.float32), *[(n, tuple(t.shape), torch.bfloat16) for n, t in blocks.items()],
             *[(n, tuple(t.shape), t.dtype) for n, t in extra.items()], ("head", (37, 16), torch.float16)]

    def unit(n):
        return int(n.split(".")[1]) if n.startswith("b.") else None

    monkeypatch.setattr(lazy, "COPY_CHUNK", 96)  # many chunks, not a multiple of the rows
    w = lazy.ShardWriter(out, specs, unit, shard_bytes=1200)
    for n in ("b.2.idx", "b.2.w", "b.1.mask", "b.0.w", "b.1.w"):  # out of order, blocks split over shards
        w.add(n, (blocks | extra)[n].to(torch.bfloat16) if n in blocks else extra[n])
    w.copy("head", tmp_path / "src.safetensors")
    w.copy("emb", tmp_path / "src.safetensors")
    w.finish()
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 2 and (out / lazy.INDEX).exists()
    got = {}
    for f in files:
        got.update(load_file(str(f)))
    assert torch.equal(got["emb"], src["emb"].float()) and torch.equal(got["head"], src["head"].half())
    for n, t in blocks.items():
        assert torch.equal(got[n], t.to(torch.bfloat16))
    for n, t in extra.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t)
    with pytest.raises(LLMPruneError, match="shard plan"):
        w.add("b.0.w", torch.zeros(3, 3))


def test_shard_writer_copy_holds_one_chunk(tmp_path):
    """Streaming a 512 MiB tensor into an output raises the resident memory by a few chunks, not by
    the tensor (a 70B model's embeddings are 2 GiB; they used to be read whole and buffered)."""
    code = """
import resource, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from llmprune import lazy
d = Path(sys.argv[1])
save_file({"emb": torch.ones(2**17, 1024)}, str(d / "src.safetensors"))  # 512 MiB fp32
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(d / "out").mkdir()
w = lazy.ShardWriter(d / "out", [("emb", (2**17, 1024), torch.bfloat16)], lambda n: None)
w.copy("emb", d / "src.safetensors")
w.finish()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 200, f"copying 512 MiB raised the peak RSS by {grew} MiB"


@pytest.mark.parametrize("onload", ["blocks", "whole"])
def test_dense_output_keeps_the_sources_stored_dtype(tmp_path, tiny_dir, calib_txt, onload):
    """--save-dtype auto writes a dense output in the dtype the source's files hold (bf16 here), not
    the compute dtype the loaded config says (an 8B bf16 model was written as 32 GB of fp32)."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "bf16"
    shutil.copytree(tiny_dir, src)
    for f in src.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(f)).items()},
                  str(f), metadata={"format": "pt"})
    out = tmp_path / "o"
    assert main(["compress", "--model", str(src), "--calib", str(calib_txt), "--out", str(out), "--onload", onload,
                 *FAST_CLI]) == 0
    got = {t.dtype for f in out.glob("*.safetensors") for t in load_file(str(f)).values() if t.is_floating_point()}
    assert got == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_trim_heap_returns_fragmented_heap_memory():
    """The mechanism behind the per-block trim (runinfo.trim_heap, lazy.py): after a large free glibc
    serves 256 KiB tensors from the heap; freeing all but the last leaves them resident until a trim."""
    import os
    import subprocess
    import sys

    code = """
import torch
from llmprune.runinfo import trim_heap
def anon():
    return int([l for l in open("/proc/self/status") if l.startswith("RssAnon")][0].split()[1]) // 1024
big = torch.ones(4 << 20)  # 16 MiB, mmapped; freeing it raises glibc's mmap threshold to 16 MiB
del big
ts = [torch.ones(1 << 16) for _ in range(1200)]  # 1200 x 256 KiB, now from the heap
keep = ts[-1]
del ts
before = anon()
trim_heap()
print(before - anon())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    freed = int(out.stdout.strip().splitlines()[-1])
    assert freed > 200, f"trim_heap returned only {freed} MiB of the ~300 MiB freed in the heap"


# --- pack and export read the source one block at a time -----------------------------------------------

@pytest.fixture(scope="module")
def sharded_24(tmp_path_factory, tiny_dir, calib_txt):
    """The tiny model pruned 2:4 (SparseGPT), written in several shards."""
    from llmprune import lazy

    out = tmp_path_factory.mktemp("s24") / "src"
    old, lazy.SHARD_BYTES = lazy.SHARD_BYTES, 30_000
    try:
        assert main([str(a) for a in ("compress", "--model", tiny_dir, "--solver", "sparsegpt", "--pattern", "2:4",
                                      "--calib", calib_txt, "--out", out, *FAST_CLI)]) == 0
    finally:
        lazy.SHARD_BYTES = old
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


PACKS = [("sparse24", []), ("w4s24", ["--group-size", "32"]), ("w4g128", ["--quant", "gptq", "--group-size", "32"]),
         ("w4s24", ["--quant", "gptq", "--group-size", "32", "--act-order"])]


@pytest.mark.parametrize("fmt,extra", PACKS, ids=[f"{f}-{'gptq' if '--quant' in e else 'rtn'}" for f, e in PACKS])
def test_pack_reads_one_block_at_a_time_and_writes_what_the_whole_load_writes(tmp_path, capsys, sharded_24,
                                                                              calib_txt, fmt, extra, monkeypatch):
    gptq = ["--calib", calib_txt, "--nsamples", "4", "--seqlen", "32"] if "gptq" in extra else []
    outs = {}
    rc, _, se = _run(capsys, "pack", sharded_24, "--format", fmt, *extra, *gptq, "--onload", "whole",
                     "--out", tmp_path / "whole", "--no-progress")
    assert rc == 0, se
    outs["whole"] = tmp_path / "whole"
    with monkeypatch.context() as m:
        most = hold_one_block(m)
        rc, _, se = _run(capsys, "pack", sharded_24, "--format", fmt, *extra, *gptq, "--out", tmp_path / "blocks",
                         "--no-progress")
        assert rc == 0, se
        assert most[0] == 1
    outs["blocks"] = tmp_path / "blocks"
    a, b = _tensors(outs["whole"]), _tensors(outs["blocks"])
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    fa, fb = (json.loads((outs[x] / "llmprune.json").read_text())["format"] for x in ("whole", "blocks"))
    fa["bytes"].pop("file"), fb["bytes"].pop("file")  # (the files' sizes: the same tensors, other shard headers)
    assert fa == fb


TUNE = ["--quant", "gptq", "--tune-steps", "4", "--tune-lr", "5e-3", "--nsamples", "4", "--seqlen", "32"]


@pytest.mark.parametrize("fmt,group", [("w4s24", "32"), ("w4g128", "16")])
def test_pack_scale_tuning_from_disk_writes_what_the_whole_load_writes(tmp_path, capsys, sharded_24, calib_txt, fmt,
                                                                       group, monkeypatch):
    """GPTQ's scale tuning without the source loaded whole: the teacher walks the blocks, GPTQ keeps each
    block's codes on disk, the tuning reads the model to where it trains with every quantized linear as
    its codes (its dense weight is read twice in all: teacher and GPTQ, never for the tuning). Same
    tensors bit for bit, the same KL figures and the same kept scales as the whole load."""
    from llmprune import lazy

    args = ["--format", fmt, "--group-size", group, *TUNE, "--calib", calib_txt, "--no-progress"]
    rc, _, se = _run(capsys, "pack", sharded_24, *args, "--onload", "whole", "--out", tmp_path / "whole")
    assert rc == 0, se
    reads: dict[str, int] = {}
    real = lazy.WeightFiles.get

    def get(self, name, dtype=None):
        reads[name] = reads.get(name, 0) + 1
        return real(self, name, dtype)

    with monkeypatch.context() as m:
        from llmprune import checkpoint

        m.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("the whole model was loaded"))
        m.setattr(lazy.WeightFiles, "get", get)
        rc, _, se = _run(capsys, "pack", sharded_24, *args, "--out", tmp_path / "blocks")  # auto
    assert rc == 0, se
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((tmp_path / x / "llmprune.json").read_text()) for x in ("whole", "blocks"))
    src = json.loads((sharded_24 / "llmprune.json").read_text())
    assert (ma["onload"], mb["onload"]) == ("whole", "blocks")  # how this pack read its source
    assert ma["history"][-1]["onload"] == mb["history"][-1]["onload"] == src["onload"]  # and how compress did
    fa, fb = ma["format"], mb["format"]
    ta, tb = fa["quant_options"].pop("tune"), fb["quant_options"].pop("tune")
    assert tb["kept"] == "tuned" and tb["kl_after"] < tb["kl_before"]
    for k in ("kl_before", "kl_after", "kept", "steps", "windows"):
        assert ta[k] == tb[k], k
    assert tb["placement"]["streamed_blocks"] == 0 and tb["placement"]["devices"] == ["cpu"]
    fa["bytes"].pop("file"), fb["bytes"].pop("file")
    assert fa == fb
    layers = fb["layers"]
    assert layers and all(reads[f"{n}.weight"] == 2 for n in layers)  # the teacher's and GPTQ's reads
    norms = [n for n in reads if "layernorm" in n]
    assert norms and all(reads[n] == 3 for n in norms)  # and the tuning's
    assert not list((tmp_path / "blocks").glob(".*")), "scratch folders left behind"


def test_pack_scale_tuning_from_disk_that_fails_leaves_nothing(tmp_path, capsys, sharded_24, calib_txt, monkeypatch):
    """A tuning that fails once the model is placed (here: faked) exits 2 with its one-line message and leaves
    no output folder, no temporary sibling (without checkpoints: with them, the folder and its teacher's states and
    GPTQ's codes are kept, as after any failure past a checkpoint: tests/test_resume.py), and the lazy model's meta
    structure back as it was."""
    from llmprune import onload
    from llmprune.errors import LLMPruneError
    from llmprune.quant import tune

    seen = {}

    def fail(model, *a, **k):
        seen["model"] = model
        raise LLMPruneError("scale tuning diverged (non-finite scales): lower --tune-lr, e.g. 3e-4")

    monkeypatch.setattr(tune, "train", fail)
    real = onload.tune_placed

    def spy(lz, *a, **k):
        seen["lz"] = lz
        return real(lz, *a, **k)

    monkeypatch.setattr(onload, "tune_placed", spy)
    rc, _, se = _run(capsys, "pack", sharded_24, "--format", "w4s24", "--group-size", "32", *TUNE, "--calib", calib_txt,
                     "--no-progress", "--out", tmp_path / "o", "--checkpoint-every", "off")
    assert rc == 2 and "lower --tune-lr" in se and len(se.strip().splitlines()) == 1, se
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    model = seen["lz"].model
    assert not [n for n, m in model.named_modules() if isinstance(m, tune.ScaledLinear)]  # the linears restored
    assert all(t.device.type == "meta" for t in [*model.parameters()])  # every weight let go


def test_pack_scale_tuning_from_disk_split_over_devices_or_streamed(tmp_path, capsys, sharded_24, calib_txt,
                                                                    monkeypatch):
    """The tuning's plan, made on the meta device, puts each block where it trains: one block on each of two
    devices (budgets faked to hold the embedding and head plus one block), or every block streamed from CPU
    memory (budgets of the embedding and head alone); the scales and the files are the whole load's."""
    from llmprune import placement

    args = ["--format", "w4s24", "--group-size", "32", *TUNE, "--calib", calib_txt, "--no-progress"]
    rc, _, se = _run(capsys, "pack", sharded_24, *args, "--onload", "whole", "--out", tmp_path / "whole")
    assert rc == 0, se
    want = _tensors(tmp_path / "whole")
    t0 = json.loads((tmp_path / "whole" / "llmprune.json").read_text())["format"]["quant_options"]["tune"]
    gib, base, block = placement.GiB, t0["placement"]["base_gib"], t0["placement"]["block_gib"]
    for name, devices, room, resident, streamed in [
            ("split", "cpu,cpu:0", [(base + 1.5 * block) * gib, 1.5 * block * gib], {"cpu": 1, "cpu:0": 1}, 0),
            ("streamed", "cpu", [1.2 * base * gib], {"cpu": 0}, 2)]:
        with monkeypatch.context() as m:
            m.setattr(placement, "budgets", lambda devs, *a, room=room, **k: room)
            rc, _, se = _run(capsys, "pack", sharded_24, *args, "--onload", "blocks", "--device", devices,
                             "--out", tmp_path / name)
        assert rc == 0, se
        t = json.loads((tmp_path / name / "llmprune.json").read_text())["format"]["quant_options"]["tune"]
        assert t["placement"]["resident_blocks"] == resident and t["placement"]["streamed_blocks"] == streamed, name
        assert (t["kl_before"], t["kl_after"], t["kept"]) == (t0["kl_before"], t0["kl_after"], t0["kept"]), name
        got = _tensors(tmp_path / name)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name


def test_pack_and_export_record_their_own_peak_memory(tmp_path, capsys, sharded_24, monkeypatch):
    """A packed or exported folder's manifest gives the memory of the command that wrote it and its time
    (beside the source's timings), not the compress run's peak (that stays in the source's manifest)."""
    from llmprune import runinfo

    monkeypatch.setattr(runinfo, "peak_rss_mib", lambda: 4242.0)
    rc, _, se = _run(capsys, "pack", sharded_24, "--format", "sparse24", "--out", tmp_path / "p", "--no-progress")
    assert rc == 0, se
    rc, _, se = _run(capsys, "export", sharded_24, "--to", "gguf", "--type", "f16", "--out", tmp_path / "g",
                     "--no-progress")
    assert rc == 0, se
    src = json.loads((sharded_24 / "llmprune.json").read_text())
    for out, step in (("p", "pack"), ("g", "export")):
        m = json.loads((tmp_path / out / "llmprune.json").read_text())
        assert m["peak_rss_mib"] == 4242.0 != src["peak_rss_mib"]
        assert m["timings"][step]["total_s"] > 0 and m["timings"]["compress_s"] == src["timings"]["compress_s"]


# --- reading ahead: the next block read on a background thread while a block computes ----------------------

def _gets(m) -> list[tuple]:
    """Every WeightFiles.get call from here on, as (name, dtype, the thread that made it)."""
    import threading

    from llmprune import lazy

    calls, real = [], lazy.WeightFiles.get

    def get(self, name, dtype=None):
        calls.append((name, dtype, threading.current_thread().name))
        return real(self, name, dtype)

    m.setattr(lazy.WeightFiles, "get", get)
    return calls


def test_weight_files_convert_chunk_by_chunk(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from llmprune import lazy

    t = torch.randn(37, 11, dtype=torch.float64).to(torch.bfloat16)
    save_file({"w": t, "i": torch.arange(7, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(lazy, "COPY_CHUNK", 96)  # 48 values a chunk: 9 chunks, the last one short
    files = lazy.WeightFiles(tmp_path)
    for dt in (torch.float32, torch.float16, None):
        got = files.get("w", dt)
        assert got.dtype == (dt or torch.bfloat16) and torch.equal(got, t.to(got.dtype))
    assert torch.equal(files.get("i", torch.float32), torch.arange(7, dtype=torch.int32))  # not a float: as stored
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(LLMPruneError, match="truncated"):
        lazy.WeightFiles(tmp_path).get("w", torch.float32)


@pytest.mark.parametrize("fmt", ["dense", "w4s24"])
def test_read_ahead_reads_what_the_load_reads(tmp_path, capsys, pruned_24, fmt, monkeypatch):
    """`_reads(prefix)` is what `load(prefix)` asks the files for: a dense block's tensors in the compute
    dtype, a packed block's parts as stored."""
    from llmprune import lazy, onload
    from llmprune import manifest as mf

    folder = pruned_24
    if fmt != "dense":
        folder = tmp_path / "p"
        rc, _, se = _run(capsys, "pack", pruned_24, "--format", fmt, "--group-size", "32", "--out", folder,
                         "--no-progress")
        assert rc == 0, se
    lz, _ = onload.open_output(folder, "float32", mf.read(folder).to_dict())
    with monkeypatch.context() as m:
        m.setattr(lazy, "READ_AHEAD", False)
        calls = _gets(m)
        lz.load("model.layers.1.")
    reads = lz._reads("model.layers.1.")
    assert sorted((n, str(d)) for n, d, _ in calls) == sorted((n, str(d)) for n, d in reads)
    assert len(reads) == len(calls) > 0 and (fmt == "dense") == all(d == torch.float32 for _, d in reads)


def test_a_walk_reads_every_block_ahead_once(tiny_dir, monkeypatch):
    """Blockwise perplexity reading ahead (READ_AHEAD True; by default only walks on a GPU do): every
    block's tensors are read on the reader thread (block 0 while the embeddings run), each once; the
    figure is the one without reading ahead; nothing stays pending."""
    from transformers import AutoTokenizer

    from llmprune import lazy, onload

    assert lazy.reads_ahead("cuda:1") and not lazy.reads_ahead("cpu")  # the default, "gpu"
    lz, tok = lazy.LazyModel(tiny_dir, torch.float32), AutoTokenizer.from_pretrained(tiny_dir)
    figures, threads = {}, {}
    for mode in (True, "gpu"):
        with monkeypatch.context() as m:
            m.setattr(lazy, "READ_AHEAD", mode)
            calls = _gets(m)
            figures[mode] = onload.evaluate(lz, tok, ["wikitext2"], 64, 2, "cpu", False, {})["wikitext2"]["ppl"]
        blocks = [c for c in calls if c[0].startswith("model.layers.")]
        assert len({n for n, _, _ in blocks}) == len(blocks) == len(lz.names("model.layers."))
        threads[mode] = {t.split("_")[0] for _, _, t in blocks}
        assert lz._ahead is None
    assert threads == {True: {"llmprune-read-ahead"}, "gpu": {"MainThread"}}
    assert figures[True] == figures["gpu"]


def test_a_read_ahead_gives_way_to_a_changed_file_and_to_a_failed_read(tiny_dir, tmp_path, monkeypatch):
    """A tensor overlaid by a scratch file after it was read ahead is read again from there; a read
    ahead that failed is read again by the load (which raises what it raises)."""
    from llmprune import lazy, onload

    prefix, name = "model.layers.1.", "model.layers.1.mlp.up_proj.weight"
    lz = lazy.LazyModel(tiny_dir, torch.float32)
    want = {n: lz.files.get(n, torch.float32) for n in lz.names(prefix)}
    scratch = onload.Scratch(lz, tmp_path)
    lz.read_ahead(prefix)
    lz._ahead[2].result()
    scratch._keep({name: torch.full_like(want[name], 0.5)}, "changed")
    with monkeypatch.context() as m:
        calls = _gets(m)
        lz.load(prefix)
    assert [n for n, _, _ in calls] == [name]  # the rest came from the read-ahead
    assert bool((lz.model.get_parameter(name) == 0.5).all())
    lz.release(prefix)
    scratch.close()

    def fail(*a, **k):
        raise OSError("disk gone")

    with monkeypatch.context() as m:
        m.setattr(lazy.WeightFiles, "get", fail)
        lz.read_ahead(prefix)
        with pytest.raises(OSError):
            lz._ahead[2].result()
    lz.load(prefix)
    assert all(torch.equal(lz.model.get_parameter(n), t) for n, t in want.items())


def test_evaluation_passes_are_sized_by_the_room_a_walk_has(tiny_dir, monkeypatch):
    """onload.eval_budget: 2 GiB of hidden states on the CPU; on a GPU what a walk keeps there (its inputs and
    outputs within walker.ACTIVATIONS_ON_DEVICE of the memory), so a 70B model's WikiText-2 walks its blocks
    once, not three times. Perplexity walks the windows in passes of that size, to the same figure."""
    from transformers import AutoTokenizer

    from llmprune import lazy, onload, walker

    class H100:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: H100)
    assert onload.eval_budget("cpu") == onload.EVAL_ACTIVATIONS
    budget = onload.eval_budget("cuda:0")
    assert budget == 10 * 2**30
    assert budget // (2048 * 8192 * 2) >= 141  # Llama-3-70B, bf16: WikiText-2's 141 windows in one pass
    lz = lazy.LazyModel(tiny_dir, torch.float32)
    tokens = budget // (lz.config.hidden_size * 4)
    for n, home in ((tokens, "cuda:0"), (tokens + 1, "cpu")):  # the walk keeps exactly that on the GPU
        assert walker.activation_home(lz.model, torch.zeros(1, 1).expand(1, n), "cuda:0") == torch.device(home)
    tok, seqlen = AutoTokenizer.from_pretrained(tiny_dir), 64
    figures, passes = [], []
    real = onload.through_blocks
    monkeypatch.setattr(onload, "through_blocks", lambda *a, **k: passes.append(len(a[1])) or real(*a, **k))
    for windows in (4, 2, 1):  # room for 4, 2 and 1 windows a pass
        monkeypatch.setattr(onload, "eval_budget", lambda d, w=windows: w * seqlen * lz.config.hidden_size * 4)
        figures.append(onload.evaluate(lz, tok, ["wikitext2"], seqlen, 4, "cpu", False, {})["wikitext2"]["ppl"])
    assert passes == [4, 2, 2, 1, 1, 1, 1]
    assert figures[0] == pytest.approx(figures[1], rel=1e-6) and figures[0] == pytest.approx(figures[2], rel=1e-6)


def _llama4_as_released(path: Path) -> Path:
    """A tiny Llama 4 saved as Meta's are (Llama4ForConditionalGeneration: the text model under `language_model.`,
    a vision tower beside it), which AutoModelForCausalLM reads as its text model alone."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from llmprune.testing import byte_tokenizer, tiny_config

    text = tiny_config("llama4_text", tie_word_embeddings=False).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                  pixel_shuffle_ratio=0.5, rope_theta=10000)
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision, boi_token_index=256,
                                                eoi_token_index=257, image_token_index=258)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _base_model_alone(path: Path) -> Path:
    """A tiny Llama's base model saved alone (LlamaModel: `layers.0...`, no `model.` before them)."""
    from llmprune.testing import byte_tokenizer, tiny_model

    tiny_model("llama").model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _renamed(path: Path) -> Path:
    """A tiny Nemotron-H: stored under `backbone.`, which transformers renames `model.` (and its experts fused)."""
    from llmprune.testing import tiny_model_dir

    return tiny_model_dir(path, "nemotron_h")


@pytest.mark.parametrize("make", [_llama4_as_released, _base_model_alone, _renamed])
def test_a_checkpoint_stored_under_other_names_is_walked_block_by_block(tmp_path, capsys, calib_txt, make):
    """transformers reads these with the base model prefix added or dropped (Llama 4 Scout and Maverick as released:
    `language_model.model.layers...` read as `model.layers...`) or renamed (Nemotron-H's `backbone.`, outside the
    blocks too); block by block reads them the same way, so a 109B model is not loaded whole: the same output files
    (names included) as the whole load writes, and the same figures."""
    src = make(tmp_path / "src")
    for onload in ("blocks", "whole"):
        rc, out, err = _run(capsys, "compress", "--model", src, "--calib", calib_txt, "--onload", onload,
                            "--out", tmp_path / onload, *CHEAP, *EVAL)
        assert rc == 0, err
    a, b = _tensors(tmp_path / "blocks"), _tensors(tmp_path / "whole")
    assert set(a) == set(b) and any(".layers.1." in k for k in a)
    for k, t in a.items():
        assert torch.equal(t, b[k]), k
    ma, mb = (json.loads((tmp_path / n / "llmprune.json").read_text()) for n in ("blocks", "whole"))
    assert ma["onload"].startswith("blocks") and ma["sparsity"] == mb["sparsity"]
    assert ma["eval"]["wikitext2"]["ppl"] == mb["eval"]["wikitext2"]["ppl"]
