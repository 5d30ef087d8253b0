"""dsnt_export/refine/refit.py: the least-squares re-fit of kept weights (closed form, CG)."""

from __future__ import annotations

import pytest
import torch

from dsnt_export.errors import ShapeError, UserInputError
from dsnt_export.methods.sparsegpt import sparsegpt_prune
from dsnt_export.refine.loss import dampened_hessian, quadratic_loss
from dsnt_export.refine.refit import RefitConfig, refine_layer, refit_cg, refit_exact
from dsnt_export.stats import ActivationStats


def _layer(R=6, C=8, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, C, generator=g) * torch.linspace(0.2, 2.0, C)
    H = 2 / n * X.T @ X
    W = torch.randn(R, C, generator=g)
    keep = torch.rand(R, C, generator=g) < 0.5
    keep[:, 0] = True  # every row keeps something; counts differ between rows
    return W, keep, H


def test_golden_two_inputs():
    # H = [[2, 1], [1, 2]], mean diag 2, percdamp 0.5 -> ridge 1: H_lam = [[3, 1], [1, 3]]
    # keep input 0, prune input 1 (w0 = [1, 1]): w_0 = 1 + (1/3) * 1 * 1 = 4/3
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    w0 = torch.ones(1, 2)
    keep = torch.tensor([[True, False]])
    w, info = refit_exact(torch.zeros(1, 2), keep, w0, H, percdamp=0.5)
    assert torch.allclose(w, torch.tensor([[4 / 3, 0.0]]))
    # loss before: d = [1, 1], d H_lam d = 3 + 1 + 1 + 3 = 8; after: d = [-1/3, 1] -> 8/3
    assert info.loss_before == pytest.approx(8.0) and info.loss_after == pytest.approx(8 / 3)
    wc, infoc = refit_cg(torch.zeros(1, 2), keep, w0, H, percdamp=0.5, steps=1)
    assert torch.allclose(wc, w) and infoc.steps == 1  # one unknown: one CG step is exact


def test_exact_matches_per_row_solve_in_float64():
    W, keep, H = _layer()
    w, info = refit_exact(W, keep, W, H, percdamp=0.05, chunk=4)
    Hl = dampened_hessian(H, 0.05).double()
    for r in range(W.shape[0]):
        K, P = keep[r], ~keep[r]
        want = W[r, K].double() + torch.linalg.solve(Hl[K][:, K], Hl[K][:, P] @ W[r, P].double())
        assert torch.allclose(w[r, K].double(), want, atol=1e-4)
        assert (w[r, P] == 0).all()
    # optimality: the gradient of the dampened loss vanishes on kept entries
    grad = (W - w) @ dampened_hessian(H, 0.05)
    assert grad[keep].abs().max() < 1e-4
    assert info.loss_after < info.loss_before


@pytest.mark.parametrize("precondition", [True, False])
def test_cg_monotone_and_converges_to_exact(precondition):
    W, keep, H = _layer(seed=1)
    start = torch.where(keep, W, 0.0)
    exact, ex = refit_exact(start, keep, W, H, percdamp=0.01)

    def cg(steps):
        return refit_cg(start, keep, W, H, percdamp=0.01, steps=steps, precondition=precondition)

    losses = [cg(s)[1].loss_after for s in range(9)]
    assert losses[0] == pytest.approx(ex.loss_before)  # 0 steps: unchanged
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False))
    w8, _ = cg(8)  # <= 8 unknowns per row
    assert torch.allclose(w8, exact, atol=1e-3)
    assert losses[-1] == pytest.approx(ex.loss_after, rel=1e-4)


def test_jacobi_preconditioned_cg_is_exact_in_one_step_on_a_diagonal_hessian():
    # H diagonal: H_KP = 0, so (1) gives w_K = w0_K; diag(H) is H's inverse's exact preconditioner
    g = torch.Generator().manual_seed(3)
    H = torch.diag(torch.rand(12, generator=g) * 5 + 0.1)
    W = torch.randn(5, 12, generator=g)
    keep = torch.rand(5, 12, generator=g) < 0.5
    start = torch.where(keep, torch.randn(5, 12, generator=g), 0.0)
    w, info = refit_cg(start, keep, W, H, percdamp=0.2, steps=1)
    assert torch.allclose(w, torch.where(keep, W, 0.0), atol=1e-6)
    assert info.loss_after < info.loss_before
    plain, _ = refit_cg(start, keep, W, H, percdamp=0.2, steps=1, precondition=False)
    assert not torch.allclose(plain, w, atol=1e-3)  # plain CG needs more steps here


def test_refit_lowers_sparsegpt_loss_and_keeps_mask():
    W, _, H = _layer(R=16, C=32, n=256, seed=2)
    w_sg, keep = sparsegpt_prune(W, H, "2:4", blocksize=8)
    loss_sg = quadratic_loss(W - w_sg, dampened_hessian(H, 0.01))
    w, info = refit_exact(w_sg, keep, W, H, percdamp=0.01)
    assert info.loss_before == pytest.approx(loss_sg, rel=1e-5)
    assert info.loss_after < loss_sg
    assert torch.equal(w != 0, keep)  # the mask is unchanged (kept values stay nonzero here)
    big_ridge, info_big = refit_exact(w_sg, keep, W, H, percdamp=1e4)
    assert torch.allclose(big_ridge, torch.where(keep, W, 0.0), atol=1e-2)  # ridge -> magnitude


