"""Calibration and evaluation token sources.

Sources (a name, optionally followed by ``:NSAMPLESxSEQLEN``, e.g. ``c4:128x2048``):

``stdlib-docs``  docstrings of the running interpreter's standard library (read at run time)
``stdlib-code``  the source code of the same modules
``stdlib-topics`` evaluation only: the language reference / library manual prose shipped for
                 ``help()`` (``pydoc_data/topics.py``), never calibrated or tuned on
``c4``           allenai/c4, English shards the reference uses (needs ``datasets`` and network)
``wikitext2``    wikitext-2-raw-v1 (needs ``datasets`` and network)
``file:PATH``    a local UTF-8 ``.txt`` file (one text) or ``.jsonl`` file (a ``"text"`` per line);
                 a plain existing path works too

The two stdlib corpora need no network. Each module (file) is one document and goes wholly into
the calibration part (~90%) or the evaluation part (~10%) by a hash of its path, so evaluation
text never overlaps calibration text, and the split does not depend on filesystem order.

Calibration follows the reference (DSnoT/Wanda ``get_c4``): with ``random.Random(seed)``, pick a
random document, keep it if it has more than ``seqlen`` tokens, take a random window of it.
Stream sources (WikiText-2 train, a .txt file) are tokenized once and windows are cut at random
offsets. Evaluation joins the evaluation documents with ``"\\n\\n"`` and tokenizes once (the
WikiText-2 protocol). Every function returns token ids plus a JSON-able description.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsnt_export.errors import DataSourceError, MissingDependencyError, UserInputError, require
from dsnt_export.stdlib_corpus import STDLIB_SOURCES, TOPICS_SOURCE, stdlib_part, topics_part

logger = logging.getLogger(__name__)

HUB_SOURCES = ("c4", "wikitext2")
KNOWN_SOURCES = STDLIB_SOURCES + (TOPICS_SOURCE,) + HUB_SOURCES
OFFLINE_ALTERNATIVES = (
    "offline alternatives: 'stdlib-docs' (docstrings of the Python standard library), "
    "'stdlib-code' (its source code), or a local file 'file:PATH.txt' (plain text) / "
    "'file:PATH.jsonl' (one JSON object with a \"text\" field per line)"
)
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_C4_EVAL_DOCS = 1100


@dataclass(frozen=True)
class DataSpec:
    """A parsed data source string such as ``c4:128x2048`` or ``stdlib-docs``."""

    source: str
    nsamples: int | None = None
    seqlen: int | None = None

    def __str__(self) -> str:
        if self.nsamples is None:
            return self.source
        return f"{self.source}:{self.nsamples}x{self.seqlen}"


def parse_data_spec(spec: str) -> DataSpec:
    """Parse ``SOURCE[:NSAMPLESxSEQLEN]``; the source itself is checked when it is loaded."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"empty data source {spec!r}; expected e.g. 'stdlib-docs:32x256'")
    spec = spec.strip()
    m = re.fullmatch(r"(.+):(\d+)x(\d+)", spec)
    if not m:
        return DataSpec(spec)
    nsamples, seqlen = int(m.group(2)), int(m.group(3))
    if nsamples <= 0 or seqlen <= 1:
        raise UserInputError(
            f"data spec {spec!r} asks for {nsamples} samples of {seqlen} tokens; "
            "both must be positive (seqlen at least 2), e.g. 'c4:128x2048'"
        )
    return DataSpec(m.group(1), nsamples, seqlen)


@dataclass(frozen=True)
class Corpus:
    """One part (calibration or evaluation) of a source, as documents of text."""

    source: str
    split: str
    documents: Sequence[str]
    stream: bool = False  # calibration: join (with `joiner`) and cut windows at random offsets
    joiner: str = "\n\n"
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- sources


def stdlib_corpus(kind: str, part: str, root: str | os.PathLike | None = None) -> Corpus:
    """The calibration or evaluation part of ``stdlib-docs`` / ``stdlib-code``."""
    documents, info = stdlib_part(kind, part, root)
    return Corpus(kind, part, documents, info=info)


def topics_corpus(part: str, root: str | os.PathLike | None = None) -> Corpus:
    """The evaluation-only ``stdlib-topics`` text (:func:`dsnt_export.stdlib_corpus.topics_part`).

    Raises :class:`DataSourceError` for the calibration part or when the file is missing."""
    documents, info = topics_part(part, root)
    return Corpus(TOPICS_SOURCE, part, documents, info=info)


