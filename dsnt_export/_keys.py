"""Order-preserving integer keys for float tensors: exact, tie-free selection without full sorts.

``row_keys(x)`` maps a float32 ``[R, C]`` tensor to int64 keys ``(float order) << 32 | column`` so that
ascending key order equals a *stable* ascending sort of ``x`` along each row (ties broken by lower
column first), and descending key order equals walking that stable order from the right end (ties:
higher column first). With unique keys, ``topk``/``kthvalue`` give exactly what a stable sort would,
at a fraction of its cost. -0.0 is treated as +0.0; callers exclude NaN.
"""

from __future__ import annotations

import torch

INT64_MAX = torch.iinfo(torch.int64).max
INT64_MIN = torch.iinfo(torch.int64).min
_LOW32 = 0xFFFFFFFF


def row_keys(x: torch.Tensor) -> torch.Tensor:
    x = (x.to(torch.float32) + 0.0).contiguous()  # + 0.0 maps -0.0 to +0.0
    bits = x.view(torch.int32)
    k32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    cols = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return (k32 << 32) + cols


def key_columns(keys: torch.Tensor) -> torch.Tensor:
    return keys & _LOW32


def select_candidates(
    score: torch.Tensor, valid: torch.Tensor, k: int, *, descending: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``k`` columns per row of ``valid`` entries in stable order of ``score``.

    Ascending: smallest first, ties lower column first (a left-to-right walk of a stable ascending
    sort). Descending: largest first, ties higher column first (a right-to-left walk of the same
    sort). Returns ``(columns [R, k] int64, count [R] int64)``; entries past ``count`` are padding.
    """
    k = max(1, min(k, score.shape[-1]))
    keys = row_keys(score)
    if descending:
        keys = keys.masked_fill(~valid, INT64_MIN)
    else:
        keys = keys.masked_fill(~valid, INT64_MAX)
    top = torch.topk(keys, k, dim=-1, largest=descending, sorted=True).values
    count = valid.sum(dim=-1).clamp(max=k)
    return key_columns(top), count
