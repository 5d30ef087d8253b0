"""SparseGPT: valid masks, exact OBS updates, closed-form Hessian, typed errors."""

from __future__ import annotations

import logging

import pytest
import torch

from dsnt_export.errors import NonFiniteError, ShapeError, UserInputError
from dsnt_export.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from dsnt_export.patterns import NM, Unstructured, parse_pattern
from dsnt_export.stats import ActivationStats


def _spd(n: int, gen: torch.Generator, tokens: int | None = None) -> torch.Tensor:
    """A Hessian 2/t X^T X from random, partly correlated inputs."""
    tokens = tokens or 4 * n
    x = torch.randn(tokens, n, generator=gen)
    x = x @ (torch.eye(n) + 0.5 * torch.randn(n, n, generator=gen) / n**0.5)
    return 2.0 / tokens * x.t() @ x


def _correlated_inputs(tokens: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs whose columns come in strongly correlated pairs, plus a shared low-rank part."""
    base = torch.randn(tokens, n // 2, generator=gen)
    x = torch.repeat_interleave(base, 2, dim=1) + 0.15 * torch.randn(tokens, n, generator=gen)
    x += torch.randn(tokens, 4, generator=gen) @ torch.randn(4, n, generator=gen)
    return x * (0.5 + torch.rand(n, generator=gen))  # uneven channel scales


def _pruned_per_group(keep: torch.Tensor, m: int) -> torch.Tensor:
    return (~keep).reshape(keep.shape[0], -1, m).sum(-1)


def _nm_keep(metric: torch.Tensor, p: NM) -> torch.Tensor:
    """Keep the n_keep largest entries of metric in every group of m (simple reference)."""
    g = metric.reshape(metric.shape[0], -1, p.m)
    idx = g.topk(p.n_keep, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(metric.shape)


# ------------------------------------------------------------------ masks and outputs
@pytest.mark.parametrize("pat", ["2:4", "4:8", "1:4", "2:8"])
@pytest.mark.parametrize("shape,blocksize", [((7, 64), 16), ((33, 96), 128), ((16, 256), 64)])
def test_nm_masks_are_exact(pat, shape, blocksize):
    p = parse_pattern(pat)
    gen = torch.Generator().manual_seed(100 * p.m + p.n_keep + shape[0] * shape[1])
    w = torch.randn(*shape, generator=gen)
    h = _spd(shape[1], gen)
    w0, h0 = w.clone(), h.clone()
    new, keep = sparsegpt_prune(w, h, p, blocksize=blocksize)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert (_pruned_per_group(keep, p.m) == p.n_prune).all()
    assert (new[~keep] == 0).all() and (new[keep] != 0).all()
    assert torch.isfinite(new).all()
    assert torch.equal(w, w0) and torch.equal(h, h0)  # inputs untouched
    assert not torch.allclose(new[keep], w[keep])  # the OBS update changed the kept weights


@pytest.mark.parametrize("ratio", [0.5, 0.7])
@pytest.mark.parametrize("shape,blocksize", [((9, 50), 16), ((40, 200), 128), ((5, 30), 128)])
def test_unstructured_exact_total(ratio, shape, blocksize):
    gen = torch.Generator().manual_seed(int(ratio * 10) + shape[1])
    w = torch.randn(*shape, generator=gen)
    new, keep = sparsegpt_prune(w, _spd(shape[1], gen), Unstructured(ratio), blocksize=blocksize)
    assert int((~keep).sum()) == shape[0] * int(shape[1] * ratio)
    assert (new[~keep] == 0).all() and (new[keep] != 0).all()


def test_unstructured_ties_do_not_over_prune():
    # All saliencies equal (identity Hessian, equal weights): a '<=' threshold would prune all.
    w = torch.ones(8, 32)
    new, keep = sparsegpt_prune(w, torch.eye(32), Unstructured(0.5), blocksize=8)
    assert int((~keep).sum()) == 8 * 16
    assert (new[~keep] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pat", ["2:4", "unstructured:0.6"])
def test_dtype_preserved_and_zeros_in_place(dtype, pat):
    gen = torch.Generator().manual_seed(3)
    w = (0.05 * torch.randn(24, 64, generator=gen)).to(dtype)
    new, keep = sparsegpt_prune(w, _spd(64, gen), pat, blocksize=32)
    assert new.dtype == dtype and new.shape == w.shape and new.is_contiguous()
    assert (new[~keep] == 0).all()
    if pat == "2:4":
        assert (_pruned_per_group(keep, 4) == 2).all()


# ------------------------------------------------------------------ the mathematics
def test_inverse_hessian_factor_is_upper_cholesky_of_inverse():
    gen = torch.Generator().manual_seed(0)
    h = _spd(48, gen)
    u = inverse_hessian_factor(h, 0.01)
    hd = h.double() + 0.01 * h.diagonal().double().mean() * torch.eye(48, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    assert u.dtype == torch.float32
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    assert torch.allclose(u.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_obs_single_weight_update_closed_form():
    # 3:4 on in=4: exactly one weight per row is pruned, in one block. When column p is reached,
    # columns < p are frozen, so the update is OBS on the trailing Hessian Hs = H[p:, p:]:
    #   w[p:] += -(w_p / [Hs^-1]_00) * Hs^-1[:, 0]     (and the pruned column p is chosen by
    #   the smallest w_p^2 / [Hs^-1]_00). For p = 0 this is the textbook full OBS update.
    gen = torch.Generator().manual_seed(7)
    n, rows, damp = 4, 64, 0.01
    x = torch.randn(64, n, generator=gen) * torch.tensor([0.3, 2.0, 1.0, 4.0])
    x[:, 2] += x[:, 1]  # uneven scales and a correlated pair: saliency differs from |w|
    h = 2.0 / 64 * x.t() @ x
    w = torch.randn(rows, n, generator=gen)
    new, keep = sparsegpt_prune(w, h, NM(3, 4), blocksize=4, percdamp=damp)

    hd = h.double() + damp * h.diagonal().double().mean() * torch.eye(n, dtype=torch.float64)
    sub_inv = [torch.linalg.inv(hd[p:, p:]) for p in range(n)]
    seen, differs_from_magnitude = set(), 0
    for r in range(rows):
        wr = w[r].double()
        sal = torch.stack([wr[p] ** 2 / sub_inv[p][0, 0] for p in range(n)])
        p = int(sal.argmin())
        seen.add(p)
        differs_from_magnitude += p != int(wr.abs().argmin())
        expected = wr.clone()
        expected[p:] -= (wr[p] / sub_inv[p][0, 0]) * sub_inv[p][:, 0]
        assert keep[r].tolist() == [j != p for j in range(n)]
        assert abs(expected[p]) < 1e-12
        assert torch.allclose(new[r].double(), expected, atol=1e-4), (r, p)
    assert seen == set(range(n)) and differs_from_magnitude > 0


def test_lazy_block_updates_do_not_change_nm_result():
    # For N:M the blocked ("lazy batch") updates are exact, so the block size must not matter.
    gen = torch.Generator().manual_seed(11)
    w, h = torch.randn(20, 96, generator=gen), _spd(96, gen)
    results = [sparsegpt_prune(w, h, "2:4", blocksize=b) for b in (4, 32, 96, 128)]
    for new, keep in results[1:]:
        assert torch.equal(keep, results[0][1])
        assert torch.allclose(new, results[0][0], atol=1e-4)


def test_hessian_closed_form_and_obs_beats_plain_masks():
    gen = torch.Generator().manual_seed(1234)
    n_in, n_out, batches, t = 64, 48, 3, 128
    chunks = [_correlated_inputs(2 * t, n_in, gen).reshape(2, t, n_in) for _ in range(batches)]
    stats = ActivationStats(n_in, hessian=True)
    for c in chunks:
        stats.update(c)
    x = torch.cat([c.reshape(-1, n_in) for c in chunks]).double()
    nsamples = 2 * batches
    assert stats.nsamples == nsamples
    h_ref = 2.0 / nsamples * x.t() @ x
    assert torch.allclose(stats.hessian.double(), h_ref, rtol=1e-4, atol=1e-4 * h_ref.abs().max())

    w = torch.randn(n_out, n_in, generator=gen)
    p = NM(2, 4)
    new, keep = sparsegpt_prune(w, stats.hessian, p)

    def out_err(w2: torch.Tensor) -> float:
        return float(torch.linalg.norm(x @ (w.double() - w2.double()).t()))

    err_sgpt = out_err(new)
    err_same_mask = out_err(w * keep)
    wanda_keep = _nm_keep(w.abs() * stats.sq_sum.sqrt(), p)
    err_wanda = out_err(w * wanda_keep)
    assert err_sgpt < 0.8 * err_same_mask, (err_sgpt, err_same_mask)
    assert err_sgpt < 0.8 * err_wanda, (err_sgpt, err_wanda)


def test_dead_columns_are_zeroed_and_pruned():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, 32, generator=gen)
    x[:, [3, 17]] = 0.0  # channels that never fire: zero rows/columns in H
    h = 2.0 / 256 * x.t() @ x
    w = torch.randn(10, 32, generator=gen)
    new, keep = sparsegpt_prune(w, h, "2:4", blocksize=16)
    assert torch.isfinite(new).all()
    assert (new[:, [3, 17]] == 0).all() and not keep[:, [3, 17]].any()
    assert (_pruned_per_group(keep, 4) == 2).all()
    assert h[3, 3] == 0  # the caller's Hessian is not modified


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_typed_errors():
    w, h = torch.randn(8, 16), torch.eye(16)
    with pytest.raises(ShapeError, match=r"\[16, 16\]"):
        sparsegpt_prune(w, torch.eye(12), "2:4")
    with pytest.raises(ShapeError, match="2-D"):
        sparsegpt_prune(torch.randn(16), h, "2:4")
    with pytest.raises(ShapeError, match="not divisible by M=8"):
        sparsegpt_prune(torch.randn(8, 12), torch.eye(12), "2:8")
    with pytest.raises(ShapeError, match="blocksize=6"):
        sparsegpt_prune(w, h, "2:4", blocksize=6)
    with pytest.raises(UserInputError, match="blocksize"):
        sparsegpt_prune(w, h, "2:4", blocksize=0)
    bad = w.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"weight of shape \(8, 16\)"):
        sparsegpt_prune(bad, h, "2:4")
    hbad = h.clone()
    hbad[0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="hessian"):
        sparsegpt_prune(w, hbad, "2:4")


def test_not_positive_definite_retries_then_raises(caplog):
    gen = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    # One slightly negative eigenvalue: 1% dampening is not enough, 10% is.
    h = q @ torch.diag(torch.tensor([1.0] * 7 + [-0.02])) @ q.t()
    w = torch.randn(4, 8, generator=gen)
    with caplog.at_level(logging.WARNING, logger="dsnt_export.methods.sparsegpt"):
        new, keep = sparsegpt_prune(w, h, "2:4")
    assert "retrying once with percdamp=0.1" in caplog.text
    assert (_pruned_per_group(keep, 4) == 2).all() and torch.isfinite(new).all()
    with pytest.raises(UserInputError, match="not positive definite.*higher percdamp"):
        sparsegpt_prune(w, -torch.eye(8), "2:4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_argument_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    w, h = torch.randn(32, 128, generator=gen), _spd(128, gen)
    cpu_w, cpu_keep = sparsegpt_prune(w, h, "2:4")
    gpu_w, gpu_keep = sparsegpt_prune(w, h, "2:4", device="cuda")
    assert gpu_w.device == w.device  # returned where the weight lives
    agree = (gpu_keep == cpu_keep).float().mean()
    assert agree > 0.99
    assert torch.allclose(gpu_w[gpu_keep & cpu_keep], cpu_w[gpu_keep & cpu_keep], atol=1e-3)


@pytest.mark.parametrize("m,n", [(4, 2), (4, 1), (4, 3), (8, 2), (8, 6), (16, 8)])
def test_nm_group_choice_is_stable_order_of_saliency(m, n):
    """The in-sweep N:M choice (int keys from the float bits) equals a stable ascending sort of
    each column, ties to the lower row, with zeros, equal values, subnormals and +inf present."""
    from dsnt_export.methods.sparsegpt import _smallest_per_column, _smallest_per_row

    gen = torch.Generator().manual_seed(m * 100 + n)
    sal = torch.randn(m, 257, generator=gen).square()
    sal[:, :40] = torch.randint(0, 3, (m, 40), generator=gen).float()  # many ties, incl. zeros
    sal[0, 40:50] = float("inf")
    sal[1, 50:60] = torch.finfo(torch.float32).tiny / 4  # subnormal
    row = torch.arange(m)[:, None]
    got = _smallest_per_column(sal, n, row)
    assert torch.equal(got, _smallest_per_row(sal.t().contiguous(), n).t())
    assert bool((got.sum(0) == n).all())


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "0.5"])
def test_group_prune_equals_one_by_one(pattern):
    """Linears reading one input (q/k/v-like: different widths) pruned as one stacked call give
    bit for bit the per-linear results (N:M: rows separable; unstructured: falls back)."""
    from dsnt_export.methods import prune_initial, prune_initial_group

    gen = torch.Generator().manual_seed(7)
    n_in = 64
    x = _correlated_inputs(512, n_in, gen)
    st = ActivationStats(n_in, hessian=True)
    st.update(x)
    ws = [torch.randn(r, n_in, generator=gen) for r in (48, 16, 16)]
    names = ["q", "k", "v"]
    group = prune_initial_group("sparsegpt", ws, st, pattern, names=names, sparsegpt_blocksize=32)
    for w, name, g in zip(ws, names, group, strict=True):
        one = prune_initial("sparsegpt", w, st, pattern, name=name, sparsegpt_blocksize=32)
        assert torch.equal(g.keep, one.keep)
        assert torch.equal(g.weight, one.weight)
        assert torch.equal(g.metric, one.metric)
        assert g.weight.shape == w.shape


def test_group_prune_names_the_bad_linear():
    from dsnt_export.methods import prune_initial_group

    st = ActivationStats(8, hessian=True)
    st.update(torch.randn(64, 8))
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="'blk.k_proj'"):
        prune_initial_group(
            "sparsegpt", [torch.randn(4, 8), bad], st, "2:4", names=["blk.q_proj", "blk.k_proj"]
        )
    with pytest.raises(ShapeError, match="in_features"):
        prune_initial_group(
            "sparsegpt", [torch.randn(4, 8), torch.randn(4, 4)], st, "2:4", names=["a", "b"]
        )


@pytest.mark.parametrize("n,leaf", [(600, 256), (97, 16), (40, 256)])
def test_inverse_cholesky_blocked_matches_float64(n, leaf):
    """The blocked L^-1 (recursion below ``leaf`` rows) is the inverse of the Cholesky factor to
    float32 accuracy on an ill-conditioned Hessian (channel scales over 3 decades), and a matrix
    that is not positive definite (a negative pivot late in the order) is reported by ``info``."""
    from dsnt_export.methods.sparsegpt import inverse_cholesky
    from dsnt_export.precision import matmul_precision

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4 * n, n, generator=gen) * torch.logspace(0, 3, n)
    a = (x.t() @ x).double()
    a += 0.01 * a.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    with matmul_precision("highest"):
        inv, info = inverse_cholesky(a.float(), leaf)
    want = torch.linalg.inv(torch.linalg.cholesky(a))
    assert int(info) == 0
    assert torch.equal(inv, torch.tril(inv))
    assert float((inv.double() - want).norm() / want.norm()) < 1e-6
    bad = a.float().clone()
    bad[n - 2, n - 2] = -1.0
    with matmul_precision("highest"):
        assert int(inverse_cholesky(bad, leaf)[1]) != 0
