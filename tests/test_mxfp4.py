"""gpt-oss' MXFP4 checkpoints (gpt-oss-20b and -120b as released) are read as the weights they stand for, block by
block or whole, and compressed to what the same model stored unquantized compresses to (llmprune/mxfp4.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmprune import hub, mxfp4
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.testing import FAST_CLI, mxfp4_model_dir, read_block_as_transformers, unquantized_copy


def _oracle(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Element by element from the MX spec: code j of a block is nibble j % 2 (low first) of byte j // 2, its value
    the E2M1 number (sign, 2 exponent bits biased by 1, 1 mantissa bit) times 2^(scale - 127)."""
    def e2m1(c: int) -> float:
        sign, exp, man = -1.0 if c & 8 else 1.0, (c >> 1) & 3, c & 1
        return sign * (man * 0.5 if exp == 0 else (1 + man * 0.5) * 2.0 ** (exp - 1))

    experts, rows, groups, _ = blocks.shape
    out = torch.empty(experts, groups * 32, rows, dtype=torch.float64)
    for e in range(experts):
        for r in range(rows):
            for g in range(groups):
                for j in range(32):
                    byte = int(blocks[e, r, g, j // 2])
                    code = byte & 15 if j % 2 == 0 else byte >> 4
                    out[e, g * 32 + j, r] = e2m1(code) * 2.0 ** (int(scales[e, r, g]) - 127)
    return out


def test_dequantize_reads_every_code_and_scale_as_the_spec_says():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), generator=g, dtype=torch.uint8)  # odd expert and row counts
    scales = torch.randint(100, 140, (3, 5, 2), generator=g, dtype=torch.uint8)
    want = _oracle(blocks, scales)
    assert torch.equal(mxfp4.dequantize(blocks, scales).double(), want)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.bfloat16).double(), want)  # exact in bf16 too
    with pytest.raises(LLMPruneError, match="do not match .* the checkpoint is damaged"):
        mxfp4.dequantize(blocks, scales[:, :, :1])


def test_a_block_read_holds_what_transformers_dequantizes(tmp_path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    src = mxfp4_model_dir(tmp_path / "m")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                               quantization_config=Mxfp4Config(dequantize=True)).state_dict()
    lz, got = read_block_as_transformers(src, ref)
    assert lz.files.scaled("model.layers.1.mlp.experts.gate_up_proj")
    assert not torch.equal(got["model.layers.1.mlp.experts.down_proj"], torch.zeros_like(ref[
        "model.layers.1.mlp.experts.down_proj"]))


def _plain_copy(src: Path, dst: Path) -> Path:
    """`src` stored unquantized: each expert tensor as transformers' dequantizing load makes it, in bf16 as the
    other tensors are, no quantization_config."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    def dequantized(t: dict) -> dict:
        out = {k: v for k, v in t.items() if not k.endswith((mxfp4.BLOCKS, mxfp4.SCALES))}
        for k, blocks in t.items():
            if k.endswith(mxfp4.BLOCKS):
                x = k[:-len(mxfp4.BLOCKS)]
                out[x] = convert_moe_packed_tensors(blocks, t[x + mxfp4.SCALES], dtype=torch.bfloat16)
        return out

    return unquantized_copy(src, dst, dequantized)


@pytest.mark.parametrize("onload", ["blocks", "whole"])
def test_compressing_an_mxfp4_checkpoint_is_compressing_its_dequantized_weights(tmp_path, capsys, calib_txt, onload):
    """The output holds the tensors, sparsity and figures of the same model stored unquantized (bf16, as its other
    tensors are), is unquantized itself (no blocks or scales, no quantization_config) and plain transformers
    reloads it."""
    from transformers import AutoModelForCausalLM

    src = mxfp4_model_dir(tmp_path / "m")
    plain = _plain_copy(src, tmp_path / "plain")
    args = ["--solver", "sparsegpt", "--calib", str(calib_txt), "--onload", onload, *FAST_CLI[:-2], "--eval",
            "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
    a = _same_outputs(tmp_path, capsys, src, plain, args)
    w = a["model.layers.1.mlp.experts.gate_up_proj"]
    assert w.dtype == torch.bfloat16 and 0.4 < float((w == 0).float().mean()) < 0.6
    manifest = json.loads((tmp_path / "a" / "llmprune.json").read_text())
    assert manifest["onload"].startswith(onload)
    assert f"| base model stored as | {mxfp4.describe()} |" in hub.model_card(manifest, "me/x")  # (its dense figure)
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_pruned_then_quantized_from_mxfp4_reads_the_pruned_blocks_as_written(tmp_path, capsys, calib_txt):
    """Pruning then GPTQ block by block keeps the pruned blocks in a scratch folder and reads them from there in
    place of the source's: those are unquantized now, and must not be decoded as MXFP4 again."""
    src = mxfp4_model_dir(tmp_path / "m")
    plain = _plain_copy(src, tmp_path / "plain")
    args = ["--solver", "wanda", "--pattern", "2:4", "--format", "w4s24", "--quant", "gptq", "--group-size", "16",
            "--calib", str(calib_txt), "--onload", "blocks", *FAST_CLI]
    assert any(".experts." in k and k.endswith(".codes") for k in _same_outputs(tmp_path, capsys, src, plain, args))


def _same_outputs(tmp_path, capsys, src, plain, args):
    """compress `src` (MXFP4) and `plain` (the same stored unquantized) into a and b: the same files and figures."""
    for name, model in (("a", src), ("b", plain)):
        assert main(["compress", "--model", str(model), "--out", str(tmp_path / name), *args]) == 0, capsys.readouterr()
    a = {k: v for f in sorted((tmp_path / "a").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "b").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(a) == set(b) and not any(k.endswith((mxfp4.BLOCKS, mxfp4.SCALES)) for k in a)
    for k, t in a.items():
        assert torch.equal(t, b[k]), k
    ma, mb = (json.loads((tmp_path / n / "llmprune.json").read_text()) for n in "ab")
    assert ma["sparsity"] == mb["sparsity"]
    assert ma["model"]["stored"] == mxfp4.describe() and "stored" not in mb["model"]
    figures = lambda m: {d: (e.get("ppl"), e.get("dense_ppl")) for d, e in (m.get("eval") or {}).items()}
    assert figures(ma) == figures(mb)
    return a

