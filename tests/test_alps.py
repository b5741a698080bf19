"""ALPS against independent oracles on random data: least squares on a fixed support, SparseGPT's
objective on the same problem, exact masks; and its wiring (registry, DSnoT init, OWL, CLI)."""
import json

import pytest
import torch

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.patterns import n_pruned, parse, satisfies
from llmprune.solvers import get
from llmprune.solvers.alps import alps, pcg, project
from llmprune.solvers.sparsegpt import sparsegpt
from llmprune.stats import LayerStats
from llmprune.testing import FAST_CLI


def correlated(n, d, seed, rank=6, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + noise * torch.randn(n, d, generator=g)


def stats_of(x):
    s = LayerStats(x.shape[1], {"hessian", "norms", "moments"})
    s.add(x)
    return s


def sq_err(w, w2, x):
    return float(((x.double() @ (w - w2).double().T) ** 2).sum())  # ||X W^T - X W'^T||^2


def lstsq_rows(x, w, keep, lam=0.0):
    """Per row r: argmin over w_S of ||X (w_hat - w)||^2 + lam ||w_hat - w||^2 with w zero off S = keep[r]:
    the least-squares problem [X_S; sqrt(lam) I] w_S ~ [X w_hat; sqrt(lam) w_hat_S], solved by lstsq in fp64."""
    x, w = x.double(), w.double()
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        s = keep[r].nonzero().flatten()
        a = torch.cat([x[:, s], lam**0.5 * torch.eye(len(s), dtype=x.dtype)])  # (n + |S|, |S|)
        y = torch.cat([x @ w[r], lam**0.5 * w[r, s]])
        out[r, s] = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
    return out


@pytest.mark.parametrize("spec,s,damp", [("unstructured", 0.6, 0.0), ("2:4", None, 0.0), ("unstructured", 0.5, 0.01)])
def test_kept_weights_are_the_least_squares_solution_on_their_support(spec, s, damp):
    x = correlated(600, 24, seed=1)
    w = torch.randn(7, 24, generator=torch.Generator().manual_seed(2))
    p = parse(spec)
    s = p.implied_sparsity if s is None else s
    r = alps(w, stats_of(x), p, s, damp=damp, pcg_steps=200)  # CG is exact within |S| steps (up to rounding)
    lam = damp * float((x.double() ** 2).sum(0).mean())  # the ridge term, in X^T X units
    want = lstsq_rows(x, w, r.keep, lam)
    torch.testing.assert_close(r.weight.double(), want, rtol=2e-3, atol=2e-4)


def test_pcg_alone_solves_the_masked_system():
    g = torch.Generator().manual_seed(3)
    x = correlated(400, 20, seed=4)
    h = (x.T @ x).double()
    e = h.diagonal().sqrt()
    hn = (h / e[:, None] / e[None, :]).float()  # unit diagonal, as alps uses it
    w0 = torch.randn(5, 20, generator=g)
    keep = torch.rand(5, 20, generator=g) > 0.4
    got = pcg(hn, w0 @ hn, keep, torch.zeros_like(w0), steps=100) * keep  # (out, in), scaled variables
    want = lstsq_rows(x / e.float(), w0, keep)  # the same problem with the columns of X scaled by E^-1
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)


