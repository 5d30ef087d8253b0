"""sparse-24-bitmask pack/unpack: bit-for-bit round trips, layout details, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.common.bitmask import (
    compress_state_dict,
    decompress_state_dict,
    pack_24,
    packed_modules,
    unpack_24,
)
from dsnt_export.errors import ArtifactError, MaskViolationError, ShapeError
from tests.tiny_models import nm_magnitude_keep

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.dtype])


def sparse_24(out: int, inp: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).to(dtype)
    # torch.where, not w * keep: a product leaves -0.0 where negative weights were pruned
    return torch.where(nm_magnitude_keep(w, "2:4"), w, torch.zeros((), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bit_for_bit(dtype):
    w = sparse_24(6, 24, dtype)
    t = pack_24(w)
    assert t["compressed"].dtype == dtype and tuple(t["compressed"].shape) == (6, 12)
    assert t["bitmask"].dtype == torch.uint8 and tuple(t["bitmask"].shape) == (6, 3)
    assert t["shape"].dtype == torch.int64 and t["shape"].tolist() == [[6], [24]]
    back = unpack_24(t["compressed"], t["bitmask"], t["shape"])
    assert back.dtype == dtype
    assert torch.equal(bits(back), bits(w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_zero_kept_and_fewer_nonzeros(dtype):
    # group 0: one non-zero and a -0.0 -> both stored; group 1: all zeros incl. -0.0;
    # group 2: two non-zeros, no zero; group 3: -0.0 only in position 3
    row = [0.0, 1.5, -0.0, 0.0, -0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, -3.0, 0.0, 0.0, 0.0, -0.0]
    w = torch.tensor([row, row[::-1]], dtype=dtype)
    t = pack_24(w)
    back = unpack_24(t["compressed"], t["bitmask"], t["shape"])
    assert torch.equal(bits(back), bits(w))
    assert torch.signbit(back[0, 2]) and torch.signbit(back[0, 4]) and torch.signbit(back[0, 15])


def test_bitmask_is_little_endian_packbits_of_the_kept_positions():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 5.0, 6.0]])
    t = pack_24(w)
    keep = np.array([[0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1]], dtype=bool)
    expect = np.packbits(keep, axis=1, bitorder="little")
    assert t["bitmask"].numpy().tolist() == expect.tolist()
    # bits 1,3,4,6 of byte 0 -> 2+8+16+64 = 90; bits 10,11 -> byte 1 bits 2,3 = 12
    assert t["bitmask"].tolist() == [[90, 12]]
    assert t["compressed"].tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_negative_zero_comes_back_positive_but_equal(dtype):
    """Pruning by ``w * keep`` leaves -0.0 in pruned slots: values survive, those signs cannot."""
    w0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    w = w0 * nm_magnitude_keep(w0, "2:4")
    assert torch.signbit(w[w == 0]).any()
    t = pack_24(w)
    back = unpack_24(t["compressed"], t["bitmask"], t["shape"])
    assert torch.equal(back, w)  # equal as values
    assert not torch.signbit(back[back == 0]).any()
    kept = t["compressed"]
    assert torch.equal(bits(kept), bits(w[w != 0].reshape(4, 8)))


def test_pack_rejects_non_24_and_bad_shapes():
    w = sparse_24(4, 16, torch.float32)
    w[1, 5] = 0.25 if w[1, 5] == 0 else w[1, 5]
    w[1, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(MaskViolationError, match="sparse-24-bitmask") as ei:
        pack_24(w, name="layer.weight")
    assert ei.value.report.n_violations == 1
    with pytest.raises(ShapeError, match="divisible by 4"):
        pack_24(torch.zeros(2, 6))
    with pytest.raises(ShapeError, match="2-D"):
        pack_24(torch.zeros(8))


def test_unpack_rejects_corrupt_tensors():
    t = pack_24(sparse_24(3, 16, torch.float32))
    bad = t["bitmask"].clone()
    bad[1, 0] ^= 0b1000_0001  # flips two bits: wrong count in row 1
    bad[1, 0] ^= 0b0000_0001
    with pytest.raises(ArtifactError, match="row 1"):
        unpack_24(t["compressed"], bad, t["shape"])
    with pytest.raises(ArtifactError, match="compressed"):
        unpack_24(t["compressed"][:, :-1], t["bitmask"], t["shape"])
    with pytest.raises(ArtifactError, match="uint8"):
        unpack_24(t["compressed"], t["bitmask"].to(torch.int32), t["shape"])


def test_state_dict_round_trip():
    sd = {
        "a.weight": sparse_24(8, 16, torch.float16, 1),
        "a.bias": torch.randn(8).half(),
        "emb.weight": torch.randn(10, 16).half(),
    }
    packed = compress_state_dict(sd, ["a.weight"])
    assert set(packed) == {"a.compressed", "a.bitmask", "a.shape", "a.bias", "emb.weight"}
    assert packed_modules(packed) == ["a"]
    back = decompress_state_dict(packed)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(bits(back[k]), bits(sd[k])), k


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 9),
    groups=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from(DTYPES),
    zero_frac=st.floats(0.0, 0.9),
)
def test_round_trip_property(out, groups, seed, dtype, zero_frac):
    """Any 2:4 weight (extra zeros of either sign anywhere in kept slots) round-trips exactly."""
    g = torch.Generator().manual_seed(seed)
    w = sparse_24(out, 4 * groups, dtype, seed)
    extra = (torch.rand(w.shape, generator=g) < zero_frac) & (w != 0)
    sign = torch.rand(w.shape, generator=g) < 0.5
    w = torch.where(extra & sign, torch.tensor(-0.0, dtype=dtype), w)
    w = torch.where(extra & ~sign, torch.tensor(0.0, dtype=dtype), w)
    t = pack_24(w)
    back = unpack_24(t["compressed"], t["bitmask"], t["shape"])
    assert torch.equal(bits(back), bits(w))
