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

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.adapters import get_adapter
from dsnt_export.artifacts import new_manifest, write_manifest
from dsnt_export.errors import ArtifactError, UserInputError, WrongArtifactKindError
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
        return str(require_hf_checkpoint(p))
    if spec.startswith(("/", "./", "../", "~", "\\")) or spec.count("/") > 1 or spec.endswith("/"):
        raise ArtifactError(
            f"{spec} does not exist (and is not a Hugging Face hub id, which reads 'org/name'); "
            "expected a checkpoint directory (config.json + *.safetensors + tokenizer files)"
        )
    return spec


# artifact kinds other commands read, and the command that reads each
_OTHER_KINDS = {
    "onnx": (
        "an ONNX export",
        "`dsnt-export bench {p} --runtime onnxruntime --ppl` (perplexity) or `dsnt-export eval "
        "{p} --tasks TASKS --runtime onnxruntime` (zero-shot)",
    ),
    "tensorrt": ("a TensorRT engine", "`dsnt-export bench {p} --runtime tensorrt --ppl`"),
    "report": ("a run report", "the hf/ checkpoint of the run it reports on"),
}
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def artifact_kind(path: str | Path) -> tuple[str | None, str]:
    """What a directory holds, established from its manifest or its files: ``(kind, evidence)``.

    ``kind`` is ``"hf"``, ``"onnx"``, ``"tensorrt"``, ``"report"``, ``"run"`` (a run directory
    holding ``hf/``) or None (none of these); ``evidence`` names the manifest or files seen, for
    messages (e.g. ``"model.onnx"``). Reads no weights.
    """
    from dsnt_export.artifacts import MANIFEST_NAME, onnx_graphs_in, read_manifest

    p = Path(path)
    if not p.is_dir():
        return None, "not a directory"
    try:
        m = read_manifest(p, required=False)
    except ArtifactError:
        m = None
    kind = m.get("kind") if m else None
    onnx = onnx_graphs_in(p)
    engines = sorted(p.glob("*.engine")) + sorted(p.glob("*.plan")) + sorted(p.glob("*/*.engine"))
    if kind == "onnx" or (kind is None and onnx):
        return "onnx", str(onnx[0].relative_to(p)) if onnx else f"{MANIFEST_NAME} kind 'onnx'"
    if kind == "tensorrt" or (kind is None and engines):
        return "tensorrt", (
            str(engines[0].relative_to(p)) if engines else f"{MANIFEST_NAME} kind 'tensorrt'"
        )
    if kind == "report":
        if (p / "hf" / "config.json").is_file():
            return "run", "hf/config.json"
        return "report", f"{MANIFEST_NAME} kind 'report'"
    if (p / "config.json").is_file():
        return "hf", "config.json"
    if kind == "hf":
        return "hf", f"{MANIFEST_NAME} kind 'hf' (no config.json)"
    if (p / "hf" / "config.json").is_file():
        return "run", "hf/config.json"
    return None, "no config.json"


