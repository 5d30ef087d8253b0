"""Read a sparse Hugging Face checkpoint directory (what ``dsnt-export prune`` writes).

The directory holds config.json, model.safetensors (or shards + model.safetensors.index.json),
tokenizer files and ``dsnt_manifest.json`` (kind "hf") whose "pattern" and "tensors" say what was
pruned. A legacy compressed-tensors ``sparse-24-bitmask`` checkpoint is read too: its packed
linears are unpacked by :mod:`converters.common.bitmask`, so stranded checkpoints can be re-exported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converters.common import bitmask
from dsnt_export.artifacts import MANIFEST_NAME, read_manifest
from dsnt_export.errors import ArtifactError, UserInputError
from dsnt_export.patterns import Pattern, parse_pattern

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# written by us or replaced by the exporters; everything else in a checkpoint dir is carried over
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


class CorruptFileError(ArtifactError):
    """A file that exists but cannot be parsed (truncated or corrupt), as opposed to one that
    is missing or holds the wrong content."""


def read_json(path: Path, what: str) -> Any:
    """The JSON in ``path`` (``what`` names it in messages).

    Raises:
        ArtifactError: the file is missing.
        CorruptFileError: the file is not valid UTF-8 JSON.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{what} not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{what} {path} is not valid JSON ({e}); the file is corrupt") from e


