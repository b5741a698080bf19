"""`llmprune export`: every export is read back by another engine's reader, never by llmprune's loader.

compressed-tensors: transformers' `from_pretrained` with compressed-tensors installed (it decompresses on
the CPU), or compressed-tensors' own decompressor where transformers cannot read the file (asymmetric).
GGUF: transformers' GGUF loader (`gguf_file=`), and gguf's GGUFReader for the metadata. The reference is
`llmprune.load` of the source folder.
"""
import importlib.util
import json

import pytest
import torch

from llmprune.cli import main
from llmprune.models import reads_any_gguf_tokenizer
from llmprune.testing import FAST_CLI, LLAMA31_ROPE, PHI3_LONGROPE, PHI4_LONGROPE, VOCAB, folder_tensors

# found, not imported: importing compressed_tensors imports triton (TRITON_INTERPRET=1: tests/conftest.py)
if importlib.util.find_spec("compressed_tensors") is None:
    pytest.skip("needs compressed-tensors (pip install 'llmprune[export]')", allow_module_level=True)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def outs(tmp_path_factory, tiny_dir, calib_txt):
    """Tiny outputs: dense Wanda 50%, its w4g128 packs (sym, asym), a 2:4 one and its w4s24 / w4s50 packs."""
    d = tmp_path_factory.mktemp("exp")
    o = {"dense": d / "w50", "24": d / "w24", "g16": d / "g16"}
    for key, pattern in (("dense", "unstructured"), ("24", "2:4"), ("g16", "group:16")):
        assert main([str(a) for a in ("compress", "--model", tiny_dir, "--pattern", pattern, "--calib", calib_txt,
                                      "--out", o[key], *FAST_CLI)]) == 0
    for key, src, fmt, extra in (("w4sym", "dense", "w4g128", ["--grid", "sym"]), ("w4asym", "dense", "w4g128", []),
                                 ("w4s24", "24", "w4s24", []), ("w4s50", "g16", "w4s50", [])):
        o[key] = d / key
        group = ["--group-size", "32"] if fmt != "w4s50" else []  # (w4s50's groups are fixed: 16)
        assert main([str(a) for a in ("pack", o[src], "--format", fmt, *group, *extra, "--out", o[key],
                                      "--no-progress")]) == 0
    return o


def _ids(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, n), generator=g)


def _ref_logits(folder):
    import llmprune

    model, _, _ = llmprune.load(str(folder))
    with torch.no_grad():
        return model(_ids()).logits


def _ct_logits(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # plain transformers
    with torch.no_grad():
        return model, model(_ids()).logits


# --- compressed-tensors -------------------------------------------------------------------------------

@pytest.mark.parametrize("src", ["w4sym", "w4s24"])
def test_ct_of_int4_output_is_its_codes_exactly(tmp_path, capsys, outs, src):
    """w4g128 and w4s24 codes re-laid as pack-quantized: transformers computes what llmprune.load computes."""
    out = tmp_path / "ct"
    rc, so, se = _run(capsys, "export", outs[src], "--to", "compressed-tensors", "--out", out, "--no-progress")
    assert rc == 0, se
    model, got = _ct_logits(out)
    want = _ref_logits(outs[src])
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and "lm_head" in q["ignore"]
    (w,) = [g["weights"] for g in q["config_groups"].values()]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", 32, True)
    m = json.loads((out / "llmprune.json").read_text())
    assert m["steps"][-1] == "export" and m["export"]["to"] == "compressed-tensors" and "format" not in m


def test_ct_quantized_on_export_keeps_zeros_within_int4_tolerance(tmp_path, capsys, outs):
    import llmprune
    from llmprune.quant.rtn import rtn

    out = tmp_path / "ct"
    rc, so, se = _run(capsys, "export", outs["dense"], "--to", "compressed-tensors", "--group-size", "32", "--out", out,
                      "--no-progress")
    assert rc == 0, se
    assert "quantized on export: RTN, int4 groups of 32, symmetric grid\n" in so, so
    model, got = _ct_logits(out)
    src, _, _ = llmprune.load(str(outs["dense"]))
    want = src(_ids()).logits.detach()
    assert (got - want).norm() / want.norm() < 0.3  # int4 of a random tiny model: its RTN error, and no more:
    packed = _ref_logits(outs["w4sym"])  # llmprune's own w4g128 of the same weights, same grid
    assert torch.allclose(got, packed, atol=2e-3, rtol=1e-3), (got - packed).abs().max()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w_src = src.get_submodule(name).weight.detach()
        w_ct = model.get_submodule(name).weight.detach()
        assert bool((w_ct[w_src == 0] == 0).all())  # pruned weights are exact zeros
        ref = rtn(w_src.half().float(), w_src != 0, 32, True).dequantize()  # llmprune's RTN, symmetric
        assert torch.equal(w_ct.float(), ref)


def test_ct_gptq_on_export(tmp_path, capsys, outs, calib_txt):
    out = tmp_path / "ct"
    rc, _, se = _run(capsys, "export", outs["dense"], "--to", "compressed-tensors", "--quant", "gptq", "--calib",
                     calib_txt, "--nsamples", "4", "--seqlen", "32", "--out", out, "--no-progress")
    assert rc == 0, se
    _, got = _ct_logits(out)
    want = _ref_logits(outs["dense"])
    assert (got - want).norm() / want.norm() < 0.3
    m = json.loads((out / "llmprune.json").read_text())
    assert m["steps"] == ["prune", "quantize", "export"] and m["export"]["quant"]["quant"] == "gptq"


def test_ct_asymmetric_source_decompresses_exactly_with_compressed_tensors(tmp_path, capsys, outs):
    """Asymmetric codes are written with their zero points (what vLLM reads); transformers 5.25 cannot load
    them (an upstream bug, said in the manifest), so the reader here is compressed-tensors' decompressor."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    import llmprune

    out = tmp_path / "ct"
    rc, so, se = _run(capsys, "export", outs["w4asym"], "--to", "compressed-tensors", "--out", out, "--no-progress")
    assert rc == 0, se
    assert "transformers" in so  # the note is printed
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    assert group["weights"]["symmetric"] is False
    scheme = QuantizationScheme(**{k: v for k, v in group.items() if k != "format"})
    tensors = load_file(out / "model.safetensors")
    src, _, man = llmprune.load(str(outs["w4asym"]))
    assert "note" in json.loads((out / "llmprune.json").read_text())["export"]
    for name in man["format"]["layers"]:
        sd = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]  # in the scales' dtype, fp16
        assert torch.equal(w, src.get_submodule(name).dequantize().half()), name  # (q - z) * s, rounded once


# --- GGUF -------------------------------------------------------------------------------------------

def _gguf_model(folder, fname):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_read_by_transformers(tmp_path, capsys, calib_txt, arch):
    """F16 is the fp16 model; Q8_0 close; Q4_0 within int4 noise; zeros survive in all three."""
    import gguf

    import llmprune
    from llmprune.testing import byte_tokenizer, tiny_model

    src_model = tmp_path / "m"
    # Gemma-3 as GGUF readers assume it (llama.cpp and transformers alike): every 6th layer global,
    # queries scaled by 1/sqrt(head_dim) (check_gemma3 refuses other variants)
    over = {"num_hidden_layers": 6, "head_dim": 256, "query_pre_attn_scalar": 256} if arch == "gemma3" else {}
    tiny_model(arch, **over).save_pretrained(src_model)
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(src_model)
    src = tmp_path / "w50"
    assert main([str(a) for a in ("compress", "--model", src_model, "--calib", calib_txt, "--out", src,
                                  *FAST_CLI)]) == 0
    out = tmp_path / "g"
    rc, so, se = _run(capsys, "export", src, "--to", "gguf", "--type", "f16,q8_0,q4_0", "--out", out,
                      "--no-progress")
    assert rc == 0, se
    ref, _, _ = llmprune.load(str(src))
    want = ref(_ids()).logits.detach()
    files = json.loads((out / "llmprune.json").read_text())["export"]["files"]
    assert [f.rsplit("-", 1)[1] for f in files] == ["F16.gguf", "Q8_0.gguf", "Q4_0.gguf"]
    for fname, tol in zip(files, (5e-3, 3e-2, 0.4)):  # Q4_0: int4 noise through a random 6-layer model
        model = _gguf_model(out, fname)
        got = model(_ids()).logits.detach()
        assert (got - want).norm() / want.norm() < tol, (fname, (got - want).norm() / want.norm())
        name = "model.layers.1.mlp.up_proj"
        w_ref = ref.get_submodule(name).weight
        assert bool((model.get_submodule(name).weight[w_ref == 0] == 0).all()), fname  # pruned: exact zeros
        r = gguf.GGUFReader(out / fname)
        assert r.fields["tokenizer.chat_template"].contents() == tok.chat_template
        assert r.fields["general.architecture"].contents() == ("llama" if arch == "llama" else "gemma3")


def test_gguf_of_a_sliced_model_keeps_odd_rows_f16(tmp_path, capsys, tiny_dir, calib_txt):
    """SliceGPT shared + --slice-head is a stock model of hidden 48: rows of 48 are no Q8_0 blocks, so stay F16."""
    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", tiny_dir, "--solver", "slicegpt", "--rotation", "shared",
                                  "--slicing", "0.25", "--slice-head", "--calib", calib_txt, "--out", src,
                                  *FAST_CLI)]) == 0
    out = tmp_path / "g"
    rc, _, se = _run(capsys, "export", src, "--to", "gguf", "--type", "q8_0", "--out", out, "--no-progress")
    assert rc == 0, se
    e = json.loads((out / "llmprune.json").read_text())["export"]
    assert e["tensor_types"][e["files"][0]]["f16"] > 0
    got = _gguf_model(out, e["files"][0])(_ids()).logits.detach()
    want = _ref_logits(src)
    assert (got - want).norm() / want.norm() < 3e-2


def test_gguf_round_trip_copies_the_source_gguf_tokenizer(tmp_path, capsys, tiny_dir, calib_txt):
    """GGUF in -> pruned -> GGUF out: the tokenizer keys of the GGUF the model came from, verbatim."""
    import gguf

    first = tmp_path / "dense"
    assert main([str(a) for a in ("compress", "--model", tiny_dir, "--sparsity", "0", "--solver", "magnitude",
                                  "--out", first, *FAST_CLI)]) == 0
    assert _run(capsys, "export", first, "--to", "gguf", "--type", "f32", "--out", tmp_path / "g0",
                "--no-progress")[0] == 0
    src_gguf = next((tmp_path / "g0").glob("*.gguf"))
    pruned = tmp_path / "p"
    assert main([str(a) for a in ("compress", "--model", src_gguf, "--calib", calib_txt, "--out", pruned,
                                  *FAST_CLI)]) == 0
    rc, _, se = _run(capsys, "export", pruned, "--to", "gguf", "--type", "q8_0", "--out", tmp_path / "g1",
                     "--no-progress")
    assert rc == 0, se
    m = json.loads((tmp_path / "g1" / "llmprune.json").read_text())
    assert m["export"]["tokenizer"] == f"copied from {src_gguf.name}"
    a, b = gguf.GGUFReader(src_gguf), gguf.GGUFReader(next((tmp_path / "g1").glob("*.gguf")))
    keys = sorted(k for k in a.fields if k.startswith("tokenizer."))
    assert keys == sorted(k for k in b.fields if k.startswith("tokenizer.")) and "tokenizer.ggml.tokens" in keys
    for k in keys:
        assert a.fields[k].contents() == b.fields[k].contents(), k



def test_a_16_bit_gguf_is_cached_in_its_own_dtype(tmp_path, capsys, tiny_dir, calib_txt, monkeypatch):
    """An F16 or BF16 GGUF's cached copy holds its 16-bit tensors in their dtype: bit for bit what transformers'
    own GGUF loader reads, in 0.5x the bytes of an F32 file's copy, and a dense output pruned from it is
    written in that dtype, as from a Hugging Face folder of it; a tensor whose processed values (a norm
    offset, say) its dtype cannot hold turns the whole copy to fp32, still exact."""
    import numpy as np
    from transformers import modeling_gguf_pytorch_utils as mg

    from llmprune import models, pipeline

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "dense"
    assert main([str(a) for a in ("compress", "--model", tiny_dir, "--sparsity", "0", "--solver", "magnitude",
                                  "--out", first, *FAST_CLI)]) == 0
    g = tmp_path / "g"
    assert _run(capsys, "export", first, "--to", "gguf", "--type", "f32,f16,bf16", "--out", g, "--no-progress")[0] == 0
    files = json.loads((g / "llmprune.json").read_text())["export"]["files"]
    size = {}
    for fname, dt in zip(files, (torch.float32, torch.float16, torch.bfloat16)):
        folder, _ = models.gguf_to_folder(g / fname)
        got, want = folder_tensors(folder), _gguf_model(g, fname).state_dict()
        assert got and set(got) <= set(want)
        for k, v in got.items():
            assert torch.equal(v.float(), want[k]), (fname, k)
        assert got["model.layers.1.mlp.up_proj.weight"].dtype == dt and got["model.embed_tokens.weight"].dtype == dt
        assert pipeline.source_dtype(folder) == dt
        assert json.loads((folder / "config.json").read_text())["dtype"] == str(dt).removeprefix("torch.")
        size[dt] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert max(size[torch.float16], size[torch.bfloat16]) < 0.55 * size[torch.float32], size
    pruned = tmp_path / "p"
    assert main([str(a) for a in ("compress", "--model", g / files[1], "--calib", calib_txt, "--out", pruned,
                                  *FAST_CLI)]) == 0
    assert {v.dtype for v in folder_tensors(pruned).values()} == {torch.float16}

    class Shifted(mg.LlamaTensorProcessor):  # a processor that changes one value of a tensor, its last
        def process(self, weights, name, **kw):
            r = super().process(weights, name, **kw)
            if name == "blk.0.ffn_up.weight":
                w = r.weights.copy()
                w[-1, -1] += np.float32(1 / 3)
                r = r._replace(weights=w)
            return r

    monkeypatch.setitem(mg.TENSOR_PROCESSORS, "llama", Shifted)
    monkeypatch.setattr(models, "PIECE", 100)  # compared 100 values at a time: the last piece tells
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache2"))
    folder, _ = models.gguf_to_folder(g / files[2])  # BF16, dequantized to fp32: x + 1/3 is no bfloat16
    got, want = folder_tensors(folder), _gguf_model(g, files[2]).state_dict()
    assert {v.dtype for v in got.values()} == {torch.float32} and pipeline.source_dtype(folder) == torch.float32
    assert all(torch.equal(v, want[k]) for k, v in got.items())
    up = got["model.layers.0.mlp.up_proj.weight"]
    assert up.numel() > 100 and up.bfloat16().float()[-1, -1] != up[-1, -1]
    assert [p.name for p in (tmp_path / "cache2" / "models").iterdir()] == [folder.name]  # no first try left


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe"])
def test_a_gguf_is_parsed_no_more_than_its_config_and_tokenizer_take(tmp_path, capsys, calib_txt, monkeypatch, arch):
    """gguf's reader parses every key of a GGUF, a vocabulary's strings included (22 s for Gemma 3's 262k): a
    conversion, both of its tries (here the 16-bit one refused, then fp32), parses the file no more often than
    transformers' AutoConfig and AutoTokenizer.from_pretrained(gguf_file=) take to read the config and tokenizer
    alone (2 with transformers 5.25; it was 9: each try parsed it anew, AutoConfig and AutoTokenizer again), and the
    config and tokenizer it builds from what it read are those two build."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from llmprune import models

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    _, out, e = _family_export(tmp_path, capsys, calib_txt, arch, types="bf16")
    f = out / e["files"][0]
    parses, real = [], gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: parses.append(1) or real(self, *a, **k))
    tries = []
    monkeypatch.setattr(models, "_holds", lambda y, x: tries.append(1) and False)  # every 16-bit copy inexact
    folder, _ = models.gguf_to_folder(f)
    assert tries and {v.dtype for v in folder_tensors(folder).values()} == {torch.float32}  # (the second try's)
    converting, parses[:] = len(parses), []
    want = AutoConfig.from_pretrained(out, gguf_file=f.name).to_dict()
    AutoTokenizer.from_pretrained(out, gguf_file=f.name).save_pretrained(tmp_path / "tok")
    assert converting <= len(parses), (converting, len(parses))
    assert models._GGUF(f).config().to_dict() == {**want, "_name_or_path": ""}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_text() == (tmp_path / "tok" / name).read_text(), name


def test_a_gguf_conversion_builds_its_tensor_name_map_once(tmp_path, capsys, calib_txt, monkeypatch):
    """transformers' get_gguf_hf_weights_map asks gguf for a new TensorNameMap of the whole model in every submodule
    it recurses into (modules x layers: nearly all of a tiny 80-layer model's 61 s conversion, bench/gguf_namemap.py): a conversion
    builds it once (models.one_name_map), gguf's function is itself again afterwards (after an error too), and the
    cached copy is byte for byte the one made with a map built per submodule."""
    import contextlib

    import gguf

    from llmprune import models

    _, out, e = _family_export(tmp_path, capsys, calib_txt, "llama", types="f32", num_hidden_layers=6)
    builds, build = [], gguf.get_tensor_name_map
    counting = lambda arch, n: builds.append((arch, n)) or build(arch, n)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting)
    made = {}
    for way in ("per submodule", "once"):
        monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / way))
        builds.clear()
        with monkeypatch.context() as m:
            if way == "per submodule":
                m.setattr(models, "one_name_map", contextlib.nullcontext)
            folder, _ = models.gguf_to_folder(out / e["files"][0])
        made[way] = {p.name: p.read_bytes() for p in folder.iterdir()}
        assert gguf.get_tensor_name_map is counting
        assert (builds == [(gguf.MODEL_ARCH.LLAMA, 6)]) if way == "once" else (len(builds) > 6 * 5), (way, len(builds))
    assert "model.safetensors" in made["once"] and made["once"] == made["per submodule"]
    with pytest.raises(RuntimeError), models.one_name_map():
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        raise RuntimeError
    assert gguf.get_tensor_name_map is counting