def require_hf_checkpoint(
    path: str | Path, command: str | None = None, mode: str | None = None
) -> Path:
    """The HF checkpoint directory behind ``path``, or a clear error naming what it holds instead.

    ``command`` / ``mode``: the command that asked and in which mode, for the message (e.g.
    ``"eval"``, ``"on the torch runtime"``: "`dsnt-export eval` on the torch runtime reads ...").

    A run directory gives its ``hf/``. Raises :class:`WrongArtifactKindError` for an ONNX export,
    a TensorRT engine or a report (with the command that reads it), and :class:`ArtifactError` for
    a directory with no config.json. The weights are checked later (:func:`check_weight_files`,
    after the config), so a config problem is reported first.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ArtifactError(
            f"{p} is a file, not a directory; pass the checkpoint directory that holds it "
            f"({p.parent}) or another Hugging Face checkpoint directory"
        )
    kind, evidence = artifact_kind(p)
    if kind == "run":
        return p / "hf"
    if kind in _OTHER_KINDS:
        what, use = _OTHER_KINDS[kind]
        who = (
            f"`dsnt-export {command}`{f' {mode}' if mode else ''} reads" if command else "expected"
        )
        raise WrongArtifactKindError(
            f"{p} is not an HF checkpoint: found {what} ({evidence}); {who} a Hugging Face "
            f"checkpoint directory (config.json + *.safetensors + tokenizer). Use "
            f"{use.format(p=p)}, or pass the HF checkpoint it was made from"
        )
    if kind is None or not (p / "config.json").is_file():
        raise ArtifactError(
            f"{p} has no config.json; expected a Hugging Face checkpoint directory "
            "(config.json + *.safetensors + tokenizer files)"
        )
    return p


def resolve_device(name: str | None) -> torch.device:
    """'auto' -> the accelerator if one is available, else the CPU; a named device must exist.

    Raises UserInputError for an unknown device string, a device type this torch has no device
    of (e.g. ``cuda`` on a CPU-only build) and an index past the device count."""
    if name is None or name == "auto":
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return acc if acc is not None else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserInputError(f"unknown device {name!r} ({e}); use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = bool(
        backend is not None and hasattr(backend, "is_available") and backend.is_available()
    )
    if not available:
        raise UserInputError(
            f"--device {name}: this torch ({torch.__version__}) sees no {dev.type} device; use "
            "--device cpu, or auto (the accelerator when there is one)"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if dev.index is not None and count is not None and dev.index >= count:
        raise UserInputError(
            f"--device {name}: there are {count} {dev.type} device(s), numbered 0..{count - 1}"
        )
    return dev


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
    """The dtype a model config declares (``config.dtype``, else ``config.torch_dtype``; a torch
    dtype or one of ``"float32"``/``"float16"``/``"bfloat16"``); None when it declares none or
    another one."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        return _DTYPES.get(d)
    return d if isinstance(d, torch.dtype) else None


def load_config(source: str):
    """The transformers config of ``source`` (a checkpoint directory or hub id), checked before any
    weight is read.

    A local ``config.json`` is read first, so an unsupported ``model_type`` or a quantized
    checkpoint is refused even where transformers lacks the class; stale sparsity metadata is
    cleaned off the returned config. Raises ArtifactError for an unreadable or invalid config.json
    of a directory, UnsupportedModelError for a model type without an adapter,
    QuantizedCheckpointError for a quantized checkpoint, UserInputError for a hub id that cannot be
    fetched or that transformers refuses (all exit code 2 in the CLI).
    """
    import transformers as T

    from dsnt_export.config_metadata import clean_loaded_config, refuse_quantized

    cfg_file = Path(source) / "config.json"
    raw: Any = None
    if cfg_file.is_file():  # an unsupported model_type fails here, even one transformers lacks
        try:
            raw = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"{cfg_file} is not valid JSON ({e}); re-save the checkpoint"
            ) from e
        if not isinstance(raw, dict):
            raise ArtifactError(
                f"{cfg_file} holds a JSON {type(raw).__name__}, not an object; expected a "
                "Hugging Face config.json"
            )
        get_adapter(raw.get("model_type"))
        refuse_quantized(raw, source)  # before transformers parses a quantization_config
    offline = False if Path(source).is_dir() else hub_offline_unless_reachable()
    try:
        config = T.AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if Path(source).is_dir():
            raise ArtifactError(
                f"cannot read the config of checkpoint directory {source}: transformers "
                f"refused its config.json ({type(e).__name__}: {_first_line(e)}). Expected a "
                "Hugging Face config.json of a supported causal LM; fix or re-save it."
            ) from e
        if not isinstance(e, OSError):
            raise UserInputError(
                f"transformers refused the config of {source!r} ({type(e).__name__}: "
                f"{_first_line(e)}); expected a supported causal LM"
            ) from e
        why = (
            "the hub's host does not resolve from this machine, so only the local cache was "
            f"searched ({_first_line(e)})"
            if offline
            else str(e)
        )
        raise UserInputError(
            f"cannot load a model config from {source!r}: it is not a local directory and could "
            f"not be fetched from the Hugging Face hub ({why}). Pass an existing checkpoint "
            "directory or a hub id reachable from this machine, or omit --model to use the "
            "embedded model."
        ) from e
    get_adapter(config)  # unsupported model_type: fail before reading any weight
    if raw is None:  # a hub id: the config transformers fetched
        raw = config.to_dict()
    clean_loaded_config(config, raw, source)  # stale sparsity metadata out; quantized: refused
    return config


