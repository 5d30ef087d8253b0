"""Model plumbing for the block-by-block driver: catch block inputs, replay blocks, hook linears.

* :func:`capture_block_inputs` runs the model once per calibration sample with every decoder block's
  ``forward`` replaced by a recorder: each block records the keyword arguments the model passes to
  it (position embeddings, masks, position ids; per block, because some families give different
  blocks different masks) and passes the hidden states through untouched; the last block raises a
  private exception so nothing after the blocks (final norm, lm_head) is computed. The hidden
  states reaching block 0 are the calibration inputs.
* :func:`run_block` replays one block on a list of batches with those keyword arguments (caches off).
* :class:`StatsCollector` hooks the first linear of each stage group and feeds
  :class:`~dsnt_export.stats.ActivationStats`, one ``update`` per calibration sample (the reference
  accumulation order) or per batch (``"sum"`` statistics), optionally stopping the block early once
  every hooked linear has fired.
* :func:`canonical_order` sorts the calibration windows by their token ids, so that any
  permutation of the same windows gives the same statistics, masks and weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsnt_export.adapters import Adapter, move_to
from dsnt_export.errors import DataSourceError
from dsnt_export.stats import ActivationStats

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Private control-flow signal: the part of the forward we need has run."""


@dataclass
class Captured:
    """Block-0 inputs of every calibration sample and the kwargs every block is called with."""

    inputs: list[torch.Tensor]  # one [1, T, H] tensor per sample (on the storage device)
    block_kwargs: list[dict[int, dict[str, Any]]]  # per block: {seq_len: kwargs}


