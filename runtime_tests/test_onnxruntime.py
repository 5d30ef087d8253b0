"""ONNX Runtime: every exported graph loads, and its logits and perplexity match the reference."""

from __future__ import annotations

import pytest

PROMPT = 8  # prefill this many reference tokens, decode the rest one at a time


@pytest.fixture(scope="session")
def ort():
    return pytest.importorskip("onnxruntime", reason="onnxruntime not installed")


def _providers(ort, runtime_device):
    if runtime_device and runtime_device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("CUDAExecutionProvider not available (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def test_onnxruntime_graphs_match_reference(artifact, reference, ort, runtime_device):
    """Collects every graph's mismatches, then fails once with the per-output max difference."""
    artifact.require("onnx", "tensorrt")
    from converters.parity import ParityCheck, compare_generation, compare_reference
    from converters.writers.onnx import GRAPH_FILES, OnnxConverter
    from dsnt_export.runtimes.onnxruntime import OrtEngine

    providers = _providers(ort, runtime_device)
    check = ParityCheck(f"onnxruntime ({providers[0]})")
    graphs = artifact.graphs
    assert graphs, "the manifest lists no ONNX graphs"
    for rel, g in sorted(graphs.items()):
        dt, kind = g["dtype"], g["kind"]
        ref_logits = reference["logits"]  # eager torch, float32
        tol = OnnxConverter.tolerance[dt]
        ids = reference["input_ids"]
        if kind == "logits":
            with OrtEngine({"logits": artifact.path / rel}, providers=providers, dtype=dt) as eng:
                compare_reference(check, rel, eng, tol, reference)
        elif kind == "prefill":
            decode = rel.replace(GRAPH_FILES["prefill"], GRAPH_FILES["decode"])
            pair = {"prefill": artifact.path / rel, "decode": artifact.path / decode}
            with OrtEngine(pair, providers=providers, dtype=dt) as eng:
                compare_generation(
                    check,
                    f"{rel}+decode",
                    eng,
                    tol,
                    ids=ids,
                    want_logits=ref_logits[:, PROMPT - 1 :],
                    prompt_len=PROMPT,
                )
    check.raise_if_failed()
