"""PyTorch eager (transformers): the HF checkpoint loads, keeps its zeros, matches the reference."""

from __future__ import annotations

import numpy as np
import pytest

from runtime_tests.conftest import dump

TOL = {"float32": (1e-5, 1e-4), "float16": (2e-2, 1e-2), "bfloat16": (5e-2, 2e-2)}
GPU_TOL = {"float32": (1e-3, 1e-3), "float16": (3e-2, 2e-2), "bfloat16": (8e-2, 3e-2)}


@pytest.fixture(scope="session")
def loaded(artifact, runtime_device):
    """The model, loaded by transformers itself (an independent loader) unless the checkpoint
    is in the legacy sparse-24-bitmask layout, which only dsnt-export's unpacker still reads."""
    artifact.require("hf")
    from converters.source import read_source

    src = read_source(artifact.path)
    device = runtime_device or "cpu"
    if src.packed:
        model = src.load_model(device=device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(artifact.path).to(device).eval()
    return src, model, device


def _tag(reference) -> str:
    tags = [k.split(".", 1)[1] for k in reference if k.startswith("logits.")]
    assert len(tags) == 1, f"expected one reference dtype, found {tags}"
    return tags[0]


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


def test_torch_logits_match_reference(loaded, reference):
    import torch

    from converters.parity import ParityCheck, Tolerance
    from converters.reference import torch_logits

    _, model, device = loaded
    tag = _tag(reference)
    atol, prel = (TOL if device == "cpu" else GPU_TOL)[tag]
    check = ParityCheck(f"torch on {device}")
    with torch.no_grad():
        got = torch_logits(model, reference["input_ids"])
    check.compare("logits", got, reference[f"logits.{tag}"], Tolerance(atol, prel))
    check.raise_if_failed()


def test_torch_perplexity_matches_reference(loaded, reference):
    from converters.parity import ParityCheck, Tolerance
    from converters.runtime_lm import windows_ppl

    _, model, device = loaded
    tag = _tag(reference)
    atol, prel = (TOL if device == "cpu" else GPU_TOL)[tag]
    check = ParityCheck(f"torch on {device}")
    got = windows_ppl(model, reference["ppl_ids"])
    check.compare_ppl("perplexity", got, float(reference[f"ppl.{tag}"]), Tolerance(atol, prel))
    check.raise_if_failed()
    assert np.isfinite(got)
