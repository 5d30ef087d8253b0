"""Writing safetensors checkpoints: one file, or shards with a Hugging Face index."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from converters.common.source import INDEX_NAME, SINGLE_NAME
from dsnt_export.errors import ArtifactError, UserInputError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MiB`` / ``1048576`` -> bytes (decimal units as in Hugging Face)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise UserInputError(
                f"cannot parse size {size!r}; write it like '5GB', '500MB', "
                "'2GiB' or a number of bytes"
            )
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise UserInputError(f"a size must be positive, got {size!r}")
    return value


#: safetensors header dtype -> torch dtype name
HEADER_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, from its header only (no tensor data is read).

    Returns ``{name: {"dtype": torch dtype name, "shape": [...], "nbytes": int}}``.

    Raises:
        ArtifactError: the file is missing, or its header is truncated or not safetensors JSON.
    """
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n < 2**27 else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read the safetensors header of {path} ({e})") from e
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} has no safetensors header; the file is truncated or corrupt")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = HEADER_DTYPES.get(meta["dtype"], meta["dtype"].lower())
        out[name] = {"dtype": dtype, "shape": list(meta["shape"]), "nbytes": end - start}
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_sharded(
    state: dict[str, torch.Tensor],
    out_dir: Path,
    max_shard_size: int | str,
    *,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``state`` as ``model.safetensors`` or as shards + ``model.safetensors.index.json``.

    Shards are filled greedily in key order, each at most ``max_shard_size`` bytes unless a single
    tensor is larger. Returns the written file names.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = _nbytes(t)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().cpu().contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_NAME), metadata=meta)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in state.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_NAME]