def scaled(n, d, seed):
    """Nearly uncorrelated inputs of very different scales (plus a shared component): where SparseGPT's
    greedy OBS is closest to optimal, so the margin is smallest."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * (0.2 + 2 * torch.rand(d, generator=g)) + 0.5 * torch.randn(n, 1, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("data", [correlated, scaled])
@pytest.mark.parametrize("spec,s", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None)])
def test_objective_never_exceeds_sparsegpt(spec, s, data, seed):
    x = data(512, 48, seed=10 + seed)
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(20 + seed))
    p = parse(spec)
    s = p.implied_sparsity if s is None else s
    st = stats_of(x)
    e_alps = sq_err(w, alps(w, st, p, s).weight, x)
    e_sgpt = sq_err(w, sparsegpt(w, st, p, s, blocksize=16).weight, x)
    assert e_alps <= e_sgpt


@pytest.mark.parametrize("spec,s,scope,in_f", [("unstructured", 0.5, "layer", 37), ("unstructured", 0.3, "layer", 37),
                                               ("unstructured", 0.55, "row", 37), ("2:4", 0.5, "layer", 36),
                                               ("4:8", 0.5, "layer", 40), ("1:4", 0.75, "layer", 36)])
def test_masks_satisfy_pattern_exactly(spec, s, scope, in_f):
    x = correlated(200, in_f, seed=5)
    w = torch.randn(11, in_f, generator=torch.Generator().manual_seed(6))
    p = parse(spec)
    r = alps(w, stats_of(x), p, s, scope=scope)
    assert satisfies(r.keep, p, s, scope=scope if p.kind == "unstructured" else "row")
    if p.kind == "unstructured" and scope == "layer":
        assert int((~r.keep).sum()) == n_pruned(r.keep.numel(), s)
    assert bool((r.weight[~r.keep] == 0).all()) and bool(torch.isfinite(r.weight).all())
    assert r.info["alps_iters"] >= 1 and 0 < r.info["alps_rel_err"] <= r.info["alps_rel_err_admm"] * (1 + 1e-4)


def test_projection_keeps_the_largest():
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    k = project(z, parse("unstructured"), 0.75)
    assert int(k.sum()) == 24 and float(z.abs()[k].min()) >= float(z.abs()[~k].max())
    k = project(z, parse("2:4"), 0.5).reshape(6, 4, 4)
    a = z.abs().reshape(6, 4, 4)
    assert bool((k.sum(-1) == 2).all())
    assert bool((a.masked_fill(~k, float("inf")).amin(-1) >= a.masked_fill(k, -1.0).amax(-1)).all())


def test_dead_inputs_are_zeroed_not_nan():
    x = correlated(300, 16, seed=8)
    x[:, 3] = 0.0
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    r = alps(w, stats_of(x), parse("2:4"), 0.5)
    assert bool(torch.isfinite(r.weight).all()) and bool((r.weight[:, 3] == 0).all())


@pytest.mark.parametrize("kw,match", [({"rho": 0.0}, "--rho"), ({"max_iter": 0}, "--max-iter"),
                                      ({"pcg_steps": -1}, "--pcg-steps"), ({"damp": -0.1}, "--damp"),
                                      ({"scope": "global"}, "scope")])
def test_bad_options(kw, match):
    x = correlated(100, 8, seed=1)
    with pytest.raises(LLMPruneError, match=match):
        alps(torch.randn(4, 8), stats_of(x), parse("unstructured"), 0.5, **kw)
    with pytest.raises(LLMPruneError, match="group"):
        alps(torch.randn(4, 8), stats_of(x), parse("group:4"), 0.5)


def test_registered_and_dsnot_init():
    s = get("alps")
    assert s.needs == {"hessian"} and s.sequential
    d = get("dsnot")
    assert "hessian" in d.needs_for({"init": "alps"}) and d.sequential_for({"init": "alps"})
    x = correlated(256, 32, seed=11) + 1.0
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(12))
    st, p = stats_of(x), parse("unstructured")
    first = alps(w, st, p, 0.5)
    r = d.fn(w, st, p, 0.5, init="alps", update_threshold=0.0)
    assert r.info["dsnot_init"] == "alps" and "alps_iters" in r.info
    assert torch.equal(r.keep.sum(1), first.keep.sum(1))


def test_cli_with_owl(tmp_path, capsys, tiny_dir, calib_txt):
    out = tmp_path / "o"
    rc = main([str(a) for a in ("compress", "--model", tiny_dir, "--solver", "alps", "--sparsity", "0.6", "--owl",
                                "--owl-lambda", "0.05", "--rho", "0.2", "--max-iter", "60", "--pcg-steps", "5",
                                "--calib", calib_txt, "--out", out, *FAST_CLI)])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "llmprune.json").read_text())
    assert m["solver"] == "alps" and m["solver_opts"] == {"rho": 0.2, "max_iter": 60, "pcg_steps": 5}
    assert len(set(m["owl"]["per_layer"])) > 1
    assert m["sparsity"]["measured"] == pytest.approx(0.6, abs=0.01)
