"""pytest plugin of the runtime test suite: ``pytest runtime_tests --artifact DIR [--artifact DIR2]``.

Each test runs once per artifact directory written by ``dsnt-export export`` (hf, onnx or
tensorrt; a pruned checkpoint from ``dsnt-export prune`` counts as hf). Tests for a runtime that is
not installed here, or for another artifact kind, are skipped with the reason. From an installed
package: ``pytest --pyargs runtime_tests --artifact DIR``.

Options:
    --artifact DIR        artifact to test (repeatable; required, otherwise everything skips)
    --runtime-device DEV  device for torch / vLLM / TensorRT runs (default: cpu for torch,
                          cuda for TensorRT and vLLM)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsnt-export runtime tests")
    group.addoption(
        "--artifact",
        action="append",
        default=[],
        metavar="DIR",
        help="artifact directory written by dsnt-export (repeatable)",
    )
    group.addoption(
        "--runtime-device",
        default=None,
        metavar="DEV",
        help="device for torch/vLLM/TensorRT (default: cpu for torch, cuda otherwise)",
    )


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "unknown")

    @property
    def export(self) -> dict:
        return self.manifest.get("extra", {}).get("export", {}) or {}

    @property
    def graphs(self) -> dict:
        return self.manifest.get("extra", {}).get("graphs", {}) or {}

    def require(self, *kinds: str) -> None:
        if self.kind not in kinds:
            pytest.skip(f"{self.path} is a {self.kind} artifact; this test needs {'/'.join(kinds)}")

    def __str__(self) -> str:  # shown in test ids
        return self.path.name


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "artifact_dir" in metafunc.fixturenames:
        dirs = metafunc.config.getoption("artifact") or [None]
        ids = [Path(d).name if d else "no-artifact" for d in dirs]
        metafunc.parametrize("artifact_dir", dirs, ids=ids, scope="session")


@pytest.fixture(scope="session")
def artifact(artifact_dir) -> Artifact:
    if artifact_dir is None:
        pytest.skip("no artifact given: run `pytest runtime_tests --artifact DIR`")
    from dsnt_export.artifacts import read_manifest
    from dsnt_export.errors import ArtifactError

    p = Path(artifact_dir)
    if not p.is_dir():
        pytest.fail(f"--artifact {p}: not a directory")
    try:
        man = read_manifest(p)
    except ArtifactError as e:
        pytest.fail(f"--artifact {p}: {e}")
    return Artifact(p, man)


@pytest.fixture(scope="session")
def reference(artifact):
    from converters.reference import load_reference
    from dsnt_export.errors import ArtifactError

    try:
        return load_reference(artifact.path)
    except ArtifactError as e:
        pytest.skip(f"{e}")


@pytest.fixture(scope="session")
def runtime_device(request) -> str | None:
    return request.config.getoption("runtime_device")


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:2000]
