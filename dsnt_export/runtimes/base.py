"""The small contract every benchmarked runtime implements.

An :class:`Engine` is one loaded variant (dense, sparse, sparse-kernels) on one backend. The runner
times ``prefill`` and ``decode`` and scores perplexity through ``as_module`` with the protocol of
:mod:`dsnt_export.evaluation.perplexity`; it never knows which runtime it talks to.

A runtime module (``torch_runtime``, ``ort_runtime``, ...) provides:

``unavailable(options) -> str | None``
    why the runtime cannot run here (package or device missing), None if it can;
``variants(target, options) -> Iterator[tuple[str, Callable[[], Engine] | str]]``
    the variants to compare, each with a factory (called lazily, one engine in memory at a time)
    or the reason it is skipped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Engine(ABC):
    """One loaded model variant on one runtime backend."""

    variant: str
    backend: str
    device: torch.device
    dtype: str

    def __init__(self, variant: str, backend: str, device: torch.device | str, dtype: str):
        self.variant, self.backend = variant, backend
        self.device, self.dtype = torch.device(device), dtype
        self.rows: list[dict] = []  # extra rows (e.g. per-layer conversion) for the runner to emit

    @abstractmethod
    def to_input(self, ids: torch.Tensor) -> Any:
        """Token ids ``[B, T]`` (CPU int64) in the form ``prefill``/``decode`` take (untimed)."""

    @abstractmethod
    def prefill(self, ids: Any) -> Any:
        """One forward over the prompt; returns the state (KV cache) for ``decode``."""

    @abstractmethod
    def decode(self, state: Any, ids: Any) -> Any:
        """One step with ``ids [B, 1]`` on ``state``; returns the new state."""

    @abstractmethod
    def as_module(self) -> nn.Module:
        """A module whose ``forward(input_ids=..., use_cache=False).logits`` is [B, T, V]."""

    def close(self) -> None:
        """Free the engine's memory."""
        return None


class LogitsModule(nn.Module):
    """Adapts a ``ids[B, T] (int64 numpy) -> logits[B, T, V]`` function to the perplexity API."""

    def __init__(self, fn):
        super().__init__()
        self._fn = fn

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_: Any):
        from types import SimpleNamespace

        logits = self._fn(input_ids.detach().cpu().numpy())
        return SimpleNamespace(logits=torch.from_numpy(logits))
