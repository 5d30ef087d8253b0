"""What ``dsnt-export bench DIR`` benchmarks: the artifact for the runtime and its dense reference.

DIR may be an artifact directory (``dsnt_manifest.json`` of kind "hf", "onnx" or "tensorrt") or a
run directory holding ``hf/``, ``onnx/``, ``tensorrt/`` artifacts (the one the runtime needs is
picked by its manifest's kind, not by its name alone). The dense reference is ``--dense`` if given,
else the source model the manifests name (``source_model.path``, or the embedded model's id).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsnt_export.artifacts import MANIFEST_NAME, read_manifest
from dsnt_export.errors import ArtifactError, UserInputError

log = logging.getLogger(__name__)


def runtime_kind(runtime: str) -> str:
    """The artifact kind ``runtime`` reads (from the runtime registry); UserInputError if the
    runtime is unknown."""
    from dsnt_export.runtimes import get_runtime

    return get_runtime(runtime).artifact_kind


@dataclass
class Target:
    """The artifact to benchmark and where its dense reference comes from."""

    runtime: str
    path: Path  # artifact directory of runtime_kind(runtime)
    kind: str
    manifest: dict | None
    hf_dir: Path | None  # the sparse HF checkpoint behind it (tokenizer, torch fallbacks)
    dense: Path | None  # dense reference (HF dir, or an artifact of the runtime's kind)
    dense_reason: str | None = None  # why there is no dense reference
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """Pruned parameter names (``...weight``) from the manifest."""
        return sorted((self.manifest or {}).get("tensors", {}))


def _kind(d: Path) -> str | None:
    m = read_manifest(d, required=False) if d.is_dir() else None
    return m.get("kind") if m else None


def _find_kind(root: Path, kind: str) -> Path | None:
    if _kind(root) == kind:
        return root
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _kind(sub) == kind:
            return sub
    return None


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def model_info(manifest: dict | None, path: Path) -> dict:
    """The ``model`` fields of a row (id, type, pattern, method, vocab and position limits) from an
    artifact's manifest and config.json."""
    m = manifest or {}
    sm = m.get("source_model") or {}
    recipe = m.get("recipe") or {}
    cfg = {}
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
    method = recipe.get("init")
    if method and recipe.get("refine") not in (None, "none"):
        method = f"{method}+{recipe['refine']}"
    return {
        "path": str(path),
        "id": sm.get("id"),
        "model_type": cfg.get("model_type") or sm.get("model_type"),
        "pattern": (m.get("pattern") or {}).get("string"),
        "method": method,
        "vocab_size": cfg.get("vocab_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
    }


def _dense_from_manifests(*manifests: dict | None) -> tuple[Path | None, str | None]:
    for m in manifests:
        sm = (m or {}).get("source_model") or {}
        for key in ("path", "id"):
            v = sm.get(key)
            if not v:
                continue
            if str(v).lower().startswith("embedded:"):
                from dsnt_export.embedded import embedded_model_dir

                return embedded_model_dir(progress=False), None
            p = Path(v).expanduser()
            if p.is_dir() and _is_hf_dir(p):
                return p, None
    named = [((m or {}).get("source_model") or {}).get("id") for m in manifests]
    named = [n for n in named if n]
    return None, (
        f"the dense source model {named[0]!r} named in the manifest is not available locally"
        if named
        else "the manifest names no dense source model"
    ) + "; pass --dense DIR (a dense HF checkpoint) to compare against it"


def resolve_target(path: str | Path, runtime: str, *, dense: str | Path | None = None) -> Target:
    """Find the artifact for ``runtime`` under ``path`` and its dense reference."""
    want = runtime_kind(runtime)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserInputError(f"{root} is not a directory; expected an artifact or run directory")
    found = _find_kind(root, want)
    if found is None and want == "hf" and _is_hf_dir(root):
        found = root  # a plain HF checkpoint without our manifest
    if found is None:
        have = sorted(
            {k for k in [_kind(root)] + [_kind(p) for p in root.iterdir() if p.is_dir()] if k}
        )
        hint = {
            "onnx": "dsnt-export export onnx",
            "tensorrt": "dsnt-export export tensorrt",
            "hf": "dsnt-export prune",
        }[want]
        raise ArtifactError(
            f"{root} holds no {want!r} artifact for runtime {runtime!r} (found kinds: "
            f"{have or 'none'}; expected a directory with a {MANIFEST_NAME} of kind {want!r}). "
            f"Create one with `{hint}`"
        )
    manifest = read_manifest(found, required=False)
    hf_dir = found if want == "hf" else _source_hf(root, manifest, found)
    hf_manifest = read_manifest(hf_dir, required=False) if hf_dir else None
    if dense is not None:
        d = Path(dense).expanduser()
        if not d.is_dir():
            raise UserInputError(f"--dense {d} is not a directory; expected a dense checkpoint")
        dense_dir, reason = d, None
    else:
        dense_dir, reason = _dense_from_manifests(manifest, hf_manifest)
    info = model_info(manifest, found)
    if hf_dir is not None and not info.get("vocab_size"):
        info.update(
            {
                k: v
                for k, v in model_info(hf_manifest, hf_dir).items()
                if k in ("vocab_size", "max_position_embeddings", "model_type") and v
            }
        )
    return Target(runtime, found, want, manifest, hf_dir, dense_dir, reason, info)


def _source_hf(root: Path, manifest: dict | None, artifact: Path) -> Path | None:
    """The sparse HF checkpoint an export was made from (``extra.export.source``: a path, or a
    dict with one, as the ONNX converter writes it; relative paths are read against the
    ``artifact`` directory), else an HF artifact beside it."""
    src = (((manifest or {}).get("extra") or {}).get("export") or {}).get("source")
    p = src.get("path") if isinstance(src, dict) else src
    if p:
        p = Path(artifact) / Path(p).expanduser()  # an absolute p stays as it is
    if p and p.is_dir():
        kind = _kind(p)
        if kind == "hf":
            return p
        if kind == "onnx":  # a TensorRT artifact built from an ONNX export: follow it
            return _source_hf(root, read_manifest(p), p)
    return _find_kind(root, "hf")


def checkpoint_dtype(target: Target) -> torch.dtype | None:
    """The dtype the checkpoint behind ``target`` declares in its config.json (``dtype`` or
    ``torch_dtype``): the sparse HF checkpoint's, else the dense reference's; None if neither
    says."""
    for d in (target.hf_dir, target.dense):
        cfg = Path(d) / "config.json" if d is not None else None
        if cfg is None or not cfg.is_file():
            continue
        try:
            raw = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        got = config_dtype(raw) if isinstance(raw, dict) else None
        if got is not None:
            return got
    return None


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype a ``config.json`` dict declares (``dtype``, else ``torch_dtype``: ``"float32"``,
    ``"float16"`` or ``"bfloat16"``); None when it declares none or another one."""
    from types import SimpleNamespace

    from dsnt_export.hf_io import source_dtype

    return source_dtype(SimpleNamespace(dtype=config.get("dtype") or config.get("torch_dtype")))


def compute_dtype(
    name: str, device: torch.device | str, target: Target | dict[str, Any]
) -> torch.dtype:
    """The bench's compute dtype: ``name`` as given, or for ``"auto"`` the project's one policy
    (:func:`dsnt_export.hf_io.resolve_dtype`: float32 on CPU, the checkpoint's 16-bit dtype on
    an accelerator). The checkpoint is ``target``'s (:func:`checkpoint_dtype`), or ``target`` is
    one checkpoint's ``config.json`` dict (:func:`config_dtype`; vLLM loads each variant from its
    own directory). Raises UserInputError for an unknown name."""
    from dsnt_export.hf_io import resolve_dtype

    declared = config_dtype(target) if isinstance(target, dict) else checkpoint_dtype(target)
    return resolve_dtype(name, torch.device(device), declared)
