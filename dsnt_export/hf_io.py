"""Loading a causal LM for sparsification and saving the sparse result as an HF checkpoint.

* :func:`resolve_model_source`: ``None`` / ``"embedded:smollm2-135m"`` -> the embedded reference model
  directory; a local directory; otherwise a Hugging Face hub id.
* :func:`load_model`: config first (an unsupported ``model_type`` fails before any weight is read),
  then weights; unreadable or incomplete checkpoints raise :class:`ArtifactError`.
* :func:`save_checkpoint`: ``save_pretrained`` + tokenizer + generation config into a directory,
  in the chosen dtype, no ``sparsity_config``, plus ``dsnt_manifest.json`` (kind ``hf``) with the
  recipe, per-tensor sparsity and the mask check of every saved pruned weight.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.adapters import get_adapter
from dsnt_export.artifacts import new_manifest, write_manifest
from dsnt_export.errors import ArtifactError, UserInputError
from dsnt_export.masks import validate_mask
from dsnt_export.patterns import parse_pattern

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_source(spec: str | None) -> str:
    """A local directory or hub id to load; ``None``/embedded names give the embedded model."""
    if spec is None or spec.strip().lower() == "embedded":
        spec = "embedded:smollm2-135m"
    if spec.strip().lower().startswith("embedded:"):
        from dsnt_export.embedded import embedded_model_dir, is_embedded_id

        if not is_embedded_id(spec):
            raise UserInputError(
                f"unknown embedded model {spec!r}; the embedded model is 'embedded:smollm2-135m'"
            )
        return str(embedded_model_dir())
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ArtifactError(
                f"{p} has no config.json; expected a Hugging Face checkpoint directory "
                "(config.json + *.safetensors + tokenizer files)"
            )
        return str(p)
    return spec


def resolve_device(name: str | None) -> torch.device:
    """'auto' -> the accelerator if one is available, else the CPU."""
    if name is None or name == "auto":
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return acc if acc is not None else torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserInputError(f"unknown device {name!r} ({e}); use auto, cpu, cuda or cuda:N") from e


def resolve_dtype(name: str, device: torch.device, source: torch.dtype | None) -> torch.dtype:
    """Compute dtype: 'auto' is float32 on CPU, the checkpoint's 16-bit dtype on an accelerator."""
    if name != "auto":
        if name not in _DTYPES:
            raise UserInputError(f"unknown dtype {name!r}; use auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return source if source in (torch.float16, torch.bfloat16) else torch.float16


def source_dtype(config: Any) -> torch.dtype | None:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        return _DTYPES.get(d)
    return d if isinstance(d, torch.dtype) else None


def load_config(source: str):
    import transformers as T

    cfg_file = Path(source) / "config.json"
    if cfg_file.is_file():  # an unsupported model_type fails here, even one transformers lacks
        try:
            raw = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"{cfg_file} is not valid JSON ({e}); re-save the checkpoint"
            ) from e
        get_adapter(raw.get("model_type") if isinstance(raw, dict) else None)
    try:
        config = T.AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        if Path(source).is_dir():
            raise ArtifactError(
                f"cannot read the config of checkpoint directory {source}: {e}. Expected a "
                "Hugging Face config.json of a supported causal LM; re-save the checkpoint."
            ) from e
        raise UserInputError(
            f"cannot load a model config from {source!r}: it is not a local directory and could "
            f"not be fetched from the Hugging Face hub ({e}). Pass an existing checkpoint "
            "directory or a hub id reachable from this machine, or omit --model to use the "
            "embedded model."
        ) from e
    get_adapter(config)  # unsupported model_type: fail before reading any weight
    return config


def load_model(source: str, dtype: torch.dtype, config: Any | None = None) -> nn.Module:
    """Load a causal LM on the CPU in ``dtype``; corrupt or incomplete weights raise ArtifactError."""
    import transformers as T
    from safetensors import SafetensorError

    config = config if config is not None else load_config(source)
    try:
        model, info = T.AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True
        )
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise ArtifactError(
            f"cannot load the weights of {source!r}: {type(e).__name__}: {e}. The checkpoint is "
            "missing, truncated or corrupt; re-download or re-save it."
        ) from e
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ArtifactError(
            f"checkpoint {source!r} is incomplete: missing {missing[:5]}, shape-mismatched "
            f"{mismatched[:5]}; these would be randomly initialised. Use a complete checkpoint."
        )
    return model.eval()


def load_tokenizer(source: str):
    import transformers as T

    try:
        return T.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot load the tokenizer of {source!r}: {e}") from e


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    pattern: Any,
    report: dict,
    save_dtype: torch.dtype | None = None,
    manifest: dict | None = None,
) -> dict:
    """Write the HF checkpoint and its manifest into ``out_dir`` (an existing, empty directory).

    ``report`` is ``SparsifyReport.to_json()``; ``manifest`` holds extra manifest fields (recipe,
    source_model, calibration, timings). Returns the manifest. The model is cast in place.
    """
    out = Path(out_dir)
    pattern = parse_pattern(pattern)
    if save_dtype is not None:
        model.to(save_dtype)
    for attr in ("sparsity_config", "quantization_config"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.dtype = next(model.parameters()).dtype
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tensors = {}
    for e in report["layers"]:
        w = model.get_submodule(e["name"]).weight
        check = validate_mask(w.detach(), pattern, name=e["name"] + ".weight")
        tensors[e["name"] + ".weight"] = {
            "shape": list(w.shape),
            "layout": "out_in",
            "method": e["method"],
            "sparsity": check.sparsity,
            "check": check.to_json(),
        }
    fields = dict(manifest or {})
    fields.setdefault("extra", {})
    fields["extra"] = {**fields["extra"], "run_report": report}
    m = new_manifest(
        "hf",
        pattern=pattern.to_json(),
        tensors=tensors,
        skipped=report.get("skipped", []),
        mask_check_ok=all(t["check"]["ok"] for t in tensors.values()),
        **fields,
    )
    write_manifest(out, m)
    return m
