"""Packed checkpoints: save -> load round trips on tiny models, and bad folders rejected."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmprune import formats
from llmprune.errors import LLMPruneError
from llmprune.modules import PackedLinear
from llmprune.packed import load_packed, save_packed
from llmprune.patterns import keep_mask, parse
from llmprune.quant.gptq import collect_hessians
from llmprune.quant.sequential import gptq_layers
from llmprune.testing import byte_tokenizer, tiny_model

IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))


def block_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def pruned(arch="llama", pattern="2:4"):
    """A tiny model with every block linear pruned in place; returns (model, keep-masks)."""
    model = tiny_model(arch, seed=1)
    pat = parse(pattern)
    masks = {}
    with torch.no_grad():
        for n, m in block_linears(model).items():
            masks[n] = keep_mask(m.weight.abs(), pat, 0.5)
            m.weight.mul_(masks[n])
    return model, masks


@torch.no_grad()
def logits(model):
    return model(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sparse24_round_trip_is_bit_exact(tmp_path, arch):
    model, masks = pruned(arch)
    sec = save_packed(model, tmp_path / "o", "sparse24", masks, tokenizer=byte_tokenizer(), dtype=None)
    keys = set(load_file(tmp_path / "o" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.values" in keys and "model.layers.0.self_attn.q_proj.meta" in keys
    assert not any(k.startswith("model.layers.0.self_attn.q_proj.weight") for k in keys)
    assert "lm_head.weight" not in keys and sec["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(sec["layers"]) == set(masks)
    layer = sec["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["format"] == "sparse24" and layer["pattern"] == "2:4" and layer["shape"] == [64, 128]
    assert layer["bytes"] == 64 * 64 * 4 + 64 * 16 and layer["dense_bytes"] == 64 * 128 * 2  # vs fp16
    manifest = json.loads((tmp_path / "o" / "llmprune.json").read_text())
    assert manifest["format"]["name"] == "sparse24" and manifest["format_version"] == 2
    assert manifest["steps"] == ["pack"]
    assert (tmp_path / "o" / "tokenizer.json").exists()

    loaded = load_packed(tmp_path / "o")
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.up_proj"), PackedLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))
    assert not any(p.device.type == "meta" for p in loaded.parameters())


def dequantized_copy(model, fmt, masks, opts):
    """The oracle: the same model with each linear replaced by unpack(pack(weight)), dense."""
    f = formats.get(fmt)
    with torch.no_grad():
        for n, m in block_linears(model).items():
            keep = masks[n] if masks else None
            m.weight.copy_(f.unpack(f.pack(m.weight.float(), keep, **opts)))
    return model


@pytest.mark.parametrize("fmt,pattern,opts", [
    ("w4g128", None, {"group_size": 32}),
    ("w4g128", None, {"group_size": 32, "symmetric": True}),
    ("w4s24", "2:4", {"group_size": 32}),
    ("w4s50", "group:16", {}),
])
def test_int4_round_trip_equals_dequantized_reference(tmp_path, fmt, pattern, opts):
    if pattern:
        model, masks = pruned(pattern=pattern)
    else:
        model, masks = tiny_model(seed=1), None
    sec = save_packed(model, tmp_path / "o", fmt, masks, dtype=None, **opts)
    assert sec["quant"] == "rtn" and all(v["format"] == fmt for v in sec["layers"].values())
    assert len(sec["layers"]) == 14 and sec["bytes"]["packed_layers"] < sec["bytes"]["packed_layers_dense"] / 3  # dense = fp16
    loaded = load_packed(tmp_path / "o")
    oracle = dequantized_copy(model, fmt, masks, {k: v for k, v in opts.items()})
    assert torch.equal(logits(loaded), logits(oracle))
    if masks:
        for n, keep in masks.items():
            assert bool((loaded.get_submodule(n).dequantize()[~keep] == 0).all())
    # what the manifest says of the files is counted from the files: weights decoding to zero (int4 rounds some
    # kept weights to zero beside the pruned ones), bytes on disk (headers included)
    weights = [loaded.get_submodule(n).dequantize() for n in sec["layers"]]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert sec["stored_zeros"] == pytest.approx(zeros, abs=1e-12)
    if masks:
        assert zeros > sum(int((~k).sum()) for k in masks.values()) / sum(k.numel() for k in masks.values())
    assert sec["bytes"]["file"] == sum(f.stat().st_size for f in (tmp_path / "o").glob("*.safetensors"))


def test_keep_masks_inferred_from_zeros_and_misfits_left_dense(tmp_path):
    model, _ = pruned()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.normal_()  # a layer left dense
    sec = save_packed(model, tmp_path / "o", "sparse24", dtype=None)
    assert list(sec["left_dense"]) == ["model.layers.1.mlp.down_proj"] and len(sec["layers"]) == 13
    assert "more than 2 non-zeros" in sec["left_dense"]["model.layers.1.mlp.down_proj"]
    loaded = load_packed(tmp_path / "o")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert torch.equal(logits(loaded), logits(model))


def test_gptq_pack_keeps_zeros_and_beats_rtn_on_the_calibration_data(tmp_path):
    model, masks = pruned()
    calib = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    hs = collect_hessians(model, list(masks), calib)
    qs = gptq_layers(model, hs, "w4s24", masks, group_size=32)
    save_packed(model, tmp_path / "g", "w4s24", masks, quant="gptq", quantized=qs, group_size=32, dtype=None)
    save_packed(model, tmp_path / "r", "w4s24", masks, quant="rtn", group_size=32, dtype=None)
    g, r = load_packed(tmp_path / "g"), load_packed(tmp_path / "r")
    for n, keep in masks.items():
        assert bool((g.get_submodule(n).dequantize()[~keep] == 0).all())
    with torch.no_grad():
        ref = torch.cat([model(c).logits for c in calib])
        err = lambda m: (torch.cat([m(c).logits for c in calib]) - ref).norm().item()
        assert err(g) < err(r)



@pytest.mark.parametrize("fmt,grid,act_order,sink", [("w4s24", None, True, 64.0), ("w4g128", False, True, 64.0),
                                                     ("w4s24", None, False, 1.0)])
def test_gptq_sequential_matches_a_plain_forward_oracle_and_packs_what_it_computes(tmp_path, fmt, grid, act_order, sink):
    """Block l is quantized with Hessians from the model whose blocks < l are already quantized
    (and block l is not): re-derived here with plain forward hooks on a copy of the model. The
    packed folder then computes exactly what the in-memory quantized model computes."""
    from llmprune.quant.gptq import gptq
    from llmprune.quant.sequential import gptq_sequential

    model, masks = pruned()
    orig = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))
    qs = gptq_sequential(model, ids, fmt, group_size=16, symmetric=grid, batch_size=4, dtype=None,
                         act_order=act_order, sink_weight=sink)
    assert set(qs) == set(orig)
    n_blocks = len(model.model.layers)
    for layer in range(n_blocks):
        oracle, _ = pruned()  # same seed: the same pruned weights
        for n, m in block_linears(oracle).items():
            if int(n.split(".")[2]) < layer:
                m.weight.data.copy_(qs[n].dequantize())
        names = [n for n in orig if int(n.split(".")[2]) == layer]
        hs = collect_hessians(oracle, names, list(ids.split(4)), sink_weight=sink)
        for n in names:
            keep = masks[n] if fmt == "w4s24" else orig[n] != 0
            q = gptq(orig[n] * keep, hs[n], keep, 16, qs[n].symmetric, act_order=act_order)
            assert torch.equal(q.codes, qs[n].codes) and torch.equal(q.scales, qs[n].scales), n
            assert torch.equal(model.get_submodule(n).weight, qs[n].dequantize()), n  # computes with it
    save_packed(model, tmp_path / "q", fmt, quant="gptq", quantized=qs, group_size=16, symmetric=grid, dtype=None)
    assert torch.equal(logits(load_packed(tmp_path / "q")), logits(model))

def test_load_dtype(tmp_path):
    model, masks = pruned()
    save_packed(model, tmp_path / "o", "sparse24", masks)
    m = load_packed(tmp_path / "o", dtype=torch.bfloat16)
    assert m.model.layers[0].self_attn.q_proj.values.dtype == torch.bfloat16
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.allclose(logits(m).float(), logits(model), atol=0.1)


# ---- bad input, on save
def test_save_rejects_bad_input(tmp_path):
    model, masks = pruned()
    with pytest.raises(LLMPruneError, match="drop --quant"):
        save_packed(model, tmp_path / "a", "sparse24", masks, quant="rtn")
    with pytest.raises(LLMPruneError, match="needs the GPTQ codes"):
        save_packed(model, tmp_path / "a", "w4s24", masks, quant="gptq", group_size=32)
    with pytest.raises(LLMPruneError, match="rtn or gptq"):
        save_packed(model, tmp_path / "a", "w4s24", masks, quant="awq", group_size=32)
    with pytest.raises(LLMPruneError, match="not a linear"):
        save_packed(model, tmp_path / "a", "sparse24", {"model.norm": masks["model.layers.0.mlp.up_proj"]})
    with pytest.raises(LLMPruneError, match="tied"):
        save_packed(model, tmp_path / "a", "w4g128", {"lm_head": torch.ones(258, 64, dtype=torch.bool)})
    bad = dict(masks)
    bad["model.layers.0.mlp.up_proj"] = torch.ones(128, 64, dtype=torch.bool)
    with pytest.raises(LLMPruneError, match="model.layers.0.mlp.up_proj: sparse24: the keep-mask is not 2:4"):
        save_packed(model, tmp_path / "a", "sparse24", bad)
    with pytest.raises(LLMPruneError, match="no layer fits"):
        save_packed(tiny_model(), tmp_path / "a", "sparse24")
    with pytest.raises(LLMPruneError, match="--group-size"):
        save_packed(model, tmp_path / "a", "w4g128", masks)  # group 128 > in_features 64
    assert not (tmp_path / "a").exists()  # nothing half-written
    save_packed(model, tmp_path / "b", "sparse24", masks)
    with pytest.raises(LLMPruneError, match="--overwrite"):
        save_packed(model, tmp_path / "b", "sparse24", masks)
    save_packed(model, tmp_path / "b", "sparse24", masks, overwrite=True)


# ---- bad input, on load
@pytest.fixture()
def good(tmp_path):
    model, masks = pruned()
    save_packed(model, tmp_path / "o", "sparse24", masks)
    return tmp_path / "o"


def edit_manifest(folder, fn):
    p = folder / "llmprune.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))


@pytest.fixture()
def no_unpickling(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the loader unpickled something")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


def test_truncated_and_corrupted_safetensors(good, no_unpickling):
    p = good / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(LLMPruneError, match="corrupted or truncated"):
        load_packed(good)
    p.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(LLMPruneError, match="corrupted or truncated"):
        load_packed(good)
    p.write_bytes(b"")
    with pytest.raises(LLMPruneError, match="corrupted or truncated"):
        load_packed(good)


def test_pickle_files_are_refused(good, no_unpickling):
    sd = load_file(good / "model.safetensors")
    (good / "model.safetensors").unlink()
    with open(good / "pytorch_model.bin", "wb") as fh:
        pickle.dump({k: v.numpy() for k, v in list(sd.items())[:2]}, fh)
    with pytest.raises(LLMPruneError, match="pickle"):
        load_packed(good)
    (good / "pytorch_model.bin").rename(good / "model.safetensors")  # a pickle under the expected name
    with pytest.raises(LLMPruneError, match="pickle"):
        load_packed(good)


def test_manifest_problems(good, no_unpickling):
    edit_manifest(good, lambda d: d["format"].update(format_version=99))
    with pytest.raises(LLMPruneError, match="upgrade llmprune"):
        load_packed(good)
    edit_manifest(good, lambda d: d["format"].update(format_version=1) or d["format"].pop("layers"))
    with pytest.raises(LLMPruneError, match="lacks layers"):
        load_packed(good)


def test_manifest_layer_missing_keys(good):
    edit_manifest(good, lambda d: d["format"]["layers"]["model.layers.0.mlp.up_proj"].pop("shape"))
    with pytest.raises(LLMPruneError, match="lacks shape"):
        load_packed(good)


def test_newer_top_level_version(good):
    edit_manifest(good, lambda d: d.update(format_version=7))
    with pytest.raises(LLMPruneError, match="upgrade llmprune"):
        load_packed(good)


def test_tensor_shape_disagrees_with_manifest(good):
    p = good / "model.safetensors"
    sd = load_file(p)
    sd["model.layers.0.mlp.up_proj.values"] = sd["model.layers.0.mlp.up_proj.values"][:, :-2].contiguous()
    save_file(sd, p, metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match=r"model.layers.0.mlp.up_proj.values is \(128, 30\)"):
        load_packed(good)


def test_manifest_shape_disagrees_with_config(good):
    edit_manifest(good, lambda d: d["format"]["layers"]["model.layers.0.mlp.up_proj"].update(shape=[64, 64]))
    with pytest.raises(LLMPruneError, match="does not match a linear of config.json"):
        load_packed(good)


def test_missing_and_extra_tensors(good):
    p = good / "model.safetensors"
    sd = load_file(p)
    meta = sd.pop("model.layers.1.self_attn.o_proj.meta")
    save_file(sd, p, metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match="lacks model.layers.1.self_attn.o_proj.meta"):
        load_packed(good)
    sd["model.layers.1.self_attn.o_proj.meta"] = meta
    norm = sd.pop("model.norm.weight")
    save_file(sd, p, metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match="lacks model.norm.weight"):
        load_packed(good)
    sd["model.norm.weight"] = norm
    sd["model.extra"] = torch.zeros(3)
    save_file(sd, p, metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match="model.extra"):
        load_packed(good)


def test_corrupted_metadata_is_caught(good):
    p = good / "model.safetensors"
    sd = load_file(p)
    sd["model.layers.0.mlp.up_proj.meta"][3, 2] = 0xFF  # positions 3 and 3: impossible
    save_file(sd, p, metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match="metadata is corrupted"):
        load_packed(good)


def test_not_a_packed_folder(tmp_path):
    with pytest.raises(LLMPruneError, match="not a folder"):
        load_packed(tmp_path / "nope")
    with pytest.raises(LLMPruneError, match="llmprune.json"):
        load_packed(tmp_path)


def test_auto_group_size_per_layer(tmp_path):
    model = tiny_model(seed=2)
    sec = save_packed(model, tmp_path / "o", "w4g128", group_size="auto")
    assert sec["group_size"] == "auto" and not sec["left_dense"]
    assert sec["layers"]["model.layers.0.self_attn.q_proj"]["group_size"] == 64  # in 64
    assert sec["layers"]["model.layers.0.mlp.down_proj"]["group_size"] == 128  # in 128
    loaded = load_packed(tmp_path / "o")
    assert loaded.model.layers[0].mlp.down_proj.scales.shape == (64, 1)
    assert loaded.model.layers[0].self_attn.q_proj.scales.shape == (64, 1)


def test_default_storage_is_fp16_and_exact_for_the_fp16_weights(tmp_path):
    """Packed files store floating tensors in fp16 (the baseline sizes are measured against);
    sparse24 stays exact with respect to the fp16-rounded weights."""
    from safetensors import safe_open

    model, masks = pruned("llama")
    sec = save_packed(model, tmp_path / "o", "sparse24", masks)
    assert sec["dtype"] == "float16"
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} <= {torch.float16, torch.uint8}  # noqa: SIM118
    ref = tiny_model("llama", seed=1)
    ref.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    loaded = load_packed(tmp_path / "o", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 9))
    assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_packed_files_are_the_same_bytes_from_any_run(tmp_path):
    """lazy.save_tensors, the packed shards' writer: safetensors reads every tensor back exactly (each dtype a
    pack holds, odd shapes, a scalar, an empty tensor), aligned, with the metadata in sorted order - safetensors'
    own writer orders metadata by a hash seeded per process, so two runs of the same pack wrote other bytes."""
    from safetensors import safe_open

    from llmprune.lazy import save_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"w.qweight": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=g),
               "w.scales": torch.randn(7, generator=g).half(), "w.bias": torch.randn(3, generator=g).bfloat16(),
               "w.idx": torch.randint(-9, 9, (2, 3), dtype=torch.int32, generator=g),
               "w.codes": torch.randint(-8, 8, (1, 9), dtype=torch.int8, generator=g),
               "norm": torch.tensor(1.5), "empty": torch.zeros(0, 4), "mask": torch.rand(5, generator=g) > 0.5}
    meta = {k: str(i) for i, k in enumerate("hgfedcba")}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_tensors(tensors, a, meta)
    save_tensors(dict(reversed(list(tensors.items()))), b, dict(reversed(list(meta.items()))))
    assert a.read_bytes() == b.read_bytes()
    got = load_file(a)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == meta
    n = int.from_bytes(a.read_bytes()[:8], "little")
    head = json.loads(a.read_bytes()[8:8 + n])
    assert list(head["__metadata__"]) == sorted(meta) and (8 + n) % 8 == 0
    assert all(e["data_offsets"][0] % tensors[k].element_size() == 0 for k, e in head.items() if k != "__metadata__")


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_whole_model_gptq_packs_each_block_as_it_is_quantized(tmp_path, monkeypatch, arch):
    """`--quant gptq` on a model in memory (pipeline.export) packs each block as GPTQ's pass finishes it: no more
    than one block's codes are alive at once (the whole model's were, a byte a weight until the end: 70 GB at
    70B), and the folder is the one packing all the codes at the end writes, byte for byte."""
    import copy
    import weakref

    from llmprune import pipeline
    from llmprune.config import GPTQConfig
    from llmprune.packed import write_packed
    from llmprune.quant import gptq as gptq_mod
    from llmprune.quant.sequential import gptq_sequential

    model = pruned(arch, "unstructured")[0]
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(model)
    info: dict = {}
    qs = gptq_sequential(ref, ids, "w4g128", 16, None, dtype=torch.float16, info=info, **GPTQConfig().as_dict())
    (tmp_path / "ref").mkdir()
    sec = write_packed(ref, tmp_path / "ref", "w4g128", quant="gptq", quantized=qs, group_size=16, dtype=torch.float16,
                       quant_opts={**GPTQConfig().as_dict(), **info})
    per_block = max(sum(n.startswith(f"model.layers.{i}.") for n in qs) for i in range(2))
    del qs

    codes, most = [], [0]
    real = gptq_mod.gptq

    def gptq(*a, **k):  # each layer's codes, watched: how many of those made before are still alive
        most[0] = max(most[0], sum(c() is not None for c in codes))
        q = real(*a, **k)
        codes.append(weakref.ref(q.codes))
        return q

    monkeypatch.setattr(gptq_mod, "gptq", gptq)
    (tmp_path / "s").mkdir()
    got = pipeline.export(model, byte_tokenizer(), tmp_path / "s", "w4g128", "gptq", 16, None, "float16", GPTQConfig(),
                          ids)
    assert len(codes) == len(sec["layers"]) > per_block > 1
    assert most[0] < per_block  # (was every layer's before it: codes[-1] saw len(codes) - 1 alive)
    assert got == sec
    for f in sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors")):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
