"""End-to-end scale tuning after GPTQ (llmprune/quant/tune.py): only the scales move, the distance
to the unquantized model goes down, and a tuning that does not help is not kept."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.quant import tune
from llmprune.quant.rtn import rtn
from llmprune.testing import FAST_CLI, tiny_model


def _keep24(w):
    """Magnitude 2:4 keep-mask (the two largest of every four inputs)."""
    g = w.abs().reshape(w.shape[0], -1, 4)
    idx = g.topk(2, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(w.shape)


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def _kl_oracle(student, teacher, ids):
    """Mean per-token KL(teacher || student) from the two models' own logits (no shared code)."""
    with torch.no_grad():
        p = F.log_softmax(teacher(ids).logits.float(), -1)
        q = F.log_softmax(student(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _setup(seed=0, group=16, arch="llama", **over):
    """A tiny model pruned 2:4 (the teacher) and a copy quantized with coarse RTN (the student)."""
    teacher = tiny_model(arch, seed=seed, **over)
    quantized = {}
    for n in _linears(teacher):
        lin = teacher.get_submodule(n)
        keep = _keep24(lin.weight.detach())
        lin.weight.data *= keep
        quantized[n] = rtn(lin.weight.detach(), keep, group, symmetric=False)
    student = copy.deepcopy(teacher)
    for n, q in quantized.items():
        student.get_submodule(n).weight.data.copy_(q.dequantize())
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(seed))
    return teacher, student, quantized, ids


@pytest.mark.parametrize("arch,over", [("llama", {}), ("gemma3", {"final_logit_softcapping": 5.0})])
def test_head_log_probs_match_the_model_logits(arch, over):
    """The loss reads log p from the final hidden states through the output head (and the soft cap):
    it must equal log_softmax of the model's own logits."""
    model = tiny_model(arch, seed=1, **over)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.float(), -1)
        got = tune._head_logp(model, tune.teacher_states(model, ids))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_scaled_linear_computes_with_the_trained_scales():
    w = torch.randn(8, 32)
    keep = _keep24(w)
    q = rtn(w * keep, keep, 16, symmetric=False)
    m = tune.ScaledLinear(q, None, "cpu")
    x = torch.randn(3, 32)
    torch.testing.assert_close(m(x), x @ q.dequantize().T)
    with torch.no_grad():
        m.t.normal_(0, 0.1)
    s = q.scales.float() * (1 + m.t.detach())
    w_ref = (q.codes.float() - q.zeros.float().repeat_interleave(16, 1)) * s.repeat_interleave(16, 1)
    torch.testing.assert_close(m(x), x @ w_ref.T)
    assert bool((w_ref[~keep] == 0).all())


@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_scaled_linear_gradients_match_autograd_without_keeping_the_weight(dtype, bias):
    # Oracle: the same layer through plain autograd, W = L * s0 (1 + t) built as a tensor. The layer itself
    # must give the same output and gradients while saving no (out, in) float tensor for its backward
    # (that would be a second copy of the model while tuning).
    torch.manual_seed(3)
    w = torch.randn(12, 48)
    keep = _keep24(w)
    q = rtn(w * keep, keep, 16, symmetric=False)
    b = torch.randn(12).to(dtype) if bias else None
    m = tune.ScaledLinear(q, b, "cpu")
    with torch.no_grad():
        m.t.normal_(0, 0.05)
    x = torch.randn(2, 5, 48, dtype=dtype, requires_grad=True)  # (batch, tokens, in): odd sizes
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert not [sh for sh, dt in saved if sh == (12, 48) and dt.is_floating_point], saved
    gy = torch.randn_like(y)
    gx, gt = torch.autograd.grad(y, (x, m.t), gy)

    t = m.t.detach().clone().requires_grad_(True)
    levels = q.codes.float() - q.zeros.float().repeat_interleave(16, 1)
    w_ref = levels * (q.scales.float() * (1 + t)).repeat_interleave(16, 1)
    y_ref = F.linear(x, w_ref.to(dtype), b)
    gx_ref, gt_ref = torch.autograd.grad(y_ref, (x, t), gy)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gt, gt_ref, **({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else tol))
    assert m.levels.dtype == torch.int8


