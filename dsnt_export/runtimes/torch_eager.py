"""PyTorch eager runtime: the HF checkpoint in transformers, dense source vs sparse weights.

Variants: ``dense`` (the source model), ``sparse`` (zeros in place, dense GEMMs) and, where the
2:4 semi-structured kernels can run (CUDA sm80+, fp16/bf16), ``sparse-kernels`` from
:mod:`dsnt_export.runtimes.torch_semi`. ``dtype="auto"`` follows
:func:`dsnt_export.hf_io.resolve_dtype` (float32 on CPU, the checkpoint's 16-bit dtype on an
accelerator); the engine records the dtype it really loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.bench.target import Target, compute_dtype
from dsnt_export.runtimes.base import Engine, Step, dtype_name


def unavailable(options: Any) -> str | None:
    """Why torch cannot run on ``options.device`` here (None if it can)."""
    dev = torch.device(options.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA device requested but torch sees no CUDA GPU (torch " + torch.__version__ + ")"
    return None


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """An eager causal LM in ``dtype`` on ``device`` from a checkpoint directory (ours, including
    the legacy packed layout, or a plain Hugging Face one through
    :func:`dsnt_export.hf_io.load_model`), in eval mode. Raises ArtifactError for missing,
    corrupt or incomplete weights."""
    from dsnt_export.artifacts import read_manifest

    man = read_manifest(path, required=False)
    if man is not None and man.get("kind") == "hf":
        from converters.common.source import read_source  # handles legacy packed checkpoints too

        return read_source(path).load_model(dtype=dtype, device=device)
    from dsnt_export.hf_io import load_model as load_hf

    return load_hf(str(path), dtype).to(device).eval()


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class TorchEngine(Engine):
    """A transformers causal LM run eagerly; dtype and device are read from its parameters.

    ``logits`` is one ``use_cache=False`` forward; ``prefill``/``decode_step`` keep the model's
    own KV cache object in :class:`~dsnt_export.runtimes.base.Step`.
    """

    name = "torch"
    distributions = ("torch",)

    def __init__(self, model: nn.Module, variant: str, backend: str = "eager"):
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        super().__init__(variant, backend, dev, _param_dtype(model))
        self.model = model.eval()
        # transformers >= 5.2x calls the KV cache ``cache``; earlier 5.x ``past_key_values``
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def load(cls, path: str | Path, variant: str, dtype: torch.dtype, device) -> TorchEngine:
        """Load the checkpoint at ``path`` (see :func:`load_model`) as an engine."""
        return cls(load_model(path, dtype, torch.device(device)), variant)

    @staticmethod
    def _cache_of(out: Any) -> Any:
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).to(self.device)
        return self.model(input_ids=ids, use_cache=False).logits.float()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> Step:
        out = self.model(input_ids=ids, use_cache=True)
        return Step(out.logits[:, -1:], self._cache_of(out), int(ids.shape[1]))

    @torch.no_grad()
    def decode_step(self, state: Step, ids: torch.Tensor) -> Step:
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: state.cache})
        return Step(out.logits[:, -1:], self._cache_of(out), state.length + int(ids.shape[1]))

    def close(self) -> None:
        self.model = None


def variants(target: Target, options: Any) -> Iterator[tuple[str, Callable[[], Engine] | str]]:
    """``dense``, ``sparse`` and (see :mod:`~dsnt_export.runtimes.torch_semi`) ``sparse-kernels``."""
    from dsnt_export.runtimes import torch_semi

    dev = torch.device(options.device)
    dtype = compute_dtype(options.dtype, dev, target)

    def make(path, variant):
        return lambda: TorchEngine.load(path, variant, dtype, dev)

    yield (
        "dense",
        (
            make(target.dense, "dense")
            if target.dense is not None
            else target.dense_reason or "no dense reference"
        ),
    )
    if target.hf_dir is None:
        yield "sparse", "no sparse HF checkpoint found for the torch runtime"
        return
    yield "sparse", make(target.hf_dir, "sparse")
    if not getattr(options, "sparse_kernels", True):
        return
    backend, reason = torch_semi.semi_structured_backend(
        dev, getattr(options, "semi_backend", "auto")
    )
    if backend is None:
        yield "sparse-kernels", reason
    elif dtype not in torch_semi.SEMI_DTYPES:
        yield (
            "sparse-kernels",
            f"the 2:4 kernels take fp16/bf16, the run uses {dtype_name(dtype)} (--dtype)",
        )
    else:
        yield (
            "sparse-kernels",
            lambda: torch_semi.SemiStructuredEngine.load(
                target.hf_dir, target.targets, dtype, dev, backend
            ),
        )
