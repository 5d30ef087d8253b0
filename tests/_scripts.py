"""Load a script of ``benchmarks/`` (not a package) as a module, for the tests of its logic."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

#: the repository root
ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, monkeypatch=None) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as the module ``name`` and return it.

    With ``monkeypatch`` (pytest's fixture) the module is also put into ``sys.modules`` under
    ``name`` before it runs (and taken out again after the test), for scripts whose dataclasses
    or pickling look themselves up there.
    """
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        import sys

        monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    return mod
