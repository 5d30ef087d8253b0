"""Running exported ONNX graphs on ONNX Runtime: logits, and prefill + decode with a KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsnt_export.errors import ArtifactError, UserInputError, require


def session(path: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """An ORT InferenceSession (CPU by default)."""
    ort = require("onnxruntime", None, "running ONNX graphs")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        if type(e).__module__.startswith("onnxruntime"):
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}") from e
        raise


def run_logits(sess, ids: np.ndarray, *, batch: int = 4) -> np.ndarray:
    """Logits (float32) of the full-sequence graph for ``ids [B, T]``, in batches."""
    ids = np.asarray(ids, dtype=np.int64)
    name = sess.get_inputs()[0].name
    outs = [sess.run(["logits"], {name: ids[i : i + batch]})[0] for i in range(0, len(ids), batch)]
    return np.concatenate(outs).astype(np.float32)


def _feeds(sess, ids: np.ndarray, past_len: int, cache: dict[str, np.ndarray]) -> dict:
    b, t = ids.shape
    feeds = {}
    for inp in sess.get_inputs():
        n = inp.name
        if n == "input_ids":
            feeds[n] = ids
        elif n == "position_ids":
            feeds[n] = np.broadcast_to(
                np.arange(past_len, past_len + t, dtype=np.int64), (b, t)
            ).copy()
        elif n == "cache_position":
            feeds[n] = np.arange(past_len, past_len + t, dtype=np.int64)
        elif n == "attention_mask":
            feeds[n] = np.ones((b, past_len + t), dtype=np.int64)
        elif n.startswith("input.") and n[len("input.") :] in cache:
            feeds[n] = cache[n[len("input.") :]]
        elif n.startswith("input."):
            raise UserInputError(
                f"graph input {n!r} is cache state that no earlier step outputs: this runner "
                "feeds a graph's input.<name> from the previous step's <name> output (and a "
                "prefill nothing), so only cache a graph passes from step to step can be fed"
            )
        else:
            raise UserInputError(
                f"graph input {n!r} is not one this runner knows how to feed "
                "(input_ids, position_ids, cache_position, attention_mask, "
                "input.cache.*)"
            )
    return feeds


def _collect_cache(sess, outs: list[np.ndarray]) -> dict[str, np.ndarray]:
    cache = {}
    for o, v in zip(sess.get_outputs(), outs, strict=True):
        if o.name != "logits":
            cache[o.name[len("output.") :] if o.name.startswith("output.") else o.name] = v
    return cache


def run_generation(prefill, decode, ids: np.ndarray, prompt_len: int) -> np.ndarray:
    """Teacher-forced: prefill ``ids[:, :prompt_len]``, then decode the rest one token at a time.

    Returns float32 logits ``[B, T - prompt_len + 1, V]``: the prefill's last position, then every
    decode step (compare with eager logits ``[:, prompt_len - 1:]``).
    """
    ids = np.asarray(ids, dtype=np.int64)
    outs = prefill.run(None, _feeds(prefill, ids[:, :prompt_len], 0, {}))
    names = [o.name for o in prefill.get_outputs()]
    steps = [outs[names.index("logits")][:, -1:]]
    cache = _collect_cache(prefill, outs)
    dnames = [o.name for o in decode.get_outputs()]
    for t in range(prompt_len, ids.shape[1]):
        outs = decode.run(None, _feeds(decode, ids[:, t : t + 1], t, cache))
        steps.append(outs[dnames.index("logits")])
        cache = _collect_cache(decode, outs)
    return np.concatenate(steps, axis=1).astype(np.float32)
