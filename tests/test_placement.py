"""Where PERP and scale tuning train a model (llmprune/placement.py): blocks over several devices, the rest
streamed from CPU memory. On this CPU-only machine the "devices" are cpu and cpu:0 (distinct to torch,
the same memory), so these tests check the bookkeeping and that training is unchanged by it; the
speed and GPU memory it buys are for a GPU to measure."""
from __future__ import annotations

import pytest
import torch
from test_perp import FAST, bits, pruned_model, repetitive_ids

from llmprune import arch, placement
from llmprune.errors import LLMPruneError
from llmprune.recover import lora
from llmprune.recover.perp import recover

KB = 1000 / placement.GiB  # resident_gib of 1,000 bytes


def test_plan_fills_devices_in_order_and_streams_the_rest():
    plan = placement.plan
    assert plan([10] * 4, 5, [float("inf")]) == [(0, False)] * 4
    # the first device holds the base (5) and two blocks; the second two; none left over
    assert plan([10] * 4, 5, [25, 20]) == [(0, False), (0, False), (1, False), (1, False)]
    # beyond every budget: streamed, computing on the last device
    assert plan([10] * 5, 5, [25, 10]) == [(0, False), (0, False), (1, False), (1, True), (1, True)]
    assert plan([10] * 3, 5, [14]) == [(0, True)] * 3
    # a device too small for one block is skipped, the next takes the blocks in order
    assert plan([10] * 3, 0, [5, 30]) == [(1, False)] * 3


def test_budgets(monkeypatch):
    gib = placement.GiB
    assert placement.budgets(("cpu", "cpu"), 2.0, 0) == [2 * gib] * 2
    assert placement.budgets(("cpu",), None, 10**9) == [float("inf")]
    # a GPU keeps its free memory less the reserve (faked: 10 GiB free on GPU 0, 30 on GPU 1)
    free = {0: 10 * gib, 1: 30 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * gib))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert placement.budgets(("cuda", "cuda:1"), None, 4 * gib) == [6 * gib, 26 * gib]
    assert placement.budgets(("cuda:0",), None, 12 * gib) == [0.0]


def test_streamed_training_of_experts_equals_resident_training():
    """PERP with a Mixture-of-Experts model's experts split into linears (moe.split_linears): every block
    streamed, the experts' frozen projections copied in with the rest; the same losses and model bit for bit."""
    from test_perp import pruned_moe

    m1, _ = pruned_moe("gpt_oss")
    m2, _ = pruned_moe("gpt_oss")
    ids = repetitive_ids()
    i1 = recover(m1, ids, **FAST)
    i2 = recover(m2, ids, resident_gib=100 * KB, **FAST)
    assert i2["placement"]["streamed_blocks"] == 2 and i2["placement"]["streamed_gb"] > 0
    assert i1["losses"] == i2["losses"]
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(bits(a), bits(b)), n
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in m2.modules())


def test_streamed_training_equals_resident_training():
    """Both blocks stream (a budget that holds the embedding and head but no block): same losses and the
    same merged weights bit for bit; every frozen weight is copied in for the forward and again for the
    recomputation of the backward pass; the model's Parameter objects are the ones it came with."""
    m1, _ = pruned_model("2:4")
    m2, _ = pruned_model("2:4")
    ids = repetitive_ids()
    before = {n: p for n, p in m2.named_parameters()}
    i1 = recover(m1, ids, **FAST)
    i2 = recover(m2, ids, resident_gib=100 * KB, **FAST)  # tiny blocks: 148 kB frozen + adapters each
    assert i1["placement"]["streamed_blocks"] == 0 and i1["placement"]["streamed_gb"] == 0
    assert i2["placement"]["streamed_blocks"] == 2 and i2["placement"]["resident_blocks"] == {"cpu": 0}
    frozen = sum(p.numel() * p.element_size() for b in arch.blocks(m2) for n, p in b.named_parameters()
                 if p.dim() == 2)
    assert i2["placement"]["streamed_gb"] == round(frozen * 2 * FAST["steps"] / 1e9, 3)
    assert i1["losses"] == i2["losses"]
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(bits(a), bits(b)), n
    assert all(before[n] is p for n, p in m2.named_parameters())
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in m2.modules())


