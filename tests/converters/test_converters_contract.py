"""The converter contract: registry, atomic output, collected parity mismatches, mask re-check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from converters import MODULES, Converter, ExportResult, Tolerance, converter_names, get_converter
from converters.parity import ParityCheck
from dsnt_export.artifacts import new_manifest, read_manifest
from dsnt_export.errors import MaskViolationError, ParityError, UserInputError


class FakeConverter(Converter):
    """Writes one file; its parity and mask results are set by the test."""

    name = "fake"
    tolerance = {"float32": Tolerance(1e-3, 1e-3)}

    def __init__(self, diffs: dict[str, float], mask_ok: bool = True):
        self.diffs, self.mask_ok = diffs, mask_ok

    def write(self, src: Path, tmp: Path, result: ExportResult, **opts) -> dict:
        (tmp / "artifact.bin").write_bytes(b"x" * 10)
        result.notes.append("fake note")
        return new_manifest("hf", pattern={"string": "2:4"}, tensors={})

    def check_masks(self, tmp: Path, manifest: dict) -> dict[str, dict]:
        assert (tmp / "artifact.bin").exists()  # re-validated in the written directory
        return {"w": {"ok": self.mask_ok, "message": "w: 1 of 8 groups keep more than 2"}}

    def parity(self, src, tmp, manifest, check: ParityCheck, **opts) -> None:
        ref = np.zeros((2, 3), np.float32)
        for name, d in self.diffs.items():
            check.compare(name, ref + d, ref, self.tolerance["float32"])


def no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_successful_export_writes_manifest_with_parity(tmp_path):
    res = FakeConverter({"logits": 1e-5}).export(tmp_path, tmp_path / "out")
    assert res.out_dir == tmp_path / "out" and res.files == ["artifact.bin"]
    man = read_manifest(tmp_path / "out")
    assert man["extra"]["parity"]["logits"]["ok"] and man["files"]["artifact.bin"]["bytes"] == 10
    assert set(res.timings) == {"write_s", "mask_check_s", "parity_s"}
    assert res.summary()["notes"] == ["fake note"]


def test_parity_failure_collects_all_outputs_and_leaves_nothing(tmp_path):
    conv = FakeConverter({"logits": 0.5, "decode": 0.25, "fine": 0.0})
    with pytest.raises(ParityError) as ei:
        conv.export(tmp_path, tmp_path / "out")
    err = ei.value
    assert err.max_abs_diff == {"logits": 0.5, "decode": 0.25}
    assert "2 of 3 outputs differ" in str(err)
    assert "logits: max |diff| 0.5" in str(err) and "decode: max |diff| 0.25" in str(err)
    assert not (tmp_path / "out").exists() and no_temp_dirs(tmp_path)


def test_mask_failure_in_written_artifact_leaves_nothing(tmp_path):
    with pytest.raises(MaskViolationError, match="does not hold in the written artifact"):
        FakeConverter({"logits": 0.0}, mask_ok=False).export(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_temp_dirs(tmp_path)


def test_no_parity_option_skips_the_run(tmp_path):
    res = FakeConverter({"logits": 9.0}).export(tmp_path, tmp_path / "out", check_parity=False)
    assert res.parity == {} and (tmp_path / "out" / "artifact.bin").exists()


def test_registry():
    assert converter_names() == ["hf", "onnx", "tensorrt"] == sorted(MODULES)
    for name in converter_names():
        conv = get_converter(name)
        assert conv.name == name and conv.tolerance and isinstance(conv.extras, tuple)
    assert get_converter("tensorrt").extras == ("tensorrt",)
    with pytest.raises(UserInputError, match="known targets: hf, onnx, tensorrt"):
        get_converter("vllm-plugin")


def test_parity_check_rows():
    tol = Tolerance(1e-3, 1e-3)
    c = ParityCheck("x")
    assert c.compare("a", np.ones((2, 2)), np.ones((2, 2)), tol)["ok"]
    big = np.full((1, 2), 100.0)
    assert c.compare("scaled", big + 0.05, big, tol)["ok"]  # bound = 1e-3 * max(1, |100|)
    assert not c.compare("shape", np.ones((2, 3)), np.ones((3, 2)), tol)["ok"]
    assert "shape" in c.rows["shape"]["error"]
    nan = np.ones((2, 2))
    nan[0, 0] = np.nan
    assert not c.compare("nan", nan, np.ones((2, 2)), tol)["ok"]
    assert c.compare_ppl("ppl", 10.005, 10.0, tol)["ok"]
    assert not c.compare_ppl("ppl2", 10.02, 10.0, tol)["ok"]
    c.fail("missing", "graph not found")
    with pytest.raises(ParityError) as ei:
        c.raise_if_failed()
    assert set(ei.value.max_abs_diff) == {"shape", "nan", "ppl2", "missing"}
    assert math.isinf(ei.value.max_abs_diff["missing"])


def test_logits_perplexity_matches_the_project_protocol():
    import math

    import torch

    from dsnt_export.evaluation.perplexity import logits_perplexity

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 17, generator=g)
    ids = torch.randint(0, 17, (3, 10), generator=g)
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    naive = math.exp(-float(logp.gather(-1, ids[:, 1:, None]).mean()))
    assert logits_perplexity(logits, ids) == pytest.approx(naive, rel=1e-6)


def test_source_manifest_fields_carry_over_the_source_manifest():
    """``SparseSource.manifest_fields``: the source manifest's keys (tensors copied, not shared),
    and the fallbacks for a checkpoint without a manifest."""
    from converters.common.source import SparseSource
    from dsnt_export.patterns import parse_pattern

    tensors = {"w": {"layout": "out_in", "sparsity": 0.5}}
    sm = {"source_model": {"id": "m"}, "recipe": {"a": 1}, "tensors": tensors, "skipped": [1]}
    src = SparseSource(Path("d"), {"model_type": "llama"}, sm, parse_pattern("2:4"), [], [], None)
    got = src.manifest_fields()
    assert got["source_model"] == {"id": "m"} and got["recipe"] == {"a": 1}
    assert got["tensors"] == tensors and got["tensors"]["w"] is not tensors["w"]
    assert got["skipped"] == [1] and got["calibration"] == {} and got["timings"] == {}
    assert got["pattern"] == parse_pattern("2:4").to_json()
    bare = SparseSource(
        Path("d"), {"model_type": "llama"}, None, parse_pattern("2:4"), [], [], None
    )
    assert bare.manifest_fields()["source_model"] == {"id": "d", "model_type": "llama"}
    assert bare.manifest_fields()["tensors"] == {} and bare.manifest_fields()["recipe"] == {}
