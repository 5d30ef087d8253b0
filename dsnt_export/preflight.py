"""Pre-flight: the model's limits checked against the data and options, before the first forward.

A model has limits that its forward pass does not always enforce: an OPT model (learned positions)
crashes with ``IndexError: index out of range in self`` on a window longer than its position
table, while a RoPE model (Llama, Qwen, Mistral) runs silently past its trained context; a token id
past the embedding table crashes, or reads another row on some devices. Every path that feeds a
model (calibration in ``prune``/``run``, ``eval``, ``bench --ppl``) calls :func:`check_inputs`
first; a violation raises :class:`~dsnt_export.errors.LimitError` (exit code 2) naming what was
asked, the limit and where it comes from, and the fix.

Limits read (:func:`model_limits`):

* context length: the first of ``max_position_embeddings``, ``n_positions``,
  ``max_sequence_length``, ``n_ctx``, ``seq_length``, ``max_seq_len`` the config sets (OPT's learned
  table holds exactly ``max_position_embeddings`` positions: the offset of 2 is added inside);
* vocabulary: the rows of the input embedding table (the loaded model's, else ``vocab_size``);
* sliding window (Mistral/Qwen ``sliding_window``): not a limit, but a window longer than it is
  scored with local attention only; logged, and returned in the notes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from dsnt_export.errors import LimitError, UserInputError

logger = logging.getLogger(__name__)

#: config fields that bound the sequence length, in the order they are looked up
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "n_ctx",
    "seq_length",
    "max_seq_len",
)


@dataclass(frozen=True)
class ModelLimits:
    """What a model accepts. ``None``: the config does not say (nothing is checked)."""

    context: int | None = None  # longest window, tokens
    context_key: str | None = None  # the config field it comes from
    vocab_rows: int | None = None  # rows of the input embedding table (valid ids: [0, rows))
    vocab_key: str | None = None  # "embedding table" or "vocab_size"
    sliding_window: int | None = None
    notes: list[str] = field(default_factory=list)


def _get(config: Any, key: str) -> Any:
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def _positive_int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        return None
    return v


def model_limits(config: Any, model: torch.nn.Module | None = None) -> ModelLimits:
    """The limits of a model from its ``config`` (a transformers config or a config.json dict).

    ``model``: the loaded model; its input embedding table gives the vocabulary rows (more
    reliable than ``vocab_size``, which a resized model may not have updated).
    """
    text = _get(config, "text_config")  # multimodal wrappers keep the LM limits one level down
    if text is not None and _get(config, "max_position_embeddings") is None:
        config = text
    context = context_key = None
    for key in CONTEXT_KEYS:
        v = _positive_int(_get(config, key))
        if v is not None:
            context, context_key = v, key
            break
    rows = vocab_key = None
    if model is not None and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        n = getattr(emb, "num_embeddings", None)
        if isinstance(n, int):
            rows, vocab_key = n, "embedding table"
    if rows is None:
        rows = _positive_int(_get(config, "vocab_size"))
        vocab_key = "vocab_size" if rows is not None else None
    sw = _positive_int(_get(config, "sliding_window"))
    if sw is not None and _get(config, "use_sliding_window") is False:
        sw = None
    return ModelLimits(context, context_key, rows, vocab_key, sw)


def check_inputs(
    config: Any,
    *,
    model: torch.nn.Module | None = None,
    seqlen: int | None = None,
    ids: torch.Tensor | None = None,
    asked: str,
    fix: str,
) -> ModelLimits:
    """Refuse data or options past the model's limits; returns the limits with any notes.

    ``seqlen``: the window length (tokens) the command will feed; ``ids``: token ids (any shape,
    integer) it will feed. ``asked`` names the option as the user gave it (e.g. ``"--calib
    c4:128x4096"``) and ``fix`` is the suggested fix with ``{limit}`` where the limit goes (e.g.
    ``"--calib c4:128x{limit}"``). Raises :class:`~dsnt_export.errors.LimitError` for a window
    longer than the context length, an empty ``ids`` or an id outside ``[0, vocab rows)``, and
    :class:`~dsnt_export.errors.UserInputError` for a window shorter than 2 tokens.
    """
    lim = model_limits(config, model)
    if seqlen is not None:
        if int(seqlen) < 2:
            raise UserInputError(
                f"{asked} asks for windows of {seqlen} token(s); at least 2 are needed (one "
                f"to predict from, one to score). Use e.g. {fix.format(limit=lim.context or 256)}"
            )
        if lim.context is not None and int(seqlen) > lim.context:
            raise LimitError(
                f"{asked} asks for windows of {seqlen} tokens, but the model's position limit "
                f"is {lim.context} positions ({lim.context_key}={lim.context} in config.json); "
                f"longer windows would index past its position table or run past its trained "
                f"context. Use {fix.format(limit=lim.context)} or shorter."
            )
        if lim.sliding_window is not None and int(seqlen) > lim.sliding_window:
            note = (
                f"{asked}: windows of {seqlen} tokens are longer than the model's sliding "
                f"window ({lim.sliding_window}); tokens attend to the last "
                f"{lim.sliding_window} only"
            )
            lim.notes.append(note)
            logger.warning("%s", note)
    if ids is not None:
        if ids.numel() == 0:
            raise LimitError(f"{asked} gave no token ids; the text is empty after tokenization")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise UserInputError(f"{asked}: token ids must be integers, got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (lim.vocab_rows is not None and hi >= lim.vocab_rows):
            bad = lo if lo < 0 else hi
            raise LimitError(
                f"{asked}: the tokenizer produced token id {bad}, outside the model's "
                f"vocabulary [0, {lim.vocab_rows}) ({lim.vocab_key}); the tokenizer does not "
                "match the model. Use the tokenizer saved with the checkpoint (the files beside "
                "its config.json), or a checkpoint whose embedding table covers the tokenizer"
            )
    return lim


def check_bench(target: Any, options: Any, tokens: torch.Tensor | None) -> ModelLimits | None:
    """:func:`check_inputs` for ``dsnt-export bench``: ``--seqlen``/``--ppl`` data of ``target``.

    ``target`` is a :class:`~dsnt_export.bench.target.Target`; the model config is read from its
    HF checkpoint (or the artifact's own config.json). Returns None when no config is found.
    """
    import json
    from pathlib import Path

    for d in (target.hf_dir, target.path):
        if d is not None and (Path(d) / "config.json").is_file():
            try:
                config = json.loads((Path(d) / "config.json").read_text())
            except (OSError, ValueError):
                return None
            break
    else:
        return None
    if not options.ppl:
        return model_limits(config)
    return check_inputs(
        config,
        seqlen=options.seqlen,
        ids=tokens,
        asked=f"--seqlen {options.seqlen} (--ppl --data {options.ppl_data})",
        fix="--seqlen {limit}",
    )


def check_calibration(model: torch.nn.Module, ids: torch.Tensor, calib: str) -> ModelLimits:
    """:func:`check_inputs` for calibration ids ``[N, T]`` drawn from the spec ``calib``.

    ``calib`` is the ``--calib`` value (``SOURCE:NxT``); the suggested fix keeps SOURCE and N and
    sets T to the limit.
    """
    head = calib.rsplit("x", 1)[0] if "x" in calib else f"{calib}:{ids.shape[0]}"
    return check_inputs(
        model.config,
        model=model,
        seqlen=int(ids.shape[-1]),
        ids=ids,
        asked=f"--calib {calib}",
        fix="--calib " + head + "x{limit}",
    )


def check_run(model: torch.nn.Module, recipe: Any, eval_tokens: torch.Tensor | None) -> None:
    """Pre-flight of a whole ``run``: calibration windows and evaluation windows/ids, at once.

    Called as soon as the model is loaded and the evaluation text tokenized, before the dense
    perplexity (the first forward of a run): ``recipe.calib`` (``SOURCE:NxT``: T against the
    context length), ``recipe.eval_seqlen`` and ``eval_tokens`` (ids against the vocabulary).
    Raises :class:`~dsnt_export.errors.LimitError` as :func:`check_inputs`.
    """
    from dsnt_export.data import parse_data_spec

    spec = parse_data_spec(recipe.calib) if getattr(recipe, "calib", None) else None
    if spec is not None and spec.seqlen is not None:
        check_inputs(
            model.config,
            model=model,
            seqlen=spec.seqlen,
            asked=f"--calib {recipe.calib}",
            fix=f"--calib {spec.source}:{spec.nsamples}x{{limit}}",
        )
    seqlen = getattr(recipe, "eval_seqlen", None)
    if seqlen is not None or eval_tokens is not None:
        check_inputs(
            model.config,
            model=model,
            seqlen=seqlen,
            ids=eval_tokens,
            asked=f"--eval-seqlen {seqlen} (--eval {getattr(recipe, 'eval', None)})",
            fix="--eval-seqlen {limit}",
        )
