"""The hessian-swap refiner (exact-loss swaps): golden case, invariants over
random shapes and patterns, local optimality against brute force, and the driver's use of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsnt_export.errors import ShapeError, UserInputError
from dsnt_export.masks import check_mask
from dsnt_export.methods import nm_keep_from_metric, unstructured_keep_from_metric
from dsnt_export.patterns import NM, parse_pattern
from dsnt_export.refine.dsnot import refine_with_info
from dsnt_export.refine.hessian_swap import HessianSwapConfig, hessian_refine, layer_loss
from dsnt_export.stats import ActivationStats


def _hessian(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(8 * n, n, generator=gen)
    x = x @ (torch.eye(n) + 0.6 * torch.randn(n, n, generator=gen) / n**0.5)
    x *= 0.3 + torch.rand(n, generator=gen)
    return 2.0 / x.shape[0] * x.t() @ x


def _initial_keep(w: torch.Tensor, pattern) -> torch.Tensor:
    metric = w.abs().float()
    if isinstance(pattern, NM):
        return nm_keep_from_metric(metric, pattern)
    return unstructured_keep_from_metric(metric, pattern)


def test_golden_identity_hessian():
    # H = I, no damping: the loss is ||ref - w||^2 and each swap is computed by hand.
    ref = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    keep = torch.tensor([[False, False, True, True]])
    # cycle 1: g = [4, 3, 0, 0]; prune 3 (cost 1) + grow 0 (gain 16) = -15 is the best pair
    # cycle 2: g = [0, 3, 0, 1]; prune 2 (cost 4) + grow 1 (gain 9) = -5; then nothing helps
    w, k, info = hessian_refine(ref, keep, ref, torch.eye(4), "2:4", max_cycles=10, percdamp=0.0)
    assert k.tolist() == [[True, True, False, False]]
    assert w.tolist() == [[4.0, 3.0, 0.0, 0.0]]
    assert (info.loss_before, info.loss_after) == pytest.approx((25.0, 5.0))  # 4^2+3^2 -> 2^2+1^2
    assert info.n_swaps == 2


def test_golden_identity_hessian_losses():
    ref = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    keep = torch.tensor([[False, False, True, True]])
    _, _, one = hessian_refine(ref, keep, ref, torch.eye(4), "2:4", max_cycles=1, percdamp=0.0)
    assert (one.loss_before, one.loss_after, one.n_swaps) == pytest.approx((25.0, 10.0, 1))


def test_grown_weight_takes_its_loss_optimal_value():
    # x0 == x1 (almost): pruning w1 is compensated by growing w0 to about w0 + w1.
    H = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    H = H + 1e-3 * torch.eye(4)
    ref = torch.tensor([[1.0, 2.0, 0.1, 5.0]])
    keep = torch.tensor([[False, True, True, True]])  # 3:4 kept, 1 pruned per group
    w, k, info = hessian_refine(ref, keep, ref, H, "3:4", max_cycles=5, percdamp=0.0)
    check_mask(w, "3:4")
    assert info.loss_after < info.loss_before
    assert info.loss_after == pytest.approx(layer_loss(ref, w, H), rel=1e-4)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:8", "0.5", "0.7"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_random(pattern, seed):
    gen = torch.Generator().manual_seed(seed)
    p = parse_pattern(pattern)
    rows = int(torch.randint(1, 12, (1,), generator=gen))
    cols = 8 * int(torch.randint(1, 6, (1,), generator=gen))
    ref = torch.randn(rows, cols, generator=gen)
    H = _hessian(cols, gen)
    keep0 = _initial_keep(ref, p)
    w, keep, info = hessian_refine(ref, keep0, ref, H, p, max_cycles=30, percdamp=0.01)
    assert torch.equal(keep.sum(1), keep0.sum(1))  # per-row counts
    assert torch.all(w[~keep] == 0)
    if isinstance(p, NM):
        check_mask(keep, p)
        check_mask(w, p)
        grp = lambda t: t.reshape(rows, -1, p.m).sum(-1)  # noqa: E731
        assert torch.equal(grp(keep), grp(keep0))
    assert info.loss_after <= info.loss_before * (1 + 1e-5) + 1e-6
    # each swap sets exactly one value (the grown weight's); all other kept weights are untouched
    changed = keep & (w != ref)
    assert int(changed.sum()) <= info.n_swaps
    # the reported loss is the exact dampened loss of the returned weight
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(cols)
    assert info.loss_after == pytest.approx(layer_loss(ref, w, Hd), rel=1e-3, abs=1e-5)


def _brute_best_swap(ref, w, keep, H, m):
    """Best single (grow, prune) pair of each row by direct evaluation (numpy float64)."""
    ref, w, keep, H = (np.asarray(t, dtype=np.float64) for t in (ref, w, keep, H))
    out = []
    for r in range(ref.shape[0]):
        d0 = ref[r] - w[r]
        base = d0 @ H @ d0
        best = 0.0
        for g0 in range(0, ref.shape[1], m):
            for i in range(g0, g0 + m):
                for j in range(g0, g0 + m):
                    if keep[r, i] or not keep[r, j]:
                        continue
                    d = d0.copy()
                    d[j] += w[r, j]  # prune j
                    v = (d @ H)[i] / H[i, i]  # optimal value of the grown i
                    d[i] -= v
                    best = min(best, d @ H @ d - base)
        out.append(best)
    return np.array(out)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8"])
def test_converged_rows_have_no_improving_swap(pattern):
    gen = torch.Generator().manual_seed(7)
    p = parse_pattern(pattern)
    ref = torch.randn(5, 16, generator=gen)
    H = _hessian(16, gen)
    w, keep, info = hessian_refine(
        ref, _initial_keep(ref, p), ref, H, p, max_cycles=500, percdamp=0.01
    )
    assert info.cycles < 500  # stopped because no swap helps any more
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(16)
    gains = _brute_best_swap(ref, w, keep, Hd, p.m)
    assert np.all(gains > -1e-4 * max(1.0, info.loss_after))


def test_one_cycle_takes_the_brute_force_best_swap():
    gen = torch.Generator().manual_seed(3)
    p = parse_pattern("2:4")
    ref = torch.randn(6, 12, generator=gen)
    H = _hessian(12, gen)
    keep0 = _initial_keep(ref, p)
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(12)
    expected = _brute_best_swap(ref, ref * keep0, keep0, Hd, 4)
    w, _, _ = hessian_refine(ref, keep0, ref, H, p, max_cycles=1, percdamp=0.01)
    got = [
        layer_loss(ref[r : r + 1], w[r : r + 1], Hd)
        - layer_loss(ref[r : r + 1], (ref * keep0)[r : r + 1], Hd)
        for r in range(6)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


def test_dead_channel_is_never_grown():
    gen = torch.Generator().manual_seed(1)
    H = _hessian(8, gen)
    H[2, :] = 0
    H[:, 2] = 0  # channel 2 never fires
    ref = torch.randn(4, 8, generator=gen)
    ref[:, 2] = 10.0  # large, but worthless
    keep0 = torch.tensor([[True, True, False, False] * 2] * 4)
    w, keep, _ = hessian_refine(ref, keep0, ref, H, "2:4", max_cycles=20)
    assert torch.isfinite(w).all()
    assert torch.all(w[:, 2] == 0)


def test_zero_cycles_and_bad_input():
    ref = torch.randn(2, 8)
    keep = _initial_keep(ref, parse_pattern("2:4"))
    w, k, info = hessian_refine(ref, keep, ref, torch.eye(8), "2:4", max_cycles=0)
    assert torch.equal(k, keep) and info.n_swaps == 0
    assert torch.equal(w, ref * keep)
    with pytest.raises(ShapeError):
        hessian_refine(ref, keep, ref, torch.eye(4), "2:4")
    with pytest.raises(UserInputError):
        hessian_refine(ref, keep, ref, torch.eye(8), "2:4", max_cycles=-1)


def test_config_validation_and_refine_with_info_refuses_other_configs():
    c = HessianSwapConfig()
    assert (c.max_cycles, c.percdamp, c.needs_hessian) == (50, 0.03, True)
    assert HessianSwapConfig.from_json(c.to_json()) == c
    for bad in (-0.1, float("inf"), True):
        with pytest.raises(UserInputError, match="percdamp"):
            HessianSwapConfig(percdamp=bad)
    with pytest.raises(UserInputError, match="max_cycles"):
        HessianSwapConfig(max_cycles=-1)
    with pytest.raises(UserInputError, match="known"):
        HessianSwapConfig.from_json({"criterion": "hessian"})
    st = ActivationStats.from_tensors(torch.ones(8), torch.ones(8), torch.ones(8))
    w = torch.randn(2, 8)
    keep = _initial_keep(w, parse_pattern("2:4"))
    with pytest.raises(UserInputError, match="hessian_refine"):
        refine_with_info(w, keep, st, "2:4", HessianSwapConfig())
