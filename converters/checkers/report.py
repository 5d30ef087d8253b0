"""The result of ``dsnt-export check``: findings, per-tensor reports, JSON and JUnit output.

Exit codes (:attr:`CheckReport.exit_code`):
    0  every check holds
    1  a violation: pattern broken in a tensor, tensor missing or reshaped/transposed, sparsity or
       file hash differing from the manifest, a config current vLLM refuses, ...
    2  unreadable or bad input: path missing, not an artifact, truncated/corrupt file
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

VIOLATION = "violation"
UNREADABLE = "unreadable"
WARNING = "warning"
SEVERITIES = (UNREADABLE, VIOLATION, WARNING)


@dataclass(frozen=True)
class Finding:
    """One problem (or warning) found in an artifact: how bad, what kind, about what."""

    severity: str  # "violation" | "unreadable" | "warning"
    code: str  # short machine-readable kind, e.g. "mask", "missing-tensor", "sha256"
    subject: str  # the tensor, file or config key concerned
    message: str

    def to_json(self) -> dict[str, str]:
        """``{"severity", "code", "subject", "message"}``."""
        return {
            "severity": self.severity,
            "code": self.code,
            "subject": self.subject,
            "message": self.message,
        }


@dataclass
class CheckReport:
    """Everything one check found: per-tensor entries (``tensors``: the mask report of each
    checked weight) and findings; :attr:`exit_code` is the CLI's (see the module)."""

    path: str
    kind: str  # "hf" | "safetensors" | "onnx" | "tensorrt" | "unknown"
    pattern: str | None = None  # the pattern checked against
    pattern_source: str | None = None  # "--pattern" | "manifest" | "config" | "default"
    derived_pattern: str | None = None  # the weakest N:M found in the target tensors
    tensors: dict[str, dict] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, severity: str, code: str, subject: str, message: str) -> None:
        """Record a finding; ``severity`` is one of :data:`SEVERITIES`."""
        assert severity in SEVERITIES, severity
        self.findings.append(Finding(severity, code, subject, message))

    @property
    def violations(self) -> list[Finding]:
        """The findings of severity ``violation``."""
        return [f for f in self.findings if f.severity == VIOLATION]

    @property
    def unreadable(self) -> list[Finding]:
        """The findings of severity ``unreadable`` (bad input)."""
        return [f for f in self.findings if f.severity == UNREADABLE]

    @property
    def ok(self) -> bool:
        """True when no finding is a violation or unreadable (warnings allowed)."""
        return not self.violations and not self.unreadable

    @property
    def exit_code(self) -> int:
        """2 if anything was unreadable, else 1 if a violation was found, else 0."""
        if self.unreadable:
            return 2
        return 1 if self.violations else 0

    def to_json(self) -> dict[str, Any]:
        """The whole report as JSON-able data (what ``check --json`` prints)."""
        return {
            "path": self.path,
            "kind": self.kind,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "pattern": self.pattern,
            "pattern_source": self.pattern_source,
            "derived_pattern": self.derived_pattern,
            "n_tensors": len(self.tensors),
            "n_violations": len(self.violations),
            "findings": [f.to_json() for f in self.findings],
            "tensors": self.tensors,
            "info": self.info,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines: the verdict, the pattern and each non-warning finding."""
        status = "OK" if self.ok else ("UNREADABLE" if self.unreadable else "FAILED")
        what = f"{self.kind} artifact " if self.kind != "unknown" else ""
        lines = [f"{status}: {what}{self.path}"]
        if self.pattern is not None or self.tensors:  # nothing was read: the findings say why
            lines.append(
                f"  pattern {self.pattern} (from {self.pattern_source}); derived from tensors: "
                f"{self.derived_pattern}; {len(self.tensors)} tensors checked"
            )
        for f in self.findings:
            lines.append(f"  [{f.severity}] {f.code} {f.subject}: {f.message}")
        return lines

    def write_junit(self, path: str | Path) -> None:
        """One JUnit testsuite: a testcase per tensor plus one per non-tensor subject."""
        by_subject: dict[str, list[Finding]] = {}
        for f in self.findings:
            by_subject.setdefault(f.subject, []).append(f)
        subjects = list(self.tensors) + [s for s in by_subject if s not in self.tensors]
        if not subjects:
            subjects = ["artifact"]
        suite = ET.Element("testsuite", name="dsnt-export check", tests=str(len(subjects)))
        n_fail = n_err = 0
        for s in subjects:
            case = ET.SubElement(suite, "testcase", classname=f"{self.kind}:{self.path}", name=s)
            for f in by_subject.get(s, []):
                if f.severity == UNREADABLE:
                    ET.SubElement(case, "error", type=f.code, message=f.message).text = f.message
                    n_err += 1
                elif f.severity == VIOLATION:
                    ET.SubElement(case, "failure", type=f.code, message=f.message).text = f.message
                    n_fail += 1
                else:
                    ET.SubElement(case, "system-out").text = f"warning {f.code}: {f.message}"
        suite.set("failures", str(n_fail))
        suite.set("errors", str(n_err))
        root = ET.Element("testsuites")
        root.append(suite)
        ET.ElementTree(root).write(str(path), encoding="utf-8", xml_declaration=True)

    def dumps(self) -> str:
        """:meth:`to_json` as indented JSON text."""
        return json.dumps(self.to_json(), indent=2, default=str)
