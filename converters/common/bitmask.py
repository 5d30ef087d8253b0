"""The compressed-tensors ``sparse-24-bitmask`` layout, packed and unpacked by our own code.

compressed-tensors >= 0.15 no longer ships this compressor and transformers >= 5.10 no longer
decompresses it, so a tool that still writes it (for vLLM <= 0.18 on Hopper) must own both
directions. Per 2:4 linear ``<m>`` (weight ``W [out, in]``) the layout stores:

- ``<m>.compressed``  [out, in/2]       the kept values of each row in column order, W's dtype
- ``<m>.bitmask``     uint8 [out, ceil(in/8)]  ``np.packbits(keep, axis=1, bitorder="little")``
- ``<m>.shape``       int64 [2, 1]      ``[[out], [in]]``

``keep`` holds exactly two positions per group of four. Where a group has fewer than two non-zero
weights, the remaining slots are filled with zeros in column order, preferring a ``-0.0`` over a
``+0.0`` so its sign bit survives; a pruned ``-0.0`` cannot be stored and comes back as ``+0.0``.
For every weight whose groups carry at most two entries other than ``+0.0``, unpack(pack(W)) is W
bit for bit (any float dtype, fp16 and bf16 included).
"""

from __future__ import annotations

import numpy as np
import torch

from dsnt_export.errors import ArtifactError, MaskViolationError, ShapeError
from dsnt_export.masks import validate_mask

SUFFIXES = ("compressed", "bitmask", "shape")
FORMAT = "sparse-24-bitmask"


def keep_positions_24(weight: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """The bool [out, in] mask of exactly two stored positions per group of four.

    Raises :class:`MaskViolationError` if a group has more than two non-zero weights (the weight
    is not 2:4) and :class:`ShapeError` for a non-2-D weight or ``in`` not divisible by 4.
    """
    label = name or "weight"
    if weight.dim() != 2:
        raise ShapeError(
            f"{label}: sparse-24-bitmask needs a 2-D [out, in] weight, got shape "
            f"{tuple(weight.shape)}"
        )
    out, inp = weight.shape
    if inp % 4:
        raise ShapeError(
            f"{label}: in_features={inp} is not divisible by 4; a 2:4 layout "
            "cannot hold it (exclude this linear from the targets)"
        )
    report = validate_mask(weight, "2:4", name=label)
    if not report.ok:
        raise MaskViolationError(
            f"cannot pack {label} as sparse-24-bitmask: {report.message}", report
        )
    nonzero = (weight != 0) | torch.isnan(weight)
    neg_zero = (weight == 0) & torch.signbit(weight)
    col = torch.arange(inp, device=weight.device) % 4
    # priority: non-zero (8..11) > -0.0 (4..7) > +0.0 (0..3); earlier column wins a tie
    prio = nonzero.to(torch.int16) * 8 + neg_zero.to(torch.int16) * 4 + (3 - col).to(torch.int16)
    idx = prio.reshape(out, inp // 4, 4).topk(2, dim=-1).indices
    keep = torch.zeros(out, inp // 4, 4, dtype=torch.bool, device=weight.device)
    return keep.scatter_(-1, idx, True).reshape(out, inp)


def pack_24(weight: torch.Tensor, *, name: str | None = None) -> dict[str, torch.Tensor]:
    """``{"compressed", "bitmask", "shape"}`` tensors of one 2:4 weight (on CPU)."""
    w = weight.detach().cpu().contiguous()
    keep = keep_positions_24(w, name=name)
    out, inp = w.shape
    compressed = w[keep].reshape(out, inp // 2).contiguous()
    bits = np.packbits(keep.numpy(), axis=1, bitorder="little")
    return {
        "compressed": compressed,
        "bitmask": torch.from_numpy(np.ascontiguousarray(bits)),
        "shape": torch.tensor([[out], [inp]], dtype=torch.int64),
    }


def unpack_24(
    compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor, *, name: str | None = None
) -> torch.Tensor:
    """The dense [out, in] weight (zeros in place) from its sparse-24-bitmask tensors."""
    label = name or "weight"
    dims = [int(v) for v in shape.reshape(-1).tolist()]
    if len(dims) != 2 or min(dims) <= 0:
        raise ArtifactError(f"{label}.shape holds {dims}; expected two positive sizes [out, in]")
    out, inp = dims
    if tuple(compressed.shape) != (out, inp // 2) or inp % 4:
        raise ArtifactError(
            f"{label}.compressed has shape {tuple(compressed.shape)}; expected "
            f"({out}, {inp // 2}) for a 2:4 weight of shape ({out}, {inp})"
        )
    nbytes = (inp + 7) // 8
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (out, nbytes):
        raise ArtifactError(
            f"{label}.bitmask is {bitmask.dtype} {tuple(bitmask.shape)}; expected "
            f"uint8 ({out}, {nbytes})"
        )
    keep = np.unpackbits(bitmask.cpu().numpy(), axis=1, count=inp, bitorder="little").astype(bool)
    per_row = keep.sum(axis=1)
    if (per_row != inp // 2).any():
        bad = int(np.argmax(per_row != inp // 2))
        raise ArtifactError(
            f"{label}.bitmask row {bad} marks {int(per_row[bad])} positions; "
            f"expected {inp // 2} (the bitmask is corrupt)"
        )
    dense = torch.zeros(out, inp, dtype=compressed.dtype)
    dense[torch.from_numpy(keep)] = compressed.cpu().reshape(-1)
    return dense


def module_of(param_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    if not param_name.endswith(".weight"):
        raise ShapeError(
            f"{param_name!r} is not a linear weight (expected a name ending in '.weight')"
        )
    return param_name[: -len(".weight")]


def compress_state_dict(state: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with each target weight replaced by its three bitmask tensors."""
    targets = set(targets)
    missing = sorted(targets - set(state))
    if missing:
        raise ShapeError(f"targets not in the state dict: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in targets:
            mod = module_of(key)
            for suffix, v in pack_24(t, name=key).items():
                out[f"{mod}.{suffix}"] = v
        else:
            out[key] = t
    return out


def packed_modules(keys) -> list[str]:
    """Module names with a complete ``.compressed/.bitmask/.shape`` triple among ``keys``."""
    keys = set(keys)
    mods = {k[: -len(".compressed")] for k in keys if k.endswith(".compressed")}
    return sorted(m for m in mods if all(f"{m}.{s}" in keys for s in SUFFIXES))


def decompress_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every bitmask triple turned back into ``<m>.weight``."""
    mods = packed_modules(state)
    drop = {f"{m}.{s}" for m in mods for s in SUFFIXES}
    out = {k: v for k, v in state.items() if k not in drop}
    for m in mods:
        out[f"{m}.weight"] = unpack_24(
            state[f"{m}.compressed"], state[f"{m}.bitmask"], state[f"{m}.shape"], name=m
        )
    return out
