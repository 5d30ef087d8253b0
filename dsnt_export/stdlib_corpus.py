"""A text corpus every machine has offline: the running interpreter's own standard library.

``stdlib-docs`` is the docstrings (module, class and function, via :mod:`ast`, in source order)
of each module; ``stdlib-code`` is each module's source. The text is read at run time from the
local installation, never copied into the project. Tests, site-packages, generated tables
(encodings, pydoc_data, _sysconfigdata) and demos are left out.

Each module (file) is one document and belongs wholly to the calibration part (~90%) or to the
evaluation part (~10%), decided by a hash of its relative path: the parts never overlap, and
neither the split nor the order depends on the filesystem. The text differs between Python
versions, so descriptions record the version and a hash of the text.

Parsing the whole library with :mod:`ast` takes several seconds, so the extracted docstrings are
kept in the user cache (``stdlib-docs-<python>-<hash>.json``), validated per file by size and
modification time; a cache that cannot be written is skipped.

``stdlib-topics`` is a third, evaluation-only text: the English prose of the Python language
reference and library manual that every CPython installation ships for ``help()``
(``pydoc_data/topics.py``, a generated dict of topic name -> text). The two sources above skip
``pydoc_data`` entirely, so no calibration window can come from it; and because nothing reads it for
calibration (asking for its calibration part raises), no hyper-parameter can be tuned on it by
accident: it is the held-out text for quality claims (issue 16).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import logging
import os
import sys
import sysconfig
import tokenize as pytokenize
from pathlib import Path

from dsnt_export.errors import DataSourceError, UserInputError

logger = logging.getLogger(__name__)

STDLIB_SOURCES = ("stdlib-docs", "stdlib-code")
TOPICS_SOURCE = "stdlib-topics"
TOPICS_FILE = "pydoc_data/topics.py"
EVAL_PERCENT = 10
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "lib-dynload",
        "pydoc_data",
        "encodings",
        "turtledemo",
        "__phello__",
        "ensurepip",
    }
)
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def stdlib_dir() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_eval_module(relpath: str) -> bool:
    """Deterministic ~10% evaluation split by a hash of the module's relative (posix) path.

    True when the first 8 bytes of sha256(``relpath``) modulo 100 fall below
    :data:`EVAL_PERCENT`: the same on every machine and filesystem.
    """
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT


def stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every module in the corpus, sorted by relative path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith(("test_", "_sysconfigdata")):
                continue
            path = Path(dirpath) / name
            out.append((path.relative_to(root).as_posix(), path))
    out.sort()
    return out


def read_source(path: Path) -> str | None:
    """A module's source, decoded as Python does (PEP 263 coding cookie); None if undecodable."""
    raw = path.read_bytes()
    try:
        encoding, _ = pytokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        logger.debug("skipping undecodable stdlib file %s", path)
        return None


def _defs(stmts: list) -> list:
    """Class/function definitions among ``stmts`` and every nested statement block."""
    found = []
    for node in stmts:
        if isinstance(node, _DEF_NODES):
            found.append(node)
        for name in _BLOCK_FIELDS:
            block = getattr(node, name, None)
            if isinstance(block, list):
                found.extend(_defs(block))
    return found


def docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of ``source`` in source order (cleaned)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = [(0, ast.get_docstring(tree, clean=True))]
    found += [(n.lineno, ast.get_docstring(n, clean=True)) for n in _defs(tree.body)]
    found.sort(key=lambda t: t[0])
    return [d.strip() for _, d in found if d and d.strip()]


def _cache_file(root: Path) -> Path:
    from dsnt_export.embedded import cache_root

    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    version = ".".join(map(str, sys.version_info[:3]))
    return cache_root() / "stdlib" / f"stdlib-docs-{version}-{tag}.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, entries: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("cannot write the stdlib docstring cache %s: %s", path, e)
        tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=4)
def stdlib_documents(kind: str, root: str) -> tuple[tuple[str, str], ...]:
    """(relative path, text) per module with non-empty text, sorted by path; cached.

    ``kind``: ``"stdlib-docs"`` (the module's docstrings joined by blank lines, kept in the user
    cache between runs) or ``"stdlib-code"`` (the source). ``root``: the standard library
    directory as a string (hashable for the in-process cache). Raises
    :class:`~dsnt_export.errors.UserInputError` for another ``kind``.
    """
    if kind not in STDLIB_SOURCES:
        raise UserInputError(f"unknown stdlib corpus {kind!r}; expected one of {STDLIB_SOURCES}")
    root_path = Path(root)
    cache_path = _cache_file(root_path) if kind == "stdlib-docs" else None
    cache = _load_cache(cache_path) if cache_path else {}
    fresh, docs = {}, []
    for rel, path in stdlib_files(root_path):
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns]
        hit = cache.get(rel)
        if kind == "stdlib-docs" and isinstance(hit, list) and hit[:2] == key:
            text = hit[2]
        else:
            src = read_source(path)
            if src is None:
                continue
            text = "\n\n".join(docstrings(src)) if kind == "stdlib-docs" else src
        fresh[rel] = [*key, text]
        if text.strip():
            docs.append((rel, text))
    if cache_path is not None and fresh != cache:
        _save_cache(cache_path, fresh)
    return tuple(docs)


