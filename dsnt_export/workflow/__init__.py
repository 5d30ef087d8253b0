"""Run a :class:`~dsnt_export.recipe.Recipe` as a library: load, calibrate, sparsify, save, evaluate,
export, check, report. The CLI commands ``prune`` and ``run`` only parse flags, call these and print
what they return; nothing here reads an argparse Namespace or prints.

* :func:`load_model_for` -> :class:`LoadedModel` (the recipe's model, tokenizer, device and dtype);
* :func:`prune_recipe` -> :class:`PruneResult` (the sparse model in memory);
  :func:`write_checkpoint` writes it as an HF checkpoint with its manifest;
  :func:`prune_to_dir` does both, atomically (``dsnt-export prune``);
* out of core (``recipe.out_of_core``): :func:`load_skeleton_for` (config, tokenizer, the model
  on the meta device) and :func:`prune_streamed` (blocks read from the checkpoint, pruned and
  written one at a time, :mod:`dsnt_export.sparsify.streaming`); same files, same weights;
* :func:`run_recipe` -> :class:`RunSummary`: the whole ``dsnt-export run`` pipeline, the ordered,
  immutable stage list :data:`STAGES`:

  ======================  ==============================================================
  ``load``                resolve, check and load the model and tokenizer
  ``eval_data``           tokens of the evaluation data (only when evaluating)
  ``dense_ppl``           perplexity of the dense model (only when evaluating)
  ``prune``               calibration data + :func:`dsnt_export.sparsify.driver.sparsify`
  ``save``                OUT/hf: the sparse checkpoint and its manifest
  ``validate``            re-read OUT/hf's safetensors, check every pruned tensor's pattern
  ``reference_outputs``   eager float32 outputs in OUT/hf/dsnt_reference.npz
  ``sparse_ppl``          perplexity of the saved checkpoint (only when evaluating)
  ``export_onnx``         OUT/onnx through the ONNX converter (level ``fp32``/``full``/``none``)
  ``check``               ``dsnt-export check`` of every artifact written
  ``report``              OUT/report: summary.json/.md, report.json/.md, figures
  ======================  ==============================================================

  OUT is written in a temporary directory beside it and renamed at the end: a failed run leaves
  nothing behind. Each stage's wall time (seconds) is in ``RunSummary.timings`` under its name.
"""

from dsnt_export.workflow.loading import (
    EMBEDDED_ID,
    LoadedModel,
    calibration_ids,
    check_device_map,
    load_model_for,
    load_skeleton_for,
)
from dsnt_export.workflow.pipeline import (
    ONNX_LEVELS,
    STAGES,
    RunState,
    RunSummary,
    Stage,
    default_run_dir,
    run_recipe,
)
from dsnt_export.workflow.pruning import (
    PruneResult,
    SavedCheckpoint,
    check_out_dir,
    prune_recipe,
    prune_streamed,
    prune_to_dir,
    resolve_save_dtype,
    save_dtype_of,
    validate_checkpoint,
    write_checkpoint,
)

__all__ = [
    "EMBEDDED_ID",
    "ONNX_LEVELS",
    "STAGES",
    "LoadedModel",
    "PruneResult",
    "RunState",
    "RunSummary",
    "SavedCheckpoint",
    "Stage",
    "calibration_ids",
    "check_device_map",
    "check_out_dir",
    "default_run_dir",
    "load_model_for",
    "load_skeleton_for",
    "prune_recipe",
    "prune_streamed",
    "prune_to_dir",
    "resolve_save_dtype",
    "run_recipe",
    "save_dtype_of",
    "validate_checkpoint",
    "write_checkpoint",
]
