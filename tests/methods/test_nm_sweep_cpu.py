"""SparseGPT's compiled CPU N:M sweep (dsnt_export.methods.nm_sweep_cpu) against the torch ops
it replaces, a float64 textbook sweep, hand-made ties, and its own tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dsnt_export.methods.sparsegpt as sg
from dsnt_export.methods.nm_sweep_cpu import (
    _TILE,
    _compiled,
    kernel_available,
    nm_block_sweep_cpu,
)
from dsnt_export.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from dsnt_export.patterns import parse_pattern

pytestmark = pytest.mark.skipif(not kernel_available(), reason="Numba kernel not available")


def _problem(count: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A transposed weight block [count, rows] and the upper factor U of a correlated H^-1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * count, count, generator=gen)
    x = x @ (torch.eye(count) + 0.4 * torch.randn(count, count, generator=gen) / count**0.5)
    h = 2.0 / x.shape[0] * x.t() @ x
    return torch.randn(count, rows, generator=gen), inverse_hessian_factor(h, 0.01)


def _torch_sweep(wt: torch.Tensor, u: torch.Tensor, pat) -> tuple:
    """The same block sweep as torch ops (``_prune_block_nm``, the path without the kernel)."""
    prune = torch.zeros(wt.shape, dtype=torch.bool)
    err = sg._prune_block_nm(wt, u, pat, prune)
    return wt, err, prune


def _kernel_sweep(wt: torch.Tensor, u: torch.Tensor, pat) -> tuple:
    """The kernel on the whole block, returned in the torch path's transposed layout (pruned
    entries holding their values at pruning time, as there)."""
    w = wt.t().contiguous()
    keep = torch.zeros(w.shape, dtype=torch.bool)
    vals = torch.full(w.shape, float("nan"))
    err = nm_block_sweep_cpu(w, u, 0, w.shape[1], pat.n_prune, pat.m, keep, vals)
    assert bool((w[~keep] == 0).all()) and bool((vals[keep] == 0).all())
    return (w + vals).t(), err.t(), ~keep.t()


def _textbook_sweep(wt: torch.Tensor, u: torch.Tensor, pat) -> tuple:
    """Column by column in float64, no grouping (the OBS sweep of the SparseGPT paper, Alg. 1)."""
    w, u = wt.double().clone(), u.double()
    count = w.shape[0]
    prune = torch.zeros(w.shape, dtype=torch.bool)
    err = torch.zeros_like(w)
    for i in range(count):
        if i % pat.m == 0:
            sal = w[i : i + pat.m] ** 2 / torch.diagonal(u)[i : i + pat.m, None] ** 2
            order = torch.argsort(sal, dim=0, stable=True)[: pat.n_prune]
            prune[i : i + pat.m].scatter_(0, order, True)
        err[i] = w[i] * prune[i] / u[i, i]
        w[i + 1 :] -= u[i, i + 1 :, None] * err[i][None, :]
    return w, err, prune


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "2:8", "4:8"])
@pytest.mark.parametrize("count,rows", [(128, 700), (16, 5), (64, _TILE + 1)])
def test_kernel_matches_torch_ops_and_textbook(pattern, count, rows):
    pat = parse_pattern(pattern)
    wt, u = _problem(count, rows, seed=count * 1000 + rows + pat.m * 10 + pat.n_keep)
    kw, ke, kp = _kernel_sweep(wt.clone(), u, pat)
    tw, te, tp = _torch_sweep(wt.clone(), u, pat)
    bw, be, bp = _textbook_sweep(wt, u, pat)
    # exactly M - N pruned in every group of every row
    assert bool((kp.reshape(-1, pat.m, rows).sum(1) == pat.n_prune).all())
    assert torch.equal(kp, tp) and torch.equal(kp, bp)  # random data: no near-ties at stake
    scale = wt.abs().max()
    assert torch.allclose(kw, tw, rtol=0, atol=2e-5 * scale)
    assert torch.allclose(ke, te, rtol=0, atol=2e-5 * scale / u.diagonal().min())
    assert torch.allclose(kw.double(), bw, rtol=0, atol=2e-5 * scale)
    assert torch.allclose(ke.double(), be, rtol=0, atol=2e-5 * scale / u.diagonal().min())
    assert bool((ke[~kp] == 0).all())


def test_ties_prune_the_lower_column_and_hand_computed_updates():
    # U = I: no updates reach other columns, saliency = w^2, e = w where pruned. Row 0: all four
    # equal -> the first two go; row 1: (3, -1, 1, 2) -> |1| twice, the lower one (col 1) and
    # col 2 go; row 2: (0, 0, 5, 0) -> zeros at cols 0 and 1 go (ties to the lower column).
    u = torch.eye(4)
    wt = torch.tensor([[1.0, 3.0, 0.0], [1.0, -1.0, 0.0], [1.0, 1.0, 5.0], [1.0, 2.0, 0.0]])
    w, err, prune = _kernel_sweep(wt.clone(), u, parse_pattern("2:4"))
    assert prune.t().tolist() == [
        [True, True, False, False],
        [False, True, True, False],
        [True, True, False, False],
    ]
    assert torch.equal(w, wt)  # U = I: nothing else moves
    assert torch.equal(err, torch.where(prune, wt, 0.0))
    # one coupling U[0, 1] = 0.5, d = 1 (exact in float32): pruning w0 = 2 sends 2 * 0.5 into
    # column 1 before its own choice; 1:2 on one row (2, 3): saliencies 4 < 9, so col 0 goes,
    # e = 2, w1 = 3 - 0.5 * 2 = 2.
    u = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    w, err, prune = _kernel_sweep(torch.tensor([[2.0], [3.0]]), u, parse_pattern("1:2"))
    assert prune.tolist() == [[True], [False]]
    assert err.tolist() == [[2.0], [0.0]] and w.tolist() == [[2.0], [2.0]]


def test_rows_are_independent_of_the_tiling():
    """Every row's arithmetic is the same whatever tile it falls in: bit-identical results."""
    pat = parse_pattern("2:4")
    wt, u = _problem(32, 300, seed=5)
    fn = _compiled()
    outs = []
    for tile in (1, 7, 300, 512):
        w = wt.t().contiguous().numpy()
        err = np.empty_like(w)
        keep = np.zeros(w.shape, np.bool_)
        vals = np.zeros(w.shape, np.float32)
        fn(w, u.contiguous().numpy(), 0, 32, err, keep, vals, pat.n_prune, pat.m, tile)
        outs.append((w, err, keep, vals))
    for got in outs[1:]:
        for a, b in zip(got, outs[0], strict=True):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("pattern", ["2:4", "2:8"])
