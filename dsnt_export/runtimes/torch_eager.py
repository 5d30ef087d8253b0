"""PyTorch eager runtime: dense source vs sparse weights, and on CUDA sm80+ the 2:4 kernels.

Variants: ``dense`` (the source model), ``sparse`` (zeros in place, dense GEMMs) and, on a CUDA
device of compute capability 8.0 or newer, ``sparse-kernels``: every pruned linear whose weight is
2:4 and fits the kernels' shape constraints becomes a ``torch.sparse.SparseSemiStructuredTensor``
(cuSPARSELt where available, else CUTLASS; fp16/bf16 only). Each linear that cannot be converted
keeps its dense weight and the reason is recorded per layer in a ``conversion`` row, together with
the largest logit difference between the sparse kernels and the dense kernels on the same weights.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dsnt_export.bench.target import Target
from dsnt_export.errors import UserInputError
from dsnt_export.patterns import NM
from dsnt_export.runtimes.base import Engine

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEMI_DTYPES = (torch.float16, torch.bfloat16)
# (min rows, min cols) of the 2:4 weight, from runtimes.md; the classes' own table wins when present
SHAPE_MIN = {"cusparselt": (16, 16), "cutlass": (32, 64)}
TWO_FOUR = NM(2, 4)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserInputError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def unavailable(options: Any) -> str | None:
    dev = torch.device(options.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA device requested but torch sees no CUDA GPU (torch " + torch.__version__ + ")"
    return None


def load_model(path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An eager causal LM from a checkpoint directory (ours or a plain HF one)."""
    from dsnt_export.artifacts import read_manifest

    man = read_manifest(path, required=False)
    if man is not None and man.get("kind") == "hf":
        from converters.common.source import read_source  # handles legacy packed checkpoints too

        return read_source(path).load_model(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


class TorchEngine(Engine):
    def __init__(self, model: nn.Module, variant: str, backend: str, device, dtype: str):
        super().__init__(variant, backend, device, dtype)
        self.model = model
        # transformers >= 5.2x calls the KV cache ``cache``; earlier 5.x ``past_key_values``
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def to_input(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.to(self.device)

    @staticmethod
    def _cache_of(out: Any) -> Any:
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> Any:
        return self._cache_of(self.model(input_ids=ids, use_cache=True))

    @torch.no_grad()
    def decode(self, state: Any, ids: torch.Tensor) -> Any:
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: state})
        return self._cache_of(out)

    def as_module(self) -> nn.Module:
        return self.model

    def close(self) -> None:
        self.model = None


# ------------------------------------------------------------------------- semi-structured 2:4


def semi_structured_backend(device: torch.device, choice: str = "auto") -> tuple[str | None, str]:
    """(backend, reason): "cusparselt"/"cutlass" usable on ``device``, or None and why not."""
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
    """Why ``weight`` cannot become a semi-structured tensor on ``backend`` (None if it can)."""
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
    """Convert the named linears' 2:4 weights in place; one record per linear (with the reason)."""
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


@torch.no_grad()
def _probe_logits(model: nn.Module, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(4, vocab, (2, 64), generator=g).to(device)
    return model(input_ids=ids, use_cache=False).logits.float()


def _sparse_kernels_engine(target: Target, options: Any, dev, dtype) -> Engine:
    backend, reason = semi_structured_backend(dev, getattr(options, "semi_backend", "auto"))
    assert backend is not None, reason
    model = load_model(target.hf_dir, dtype, dev)
    vocab = int(model.config.vocab_size)
    ref = _probe_logits(model, vocab, dev)
    layers = to_semi_structured(model, target.targets, backend)
    got = _probe_logits(model, vocab, dev)
    diff = float((got - ref).abs().max())
    eng = TorchEngine(
        model, "sparse-kernels", f"semi-structured:{backend}", dev, str(dtype).replace("torch.", "")
    )
    n_conv = sum(r["converted"] for r in layers)
    eng.rows.append(
        {
            "bench": "conversion",
            "layers": layers,
            "n_converted": n_conv,
            "n_fallback": len(layers) - n_conv,
            "logits_max_abs_diff": diff,
        }
    )
    if n_conv == 0:
        log.warning("no linear could use the 2:4 kernels; sparse-kernels equals sparse")
    return eng


def variants(target: Target, options: Any) -> Iterator[tuple[str, Callable[[], Engine] | str]]:
    dev = torch.device(options.device)
    dtype = resolve_dtype(options.dtype, dev)
    dname = str(dtype).replace("torch.", "")

    def make(path, variant):
        return lambda: TorchEngine(load_model(path, dtype, dev), variant, "eager", dev, dname)

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
    backend, reason = semi_structured_backend(dev, getattr(options, "semi_backend", "auto"))
    if backend is None:
        yield "sparse-kernels", reason
    elif dtype not in SEMI_DTYPES:
        yield "sparse-kernels", f"the 2:4 kernels take fp16/bf16, the run uses {dname} (--dtype)"
    else:
        yield "sparse-kernels", lambda: _sparse_kernels_engine(target, options, dev, dtype)
