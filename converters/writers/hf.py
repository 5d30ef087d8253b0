"""Export a sparse checkpoint as a plain Hugging Face checkpoint that current vLLM loads.

Default layout (vLLM >= 0.19, transformers, anything that reads HF checkpoints): config.json with
NO ``quantization_config.sparsity_config`` (a leftover one is stripped with a warning, since current
vLLM refuses the model with it), ``model.safetensors`` or shards + index above ``max_shard_size``,
tokenizer files and generation_config.json copied, the zeros in place, and our sidecar manifest
``dsnt_manifest.json`` (ignored by vLLM) with the sparsity metadata.

Opt-in legacy layout ``format="sparse-24-bitmask"`` for vLLM <= 0.18 on Hopper: compressed-tensors
``quantization_config`` and per-linear ``.compressed/.bitmask/.shape`` tensors packed by
:mod:`converters.common.bitmask`. The version caveat is recorded and printed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from converters import Converter, ExportResult, Tolerance, register
from converters.checkers.common import mask_checks_from_report
from converters.checkers.hf import check_hf_dir
from converters.common import bitmask, vllm_compat
from converters.common.options import record_option, verify_options
from converters.common.safetensors_io import parse_size, read_header, save_sharded
from converters.common.source import (
    GENERATION_CONFIG_NAME,
    SparseSource,
    carried_files,
    read_source,
)
from converters.parity import ParityCheck, parity_ids
from converters.reference import compute_reference, save_reference
from dsnt_export.artifacts import new_manifest
from dsnt_export.errors import PatternError, UnsupportedModelError, UserInputError
from dsnt_export.evaluation.perplexity import logits_perplexity
from dsnt_export.patterns import NM

log = logging.getLogger(__name__)

FORMATS = ("plain", bitmask.FORMAT)
DEFAULT_MAX_SHARD = "5GB"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def legacy_quantization_config(
    pattern: NM, targets: list[str], ignore: list[str], global_sparsity: float
) -> dict:
    """compressed-tensors' quantization_config for a sparse-24-bitmask checkpoint."""
    return {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": bitmask.FORMAT,
            "sparsity_structure": str(pattern),
            "targets": targets,
            "ignore": ignore,
            "global_sparsity": global_sparsity,
        },
    }