def test_a_streamed_weight_is_in_place_only_while_its_sublayer_runs():
    """While block 1 runs, block 0's frozen weights are their stored Parameters again (not the copies
    made for block 0's sublayers), and block 1's linears compute with copies."""
    model, _ = pruned_model("2:4")
    layers = model.model.layers
    stored = {n: p for n, p in layers[0].named_parameters() if p.dim() == 2}
    seen = []

    def probe(mod, args):
        now = {n.replace(".base.", "."): p for n, p in layers[0].named_parameters() if p.dim() == 2 and "lora" not in n}
        seen.append(all(now[n] is p for n, p in stored.items()))
    h = layers[1].register_forward_pre_hook(probe)
    copies = []
    up = layers[1].mlp.up_proj
    hook_up = up.register_forward_hook(lambda m, a, out: copies.append(m.weight))  # inside the MLP's call, before its hook drops the copy
    try:
        recover(model, repetitive_ids(), resident_gib=100 * KB, **{**FAST, "steps": 2, "train": ("norms",)})
    finally:
        h.remove()
        hook_up.remove()
    assert seen and all(seen)
    assert copies and all(c is not up.weight for c in copies)


def test_two_devices_split_the_blocks_and_train_the_same():
    """Two devices (cpu, cpu:0): one block on each, or the second streamed, the hidden states routed
    between them; the training is that of one device."""
    ref, _ = pruned_model("unstructured")
    i0 = recover(ref, repetitive_ids(), **FAST)
    b, base = (i0["placement"][k] * placement.GiB for k in ("block_gib", "base_gib"))  # as placed, adapters in
    for budget, resident, streamed in ((base + 1.3 * b, {"cpu": 1, "cpu:0": 1}, 0),
                                       (b + base / 2, {"cpu": 0, "cpu:0": 1}, 1)):
        m, _ = pruned_model("unstructured")
        i = recover(m, repetitive_ids(), devices=("cpu", "cpu:0"), resident_gib=budget / placement.GiB, **FAST)
        p = i["placement"]
        assert (p["resident_blocks"], p["streamed_blocks"], p["devices"]) == (resident, streamed, ["cpu", "cpu:0"])
        assert i["losses"] == i0["losses"]
        for (n, a), (_, b) in zip(ref.state_dict().items(), m.state_dict().items()):
            assert torch.equal(a, b), n


def test_route_moves_inputs_to_the_block_and_outputs_back():
    """The hooks of several devices: a block's tensor inputs (args and kwargs) go to its device, the
    last block's outputs to the first device."""
    model, _ = pruned_model("unstructured")
    blocks = list(arch.blocks(model))
    moved = []
    import accelerate.utils

    real = accelerate.utils.send_to_device
    try:
        accelerate.utils.send_to_device = lambda x, dev: moved.append(str(dev)) or real(x, dev)
        with placement.placed(model, blocks, ("cpu", "cpu:0"), [(0, False), (1, False)]):
            model(input_ids=repetitive_ids(2))
    finally:
        accelerate.utils.send_to_device = real
    assert moved == ["cpu:0", "cpu:0", "cpu"]  # block 1's args, its kwargs; the last block's output


def test_a_plan_that_cannot_run_is_refused_and_the_model_left_alone():
    model, _ = pruned_model("2:4")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LLMPruneError, match="embedding, head and final norm"):
        recover(model, repetitive_ids(), resident_gib=1 * KB, **FAST)
    with pytest.raises(LLMPruneError, match="activation checkpointing"):
        recover(model, repetitive_ids(), resident_gib=100 * KB, grad_checkpointing=False, **FAST)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not lora.SparseAdapterLinear for m in model.modules())


def test_failure_while_streaming_restores_the_model():
    model, _ = pruned_model("2:4")
    params = {n: p for n, p in model.named_parameters()}
    bad = torch.full((4, 9), 10_000)  # out of the vocabulary: the embedding lookup fails in step 1
    with pytest.raises(IndexError):
        recover(model, bad, resident_gib=100 * KB, **FAST)
    assert all(params[n] is p for n, p in model.named_parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["gemma3", "mixtral", "qwen3_5_text", "gpt_oss", "opt"])
