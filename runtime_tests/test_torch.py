"""PyTorch eager (transformers): the HF checkpoint loads, keeps its zeros, matches the reference.

The model is loaded in float32 (the stored weights upcast), as the reference was computed, so on
CPU the comparison is tight; on a GPU (``--runtime-device cuda``) kernels differ and the bound is
looser.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime_tests.conftest import dump

CPU_TOL = (1e-5, 1e-4)  # (logits atol scaled by max|logit|, perplexity relative)
GPU_TOL = (1e-3, 1e-3)


@pytest.fixture(scope="session")
def loaded(artifact, runtime_device):
    """The model, loaded by transformers itself (an independent loader) unless the checkpoint
    is in the legacy sparse-24-bitmask layout, which only dsnt-export's unpacker still reads."""
    artifact.require("hf")
    import torch

    from converters.common.source import read_source

    src = read_source(artifact.path)
    device = runtime_device or "cpu"
    if src.packed:
        model = src.load_model(dtype=torch.float32, device=device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(artifact.path, dtype=torch.float32)
        model = model.to(device).eval()
    return src, model, device


def _tol(device: str):
    from converters.parity import Tolerance

    return Tolerance(*(CPU_TOL if device == "cpu" else GPU_TOL))


def test_torch_load_keeps_the_pattern(loaded):
    from dsnt_export.masks import validate_mask

    src, model, _ = loaded
    state = model.state_dict()
    bad = {}
    for name in src.targets:
        rep = validate_mask(state[name].detach().cpu(), src.pattern, name=name)
        if not rep.ok:
            bad[name] = rep.message
    assert not bad, dump(bad)


def test_torch_logits_and_perplexity_match_reference(loaded, reference):
    """The torch engine (the runtime layer's eager runtime) against the stored reference."""
    from converters.parity import ParityCheck, compare_reference
    from dsnt_export.runtimes.torch_eager import TorchEngine

    _, model, device = loaded
    check = ParityCheck(f"torch on {device}")
    compare_reference(check, "torch", TorchEngine(model, "sparse"), _tol(device), reference)
    check.raise_if_failed()
    assert np.isfinite(check.rows["torch:perplexity"]["ppl_runtime"])