def normalize_samples(samples: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Calibration token ids as a list of ``[1, T]`` int64 tensors."""
    if isinstance(samples, torch.Tensor):
        if samples.dim() == 1:
            samples = samples.unsqueeze(0)
        if samples.dim() != 2:
            raise DataSourceError(
                f"calibration token ids must be [N, T] or a list of [T]/[1, T] tensors, got shape "
                f"{tuple(samples.shape)}"
            )
        samples = list(samples)
    out = []
    for s in samples:
        s = torch.as_tensor(s)
        if s.dim() == 2 and s.shape[0] == 1:
            s = s[0]
        if s.dim() != 1 or s.numel() == 0 or s.is_floating_point():
            raise DataSourceError(
                f"each calibration sample must be a non-empty 1-D tensor of token ids, got "
                f"{s.dtype} of shape {tuple(s.shape)}"
            )
        out.append(s.to(torch.long).reshape(1, -1))
    if not out:
        raise DataSourceError("no calibration samples were given; provide at least one")
    return out


def canonical_order(samples: Sequence[torch.Tensor]) -> list[int]:
    """Indices that sort ``samples`` (token-id tensors ``[T]`` or ``[1, T]``) canonically: by
    length, then lexicographically by token ids (equal windows keep their relative order; being
    equal, they are interchangeable). Any permutation of the same windows, reordered by this,
    gives the same sequence, so everything computed from it is bit-identical."""
    keys = [(int(s.numel()), s.reshape(-1).tolist()) for s in samples]
    return sorted(range(len(samples)), key=keys.__getitem__)


@contextlib.contextmanager
def _modules_on(modules: list[nn.Module], device: torch.device | None) -> Iterator[None]:
    """Temporarily move modules to ``device`` (no-op for ``None``)."""
    if device is None:
        yield
        return
    homes = [_module_device(m) for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes, strict=False):
            if home is not None:
                m.to(home)


def _module_device(m: nn.Module) -> torch.device | None:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return None


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    adapter: Adapter,
    samples: list[torch.Tensor],
    *,
    device: torch.device | None,
    store_device: torch.device | None = None,
) -> Captured:
    """Run the model up to its blocks once per sample; see the module docstring."""
    blocks = adapter.get_blocks(model)
    run_dev = device if device is not None else _module_device(blocks[0])
    store_dev = store_device if store_device is not None else run_dev
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[int, dict[str, Any]]] = [{} for _ in blocks]
    moved: dict[int, Any] = {}  # id(captured object) -> its copy on run_dev (shared across blocks)

    def recorder(idx: int):
        def forward(*args: Any, **kw: Any) -> Any:
            hidden = args[0] if args else kw.pop("hidden_states")
            seq_len = hidden.shape[-2]
            if idx == 0:
                inputs.append(hidden.detach().to(store_dev))
            if seq_len not in kwargs[idx]:
                keep = adapter.block_call_kwargs(kw)
                kwargs[idx][seq_len] = {k: shared_move(v, run_dev, moved) for k, v in keep.items()}
            if idx == len(blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    was_training = model.training
    model.eval()
    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    try:
        with _modules_on(adapter.get_modules(model, adapter.pre_block), device):
            for s in samples:
                with contextlib.suppress(_StopForward):
                    model(s.to(run_dev), use_cache=False)
    finally:
        for b in blocks:
            del b.forward
        model.train(was_training)
    assert len(inputs) == len(samples), (len(inputs), len(samples))
    return Captured(inputs=inputs, block_kwargs=kwargs)


def shared_move(v: Any, device: torch.device | None, memo: dict[int, Any]) -> Any:
    """``v`` (tensors nested in tuples/lists/dicts) on ``device``, moved once per object: ``memo``
    (``id -> (v, moved)``, kept by the caller) returns the same copy when the same object (e.g. the
    rotary cos/sin every block is called with) comes again. None: ``v`` as it is."""
    if device is None:
        return v
    key = id(v)
    if key not in memo:
        memo[key] = (v, move_to(v, device))  # keep v alive so its id is not reused
    return memo[key][1]


def batches(inputs: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Consecutive sample indices grouped into batches of equal sequence length."""
    out: list[list[int]] = []
    for i, x in enumerate(inputs):
        if out and len(out[-1]) < batch_size and inputs[out[-1][0]].shape == x.shape:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def run_block(
    block: nn.Module,
    inputs: list[torch.Tensor],
    kwargs_by_len: dict[int, dict[str, Any]],
    groups: list[list[int]],
    *,
    device: torch.device | None,
    collect_outputs: bool,
    store_device: torch.device | None = None,
    collector: StatsCollector | None = None,
) -> list[torch.Tensor] | None:
    """Run ``block`` over all batches; return per-sample outputs ``[1, T, H]`` if asked."""
    outputs: list[torch.Tensor] = [None] * len(inputs)  # type: ignore[list-item]
    for idx in groups:
        x = torch.cat([inputs[i] for i in idx], dim=0)
        if device is not None:
            x = x.to(device)
        kw = kwargs_by_len[x.shape[-2]]
        if collector is not None:
            collector.begin(len(idx))
        try:
            out = block(x, **kw)
        except _StopForward:
            continue
        if isinstance(out, (tuple, list)):
            out = out[0]
        if collect_outputs:
            dev = store_device if store_device is not None else out.device
            for j, i in enumerate(idx):
                outputs[i] = out[j : j + 1].to(dev)
    return outputs if collect_outputs else None


class StatsCollector:
    """Forward hooks feeding one ActivationStats per hooked module: one update per sample for
    ``accumulate="reference"`` statistics (the reference order), one per batch for ``"sum"``.

    ``targets`` maps a hook name to ``(module, stats)``. With ``stop_early`` the block's forward is
    interrupted (private exception) as soon as every hooked module has fired for the batch.
    """

    def __init__(self, targets: dict[str, tuple[nn.Module, ActivationStats]], *, stop_early: bool):
        self.targets = targets
        self.stop_early = stop_early
        self._batch = 1
        self._fired: set[str] = set()
        self._handles: list[Any] = []

    def begin(self, batch: int) -> None:
        """Start a forward of ``batch`` samples (hooks split the inputs per sample)."""
        self._batch = batch
        self._fired = set()

    def _hook(self, name: str, stats: ActivationStats):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            # OPT's fc1/fc2 see [B*T, H]; restore the per-sample view
            x = x.reshape(self._batch, -1, x.shape[-1])
            if stats.accumulate == "sum":
                stats.update(x)  # one product over the batch's tokens
            else:
                for b in range(self._batch):  # the reference's one update per sample
                    stats.update(x[b])
            self._fired.add(name)
            if self.stop_early and len(self._fired) == len(self.targets):
                raise _StopForward

        return hook

    def __enter__(self) -> StatsCollector:
        for name, (mod, stats) in self.targets.items():
            # a pre-hook: the last hooked linear's own product is not computed when stopping early
            self._handles.append(mod.register_forward_pre_hook(self._hook(name, stats)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