def test_streaming_other_families_trains_the_same(family):
    """Sandwich norms and soft-capping (Gemma-3), fused 3-D experts (Mixtral, gpt-oss: streamed by the
    experts module's call), linear-attention blocks (Qwen3.5), biases and LayerNorm (OPT)."""
    m1, _ = pruned_model("unstructured", arch=family)
    m2, _ = pruned_model("unstructured", arch=family)
    ids = repetitive_ids()
    i1 = recover(m1, ids, **FAST)
    i2 = recover(m2, ids, resident_gib=i1["placement"]["base_gib"] * 1.05, **FAST)  # the base, no block
    assert i2["placement"]["streamed_blocks"] == len(m2.model.layers if family != "opt" else m2.model.decoder.layers)
    assert i1["losses"] == i2["losses"]
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("family", ["llama", "gemma3", "mixtral", "qwen3_5_text", "gpt_oss", "opt", "olmo2", "phi3"])
def test_every_frozen_tensor_is_read_inside_its_holders_call(family):
    """Streaming fetches a frozen tensor in a hook on the module said to read it (`_holders`); a tensor
    read outside that module's call would be the CPU copy, which on this CPU computes the same and on a
    GPU fails. So here each frozen floating tensor is float64 outside its holder's call and itself only
    inside it: a forward and a checkpointed backward must give the loss (dtype and bits) and gradients
    of the untouched model, with norms trained and adapters attached as PERP does."""
    def build():
        m, _ = pruned_model("unstructured", arch=family)
        m.requires_grad_(False)
        for mod in m.modules():
            if "Norm" in type(mod).__name__ and isinstance(getattr(mod, "weight", None), torch.nn.Parameter):
                mod.weight.requires_grad_(True)
        names = [n for n, x in m.named_modules()
                 if isinstance(x, torch.nn.Linear) and ".layers." in n and min(x.weight.shape) >= 2]
        lora.attach(m, dict.fromkeys(names), rank=2)
        return m

    def step(m):
        with placement.training_mode(m, True):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss, [p.grad for p in m.parameters() if p.requires_grad]

    ids = repetitive_ids(2)
    ref_loss, ref_grads = step(build())
    m = build()
    for block in arch.blocks(m):
        for holder, items in placement._holders(block).items():
            items = [(o, n, k, placement._slot(o, k)[n]) for o, n, k in items
                     if placement._slot(o, k)[n].is_floating_point()]
            poisoned = [t.double() if k == "b" else torch.nn.Parameter(t.double(), requires_grad=False)
                        for _, _, k, t in items]
            for (o, n, k, _), bad in zip(items, poisoned):
                placement._slot(o, k)[n] = bad

            def fetch(mod, args, items=items):
                for o, n, k, t in items:
                    placement._slot(o, k)[n] = t

            def drop(mod, args, out, items=items, poisoned=poisoned):
                for (o, n, k, _), bad in zip(items, poisoned):
                    placement._slot(o, k)[n] = bad
            holder.register_forward_pre_hook(fetch)
            holder.register_forward_hook(drop)
    loss, grads = step(m)
    assert loss.dtype == ref_loss.dtype and torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_weights_are_read_straight_to_the_devices_only_on_a_gpu_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert placement.reads_to_devices(("cuda",)) and placement.reads_to_devices(("cpu", "cuda:1"))
    assert not placement.reads_to_devices(("cpu",)) and not placement.reads_to_devices(("cpu", "cpu:0"))
    monkeypatch.setenv("WORLD_SIZE", "4")  # DDP: one replica per process, each placed by its own process
    assert not placement.reads_to_devices(("cuda",))


def test_a_given_plan_is_kept_while_it_fits():
    assert placement.fits([(0, False), (1, False), (1, True)], [10, 20, 30], 5, [15, 20])
    assert not placement.fits([(0, False), (1, False)], [11, 20], 5, [15, 20])
    # recover keeps a given plan that fits (both blocks streamed, where a fresh plan would stream none) and
    # plans afresh when it does not (every block resident under a budget below one block)
    ids = repetitive_ids()
    kept = recover(pruned_model("2:4")[0], ids, where=[(0, True), (0, True)], **FAST)["placement"]
    assert kept["streamed_blocks"] == 2
    fresh = recover(pruned_model("2:4")[0], ids, where=[(0, False), (0, False)], resident_gib=100 * KB,
                    **FAST)["placement"]
    assert fresh["streamed_blocks"] == 2 and fresh["resident_blocks"] == {"cpu": 0}