@pytest.mark.parametrize("arch,over", [
    ("qwen2_moe", {}), ("qwen3_moe", {}), ("qwen3", {}), ("qwen3", {"head_dim": 32}),
    ("gemma2", {"query_pre_attn_scalar": 16}),  # queries by 1/sqrt(head_dim), as llama.cpp assumes
    ("gemma2", {"num_hidden_layers": 4, "head_dim": 32, "query_pre_attn_scalar": 16}),  # the "27B": hidden / heads
    ("mistral", {"head_dim": 32}),  # as Mistral-Nemo: heads of attention.key_length, not hidden / heads
    ("llama", {"rope_parameters": LLAMA31_ROPE}),  # Llama 3.1's scaling: transformers' reader drops rope_freqs
    ("phi3", PHI3_LONGROPE), ("phi3", PHI4_LONGROPE),  # Phi-3.5's and Phi-4-mini's LongRoPE: dropped
    ("phi3", {}), ("qwen2", {"vocab_size": 300}),  # (the others GGUF writes and transformers reads: as they are)
    # transformers' reader has no row for them (models.GGUF_FAMILIES); before its tokenizers by type, none read them
    *[pytest.param(*case, marks=pytest.mark.skipif(not reads_any_gguf_tokenizer(), reason="transformers < 5.25"))
      for case in [("olmo2", {}), ("glm4", {}),
                   ("glm4", {"attention_bias": False, "rope_parameters": {  # (its class: biases, 1/2 rotated)
                       "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}})]]],
    ids=["qwen2_moe", "qwen3_moe", "qwen3", "qwen3-head32", "gemma2", "gemma2-27b", "mistral-head32", "llama31",
         "phi35-longrope", "phi4mini-longrope", "phi3", "qwen2", "olmo2", "glm4", "glm4-nobias-fullrope"])
def test_a_gguf_is_read_with_the_sizes_transformers_leaves_at_defaults(tmp_path, capsys, calib_txt, monkeypatch, arch,
                                                                        over):
    """A Qwen-MoE GGUF (its experts stacked per projection, sizes under expert_feed_forward_length), a Qwen3 one
    (heads of hidden / heads, or of attention.key_length when not), a Gemma-2 one (queries scaled as llama.cpp does
    by the model's size) or a Llama 3.1 one (its RoPE scaling as the rope_freqs factors) read as --model:
    transformers' own GGUF reader keeps the config class's defaults for those (Qwen3's head_dim 128, Gemma's
    query_pre_attn_scalar 256, plain RoPE) and stacks the experts in memory; llmprune reads them as llama.cpp does
    and writes each stacked tensor once its parts are read. OLMo 2 and GLM-4 (transformers' reader refuses them: it
    has no row for them) are read with llmprune's rows, GLM-4's biases and rotated share as the file has them. The
    cached copy holds the exported model's tensors (fp16-rounded, as the F16 file stores them), its zeros included,
    the logits agree, and it prunes."""
    import llmprune
    from llmprune import llamacpp, models
    from llmprune.testing import byte_tokenizer, tiny_model

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(llamacpp.GEMMA_27B_LAYERS, "gemma2", 4)  # a 4-layer "27B" (the real one has 46)
    src_model = tmp_path / "m"
    tiny_model(arch, **over).save_pretrained(src_model)
    byte_tokenizer().save_pretrained(src_model)
    src = tmp_path / "w50"
    assert main([str(a) for a in ("compress", "--model", src_model, "--calib", calib_txt, "--out", src,
                                  *FAST_CLI)]) == 0
    g = tmp_path / "g"
    assert _run(capsys, "export", src, "--to", "gguf", "--type", "f16", "--out", g, "--no-progress")[0] == 0
    (f,) = g.glob("*.gguf")
    folder, _ = models.gguf_to_folder(f)
    ref, _, _ = llmprune.load(str(src))  # (its experts fused, as transformers holds them)
    assert json.loads((folder / "config.json").read_text()).get("rope_parameters") == ref.config.rope_parameters
    got, want = folder_tensors(folder), ref.state_dict()
    experts = {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}
    assert set(got) <= set(want) and (experts <= set(got) or "moe" not in arch)
    assert not [k for k, v in want.items() if k not in got and v.data_ptr() != want["model.embed_tokens.weight"].data_ptr()]
    for k, v in got.items():
        assert torch.equal(v.float(), want[k].to(v.dtype).float()), k
    model, _, _ = llmprune.load(str(f))
    for ids in (_ids(), _ids(16)):  # (the RoPE scalings' long and short ranges: their original context is 16)
        a, b = ref(ids).logits.detach(), model(ids).logits.detach()
        assert (a - b).norm() / a.norm() < 5e-3
    if arch != "gemma2":  # (transformers builds a Gemma GGUF's tokenizer with an unknown token the byte one lacks)
        out = tmp_path / "p"
        assert main([str(a) for a in ("compress", "--model", f, "--calib", calib_txt, "--out", out, *FAST_CLI)]) == 0


def test_a_gguf_transformers_misreads_is_refused_before_it_isfolder_tensors(tmp_path, capsys, calib_txt, monkeypatch):
    """A Mixtral GGUF (llama.cpp writes it as a llama with stacked experts) is read by transformers as a Llama
    without its experts, which would then be random: refused in one line, nothing cached, nothing written."""
    from llmprune.testing import byte_tokenizer, tiny_model

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    src_model = tmp_path / "m"
    tiny_model("mixtral").save_pretrained(src_model)
    byte_tokenizer().save_pretrained(src_model)
    src = tmp_path / "d"
    assert main([str(a) for a in ("compress", "--model", src_model, "--sparsity", "0", "--solver", "magnitude",
                                  "--out", src, *FAST_CLI)]) == 0
    assert _run(capsys, "export", src, "--to", "gguf", "--type", "f16", "--out", tmp_path / "g", "--no-progress")[0] == 0
    (f,) = (tmp_path / "g").glob("*.gguf")
    rc, _, err = _run(capsys, "compress", "--model", f, "--calib", calib_txt, "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "transformers' GGUF reader takes it for a llama model, whose model.layers.0.mlp.gate_proj.weight" in err
    assert not any((tmp_path / "cache" / "models").iterdir()) and not (tmp_path / "o").exists()


def test_a_gpt_oss_gguf_whose_experts_transformers_does_not_map_is_refused(tmp_path, capsys, calib_txt, monkeypatch):
    """A GPT-OSS GGUF as llama.cpp lays it out (experts split into ffn_gate_exps / ffn_up_exps / ffn_down_exps with
    biases; llmprune does not write the family): transformers 5.25 reads its config but maps none of those onto its
    fused experts (its GPT-OSS processor is keyed "gpt_oss", the file says "gpt-oss", and it names per-expert
    tensors transformers 5 no longer has): refused in one line naming the fused tensor, no talk of Mixtral."""
    import gguf
    import numpy as np

    from llmprune.testing import tiny_config

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    c = tiny_config("gpt_oss")
    f = tmp_path / "oss.gguf"
    w = gguf.GGUFWriter(str(f), "gpt-oss")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    h, e, i, q, kv = c.hidden_size, c.num_local_experts, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    shapes = {"token_embd.weight": (c.vocab_size, h), "output_norm.weight": (h,), "output.weight": (c.vocab_size, h)}
    for b in range(c.num_hidden_layers):
        shapes.update({f"blk.{b}.{k}": s for k, s in {
            "attn_norm.weight": (h,), "post_attention_norm.weight": (h,), "attn_sinks.weight": (c.num_attention_heads,),
            "attn_q.weight": (q, h), "attn_q.bias": (q,), "attn_k.weight": (kv, h), "attn_k.bias": (kv,),
            "attn_v.weight": (kv, h), "attn_v.bias": (kv,), "attn_output.weight": (h, q), "attn_output.bias": (h,),
            "ffn_gate_inp.weight": (e, h), "ffn_gate_inp.bias": (e,), "ffn_gate_exps.weight": (e, i, h),
            "ffn_gate_exps.bias": (e, i), "ffn_up_exps.weight": (e, i, h), "ffn_up_exps.bias": (e, i),
            "ffn_down_exps.weight": (e, h, i), "ffn_down_exps.bias": (e, h)}.items()})
    for name, s in shapes.items():
        w.add_tensor(name, np.zeros(s, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rc, _, err = _run(capsys, "compress", "--model", f, "--calib", calib_txt, "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "takes it for a gpt_oss model, whose model.layers.0.mlp.experts.gate_up_proj" in err, err
    assert "Mixtral" not in err and "Hugging Face folder" in err
    assert not any((tmp_path / "cache" / "models").iterdir()) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("theta,head_dim,factor,old", [(5e5, 128, 8.0, 8192), (5e5, 64, 32.0, 8192),
                                                       (1e4, 16, 8.0, 16), (1e4, 16, 8.0, 200), (1e6, 128, 4.0, 131072)])
def test_llama3_rope_factors_read_back_give_transformers_frequencies(theta, head_dim, factor, old):
    """llama.cpp's rope_freqs for a Llama 3 scaling, read back as rope_parameters (llamacpp.llama3_parameters):
    transformers' own llama3 RoPE (the oracle) computes from them the frequencies of the file, base / factors;
    all-ones factors are plain RoPE, factors no such scaling gives are None."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmprune.llamacpp import llama3_factors, llama3_parameters

    freqs = llama3_factors(theta, head_dim, factor, 1.0, 4.0, old)
    params = llama3_parameters(freqs, theta, head_dim)
    assert params["factor"] == factor
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_parameters=params)
    got, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    want = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)) / torch.from_numpy(freqs)
    assert torch.allclose(got.double(), want, rtol=1e-5), (got, want)
    assert llama3_parameters(freqs * 0 + 1, theta, head_dim) == {"rope_type": "default", "rope_theta": theta}
    assert llama3_parameters(freqs[::-1].copy(), theta, head_dim) is None
    assert llama3_parameters(freqs[:-1], theta, head_dim) is None


def test_a_gguf_whose_rope_factors_are_no_llama3_scaling_is_refused(tmp_path, capsys, calib_txt, monkeypatch):
    """rope_freqs factors that no Llama 3 scaling gives (transformers could not run them): refused in one line,
    nothing cached, rather than read with plain RoPE as transformers' own reader would."""
    import gguf

    from llmprune.testing import byte_tokenizer, tiny_model

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    m = tmp_path / "m"
    tiny_model("llama", rope_parameters=LLAMA31_ROPE).save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    src = tmp_path / "d"
    assert main([str(a) for a in ("compress", "--model", m, "--sparsity", "0", "--solver", "magnitude", "--out", src,
                                  *FAST_CLI)]) == 0
    assert _run(capsys, "export", src, "--to", "gguf", "--type", "f32", "--out", tmp_path / "g", "--no-progress")[0] == 0
    (f,) = (tmp_path / "g").glob("*.gguf")
    r = gguf.GGUFReader(f, "r+")
    (t,) = [t for t in r.tensors if t.name == "rope_freqs.weight"]
    t.data[:] = t.data[::-1]  # the factors in the wrong order: long wavelengths left unscaled
    del r
    rc, _, err = _run(capsys, "compress", "--model", f, "--calib", calib_txt, "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "its rope_freqs factors are no Llama 3 RoPE scaling" in err, err
    assert not any((tmp_path / "cache" / "models").iterdir()) and not (tmp_path / "o").exists()


def test_a_gguf_whose_metadata_does_not_describe_its_tensors_is_refused(tmp_path, capsys, tiny_dir, calib_txt,
                                                                        monkeypatch):
    """A GGUF whose metadata makes the model's linears another shape than its tensors (damaged, or edited): refused
    in one line naming the tensor, nothing cached."""
    import gguf

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "dense"
    assert main([str(a) for a in ("compress", "--model", tiny_dir, "--sparsity", "0", "--solver", "magnitude",
                                  "--out", first, *FAST_CLI)]) == 0
    assert _run(capsys, "export", first, "--to", "gguf", "--type", "f32", "--out", tmp_path / "g", "--no-progress")[0] == 0
    (f,) = (tmp_path / "g").glob("*.gguf")
    r = gguf.GGUFReader(f, "r+")  # the FFN's length edited in place
    field = r.fields["llama.feed_forward_length"]
    field.parts[field.data[0]][0] += 8
    del r
    rc, _, err = _run(capsys, "compress", "--model", f, "--calib", calib_txt, "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "but the file's metadata makes model.layers.0.mlp." in err and "the file is damaged" in err, err
    assert not any((tmp_path / "cache" / "models").iterdir()) and not (tmp_path / "o").exists()

# --- what cannot be exported, and nothing half written ---------------------------------------------------

def _refused(capsys, tmp_path, *argv, want: str):
    out = tmp_path / "x"
    rc, _, err = _run(capsys, "export", *argv, "--out", out, "--no-progress")
    assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".x.*"))


@pytest.mark.parametrize("to", ["compressed-tensors", "gguf"])
def test_export_eval_that_cannot_fit_is_refused_before_the_export_is_written(tmp_path, capsys, outs, monkeypatch,
                                                                              to):
    """`export --eval` has transformers read the whole export (GGUF: dequantized to float32 in CPU memory): where
    that cannot fit, the one line says so before anything is written, not after hours of export."""
    import psutil

    import llmprune

    params = sum(t.numel() for t in llmprune.load(str(outs["dense"]))[0].parameters())
    limit = params * 4 - 1  # float32 either way here (the source's dtype; GGUF always)
    real = psutil.virtual_memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=limit))
    rc, _, err = _run(capsys, "export", outs["dense"], "--to", to, "--eval", "wikitext2", "--eval-seqlen", "64",
                      "--out", tmp_path / "x", "--no-progress")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--eval (transformers reads the whole export" in err and "drop --eval" in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=params * 8))
    rc, _, err = _run(capsys, "export", outs["dense"], "--to", to, "--eval", "wikitext2", "--eval-seqlen", "64",
                      "--eval-windows", "1", "--out", tmp_path / "y", "--no-progress")
    assert rc == 0, err


def test_eval_of_an_export_says_how_to_measure_it(tmp_path, capsys, outs):
    """`llmprune eval` reads llmprune's outputs; an export is read by its engine's loader: the one line says to
    measure it with `export --eval` (transformers' read of it). `llmprune bench` of an export timed transformers'
    decompressed load of compressed-tensors as "compressed", and said a GGUF folder should be re-created: it names
    the output the export came from."""
    out = tmp_path / "ct"
    rc, _, se = _run(capsys, "export", outs["dense"], "--to", "compressed-tensors", "--out", out, "--no-progress")
    assert rc == 0, se
    rc, _, err = _run(capsys, "eval", out, "--seqlen", "64", "--windows", "2", "--no-progress")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "running its command again with --eval wikitext2 --overwrite (llmprune export " in err
    assert str(outs["dense"]) in err
    for to, folder in (("compressed-tensors", out), ("gguf", tmp_path / "gguf")):  # bench: the output it came from
        if to == "gguf":
            assert _run(capsys, "export", outs["dense"], "--to", "gguf", "--out", folder, "--no-progress")[0] == 0
        rc, _, err = _run(capsys, "bench", folder, "--batch", "1", "--prompt-len", "4", "--new-tokens", "2")
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"export for another engine ({to})" in err and f"came from ({outs['dense']})" in err


@pytest.mark.parametrize("arch", ["mixtral", "smollm3"])
def test_a_gguf_transformers_cannot_read_is_measured_by_llama_cpp(tmp_path, capsys, calib_txt, arch):
    """`export --eval` measures the file as transformers reads it: for a family whose GGUF it does not read
    (Mixtral's experts, SmolLM3), refused before anything is written (it wrote the whole export, then failed on
    a reader's error that blamed the installed versions); `llmprune eval` of such an export names llama.cpp, not
    `export --eval`."""
    src, out, _ = _family_export(tmp_path, capsys, calib_txt, arch, types="f16", **DENSE_2025.get(arch, {}))
    _refused(capsys, tmp_path, src, "--to", "gguf", "--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows",
             "2", want=f"GGUF reader does not read a {arch} file: drop --eval and measure the file with llama.cpp")
    rc, _, err = _run(capsys, "eval", out, "--seqlen", "64", "--windows", "2", "--no-progress")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"export of a {arch} model" in err, err
    assert "llama-perplexity" in err


def test_refusals(tmp_path, capsys, outs):
    _refused(capsys, tmp_path, outs["w4s50"], "--to", "compressed-tensors", want="w4s50")
    _refused(capsys, tmp_path, outs["w4sym"], "--to", "compressed-tensors", "--quant", "gptq", want="already int4")
    _refused(capsys, tmp_path, outs["dense"], "--to", "gguf", "--type", "q4_k_m", want="llama-quantize")
    _refused(capsys, tmp_path, outs["dense"], "--to", "gguf", "--type", "q3", want="choose from")
    _refused(capsys, tmp_path, outs["dense"], "--to", "gguf", "--quant", "rtn", want="--quant gptq")
    _refused(capsys, tmp_path, outs["dense"], "--to", "gguf", "--group-size", "32", want="add --quant gptq")
    _refused(capsys, tmp_path, outs["dense"], "--to", "gguf", "--save-dtype", "float32", want="one go")
    for extra, want in ((["--type", "f16,q4_0"], "--type f16 with --quant gptq"),
                        (["--grid", "asym", "--type", "q4_0"], "--grid sym"),
                        (["--group-size", "16"], "groups of 32, 64, 128"),
                        (["--tune-steps", "2"], "tune the scales when packing")):
        _refused(capsys, tmp_path, outs["dense"], "--to", "gguf", "--quant", "gptq", *extra, want=want)
    _refused(capsys, tmp_path, outs["w4sym"], "--to", "gguf", "--quant", "gptq", want="already int4")
    _refused(capsys, tmp_path, outs["dense"], "--to", "compressed-tensors", "--quant", "gptq", "--hessian-gib", "nan",
             want="--hessian-gib nan")
    _refused(capsys, tmp_path, outs["dense"], "--to", "compressed-tensors", "--group-size", "16", want="Marlin")
    _refused(capsys, tmp_path, tmp_path / "nowhere", "--to", "gguf", want="not a folder")
    ok = tmp_path / "ok"
    assert _run(capsys, "export", outs["w4s50"], "--to", "gguf", "--type", "q8_0", "--out", ok, "--no-progress")[0] == 0
    _refused(capsys, tmp_path, ok, "--to", "gguf", want="already an export")


def test_gemma3_variant_gguf_cannot_express_is_refused(tmp_path, capsys, calib_txt):
    from llmprune.testing import byte_tokenizer, tiny_model

    m = tmp_path / "m"
    tiny_model("gemma3").save_pretrained(m)  # 2 layers, one sliding one global: not the 5:1 pattern
    byte_tokenizer().save_pretrained(m)
    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    _refused(capsys, tmp_path, src, "--to", "gguf", want="gemma3_text variant")


def test_slicegpt_with_shortcuts_is_refused(tmp_path, capsys, tiny_dir, calib_txt):
    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", tiny_dir, "--solver", "slicegpt", "--rotation", "per-block",
                                  "--slicing", "0.25", "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    _refused(capsys, tmp_path, src, "--to", "gguf", want="SliceGPT")
    _refused(capsys, tmp_path, src, "--to", "compressed-tensors", want="SliceGPT")


@pytest.mark.parametrize("full", [OSError(28, "No space left on device"),  # the OS's, and numpy's tofile's (no errno):
                                  OSError("Not enough free space to write 33030144 bytes after offset 1968030912")])
def test_failure_midway_leaves_nothing(tmp_path, capsys, outs, monkeypatch, full):
    from llmprune.export import gguf as target

    calls = []
    real = target.encode

    def fails_midway(*a, **k):  # the disk fills up while the tensors are written
        calls.append(1)
        if len(calls) == 7:
            raise full
        return real(*a, **k)

    monkeypatch.setattr(target, "encode", fails_midway)
    out = tmp_path / "g"
    rc, _, err = _run(capsys, "export", outs["dense"], "--to", "gguf", "--type", "f16,q8_0", "--out", out,
                      "--no-progress")
    assert rc == 2 and "no space left" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".g.*"))


def test_export_eval_reads_the_export_with_transformers(tmp_path, capsys, outs):
    """`--eval` measures the export as the engine's reader loads it (transformers' GGUF reader, or its
    compressed-tensors decompression), not llmprune's loader, in the source's compute dtype."""
    import llmprune

    ev = ["--eval", "wikitext2", "--eval-seqlen", "64", "--eval-windows", "2"]
    src = llmprune.evaluate(str(outs["w4sym"]), seqlen=64, windows=2, progress=False, save=False)["eval"]["wikitext2"]
    for to, extra, reader in (("gguf", ["--type", "f16"], "gguf_file="), ("compressed-tensors", [], "from_pretrained")):
        out = tmp_path / to
        rc, so, se = _run(capsys, "export", outs["w4sym"], "--to", to, *extra, *ev, "--out", out, "--no-progress")
        assert rc == 0, se
        r = json.loads((out / "llmprune.json").read_text())["eval"]["wikitext2"]
        assert r["measured_on"].startswith(f"export, loaded with transformers ({reader}") and r["windows"] == 2
        assert r["ppl"] == pytest.approx(src["ppl"], rel=2e-3)  # the same int4 weights (F16: rounded once)


def test_export_load_computes_in_the_dtype_asked_for(tmp_path, capsys, outs, monkeypatch):
    """A tensor transformers leaves in its stored dtype (5.17: Mixtral's router in a compressed-tensors export,
    mimicked here) is cast to the dtype asked for, so the reader's forward runs instead of refusing mixed dtypes."""
    import llmprune
    from llmprune import models

    out = tmp_path / "ct"
    assert _run(capsys, "export", outs["w4sym"], "--to", "compressed-tensors", "--out", out, "--no-progress")[0] == 0
    real = models.from_pretrained

    def stale(*a, **kw):
        m = real(*a, **kw)
        m.model.layers[0].input_layernorm.weight.data = m.model.layers[0].input_layernorm.weight.data.half()
        return m

    monkeypatch.setattr(models, "from_pretrained", stale)
    model, _ = llmprune.export.load(out)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    with torch.no_grad():
        assert torch.allclose(model(_ids()).logits, _ct_logits(out)[1], atol=1e-3)  # fp16 norm weights: exact


# --- one block at a time -----------------------------------------------------------------------------

STREAMED = [("w4s24", "compressed-tensors", []), ("24", "compressed-tensors", ["--group-size", "32"]),
            ("dense", "compressed-tensors", ["--group-size", "32", "--quant", "gptq"]),
            ("dense", "compressed-tensors", ["--group-size", "32", "--quant", "gptq", "--tune-steps", "4",
                                             "--tune-lr", "5e-3"]),
            ("w4s24", "gguf", ["--type", "f16,q8_0"]), ("dense", "gguf", ["--type", "q4_0"])]


@pytest.mark.parametrize("src,to,extra", STREAMED, ids=[f"{s}-{t}-{'-'.join(e)}" for s, t, e in STREAMED])
def test_export_reads_one_block_at_a_time_and_writes_what_the_whole_load_writes(tmp_path, capsys, outs, calib_txt,
                                                                                monkeypatch, src, to, extra):
    """The export walks the source from disk (a 70B source never in memory) and writes, shard by shard, the
    same tensors as the same export of the source loaded whole (forced); the sharded compressed-tensors
    folder is read by transformers to the same logits. Scale tuning (--tune-steps) reads every block to
    where it trains, one tensor at a time, the source never loaded whole (onload.gptq_tuned)."""
    from safetensors.torch import load_file

    from llmprune import lazy, onload
    from llmprune.testing import hold_one_block

    tuning = "--tune-steps" in extra
    if "gptq" in extra:
        extra = [*extra, "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32"]
    codes, most = [], [0]
    with monkeypatch.context() as m:
        m.setattr(onload, "stored_as_in_memory", lambda lz: "forced whole")
        if "gptq" in extra and not tuning:  # each layer's codes watched: how many made before are still alive
            import weakref

            from llmprune.quant import gptq as gptq_mod

            def gptq(*a, real=gptq_mod.gptq, **k):
                most[0] = max(most[0], sum(c() is not None for c in codes))
                q = real(*a, **k)
                codes.append(weakref.ref(q.codes))
                return q
            m.setattr(gptq_mod, "gptq", gptq)
        rc, _, se = _run(capsys, "export", outs[src], "--to", to, *extra, "--out", tmp_path / "whole", "--no-progress")
        assert rc == 0, se
    if codes:  # the model in memory: each block written as GPTQ finishes it, its codes alone alive (not the model's)
        blocks = json.loads((tmp_path / "whole" / "config.json").read_text())["num_hidden_layers"]
        assert blocks > 1 and most[0] < len(codes) // blocks, (most, len(codes))
    with monkeypatch.context() as m:
        most = hold_one_block(m, None if tuning else 1)
        m.setattr(lazy, "SHARD_BYTES", 20_000)
        rc, _, se = _run(capsys, "export", outs[src], "--to", to, *extra, "--out", tmp_path / "blocks",
                         "--no-progress")
        assert rc == 0, se
        assert most[0] == (2 if tuning else 1)
    whole, blocks = tmp_path / "whole", tmp_path / "blocks"
    if to == "gguf":
        names = sorted(f.name for f in whole.glob("*.gguf"))
        assert names == sorted(f.name for f in blocks.glob("*.gguf")) and names
        for n in names:
            assert (whole / n).read_bytes() == (blocks / n).read_bytes(), n
        return
    a = load_file(whole / "model.safetensors")
    files = sorted(blocks.glob("*.safetensors"))
    assert len(files) > 1 and (blocks / "model.safetensors.index.json").exists()
    b = {k: v for f in files for k, v in load_file(f).items()}
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole / "config.json").read_text()) == json.loads((blocks / "config.json").read_text())
    qa, qb = (json.loads((f / "llmprune.json").read_text())["export"].get("quant", {}) for f in (whole, blocks))
    if tuning:
        assert qb["tune"]["kept"] == "tuned" and qb["tune"]["kl_after"] < qb["tune"]["kl_before"]
        assert {k: v for k, v in qa["tune"].items() if k != "seconds"} == \
            {k: v for k, v in qb["tune"].items() if k != "seconds"}
    if "gptq" not in extra:  # (GPTQ: compared by tensors above; transformers reads it in test_ct_gptq_on_export)
        _, got = _ct_logits(blocks)
        _, want = _ct_logits(whole)
        assert torch.equal(got, want)


# --- compress --export, the Python call, llmprune.load, cards ------------------------------------------

def test_compress_export_python_call_load_and_card(tmp_path, capsys, tiny_dir, calib_txt):
    import llmprune
    import llmprune.export.gguf  # (makes llmprune.export the package: still callable)
    from llmprune import hub

    out = tmp_path / "o"
    rc, so, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, *FAST_CLI,
                      "--export", "gguf", "--export-type", "q8_0")
    assert rc == 0, se
    assert "exported" in so
    g = tmp_path / "o-gguf"
    assert next(g.glob("*-Q8_0.gguf")).is_file()
    m = llmprune.export(str(out), "compressed-tensors", str(tmp_path / "ct"), progress=False)
    assert m["out"] == str(tmp_path / "ct")
    model, tok, man = llmprune.load(str(g))  # through transformers' GGUF reader
    assert man["export"]["to"] == "gguf" and model(_ids()).logits.shape[-1] == model.config.vocab_size
    from llmprune.eval.perplexity import window_nll

    ct, _, _ = llmprune.load(str(tmp_path / "ct"))  # decompressed for the base-model forward perplexity uses
    assert torch.isfinite(window_nll(ct, _ids())).all()
    cards = {to: hub.model_card(json.loads((d / "llmprune.json").read_text()), "me/x")
             for to, d in (("gguf", g), ("compressed-tensors", tmp_path / "ct"))}
    assert "library_name: gguf" in cards["gguf"] and "- gguf" in cards["gguf"]
    assert "library_name: transformers" in cards["compressed-tensors"] and "- compressed-tensors" in \
        cards["compressed-tensors"]
    for card in cards.values():
        assert "does not exploit the sparsity" in card


@pytest.mark.parametrize("t", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16"])
def test_gguf_encodes_large_tensors_in_pieces_of_rows_exactly(t, monkeypatch):
    """Rows go through gguf's quantizer a few at a time (bounded temporaries): the bytes are those of
    quantizing the whole tensor at once."""
    import gguf
    import numpy as np

    from llmprune.export import gguf as target

    data = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32)
    data[3, :40] = 0
    monkeypatch.setattr(target, "ENCODE_CHUNK", 96 * 4 * 5)  # 5 rows a piece: 8 pieces, the last one short
    got, q = target.encode(data, t)
    want = gguf.quants.quantize(data, getattr(gguf.GGMLQuantizationType, t.upper()))
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_codes_encode_as_gguf_blocks_that_gguf_decodes_to_the_same_weights(group):
    """An int4 grid (x = s (q - z), fp16 s; rows permuted as q/k are) in every block type: gguf's own dequantizer
    gives the weights back bit for bit (symmetric: every type; asymmetric: Q5_0, Q5_1, Q8_0, and Q4_1 within its
    fp16 minimum, under 1% of a step, where a block's steps do not fit Q4's); what is not one step and one offset a
    block, or Q4_0 of asymmetric codes that do not fit it, is None."""
    import gguf
    import numpy as np

    from llmprune.export.gguf_int4 import TYPES, encode

    g = torch.Generator().manual_seed(group)
    rows, cols = 7, 3 * 128
    s = (torch.rand(rows, cols // group, generator=g) * 0.05 + 1e-3).half().float()
    for sym in (True, False):
        z = torch.full_like(s, 8.0) if sym else torch.randint(0, 16, s.shape, generator=g).float()
        q = torch.randint(0, 16, (rows, cols), generator=g).float()
        q[:, :5] = z.repeat_interleave(group, 1)[:, :5]  # pruned weights: code z, exactly 0
        step, zero = s.repeat_interleave(group, 1), z.repeat_interleave(group, 1)
        perm = torch.randperm(rows, generator=g)
        x, step, offset = ((q - zero) * step)[perm], step[perm], (-step * zero)[perm]
        for t in TYPES:
            got = encode(x.numpy(), step.numpy(), offset.numpy(), t)
            if t == "q4_0" and not sym:
                assert got is None
                continue
            back = gguf.quants.dequantize(got[0], getattr(gguf.GGMLQuantizationType, t.upper()))
            assert back.shape == x.shape
            err = np.abs(back - x.numpy()) / step.numpy()
            assert err.max() == got[1] == 0 if sym or t != "q4_1" else 0 < err.max() <= got[1] + 1e-6 < 0.01, t
            if sym or t != "q4_1":
                assert np.array_equal(back[:, :5], np.zeros((rows, 5), np.float32))
        wrong = step.clone()
        wrong[2, 40] *= 2  # one weight of a block on another step
        assert encode(x.numpy(), wrong.numpy(), offset.numpy(), "q5_0") is None
        assert encode(x.numpy(), step.numpy(), offset.numpy() + step.numpy() / 3, "q8_0") is None  # (no codes)
    fits = np.array([[-3.0, 7.0] * 16], np.float32) * 0.5  # an asymmetric block (z = 3) whose steps fit Q4_0's
    got = encode(fits, np.full((1, 32), 0.5, np.float32), np.full((1, 32), -1.5, np.float32), "q4_0")
    assert np.array_equal(gguf.quants.dequantize(got[0], gguf.GGMLQuantizationType.Q4_0), fits)


# the block types an int4 output's codes are written in (gguf_int4.TYPES), each file's tensors of an int4 layer
INT4_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


@pytest.mark.parametrize("src", ["w4sym", "w4s24", "w4asym"])
def test_gguf_blocks_of_an_int4_output_hold_its_own_codes(tmp_path, capsys, outs, src):
    """`export --to gguf --type q4_0,...` of a w4g128 / w4s24 output writes each int4 linear's own codes and
    scales as the type's blocks (llama.cpp runs the int4 model llmprune measured, GPTQ's codes kept), not gguf's
    round-to-nearest of the dequantized weights, which rounds them again onto another grid (checked: it would
    differ): read back with gguf's dequantizer, each is the source's weight (q/k rows in llama.cpp's order), bit
    for bit, but an asymmetric grid's Q4_1 (its minima rounded to fp16); an asymmetric grid as Q4_0 is quantized
    again, which the export counts and prints with the type that keeps it."""
    import gguf
    import numpy as np

    from llmprune.export.gguf_tensors import permute_rows
    from llmprune.export.source import Weights, open_source

    out = tmp_path / "g"
    rc, so, se = _run(capsys, "export", outs[src], "--to", "gguf", "--type", ",".join(INT4_TYPES), "--out", out,
                      "--no-progress")
    assert rc == 0, se
    e = json.loads((out / "llmprune.json").read_text())["export"]
    weights = Weights(open_source(outs[src]))  # the int4 linears dequantized, exactly
    cfg, sd = weights.model.config, dict(weights.tensors())
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    n = cfg.num_hidden_layers * len(names)
    sym = src != "w4asym"
    for t in INT4_TYPES:
        kept = n if sym or t != "q4_0" else 0
        assert e["int4_codes"][t]["kept"] == kept and e["int4_codes"][t]["requantized"] == n - kept, t
        assert (e["int4_codes"][t]["max_error_steps"] > 0) == (not sym and t == "q4_1")
    assert "int4 codes: Q5_0 holds 14 int4 tensors' own codes\n" in so
    assert ("Q4_0 holds 14 int4 tensors' own codes\n" if sym else "--type q5_0 keeps its codes exactly") in so, so
    for t in (x.upper() for x in INT4_TYPES):
        tensors = {x.name: x for x in gguf.GGUFReader(out / e["files"][e["types"].index(t.lower())]).tensors}
        for i in range(cfg.num_hidden_layers):
            for hf, gg in names.items():
                w = sd[f"model.layers.{i}.{hf}.weight"].float()
                if hf.endswith(("q_proj", "k_proj")):
                    w = permute_rows(w, cfg.num_attention_heads if "q_" in hf else cfg.num_key_value_heads)
                x = tensors[f"blk.{i}.{gg}.weight"]
                assert x.tensor_type.name == t
                back = gguf.quants.dequantize(x.data, x.tensor_type).reshape(w.shape)
                w = w.numpy()
                again = gguf.quants.dequantize(gguf.quants.quantize(w, x.tensor_type), x.tensor_type)
                if t != "Q4_0" or sym:
                    assert not np.array_equal(again, w)  # (gguf's own rounding would have changed the weights)
                if t == "Q4_1" and not sym:
                    assert np.abs(back - w).max() <= 0.01 * np.abs(w).max() and not np.array_equal(back, w)
                elif t == "Q4_0" and not sym:
                    assert np.array_equal(back, again)  # quantized again by gguf, as before
                else:
                    assert np.array_equal(back, w), (t, i, hf)


def test_gguf_gptq_on_export_writes_the_codes_pack_then_export_writes(tmp_path, capsys, outs, calib_txt, tiny_dir):
    """`export --to gguf --quant gptq` of a pruned output in one command: GPTQ's codes (groups of 32, the symmetric
    grid) as the blocks of Q4_0 and Q5_0, each tensor byte for byte what `pack --format w4g128 --grid sym --group-size
    32 --quant gptq` then `export --to gguf` writes (the same GPTQ, its codes kept), every linear's codes kept, the
    pruned weights exact zeros; `compress --export gguf --export-quant gptq` writes Q4_0 by default."""
    import gguf
    import numpy as np

    calib = ["--calib", calib_txt, "--nsamples", "4", "--seqlen", "32"]
    one, packed, two = tmp_path / "one", tmp_path / "w4", tmp_path / "two"
    rc, so, se = _run(capsys, "export", outs["dense"], "--to", "gguf", "--quant", "gptq", "--type", "q4_0,q5_0",
                      *calib, "--out", one, "--no-progress")
    assert rc == 0, se
    assert "int4 codes: Q4_0 holds 14 int4 tensors' own codes\n" in so, so
    assert "quantized on export: GPTQ, int4 groups of 32, symmetric grid\n" in so, so
    m = json.loads((one / "llmprune.json").read_text())
    assert m["steps"] == ["prune", "quantize", "export"]
    q = m["export"]["quant"]
    assert (q["quant"], q["group_size"], q["symmetric"], q["act_order"]) == ("gptq", 32, True, True)
    assert m["export"]["int4_codes"]["q5_0"] == {"kept": 14, "requantized": 0, "max_error_steps": 0.0}
    assert main([str(a) for a in ("pack", outs["dense"], "--format", "w4g128", "--grid", "sym", "--group-size", "32",
                                  "--quant", "gptq", *calib, "--out", packed, "--no-progress")]) == 0
    assert _run(capsys, "export", packed, "--to", "gguf", "--type", "q4_0,q5_0", "--out", two, "--no-progress")[0] == 0
    dense = {k: v.float().numpy() for k, v in folder_tensors(outs["dense"]).items()}
    files = json.loads((two / "llmprune.json").read_text())["export"]["files"]
    for i, f in enumerate(m["export"]["files"]):
        got = {x.name: x for x in gguf.GGUFReader(one / f).tensors}
        want = {x.name: x for x in gguf.GGUFReader(two / files[i]).tensors}
        assert sorted(got) == sorted(want)
        linears = [n for n, x in got.items() if x.tensor_type.name in ("Q4_0", "Q5_0")]  # (the embedding, Q8_0, and
        assert len(linears) == 14  # the norms are the pack's fp16 copies there)
        for name in linears:
            x = got[name]
            assert x.tensor_type == want[name].tensor_type and np.array_equal(x.data, want[name].data), (f, name)
        w = gguf.quants.dequantize(got["blk.1.ffn_down.weight"].data, got["blk.1.ffn_down.weight"].tensor_type)
        src = dense["model.layers.1.mlp.down_proj.weight"]
        assert (src == 0).mean() > 0.4 and np.array_equal(w.reshape(src.shape)[src == 0], src[src == 0])
        assert not np.array_equal(w.reshape(src.shape), src)  # (quantized)
    out = tmp_path / "c"
    assert main([str(a) for a in ("compress", "--model", tiny_dir, *calib, "--out", out,
                                  "--export", "gguf", "--export-quant", "gptq", "--no-progress", "--eval",
                                  "none")]) == 0
    m = json.loads((tmp_path / "c-gguf" / "llmprune.json").read_text())
    e = m["export"]
    assert e["types"] == ["q4_0"] and e["int4_codes"]["q4_0"]["kept"] == 14 and e["quant"]["quant"] == "gptq"
    from llmprune import hub

    assert "pruned; quantized to int4 (GPTQ); exported to gguf" in hub.model_card(m, "me/x")  # (not "RTN")


@pytest.mark.parametrize("arch", ["phi3", "glm4"])
def test_gguf_blocks_of_fused_linears_hold_their_codes(tmp_path, capsys, calib_txt, arch):
    """Phi-3's qkv_proj and gate_up_proj (GLM-4's gate_up_proj), packed whole as int4 layers (one grid over the
    parts' rows), written fused or as llama.cpp's split of them: every block holds their codes, read back by gguf's
    dequantizer to the F32 file's tensor of the same export bit for bit."""
    import gguf
    import numpy as np

    from llmprune.testing import byte_tokenizer, tiny_model

    m, src, w4, out = (tmp_path / x for x in ("m", "s", "w4", "g"))
    tiny_model(arch, **FAMILIES.get(arch, {})).save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    assert main([str(a) for a in ("pack", src, "--format", "w4g128", "--grid", "sym", "--group-size", "32", "--out",
                                  w4, "--no-progress")]) == 0
    layers = json.loads((w4 / "llmprune.json").read_text())["format"]["layers"]
    assert "model.layers.1.mlp.gate_up_proj" in layers
    rc, _, se = _run(capsys, "export", w4, "--to", "gguf", "--type", "f32,q4_0,q5_0", "--out", out, "--no-progress")
    assert rc == 0, se
    e = json.loads((out / "llmprune.json").read_text())["export"]
    exact = {x.name: x.data for x in gguf.GGUFReader(out / e["files"][0]).tensors}
    for t, f in zip(e["types"][1:], e["files"][1:]):
        coded = [x for x in gguf.GGUFReader(out / f).tensors if x.name.startswith("blk.")
                 and x.tensor_type.name == t.upper()]
        assert e["int4_codes"][t] == {"kept": len(coded), "requantized": 0, "max_error_steps": 0.0}
        assert {x.name.split(".")[2] for x in coded} >= {"ffn_up", "ffn_down", "attn_output"}
        for x in coded:
            back = gguf.quants.dequantize(x.data, x.tensor_type)
            assert np.array_equal(back.reshape(exact[x.name].shape), exact[x.name]), (f, x.name)


# --- GGUF: more families, Llama 3.1's RoPE, tokenizers from tokenizer.json ---------------------------------

# what transformers' GGUF reader can rebuild from the metadata alone (it reads no key_length for Qwen3, no expert
# widths for the MoE families, no query scale or soft-caps for Gemma-2: those tiny models use its defaults); Qwen2
# with room for the token transformers 5 adds to the byte tokenizer (it loads it for a qwen2 model as Qwen2's)
FAMILIES = {"qwen2": {"vocab_size": 300}, "qwen3": {"head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1},
            "qwen2_moe": {}, "qwen3_moe": {}, "phi3": {}, "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256}}


def _family_export(tmp_path, capsys, calib_txt, arch, types="f32,q8_0", **over):
    from llmprune.testing import byte_tokenizer, tiny_model

    m, src, out = tmp_path / "m", tmp_path / "s", tmp_path / "g"
    tiny_model(arch, **{**FAMILIES.get(arch, {}), **over}).save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    rc, _, se = _run(capsys, "export", src, "--to", "gguf", "--type", types, "--out", out, "--no-progress")
    assert rc == 0, se
    return src, out, json.loads((out / "llmprune.json").read_text())["export"]


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_gguf_families_read_by_transformers(tmp_path, capsys, calib_txt, arch):
    """Each family as llama.cpp lays it out, read back by transformers' GGUF reader (its own tensor processors:
    Gemma's 1 + w norms, the MoE experts split into gate / up / down): F32 gives the pruned model's logits
    exactly, Q8_0 within int8 noise, and the pruned weights stay exact zeros (experts included)."""
    import gguf
    import numpy as np

    import llmprune

    src, out, e = _family_export(tmp_path, capsys, calib_txt, arch)
    ref, _, _ = llmprune.load(str(src))
    want = ref(_ids()).logits.detach()
    kw = {"config": ref.config} if arch.endswith("moe") else {}  # expert widths: metadata the reader does not map
    for fname, tol in zip(e["files"], (1e-6, 0.1 if kw else 3e-2)):  # Q8_0 noise flips some tokens' experts
        model = AutoModelForCausalLM_gguf(out, fname, **kw)
        got = model(_ids()).logits.detach()
        assert (got - want).norm() / want.norm() < tol, (fname, float((got - want).norm() / want.norm()))
        w_ref = ref.state_dict()
        w_got = model.state_dict()
        for k in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.experts.down_proj",
                  "model.layers.1.mlp.down_proj.weight"):
            if k in w_ref:
                assert int((w_ref[k] == 0).sum()) > 0 and bool((w_got[k][w_ref[k] == 0] == 0).all()), (fname, k)
    r = gguf.GGUFReader(out / e["files"][0])
    name = r.fields["general.architecture"].contents()
    assert name == {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.get(arch, arch)
    cfg = ref.config
    if arch.endswith("moe"):  # what llama.cpp reads and transformers' reader does not
        assert r.fields[f"{name}.expert_feed_forward_length"].contents() == cfg.moe_intermediate_size
        assert r.fields[f"{name}.expert_count"].contents() == cfg.num_experts
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # the router keeps full precision, as llama.cpp's
    if arch == "qwen2_moe":  # llama.cpp's qwen2moe has no tied-head fallback: the embedding written twice
        t = {x.name: x for x in r.tensors}
        assert np.array_equal(np.array(t["output.weight"].data), np.array(t["token_embd.weight"].data))
    if arch == "gemma2":
        assert r.fields["gemma2.attn_logit_softcapping"].contents() == cfg.attn_logit_softcapping
        assert r.fields["gemma2.final_logit_softcapping"].contents() == cfg.final_logit_softcapping


def AutoModelForCausalLM_gguf(folder, fname, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, **kw)


def test_gguf_llama31_rope_scaling_as_rope_freqs(tmp_path, capsys, calib_txt):
    """Llama 3.1's RoPE scaling as llama.cpp reads it: `rope_freqs` whose quotients of the base frequencies are
    exactly transformers' own llama3 frequencies (an original context of 64 so that the head's 8 frequencies
    cover the three regimes: kept, interpolated, divided by the factor)."""
    import gguf
    import numpy as np
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src, out, e = _family_export(tmp_path, capsys, calib_txt, "llama", types="f32", rope_parameters=rp)
    r = gguf.GGUFReader(out / e["files"][0])
    factors = torch.tensor(np.array({t.name: t for t in r.tensors}["rope_freqs.weight"].data))
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(src), "cpu")
    base = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(base / factors, want, rtol=1e-6)
    assert factors[0] == 1 and factors[-1] == 8 and bool(((factors > 1) & (factors < 8)).any())
    _refused(capsys, tmp_path, _scaled(tmp_path, capsys, calib_txt), "--to", "gguf", want="RoPE scaling 'linear'")


def _scaled(tmp_path, capsys, calib_txt):
    from llmprune.testing import tiny_model_dir

    m = tiny_model_dir(tmp_path / "y", "qwen2", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                "factor": 4.0})
    src = tmp_path / "ys"
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    return src


@pytest.mark.parametrize("arch, over, want", [
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 256}, "query scale"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
])
def test_gguf_variants_llama_cpp_would_misread_are_refused(tmp_path, capsys, calib_txt, arch, over, want):
    from llmprune.testing import tiny_model_dir

    m = tiny_model_dir(tmp_path / "m", arch, **{**FAMILIES[arch], **over})
    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    _refused(capsys, tmp_path, src, "--to", "gguf", want=want)


def _bpe_tokenizer(split_regex, merges=True, ignore_merges=False):
    """A byte-level BPE tokenizer that splits with `split_regex` first, as Llama 3's and Qwen2's tokenizer.json do
    (Split, then ByteLevel without its own regex); Llama 3's takes a word found whole in the vocabulary as it is
    (ignore_merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<bos>"], vocab["<eos>"], vocab["\u0100\u0100"] = 256, 257, 258
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0100", "\u0100")] if merges else [], ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def _spm_tokenizer(prefix=True):
    """A SentencePiece-style tokenizer.json: BPE over "▁"-joined pieces with byte fallback (<0x00>..<0xFF>), a
    Sequence decoder; "▁" put before the text as Llama 2's and Mistral's do (`prefix`) or not, as Gemma's. Its
    merge order matters: "bc" before "ab", so "abc" is a + bc, where merging left to right gives ab + c."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "c", "e", "h", "t", "m", "o", "d", "l", "ab"):  # "ab" first in the vocabulary
        vocab.setdefault(piece, len(vocab))
    merges = [("b", "c"), ("a", "b"), ("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "m"), ("▁m", "o")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["llama-bpe", "dbrx", "qwen2", "tekken", "gpt-4o", "spm", "spm no prefix", "unknown",
                                  "no merges"])
def test_gguf_tokenizer_from_tokenizer_json(tmp_path, capsys, calib_txt, kind):
    """A model not loaded from a GGUF: its tokenizer.json as llama.cpp's converter writes it. Byte-level BPE
    gets the pre-tokenizer name llama.cpp tokenizes the same way with (Llama 3: llama-bpe; the same split without
    its whole-word rule, as Phi-4's and OLMo 2's: dbrx; Qwen2: qwen2; Mistral NeMo: tekken; o200k: gpt-4o); a
    SentencePiece-style one llama.cpp's `llama` vocabulary (its pieces scored by merge rank, "▁" before the text
    or not), which transformers' GGUF reader turns back into a tokenizer giving the same ids; any other
    pre-tokenizer is refused, nothing written, as is a BPE vocabulary without merges (llama.cpp does not load
    one)."""
    import gguf

    from llmprune.export.gguf_tokenizer import GPT4O_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT, TEKKEN_SPLIT
    from llmprune.testing import tiny_model

    tok = {"llama-bpe": lambda: _bpe_tokenizer(LLAMA3_SPLIT, ignore_merges=True),
           "dbrx": lambda: _bpe_tokenizer(LLAMA3_SPLIT),  # cl100k's split without Llama 3's whole-word rule
           "qwen2": lambda: _bpe_tokenizer(QWEN2_SPLIT), "spm": _spm_tokenizer,
           "tekken": lambda: _bpe_tokenizer(TEKKEN_SPLIT, ignore_merges=True), "gpt-4o": lambda: _bpe_tokenizer(GPT4O_SPLIT),
           "spm no prefix": lambda: _spm_tokenizer(prefix=False),
           "unknown": lambda: _bpe_tokenizer("\\s+"),
           "no merges": lambda: _bpe_tokenizer(LLAMA3_SPLIT, merges=False)}[kind]()
    m = tmp_path / "m"
    spm = kind.startswith("spm")
    tiny_model("llama", **({"vocab_size": 300} if spm else {})).save_pretrained(m)
    tok.save_pretrained(m)
    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    if kind in ("unknown", "no merges"):
        _refused(capsys, tmp_path, src, "--to", "gguf", want="pre-tokenizer" if kind == "unknown" else "without merges")
        return
    out = tmp_path / "g"
    rc, _, se = _run(capsys, "export", src, "--to", "gguf", "--type", "f32", "--out", out, "--no-progress")
    assert rc == 0, se
    e = json.loads((out / "llmprune.json").read_text())["export"]
    r = gguf.GGUFReader(out / e["files"][0])
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == (300 if spm else VOCAB)
    if not spm:
        assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert r.fields["tokenizer.ggml.pre"].contents() == kind and kind in e["tokenizer"]
        return
    from transformers import AutoTokenizer

    assert r.fields["tokenizer.ggml.model"].contents() == "llama" and "SentencePiece" in e["tokenizer"]
    assert r.fields["tokenizer.ggml.add_space_prefix"].contents() is (kind == "spm")
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x41] == "<0x41>"
    if kind != "spm":
        return  # transformers' GGUF reader puts "▁" first whatever the file says (llama.cpp: bench/llamacpp_families.py)
    back = AutoTokenizer.from_pretrained(out, gguf_file=e["files"][0])
    text = "the model abc the mode, Äthe abc"
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert back(text, add_special_tokens=False)["input_ids"] == want
    assert tok.get_vocab()["bc"] in want and tok.get_vocab()["ab"] not in want  # the merge order, kept


def test_gguf_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, capsys, calib_txt):
    """GGUF readers size the vocabulary from the token list: more tokens than embedding rows cannot be written."""
    from llmprune.testing import byte_tokenizer, tiny_model_dir

    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", tiny_model_dir(tmp_path / "m"), "--calib", calib_txt,
                                  "--out", src, *FAST_CLI)]) == 0
    tok = byte_tokenizer()
    tok.add_tokens(["<extra-1>", "<extra-2>"])
    tok.save_pretrained(src)
    _refused(capsys, tmp_path, src, "--to", "gguf", want=f"has {VOCAB + 2} tokens but the model embeds {VOCAB}")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "glm4_moe",
                                    "qwen3_next", "minimax_m2"])
