import pytest
import torch

from dsnt_export.errors import NonFiniteError, ShapeError, UserInputError
from dsnt_export.masks import validate_mask
from dsnt_export.methods import initial_mask, prune_initial, unstructured_keep_from_metric
from dsnt_export.patterns import NM, Unstructured
from dsnt_export.stats import ActivationStats

# Golden 1x8 case, worked by hand:
#   W       = [ 1, -2, 3.5, 0.4 | -1,  4,    2,  -3  ]
#   sqrt(a) = [ 5, 1.5, 1,  4   | 2.5, 0.25, 1.5, 0.5]
#   Wanda   = [ 5,  3, 3.5, 1.6 | 2.5, 1,    3,   1.5]  -> keep cols 0,2 | 4,6
#   |W|     = [ 1,  2, 3.5, 0.4 | 1,   4,    2,   3  ]  -> keep cols 1,2 | 5,7
W8 = torch.tensor([[1.0, -2.0, 3.5, 0.4, -1.0, 4.0, 2.0, -3.0]])
SQRT_A = torch.tensor([5.0, 1.5, 1.0, 4.0, 2.5, 0.25, 1.5, 0.5])


def golden_stats():
    return ActivationStats.from_tensors(SQRT_A**2, torch.ones(8), torch.ones(8))


def test_golden_wanda_2of4():
    keep = initial_mask("wanda", W8, golden_stats(), "2:4")
    assert keep.tolist() == [[True, False, True, False, True, False, True, False]]


def test_golden_magnitude_2of4():
    keep = initial_mask("magnitude", W8, golden_stats(), "2:4")
    assert keep.tolist() == [[False, True, True, False, False, True, False, True]]


def test_golden_asymmetric_1of4_keeps_one():
    keep = initial_mask("wanda", W8, golden_stats(), "1:4")
    assert keep.tolist() == [[True, False, False, False, False, False, True, False]]


@pytest.mark.parametrize(
    "pattern",
    [NM(2, 4), NM(1, 4), NM(2, 8), NM(4, 8), NM(3, 8), Unstructured(0.5), Unstructured(0.7)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_masks_valid_and_match_stable_sort(pattern, dtype):
    g = torch.Generator().manual_seed(hash((str(pattern), str(dtype))) % 2**31)
    rows, cols = 17, 8 * int(torch.randint(1, 9, (1,), generator=g))
    w = torch.randn(rows, cols, generator=g).to(dtype)
    st = ActivationStats(cols)
    st.update(torch.randn(32, cols, generator=g))
    keep = initial_mask("wanda", w, st, pattern)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert validate_mask(keep, pattern).ok
    metric = w.abs() * torch.sqrt(st.sq_sum)
    if isinstance(pattern, NM):
        grp = metric.reshape(rows, -1, pattern.m)
        order = torch.sort(grp, dim=-1, stable=True).indices
        ref = torch.ones_like(grp, dtype=torch.bool)
        ref.scatter_(-1, order[..., : pattern.n_prune], False)
        assert torch.equal(keep, ref.reshape(rows, cols))
        assert (keep.reshape(rows, -1, pattern.m).sum(-1) == pattern.n_keep).all()
    else:
        k = int(cols * pattern.ratio)
        ref = torch.ones_like(metric, dtype=torch.bool)
        ref.scatter_(1, torch.sort(metric, dim=1, stable=True).indices[:, :k], False)
        assert torch.equal(keep, ref)


def test_unstructured_ties_follow_stable_sort():
    metric = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 2.0, 1.0, 1.0]])
    keep = unstructured_keep_from_metric(metric, Unstructured(0.5))
    # stable ascending: cols 1,4 (zeros) then 0,2 (first two ones) are pruned
    assert keep.tolist() == [[False, False, False, True, False, True, True, True]]


def test_bad_inputs():
    st = ActivationStats(6)
    st.update(torch.randn(4, 6))
    with pytest.raises(ShapeError, match="not divisible by M=4"):
        initial_mask("wanda", torch.randn(3, 6), st, "2:4")
    with pytest.raises(ShapeError, match="in_features=8"):
        initial_mask("wanda", torch.randn(3, 8), st, "2:4")
    w = torch.randn(3, 6)
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        initial_mask("magnitude", w, st, "unstructured:0.5")
    with pytest.raises(UserInputError, match="known"):
        initial_mask("random", torch.randn(3, 6), st, "0.5")
    with pytest.raises(UserInputError, match="prune_initial"):
        initial_mask("sparsegpt", torch.randn(3, 8), None, "2:4")
    with pytest.raises(UserInputError, match="hessian=True"):
        prune_initial("sparsegpt", torch.randn(3, 6), st, "0.5")
