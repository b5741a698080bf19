"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, MiniMax-M2, Qwen3's -FP8 releases)
are read as the weights they stand for, block by block or whole, and compressed to what the same model stored
unquantized compresses to; other quantized checkpoints are refused in one line (llmprune/fp8.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmprune import fp8, pipeline
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.testing import FAST_CLI, fp8_model_dir, read_block_as_transformers, unquantized_copy


def _oracle(q: torch.Tensor, s: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Each bm x bn block of q (the last ones cut short) times its scale, one block at a time."""
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float() * s[i, j]
    return out


def test_dequantize_scales_each_block_the_last_ones_cut_short():
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(40, 72, generator=g) * 100).to(torch.float8_e4m3fn)  # 3 x 5 blocks of 16, cut short
    s = torch.rand(3, 5, generator=g)
    assert torch.equal(fp8.dequantize(q, s, (16, 16)), _oracle(q, s, 16, 16))
    with pytest.raises(LLMPruneError, match="has \\(3, 4\\) scales, not one per 16 x 16 block"):
        fp8.dequantize(q, s[:, :4], (16, 16))


def _plain_copy(src: Path, dst: Path) -> Path:
    """`src` stored unquantized: every scaled weight dequantized by the oracle, no quantization_config."""
    bm, bn = json.loads((src / "config.json").read_text())["quantization_config"]["weight_block_size"]
    return unquantized_copy(src, dst, lambda t: {k: _oracle(v, t[k + "_scale_inv"], bm, bn) if k + "_scale_inv" in t
                                                 else v for k, v in t.items() if not k.endswith("_scale_inv")})


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_a_block_read_holds_what_transformers_dequantizes(tmp_path, family):
    """Where transformers can read the checkpoint (no block cut short), its dequantizing load is the oracle."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    src = fp8_model_dir(tmp_path / "m", family, block=(8, 8))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                               quantization_config=FineGrainedFP8Config(dequantize=True)).state_dict()
    lz, _ = read_block_as_transformers(src, ref)
    assert any(lz.files.scaled(k) for k in lz.files.where)


@pytest.mark.parametrize("onload", ["blocks", "whole"])
def test_compressing_an_fp8_checkpoint_is_compressing_its_dequantized_weights(tmp_path, capsys, calib_txt, onload):
    """DeepSeek-V3-shaped (MLA, a dense first block, experts stored per expert), blocks of 16 that the 40-row
    kv_a_proj_with_mqa cuts short (as DeepSeek-V3's 576 rows cut its blocks of 128): the output holds the
    tensors, sparsity and figures of the same model stored unquantized, unquantized itself (no scales, no
    quantization_config), and plain transformers reloads it."""
    from transformers import AutoModelForCausalLM

    src = fp8_model_dir(tmp_path / "m", "deepseek_v3", block=(16, 16))
    plain = _plain_copy(src, tmp_path / "plain")
    args = ["--solver", "sparsegpt", "--calib", str(calib_txt), "--onload", onload, *FAST_CLI[:-2], "--eval",
            "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in _same_outputs(tmp_path, capsys, src, plain, args, onload)
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_pruned_then_quantized_from_fp8_reads_the_pruned_blocks_as_written(tmp_path, capsys, calib_txt):
    """Pruning then GPTQ block by block keeps the pruned blocks in a scratch folder and reads them from there in
    place of the source's: those are unquantized now, and must not be scaled again (Llama: packed formats refuse
    experts)."""
    src = fp8_model_dir(tmp_path / "m", "llama", block=(16, 16))
    plain = _plain_copy(src, tmp_path / "plain")
    args = ["--solver", "wanda", "--pattern", "2:4", "--format", "w4s24", "--quant", "gptq", "--group-size", "16",
            "--calib", str(calib_txt), "--onload", "blocks", *FAST_CLI]
    assert any(k.endswith(".codes") for k in _same_outputs(tmp_path, capsys, src, plain, args, "blocks"))


def _same_outputs(tmp_path, capsys, src, plain, args, onload):
    """compress `src` (FP8) and `plain` (the same stored unquantized) into a and b: the same files and figures."""
    for name, model in (("a", src), ("b", plain)):
        assert main(["compress", "--model", str(model), "--out", str(tmp_path / name), *args]) == 0, capsys.readouterr()
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert set(a) == set(b) and not any(k.endswith("_scale_inv") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((tmp_path / n / "llmprune.json").read_text()) for n in "ab")
    assert ma["onload"].startswith(onload) and ma["sparsity"] == mb["sparsity"]
    assert ma["model"]["stored"] == "fp8 (scales per 16 x 16 block), read dequantized" and "stored" not in mb["model"]
    figures = lambda m: {d: (e.get("ppl"), e.get("dense_ppl")) for d, e in (m.get("eval") or {}).items()}
    assert figures(ma) == figures(mb)
    return a


def test_a_quantized_tensor_outside_the_blocks_is_written_dequantized(tmp_path, capsys, calib_txt):
    """An FP8 head (untied) is written dequantized, not copied file to file as the other tensors outside the
    blocks are."""
    src = fp8_model_dir(tmp_path / "m", "llama", head=True, tie_word_embeddings=False)
    assert "lm_head.weight_scale_inv" in load_file(src / "model.safetensors")
    plain = _plain_copy(src, tmp_path / "plain")
    for name, model in (("a", src), ("b", plain)):
        assert main(["compress", "--model", str(model), "--calib", str(calib_txt), "--onload", "blocks", "--out",
                     str(tmp_path / name), *FAST_CLI]) == 0, capsys.readouterr()
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_output_dtype_is_the_unquantized_tensors(tmp_path):
    """--save-dtype auto keeps the source's dtype: of an FP8 checkpoint, that of its unquantized tensors (bf16 in
    DeepSeek-V3's), not float8."""
    src = fp8_model_dir(tmp_path / "m", "llama", unquantized=torch.bfloat16)
    assert pipeline.source_dtype(src) == torch.bfloat16


@pytest.mark.parametrize("quant", [{"quant_method": "gptq", "bits": 4}, {"quant_method": "mxfp4"},
                                   {"quant_method": "fp8"}])  # fp8 without blocks: per-tensor scales
@pytest.mark.parametrize("onload", ["blocks", "whole"])
def test_other_quantized_checkpoints_are_refused_in_one_line(tmp_path, capsys, calib_txt, quant, onload):
    from llmprune.testing import tiny_model_dir

    src = tiny_model_dir(tmp_path / "m", "llama")
    c = json.loads((src / "config.json").read_text())
    c["quantization_config"] = quant
    (src / "config.json").write_text(json.dumps(c))
    capsys.readouterr()
    rc = main(["compress", "--model", str(src), "--calib", str(calib_txt), "--onload", onload, "--out",
               str(tmp_path / "o"), *FAST_CLI])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"is quantized ({quant['quant_method']}" in err and "use the model's bf16 or fp16 checkpoint" in err
    assert not (tmp_path / "o").exists()