def test_ct_of_a_moe_model_is_one_int4_linear_per_expert(tmp_path, capsys, calib_txt, family):
    """A Mixture-of-Experts model is exported as its checkpoint stores it, one linear per expert (Mixtral's
    `block_sparse_moe.experts.3.w1`), each packed as int4 under one scheme for every linear layer (`Linear`, as
    vLLM looks up an experts layer's scheme), the routers (and Qwen2-MoE's shared-expert gate) listed in
    `ignore`. transformers reads it back (decompressing each expert and fusing them): every expert's and every
    attention layer's weights are llmprune's round-to-nearest of the source's, pruned weights exact zeros."""
    from safetensors import safe_open

    import llmprune
    from llmprune import arch
    from llmprune.quant.rtn import rtn
    from llmprune.testing import tiny_model_dir

    src, out = tmp_path / "s", tmp_path / "ct"
    assert main([str(a) for a in ("compress", "--model", tiny_model_dir(tmp_path / "m", family), "--calib",
                                  calib_txt, "--out", src, *FAST_CLI)]) == 0
    capsys.readouterr()
    rc, _, se = _run(capsys, "export", src, "--to", "compressed-tensors", "--out", out, "--no-progress")
    assert rc == 0, se
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["group_size"] == 32
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    stored = [k.removesuffix(".weight") for k in names if ".experts." in k and k.endswith(".weight")]
    routers = [k.removesuffix(".weight") for k in names
               if k.endswith(("mlp.gate.weight", "moe.gate.weight", "shared_expert_gate.weight"))]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(stored) == 2 * 8 * 3 and all(f"{n}.weight_packed" in keys and f"{n}.weight" not in keys for n in stored)
    assert routers and sorted(q["ignore"]) == sorted([*routers, "lm_head"])
    source, _, _ = llmprune.load(str(src))
    model, _ = llmprune.export.load(str(out))
    names = arch.linear_names(source)
    assert sum(".experts[" in n for n in names) == len(stored)
    for n in names:
        w = arch.target(source, n).weight.detach()
        got = arch.target(model, n).weight.detach().float()
        want = rtn(w.half().float(), w != 0, 32, True).dequantize()
        torch.testing.assert_close(got, want, rtol=2**-10, atol=0)  # transformers fuses experts in fp16
        assert bool((got[w == 0] == 0).all()), n
    m = json.loads((out / "llmprune.json").read_text())
    assert m["export"]["layers"] == len(names) and m["export"]["quant"]["group_size"] == 32


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_ct_gptq_of_a_moe_model_writes_each_experts_own_codes(tmp_path, capsys, calib_txt, family):
    """GPTQ on export reaches the experts (each from its routed tokens: tests/test_quant.py), and each expert's
    codes are written under that expert's stored name (Mixtral: w1 gate, w3 up, w2 down): transformers' read of
    the export holds, per expert, the weights GPTQ's pass over the source computes."""
    import llmprune
    from llmprune import arch, pipeline
    from llmprune.config import GPTQConfig
    from llmprune.quant.sequential import gptq_sequential
    from llmprune.testing import tiny_model_dir

    src, out = tmp_path / "s", tmp_path / "ct"
    assert main([str(a) for a in ("compress", "--model", tiny_model_dir(tmp_path / "m", family), "--calib",
                                  calib_txt, "--out", src, *FAST_CLI)]) == 0
    capsys.readouterr()
    rc, _, se = _run(capsys, "export", src, "--to", "compressed-tensors", "--quant", "gptq", "--calib", calib_txt,
                     "--nsamples", "8", "--seqlen", "32", "--out", out, "--no-progress")
    assert rc == 0, se
    source, tok, _ = llmprune.load(str(src))
    ids, _ = pipeline.calibrate(str(calib_txt), tok, 8, 32, 0)
    codes = gptq_sequential(source, ids, "w4g128", 32, True, dtype=torch.float16, **GPTQConfig().as_dict())
    model, _ = llmprune.export.load(str(out))
    views = [n for n in codes if ".experts[" in n]
    assert len(views) == 2 * 8 * 3
    for n in views:
        torch.testing.assert_close(arch.target(model, n).weight.detach().float(), codes[n].dequantize(),
                                   rtol=2**-10, atol=0)
    q = json.loads((out / "llmprune.json").read_text())["export"]["quant"]
    assert q["quant"] == "gptq" and q["experts"]["per_expert"] and q["group_size"] == 32 and "hessian_runs" not in q
    if family == "qwen3_moe":  # each Hessian a run of its own (--hessian-gib 0): the same export, the runs recorded
        rc, _, se = _run(capsys, "export", src, "--to", "compressed-tensors", "--quant", "gptq", "--calib", calib_txt,
                         "--nsamples", "8", "--seqlen", "32", "--out", tmp_path / "ct0", "--no-progress",
                         "--hessian-gib", "0")
        assert rc == 0, se
        files = sorted(f.name for f in out.glob("*.safetensors"))
        assert files and all((out / f).read_bytes() == (tmp_path / "ct0" / f).read_bytes() for f in files)
        q0 = json.loads((tmp_path / "ct0" / "llmprune.json").read_text())["export"]["quant"]
        assert q0["hessian_runs"] == {"budget_gib": 0.0, "extra": 2 * (4 + 8 + 8 - 1)}  # q k v o, 8 gate+up, 8 downs
        # scale tuning after GPTQ (the source read block by block, the experts trained as split modules: onload.py)
        rc, _, se = _run(capsys, "export", src, "--to", "compressed-tensors", "--quant", "gptq", "--calib", calib_txt,
                         "--nsamples", "8", "--seqlen", "32", "--tune-steps", "4", "--tune-lr", "5e-3", "--out",
                         tmp_path / "ctt", "--no-progress")
        assert rc == 0, se
        from safetensors.torch import load_file

        a, b = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                for d in (out, tmp_path / "ctt"))
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and {k.rsplit(".", 1)[-1] for k in differ} == {"weight_scale"}, differ
        assert any(".experts." in k for k in differ) and any(".self_attn." in k for k in differ)
        t = json.loads((tmp_path / "ctt" / "llmprune.json").read_text())["export"]["quant"]["tune"]
        assert t["kept"] == "tuned" and t["kl_after"] < t["kl_before"]


