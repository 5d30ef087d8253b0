"""Eager-torch reference outputs stored inside an artifact, so parity can be re-checked anywhere.

``dsnt_reference.npz`` holds the token ids used for parity and perplexity (random ids: these are
parity numbers, not a quality measure) and the logits/perplexity of the eager torch model in
float32 (the artifact's weights upcast; fp16 CPU kernels are slow and fp32 is the truth every
runtime is compared with, at its dtype's tolerance), computed at export time; ``pytest runtime_tests --artifact DIR`` compares each
runtime on the user's machine against them. It is an ``.npz`` on purpose: vLLM loads every
``*.safetensors`` file of an unindexed checkpoint directory as weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converters.parity import parity_ids
from dsnt_export.errors import ArtifactError

REFERENCE_NAME = "dsnt_reference.npz"
PARITY_SHAPE = (1, 32)
PPL_SHAPE = (4, 64)


def reference_ids(vocab_size: int) -> dict[str, np.ndarray]:
    """The stored parity ids: ``input_ids`` ``PARITY_SHAPE`` (seed 0) and ``ppl_ids``
    ``PPL_SHAPE`` (seed 1), int64 numpy."""
    return {
        "input_ids": parity_ids(
            vocab_size, batch=PARITY_SHAPE[0], seqlen=PARITY_SHAPE[1], seed=0
        ).numpy(),
        "ppl_ids": parity_ids(vocab_size, batch=PPL_SHAPE[0], seqlen=PPL_SHAPE[1], seed=1).numpy(),
    }


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    """Eager logits ``[B, T, V]`` float32 numpy of ``ids [B, T]`` (the torch engine's ``logits``)."""
    from dsnt_export.runtimes.torch_eager import TorchEngine

    return TorchEngine(model, "reference").logits(torch.as_tensor(ids)).cpu().numpy()


def compute_reference(model) -> dict[str, np.ndarray]:
    """``input_ids``, ``logits`` [1, 32, V], ``ppl_ids`` [4, 64], ``ppl`` of a float32 model.

    Raises ValueError if the model is not float32.
    """
    from dsnt_export.evaluation.perplexity import windows_perplexity
    from dsnt_export.runtimes.torch_eager import TorchEngine

    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("reference outputs are computed in float32; upcast the model first")
    ids = reference_ids(model.config.vocab_size)
    engine = TorchEngine(model, "reference")
    return {
        **ids,
        "logits": engine.logits(torch.as_tensor(ids["input_ids"])).cpu().numpy(),
        "ppl": np.array(windows_perplexity(engine, torch.as_tensor(ids["ppl_ids"]))),
    }


def save_reference(directory: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``directory/dsnt_reference.npz``; returns the path."""
    path = Path(directory) / REFERENCE_NAME
    np.savez(path, **arrays)
    return path


def load_reference(directory: str | Path) -> dict[str, np.ndarray]:
    """The arrays of ``directory/dsnt_reference.npz``; ArtifactError if absent or corrupt."""
    path = Path(directory) / REFERENCE_NAME
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise ArtifactError(
            f"{path} not found; this artifact has no stored reference outputs "
            "(re-export it with dsnt-export export)"
        ) from e
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path} ({e}); the file is corrupt") from e
