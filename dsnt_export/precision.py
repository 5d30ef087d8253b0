"""Internal precision of the float32 matrix products of our own statistics and solvers.

The Hessian ``X^T X`` of every distinct linear input and the refiners' ``[rows, in] @ [in, in]``
products are the largest costs of a prune besides the model's own forwards (on the embedded model,
float32, 2 CPU cores: ~10 s of the ~19 s a plain pass over all blocks takes). PyTorch lets float32
products run on faster internal formats (:func:`torch.set_float32_matmul_precision`: ``"highest"``
= IEEE float32; ``"high"`` = TF32 or a two-bfloat16 split; ``"medium"`` = bfloat16-based, where
a fast kernel exists). What ``"medium"`` does depends on the hardware and the kernel library:

* on a CPU with AVX512-BF16 (oneDNN, e.g. AMD Zen 4), measured: 2.0x faster on ``X^T X`` of
  ``[2048, 576]`` and ``[2048, 1536]`` inputs, relative error 3.8e-7 (float32 alone: 2.5e-7), i.e.
  float32's accuracy;
* with a plain bfloat16 kernel (CUDA tensor cores, AMX): ~8 mantissa bits, relative error ~1e-3.

``"auto"`` (the default) therefore takes ``"medium"`` only where a probe shows float32-level
accuracy on this device (:func:`fast_matmul_is_accurate`, once per device type and process) and
``"highest"`` everywhere else. The model's own forwards never run under it (they are the same
computation as the floor that :mod:`benchmarks.bench_pipeline` compares against).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

from dsnt_export.errors import UserInputError

logger = logging.getLogger(__name__)

#: the values of ``SparsifyConfig.matmul_precision`` ("auto" + torch's three precisions)
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")
#: "auto" accepts the fast precision when its probe error is at most this many times float32's
ACCURACY_FACTOR = 8.0


def check_matmul_precision(value: object, *, concrete: bool = False) -> str:
    """``value`` if it is one of :data:`MATMUL_PRECISIONS` (with ``concrete``: one of torch's
    three, "auto" already resolved); else ``UserInputError`` naming the allowed ones."""
    if concrete:
        if value not in MATMUL_PRECISIONS[1:]:
            raise UserInputError(
                f"matmul_precision must be one of {list(MATMUL_PRECISIONS[1:])}, got {value!r} "
                "(resolve 'auto' first: dsnt_export.precision.resolve_matmul_precision)"
            )
    elif value not in MATMUL_PRECISIONS:
        raise UserInputError(
            f"matmul_precision must be one of {list(MATMUL_PRECISIONS)}, got {value!r} "
            "('auto': the fast internal precision only where it is as accurate as float32)"
        )
    return str(value)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Run the body with ``torch.set_float32_matmul_precision(precision)``, restoring the caller's
    setting afterwards (also on error). ``precision``: "highest", "high" or "medium"."""
    prev = torch.get_float32_matmul_precision()
    if prev == precision:
        yield
        return
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def resolve_matmul_precision(requested: str, device: torch.device | str | None) -> str:
    """The precision to use on ``device`` (None: CPU) for ``requested`` (:data:`MATMUL_PRECISIONS`):
    an explicit precision as is; "auto" -> "medium" where :func:`fast_matmul_is_accurate`, else
    "highest". Raises ``UserInputError`` for an unknown value."""
    check_matmul_precision(requested)
    if requested != "auto":
        return requested
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "medium" if fast_matmul_is_accurate(dev.type) else "highest"


@functools.cache
def fast_matmul_is_accurate(device_type: str) -> bool:
    """Whether ``"medium"`` float32 products on ``device_type`` ("cpu", "cuda", ...) are as
    accurate as plain float32: relative error of ``X^T X`` (X ``[1024, 512]``, columns scaled over
    4 decades, vs float64) at most :data:`ACCURACY_FACTOR` times float32's own. Measured once per
    process and device type (a few ms); the result is logged."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(1024, 512, generator=gen, dtype=torch.float64)
    x64 *= torch.logspace(-2, 2, 512, dtype=torch.float64)
    exact = x64.T @ x64
    x = x64.to(device=device_type, dtype=torch.float32)

    def rel_err(precision: str) -> float:
        with matmul_precision(precision):
            got = (x.T @ x).to(device="cpu", dtype=torch.float64)
        return float((got - exact).norm() / exact.norm())

    e32, efast = rel_err("highest"), rel_err("medium")
    ok = efast <= ACCURACY_FACTOR * max(e32, 1e-12)
    logger.info(
        "float32 matmul precision probe on %s: highest %.2e, medium %.2e relative error -> %s",
        device_type,
        e32,
        efast,
        "medium" if ok else "highest",
    )
    return ok