@functools.cache
def hub_offline_unless_reachable() -> bool:
    """Switch huggingface_hub to offline mode for this process when the hub's host name does not
    resolve (no network or no DNS); returns whether offline mode is on.

    Without this, every file request of a hub id (a model, or a dataset of an lm-eval task)
    retries 5 times with back-off (~25 s) before failing; offline, files already in the local
    cache (and local data files) still load and a missing one fails at once. Nothing changes
    when the name resolves or ``HF_HUB_OFFLINE`` is already set. Checked once per process (one
    DNS lookup), logged when it switches.
    """
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    host = urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return False
    except OSError as e:
        hub.HF_HUB_OFFLINE = True
        try:  # `datasets` (lm-eval's task data) keeps its own copy of the flag
            import datasets.config

            datasets.config.HF_HUB_OFFLINE = True
        except ImportError:
            pass
        logger.warning(
            "%s does not resolve (%s): Hugging Face hub in offline mode (local cache only)",
            host,
            e,
        )
        return True


def load_model(source: str, dtype: torch.dtype, config: Any | None = None) -> nn.Module:
    """Load a causal LM on the CPU in ``dtype``; missing, corrupt or incomplete weights raise
    ArtifactError (stating what was found: no weight file, an absent shard, an unreadable file)."""
    import transformers as T
    from safetensors import SafetensorError

    config = config if config is not None else load_config(source)
    if Path(source).is_dir():
        check_weight_files(Path(source))
    try:
        model, info = T.AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True
        )
    except SafetensorError as e:
        raise ArtifactError(
            f"cannot read the weights of {source!r}: {e}. A safetensors file is truncated or "
            "corrupt; re-download or re-save the checkpoint."
        ) from e
    except (OSError, RuntimeError, ValueError) as e:
        raise ArtifactError(
            f"transformers could not load the weights of {source!r}: {type(e).__name__}: "
            f"{_first_line(e)}. Check that the weights belong to this config.json (shapes, "
            "names) and are complete; re-save the checkpoint if they are not."
        ) from e
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ArtifactError(
            f"checkpoint {source!r} is incomplete: missing {missing[:5]}, shape-mismatched "
            f"{mismatched[:5]}; these would be randomly initialised. Use a complete checkpoint."
        )
    return model.eval()


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + " ..."


def check_weight_files(directory: Path) -> None:
    """Weight files of a checkpoint ``directory`` present, complete and readable, or ArtifactError.

    Refuses a directory with no weight file, an index naming shard files that are not there, and
    a safetensors file whose header cannot be read. Reads no tensor data: safetensors checks the
    header and that the file holds every byte the header declares, so a truncated or corrupt file
    is found here, with its name.
    """
    weights = [f for g in _WEIGHT_GLOBS for f in sorted(directory.glob(g))]
    if not weights:
        found = sorted(f.name for f in directory.iterdir())[:8]
        raise ArtifactError(
            f"{directory} has a config.json but no weight files (*.safetensors or "
            f"pytorch_model*.bin; found {found}); copy the weights beside it or re-save the "
            "checkpoint"
        )
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text()).get("weight_map") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ArtifactError(f"{index} is not a valid safetensors index ({e})") from e
        absent = sorted({f for f in wm.values() if not (directory / f).is_file()})
        if absent:
            raise ArtifactError(
                f"{directory}: model.safetensors.index.json lists shard file(s) that are not "
                f"there: {absent[:5]}; copy the missing shards or re-download/re-save the "
                "checkpoint"
            )
    from safetensors import SafetensorError, safe_open

    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ArtifactError(
                f"cannot read {f} ({_first_line(e)}): the file is truncated or corrupt "
                f"({f.stat().st_size} bytes); re-download or re-save the checkpoint"
            ) from e


def load_tokenizer(source: str):
    """The tokenizer saved with the checkpoint ``source`` (``AutoTokenizer``).

    Any failure of transformers / tokenizers to build it (a missing file, an unparsable
    tokenizer.json, a tokenizer class that needs sentencepiece, ...) raises ArtifactError with the
    library's one-line cause and the tokenizer files found.
    """
    import transformers as T

    try:
        return T.AutoTokenizer.from_pretrained(source)
    except Exception as e:  # tokenizers raises plain Exception for a malformed tokenizer.json
        p = Path(source)
        found = sorted(f.name for f in p.glob("*token*")) if p.is_dir() else None
        where = f"; tokenizer files found: {found or 'none'}" if found is not None else ""
        raise ArtifactError(
            f"cannot load the tokenizer of {source!r}: {type(e).__name__}: {_first_line(e)}"
            f"{where}. Put the tokenizer the model was trained with beside its config.json "
            "(tokenizer.json + tokenizer_config.json)"
        ) from e


