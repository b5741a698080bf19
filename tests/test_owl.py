"""OWL: outlier ratios and the layer-wise sparsity map against a transcription of the reference."""
import numpy as np
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.owl import outlier_ratio, owl_sparsities
from llmprune.solvers.wanda import wanda_score


def test_outlier_ratio_hand_case():
    # 99 ones and one 1000: mean 10.99, 5 x mean = 54.95 -> exactly one outlier in 100
    scores = [torch.ones(9, 11), torch.tensor([1000.0])]
    assert outlier_ratio(scores, M=5) == pytest.approx(0.01)
    assert outlier_ratio(scores, M=100) == 0.0


@pytest.mark.parametrize("m", [2.0, 5.0, 7.0])
def test_outlier_ratio_matches_concatenated_numpy(m):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 12), (5, 12), (12, 9)]
    linears = [(torch.randn(o, i, generator=g), torch.rand(i, generator=g) * 50) for o, i in shapes]
    for w, _ in linears:  # a few heavy weights make outliers
        w[0, :3] *= 40
    scores = [wanda_score(w, sq) for w, sq in linears]
    flat = np.concatenate([s.numpy().ravel() for s in scores]).astype(np.float64)
    expect = float(np.mean(flat > m * flat.mean()))
    assert expect > 0
    assert outlier_ratio(scores, M=m) == pytest.approx(expect)


def reference_map(ratios, target, lam):
    """OWL's lib/prune_all.py transcribed: densities in a 2*lam band around 1 - target."""
    r = np.asarray(ratios, dtype=np.float64) * 100  # the reference works in percent
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    density = r - r.mean() + (1 - target)
    return 1 - density


@pytest.mark.parametrize("n,target,lam,seed",
                         [(2, 0.5, 0.08, 0), (12, 0.7, 0.08, 1), (30, 0.5, 0.2, 2), (7, 0.3, 0.05, 3)])
def test_sparsities_mean_range_and_order(n, target, lam, seed):
    ratios = np.random.default_rng(seed).uniform(0.001, 0.05, size=n).tolist()
    s = np.array(owl_sparsities(ratios, target, lam))
    np.testing.assert_allclose(s, reference_map(ratios, target, lam), atol=1e-12)
    assert s.mean() == pytest.approx(target, abs=1e-12)
    assert s.max() - s.min() == pytest.approx(2 * lam, abs=1e-12)
    assert np.all(np.abs(s - target) <= 2 * lam + 1e-12)
    order = np.argsort(ratios)
    assert np.all(np.diff(s[order]) <= 1e-15)  # more outliers -> lower (or equal) sparsity


def test_equal_ratios_or_zero_lambda_give_uniform():
    assert owl_sparsities([0.02, 0.02, 0.02], 0.6) == [0.6, 0.6, 0.6]
    assert owl_sparsities([0.01, 0.03], 0.6, lam=0.0) == [0.6, 0.6]


def test_bad_inputs():
    with pytest.raises(LLMPruneError, match="--owl-lambda"):
        owl_sparsities([0.01, 0.05], 0.05, lam=0.1)  # would give a negative sparsity
    with pytest.raises(LLMPruneError, match="--owl-lambda"):
        owl_sparsities([0.01, 0.05], 0.5, lam=-0.1)
    with pytest.raises(LLMPruneError, match="--sparsity"):
        owl_sparsities([0.01, 0.05], 1.0)
    with pytest.raises(LLMPruneError):
        owl_sparsities([], 0.5)
    with pytest.raises(LLMPruneError, match="--owl-m"):
        outlier_ratio([torch.ones(3)], M=0)
    with pytest.raises(LLMPruneError):
        outlier_ratio([])


def test_layer_sparsities_on_tiny_model_match_plain_hooks():
    """Independent oracle: one ordinary forward of the whole (dense) model with hooks that sum x^2
    per linear, then the block ratios and the reference map in numpy."""
    from llmprune import arch, prune
    from llmprune.owl import layer_sparsities
    from llmprune.testing import tiny_model

    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():  # make the blocks differ in outliers
        model.model.layers[1].mlp.down_proj.weight[:, :4] *= 30
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    names = prune.target_linears(model, ignore=r"\.0\.self_attn\.q_proj")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = layer_sparsities(model, names, ids, 0.5, batch_size=3, progress=False, m=5.0, lam=0.08)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned
    assert sorted(got) == sorted(names)

    sq = {n: 0.0 for n in names}

    def add(mod, inp, out, n):
        x = inp[0].double().reshape(-1, inp[0].shape[-1])  # (tokens, in)
        sq[n] = sq[n] + x.pow(2).sum(0)

    hooks = [arch.get(model, n).register_forward_hook(lambda mod, i, o, n=n: add(mod, i, o, n))
             for n in names]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    ratios = []
    for b in range(3):
        blk = [n for n in names if n.startswith(f"model.layers.{b}.")]
        w = [arch.get(model, n).weight.detach().double() for n in blk]
        flat = np.concatenate([(wi.abs() * sq[n].sqrt()).numpy().ravel() for wi, n in zip(w, blk)])
        ratios.append(float(np.mean(flat > 5.0 * flat.mean())))
    expect = reference_map(ratios, 0.5, 0.08)
    for n in names:
        assert got[n] == pytest.approx(expect[int(n.split(".")[2])], abs=1e-6)
    assert np.mean([got[f"model.layers.{b}.mlp.up_proj"] for b in range(3)]) == pytest.approx(0.5)
