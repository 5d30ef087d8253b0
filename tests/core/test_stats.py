import pytest
import torch

from dsnt_export.errors import EmptyStatisticsError, NonFiniteError, ShapeError, UserInputError
from dsnt_export.stats import ActivationStats, add_xtx, mirror_upper, xtx_bounds


def test_closed_form_two_updates():
    st = ActivationStats(2, hessian=True)
    st.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # one sample, T=2
    st.update(torch.tensor([[5.0, 6.0]]))  # one sample, T=1
    assert st.nsamples == 2 and st.ntokens == 3
    torch.testing.assert_close(st.sq_sum, torch.tensor([17.5, 28.0]))
    torch.testing.assert_close(st.sum, torch.tensor([4.5, 6.0]))
    # token-weighted mean of per-update population variances (NOT the global variance)
    torch.testing.assert_close(st.var, torch.tensor([2 / 3, 2 / 3]))
    torch.testing.assert_close(st.hessian, torch.tensor([[35.0, 44.0], [44.0, 56.0]]))


def test_random_matches_definitions():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 16, 8, generator=g) * 2 + 1 for _ in range(4)]  # batches of 3 samples
    st = ActivationStats(8, hessian=True)
    for x in xs:
        st.update(x)
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    n = 12
    torch.testing.assert_close(st.sq_sum.double(), (X**2).sum(0) / n, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(st.sum.double(), X.sum(0) / n, rtol=1e-5, atol=1e-4)
    var = sum(x.reshape(-1, 8).double().var(0, unbiased=False) for x in xs) / 4
    torch.testing.assert_close(st.var.double(), var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.hessian.double(), 2 / n * X.T @ X, rtol=1e-4, atol=1e-3)


def test_reference_accumulation_order_bitwise():
    """Mirror of the spec's update order, one sample per update, fp16 inputs."""
    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(1, 64, 32, generator=g) * 3).half() for _ in range(5)]
    st = ActivationStats(32)
    sq, sm, var = torch.zeros(32), torch.zeros(32), None
    n = ntok = 0
    for x in xs:
        st.update(x)
        inp = x.reshape(-1, 32).t().float()
        vb = torch.var(inp, dim=1, unbiased=False)
        var = vb if ntok == 0 else (var * ntok + vb * inp.shape[1]) / (ntok + inp.shape[1])
        ntok += inp.shape[1]
        sq *= n / (n + 1)
        sm *= n / (n + 1)
        n += 1
        sq += torch.norm(inp, p=2, dim=1) ** 2 / n
        sm += torch.sum(inp, dim=1) / n
    assert torch.equal(st.sq_sum, sq) and torch.equal(st.sum, sm) and torch.equal(st.var, var)


def test_2d_and_batched_are_consistent():
    x = torch.randn(2, 10, 4)
    a, b = ActivationStats(4), ActivationStats(4)
    a.update(x)
    b.update(x[0])
    b.update(x[1])
    torch.testing.assert_close(a.sq_sum, b.sq_sum)
    torch.testing.assert_close(a.sum, b.sum)


def test_bad_inputs():
    st = ActivationStats(4, name="blk.0.q_proj")
    with pytest.raises(EmptyStatisticsError, match="no calibration data"):
        _ = st.sq_sum
    with pytest.raises(ShapeError, match=r"in_features=4"):
        st.update(torch.randn(3, 5))
    with pytest.raises(ShapeError):
        ActivationStats(0)
    st.update(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))
    with pytest.raises(NonFiniteError, match="blk.0.q_proj"):
        _ = st.sum
    with pytest.raises(EmptyStatisticsError, match="hessian=True"):
        _ = st.hessian


