"""Parity of an exported artifact against eager PyTorch: comparisons that collect, then raise.

Every runtime is reached through its engine (:mod:`dsnt_export.runtimes`):
:func:`compare_engine` (logits of one window + perplexity by the project's protocol; on a stored
reference, :func:`compare_reference`) and
:func:`compare_generation` (prefill + decode) are what export parity and ``runtime_tests`` call.
A :class:`ParityCheck` collects one row per compared output (max |runtime - torch|, the tolerance,
pass/fail) and raises :class:`~dsnt_export.errors.ParityError` once, listing every mismatch with its
per-output maximum difference, never just the first one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from dsnt_export.errors import ParityError


@dataclass(frozen=True)
class Tolerance:
    """What "same outputs" means for one converter and dtype.

    ``logits_atol``: max |logits_runtime - logits_torch| allowed, scaled by
    ``max(1, max|logits_torch|)`` so that it is a relative bound for large logits.
    ``ppl_rel``: max |ppl_runtime / ppl_torch - 1|.
    """

    logits_atol: float
    ppl_rel: float

    def logits_bound(self, reference: np.ndarray) -> float:
        """The allowed max |diff| for outputs whose torch value is ``reference``."""
        scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
        return self.logits_atol * scale

    def to_json(self) -> dict:
        """The tolerance as recorded in manifests and reports."""
        return {
            "logits_atol": self.logits_atol,
            "ppl_rel": self.ppl_rel,
            "logits_scaling": "atol * max(1, max|torch logits|)",
        }


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass
class ParityCheck:
    """Collects comparisons of named outputs; :meth:`raise_if_failed` raises one ParityError."""

    what: str
    rows: dict[str, dict] = field(default_factory=dict)

    def compare(self, name: str, runtime, reference, tol: Tolerance) -> dict:
        """Record ``name``: max |runtime - reference| against ``tol``'s bound (shape mismatch and
        non-finite runtime values fail); returns the row."""
        a, b = _np(runtime), _np(reference)
        if a.shape != b.shape:
            row = {
                "ok": False,
                "max_abs_diff": math.inf,
                "bound": None,
                "error": f"shape {a.shape} != torch {b.shape}",
            }
        elif not np.isfinite(a).all():
            row = {
                "ok": False,
                "max_abs_diff": math.inf,
                "bound": tol.logits_bound(b),
                "error": "non-finite values in the runtime output",
            }
        else:
            diff = (
                float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
            )
            bound = tol.logits_bound(b)
            row = {"ok": diff <= bound, "max_abs_diff": diff, "bound": bound}
        self.rows[name] = row
        return row

    def compare_ppl(self, name: str, runtime_ppl: float, torch_ppl: float, tol: Tolerance) -> dict:
        """Record ``name``: |runtime_ppl / torch_ppl - 1| against ``tol.ppl_rel``; returns the row."""
        rel = abs(runtime_ppl / torch_ppl - 1.0) if torch_ppl > 0 else math.inf
        ok = math.isfinite(runtime_ppl) and rel <= tol.ppl_rel
        self.rows[name] = {
            "ok": ok,
            "ppl_runtime": runtime_ppl,
            "ppl_torch": torch_ppl,
            "rel_diff": rel,
            "bound": tol.ppl_rel,
            "max_abs_diff": abs(runtime_ppl - torch_ppl),
        }
        return self.rows[name]

    def fail(self, name: str, error: str) -> None:
        """Record ``name`` as failed with ``error`` (the output could not be computed)."""
        self.rows[name] = {"ok": False, "max_abs_diff": math.inf, "bound": None, "error": error}

    @property
    def ok(self) -> bool:
        """True when every recorded comparison passed."""
        return all(r["ok"] for r in self.rows.values())

    def raise_if_failed(self) -> None:
        """Raise one ParityError listing every failed comparison (no-op when all passed)."""
        bad = {k: r for k, r in self.rows.items() if not r["ok"]}
        if not bad:
            return
        lines = []
        for k, r in bad.items():
            extra = f" ({r['error']})" if "error" in r else ""
            if "rel_diff" in r:
                lines.append(
                    f"{k}: perplexity {r['ppl_runtime']:.6g} vs torch {r['ppl_torch']:.6g}"
                    f", relative diff {r['rel_diff']:.3g} > {r['bound']:.3g}{extra}"
                )
            else:
                bound = "n/a" if r["bound"] is None else f"{r['bound']:.3g}"
                lines.append(f"{k}: max |diff| {r['max_abs_diff']:.3g} > {bound}{extra}")
        raise ParityError(
            f"{self.what}: {len(bad)} of {len(self.rows)} outputs differ from eager torch:\n  "
            + "\n  ".join(lines),
            max_abs_diff={k: r["max_abs_diff"] for k, r in bad.items()},
        )


def compare_engine(
    check: ParityCheck,
    name: str,
    engine,
    tol: Tolerance,
    *,
    ids,
    want_logits,
    ppl_ids=None,
    want_ppl: float | None = None,
) -> None:
    """Compare a runtime engine (:class:`dsnt_export.runtimes.base.Engine`) with eager torch.

    Adds ``<name>:logits`` (``engine.logits(ids [B, T])`` vs ``want_logits [B, T, V]``) and, with
    ``ppl_ids [n, T]`` and ``want_ppl``, ``<name>:perplexity`` (the engine scored by the project's
    one protocol, :func:`dsnt_export.evaluation.perplexity.windows_perplexity`) to ``check``.
    A runtime error becomes a failed row, so every output is still compared.
    """
    from dsnt_export.evaluation.perplexity import windows_perplexity

    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    try:
        check.compare(f"{name}:logits", engine.logits(ids), want_logits, tol)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        check.fail(f"{name}:logits", f"{type(e).__name__}: {e}")
    if ppl_ids is None:
        return
    try:
        got = windows_perplexity(engine, torch.as_tensor(np.asarray(ppl_ids), dtype=torch.long))
        check.compare_ppl(f"{name}:perplexity", got, float(want_ppl), tol)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        check.fail(f"{name}:perplexity", f"{type(e).__name__}: {e}")


def compare_reference(
    check: ParityCheck, name: str, engine, tol: Tolerance, reference: dict
) -> None:
    """:func:`compare_engine` on an artifact's stored reference (:mod:`converters.reference`):
    logits of ``input_ids`` vs ``logits`` and perplexity of ``ppl_ids`` vs ``ppl``."""
    compare_engine(
        check,
        name,
        engine,
        tol,
        ids=reference["input_ids"],
        want_logits=reference["logits"],
        ppl_ids=reference["ppl_ids"],
        want_ppl=float(reference["ppl"]),
    )


def compare_generation(
    check: ParityCheck, name: str, engine, tol: Tolerance, *, ids, want_logits, prompt_len: int
) -> None:
    """Compare an engine's KV-cache path with eager torch: prefill ``ids[:, :prompt_len]``, decode
    the rest token by token (:func:`dsnt_export.runtimes.base.teacher_forced_logits`), against
    ``want_logits = eager(ids).logits[:, prompt_len - 1:]``; adds ``<name>:logits``."""
    from dsnt_export.runtimes.base import teacher_forced_logits

    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    try:
        got = teacher_forced_logits(engine, ids, prompt_len)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        check.fail(f"{name}:logits", f"{type(e).__name__}: {e}")
        return
    check.compare(f"{name}:logits", got, want_logits, tol)


def parity_ids(
    vocab_size: int, *, batch: int = 2, seqlen: int = 32, seed: int = 0, low: int = 0
) -> torch.Tensor:
    """Deterministic random token ids ``[batch, seqlen]`` int64 in ``[low, vocab_size)`` for
    parity runs (random tokens are fine for parity)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch, seqlen), generator=g)