def test_ct_of_a_moe_model_refuses_what_vllm_cannot_run(tmp_path, capsys, calib_txt):
    """gpt-oss stores its experts fused (no per-expert int4 layout), and vLLM runs an experts layer under one
    scheme: each refused in one line, before anything is written."""
    from llmprune.testing import tiny_model_dir

    for family in ("gpt_oss", "qwen3_moe"):
        assert main([str(a) for a in ("compress", "--model", tiny_model_dir(tmp_path / family, family), "--calib",
                                      calib_txt, "--out", tmp_path / f"{family}-o", *FAST_CLI)]) == 0
    capsys.readouterr()
    _refused(capsys, tmp_path, tmp_path / "gpt_oss-o", "--to", "compressed-tensors",
             want="gpt_oss checkpoints store its 8 experts per layer fused")
    _refused(capsys, tmp_path, tmp_path / "qwen3_moe-o", "--to", "compressed-tensors", "--group-size", "64",
             want="that divides every layer's width")


@pytest.mark.parametrize("arch, to, want", [("opt", "gguf", "--to gguf writes"),
                                            ("gpt_oss", "compressed-tensors", "experts per layer fused")])
def test_compress_export_to_a_target_that_cannot_write_the_family_is_refused_before_any_work(
        tmp_path, capsys, calib_txt, monkeypatch, arch, to, want):
    """`compress --export` reads the model's config before it computes: a family the target does not write stops
    there (no pruning, no output folder), not after hours of compression."""
    from llmprune import prune
    from llmprune.testing import tiny_model_dir

    m = tiny_model_dir(tmp_path / "m", arch)
    capsys.readouterr()
    monkeypatch.setattr(prune, "prune", lambda *a, **k: pytest.fail("pruned before the refusal"))
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "compress", "--model", m, "--calib", calib_txt, "--out", out, *FAST_CLI, "--export", to)
    assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".o*")) and not (tmp_path / f"o-{to}").exists()