def test_errors():
    W, keep, H = _layer()
    with pytest.raises(ShapeError):
        refit_exact(W, keep[:, :4], W, H)
    with pytest.raises(ShapeError):
        refit_cg(W, keep, W, H[:4, :4])
    with pytest.raises(UserInputError, match="percdamp > 0"):
        refit_exact(W, keep, W, H, percdamp=0.0)
    with pytest.raises(UserInputError, match="steps"):
        refit_cg(W, keep, W, H, steps=-1)
    with pytest.raises(UserInputError, match="percdamp"):
        refit_cg(W, keep, W, H, percdamp=-1.0)


def test_refit_config_validation_and_json():
    assert RefitConfig().to_json() == {"percdamp": 0.1, "steps": 8, "solver": "cg"}
    assert RefitConfig.from_json({"steps": 3}).steps == 3
    for bad, msg in (
        (dict(steps=-1), "steps must be an int >= 0"),
        (dict(steps=True), "steps must be an int"),
        (dict(solver="admm"), r"solver must be one of \('cg', 'exact'\)"),
        (dict(solver="exact", percdamp=0.0), "needs percdamp > 0"),
        (dict(percdamp=-0.1), "percdamp"),
    ):
        with pytest.raises(UserInputError, match=msg):
            RefitConfig(**bad)
    with pytest.raises(UserInputError, match="unknown"):
        RefitConfig.from_json({"cycles": 3})


@pytest.mark.parametrize("solver", ["cg", "exact"])
def test_refit_refiner_keeps_the_mask_and_lowers_the_loss(solver):
    """The registered refiner on SparseGPT's 2:4 result: the same mask, exact zeros where pruned,
    the dampened loss lower, DSnoT's estimate reported, and the values of the pure function."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(256, 32, generator=g) * torch.linspace(0.2, 2.0, 32)
    W = torch.randn(16, 32, generator=g)
    stats = ActivationStats(32, hessian=True, accumulate="sum", variance=False)
    stats.update(X)
    H = stats.hessian
    w_sg, keep = sparsegpt_prune(W, H, "2:4", blocksize=8)
    # the driver passes the dense values at pruned entries (what a swap could regrow)
    out = refine_layer(
        W, torch.where(keep, w_sg, W), keep, stats, "2:4", RefitConfig(solver=solver)
    )
    assert torch.equal(out.keep, keep) and (out.weight[~keep] == 0).all()
    s = out.summary
    assert s.loss_after < s.loss_before and s.swaps == 0
    assert s.cycles == (8 if solver == "cg" else 0)
    want_err = float(((W - w_sg) * X.sum(0)).sum(1).abs().mean())
    assert s.err_before == pytest.approx(want_err, rel=1e-4)
    if solver == "cg":
        want = refit_cg(w_sg, keep, W, H, percdamp=0.1, steps=8)[0]
    else:
        want = refit_exact(w_sg, keep, W, H, percdamp=0.1)[0]
    assert torch.equal(out.weight, want)


@pytest.mark.parametrize("solver", ["cg", "exact"])
def test_reported_dampened_loss_gives_the_relative_loss(solver):
    """``loss_ridge``: loss_after is the loss of the returned weights on H + ridge * I, so the
    driver's rel_recon_loss read off it (no product) equals the direct product's, and the ridge is
    percdamp * mean(diag H)."""
    from dsnt_export.refine.loss import relative_loss

    g = torch.Generator().manual_seed(5)
    X = torch.randn(512, 48, generator=g) * torch.linspace(0.1, 3.0, 48)
    X[:, 3] = 0.0  # a dead input channel
    W = torch.randn(24, 48, generator=g)
    stats = ActivationStats(48, hessian=True, accumulate="sum", variance=False)
    stats.update(X)
    H = stats.hessian
    w_sg, keep = sparsegpt_prune(W, H, "2:4", blocksize=16)
    cfg = RefitConfig(solver=solver, percdamp=0.2)
    res = refine_layer(W, torch.where(keep, w_sg, W), keep, stats, "2:4", cfg)
    s, out = res.summary, res.weight
    assert s.loss_ridge == pytest.approx(0.2 * float(H.diagonal().mean()), rel=1e-6)
    direct = relative_loss(W, out, H)
    read_off = relative_loss(W, out, H, dampened_loss=(s.loss_after, s.loss_ridge))
    d = (W - out).double()
    exact = float(((d @ H.double()) * d).sum() / ((W.double() @ H.double()) * W.double()).sum())
    assert 0 < read_off < 1
    assert read_off == pytest.approx(exact, rel=1e-4) and direct == pytest.approx(exact, rel=1e-4)