@pytest.mark.parametrize("n", [8, 600])  # 600: the Hessian's upper block triangle + mirror
def test_sum_mode_matches_reference_mode_and_definitions(n):
    # "sum" (one product per batch, scaled when read) = the reference's running means up to
    # float32 rounding, with the same per-SAMPLE definitions whatever the batching
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 16, n, generator=g) * 2 + 1 for _ in range(3)]
    ref = ActivationStats(n, hessian=True)
    fast = ActivationStats(n, hessian=True, accumulate="sum")
    for x in xs:
        for s in x:
            ref.update(s)
        fast.update(x)
    assert (fast.nsamples, fast.ntokens) == (ref.nsamples, ref.ntokens) == (9, 144)
    for k in ("sq_sum", "sum", "var", "mean", "hessian"):
        torch.testing.assert_close(getattr(fast, k), getattr(ref, k), rtol=1e-5, atol=1e-4)
    X = torch.cat([x.reshape(-1, n) for x in xs]).double()
    torch.testing.assert_close(fast.hessian.double(), 2 / 9 * X.T @ X, rtol=1e-5, atol=1e-3)
    # reading, then updating again: still the statistics of everything seen
    fast.update(xs[0][:1])
    ref.update(xs[0][0])
    torch.testing.assert_close(fast.hessian, ref.hessian, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast.sq_sum, ref.sq_sum, rtol=1e-5, atol=1e-4)


def test_sum_mode_hand_computed_and_options():
    st = ActivationStats(2, hessian=True, accumulate="sum", variance=False)
    st.update(torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]))  # 2 samples, T=2
    torch.testing.assert_close(st.sq_sum, torch.tensor([42.0, 60.0]))  # (1+9+25+49) / 2
    torch.testing.assert_close(st.sum, torch.tensor([8.0, 10.0]))
    torch.testing.assert_close(st.mean, torch.tensor([4.0, 5.0]))
    # 2/n X^T X with X the 4 tokens: [[84, 100], [100, 120]]
    torch.testing.assert_close(st.hessian, torch.tensor([[84.0, 100.0], [100.0, 120.0]]))
    with pytest.raises(EmptyStatisticsError, match="variance=True"):
        _ = st.var
    with pytest.raises(UserInputError, match="accumulate"):
        ActivationStats(2, accumulate="float64")


@pytest.mark.parametrize("n", [100, 512, 1537])
def test_add_xtx_upper_blocks_and_mirror_give_the_full_product(n):
    x = torch.randn(40, n, dtype=torch.float64)
    h = torch.zeros(n, n, dtype=torch.float64)
    add_xtx(h, x, alpha=0.5)
    mirror_upper(h)
    torch.testing.assert_close(h, 0.5 * x.T @ x)
    assert xtx_bounds(n)[0] == 0 and xtx_bounds(n)[-1] == n


@pytest.mark.parametrize("tokens_per_product", [1, 100, 4096])
def test_sum_mode_hessian_gathers_tokens_and_flushes_on_read(tokens_per_product):
    """Updates smaller than the product size are buffered; reading the Hessian (also between
    updates) multiplies what is pending, so the result is 2/n X^T X whatever the grouping."""
    gen = torch.Generator().manual_seed(3)
    n_in = 24
    st = ActivationStats(n_in, hessian=True, accumulate="sum")
    st.xtx_tokens = tokens_per_product
    xs = [torch.randn(1, 32 + 7 * (i % 3), n_in, generator=gen) for i in range(9)]
    for i, x in enumerate(xs):
        st.update(x)
        if i == 4:  # a read in the middle: flush, scale, then more updates
            want = sum(x[0].double().t() @ x[0].double() for x in xs[:5]) * 2 / 5
            torch.testing.assert_close(st.hessian.double(), want, rtol=1e-5, atol=1e-5)
    want = sum(x[0].double().t() @ x[0].double() for x in xs) * 2 / len(xs)
    torch.testing.assert_close(st.hessian.double(), want, rtol=1e-5, atol=1e-5)
    assert st._xbuf_n == 0


def test_heap_policies_are_set_on_glibc():
    import sys

    from dsnt_export.sparsify import heap

    if not sys.platform.startswith("linux") or heap._libc() is None:
        pytest.skip("glibc only")
    assert heap.hold_freed_memory() is True
    assert heap.pin_mmap_threshold() is True
    heap.trim_heap()