@pytest.mark.parametrize("extra, want", [
    (["--export", "gguf", "--export-quant", "rtn"], "round to nearest themselves"),
    (["--export", "gguf", "--export-quant", "gptq", "--export-type", "f16"], "GPTQ's codes go into GGUF's block"),
    (["--solver", "slicegpt", "--export", "gguf"], "residual shortcuts"),
    (["--solver", "slicegpt", "--rotation", "shared", "--export", "compressed-tensors"], "--slice-head"),
])
def test_compress_export_options_the_export_would_refuse_are_refused_first(tmp_path, capsys, calib_txt, tiny_dir,
                                                                          monkeypatch, extra, want):
    """They were refused by the export, after the compression had written its output (a rerun with fixed flags
    then found the output in the way)."""
    from llmprune import prune
    from llmprune.transforms import slicegpt

    monkeypatch.setattr(prune, "prune", lambda *a, **k: pytest.fail("pruned before the refusal"))
    monkeypatch.setattr(slicegpt, "slice_model", lambda *a, **k: pytest.fail("sliced before the refusal"))
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, *FAST_CLI, *extra)
    assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_export_precheck_refuses_what_a_gguf_export_cannot_quantize():
    """The Python API's `compress(export="gguf", export_quant=...)` reaches precheck without the CLI's check."""
    from llmprune import export
    from llmprune.errors import LLMPruneError

    with pytest.raises(LLMPruneError, match="round to nearest themselves"):
        export.precheck("gguf", ("q4_0",), "rtn")
    with pytest.raises(LLMPruneError, match="--type f16 with --quant gptq"):
        export.precheck("gguf", ("f16",), "gptq")
    export.precheck("gguf", ("q4_0",), "gptq")
    export.precheck("compressed-tensors", ("f16",), "rtn")