def check_data_backend(spec: str | DataSpec) -> None:
    """Fail fast, before any model is loaded, when the data source ``spec`` is unknown, names a
    missing file, or needs a package that is not installed (``c4`` / ``wikitext2`` need
    ``datasets``): raises :class:`DataSourceError` saying what was expected (the known sources,
    the extra to install, the offline alternatives). A file's content is checked when it is
    read."""
    source = (spec if isinstance(spec, DataSpec) else parse_data_spec(spec)).source
    kind, arg = resolve_source(source)
    if kind == "hub":
        _require_datasets(arg)
    elif kind == "file":
        _data_file(arg)


def _require_datasets(source: str):
    try:
        return require("datasets", "data", f"the {source} data source")
    except MissingDependencyError as e:
        raise DataSourceError(f"{e}. Or use one of the {OFFLINE_ALTERNATIVES}.") from e


def _load_hub(source: str, purpose: str, **kwargs: Any):
    datasets = _require_datasets(source)
    try:
        return datasets.load_dataset(**kwargs)
    except Exception as e:  # network, hub and cache failures come in many types; chained below
        raise DataSourceError(
            f"could not load the {source} {purpose} data ({type(e).__name__}: {e}); it needs "
            f"network access to the Hugging Face hub or a local datasets cache. "
            f"Use one of the {OFFLINE_ALTERNATIVES}."
        ) from e


def hub_corpus(source: str, part: str) -> Corpus:
    """C4 or WikiText-2 through ``datasets`` (the reference's shards and splits)."""
    calib = part == "calibration"
    if source == "c4":
        split = "train" if calib else "validation"
        ds = _load_hub(
            "c4", split, path="allenai/c4", data_files={split: _C4_FILES[split]}, split=split
        )
        texts = list(ds["text"] if calib else ds[:_C4_EVAL_DOCS]["text"])
        info = {"dataset": "allenai/c4", "data_file": _C4_FILES[split]}
        if calib:
            return Corpus("c4", split, texts, info=info)
        info["eval_documents"] = f"first {_C4_EVAL_DOCS} joined with ' '"
        return Corpus("c4", split, texts, joiner=" ", info=info)
    if source == "wikitext2":
        split = "train" if calib else "test"
        ds = _load_hub(
            "wikitext2", split, path="Salesforce/wikitext", name="wikitext-2-raw-v1", split=split
        )
        info = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1"}
        return Corpus(
            "wikitext2",
            split,
            list(ds["text"]),
            stream=True,
            joiner=" " if calib else "\n\n",
            info=info,
        )
    raise UserInputError(f"unknown hub source {source!r}; expected one of {HUB_SOURCES}")


def _data_file(path: str | os.PathLike) -> Path:
    """``path`` as an existing file's Path; raises :class:`DataSourceError` when it is not one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataSourceError(f"data file {p} does not exist; expected a .txt or .jsonl file")
    return p


def file_corpus(path: str | os.PathLike) -> Corpus:
    """A local .txt (one stream of text) or .jsonl file (one document per line, field "text")."""
    p = _data_file(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataSourceError(f"data file {p} is not UTF-8 text ({e})") from e
    info = {"path": str(p.resolve()), "sha256": hashlib.sha256(raw.encode()).hexdigest()}
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        if not raw.strip():
            raise DataSourceError(f"data file {p} is empty")
        return Corpus(f"file:{p}", "all", [raw], stream=True, info=info)
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{p}:{lineno} is not valid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataSourceError(
                f'{p}:{lineno} has no string field "text"; expected lines like {{"text": "..."}}'
            )
        texts.append(obj["text"])
    if not texts:
        raise DataSourceError(f"data file {p} holds no documents")
    return Corpus(f"file:{p}", "all", texts, info=info)


def resolve_source(source: str) -> tuple[str, str]:
    """``(kind, argument)`` of a data source name: ``("stdlib", name)``, ``("topics", name)``,
    ``("hub", "c4" | "wikitext2")``, or ``("file", path)`` for ``file:PATH`` or an existing
    file's path. Raises :class:`DataSourceError` for anything else, listing what is accepted."""
    name = source.strip()
    key = name.lower().replace("-", "").replace("_", "")
    if name in STDLIB_SOURCES:
        return "stdlib", name
    if name == TOPICS_SOURCE:
        return "topics", name
    if key in HUB_SOURCES:
        return "hub", key
    if name.startswith("file:"):
        return "file", name[len("file:") :]
    if Path(name).expanduser().is_file():
        return "file", name
    raise DataSourceError(
        f"unknown data source {source!r}: expected one of {', '.join(KNOWN_SOURCES)}, or a "
        f"text file as 'file:PATH' ({OFFLINE_ALTERNATIVES})."
    )


def load_corpus(source: str, part: str) -> Corpus:
    """Resolve a source name (:func:`resolve_source`) to its calibration or evaluation part."""
    if part not in ("calibration", "evaluation"):
        raise UserInputError(f"part must be 'calibration' or 'evaluation', got {part!r}")
    kind, arg = resolve_source(source)
    if kind == "stdlib":
        return stdlib_corpus(arg, part)
    if kind == "topics":
        return topics_corpus(part)
    if kind == "hub":
        return hub_corpus(arg, part)
    return file_corpus(arg)