def test_sparsegpt_prune_same_with_and_without_kernel(pattern, monkeypatch):
    """The whole prune (blocks, lazy updates, pruned values for DSnoT) through either path."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 192, generator=gen) * (0.5 + torch.rand(192, generator=gen))
    h = 2.0 / 1024 * x.t() @ x
    w = torch.randn(96, 192, generator=gen)
    new_k, keep_k, vals_k = sparsegpt_prune(w, h, pattern, blocksize=64, return_pruned_values=True)
    monkeypatch.setattr(sg, "kernel_available", lambda: False)
    new_t, keep_t, vals_t = sparsegpt_prune(w, h, pattern, blocksize=64, return_pruned_values=True)
    assert torch.equal(keep_k, keep_t)
    assert torch.allclose(new_k, new_t, rtol=0, atol=1e-5)
    assert torch.allclose(vals_k, vals_t, rtol=0, atol=1e-5)
    assert bool((new_k[~keep_k] == 0).all()) and bool((vals_k[keep_k] == 0).all())


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("DSNT_EXPORT_NO_NUMBA", "1")
    _compiled.cache_clear()
    try:
        assert not kernel_available()
        w, h = torch.randn(8, 16), torch.eye(16)
        new, keep = sparsegpt_prune(w, h, "2:4", blocksize=16)  # the torch ops, same contract
        assert bool((keep.reshape(8, 4, 4).sum(-1) == 2).all())
    finally:
        monkeypatch.delenv("DSNT_EXPORT_NO_NUMBA")
        _compiled.cache_clear()
    assert kernel_available()