@pytest.mark.parametrize("arch", ["olmo2", "glm4"])
def test_gguf_families_transformers_cannot_read(tmp_path, capsys, calib_txt, arch):
    """OLMo 2 and GLM-4: transformers' GGUF reader has no row for them (llama.cpp runs them in
    bench/llamacpp_families.py; llmprune reads them with its own rows, models.GGUF_FAMILIES). The file holds the
    tensors under llama.cpp's names, exactly (F32), GLM-4's heads half rotated, OLMo 2's tied head written out
    (llama.cpp's olmo2 requires output.weight)."""
    import gguf
    import numpy as np

    import llmprune

    src, out, e = _family_export(tmp_path, capsys, calib_txt, arch, types="f32")
    r = gguf.GGUFReader(out / e["files"][0])
    t = {x.name: np.array(x.data) for x in r.tensors}
    ref, _, _ = llmprune.load(str(src))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    post_ffw = f"model.layers.0.post_{'mlp' if arch == 'glm4' else 'feedforward'}_layernorm.weight"
    assert np.array_equal(t["blk.1.attn_q.weight"], sd["model.layers.1.self_attn.q_proj.weight"])  # not permuted
    assert np.array_equal(t["blk.0.post_ffw_norm.weight"], sd[post_ffw])
    assert ("output.weight" in t) == (arch == "olmo2")  # the tiny models are tied
    if arch == "olmo2":
        assert np.array_equal(t["output.weight"], sd["model.embed_tokens.weight"])
    else:
        assert np.array_equal(t["blk.0.ffn_up.weight"], sd["model.layers.0.mlp.gate_up_proj.weight"])
    assert r.fields[f"{arch}.rope.dimension_count"].contents() == (8 if arch == "glm4" else 16)


