"""Which engines a zero-shot evaluation loads: the runtime registry's variants of an artifact.

``dsnt-export eval DIR --tasks ... --runtime R`` scores the artifact the user deploys on R, and
its dense reference on the same runtime, through the same runtime layer as ``dsnt-export bench``
(:mod:`dsnt_export.runtimes`): the artifact is found as the bench finds it
(:func:`dsnt_export.bench.target.resolve_target`) and each variant's engine comes from the
runtime module's ``variants`` (lazy factories: one engine in memory at a time). On ONNX Runtime a
dense reference that is an HF checkpoint is exported to a temporary ONNX graph, as the bench does.
A checkpoint without pruned tensors (a plain HF checkpoint, ``embedded:smollm2-135m``, a dense
export) is evaluated alone as "dense".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dsnt_export.errors import UserInputError

__all__ = ["PlannedEngine", "engine_plan", "engine_options"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclasses.dataclass
class PlannedEngine:
    """One variant to evaluate: ``factory`` loads its engine (a string: why it is skipped),
    ``model`` holds the row's model fields, ``tokenizer`` the directory its tokenizer is read
    from, ``max_length`` the model's context length in tokens (None: unknown)."""

    variant: str
    factory: Callable[[], Any] | str
    model: dict
    tokenizer: Path | None
    max_length: int | None


def engine_options(
    runtime: str, device: torch.device, dtype: str, batch_size: int, max_length: int
) -> SimpleNamespace:
    """The options a runtime module's ``unavailable``/``variants`` read (the bench's
    :class:`~dsnt_export.bench.BenchOptions` fields), set for scoring: the logits graph only
    (ONNX Runtime), no 2:4 kernel variant (torch), vLLM's ``max_model_len`` = ``max_length``
    with a KV cache for one such sequence (``kv_cache_seqs``) and ``batch_size`` prompts."""
    return SimpleNamespace(
        runtime=runtime,
        device=str(device),
        dtype=dtype,
        ppl=True,
        latency=False,
        seqlen=int(max_length),
        max_windows=None,
        prompt_lengths=(1,),
        batch_sizes=(int(batch_size),),
        decode_tokens=0,
        threads=None,
        seed=0,
        sparse_kernels=False,
        semi_backend="auto",
        extra={},
        kv_cache_seqs=1,
    )


def _max_positions(*dirs: Path | None) -> int | None:
    for d in dirs:
        cfg = Path(d) / "config.json" if d is not None else None
        if cfg is None or not cfg.is_file():
            continue
        try:
            v = json.loads(cfg.read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(v, int) and v > 0:
            return v
    return None


def _tokenizer_dir(*dirs: Path | None) -> Path | None:
    for d in dirs:
        if d is not None and any((Path(d) / f).is_file() for f in TOKENIZER_FILES):
            return Path(d)
    return None


def engine_plan(
    path: str | Path,
    runtime: str,
    *,
    dense: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
) -> list[PlannedEngine]:
    """The variants (``dense``, then ``sparse`` where ``path`` is pruned) to evaluate on
    ``runtime``, each with a lazy engine factory or the reason it is skipped. Nothing is loaded.

    Raises UserInputError for a runtime that does not score (its registry entry), one that
    cannot run here (its module's ``unavailable``: not installed, wrong device), or a ``path``
    without an artifact the runtime reads (ArtifactError, naming the command that makes one).
    """
    from dsnt_export.bench.target import resolve_target
    from dsnt_export.runtimes.base import get_runtime, scoring_runtime_names

    info = get_runtime(runtime)
    if not info.scores:
        raise UserInputError(
            f"zero-shot evaluation does not run on runtime {runtime!r} (its engines' token "
            f"log-probabilities are not tested); use --runtime one of "
            f"{', '.join(scoring_runtime_names())}"
        )
    mod = info.load()
    device = torch.device(device)
    why = mod.unavailable(SimpleNamespace(device=str(device)))
    if why:
        raise UserInputError(f"--runtime {runtime} cannot run here: {why}")
    src: str | Path = path
    if str(path).strip().lower().startswith("embedded"):
        from dsnt_export.hf_io import resolve_model_source

        src = resolve_model_source(str(path))
    target = resolve_target(src, runtime, dense=dense)
    sparse = bool((target.manifest or {}).get("tensors"))
    if not sparse:  # evaluated alone, as the dense model
        target = dataclasses.replace(target, dense=target.path, dense_reason=None)
    sparse_dirs = (target.hf_dir, target.path)
    max_len = _max_positions(*sparse_dirs) or target.info.get("max_position_embeddings")
    opts = engine_options(runtime, device, dtype, batch_size, max_len or 2048)
    wanted = ("dense", "sparse") if sparse else ("dense",)
    out = []
    for variant, factory in mod.variants(target, opts):
        if variant not in wanted:
            continue
        dirs = (target.dense, *sparse_dirs) if variant == "dense" else sparse_dirs
        model = dict(target.info, path=str(target.dense if variant == "dense" else target.path))
        if variant == "dense" and sparse:
            model.update(pattern=None, method=None)
        tok = _tokenizer_dir(*dirs)
        if tok is None and not isinstance(factory, str):
            factory = f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {dirs[0]}"
        out.append(PlannedEngine(variant, factory, model, tok, _max_positions(*dirs) or max_len))
    return out