def _linear_modules(src: SparseSource) -> list[str]:
    """Names of every nn.Linear of the model (built on the meta device: no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(src.path)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@register
class HfVllmConverter(Converter):
    """``export hf``: a plain HF checkpoint for current vLLM, or the legacy bitmask layout."""

    name = "hf"
    extras = ()
    # the stored weights are the source's (or its cast): both sides run them in float32
    tolerance = {"float32": Tolerance(1e-6, 1e-6)}
    description = "plain HF checkpoint for current vLLM (or legacy sparse-24-bitmask)"

    def write(
        self,
        src_dir: Path,
        tmp: Path,
        result: ExportResult,
        *,
        format: str = "plain",
        max_shard_size: int | str = DEFAULT_MAX_SHARD,
        dtype: str | None = None,
        allow_unknown_architecture: bool = False,
        **_: Any,
    ) -> dict:
        """Write the checkpoint into ``tmp``: weights (cast to ``dtype`` if given) as one file or
        shards of at most ``max_shard_size`` bytes, config.json without a sparsity_config (or
        with the legacy one for ``format="sparse-24-bitmask"``), tokenizer and generation
        config, the eager reference; returns the manifest with the options read back.

        Raises:
            UserInputError: unknown ``format``/``dtype``, bad ``max_shard_size``.
            UnsupportedModelError: vLLM does not know the architecture (unless allowed).
            PatternError: the legacy layout asked for a pattern other than 2:4.
            OptionMismatchError: the written files do not hold the requested options.
        """
        if format not in FORMATS:
            raise UserInputError(f"unknown hf export format {format!r}; choose one of {FORMATS}")
        parse_size(max_shard_size)
        src = read_source(src_dir)
        config, removed = vllm_compat.strip_sparsity_config(src.config)
        if removed:
            msg = (
                f"stripped {', '.join(removed)} from config.json: current vLLM refuses to load "
                "a checkpoint with a sparsity_config; sparsity metadata is kept in "
                "dsnt_manifest.json"
            )
            log.warning(msg)
            result.warnings.append(msg)
        problems = vllm_compat.config_problems(config)
        if problems and not allow_unknown_architecture:
            raise UnsupportedModelError(
                f"{src.path}: {'; '.join(problems)}. vLLM would not load "
                "this model; pass allow_unknown_architecture "
                "(--allow-unknown-architecture) to export anyway"
            )
        result.warnings.extend(problems)
        state = src.state_dict()
        if dtype is not None:
            if dtype not in _DTYPES:
                raise UserInputError(f"dtype {dtype!r} not one of {sorted(_DTYPES)}")
            state = {
                k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()
            }
            config["dtype"] = dtype
            config.pop("torch_dtype", None)
        if format == bitmask.FORMAT:
            config, state = self._legacy(src, config, state, result)
        written = save_sharded(state, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in carried_files(src.path):
            shutil.copy2(f, tmp / f.name)
        if not (tmp / GENERATION_CONFIG_NAME).exists():
            self._generation_config(tmp)
        save_reference(tmp, compute_reference(self._reference_model(src, dtype)))
        if not any(
            (tmp / n).exists()
            for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        ):
            result.warnings.append(
                "the source has no tokenizer files; vLLM needs one (or skip_tokenizer_init=True)"
            )
        options = self._verify_options(tmp, written, format, max_shard_size, dtype)
        return self._manifest(src, format, max_shard_size, written, removed, dtype, options)

    @staticmethod
    def _verify_options(
        tmp: Path, written: list[str], format: str, max_shard_size, dtype: str | None
    ) -> dict:
        """Requested vs written format, dtype and shard size, read back from the written headers.

        Written values: the layout (``sparse-24-bitmask`` when packed ``.compressed/.bitmask/
        .shape`` triples are stored, else ``plain``), the floating dtype(s) stored, and the
        largest shard's bytes. A shard may exceed the limit only when it holds a single tensor
        (a tensor is never split, as in Hugging Face's ``save_pretrained``).

        Raises:
            OptionMismatchError: a written value differs from the request.
        """
        headers = {f: read_header(tmp / f) for f in written if f.endswith(".safetensors")}
        keys = [k for h in headers.values() for k in h]
        floats = sorted(
            {m["dtype"] for h in headers.values() for m in h.values() if "float" in m["dtype"]}
        )
        sizes = {f: sum(m["nbytes"] for m in h.values()) for f, h in headers.items()}
        limit = parse_size(max_shard_size)
        oversize = [f for f, n in sizes.items() if n > limit and len(headers[f]) > 1]
        options: dict[str, dict] = {}
        record_option(
            options, "format", format, bitmask.FORMAT if bitmask.packed_modules(keys) else "plain"
        )
        record_option(options, "dtype", dtype, floats[0] if len(floats) == 1 else floats)
        record_option(options, "max_shard_size", limit, max(sizes.values(), default=0))
        options["max_shard_size"].update(
            requested_as=str(max_shard_size), shards=len(sizes), oversize_multi_tensor=oversize
        )
        verify_options(options, "hf export", ok={"max_shard_size": lambda req, got: not oversize})
        return options

    def _legacy(self, src: SparseSource, config: dict, state: dict, result: ExportResult):
        if src.pattern != NM(2, 4):
            raise PatternError(
                f"the sparse-24-bitmask layout holds only 2:4 sparsity; this "
                f"checkpoint is {src.pattern}. Export the plain layout instead"
            )
        targets = sorted(bitmask.module_of(t) for t in src.targets)
        ignore = sorted(set(_linear_modules(src)) - set(targets))
        zeros = sum(int((state[t] == 0).sum()) for t in src.targets)
        total = sum(state[t].numel() for t in src.targets)
        config = dict(config)
        config["quantization_config"] = legacy_quantization_config(
            src.pattern, targets, ignore, zeros / max(total, 1)
        )
        result.notes.append(vllm_compat.LEGACY_CAVEAT)
        log.warning(vllm_compat.LEGACY_CAVEAT)
        return config, bitmask.compress_state_dict(state, src.targets)

    @staticmethod
    def _reference_model(src: SparseSource, dtype: str | None):
        """The source in the export's dtype, upcast to float32 (the artifact's exact values)."""
        model = src.load_model(dtype=_DTYPES[dtype] if dtype else None)
        return model.float()

    @staticmethod
    def _generation_config(tmp: Path) -> None:
        from transformers import AutoConfig, GenerationConfig

        cfg = AutoConfig.from_pretrained(tmp)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)

    def _manifest(
        self,
        src: SparseSource,
        format: str,
        max_shard_size,
        written: list[str],
        removed: list[str],
        dtype: str | None,
        options: dict,
    ) -> dict:
        sm = src.manifest or {}
        fields = src.manifest_fields()
        if not fields["tensors"]:
            fields["tensors"] = {t: {"layout": "out_in"} for t in src.targets}
        return new_manifest(
            "hf",
            **fields,
            extra={
                "export": {
                    "converter": self.name,
                    "target": "vllm",
                    "format": format,
                    "max_shard_size": str(max_shard_size),
                    "weight_files": written,
                    "dtype": dtype,
                    "options": options,
                    "stripped_from_config": removed,
                    "source": {"path": str(src.path), "recipe_hash": sm.get("recipe_hash")},
                    "vllm": (
                        vllm_compat.LEGACY_CAVEAT
                        if format == bitmask.FORMAT
                        else "plain HF checkpoint; runs dense on current vLLM (no 2:4 kernels)"
                    ),
                }
            },
        )

    def check_masks(self, tmp: Path, manifest: dict) -> dict[str, dict]:
        """Check the written weights (streamed) against the pattern; record shape and sparsity."""
        report = check_hf_dir(tmp, manifest=manifest, hashes=False)
        for name, entry in report.tensors.items():  # the manifest records what was written
            meta = manifest["tensors"].setdefault(name, {})
            meta.update(shape=entry["shape"], sparsity=entry["sparsity"], check=entry)
            meta.setdefault("layout", "out_in")
        return mask_checks_from_report(report)

    def parity(
        self,
        src_dir: Path,
        tmp: Path,
        manifest: dict,
        check: ParityCheck,
        *,
        parity_batch: int = 2,
        parity_seqlen: int = 32,
        **_: Any,
    ) -> None:
        """Logits and perplexity of the written checkpoint (loaded by transformers, or unpacked)
        against the source in the export's dtype, both run in float32 on CPU."""
        ref_model = self._reference_model(
            read_source(src_dir), manifest["extra"]["export"]["dtype"]
        )
        # transformers' own loader (plain layout) or our unpacking (legacy), upcast to float32
        model = read_source(tmp, manifest=manifest).load_model(dtype=torch.float32)
        tol = self.tolerance["float32"]
        ids = parity_ids(ref_model.config.vocab_size, batch=parity_batch, seqlen=parity_seqlen)
        with torch.no_grad():
            ref = ref_model(input_ids=ids).logits
            got = model(input_ids=ids).logits
        check.compare("logits", got, ref, tol)
        check.compare_ppl(
            "perplexity", logits_perplexity(got, ids), logits_perplexity(ref, ids), tol
        )
