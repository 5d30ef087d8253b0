"""Stale quantization / sparsity metadata in a checkpoint's ``config.json``: one cleaner for all.

Other pruning tools (llm-compressor, SparseML) leave a compressed-tensors ``quantization_config``
in ``config.json`` that holds nothing but a ``sparsity_config`` (often ``format: "dense"``): the
weights are plain dense tensors, yet ``transformers`` looks up a quantizer for it (and fails when
``compressed-tensors`` is missing) and current vLLM refuses to load it.

* :func:`strip_sparsity_config`: a copy of a raw config dict without any ``sparsity_config``, and a
  ``quantization_config`` left holding only bookkeeping dropped (``export hf`` writes this).
* :func:`quantization_left`: what real quantization a (stripped) config still declares, if any.
* :func:`refuse_quantized`: strip, then refuse real quantization (before transformers parses it).
* :func:`clean_loaded_config`: what every loader (prune, eval, export, bench) calls after
  ``AutoConfig.from_pretrained``: strips the stale metadata from the config object with one
  warning, and refuses a checkpoint whose weights really are quantized
  (:class:`~dsnt_export.errors.QuantizedCheckpointError`, exit code 2).

No heavy imports: ``converters.common.vllm_compat`` re-exports :func:`strip_sparsity_config`.
"""

from __future__ import annotations

import logging
from typing import Any

from dsnt_export.errors import QuantizedCheckpointError

logger = logging.getLogger(__name__)

#: config.json keys that carry quantization / compression metadata
METADATA_KEYS = ("quantization_config", "compression_config")
# keys of a quantization_config that describe nothing by themselves (bookkeeping)
_BOOKKEEPING = (
    "quant_method",
    "version",
    "format",
    "quantization_status",
    "global_compression_ratio",
)


def strip_sparsity_config(config: dict) -> tuple[dict, list[str]]:
    """A copy of ``config`` without any sparsity_config, and what was removed (for a warning).

    ``config`` is a raw ``config.json`` dict (not modified). A ``quantization_config`` (or the older
    ``compression_config``) left empty, or holding only ``quant_method``/``format``/version
    bookkeeping and empty values, is dropped (without a sparsity_config, only a compressed-tensors
    ``format: "dense"`` shell is dropped: other methods' bookkeeping may mean real quantization);
    one that still declares real quantization (e.g.
    non-empty ``config_groups``) is kept. Returns ``(cleaned copy, ["quantization_config.
    sparsity_config", "quantization_config (empty without it)", ...])``.
    """
    out = dict(config)
    removed: list[str] = []
    for key in METADATA_KEYS:
        q = out.get(key)
        if not isinstance(q, dict):
            continue
        had_sparsity = "sparsity_config" in q
        if had_sparsity:
            q = {k: v for k, v in q.items() if k != "sparsity_config"}
            removed.append(f"{key}.sparsity_config")
        # without a sparsity_config, only a compressed-tensors "dense" shell is known to be stale
        dense_shell = q.get("quant_method") in ("compressed-tensors", "sparseml") and q.get(
            "format", "dense"
        ) in ("dense", None)
        if (had_sparsity or dense_shell) and _is_bookkeeping_only(q):
            del out[key]
            removed.append(f"{key} (empty without it)" if had_sparsity else f"{key} (empty)")
        else:
            out[key] = q
    return out, removed


def _is_bookkeeping_only(q: dict) -> bool:
    rest = {k: v for k, v in q.items() if k not in _BOOKKEEPING and v not in (None, {}, [], "")}
    return not rest


def quantization_left(config: dict) -> str | None:
    """A one-line description of the quantization ``config`` (stripped) still declares, or None.

    A non-dict ``quantization_config`` counts as quantization (it cannot be shown to be stale).
    """
    for key in METADATA_KEYS:
        if key not in config or config[key] is None:
            continue
        q = config[key]
        if not isinstance(q, dict):
            return f"{key}={q!r}"
        method = q.get("quant_method", "unknown method")
        what = sorted(k for k in q if k not in _BOOKKEEPING)
        return f"{key} (quant_method {method!r}; {', '.join(what) or 'no details'})"
    return None


def refuse_quantized(raw: dict, where: str) -> tuple[dict, list[str]]:
    """:func:`strip_sparsity_config` of ``raw``, refusing what is left if it is real quantization.

    Call it on the raw ``config.json`` dict before ``transformers`` parses it (a malformed
    ``quantization_config`` fails inside transformers). Returns ``(cleaned, removed)``; raises
    :class:`~dsnt_export.errors.QuantizedCheckpointError` (the one message every loader gives).
    """
    cleaned, removed = strip_sparsity_config(raw)
    left = quantization_left(cleaned)
    if left is not None:
        raise QuantizedCheckpointError(
            f"{where}: config.json declares {left}: the weights are stored quantized, and "
            "dsnt-export prunes, evaluates and exports float (float32/float16/bfloat16) "
            "checkpoints only. Use the unquantized checkpoint, or dequantize it and re-save it "
            "without quantization_config."
        )
    return cleaned, removed


def clean_loaded_config(config: Any, raw: dict, where: str) -> list[str]:
    """Strip stale metadata from a loaded ``transformers`` config; refuse a quantized checkpoint.

    ``config`` is the ``PretrainedConfig`` built from ``raw`` (the ``config.json`` dict) of the
    checkpoint ``where`` (a path or hub id, for messages); it is modified in place so that
    ``from_pretrained(..., config=config)`` loads the plain dense weights. Logs one warning naming
    what was ignored and returns that list ([] when nothing was stale).

    Raises :class:`~dsnt_export.errors.QuantizedCheckpointError` when ``raw`` declares real
    quantization (not only a sparsity_config / bookkeeping): dsnt-export reads float weights only.
    """
    cleaned, removed = refuse_quantized(raw, where)
    for key in METADATA_KEYS:
        if key not in cleaned and hasattr(config, key):
            delattr(config, key)
    if removed:
        logger.warning(
            "%s: config.json carries stale metadata without quantized weights (%s); ignored: the "
            "weights are read as the plain dense tensors they are",
            where,
            ", ".join(removed),
        )
    return removed
