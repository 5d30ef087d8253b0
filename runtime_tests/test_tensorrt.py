"""TensorRT: the engines deserialize and run; logits/perplexity match the FP16 reference;
the report says which layers run sparse (needs tensorrt + a CUDA GPU)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trt_device(artifact, runtime_device):
    artifact.require("tensorrt")
    pytest.importorskip(
        "tensorrt", reason="tensorrt not installed (pip install 'dsnt-export[tensorrt]')"
    )
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT engines need one")
    return runtime_device or "cuda"


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_tensorrt_engine_matches_reference(artifact, reference, trt_device, kind):
    from converters.parity import ParityCheck, compare_reference
    from converters.writers.tensorrt import TensorRTConverter
    from dsnt_export.runtimes.tensorrt import TrtEngine

    tol = TensorRTConverter.tolerance["float16"]
    check = ParityCheck(f"tensorrt {kind} engine")
    with TrtEngine(artifact.path / f"model.{kind}.plan", kind, trt_device) as engine:
        compare_reference(check, kind, engine, tol, reference)
    check.raise_if_failed()


def test_tensorrt_report_has_eligible_layers(artifact):
    artifact.require("tensorrt")
    from converters.checkers.tensorrt import check_tensorrt

    report = check_tensorrt(artifact.path)
    assert report.ok, "\n".join(report.summary_lines())
