"""SliceGPT (arXiv:2401.15024): invariance, PCA basis, slicing sizes, save/load, generation, bad inputs."""
import copy
import random

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.sliced import SlicedDecoderLayer, load_sliced
from llmprune.testing import VOCAB, tiny_model
from llmprune.transforms.fuse import fuse_norms
from llmprune.transforms.slicegpt import new_dim_for, rotate_and_slice, slice_model

F64 = torch.float64


def _model(tied=False, seed=0, **over):
    """Tiny fp64 llama with non-trivial norm scales (the default ones would make fusion a no-op)."""
    m = tiny_model("llama", seed, dtype=F64, tie_word_embeddings=tied, **over)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=F64))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return m


def _ids(n=4, seqlen=32, seed=1):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(m, ids):
    return m(input_ids=ids).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("tied", [False, True])
def test_fuse_norms_keeps_logits(tied):
    m, ids = _model(tied), _ids()
    ref = _logits(m, ids)
    q_before = m.model.layers[0].self_attn.q_proj.weight.clone()
    info = fuse_norms(m)
    assert info["untied"] is tied and m.config.tie_word_embeddings is False
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert not torch.allclose(m.model.layers[0].self_attn.q_proj.weight, q_before)  # something was folded
    torch.testing.assert_close(_logits(m, ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotation", ["per-block", "shared"])
@pytest.mark.parametrize("tied", [False, True])
def test_rotation_without_slicing_keeps_logits(rotation, tied):
    m, ids = _model(tied), _ids()
    ref = _logits(m, ids)
    emb = m.model.embed_tokens.weight.clone()
    info = rotate_and_slice(m, _ids(seed=2), new_dim=64, rotation=rotation, progress=False)
    assert info["new_dim"] == 64
    assert not torch.allclose(m.model.embed_tokens.weight, emb, atol=1e-3)  # it really rotated
    torch.testing.assert_close(_logits(m, ids), ref, rtol=1e-4, atol=1e-4)


def test_rotation_with_biases_keeps_logits():
    m, ids = _model(attention_bias=True, mlp_bias=True), _ids()
    ref = _logits(m, ids)
    for rotation in ("per-block", "shared"):
        r = copy.deepcopy(m)
        rotate_and_slice(r, _ids(seed=2), new_dim=64, rotation=rotation, progress=False)
        torch.testing.assert_close(_logits(r, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3", "smollm3", "seed_oss", "apertus"])
def test_other_llama_family_rotation_keeps_logits(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=257)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=F64).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():  # qwen2 has q/k/v biases: random too
            p.normal_(0, 0.08) if p.dim() == 2 else p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    ids = _ids()
    ref = _logits(m, ids)
    for rotation in ("per-block", "shared"):
        r = copy.deepcopy(m)
        rotate_and_slice(r, _ids(seed=2), new_dim=64, rotation=rotation, progress=False)
        torch.testing.assert_close(_logits(r, ids), ref, rtol=1e-4, atol=1e-4)


def _norm_inputs(m, ids, normalize):
    """Independent oracle: covariance of every norm's input, measured with hooks on the rotated model."""
    covs = {}

    def hook(name):
        def f(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if normalize:
                x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
            covs[name] = covs.get(name, 0) + x.T @ x
        return f

    hs = [mod.register_forward_pre_hook(hook(n)) for n, mod in m.named_modules() if n.endswith("norm")]
    with torch.no_grad():
        m(input_ids=ids)
    for h in hs:
        h.remove()
    return covs


def _assert_diag_desc(c, tol=1e-6):
    off = c - torch.diag(torch.diagonal(c))
    assert off.abs().max() < tol * c.abs().max()
    d = torch.diagonal(c)
    assert torch.all(d[:-1] >= d[1:] - tol * d.max())


def test_per_block_bases_are_pca():
    """Unsliced per-block rotation: at every residual point, the signal's covariance is diagonal, descending."""
    m, ids = _model(), _ids(seed=3)
    rotate_and_slice(m, ids, new_dim=64, rotation="per-block", progress=False)
    covs = _norm_inputs(m, ids, normalize=False)
    assert len(covs) == 2 * 2 + 1
    for c in covs.values():
        _assert_diag_desc(c)


def test_shared_basis_is_pca_of_all_read_points():
    m, ids = _model(), _ids(seed=3)
    rotate_and_slice(m, ids, new_dim=64, rotation="shared", progress=False)
    total = sum(_norm_inputs(m, ids, normalize=True).values())
    _assert_diag_desc(total)


def _formula(cfg, d, layers, shortcuts, vocab, head=None):
    """Parameter count of a sliced llama: every residual-facing size is d; head untied. head = D: the
    head, the final norm and the last block's MLP output keep the full width D (its shortcut (D, d))."""
    hd, h, kv, inter = 16, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = 3 * d * inter
    per_layer = attn + mlp + 2 * d + (2 * d * d if shortcuts else 0)
    n = vocab * d + layers * per_layer + d + vocab * d
    if head is not None:  # + the head's and the final norm's extra width, the last down_proj's rows, its shortcut
        n += (head - d) * (vocab + 1 + inter) + (head - d) * d + (0 if shortcuts else d * d)
    return n


@pytest.mark.parametrize("rotation", ["per-block", "shared"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("slice_head", [False, True])
def test_parameter_count_after_slicing(rotation, tied, slice_head):
    m = _model(tied)
    info = slice_model(m, _ids(), slicing=0.25, rotation=rotation, progress=False, slice_head=slice_head)
    assert info["new_dim"] == 48 and m.config.hidden_size == 48 and m.config.head_dim == 16
    n = sum(p.numel() for p in m.parameters())
    head = None if slice_head else 64
    assert n == info["params_after"] == _formula(m.config, 48, 2, rotation == "per-block", VOCAB, head)
    assert info["params_before"] == _formula(m.config, 64, 2, False, VOCAB) - (VOCAB * 64 if tied else 0)
    w = 48 if slice_head else 64
    assert m.model.embed_tokens.weight.shape == (VOCAB, 48) and m.lm_head.weight.shape == (VOCAB, w)
    assert m.model.norm.weight.shape == (w,) and m.model.layers[-1].mlp.down_proj.weight.shape == (w, 128)
    assert all(torch.equal(p, torch.ones_like(p)) for n_, p in m.named_parameters() if "norm" in n_)
    assert info["slice_head"] is slice_head and info["head_width"] == w
    assert info["standard"] is (rotation == "shared" and slice_head)


@pytest.mark.parametrize("rotation", ["per-block", "shared"])
def test_unsliced_head_as_the_reference(rotation, tmp_path):
    """By default the head and the last residual keep the full width (TransformerCompression's
    do_slice_head off): the last block's MLP writes all D rotated components, the final norm reads
    them with the dense eps, the head is only rotated. Closer to the dense logits than slicing the
    head too, and the folder reloads exactly."""
    ids = _ids()
    errs = {}
    for slice_head in (False, True):
        m = _model(tied=True)
        ref = _logits(m, ids)
        slice_model(m, _ids(seed=2), slicing=0.25, rotation=rotation, progress=False, slice_head=slice_head)
        errs[slice_head] = _rel(_logits(m, ids), ref)
        if not slice_head:
            assert m.model.norm.variance_epsilon == _model().config.rms_norm_eps
            assert m.model.layers[-1].mlp_shortcut.weight.shape == (64, 48)
            m.save_pretrained(tmp_path)
            loaded = load_sliced(tmp_path, dtype=F64)
            assert torch.equal(_logits(loaded, ids), _logits(m, ids))
    assert errs[False] < errs[True]


def test_unsliced_head_folder_loads_through_llmprune_load(tmp_path, tiny_dir, calib_txt):
    """A shared-rotation output with the full-width head needs the last block's shortcut: llmprune.load
    rebuilds it (and the logits are the saved model's); --slice-head gives a plain checkpoint again."""
    from transformers import AutoModelForCausalLM

    import llmprune
    from llmprune.cli import main

    outs = {}
    for extra in ([], ["--slice-head"]):
        out = tmp_path / f"o{len(extra)}"
        rc = main([str(a) for a in ("compress", "--model", tiny_dir, "--solver", "slicegpt",
                                        "--rotation", "shared", "--slicing", "0.25", "--calib", calib_txt,
                                        "--out", out, "--nsamples", "8", "--seqlen", "32", "--no-progress",
                                        "--eval", "none", *extra)])
        assert rc == 0
        outs[bool(extra)] = out
    model, _, man = llmprune.load(outs[False], dtype="float64")
    assert man["slicegpt"]["head_width"] == 64 and model.lm_head.weight.shape[1] == 64
    assert isinstance(model.model.layers[-1], SlicedDecoderLayer)
    plain = AutoModelForCausalLM.from_pretrained(outs[True])
    assert plain.lm_head.weight.shape[1] == plain.config.hidden_size == 48


def test_shared_folder_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    m, ids = _model(tied=True), _ids()
    slice_model(m, _ids(seed=2), slicing=0.25, rotation="shared", progress=False, slice_head=True)
    m.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=F64, output_loading_info=True)
    assert type(loaded) is LlamaForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.hidden_size == 48 and loaded.config.head_dim == 16
    assert torch.equal(_logits(loaded.eval(), ids), _logits(m, ids))


def test_per_block_generates_and_reloads(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    m, ids = _model(), _ids(n=1, seqlen=8)
    dense_gen = m.generate(ids, max_new_tokens=6, do_sample=False)
    r = copy.deepcopy(m)
    rotate_and_slice(r, _ids(seed=2), new_dim=64, rotation="per-block", progress=False)
    assert isinstance(r.model.layers[0], SlicedDecoderLayer) and isinstance(r.model.layers[0], LlamaDecoderLayer)
    with torch.no_grad():
        assert len(r(input_ids=ids, output_hidden_states=True).hidden_states) == 3
    assert torch.equal(r.generate(ids, max_new_tokens=6, do_sample=False), dense_gen)  # KV cache path too

    slice_model(m, _ids(seed=2), slicing=0.25, rotation="per-block", progress=False)
    out = m.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)
    m.save_pretrained(tmp_path)
    loaded = load_sliced(tmp_path, dtype=F64)
    assert loaded.model.layers[0].mlp_shortcut.weight.shape == (48, 48)
    assert loaded.model.layers[1].mlp_shortcut.weight.shape == (64, 48)  # into the full-width last residual
    assert torch.equal(_logits(loaded, _ids()), _logits(m, _ids()))
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False), out)
    # strict: a tensor missing from the folder, or one with no place in the model, names the damage
    from safetensors.torch import load_file, save_file

    (f,) = tmp_path.glob("*.safetensors")
    sd = load_file(f)
    save_file({k: v for k, v in sd.items() if not k.endswith("1.mlp_shortcut.weight")}, f)
    with pytest.raises(LLMPruneError, match="lacks model.layers.1.mlp_shortcut.weight"):
        load_sliced(tmp_path)
    save_file({**sd, "model.layers.9.extra": torch.zeros(2)}, f)
    with pytest.raises(LLMPruneError, match="model.layers.9.extra"):
        load_sliced(tmp_path)


def _low_rank(seed, k, noise):
    """A model whose residual stream lives (up to `noise`) in a random k-dim subspace: everything that
    writes the stream (embedding, o_proj, down_proj) writes through the projector U U^T."""
    m = _model(seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    u, _ = torch.linalg.qr(torch.randn(64, k, generator=g, dtype=F64))  # (64, k)
    p = u @ u.T + noise * torch.randn(64, 64, generator=g, dtype=F64)
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(m.model.embed_tokens.weight @ p)
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.copy_(p @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(p @ layer.mlp.down_proj.weight)
    return m


@pytest.mark.parametrize("rotation", ["per-block", "shared"])
@pytest.mark.parametrize("noise,tol", [(0.0, 1e-5), (1e-3, 2e-2)])
def test_slicing_correlated_stream_keeps_logits(rotation, noise, tol):
    """10% slicing of a stream that (nearly) lives in 56 of 64 dims: PCA must find those 56."""
    ids = _ids(seed=5)
    errs = {}
    for name, m in (("correlated", _low_rank(0, 56, noise)), ("plain", _model(seed=0))):
        ref = _logits(m, ids)
        info = slice_model(m, _ids(n=8, seed=6), slicing=0.1, rotation=rotation, progress=False)
        assert info["new_dim"] == 56
        errs[name] = _rel(_logits(m, ids), ref)
    assert errs["correlated"] < tol
    assert errs["plain"] > 0.1  # control: the same slicing hurts a full-rank stream (~0.6 here)


def test_new_dim_rounds_down():
    rnd = random.Random(0)
    for _ in range(200):
        h, s, r = rnd.choice([64, 576, 768, 2048, 100]), rnd.uniform(0.01, 0.6), rnd.choice([1, 8, 16, 64])
        if (1 - s) * h < r:
            continue
        d = new_dim_for(h, s, r)
        assert d % r == 0 and d <= (1 - s) * h + 1e-6 < d + r
    assert new_dim_for(576, 0.25, 8) == 432
    # a multiple of the head count too: SmolLM2 has 9 heads, so 8 -> 72 and 1 -> 9
    assert [new_dim_for(576, s, 8, 9) for s in (0.1, 0.2, 0.25, 0.3)] == [504, 432, 432, 360]
    assert [new_dim_for(576, s, 1, 9) for s in (0.1, 0.2, 0.25, 0.3)] == [513, 459, 432, 396]
    with pytest.raises(LLMPruneError, match="multiple of 72"):
        new_dim_for(100, 0.5, 8, 9)


def test_sliced_width_is_a_config_transformers_accepts(tmp_path):
    """9 heads of 8 (SmolLM2's head count): 10% slicing of 72 keeps 63 = 7 x 9, not 64, and the
    saved folder loads with plain transformers (which rejects hidden % heads != 0)."""
    from transformers import AutoModelForCausalLM

    m = tiny_model("llama", dtype=F64, hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    info = slice_model(m, _ids(), slicing=0.1, rotation="shared", round_to=1, progress=False, slice_head=True)
    assert info["new_dim"] == 63 and info["slicing_actual"] == pytest.approx(1 / 8)
    m.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.hidden_size == 63


def test_bad_inputs():
    m = _model()
    for s in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(LLMPruneError, match="slicing"):
            slice_model(m, _ids(), slicing=s, progress=False)
    with pytest.raises(LLMPruneError, match="round-to"):
        slice_model(m, _ids(), slicing=0.9, round_to=16, progress=False)
    with pytest.raises(LLMPruneError, match="rotation"):
        slice_model(m, _ids(), slicing=0.25, rotation="global", progress=False)
    with pytest.raises(LLMPruneError, match="at least 64 calibration tokens"):
        slice_model(m, _ids(n=1, seqlen=32), slicing=0.25, progress=False)
    with pytest.raises(LLMPruneError, match="samples, seqlen"):
        slice_model(m, _ids()[0], slicing=0.25, progress=False)
    g = tiny_model("gemma3", dtype=F64)
    with pytest.raises(LLMPruneError, match="post_feedforward_layernorm"):
        slice_model(g, _ids(), slicing=0.25, progress=False)
    # nothing above touched the model
    assert m.config.hidden_size == 64 and m.model.norm.weight.shape == (64,)
    slice_model(m, _ids(), slicing=0.25, progress=False)
    with pytest.raises(LLMPruneError, match="already sliced"):
        slice_model(m, _ids(), slicing=0.25, progress=False)


@pytest.mark.parametrize("rotation", ["per-block", "shared"])
def test_low_precision_models(rotation):
    """The CLI runs fp32/bf16 models: signals in the model dtype, covariance and rotations in fp64."""
    ids = _ids()
    m = tiny_model("llama", 0, dtype=torch.float32)
    ref = _logits(m, ids)
    rotate_and_slice(m, _ids(seed=2), new_dim=64, rotation=rotation, progress=False)
    assert m.lm_head.weight.dtype == torch.float32
    assert _rel(_logits(m, ids), ref) < 1e-5
    b = tiny_model("llama", 0, dtype=torch.bfloat16)
    slice_model(b, _ids(seed=2), slicing=0.25, rotation=rotation, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in b.parameters())
    assert b.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_vocabulary_rows_rotate_in_chunks():
    """The embedding and the head are rotated ROWS rows at a time (a 70B model's would be 8 GiB of fp64
    at once): the same matrix as one product, in the weight's dtype, on its device."""
    from llmprune.transforms import slicegpt

    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=F64))[0][:, :16]  # (D, d) orthonormal columns
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(37, 24, generator=g).to(dtype)  # odd row count: a short last chunk
        want = (w.double() @ q * 1.5).to(dtype)
        for rows in (5, 37, 8192):
            slicegpt.ROWS = rows
            try:
                got = slicegpt._rotated_rows(w, q, 1.5)
            finally:
                slicegpt.ROWS = 8192
            assert got.dtype == dtype and got.shape == (37, 16)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("rotation", ["shared", "per-block"])
def test_slicing_on_a_device_moves_one_block_at_a_time(rotation, monkeypatch):
    """device=: each block goes to the device, is rotated there and comes back before the next one goes;
    the model stays where it was and the result is the one computed in place. (On this CPU the device
    is cpu:0, distinct to torch and the same memory: a GPU run is what shows the copies work.)"""
    ref, m = _model(), _model()
    slice_model(ref, _ids(seed=2), slicing=0.25, rotation=rotation, progress=False)
    blocks = {id(b): i for i, b in enumerate(m.model.layers)}
    moves = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if id(self) in blocks:
            moves.append((blocks[id(self)], str(args[0] if args else kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    from llmprune import walker

    homes = []  # where the per-block signals wait: asked of the walker (CPU memory when a GPU would be too full)
    monkeypatch.setattr(walker, "activation_home", lambda *a: homes.append(a[2]) or torch.device("cpu"))
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    slice_model(m, _ids(seed=2), slicing=0.25, rotation=rotation, progress=False, device="cpu:0")
    monkeypatch.undo()
    assert homes == [torch.device("cpu:0")]  # once: the per-block pass's, or the shared covariance walk's
    rotated = [mv for mv in moves if mv[1] in ("cpu:0", "cpu")]
    pairs = [rotated[i:i + 2] for i in range(0, len(rotated), 2)]
    n = len(m.model.layers)  # shared: the covariance walk, then the rotation; per-block: one pass
    assert [p[0][0] for p in pairs] == list(range(n)) * (2 if rotation == "shared" else 1)
    assert all(a[0] == b[0] and a[1] == "cpu:0" and b[1] == "cpu" for a, b in pairs)
    assert all(p.device.type == "cpu" for p in m.parameters())
    for (n, a), (_, b) in zip(ref.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), n
