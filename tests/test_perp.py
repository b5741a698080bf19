"""PERP recovery (arXiv 2312.15230): adapters against an independent formula, training on a tiny
random llama pruned 50% unstructured and 2:4, sparsity kept bit for bit, frozen parameters untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from llmprune.errors import LLMPruneError
from llmprune.patterns import keep_mask, parse, satisfies
from llmprune.recover import lora
from llmprune.recover.perp import derive_keep_masks, pruned_linears, recover
from llmprune.testing import tiny_model

PATTERNS = {"unstructured": (parse("unstructured"), 0.5), "2:4": (parse("2:4"), 0.5)}


def pruned_model(pattern: str = "2:4", arch: str = "llama", seed: int = 0, dtype=torch.float32):
    """A tiny random model whose block linears are magnitude-pruned in place; returns (model, masks)."""
    pat, sp = PATTERNS[pattern]
    model = tiny_model(arch, seed)
    masks = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                masks[name] = keep_mask(mod.weight.abs(), pat, sp, scope="row")
                mod.weight.mul_(masks[name])
    return model.to(dtype), masks


def repetitive_ids(n: int = 8, seqlen: int = 33, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 256, (13,), generator=g)
    return motif.repeat(n * seqlen // 13 + 1)[: n * seqlen].reshape(n, seqlen)  # (n, seqlen)


def lm_loss(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


FAST = {"steps": 20, "lr": 5e-3, "rank": 4, "batch_size": 4, "progress": False}


# ---- adapters against the paper's formulas ---------------------------------------------------

@pytest.mark.parametrize("rank,scale,bias,given", [(3, False, True, True), (0, True, True, True),
                                                   (5, True, False, True), (3, True, True, False)])
def test_adapter_forward_and_merge_match_formula(rank, scale, bias, given):
    torch.manual_seed(0)
    base = nn.Linear(37, 23, bias=bias)  # odd shapes
    keep = torch.rand(23, 37) > 0.6
    with torch.no_grad():
        base.weight.mul_(keep)
        base.weight[~keep] = -0.0  # a signed zero must come back as itself, bit for bit
    w0 = base.weight.detach().clone()
    holder = nn.Sequential(base)
    # given=False: no mask, K read off the weight's zeros (and no (out, in) buffer held)
    wrapper = lora.attach(holder, {"0": keep if given else None}, rank=rank, scale=scale,
                          alpha=2.0 * max(rank, 1))["0"]
    assert [b.shape for b in wrapper.buffers()] == ([keep.shape] if given else [])
    with torch.no_grad():  # move the adapters off their identity init
        for name, p in wrapper.named_parameters():
            if not name.startswith("base."):
                p.normal_(0, 0.3)
    x = torch.randn(5, 37)
    # Oracle: MaskLoRA (W + s B A) ⊙ K, then ScaleLoRA ⊙ (1 + s_row)(1 + s_col)^T.
    w = w0.clone()
    if rank:
        w = (w + 2.0 * wrapper.lora_B @ wrapper.lora_A) * keep
    if scale:
        w = w * (1 + wrapper.s_row)[:, None] * (1 + wrapper.s_col)[None, :]
    expect = F.linear(x, w, base.bias).detach()
    torch.testing.assert_close(holder(x).detach(), expect, rtol=1e-5, atol=1e-5)
    assert lora.detach(holder) == 1 and type(holder[0]) is nn.Linear
    torch.testing.assert_close(holder(x).detach(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(bits(holder[0].weight[~keep]), bits(w0[~keep]))  # zeros, signs included
    assert bool((holder[0].weight[keep] != w0[keep]).any())


def test_adapters_start_at_identity():
    torch.manual_seed(1)
    base = nn.Linear(16, 12)
    holder = nn.Sequential(base)
    x = torch.randn(3, 16)
    ref = base(x).detach()
    lora.attach(holder, {"0": torch.rand(12, 16) > 0.5}, rank=4, scale=True)
    torch.testing.assert_close(holder(x).detach(), ref)


# ---- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_recover_lowers_loss_and_keeps_the_zeros(pattern):
    model, masks = pruned_model(pattern)
    ids = repetitive_ids()
    before, loss0 = snapshot(model), lm_loss(model, ids)
    info = recover(model, ids, train=("norms", "biases", "masklora"), **FAST)

    assert lm_loss(model, ids) < loss0 - 0.5
    assert len(info["losses"]) == 20 and sum(info["losses"][-3:]) < sum(info["losses"][:3]) - 1.0
    after = model.state_dict()
    assert after.keys() == before.keys()  # plain HF layout again, no adapter keys left
    assert all(type(model.get_submodule(n)) is nn.Linear for n in masks)
    pat, sp = PATTERNS[pattern]
    for name, keep in masks.items():
        w0, w1 = before[name + ".weight"], after[name + ".weight"]
        assert torch.equal(w1 == 0, w0 == 0) and torch.equal(bits(w1[~keep]), bits(w0[~keep]))
        assert satisfies(w1 != 0, pat, sp)
        assert not torch.equal(w1, w0)  # kept weights were retrained
    norms = {k for k in before if k.endswith("norm.weight")}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == norms | {n + ".weight" for n in masks}
    assert "no linear biases" in " ".join(info["notes"])


@pytest.mark.parametrize("train", [("norms",), ("scalelora",)])
def test_only_the_selected_parameters_change(train):
    model, masks = pruned_model("2:4")
    before = snapshot(model)
    recover(model, repetitive_ids(), train=train, **{**FAST, "steps": 5})
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    selected = ({k for k in before if k.endswith("norm.weight")} if train == ("norms",)
                else {n + ".weight" for n in masks})
    assert changed == selected
    for name in masks:  # scalelora keeps zeros too
        assert torch.equal(after[name + ".weight"] == 0, before[name + ".weight"] == 0)


def test_fraction_of_trainable_parameters():
    model, masks = pruned_model("unstructured")
    # Independent count: RMSNorm scales by name, rank * (out + in) per pruned linear, unique params.
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    lora_n = sum(3 * (k.shape[0] + k.shape[1]) for k in masks.values())
    scale_n = sum(k.shape[0] + k.shape[1] for k in masks.values())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    info = recover(model, repetitive_ids(), train=("norms", "masklora", "scalelora"),
                   **{**FAST, "steps": 2, "rank": 3})
    assert info["n_total"] == total
    assert info["trainable_by_kind"] == {"norms": norms, "masklora": lora_n, "scalelora": scale_n}
    assert info["n_trainable"] == norms + lora_n + scale_n
    assert info["fraction"] == pytest.approx((norms + lora_n + scale_n) / total)
    assert info["adapted_linears"] == len(masks) == 14


def test_derived_masks_equal_given_masks_and_runs_are_seeded():
    m1, masks = pruned_model("unstructured")
    m2, _ = pruned_model("unstructured")
    assert derive_keep_masks(m1).keys() == masks.keys() == set(pruned_linears(m1))
    assert all(torch.equal(derive_keep_masks(m1)[k], masks[k]) for k in masks)
    i1 = recover(m1, repetitive_ids(), keep_masks=None, **{**FAST, "steps": 4})
    i2 = recover(m2, repetitive_ids(), keep_masks=masks, **{**FAST, "steps": 4})
    assert i1["losses"] == i2["losses"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_gradient_accumulation_matches_a_larger_batch():
    # Equal-length windows: the mean of two half-batch means is the full-batch mean, so the updates agree.
    m1, _ = pruned_model("2:4")
    m2, _ = pruned_model("2:4")
    i1 = recover(m1, repetitive_ids(), **{**FAST, "steps": 4, "batch_size": 4, "grad_accum": 1})
    i2 = recover(m2, repetitive_ids(), **{**FAST, "steps": 4, "batch_size": 2, "grad_accum": 2})
    assert i1["losses"] == pytest.approx(i2["losses"], abs=1e-4)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_model_state_restored_after_training():
    model, _ = pruned_model("2:4", dtype=torch.bfloat16)
    before = snapshot(model)
    info = recover(model, repetitive_ids(), train=("norms",), **{**FAST, "steps": 3})
    assert info["grad_checkpointing"]
    assert not model.training and model.config.use_cache
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not getattr(model, "_require_grads_hooks", None)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    after = model.state_dict()
    for k in before:  # frozen parameters survive the fp32 round trip exactly
        if not k.endswith("norm.weight"):
            assert torch.equal(before[k], after[k]), k


def test_an_explicit_mask_can_keep_a_zero_weight():
    # The default mask is W != 0; a given mask may keep a weight that happens to be zero, which then trains.
    torch.manual_seed(2)
    base = nn.Linear(8, 6, bias=False)
    keep = torch.ones(6, 8, dtype=torch.bool)
    with torch.no_grad():
        base.weight[0, 0] = 0.0
    for mask, grows in ((keep, True), (None, False)):
        holder = nn.Sequential(nn.Linear(8, 6, bias=False))
        holder[0].load_state_dict(base.state_dict())
        wrapper = lora.attach(holder, {"0": mask}, rank=2)["0"]
        with torch.no_grad():
            wrapper.lora_B.normal_()
        lora.detach(holder)
        assert bool(holder[0].weight[0, 0] != 0) is grows


def held_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def test_bf16_training_keeps_frozen_weights_in_bf16_and_holds_no_masks():
    # An 8B bf16 model must not grow to its fp32 size (+ a bool mask per weight) to be retrained:
    # during training the frozen tensors are the model's own bf16 ones, and only the trained ones are fp32.
    model, masks = pruned_model("2:4", dtype=torch.bfloat16)
    # Independent count: the bf16 model, + 2 bytes per norm scale (bf16 -> fp32), + fp32 rank-4 adapters.
    expect = (held_bytes(model) + sum(p.numel() * 2 for n, p in model.named_parameters() if n.endswith("norm.weight"))
              + sum(4 * 4 * (k.shape[0] + k.shape[1]) for k in masks.values()))
    seen = []

    def probe(mod, args):
        seen.append((held_bytes(model), {p.dtype for p in model.parameters() if p.requires_grad},
                     [b.shape for m in model.modules() if isinstance(m, lora.SparseAdapterLinear) for b in m.buffers()],
                     torch.is_autocast_enabled(args[0].device.type)))
    ids, loss0 = repetitive_ids(), lm_loss(model, repetitive_ids())
    hook = model.model.layers[1].register_forward_pre_hook(probe)
    info = recover(model, ids, **{**FAST, "steps": 10})
    hook.remove()
    assert seen and all(s == (expect, {torch.float32}, [], True) for s in seen)
    assert info["frozen_dtype"] == "bfloat16" and info["autocast"] == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert lm_loss(model, ids) < loss0 - 0.5
    for n in masks:
        assert torch.equal(model.get_submodule(n).weight != 0, masks[n])


def test_bf16_training_follows_fp32_training():
    # Same start, same data: bf16 frozen weights under autocast train like the fp32 model does.
    m32, _ = pruned_model("2:4")
    m16, _ = pruned_model("2:4", dtype=torch.bfloat16)
    i32 = recover(m32, repetitive_ids(), **{**FAST, "steps": 10})
    i16 = recover(m16, repetitive_ids(), **{**FAST, "steps": 10})
    assert i32["frozen_dtype"] == "float32" and i32["autocast"] == "no"
    assert i16["losses"] == pytest.approx(i32["losses"], rel=0.05, abs=0.05)


def test_fp16_without_loss_scaling_trains_in_fp32_and_says_so():
    model, _ = pruned_model("2:4", dtype=torch.float16)
    before = snapshot(model)
    info = recover(model, repetitive_ids(), **{**FAST, "steps": 3})
    assert info["frozen_dtype"] == "float32" and "fp16 weights trained in fp32" in " ".join(info["notes"])
    assert all(p.dtype == torch.float16 for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "layers" not in k and "norm" not in k)


def test_gemma3_runs():
    model, masks = pruned_model("2:4", arch="gemma3")
    before = snapshot(model)
    info = recover(model, repetitive_ids(), **{**FAST, "steps": 3})
    assert len(info["losses"]) == 3 and info["adapted_linears"] == len(masks)
    for n in masks:
        assert torch.equal(model.state_dict()[n + ".weight"] == 0, before[n + ".weight"] == 0)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0.0}, "--lr"),
    ({"lr": -1e-4}, "--lr"),
    ({"steps": 0}, "--steps"),
    ({"rank": 65}, "--rank 64 or less"),
    ({"rank": 0}, "--rank"),
    ({"train": ()}, "--train"),
    ({"train": ("norms", "embeddings")}, "choose from"),
    ({"train": ("biases",)}, "selects no parameters"),
    ({"method": "lora"}, "--method perp"),
    ({"schedule": "step"}, "schedule"),
    ({"mixed_precision": "fp8"}, "mixed precision"),
    ({"keep_masks": {"model.layers.0.nope": torch.ones(2, 2, dtype=torch.bool)}}, "no such module"),
    ({"keep_masks": {"model.layers.0.mlp.up_proj": torch.ones(64, 128, dtype=torch.bool)}}, "shape"),
])
def test_bad_input_raises_and_leaves_the_model_alone(kwargs, match):
    model, _ = pruned_model("2:4")
    before = snapshot(model)
    with pytest.raises(LLMPruneError, match=match):
        recover(model, repetitive_ids(), **{**FAST, **kwargs})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not lora.SparseAdapterLinear for m in model.modules())


def test_bad_training_data_raises():
    model, _ = pruned_model("2:4")
    with pytest.raises(LLMPruneError, match="seqlen"):
        recover(model, torch.zeros(10, dtype=torch.long), **FAST)


def test_checkpointing_gives_the_same_training():
    # Recomputing activations must not change the gradients (use_reentrant=False with frozen inputs).
    m1, _ = pruned_model("unstructured")
    m2, _ = pruned_model("unstructured")
    calls = {1: 0, 2: 0}
    for i, m in ((1, m1), (2, m2)):  # a checkpointed block runs its forward twice per step
        m.model.layers[0].input_layernorm.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    i1 = recover(m1, repetitive_ids(), grad_checkpointing=True, **{**FAST, "steps": 4})
    i2 = recover(m2, repetitive_ids(), grad_checkpointing=False, **{**FAST, "steps": 4})
    assert i1["grad_checkpointing"] and not i2["grad_checkpointing"]
    assert calls == {1: 8, 2: 4}
    assert i1["losses"] == pytest.approx(i2["losses"], abs=1e-5)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_failure_mid_training_leaves_a_plain_unchanged_model():
    model, _ = pruned_model("2:4", dtype=torch.bfloat16)
    before = snapshot(model)
    requires = [p.requires_grad for p in model.parameters()]
    bad_ids = torch.full((4, 9), 10_000)  # out of the vocabulary: the embedding lookup fails in step 1
    with pytest.raises(IndexError):
        recover(model, bad_ids, **FAST)
    assert all(type(m) is not lora.SparseAdapterLinear for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in model.state_dict().items())
    assert not model.training


def test_rank_is_capped_for_a_narrow_linear():
    """Qwen2-MoE's shared-expert gate is (1, hidden): rank 4 cannot exceed 1 there. It gets rank 1 (a note
    says so), the others rank 4, and the zeros stay."""
    model, _ = pruned_model("unstructured", arch="qwen2_moe")
    gate = "model.layers.0.mlp.shared_expert_gate"
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    seen = {}
    real = lora.SparseAdapterLinear.__init__

    def spy(self, base, keep=None, rank=0, *a, **k):
        seen[id(base)] = rank
        real(self, base, keep, rank, *a, **k)
    lora.SparseAdapterLinear.__init__ = spy
    try:
        info = recover(model, repetitive_ids(), **FAST)
    finally:
        lora.SparseAdapterLinear.__init__ = real
    assert seen[id(model.get_submodule(gate))] == 1 and seen[id(model.get_submodule("model.layers.0.self_attn.q_proj"))] == 4
    assert any("rank capped" in n and "shared_expert_gate: 1" in n for n in info["notes"])
    for n, z in zeros.items():
        assert torch.equal(model.get_submodule(n).weight == 0, z), n


# ---- Mixture-of-Experts: the experts' projections as nn.Linear layers (moe.split_linears) ----------------------

def pruned_moe(family: str, seed: int = 0):
    """A tiny Mixture-of-Experts model whose attention linears and every expert's projections are pruned 2:4 by
    magnitude; returns (model, {target name: keep-mask})."""
    from llmprune import arch

    pat, sp = PATTERNS["2:4"]
    model = tiny_model(family, seed)
    masks = {}
    with torch.no_grad():
        for n in arch.linear_names(model):
            w = arch.target(model, n).weight
            masks[n] = keep_mask(w.abs(), pat, sp, scope="row")
            w.mul_(masks[n])
    return model, masks


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_split_linears_compute_the_fused_experts_and_write_back(family):
    """Split, the model computes what its fused experts compute (concatenated and interleaved, transposed, biased
    layouts); a weight or bias the split linears end with, even moved off the fused storage (as placement and
    dtype casts do), is what the fused parameters hold on exit, which are the same Parameter objects."""
    import copy

    from llmprune import moe

    model, _ = pruned_moe(family)
    ref = copy.deepcopy(model)
    ids = repetitive_ids(2, 12)
    params = dict(model.named_parameters())
    path = "model.layers.1.mlp.experts"
    with moe.split_linears(model, [path]) as split:
        assert isinstance(model.get_submodule(path), moe.SplitExperts)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        lin = split[path][2].down_proj
        new_w = torch.randn_like(lin.weight)
        lin.weight.data = new_w.clone()  # rebound: no longer a view of the fused rows
        if lin.bias is not None:
            lin.bias.data = torch.full_like(lin.bias, 0.5)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert split == {} and lin.weight.numel() == 0  # each module's split let go once copied: never two of each expert
    view = moe.ExpertProj(model.get_submodule(path), 2, "down_proj")
    assert torch.equal(view.weight, new_w) and (view.bias is None or bool((view.bias == 0.5).all()))
    view.weight.copy_(moe.ExpertProj(ref.get_submodule(path), 2, "down_proj").weight)
    if view.bias is not None:
        view.bias.copy_(moe.ExpertProj(ref.get_submodule(path), 2, "down_proj").bias)
    assert all(torch.equal(t, ref.state_dict()[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_recover_retrains_the_experts_too(family):
    """PERP on a Mixture-of-Experts model adapts every pruned expert projection as well as the attention linears
    (MaskLoRA through moe.split_linears): their kept weights retrain, their zeros stay bit for bit, gpt-oss' expert
    biases train with the other biases, the routers stay frozen, and the loss goes down."""
    import copy

    from llmprune import arch

    model, masks = pruned_moe(family)
    ref = copy.deepcopy(model)
    ids = repetitive_ids()
    loss0 = lm_loss(model, ids)
    info = recover(model, ids, train=("norms", "biases", "masklora"), **FAST)
    assert lm_loss(model, ids) < loss0 - 0.5
    assert info["adapted_linears"] == len(masks) and any(".experts[" in n for n in masks)
    for n, keep in masks.items():
        w0, w1 = arch.target(ref, n).weight.detach(), arch.target(model, n).weight.detach()
        assert torch.equal(w1 == 0, w0 == 0) and torch.equal(bits(w1[~keep]), bits(w0[~keep])), n
        assert not torch.equal(w1, w0), n
    before, after = ref.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in changed if ".router." in k or k.endswith("mlp.gate.weight")}
    assert {k for k in changed if k.endswith("_bias")} == ({k for k in before if ".experts." in k and k.endswith("_bias")}
                                                           if family == "gpt_oss" else set())


class _Checkpoint:
    """resume.Training's interface in memory: saves the state after step `at` (through torch.save, as the file
    holds it) and resumes from `state`; `alive()` counts the resumed state's trained tensors still held."""

    def __init__(self, at: int = 0, state: bytes | None = None):
        self.at, self.state, self.steps, self.saved, self.refs, self.seen = at, state, 0, None, [], []

    def resumed(self):
        import io
        import weakref

        if self.state is None:
            return None
        s = torch.load(io.BytesIO(self.state), weights_only=True)
        self.refs = [weakref.ref(t) for t in s["params"].values()]
        return s

    def alive(self) -> int:
        return sum(r() is not None for r in self.refs)

    def due(self) -> bool:
        self.steps += 1
        self.seen.append(self.alive())
        return self.steps == self.at

    def save(self, state: dict) -> None:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        self.saved = buf.getvalue()


def test_a_resumed_training_lets_go_of_the_state_it_loaded():
    """The state a resumed PERP training reads back (the trained tensors, AdamW's moments: 2.4 GB at 70B) is
    copied into the fresh tensors and the optimizer, then let go: no tensor of its `params` is held while the
    training goes on, and the training ends where one that never stopped ends."""
    opts = {**FAST, "steps": 6, "rank": 2}
    first = _Checkpoint(at=3)
    model, _ = pruned_model("unstructured")
    whole = recover(model, repetitive_ids(), checkpoint=first, **opts)["losses"]
    again = _Checkpoint(state=first.saved)
    model, _ = pruned_model("unstructured")
    info = recover(model, repetitive_ids(), checkpoint=again, **opts)
    assert info["losses"] == pytest.approx(whole, abs=1e-6)
    assert again.refs and again.seen == [0, 0]  # after steps 4 and 5 (was every trained tensor, to the end)
