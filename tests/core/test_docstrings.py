"""Every public function, class and method of ``dsnt_export`` and ``converters`` has a docstring.

Public = defined in that module (not imported into it), name without a leading underscore; methods
and properties count when the class itself defines them (inherited ones are checked where they are
defined). A module that cannot be imported here (an optional dependency missing) is skipped by
name in the failure message, not silently.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import defaultdict

PACKAGES = ("dsnt_export", "converters")


def iter_modules(packages=PACKAGES):
    """Names of every module of ``packages`` (the packages themselves included), sorted."""
    names = []
    for pkg_name in packages:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            names.append(info.name)
    return sorted(names)


def _has_doc(obj) -> bool:
    """A non-empty docstring, the inherited one counting (an override keeps its base's contract)."""
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) and obj.fget else obj)
    return bool(doc and doc.strip())


def _members(cls):
    """(name, raw object) of the public methods and properties ``cls`` itself defines."""
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            raw = raw.__func__
        if inspect.isfunction(raw) or isinstance(raw, property):
            yield name, raw


def _dataclass_generated_doc(cls) -> bool:
    """``@dataclass`` writes ``Name(field: type, ...)`` as the docstring of an undocumented class."""
    doc = cls.__doc__ or ""
    return bool(getattr(cls, "__dataclass_fields__", None)) and doc.startswith(f"{cls.__name__}(")


def undocumented(packages=PACKAGES) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``({module: [qualified names without a docstring]}, {module: import error})``."""
    missing: dict[str, list[str]] = defaultdict(list)
    errors: dict[str, str] = {}
    for mod_name in iter_modules(packages):
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 - optional dependencies (tensorrt, vllm, ...)
            errors[mod_name] = f"{type(e).__name__}: {e}"
            continue
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue
            if inspect.isclass(obj):
                own = vars(obj).get("__doc__")  # a class's docstring is not inherited here
                if not (own and own.strip()) or _dataclass_generated_doc(obj):
                    missing[mod_name].append(name)
                for meth, _raw in _members(obj):
                    if not _has_doc(inspect.getattr_static(obj, meth)) and not _has_doc(
                        getattr(obj, meth, None)
                    ):
                        missing[mod_name].append(f"{name}.{meth}")
            elif inspect.isfunction(obj) and not _has_doc(obj):
                missing[mod_name].append(name)
    return dict(missing), errors


def _format(missing: dict[str, list[str]]) -> str:
    return "\n".join(f"{mod}: {', '.join(names)}" for mod, names in sorted(missing.items()))


def test_the_walk_finds_the_packages_modules():
    """The walk itself works: it sees modules of every package, and this file's helpers."""
    names = iter_modules()
    assert "dsnt_export.patterns" in names and "converters" in names
    missing, _ = undocumented(())
    assert missing == {}


def test_the_check_finds_an_undocumented_function(tmp_path, monkeypatch):
    """The check can fail: a module with one undocumented function and method is reported."""
    pkg = tmp_path / "docprobe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Probe."""\n')
    (pkg / "mod.py").write_text(
        '"""Probe module."""\n'
        "def documented():\n    '''Yes.'''\n"
        "def bare():\n    pass\n"
        "class Thing:\n    '''A thing.'''\n    def run(self):\n        pass\n"
        "    def _private(self):\n        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    missing, errors = undocumented(("docprobe",))
    assert errors == {}
    assert missing == {"docprobe.mod": ["bare", "Thing.run"]}


def test_every_public_name_has_a_docstring():
    missing, errors = undocumented()
    count = sum(len(v) for v in missing.values())
    assert not missing, f"{count} public names without a docstring:\n{_format(missing)}" + (
        f"\nmodules not importable here: {errors}" if errors else ""
    )