# ---------------------------------------------------------------- tokens


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens (as the reference).

    Raises :class:`DataSourceError` when non-blank text gives no token at all (a tokenizer that
    does not fit the text: every later step would fail with a misleading "too short")."""
    kwargs = {"verbose": False} if type(tokenizer).__module__.startswith("transformers") else {}
    out = tokenizer(text, **kwargs)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    if not ids and text.strip():
        raise DataSourceError(
            f"the tokenizer {_tokenizer_name(tokenizer)} ({type(tokenizer).__name__}) turned "
            f"{len(text)} characters of text into 0 tokens: it does not fit the text, or it is "
            "not the tokenizer its files describe (transformers picks the tokenizer class from "
            "config.json's model_type for some models). Check the checkpoint's tokenizer.json "
            "and tokenizer_config.json"
        )
    return ids


def tokens_hash(tokens: torch.Tensor) -> str:
    """SHA-256 hex digest of the token ids of ``tokens`` (any shape, any integer dtype; cast to
    int64, C order): two token tensors hash equal exactly when they hold the same ids in the same
    order and total size. Recorded with calibration and evaluation data in manifests."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _sample_documents(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int):
    rng = random.Random(seed)
    docs, cache, rows, misses = corpus.documents, {}, [], 0
    checked = False
    while len(rows) < nsamples:
        i = rng.randint(0, len(docs) - 1)
        if i not in cache:
            cache[i] = encode(tokenizer, docs[i])
        ids = cache[i]
        if len(ids) > seqlen:
            j = rng.randint(0, len(ids) - seqlen - 1)
            rows.append(ids[j : j + seqlen])
            continue
        misses += 1
        if not checked and misses > 10 * len(docs) + 100:
            checked = True
            if not any(
                len(cache.setdefault(k, encode(tokenizer, d))) > seqlen for k, d in enumerate(docs)
            ):
                raise DataSourceError(
                    f"no document of {corpus.source} ({corpus.split}) has more than {seqlen} "
                    f"tokens; use a shorter seqlen or a source with longer documents"
                )
    return rows


def _sample_stream(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int):
    ids = encode(tokenizer, corpus.joiner.join(corpus.documents))
    if len(ids) <= seqlen:
        raise DataSourceError(
            f"{corpus.source} ({corpus.split}) has only {len(ids)} tokens; need more than "
            f"seqlen={seqlen}. Use a shorter seqlen or more text."
        )
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        j = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[j : j + seqlen])
    return rows


def get_calibration(
    source: str, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """``nsamples`` random windows of ``seqlen`` tokens: (LongTensor[nsamples, seqlen], desc)."""
    if int(nsamples) <= 0 or int(seqlen) <= 1:
        raise UserInputError(
            f"calibration needs nsamples > 0 and seqlen > 1, got nsamples={nsamples}, "
            f"seqlen={seqlen}; e.g. 128 x 2048 (reference) or 32 x 256 (embedded model on CPU)"
        )
    corpus = load_corpus(source, "calibration")
    sampler = _sample_stream if corpus.stream else _sample_documents
    rows = sampler(corpus, tokenizer, int(nsamples), int(seqlen), int(seed))
    tokens = torch.tensor(rows, dtype=torch.long)
    desc = {
        "source": corpus.source,
        "split": corpus.split,
        "nsamples": int(nsamples),
        "seqlen": int(seqlen),
        "n_tokens": int(tokens.numel()),
        "seed": int(seed),
        "hash": tokens_hash(tokens),
        "tokenizer": _tokenizer_name(tokenizer),
        "sampling": "random window of the joined text"
        if corpus.stream
        else "random document longer than seqlen, random window",
        **corpus.info,
    }
    return tokens, desc


def get_eval_tokens(
    source: str, tokenizer: Any, *, max_tokens: int | None = None
) -> tuple[torch.Tensor, dict]:
    """The evaluation text joined as in the WikiText-2 protocol, tokenized once: ([1, N], desc)."""
    corpus = load_corpus(source, "evaluation")
    ids = encode(tokenizer, corpus.joiner.join(corpus.documents))
    total = len(ids)
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    tokens = torch.tensor([ids], dtype=torch.long)
    desc = {
        "source": corpus.source,
        "split": corpus.split,
        "nsamples": None,
        "seqlen": None,
        "n_tokens": len(ids),
        "n_tokens_total": total,
        "seed": None,
        "hash": tokens_hash(tokens),
        "tokenizer": _tokenizer_name(tokenizer),
        "join": corpus.joiner,
        **corpus.info,
    }
    return tokens, desc