DENSE_2025 = {"smollm3": {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0], "no_rope_layer_interval": 4},
              "seed_oss": {}, "apertus": {}, "exaone4": {"sliding_window": None, "layer_types": ["full_attention"] * 2},
              "olmo3": {}}


@pytest.mark.parametrize("arch", sorted(DENSE_2025))
def test_gguf_2025_dense_families_hold_what_llama_cpp_reads(tmp_path, capsys, calib_txt, arch):
    """SmolLM3, Seed-OSS, Apertus, EXAONE 4.0, OLMo 3 (llama.cpp runs them in bench/llamacpp_families.py): every
    tensor of the pruned model under llama.cpp's name, exactly (F32), SmolLM3's q/k rows in llama.cpp's RoPE order
    (pairs adjacent: row h*d + 2j + e is HF's h*d + e*d/2 + j); Apertus' xIELU parameters as per-layer metadata, not
    tensors, its tied head written out and its Llama 3.1 RoPE as rope_freqs; OLMo 3's sliding window and its layers'
    pattern."""
    import gguf
    import numpy as np

    import llmprune

    src, out, e = _family_export(tmp_path, capsys, calib_txt, arch, types="f32", **DENSE_2025[arch])
    r = gguf.GGUFReader(out / e["files"][0])
    t = {x.name: np.array(x.data) for x in r.tensors}
    ref, _, _ = llmprune.load(str(src))
    cfg = ref.config
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    name = r.fields["general.architecture"].contents()
    assert name == {"seed_oss": "seed_oss", "olmo3": "olmo2"}.get(arch, arch)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, name.upper()), cfg.num_hidden_layers)
    d = cfg.hidden_size // cfg.num_attention_heads
    seen = set()
    for k, v in sd.items():
        if ".act_fn." in k or k == "lm_head.weight":
            continue
        g = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if arch == "smollm3" and k.endswith(("q_proj.weight", "k_proj.weight")):
            n = v.shape[0] // d
            idx = [h * d + e * (d // 2) + j for h in range(n) for j in range(d // 2) for e in range(2)]
            v = v[idx]
        assert np.array_equal(t[g], v), k
        seen.add(g)
    assert ("output.weight" in t) == (arch in ("apertus", "olmo3"))  # llama.cpp's loader requires it for these
    if "output.weight" in t:
        assert np.array_equal(t["output.weight"], sd["model.embed_tokens.weight"])
        seen.add("output.weight")
    assert set(t) - seen == ({"rope_freqs.weight"} if arch == "apertus" else set())  # (its Llama 3.1 RoPE)
    assert "blk.1.attn_q.weight" in t and ("blk.1.attn_q.bias" in t) == (arch == "seed_oss")
    if arch == "apertus":
        for p in ("alpha_n", "alpha_p", "beta", "eps"):
            got = r.fields[f"xielu.{p}"].contents()  # (no architecture prefix: llama.cpp reads them so)
            want = [sd[f"model.layers.{i}.mlp.act_fn.{p}"].item() for i in range(cfg.num_hidden_layers)]
            assert np.allclose(got, want, rtol=0, atol=0), p
    swa = r.fields.get(f"{name}.attention.sliding_window")
    assert (swa is not None) == (arch == "olmo3")
    if swa is not None:
        assert swa.contents() == cfg.sliding_window == 16
        assert r.fields[f"{name}.attention.sliding_window_pattern"].contents() == [True, False]


OLMO3_YARN = {"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
              "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                                 "original_max_position_embeddings": 16}}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("arch, rp, attn", [
    ("qwen3", YARN, None),
    ("olmo3", OLMO3_YARN, None),  # OLMo 3's own attention_factor is llama.cpp's (0.1 ln 8 + 1): nothing written
    ("olmo3", {**OLMO3_YARN, "full_attention": {**OLMO3_YARN["full_attention"], "attention_factor": 1.5}}, 1.5),
    # the Llama-like families whose llama.cpp graphs pass the generic scaling into every RoPE
    *((arch, YARN, None) for arch in ("llama", "glm4", "olmo2", "smollm3", "seed_oss", "exaone4", "apertus")),
    ("mistral", {**YARN, "attention_factor": 1.25}, 1.25),
])
def test_gguf_yarn_is_written_as_llama_cpp_reads_it(tmp_path, arch, rp, attn):
    """Qwen's long-context YaRN, OLMo 3's (its full-attention layers': llama.cpp leaves the sliding ones unscaled,
    as transformers does), the Llama-like families': the type, factor and original context; an attention factor of
    the model's own as the multiple of llama.cpp's, rope.scaling.attn_factor (llama.cpp multiplies its own
    0.1 ln(factor) + 1 by it and reads no yarn_attn_factor). bench/llamacpp_families.py runs them (olmo3_yarn: 0.082
    off without the multiple, mistral_yarn 0.064; 0.17 to 0.59 without YaRN's metadata)."""
    import math

    import gguf

    from llmprune.errors import LLMPruneError
    from llmprune.export.gguf_arch import ARCHS, add_hparams, check_config
    from llmprune.testing import tiny_config

    cfg = tiny_config(arch, **{**DENSE_2025.get(arch, {}), "rope_parameters": rp})  # (as llama.cpp assumes them)
    check_config(cfg)
    name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHS[arch].name)]
    w = gguf.GGUFWriter(tmp_path / "h.gguf", name)
    add_hparams(w, cfg, ARCHS[arch])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    f = {k: v.contents() for k, v in gguf.GGUFReader(tmp_path / "h.gguf").fields.items()}
    full = rp.get("full_attention", rp)
    assert f[f"{name}.rope.scaling.type"] == "yarn" and f[f"{name}.rope.scaling.factor"] == full["factor"]
    assert f[f"{name}.rope.scaling.original_context_length"] == 16
    got = f.get(f"{name}.rope.scaling.attn_factor")
    assert (got is None) == (attn is None)
    if attn is not None:
        assert got == pytest.approx(attn / (0.1 * math.log(full["factor"]) + 1), rel=1e-6)
    if arch == "olmo3":  # sliding layers scaled otherwise than llama.cpp's (unscaled, the full layers' base): refused
        for local in ({"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                       "original_max_position_embeddings": 16}, {"rope_type": "default", "rope_theta": 10000.0}):
            with pytest.raises(LLMPruneError, match="sliding layers' RoPE"):
                check_config(tiny_config(arch, rope_parameters={**rp, "sliding_attention": local}))


@pytest.mark.parametrize("arch, over", [("mixtral", {"head_dim": 16}), ("gemma2", {})])
def test_gguf_yarn_is_refused_where_llama_cpp_has_not_run_it(arch, over):
    """YaRN is written only for the families llama.cpp has run with it (bench/llamacpp_families.py); transformers
    runs Mixtral's (with a head_dim) and Gemma 2's, which stay refused until llama.cpp has."""
    from llmprune.errors import LLMPruneError
    from llmprune.export.gguf_arch import check_config
    from llmprune.testing import tiny_config

    with pytest.raises(LLMPruneError, match="RoPE scaling 'yarn' is not written to GGUF"):
        check_config(tiny_config(arch, **over, rope_parameters=YARN))


@pytest.mark.parametrize("arch, over, want", [
    ("smollm3", {}, "no-RoPE layers"),  # the tiny family's interval of 2; llama.cpp's is 4
    ("exaone4", {}, "sliding window (16) at 2 layers"),  # llama.cpp slides at 64 layers alone
    ("seed_oss", {"attention_out_bias": True}, "output-projection"),
    ("apertus", {"hidden_act": "silu"}, "activation (silu)"),
])
def test_gguf_2025_dense_variants_llama_cpp_would_misread_are_refused(tmp_path, capsys, calib_txt, arch, over, want):
    from llmprune.testing import tiny_model_dir

    m = tiny_model_dir(tmp_path / "m", arch, **over)
    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    _refused(capsys, tmp_path, src, "--to", "gguf", want=want)


def test_a_mixtral_gguf_holds_each_expert_where_llama_cpp_reads_it(tmp_path, capsys, calib_txt):
    """Mixtral (no reader of transformers takes its GGUF): each expert's gate, up and down at its index of
    ffn_gate_exps / ffn_up_exps / ffn_down_exps, the router F32, q/k rows in llama.cpp's RoPE order; Q8_0 holds
    gguf's Q8_0 rounding of exactly those rows (llama.cpp running these values as F32 agrees with the dequantized
    model to 3e-4: bench/results/llamacpp_families.txt)."""
    import gguf
    import numpy as np

    import llmprune
    from llmprune.export.gguf_tensors import permute_rows

    src, out, e = _family_export(tmp_path, capsys, calib_txt, "mixtral", types="f32,q8_0")
    ref, _, _ = llmprune.load(str(src))
    sd = {k: v.detach().float() for k, v in ref.state_dict().items()}
    half = ref.config.intermediate_size
    q8 = lambda x: gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0)
    for fname, kind in zip(e["files"], ("F32", "Q8_0")):
        t = {x.name: x for x in gguf.GGUFReader(out / fname).tensors}
        for i in range(ref.config.num_hidden_layers):
            b, p = f"blk.{i}.", f"model.layers.{i}."
            experts = sd[p + "mlp.experts.gate_up_proj"]  # (experts, 2 x width, hidden): gate, then up
            want = {"ffn_gate_exps": experts[:, :half], "ffn_up_exps": experts[:, half:],
                    "ffn_down_exps": sd[p + "mlp.experts.down_proj"], "ffn_gate_inp": sd[p + "mlp.gate.weight"],
                    "attn_q": permute_rows(sd[p + "self_attn.q_proj.weight"], ref.config.num_attention_heads)}
            for name, w in want.items():
                x = t[f"{b}{name}.weight"]
                got = gguf.quants.dequantize(x.data, x.tensor_type)
                kept = kind == "F32" or name == "ffn_gate_inp"  # (the router: F32 in every file)
                assert x.tensor_type.name == ("F32" if kept else kind), (fname, name)
                assert np.array_equal(got, w.numpy() if kept else q8(w.numpy())), (fname, name)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_an_exports_source_holds_one_block_at_a_time(tmp_path, capsys, calib_txt, family):
    """What an export reads (source.Weights, as the model's names or as stored: a Mixture-of-Experts block's
    experts split) is freed before the next block is read: when a block's read begins, no tensor handed out
    before is alive (the consumer holds none)."""
    import gc
    import weakref

    from llmprune.export.source import Weights, open_source
    from llmprune.testing import tiny_model_dir

    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", tiny_model_dir(tmp_path / "m", family), "--calib",
                                  calib_txt, "--out", src, *FAST_CLI)]) == 0
    capsys.readouterr()
    w = Weights(open_source(src))
    assert w.lazy is not None
    refs, reads = [], []
    real = w.lazy.load

    def load(prefix, *a, **k):
        gc.collect()
        reads.append(sum(r() is not None for r in refs))  # tensors handed out earlier, still alive
        return real(prefix, *a, **k)

    w.lazy.load = load
    for _, t in w.tensors():
        refs.append(weakref.ref(t))
        del t
    for _, t, _ in w.stored_tensors():
        refs.append(weakref.ref(t))
        del t
    assert len(reads) > 4 and not any(reads), reads