def stdlib_part(kind: str, part: str, root: str | os.PathLike | None = None) -> tuple[list, dict]:
    """Documents of the calibration or evaluation part, and a description of them.

    ``part``: ``"evaluation"`` (the ~10% of modules :func:`is_eval_module` picks) or anything
    else for calibration (the rest). ``root`` defaults to :func:`stdlib_dir`. Returns
    ``(texts, info)``: one string per module, sorted by path, and ``{"python", "stdlib_dir",
    "n_documents", "corpus_sha256"}`` (sha256 over paths and texts, to tell corpora apart).
    Raises :class:`~dsnt_export.errors.DataSourceError` if ``root`` is not a directory or the part
    is empty, :class:`~dsnt_export.errors.UserInputError` for an unknown ``kind``.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise DataSourceError(
            f"the Python standard library directory {root} does not exist (zipped or stripped "
            "installation?); use c4, wikitext2 or a local file instead"
        )
    want_eval = part == "evaluation"
    docs = [(r, t) for r, t in stdlib_documents(kind, str(root)) if is_eval_module(r) == want_eval]
    if not docs:
        raise DataSourceError(f"no {kind} text found under {root} for the {part} part")
    h = hashlib.sha256()
    for rel, text in docs:
        h.update(rel.encode() + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
    info = {
        "python": sys.version.split()[0],
        "stdlib_dir": str(root),
        "n_documents": len(docs),
        "corpus_sha256": h.hexdigest(),
    }
    return [t for _, t in docs], info


def topics_documents(root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(topic name, text) of ``pydoc_data/topics.py`` under ``root``, sorted by topic name.

    The file is parsed with :mod:`ast` (never imported or executed) and its ``topics = {...}``
    literal evaluated with :func:`ast.literal_eval`. ``root`` defaults to :func:`stdlib_dir`.
    Raises :class:`~dsnt_export.errors.DataSourceError` if the file is missing, unreadable or has
    no ``topics`` dict of strings (some distributions strip ``pydoc_data``).
    """
    root = Path(root) if root is not None else stdlib_dir()
    path = root / TOPICS_FILE
    how_to_fix = (
        "use stdlib-docs, stdlib-code or a local file 'file:PATH' as evaluation text instead"
    )
    src = read_source(path) if path.is_file() else None
    if src is None:
        raise DataSourceError(
            f"the pydoc topics file {path} is missing or unreadable; {how_to_fix}"
        )
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError) as e:
        raise DataSourceError(f"cannot parse {path} ({e}); {how_to_fix}") from e
    topics = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            try:
                topics = ast.literal_eval(node.value)
            except ValueError:
                topics = None
    if not isinstance(topics, dict) or not topics:
        raise DataSourceError(f"{path} holds no 'topics' dict literal; {how_to_fix}")
    docs = sorted((str(k), v) for k, v in topics.items() if isinstance(v, str) and v.strip())
    if not docs:
        raise DataSourceError(f"{path} holds no topic text; {how_to_fix}")
    return docs


def topics_part(part: str, root: str | os.PathLike | None = None) -> tuple[list, dict]:
    """The evaluation text of ``stdlib-topics``: one string per topic (sorted by name), and info.

    ``part`` must be ``"evaluation"``: the source is evaluation-only, so that it stays a text on
    which nothing was calibrated or tuned. Returns ``(texts, info)`` with ``info`` as in
    :func:`stdlib_part` plus ``"file"``. Raises :class:`~dsnt_export.errors.DataSourceError` for the
    calibration part or a missing file (:func:`topics_documents`).
    """
    if part != "evaluation":
        raise DataSourceError(
            f"{TOPICS_SOURCE} is an evaluation-only text (the held-out text of quality claims) and "
            f"has no {part} part; calibrate on stdlib-docs, stdlib-code, c4, wikitext2 or a local "
            "file instead"
        )
    root = Path(root) if root is not None else stdlib_dir()
    docs = topics_documents(root)
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
    info = {
        "python": sys.version.split()[0],
        "stdlib_dir": str(root),
        "file": TOPICS_FILE,
        "n_documents": len(docs),
        "corpus_sha256": h.hexdigest(),
    }
    return [t for _, t in docs], info
