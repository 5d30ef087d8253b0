"""The project documents in docs/ resolve what the code cites, and the module map is complete."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CODE_DIRS = ("dsnt_export", "converters", "runtime_tests", "benchmarks", "tests")
PACKAGES = ("dsnt_export", "converters")

_DOC_REF = re.compile(r"docs/([A-Za-z0-9_-]+\.md)")
_SPEC_REF = re.compile(r"spec,? sections? (\d+)(?:\s*(?:-|–|and)\s*(\d+))?", re.IGNORECASE)
_SECTION = re.compile(r"^## (\d+)\.", re.MULTILINE)


def _sources():
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            if path != Path(__file__).resolve():  # this file cites broken examples on purpose
                yield path, path.read_text(encoding="utf-8")


def spec_sections() -> set[int]:
    """Numbers of the ``## N.`` sections of docs/dsnot-spec.md."""
    return {int(n) for n in _SECTION.findall((DOCS / "dsnot-spec.md").read_text(encoding="utf-8"))}


def unresolved_citations(sources, sections: set[int], docs_dir: Path = DOCS) -> list[str]:
    """``path:line: citation`` for every docs/ page or spec section the sources cite that is absent."""
    bad = []
    for path, text in sources:
        for lineno, line in enumerate(text.splitlines(), 1):
            for page in _DOC_REF.findall(line):
                if not (docs_dir / page).is_file():
                    bad.append(f"{path}:{lineno}: docs/{page}")
            for first, last in _SPEC_REF.findall(line):
                wanted = range(int(first), int(last or first) + 1)
                missing = [n for n in wanted if n not in sections]
                if missing:
                    bad.append(f"{path}:{lineno}: spec section(s) {missing}")
    return bad


def test_every_cited_document_and_spec_section_exists():
    assert (DOCS / "dsnot-spec.md").is_file()
    bad = unresolved_citations(_sources(), spec_sections())
    assert not bad, "citations that do not resolve in docs/:\n" + "\n".join(bad)


def test_a_broken_citation_is_reported(tmp_path):
    src = [(Path("x.py"), "# see docs/nowhere.md\n# as in spec sections 2-9\n# spec section 1\n")]
    bad = unresolved_citations(src, {1, 2, 3}, docs_dir=tmp_path)
    assert bad == ["x.py:1: docs/nowhere.md", "x.py:2: spec section(s) [4, 5, 6, 7, 8, 9]"]


def modules_missing_from(doc: str) -> list[str]:
    """Module files of :data:`PACKAGES` that the architecture page does not name.

    A module counts as named when its path appears (``dsnt_export/masks.py``), or its file name
    appears in backticks on a line that names a sibling by path (``..../hf.py``, ``onnx.py``), or
    its folder is described as a whole (``dsnt_export/commands/<name>.py``). Package
    ``__init__.py`` files count only if they define a function or class.
    """
    named: set[str] = set()
    for line in doc.splitlines():
        paths = re.findall(r"`((?:[\w]+/)+)([\w<>]+\.py)`", line)
        for folder, name in paths:
            named.add(folder + name)
        for folder in {f for f, _ in paths}:
            for name in re.findall(r"`([\w]+\.py)`", line):
                named.add(folder + name)
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            folder = rel.rsplit("/", 1)[0] + "/"
            if rel in named or folder + "<name>.py" in named:
                continue
            if path.name == "__init__.py" and not _has_code(path):
                continue
            missing.append(rel)
    return missing


def _has_code(path: Path) -> bool:
    import ast

    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in body)


def test_architecture_page_names_every_module():
    doc = (DOCS / "architecture.md").read_text(encoding="utf-8")
    missing = modules_missing_from(doc)
    assert not missing, "add a one-line entry to docs/architecture.md for: " + ", ".join(missing)