def test_compress_export_gguf_refuses_an_unwritable_tokenizer_before_it_computes(tmp_path, capsys, calib_txt,
                                                                                   monkeypatch):
    """`compress --export gguf` of a model whose tokenizer.json GGUF cannot hold (a pre-tokenizer llama.cpp has no
    name for) is refused before pruning, nothing written (it was refused after saving the output, which the same
    command then could not write again); an export refused after the output was saved says the output was saved."""
    from llmprune.testing import tiny_model

    m = tmp_path / "m"
    tiny_model("llama").save_pretrained(m)
    _bpe_tokenizer(r"\s+").save_pretrained(m)  # splits on whitespace: no llama.cpp pre-tokenizer does that
    capsys.readouterr()
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "compress", "--model", m, "--calib", calib_txt, "--out", out, "--export", "gguf",
                      *FAST_CLI)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"{m}/tokenizer.json: its pre-tokenizer" in err, err
    assert not out.exists() and not (tmp_path / "o-gguf").exists()
    import llmprune.export as ex
    from llmprune.errors import LLMPruneError

    def refused(*a, **k):
        raise LLMPruneError("the disk is full")

    monkeypatch.setattr(ex, "export", refused)
    rc, _, err = _run(capsys, "compress", "--model", m, "--calib", calib_txt, "--out", out, "--export",
                      "compressed-tensors", *FAST_CLI)
    assert rc == 2 and f"{out} was saved, but its export failed: the disk is full (then: llmprune export {out} --to " \
        "compressed-tensors)" in err and out.is_dir(), err


def test_gptq_on_export_in_memory_hands_every_block_in_order(monkeypatch):
    """A block GPTQ's pass hands no codes for (nothing in it to quantize: gptq_sequential skips it) is still written,
    in its place: the GGUF writer takes tensors in its headers' order, compressed-tensors would leave it out."""
    from types import SimpleNamespace

    from llmprune import export
    from llmprune.quant import sequential

    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    model = torch.nn.Module()
    model.layers = blocks
    weights = SimpleNamespace(lazy=None, model=model, blocks=lambda: "layers")
    for handed in ([1, 2], [], [3], [0, 1, 2, 3]):
        monkeypatch.setattr(sequential, "gptq_sequential",
                            lambda *a, on_block, h=handed, **k: [on_block(i, {i: i}) for i in h])
        got: list = []
        export._gptq_blocks(weights, None, 32, True, {}, lambda i, block, codes, g=got: g.append((i, block, codes)))
        assert [(i, c) for i, _, c in got] == [(i, {i: i} if i in handed else {}) for i in range(4)], handed
        assert all(b is blocks[i] for i, b, _ in got)


def test_gguf_gptq_on_export_holds_a_few_blocks_of_a_deep_model(tmp_path, capsys, calib_txt):
    """Think in 70B: `export --to gguf --quant gptq` from disk writes each decoder block's tensors while the block
    GPTQ finished is the one in the model (measured: 1 of 8 at every tensor; 2 allowed, should the walk read ahead
    into it), never the model: at every tensor written, the model's blocks not on the meta device are counted."""
    from llmprune.export import gguf as gguf_writer
    from llmprune.export import source
    from llmprune.testing import byte_tokenizer, tiny_model

    m, src, out = tmp_path / "m", tmp_path / "s", tmp_path / "g"
    tiny_model("llama", num_hidden_layers=8).save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    made, held = [], []
    init, to_gguf = source.Weights.__init__, gguf_writer.to_gguf

    def weights_init(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    def counting(key, tensor, *a):
        layers = made[0].model.model.layers
        held.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in layers))
        return to_gguf(key, tensor, *a)

    mp = pytest.MonkeyPatch()
    with mp.context() as c:
        c.setattr(source.Weights, "__init__", weights_init)
        c.setattr(gguf_writer, "to_gguf", counting)
        rc, _, se = _run(capsys, "export", src, "--to", "gguf", "--quant", "gptq", "--calib", calib_txt, "--nsamples",
                         "4", "--seqlen", "32", "--out", out, "--no-progress")
    assert rc == 0, se
    assert made[0].lazy is not None and len(held) == len(made[0].keys)
    assert 1 <= max(held) <= 2, held
