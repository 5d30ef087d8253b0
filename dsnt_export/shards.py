"""Safetensors checkpoints read and written one tensor at a time, with plain file I/O.

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (plus an
optional ``__metadata__`` mapping), then the raw little-endian tensor bytes. Reading one tensor
here is a seek and a read into a fresh CPU tensor, and writing streams each tensor's bytes after a
header announced up front, so neither the file nor the other tensors of a shard are ever held in
memory, and nothing stays memory-mapped (mapped pages of a touched tensor would count in the
process's resident memory until unmapped). Used by the out-of-core prune
(:mod:`dsnt_export.sparsify.streaming`); ``converters/common/safetensors_io.py`` writes whole
in-memory state dicts with the safetensors library instead.

* :func:`read_header` / :class:`SafetensorsCheckpoint`: the tensor table of a file / a directory,
  :meth:`SafetensorsCheckpoint.read` one tensor;
* :class:`ShardWriter`: ``model-0000K-of-0000N.safetensors`` shards tensor by tensor and
  ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsnt_export.errors import ArtifactError

__all__ = [
    "INDEX_NAME",
    "ST_DTYPES",
    "SafetensorsCheckpoint",
    "ShardWriter",
    "TensorInfo",
    "read_header",
]

#: safetensors dtype names <-> torch dtypes (the format's table; little-endian byte order)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file``, ``dtype``, ``shape`` and its absolute byte range
    ``[start, end)`` in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file: ``{name: TensorInfo}`` (reads the header only).

    Raises :class:`~dsnt_export.errors.ArtifactError` for a file whose header is unreadable, names
    an unknown dtype or points past the end of the file.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ArtifactError(
            f"cannot read the safetensors header of {p} ({e}); the file is truncated or corrupt, "
            "re-download or re-save the checkpoint"
        ) from e
    base = 8 + n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec.get("dtype") not in ST_DTYPES:
            raise ArtifactError(
                f"{p}: tensor {name} has dtype {spec.get('dtype')!r}, which this reader does not "
                f"know (known: {', '.join(ST_DTYPES)})"
            )
        b, e = spec["data_offsets"]
        if base + e > size:
            raise ArtifactError(f"{p}: tensor {name} ends past the end of the file (truncated)")
        out[name] = TensorInfo(
            p, ST_DTYPES[spec["dtype"]], tuple(spec["shape"]), base + b, base + e
        )
    return out


class SafetensorsCheckpoint:
    """The safetensors tensors of a checkpoint directory, read one at a time.

    ``directory`` holds ``*.safetensors`` files; with a ``model.safetensors.index.json`` only the
    shards it lists are read (hub repositories may carry other safetensors files beside them,
    e.g. Mistral's ``consolidated.safetensors``). :attr:`infos` maps every tensor name to its
    :class:`TensorInfo`. :meth:`read` returns a CPU
    tensor owning its memory, filled by a plain file read. Raises
    :class:`~dsnt_export.errors.ArtifactError` when the directory has no safetensors file
    (e.g. only ``pytorch_model.bin``: re-save it as safetensors) or a header is unreadable.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                listed = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ArtifactError(f"{index} is not a valid safetensors index ({e})") from e
            files = [self.directory / f for f in sorted(listed)]
        if not files:
            raise ArtifactError(
                f"{self.directory} has no *.safetensors file; the out-of-core path reads "
                "safetensors only. Re-save the checkpoint with save_pretrained (safetensors is "
                "its default) or prune it in memory (without --out-of-core)"
            )
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            self.infos.update(read_header(f))

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored (its dtype and shape), on the CPU; KeyError if absent."""
        info = self.infos[key]
        n = info.end - info.start
        buf = torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if n else memoryview(b"")
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            got = 0
            while got < n:
                k = f.readinto(view[got:])
                if not k:
                    raise ArtifactError(f"{info.file}: unexpected end of file reading {key}")
                got += k
        return buf.view(info.dtype).reshape(info.shape)

    def key_for(self, name: str, base_prefix: str) -> str | None:
        """The checkpoint key holding the skeleton's tensor ``name``: ``name`` itself, else with the
        base model prefix (``model.``) removed or added; None when none of them is stored."""
        pre = base_prefix + "." if base_prefix else ""
        cands = [name]
        if pre and name.startswith(pre):
            cands.append(name[len(pre) :])
        elif pre:
            cands.append(pre + name)
        return next((c for c in cands if c in self.infos), None)


class ShardWriter:
    """Writes ``model-0000K-of-0000N.safetensors`` shards tensor by tensor, then the index.

    :meth:`open_shard` takes the shard's ``{name: (dtype, shape)}`` (the header is written first,
    so nothing of the shard need be in memory at once); :meth:`put` writes the tensors in that
    order; :meth:`finish` writes ``model.safetensors.index.json`` (``metadata.total_size`` in
    bytes, ``metadata.total_parameters``, ``weight_map``). Raises ``ValueError`` for a tensor out of
    order or of the wrong dtype/shape, and for more shards than announced.
    """

    def __init__(self, out_dir: str | Path, n_shards: int):
        self.out = Path(out_dir)
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.total_params = 0
        self._k = 0
        self._f: Any = None
        self._pending: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def open_shard(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> str:
        """Start the next shard holding ``specs`` (in that order); returns its file name."""
        self.close_shard()
        if self._k >= self.n_shards:
            raise ValueError(f"more than the {self.n_shards} announced shards")
        self._k += 1
        name = f"model-{self._k:05d}-of-{self.n_shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for key, (dtype, shape) in specs.items():
            nbytes = _numel(shape) * _itemsize(dtype)
            header[key] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [off, off + nbytes],
            }
            off += nbytes
            self.weight_map[key] = name
            self.total_size += nbytes
            self.total_params += _numel(shape)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._f = open(self.out / name, "wb")  # noqa: SIM115 - closed by close_shard
        self._f.write(struct.pack("<Q", len(text)) + text)
        self._pending = [(k, d, tuple(s)) for k, (d, s) in specs.items()]
        return name

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the open shard (moved to the CPU, made contiguous)."""
        if not self._pending or self._pending[0][0] != key:
            nxt = self._pending[0][0] if self._pending else None
            raise ValueError(f"shard writer: got {key!r}, expected {nxt!r}")
        _, dtype, shape = self._pending.pop(0)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"shard writer: {key} is {tensor.dtype} {tuple(tensor.shape)}, announced "
                f"{dtype} {shape}"
            )
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).numpy()))

    def close_shard(self) -> None:
        """Close the open shard (every announced tensor must have been written)."""
        if self._f is None:
            return
        if self._pending:
            raise ValueError(f"shard closed before {self._pending[0][0]!r} was written")
        self._f.close()
        self._f = None

    def abort(self) -> None:
        """Close the open shard's file without checks (after an error; the caller removes the
        half-written directory)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self._pending = []

    def finish(self) -> Path:
        """Close the last shard and write the index; returns its path."""
        self.close_shard()
        if self._k != self.n_shards:
            raise ValueError(f"{self._k} shards written, {self.n_shards} announced")
        index = {
            "metadata": {"total_parameters": self.total_params, "total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        path = self.out / INDEX_NAME
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return path


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
