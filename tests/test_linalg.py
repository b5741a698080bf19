"""The inverse-Hessian factor: torch's chain and the in-place LAPACK path against an fp64 oracle
(U upper, U^T U = (H + d mean(diag H) I)^-1 with dead inputs set to 1), retries, memory."""
import os
import subprocess
import sys

import pytest
import torch

from llmprune import linalg
from llmprune.errors import LLMPruneError
from tests.test_sparsegpt import indefinite_hessian


def gram(n, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 7, n, generator=g) * torch.linspace(0.2, 3, n)  # (tokens, in), unequal scales
    x[:, list(dead)] = 0
    return x.T @ x / (n + 7)


def oracle(h, d):
    a = h.double().clone()
    dead = a.diagonal() == 0
    mean = torch.where(dead, torch.ones_like(a.diagonal()), a.diagonal()).mean()
    a.diagonal()[dead] = 1.0
    a.diagonal().add_(d * mean)
    return torch.linalg.inv(a)


@pytest.fixture(params=["torch", "lapack"])
def path(request, monkeypatch):
    monkeypatch.setattr(linalg, "LEAN_BYTES", 1 << 40 if request.param == "torch" else 0)
    return request.param


@pytest.mark.parametrize("n", [1, 2, 5, 96, 331])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_matches_oracle(path, n, dtype):
    h = gram(n, seed=n, dead=(0, n // 2) if n > 4 else ()).to(dtype)
    h0 = h.clone()
    u, d, raised = linalg.inverse_hessian_cholesky(h, 0.01)
    assert torch.equal(h, h0), "H was modified without overwrite"
    assert u.dtype == dtype and raised == 0 and d == 0.01
    assert torch.equal(u, u.triu()), "the factor is not upper triangular"
    inv = oracle(h0, d)
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(u.double().T @ u.double(), inv, rtol=tol, atol=tol * float(inv.abs().max()))
    assert bool((u.diagonal() > 0).all())


def test_paths_agree_and_overwrite_reuses_the_memory(monkeypatch):
    h = gram(300, seed=3, dead=(7,))
    ref, _, _ = linalg.inverse_hessian_cholesky(h, 0.01)  # torch's chain (below LEAN_BYTES)
    monkeypatch.setattr(linalg, "LEAN_BYTES", 0)
    mine = h.clone()
    u, _, _ = linalg.inverse_hessian_cholesky(mine, 0.01, overwrite=True)
    assert u.data_ptr() == mine.data_ptr()
    assert torch.allclose(u, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_failed_attempts_are_undone_and_retried(path):
    h = indefinite_hessian(40, 2e-3, seed=11).float()
    u, d, raised = linalg.inverse_hessian_cholesky(h.clone(), 1e-5, overwrite=True)
    assert raised == 3 and d == pytest.approx(1e-2)
    inv = oracle(h, d)
    assert torch.allclose(u.double().T @ u.double(), inv, rtol=1e-3, atol=1e-3 * float(inv.abs().max()))


def test_hopeless_and_non_finite(path):
    with pytest.raises(LLMPruneError, match="--damp"):
        linalg.inverse_hessian_cholesky(-torch.eye(8) - 0.1 * torch.ones(8, 8), 0.01, overwrite=True)
    with pytest.raises(LLMPruneError, match="inf/NaN"):
        linalg.inverse_hessian_cholesky(torch.full((8, 8), float("inf")), 0.01)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_reverse_is_both_flips(n):
    a = torch.randn(n, n)
    r = a.clone()
    linalg._reverse(r, chunk=5)  # chunks smaller than the matrix and an odd middle
    assert torch.equal(r, a.flip(0, 1))


PEAK = """
import sys, threading, time, torch
from llmprune import linalg
linalg.LEAN_BYTES = int(sys.argv[1])
linalg.inverse_hessian_cholesky(torch.eye(64), 0.01)  # LAPACK's own buffers, allocated once
def anon():  # anonymous resident memory: file-backed pages (evicted and re-read under load) are noise
    return int([l for l in open("/proc/self/status") if l.startswith("RssAnon")][0].split()[1])
n = 4096
x = torch.randn(512, n, generator=torch.Generator().manual_seed(0))
h = x.T @ x / 512
del x
base, peak, done = anon(), [0], False
def watch():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
t = threading.Thread(target=watch)
t.start()
linalg.inverse_hessian_cholesky(h, 0.01, overwrite=sys.argv[2] == "1")
done = True
t.join()
print((peak[0] - base) / (n * n * 4 / 1024))
"""


def peak_matrices(lean_bytes: int, overwrite: bool) -> float:
    """How many 4096 x 4096 fp32 matrices the factor adds to the peak anonymous RSS (a subprocess)."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(lean_bytes), str(int(overwrite))], capture_output=True,
                         text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    return float(out.stdout.strip().splitlines()[-1])


def test_torch_chain_holds_few_copies():
    """torch's chain: one working copy plus LAPACK's column-major copy (the textbook chain of
    temporaries held five; a 70B down_proj's Hessian is 3.3 GB)."""
    copies = peak_matrices(1 << 40, overwrite=False)
    assert copies < 3.6, f"the factor held {copies:.1f} Hessian-sized matrices at its peak"


def test_in_place_factor_allocates_no_matrix():
    """In place (LAPACK on H's own memory): less than one Hessian-sized matrix (chunk buffers only);
    without overwrite, one working copy more."""
    copies = peak_matrices(0, overwrite=True)
    assert copies < 0.8, f"the in-place factor held {copies:.2f} Hessian-sized matrices at its peak"
    copies = peak_matrices(0, overwrite=False)
    assert 0.9 < copies < 1.8, f"the in-place factor on a copy held {copies:.2f} matrices"