def prepare_config_for_save(config: Any, dtype: torch.dtype, architecture: str) -> None:
    """Make ``config`` what a saved sparse checkpoint's config.json says, in place.

    Drops ``sparsity_config`` / ``quantization_config`` (the checkpoint is plain dense-format
    weights with zeros), records ``dtype`` (the saved tensors' dtype, as a string like
    ``"float32"``) and ``architectures = [architecture]`` (the ``*ForCausalLM`` class name), as
    ``save_pretrained`` does. Raises nothing.
    """
    for attr in ("sparsity_config", "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [architecture]


def save_config_files(model: nn.Module, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Write config.json (and generation_config.json for a generating model) of ``model`` into
    ``out_dir`` as ``save_pretrained`` writes them, for saved tensors of ``dtype``, without touching
    the weights (the streamed path: ``model`` may be a meta-device skeleton). Raises OSError when
    ``out_dir`` is not writable."""
    prepare_config_for_save(model.config, dtype, type(model).__name__)
    model.config.save_pretrained(out_dir)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def attach_generation_config(model: nn.Module, source: str) -> None:
    """Give ``model`` the generation config ``from_pretrained`` would: ``source``'s
    generation_config.json when it has one (else the one built from the model config stays).
    For a model built with ``from_config`` (the streamed path's skeleton). Raises nothing."""
    import transformers as T

    if not model.can_generate():
        return
    try:
        model.generation_config = T.GenerationConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        logger.debug("no generation config in %s: %s", source, e)


def pruned_tensor_entry(name: str, weight: torch.Tensor, method: str, pattern: Any) -> dict:
    """The manifest ``tensors`` entry of one saved pruned weight ``[out, in]`` (its dtype as saved).

    ``{"shape", "layout": "out_in", "method", "sparsity", "check"}``: the mask is validated on the
    tensor as it is written (:func:`dsnt_export.masks.validate_mask`, ``pattern`` a Pattern or
    its string). Raises ``UserInputError`` for a bad pattern string.
    """
    check = validate_mask(weight.detach(), parse_pattern(pattern), name=name)
    return {
        "shape": list(weight.shape),
        "layout": "out_in",
        "method": method,
        "sparsity": check.sparsity,
        "check": check.to_json(),
    }


def write_checkpoint_manifest(
    out_dir: str | Path,
    *,
    pattern: Any,
    report: dict,
    tensors: dict,
    manifest: dict | None = None,
) -> dict:
    """Write ``dsnt_manifest.json`` (kind ``hf``) of a saved sparse checkpoint; return it.

    ``report``: ``SparsifyReport.to_json()`` (kept under ``extra.run_report``); ``tensors``:
    ``{weight name: pruned_tensor_entry(...)}``; ``manifest``: extra fields (recipe,
    source_model, calibration, timings). Call it after every other file is written (the manifest
    hashes them). Raises OSError when ``out_dir`` is not writable.
    """
    pattern = parse_pattern(pattern)
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
    write_manifest(Path(out_dir), m)
    return m


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
    source_model, calibration, timings). Returns the manifest. The model is cast in place. The
    streamed path (:mod:`dsnt_export.sparsify.streaming`) writes the same files with the same
    helpers (:func:`prepare_config_for_save`, :func:`pruned_tensor_entry`,
    :func:`write_checkpoint_manifest`).
    """
    out = Path(out_dir)
    if save_dtype is not None:
        model.to(save_dtype)
    prepare_config_for_save(model.config, next(model.parameters()).dtype, type(model).__name__)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tensors = {
        e["name"] + ".weight": pruned_tensor_entry(
            e["name"] + ".weight", model.get_submodule(e["name"]).weight, e["method"], pattern
        )
        for e in report["layers"]
    }
    return write_checkpoint_manifest(
        out, pattern=pattern, report=report, tensors=tensors, manifest=manifest
    )