def test_tuning_moves_only_the_scales_and_lowers_the_kl():
    teacher, student, quantized, ids = _setup()
    targets = tune.teacher_states(teacher, ids)
    before = _kl_oracle(student, teacher, ids)
    out, info = tune.tune_scales(student, quantized, ids, targets, steps=30, lr=2e-2)
    after = _kl_oracle(student, teacher, ids)
    assert info["kept"] == "tuned" and info["kl_after"] < info["kl_before"]
    assert after < 0.9 * before, (before, after)
    assert info["kl_before"] == pytest.approx(before, rel=1e-3) and info["kl_after"] == pytest.approx(after, rel=1e-3)
    changed = 0
    for n, q in quantized.items():
        new = out[n]
        assert torch.equal(new.codes, q.codes) and torch.equal(new.zeros, q.zeros)
        assert new.scales.dtype == torch.float16 and new.group_size == q.group_size
        changed += int((new.scales != q.scales).sum())
        w = student.get_submodule(n).weight.detach()
        assert torch.equal(w, new.dequantize())  # the model ends with what will be stored
        assert bool((w[teacher.get_submodule(n).weight == 0] == 0).all())  # pruned weights stay exactly 0
        assert student.get_submodule(n).weight.requires_grad  # flags restored as they were
    assert changed > 0
    assert isinstance(student.get_submodule(_linears(student)[0]), torch.nn.Linear)  # modules put back


def test_tuning_that_does_not_help_keeps_the_gptq_scales():
    """With a step far below fp16's resolution the stored scales cannot change: KL is not lower, and
    the input scales come back unchanged."""
    teacher, student, quantized, ids = _setup(seed=2)
    out, info = tune.tune_scales(student, quantized, ids, tune.teacher_states(teacher, ids), steps=3, lr=1e-9)
    assert info["kept"] == "gptq" and info["kl_after"] == info["kl_before"]
    for n, q in quantized.items():
        assert torch.equal(out[n].scales, q.scales)
        assert torch.equal(student.get_submodule(n).weight.detach(), q.dequantize())


def test_bad_options_and_targets():
    with pytest.raises(LLMPruneError, match="--tune-steps"):
        tune.check(-1, 1e-3)
    with pytest.raises(LLMPruneError, match="--tune-lr"):
        tune.check(4, 0.0)
    teacher, student, quantized, ids = _setup()
    with pytest.raises(LLMPruneError, match="do not match"):
        tune.tune_scales(student, quantized, ids[:3], tune.teacher_states(teacher, ids), steps=1)


@pytest.mark.parametrize("fmt", ["w4s24", "w4g128"])
def test_pack_tune_changes_only_scales_on_disk(tmp_path, capsys, pruned_24, calib_txt, fmt):
    """`pack --quant gptq --tune-steps N`: the same codes, mask and zero points as plain GPTQ, other
    scales, recorded in the manifest; loaded back, it is closer to the unquantized model, by the KL
    the manifest reports."""
    from safetensors.torch import load_file

    from llmprune import checkpoint

    args = ["pack", str(pruned_24), "--format", fmt, "--quant", "gptq", "--grid", "asym", "--group-size", "16",
            "--calib", str(calib_txt), "--nsamples", "6", "--seqlen", "32", "--save-dtype", "float32", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "g")]) == 0, capsys.readouterr().err
    assert main([*args, "--tune-steps", "20", "--tune-lr", "5e-3", "--out", str(tmp_path / "t")]) == 0, \
        capsys.readouterr().err
    m = json.loads((tmp_path / "t" / "llmprune.json").read_text())["format"]["quant_options"]
    assert m["tune_steps"] == 20 and m["tune"]["kept"] == "tuned" and m["tune"]["kl_after"] < m["tune"]["kl_before"]
    out = capsys.readouterr().out
    assert "scales tuned 20 steps" in out and "tuned scales kept" in out, out
    from llmprune.hub import model_card

    card = model_card(json.loads((tmp_path / "t" / "llmprune.json").read_text()), "user/tiny")
    assert "quant gptq + 20 steps of scale tuning" in card
    a, b = load_file(tmp_path / "g" / "model.safetensors"), load_file(tmp_path / "t" / "model.safetensors")
    assert a.keys() == b.keys()
    differ = {k.rsplit(".", 1)[-1] for k in a if not torch.equal(a[k], b[k])}
    assert differ == {"scales"}, differ
    src, tok, _ = checkpoint.load(pruned_24)
    plain, _, _ = checkpoint.load(tmp_path / "g")
    tuned, _, _ = checkpoint.load(tmp_path / "t")
    from llmprune import calibration

    ids, _ = calibration.load(str(calib_txt), tok, 6, 32, 0)
    assert _kl_oracle(tuned, src, ids) < _kl_oracle(plain, src, ids)
    assert _kl_oracle(tuned, src, ids) == pytest.approx(m["tune"]["kl_after"], rel=1e-3)  # what was stored
    assert _kl_oracle(plain, src, ids) == pytest.approx(m["tune"]["kl_before"], rel=1e-3)


