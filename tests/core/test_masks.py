import numpy as np
import pytest
import torch

from dsnt_export.errors import MaskViolationError
from dsnt_export.masks import check_mask, validate_mask
from dsnt_export.patterns import NM, Unstructured


def slow_nm_violations(keep: np.ndarray, n: int, m: int) -> list[tuple[int, int]]:
    out = []
    for r in range(keep.shape[0]):
        for g in range(keep.shape[1] // m):
            if sum(bool(keep[r, g * m + k]) for k in range(m)) > n:
                out.append((r, g))
    return out


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(2, 8), NM(4, 8)])
@pytest.mark.parametrize("seed", range(4))
def test_validator_agrees_with_slow_reference(pattern, seed):
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 9, (1,), generator=g))
    cols = pattern.m * int(torch.randint(1, 6, (1,), generator=g))
    keep = torch.rand(rows, cols, generator=g) < 0.45
    rep = validate_mask(keep, pattern)
    slow = slow_nm_violations(keep.numpy(), pattern.n_keep, pattern.m)
    assert rep.ok == (not slow)
    assert rep.n_violations == len(slow)
    assert rep.n_groups == rows * cols // pattern.m
    if slow:
        assert (rep.first_violation["line"], rep.first_violation["group"]) == slow[0]
    # same mask in ONNX MatMul layout (B = W^T, groups along axis 0) gives the same verdict
    rep_t = validate_mask(keep.t().contiguous(), pattern, axis=0)
    assert rep_t.ok == rep.ok and rep_t.n_violations == rep.n_violations
    # and the transposed tensor checked along the wrong axis is caught (unless trivially valid)
    assert validate_mask(keep.numpy(), pattern).n_violations == len(slow)


def test_weight_input_zero_and_negative_zero_and_fp16_numpy():
    w = torch.tensor([[0.0, -0.0, 1.5, -2.0, 0.0, 3.0, 0.0, -0.0]])
    assert validate_mask(w, "2:4").ok
    assert validate_mask(w.half().numpy(), "2:4").ok
    w[0, 1] = 1e-3  # a single flipped weight
    rep = validate_mask(w.half().numpy(), "2:4", name="q")
    assert not rep.ok and rep.first_violation["index"] == {"row": 0, "cols": [0, 4]}
    assert rep.source == "weight"
    with pytest.raises(MaskViolationError) as e:
        check_mask(w, "2:4", name="q")
    assert e.value.report.n_violations == 1 and "q" in str(e.value)


def test_divisibility_reported():
    rep = validate_mask(torch.ones(2, 6, dtype=torch.bool), "2:4", name="odd")
    assert not rep.ok and "not divisible by M=4" in rep.divisibility_error
    with pytest.raises(MaskViolationError, match="not divisible"):
        check_mask(torch.ones(2, 6, dtype=torch.bool), "2:4")


def test_transposed_export_is_caught():
    keep = torch.zeros(8, 16, dtype=torch.bool)
    keep[:, 0::4] = True
    keep[:, 1::4] = True  # valid 2:4 along the input axis
    assert validate_mask(keep, "2:4").ok
    assert not validate_mask(keep.t().contiguous(), "2:4").ok  # wrong axis: groups of 4 outputs


def test_unstructured_sparsity():
    keep = torch.ones(4, 10, dtype=torch.bool)
    keep[:, :6] = False
    rep = validate_mask(keep, Unstructured(0.6))
    assert rep.ok and abs(rep.sparsity - 0.6) < 1e-9
    keep[0, 0] = True
    rep = validate_mask(keep, Unstructured(0.6))
    assert not rep.ok and rep.first_violation == {"pruned": 23, "required": 24}
    assert rep.to_json()["shape"] == [4, 10]