def weight_files(directory: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of a checkpoint dir (index order) and the index, if sharded."""
    index_path = directory / INDEX_NAME
    if index_path.exists():
        index = read_json(index_path, "safetensors index")
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ArtifactError(f"{index_path} has no 'weight_map'; expected a safetensors index")
        files = sorted(set(wm.values()))
        return [directory / f for f in files], index
    single = directory / SINGLE_NAME
    if single.exists():
        return [single], None
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return [directory / found[0]], None
    raise ArtifactError(
        f"no weights in {directory}: expected {SINGLE_NAME} or {INDEX_NAME} with its shards "
        f"(found safetensors files: {found or 'none'}). Save the model with safetensors "
        "(save_pretrained(safe_serialization=True))"
    )


def read_safetensors(files: list[Path], names=None) -> dict[str, torch.Tensor]:
    """Tensors of the given files (all, or only ``names``); unreadable files raise ArtifactError."""
    from safetensors import SafetensorError, safe_open

    want = None if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if want is None or k in want:
                        out[k] = fh.get_tensor(k)
        except FileNotFoundError as e:
            raise ArtifactError(f"weight file missing: {f}") from e
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ArtifactError(
                f"cannot read {f} ({e}); the file is truncated or corrupt. "
                "Re-export or re-download it"
            ) from e
    return out


def sparsity_config_of(config: dict) -> dict | None:
    """``quantization_config.sparsity_config`` (or the older ``compression_config`` spelling)."""
    for key in ("quantization_config", "compression_config"):
        q = config.get(key)
        if isinstance(q, dict) and q.get("sparsity_config") is not None:
            return q["sparsity_config"]
    return None


@dataclass
class SparseSource:
    """A readable sparse checkpoint: raw config, manifest, pattern, target weight names."""

    path: Path
    config: dict
    manifest: dict | None
    pattern: Pattern | None
    targets: list[str]
    files: list[Path]
    index: dict | None
    packed: list[str] = field(default_factory=list)  # modules stored as sparse-24-bitmask

    @property
    def model_type(self) -> str | None:
        """``config.model_type`` (e.g. ``"llama"``), None if the config lacks it."""
        return self.config.get("model_type")

    def manifest_fields(self) -> dict[str, Any]:
        """What an export's manifest carries over from this source, as ``new_manifest`` keywords:
        ``source_model`` (the source manifest's, else ``{"id": path, "model_type"}``), ``pattern``
        (``Pattern.to_json()``), then from the source manifest (empty where it lacks them)
        ``recipe``, ``calibration``, ``tensors`` (each entry copied, so the export may add to it)
        and ``skipped``, and empty ``timings``."""
        sm = self.manifest or {}
        return {
            "source_model": sm.get(
                "source_model", {"id": str(self.path), "model_type": self.model_type}
            ),
            "pattern": self.pattern.to_json(),
            "recipe": sm.get("recipe", {}),
            "calibration": sm.get("calibration", {}),
            "tensors": {k: dict(v) for k, v in sm.get("tensors", {}).items()},
            "skipped": sm.get("skipped", []),
            "timings": {},
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stored tensor (CPU, stored dtype), legacy bitmask triples unpacked to weights.

        Raises:
            ArtifactError: a weight file is missing, truncated or corrupt.
        """
        sd = read_safetensors(self.files)
        return bitmask.decompress_state_dict(sd) if self.packed else sd

    def target_weights(self) -> dict[str, torch.Tensor]:
        """The pruned weights ``{name: W [out, in]}`` (stored dtype), as :meth:`state_dict`."""
        if not self.packed:
            return read_safetensors(self.files, self.targets)
        sd = self.state_dict()
        return {k: sd[k] for k in self.targets}

    def load_model(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """The eager transformers model with these weights (``dtype`` None: the stored one)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from dsnt_export.config_metadata import clean_loaded_config

        cfg = AutoConfig.from_pretrained(self.path)
        clean_loaded_config(cfg, self.config, str(self.path))  # the one stale-metadata cleaner
        kw: dict[str, Any] = {"config": cfg}
        if dtype is not None:
            kw["dtype"] = dtype
        if not self.packed:
            model = AutoModelForCausalLM.from_pretrained(self.path, **kw)
        else:
            model = AutoModelForCausalLM.from_config(cfg)
            sd = self.state_dict()
            missing, unexpected = model.load_state_dict(sd, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            if unexpected or [k for k in missing if k not in tied]:
                raise ArtifactError(
                    f"{self.path}: weights do not fit {type(model).__name__}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            model.tie_weights()
            if dtype is not None:
                model = model.to(dtype)
        return model.to(device).eval()


def read_source(
    path: str | Path, *, pattern: str | Pattern | None = None, manifest: dict | None = None
) -> SparseSource:
    """Open a sparse HF checkpoint dir; fails with a clear message if it is not one.

    ``manifest``: use this manifest instead of the directory's (an export not yet finished).
    """
    p = Path(path)
    if not p.is_dir():
        raise UserInputError(
            f"source {p} is not a directory; expected a sparse checkpoint "
            "directory written by `dsnt-export prune`"
        )
    config = read_json(p / CONFIG_NAME, "config.json")
    files, index = weight_files(p)
    if manifest is None:
        manifest = read_manifest(p, required=False)
    keys = _all_keys(files, index)
    packed = bitmask.packed_modules(keys)
    if manifest is not None:
        if manifest.get("kind") != "hf":
            raise ArtifactError(
                f"{p / MANIFEST_NAME} has kind {manifest.get('kind')!r}; expected "
                "'hf' (a sparse checkpoint written by `dsnt-export prune`)"
            )
        pat = parse_pattern(pattern or manifest["pattern"]["string"])
        targets = sorted(manifest.get("tensors", {}))
    else:
        sc = sparsity_config_of(config)
        guess = pattern or (sc or {}).get("sparsity_structure")
        if guess is None:
            raise ArtifactError(
                f"{p} has no {MANIFEST_NAME} and no sparsity_config; cannot tell which tensors are "
                "sparse. Pass the pattern explicitly (--pattern 2:4) or prune with dsnt-export"
            )
        pat = parse_pattern(guess)
        targets = [f"{m}.weight" for m in packed] if packed else []
        log.warning("%s has no %s; targets inferred from the tensors", p, MANIFEST_NAME)
    have = set(keys) | {f"{m}.weight" for m in packed}
    missing = [t for t in targets if t not in have]
    if missing:
        raise ArtifactError(
            f"{p}: the manifest lists tensors absent from the weights: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    return SparseSource(p, config, manifest, pat, targets, files, index, packed)


def _all_keys(files: list[Path], index: dict | None) -> list[str]:
    if index is not None:
        return list(index["weight_map"])
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(files[0]), framework="pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"cannot read {files[0]} ({e}); truncated or corrupt") from e


def carried_files(src: Path) -> list[Path]:
    """Tokenizer, generation config and other side files to copy into an export."""
    skip = {CONFIG_NAME, INDEX_NAME, MANIFEST_NAME}
    return sorted(
        f
        for f in src.iterdir()
        if f.is_file()
        and f.name not in skip
        and not f.name.startswith(".")
        and not f.name.endswith(WEIGHT_SUFFIXES)
    )