def test_tune_options_need_gptq(tmp_path, capsys, pruned_24):
    for extra, msg in [(["--quant", "rtn", "--tune-steps", "4"], "GPTQ options"),
                       (["--quant", "gptq", "--tune-steps", "-1"], "--tune-steps"),
                       (["--quant", "gptq", "--tune-steps", "4", "--tune-lr", "0"], "--tune-lr"),
                       (["--quant", "gptq", "--hessian-gib", "-1"], "--hessian-gib -1.0")]:
        rc = main(["pack", str(pruned_24), "--format", "w4s24", *extra, "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and not (tmp_path / "o").exists(), err


def test_compress_runs_the_tuning_too(tmp_path, capsys, tiny_dir, calib_txt):
    out = tmp_path / "c"
    rc = main(["compress", "--model", str(tiny_dir), "--pattern", "2:4", "--calib", str(calib_txt), "--out", str(out),
               "--format", "w4s24", "--quant", "gptq", "--group-size", "16", "--tune-steps", "5", "--tune-lr", "5e-3",
               *FAST_CLI])
    assert rc == 0, capsys.readouterr().err
    t = json.loads((out / "llmprune.json").read_text())["format"]["quant_options"]["tune"]
    assert t["steps"] == 5 and t["windows"] == 6 and t["kl_after"] <= t["kl_before"]


def test_tuning_with_streamed_blocks_is_tuning_in_place(monkeypatch):
    """A device too small for any block (faked: a budget of the embedding and head alone): every block's
    int8 levels, scales and biases stream in per call, the recomputation of activation checkpointing
    copies them again, and the scales, the KL figures and the model are those of tuning in place."""
    from llmprune import placement

    teacher, student, quantized, ids = _setup()
    targets = tune.teacher_states(teacher, ids)
    out0, info0 = tune.tune_scales(student, quantized, ids, targets, steps=4, lr=2e-2)
    state0 = {k: v.clone() for k, v in student.state_dict().items()}
    assert info0["placement"]["streamed_blocks"] == 0

    teacher, student, quantized, ids = _setup()
    base = sum(p.numel() * p.element_size() for n, p in student.named_parameters() if ".layers." not in n)
    monkeypatch.setattr(placement, "budgets", lambda devices, *a, **k: [base * 1.2] * len(devices))  # no block
    out, info = tune.tune_scales(student, quantized, ids, targets, steps=4, lr=2e-2)
    assert info["placement"]["streamed_blocks"] == len(student.model.layers)
    levels = sum(q.codes.numel() for q in quantized.values())  # int8: one byte a weight
    assert info["placement"]["streamed_gb"] * 1e9 > levels * (2 * 4 * tune.BATCH + 2 * len(ids))  # train + 2 KLs
    assert (info["kl_before"], info["kl_after"], info["kept"]) == (info0["kl_before"], info0["kl_after"], info0["kept"])
    for n in quantized:
        assert torch.equal(out[n].scales, out0[n].scales)
    assert all(torch.equal(state0[k], v) for k, v in student.state_dict().items())
    assert all(p.device.type == "cpu" and not m._forward_pre_hooks for m in student.modules() for p in m.parameters())


@pytest.mark.parametrize("arch,over", [("llama", {"attention_dropout": 0.5}), ("opt", {"dropout": 0.5})])
def test_tuning_measures_and_trains_without_dropout(arch, over):
    """Training mode (for activation checkpointing) would switch dropout on: the KL figures must be those of
    the deterministic model (the oracle, in eval mode), the same on every run, and the dropout restored."""
    teacher, student, quantized, ids = _setup(arch=arch, **over)
    teacher.eval(), student.eval()

    def dropouts(model):
        return [(k, v) for m in model.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]

    before = dropouts(student)
    assert 0.5 in [v for _, v in before]
    want = _kl_oracle(student, teacher, ids)
    targets = tune.teacher_states(teacher, ids)
    runs = [tune.tune_scales(copy.deepcopy(student), quantized, ids, targets, steps=2, lr=1e-2)[1] for _ in range(2)]
    assert runs[0]["kl_before"] == pytest.approx(want, rel=1e-4)
    assert [(r["kl_before"], r["kl_after"]) for r in runs] == [(runs[0]["kl_before"], runs[0]["kl_after"])] * 2
    with tune.no_dropout(student):
        assert all(v == 0 for _, v in dropouts(student))
    assert dropouts(student) == before


def test_teacher_states_walk_the_blocks_and_match_the_whole_model():
    teacher, _, _, ids = _setup()
    want = torch.cat([teacher.base_model(input_ids=b, use_cache=False).last_hidden_state for b in ids.split(3)])
    torch.testing.assert_close(tune.teacher_states(teacher, ids, batch_size=3), want.float(), rtol=0, atol=0)


def _experts_setup(family):
    """A tiny Mixture-of-Experts model pruned 2:4 (the teacher) and a copy quantized with coarse RTN (the student),
    every linear and expert projection but the last expert's down projection of layer 0 (left as it is)."""
    from llmprune import arch

    teacher = tiny_model(family, seed=0)
    left = "model.layers.0.mlp.experts[3].down_proj"
    quantized = {}
    with torch.no_grad():
        for n in arch.linear_names(teacher):
            w = arch.target(teacher, n).weight
            keep = _keep24(w)
            w.mul_(keep)
            if n != left:
                quantized[n] = rtn(w.clone(), keep, 16, symmetric=False)
        student = copy.deepcopy(teacher)
        for n, q in quantized.items():
            arch.target(student, n).weight.copy_(q.dequantize())
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    return teacher, student, quantized, ids, left


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_split_experts_of_scaled_linears_compute_the_fused_module(family):
    """quant.tune.scaled_experts: with any trained scales, the split module computes what the fused experts module
    computes with the weights those scales give (concatenated and interleaved, biased gate/up layouts), and the
    gradient reaches every routed expert's scales."""
    from llmprune import moe

    _, student, quantized, _, _ = _experts_setup(family)
    fused = student.model.layers[0].mlp.experts
    views = {moe.parse_view(n)[1:]: q for n, q in quantized.items() if n.startswith("model.layers.0.mlp.experts[")}
    split = tune.scaled_experts(fused, views)
    ref = copy.deepcopy(fused)
    with torch.no_grad():
        for (e, proj), q in views.items():
            m = split.get_submodule(f"{e}.{proj}")
            m.t.normal_(0, 0.05)
            w = (q.codes.float() - q.zeros.float().repeat_interleave(16, 1)) * m.scales().repeat_interleave(16, 1)
            moe.ExpertProj(ref, e, proj).weight.copy_(w)
    x = torch.randn(7, moe.ExpertProj(fused, 0, "up_proj").in_features)
    index = torch.randint(0, moe.num_experts(fused), (7, 2), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(7, 2)
    y = split(x, index, weights)
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x, index, weights), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    hit = set(index.unique().tolist())
    for (e, proj) in views:
        g = split.get_submodule(f"{e}.{proj}").t.grad
        assert (g is not None and bool(g.abs().sum() > 0)) == (e in hit), (e, proj)
    plain = split.get_submodule("3.down_proj")  # no codes: a frozen view of the fused weights
    assert isinstance(plain, torch.nn.Linear) and plain.weight.data_ptr() == moe.ExpertProj(fused, 3, "down_proj").weight.data_ptr()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_tuning_experts_moves_their_scales_and_lowers_the_kl(family):
    """tune_scales on a Mixture-of-Experts model: the KL figures are those of the models' own logits, the experts'
    scales move with the other layers', the fused parameters end with what will be stored (a projection without
    codes unchanged), and the fused experts modules and the gradient flags come back."""
    from llmprune import arch, moe

    teacher, student, quantized, ids, left = _experts_setup(family)
    before = _kl_oracle(student, teacher, ids)
    kept_left = arch.target(student, left).weight.clone()
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    out, info = tune.tune_scales(student, quantized, ids, tune.teacher_states(teacher, ids), steps=20, lr=2e-2)
    after = _kl_oracle(student, teacher, ids)
    assert info["kept"] == "tuned" and after < 0.8 * before, (before, after)
    assert info["kl_before"] == pytest.approx(before, rel=1e-3) and info["kl_after"] == pytest.approx(after, rel=1e-3)
    moved = set()
    for n, q in quantized.items():
        assert torch.equal(out[n].codes, q.codes) and torch.equal(out[n].zeros, q.zeros)
        assert torch.equal(arch.target(student, n).weight, out[n].dequantize())
        if not torch.equal(out[n].scales, q.scales):
            moved.add("expert" if moe.parse_view(n) else "linear")
    assert moved == {"expert", "linear"}
    assert torch.equal(arch.target(student, left).weight, kept_left)
    assert all(moe.is_fused_experts(layer.mlp.experts) for layer in student.model.layers)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags


def test_tuning_experts_with_streamed_blocks_is_tuning_in_place(monkeypatch):
    """A device too small for any block (faked): the split experts' int8 levels, scales and frozen projections
    stream in with the rest of each block, and the scales and KL figures are those of tuning in place."""
    from llmprune import placement

    teacher, student, quantized, ids, _ = _experts_setup("gpt_oss")
    targets = tune.teacher_states(teacher, ids)
    out0, info0 = tune.tune_scales(student, quantized, ids, targets, steps=4, lr=2e-2)
    teacher, student, quantized, ids, _ = _experts_setup("gpt_oss")
    base = sum(p.numel() * p.element_size() for n, p in student.named_parameters() if ".layers." not in n)
    monkeypatch.setattr(placement, "budgets", lambda devices, *a, **k: [base * 1.2] * len(devices))  # no block
    out, info = tune.tune_scales(student, quantized, ids, targets, steps=4, lr=2e-2)
    assert info["placement"]["streamed_blocks"] == len(student.model.layers) and info["placement"]["streamed_gb"] > 0
    assert (info["kl_before"], info["kl_after"], info["kept"]) == (info0["kl_before"], info0["kl_after"], info0["kept"])
    assert all(torch.equal(out[n].scales, out0[n].scales) for n in quantized)


def test_a_resumed_tuning_lets_go_of_the_state_it_loaded():
    """The state a resumed scale tuning reads back (the scale offsets and Adam's moments: 6.4 GB at 70B) goes into
    the fresh offsets and the optimizer and is then let go: none of its offsets is held while the training goes
    on, and the tuning ends with the scales of one that never stopped."""
    import io
    import weakref

    class Checkpoint:  # resume.Training's interface in memory
        def __init__(self, at=0, state=None):
            self.at, self.state, self.steps, self.saved, self.refs, self.seen = at, state, 0, None, [], []

        def resumed(self):
            if self.state is None:
                return None
            s = torch.load(io.BytesIO(self.state), weights_only=True)
            self.refs = [weakref.ref(t) for t in s["t"].values()]
            return s

        def due(self):
            self.steps += 1
            self.seen.append(sum(r() is not None for r in self.refs))
            return self.steps == self.at

        def save(self, state):
            buf = io.BytesIO()
            torch.save(state, buf)
            self.saved = buf.getvalue()

    def run(ck):
        teacher, student, quantized, ids = _setup()
        targets = tune.teacher_states(teacher, ids)
        blocks = list(tune.blocks_of(student))  # (before the linears are replaced, as tune_scales does)
        tune.scaled_in_place(student, quantized)
        tune.train(student, ids, targets, 6, 2e-2, blocks=blocks, checkpoint=ck)
        return [m.s0.clone() for m in student.modules() if isinstance(m, tune.ScaledLinear)]

    first = Checkpoint(at=3)
    whole = run(first)
    again = Checkpoint(state=first.saved)
    resumed = run(again)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed)) and len(whole) == len(resumed) > 0
    assert again.refs and again.seen == [0, 0]  # after steps 4 and 5 (was every offset, to the end)
