"""A straightforward DSnoT, for speed comparisons only (not used by the library).

It follows the textbook structure of the reference implementation: the N:M initial mask built group
by group in a Python loop that grows index tensors with ``torch.cat`` (quadratic), full stable sorts
of whole rows for every candidate order, and a host synchronisation every cycle. On layers where no
candidate list runs out it returns the same masks as ``dsnt_export.refine.dsnot.refine``; the benchmark
checks that before it reports a ratio.
"""

from __future__ import annotations

import torch


def baseline_initial_mask(metric: torch.Tensor, n_prune: int, m: int | None, ratio: float | None):
    rows, cols = metric.shape
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    if m is None:
        k = int(cols * ratio)
        pruned.scatter_(1, torch.sort(metric, dim=1, stable=True).indices[:, :k], True)
        return ~pruned
    chosen = torch.zeros((rows, 0), dtype=torch.int64)
    for g0 in range(0, cols, m):
        order = torch.sort(metric[:, g0 : g0 + m], dim=1, stable=True).indices + g0
        chosen = torch.cat((chosen, order[:, :n_prune]), dim=1)
        pruned.scatter_(1, order[:, :n_prune], True)
    return ~pruned


def _pointer_pick(order, left, right, use_right):
    return torch.where(use_right, order.gather(1, right), order.gather(1, left))


def baseline_refine(
    weight, keep, s, a, var, m, *, max_cycles=50, thr=0.1, power=1.0, sign_check=True, metric=None
):
    keep = keep.clone()
    D = (weight * s.reshape(1, -1)).float()
    Dz = D.masked_fill(keep, 0)
    err = Dz.sum(dim=1, keepdim=True)
    sign0 = torch.sign(err)
    grow = Dz / torch.pow(var.reshape(1, -1), power) if power else Dz
    g_order = torch.sort(grow, dim=1, stable=True).indices
    rows, cols = D.shape
    gl = torch.zeros((rows, 1), dtype=torch.int64)
    gr = torch.full((rows, 1), cols - 1, dtype=torch.int64)
    if m is None:
        wanda = weight.abs() * torch.sqrt(a.reshape(1, -1))
        n_kept = int(keep.sum(1).min())
        kept = torch.sort(wanda.masked_fill(~keep, float("inf")), dim=1, stable=True).indices[
            :, :n_kept
        ]
        dk = D.gather(1, kept)
        pos = torch.arange(n_kept).expand(rows, -1)
        key = torch.where(dk < 0, pos, torch.where(dk > 0, 2 * n_kept - pos, n_kept + pos * 0))
        p_order = kept.gather(1, torch.sort(key, dim=1, stable=True).indices)
        pl = torch.zeros((rows, 1), dtype=torch.int64)
        pr = torch.full((rows, 1), n_kept - 1, dtype=torch.int64)
    else:
        avail = metric.masked_fill(~keep, float("inf"))
    active = torch.ones((rows, 1), dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):  # host sync every cycle
            break
        up = err > 0
        gi = _pointer_pick(g_order, gl, gr, up)
        gl, gr = gl + (~up), gr - up.long()
        if m is None:
            down = err < 0
            pj = _pointer_pick(p_order, pl, pr, down)
            pl, pr = pl + (~down), pr - down.long()
        else:
            start = gi - gi % m
            block = avail.gather(1, start + torch.arange(m))
            pj = start + torch.topk(block, 1, dim=1, largest=False).indices
            avail.scatter_(1, pj, float("inf"))
        after = err + D.gather(1, pj) - D.gather(1, gi)
        ok = active & (err.abs() > thr)
        if sign_check:
            ok &= sign0 == torch.sign(after)
        keep.scatter_(1, pj, keep.gather(1, pj) & ~ok)
        keep.scatter_(1, gi, keep.gather(1, gi) | ok)
        err = torch.where(ok, after, err)
        active = ok
    return keep
