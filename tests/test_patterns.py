import pytest
import torch

from llmprune import patterns
from llmprune.errors import LLMPruneError


def oracle_prune_lowest(row, k):
    order = sorted(range(len(row)), key=lambda j: (row[j], j))  # stable: lower index pruned first
    keep = [True] * len(row)
    for j in order[:k]:
        keep[j] = False
    return keep


@pytest.mark.parametrize("shape", [(3, 7), (5, 16), (1, 33)])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77])
def test_row_mask_matches_oracle(shape, s):
    torch.manual_seed(0)
    score = torch.randint(0, 5, shape).float()  # many ties on purpose
    keep = patterns.keep_mask(score, patterns.parse("unstructured"), s, scope="row")
    k = patterns.n_pruned(shape[1], s)
    for i in range(shape[0]):
        assert keep[i].tolist() == oracle_prune_lowest(score[i].tolist(), k)
    assert patterns.satisfies(keep, patterns.parse("unstructured"), s)


def test_layer_mask_matches_oracle():
    torch.manual_seed(1)
    score = torch.randint(0, 4, (6, 10)).float()
    keep = patterns.keep_mask(score, patterns.parse("unstructured"), 0.45, scope="layer")
    flat = oracle_prune_lowest(score.flatten().tolist(), patterns.n_pruned(60, 0.45))
    assert keep.flatten().tolist() == flat
    assert patterns.satisfies(keep, patterns.parse("unstructured"), 0.45, scope="layer")


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_mask_matches_oracle(nm):
    p = patterns.parse(nm)
    torch.manual_seed(2)
    score = torch.randn(5, 3 * p.m)
    keep = patterns.keep_mask(score, p, p.implied_sparsity)
    for i in range(5):
        for b in range(3):
            blk = score[i, b * p.m:(b + 1) * p.m].tolist()
            assert keep[i, b * p.m:(b + 1) * p.m].tolist() == oracle_prune_lowest(blk, p.m - p.n)
    assert patterns.satisfies(keep, p, p.implied_sparsity)


def test_group_mask():
    p = patterns.parse("group:4")
    torch.manual_seed(3)
    score = torch.rand(3, 32)
    keep = patterns.keep_mask(score, p, 0.5)
    for i in range(3):
        g = score[i].view(8, 4).sum(-1).tolist()
        want = oracle_prune_lowest(g, 4)
        assert keep[i].view(8, 4).all(-1).tolist() == want
    assert patterns.satisfies(keep, p, 0.5)
    assert not patterns.satisfies(torch.ones(3, 32, dtype=torch.bool), p, 0.5)


@pytest.mark.parametrize("spec", ["4:4", "0:4", "5:4", "x", "group:0", "2-4"])
def test_bad_patterns(spec):
    with pytest.raises(LLMPruneError):
        patterns.parse(spec)


def test_sparsity_resolution():
    nm = patterns.parse("2:4")
    assert patterns.resolve_sparsity(nm, None) == 0.5
    assert patterns.resolve_sparsity(nm, 0.5) == 0.5
    with pytest.raises(LLMPruneError, match="contradicts"):
        patterns.resolve_sparsity(nm, 0.6)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(LLMPruneError, match="outside"):
            patterns.resolve_sparsity(patterns.parse("unstructured"), bad)
    with pytest.raises(LLMPruneError, match="divisible"):
        patterns.keep_mask(torch.rand(2, 6), nm, 0.5)
