"""Any runtime: the artifact is intact and its sparsity pattern holds in the stored tensors."""

from __future__ import annotations

from runtime_tests.conftest import dump


def test_manifest_and_files(artifact):
    """The manifest's file hashes match what is on disk (nothing truncated or modified)."""
    from converters.checkers.common import check_files
    from converters.checkers.report import CheckReport

    report = CheckReport(str(artifact.path), artifact.kind)
    check_files(report, artifact.path, artifact.manifest)
    assert not report.violations, dump([f.to_json() for f in report.violations])
    assert artifact.manifest.get("pattern", {}).get("string"), "manifest records no pattern"


def test_mask_in_stored_tensors(artifact):
    """`dsnt-export check` passes: pattern re-derived from the tensors, vLLM config contract."""
    from converters.checkers import check_path

    report = check_path(artifact.path)
    assert report.ok, "\n".join(report.summary_lines())
    assert report.tensors, "no targeted tensor found"
    assert report.derived_pattern not in (None, "dense")


def test_reference_outputs_present(artifact, reference):
    missing = {"input_ids", "logits", "ppl_ids", "ppl"} - set(reference)
    assert not missing, f"dsnt_reference.npz lacks {sorted(missing)}"
    assert reference["logits"].shape[:2] == reference["input_ids"].shape
