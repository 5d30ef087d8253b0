"""PyTorch 2:4 semi-structured kernels: the ``sparse-kernels`` variant of the torch runtime.

On a CUDA device of compute capability 8.0 or newer, every pruned linear whose weight is 2:4 and
fits the kernels' shape constraints becomes a ``torch.sparse.SparseSemiStructuredTensor``
(cuSPARSELt where available, else CUTLASS; fp16/bf16 only; docs/runtimes.md). Each linear that
cannot be converted keeps its dense weight and the reason is recorded per layer in a
``conversion`` row, together with the largest logit difference between the sparse kernels and
the dense kernels on the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.errors import UserInputError
from dsnt_export.patterns import NM
from dsnt_export.runtimes.torch_eager import TorchEngine, load_model

log = logging.getLogger(__name__)

SEMI_DTYPES = (torch.float16, torch.bfloat16)
# (min rows, min cols) of the 2:4 weight, from runtimes.md; the classes' own table wins when present
SHAPE_MIN = {"cusparselt": (16, 16), "cutlass": (32, 64)}
TWO_FOUR = NM(2, 4)


def semi_structured_backend(device: torch.device, choice: str = "auto") -> tuple[str | None, str]:
    """(backend, reason): "cusparselt"/"cutlass" usable on ``device``, or None and why not.

    Raises UserInputError for an unknown ``choice`` (known: auto, cusparselt, cutlass).
    """
    if device.type != "cuda":
        return None, f"2:4 semi-structured kernels need a CUDA GPU (device is {device})"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA GPU"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return (
            None,
            f"2:4 kernels need compute capability >= 8.0 (sm80), this GPU is sm{cap[0]}{cap[1]}",
        )
    try:
        import torch.backends.cusparselt as csl

        has_csl = csl.is_available()
    except ImportError:
        has_csl = False
    if choice == "auto":
        return ("cusparselt" if has_csl else "cutlass"), ""
    if choice == "cusparselt" and not has_csl:
        return None, "cuSPARSELt is not available in this torch build"
    if choice not in SHAPE_MIN:
        raise UserInputError(f"unknown 2:4 backend {choice!r}; known: auto, {', '.join(SHAPE_MIN)}")
    return choice, ""


def _semi_class(backend: str):
    return (
        torch.sparse.SparseSemiStructuredTensorCUSPARSELT
        if backend == "cusparselt"
        else torch.sparse.SparseSemiStructuredTensorCUTLASS
    )


def shape_problem(weight: torch.Tensor, backend: str) -> str | None:
    """Why ``weight [out, in]`` cannot become a semi-structured tensor on ``backend`` (None if
    it can): not 2-D, not fp16/bf16, or not a multiple of the backend's minimum shape."""
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, the kernels take 2-D weights"
    if weight.dtype not in SEMI_DTYPES:
        return (
            f"dtype {str(weight.dtype).replace('torch.', '')} (the 2:4 kernels here take fp16/bf16)"
        )
    table = getattr(_semi_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", {})
    c = table.get(weight.dtype)
    rmin, cmin = (c.sparse_min_rows, c.sparse_min_cols) if c is not None else SHAPE_MIN[backend]
    r, k = weight.shape
    if r < rmin or r % rmin or k < cmin or k % cmin:
        return (
            f"shape [{r}, {k}] is not a multiple of the {backend} minimum [{rmin}, {cmin}] "
            "(out, in)"
        )
    return None


def to_semi_structured(model: nn.Module, names: list[str], backend: str) -> list[dict]:
    """Convert the named linears' 2:4 weights in place; one record per linear
    (``name``, ``shape``, ``converted``, ``backend``, and ``reason`` where not converted)."""
    from dsnt_export.masks import validate_mask

    out = []
    cls = _semi_class(backend)
    for name in names:
        mod_name = name.removesuffix(".weight")
        rec: dict[str, Any] = {"name": mod_name, "converted": False, "backend": backend}
        try:
            lin = model.get_submodule(mod_name)
        except AttributeError:
            out.append({**rec, "reason": "no such module in the loaded model"})
            continue
        w = lin.weight.data
        rec["shape"] = list(w.shape)
        problem = shape_problem(w, backend)
        if problem is None:
            rep = validate_mask(w, TWO_FOUR, name=name)
            if not rep.ok:
                problem = f"weight is not 2:4 ({rep.n_violations} of {rep.n_groups} groups violate)"
        if problem is None:
            try:
                sparse = cls.from_dense(w.contiguous())
            except RuntimeError as e:  # kernels refuse at run time (driver, layout, ...)
                problem = f"{type(e).__name__}: {e}"
            else:
                lin.weight = nn.Parameter(sparse, requires_grad=False)
                rec["converted"] = True
        if problem is not None:
            rec["reason"] = problem
        out.append(rec)
    return out


def _probe_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(4, vocab, (2, 64), generator=g)


class SemiStructuredEngine(TorchEngine):
    """The sparse checkpoint with its 2:4 linears on semi-structured kernels (variant
    ``sparse-kernels``, backend ``semi-structured:<cusparselt|cutlass>``).

    Its ``rows`` hold one ``conversion`` row: the per-layer records of
    :func:`to_semi_structured`, the converted/fallback counts and ``logits_max_abs_diff``, the
    largest |logit| difference against the dense kernels on the same weights (probe ids [2, 64]).
    """

    def __init__(self, model: nn.Module, targets: list[str], backend: str):
        vocab = int(model.config.vocab_size)
        probe = _probe_ids(vocab)
        super().__init__(model, "sparse-kernels", f"semi-structured:{backend}")
        ref = self.logits(probe)
        layers = to_semi_structured(model, targets, backend)
        diff = float((self.logits(probe) - ref).abs().max())
        n_conv = sum(r["converted"] for r in layers)
        self.rows.append(
            {
                "bench": "conversion",
                "layers": layers,
                "n_converted": n_conv,
                "n_fallback": len(layers) - n_conv,
                "logits_max_abs_diff": diff,
                "logits_max_abs_ref": float(ref.abs().max()),
            }
        )
        if n_conv == 0:
            log.warning("no linear could use the 2:4 kernels; sparse-kernels equals sparse")

    @classmethod
    def load(  # type: ignore[override]
        cls, path: str | Path, targets: list[str], dtype: torch.dtype, device, backend: str
    ) -> SemiStructuredEngine:
        """Load the sparse checkpoint at ``path`` in ``dtype`` on ``device`` and convert
        ``targets`` (parameter names ``...weight``) on ``backend``."""
        return cls(load_model(path, dtype, torch.device(device)), targets, backend)
