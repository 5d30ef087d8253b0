"""Calibration / evaluation data: stdlib corpus, local files, hub sources (offline, monkeypatched)."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

from dsnt_export import data
from dsnt_export import stdlib_corpus as sc
from dsnt_export.errors import DataSourceError, MissingDependencyError, UserInputError


class ByteTok:
    """1 token per UTF-8 byte, no special tokens (plain callable returning a mapping)."""

    name_or_path = "bytes"

    def __call__(self, text):
        return {"input_ids": list(text.encode("utf-8"))}


TOK = ByteTok()


# ------------------------------------------------------------------------ spec strings


def test_parse_data_spec():
    assert data.parse_data_spec("c4:128x2048") == data.DataSpec("c4", 128, 2048)
    assert data.parse_data_spec(" stdlib-docs ") == data.DataSpec("stdlib-docs")
    s = data.parse_data_spec("file:/a:b/c.jsonl:4x16")
    assert (s.source, s.nsamples, s.seqlen) == ("file:/a:b/c.jsonl", 4, 16)
    assert str(s) == "file:/a:b/c.jsonl:4x16"
    for bad in ("", "c4:0x2048", "c4:8x1"):
        with pytest.raises(UserInputError):
            data.parse_data_spec(bad)


# ------------------------------------------------------------------------ a fake stdlib


MODULE = '''"""Module {i} docstring."""

import sys


def f{i}():
    """Function f{i} says hello {pad}."""
    return 1


if sys.platform:
    class C{i}:
        """Class C{i}."""

        def m(self):
            """Method m of C{i}."""
            x = "not a docstring"
            return x
'''


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    monkeypatch.setenv("DSNT_EXPORT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "lib"
    for i in range(60):
        p = root / ("pkg" if i % 3 == 0 else "") / f"m{i:03d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(MODULE.format(i=i, pad="x" * (i * 5)))
    for excluded in (
        "test/test_a.py",
        "site-packages/s.py",
        "pkg/tests/t.py",
        "test_top.py",
        "encodings/cp1.py",
        "__pycache__/c.py",
    ):
        p = root / excluded
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('"""EXCLUDED"""\n')
    sc.stdlib_documents.cache_clear()
    yield root
    sc.stdlib_documents.cache_clear()


def test_stdlib_docstrings_in_source_order(fake_stdlib):
    docs = dict(sc.stdlib_documents("stdlib-docs", str(fake_stdlib)))
    assert len(docs) == 60 and not any("EXCLUDED" in t for t in docs.values())
    assert docs["m001.py"] == (
        f"Module 1 docstring.\n\nFunction f1 says hello {'x' * 5}.\n\nClass C1.\n\nMethod m of C1."
    )
    code = dict(sc.stdlib_documents("stdlib-code", str(fake_stdlib)))
    assert code["pkg/m000.py"] == (fake_stdlib / "pkg/m000.py").read_text()


def test_stdlib_split_disjoint_and_deterministic(fake_stdlib, monkeypatch):
    calib, _ = sc.stdlib_part("stdlib-docs", "calibration", fake_stdlib)
    evals, info = sc.stdlib_part("stdlib-docs", "evaluation", fake_stdlib)
    assert len(calib) + len(evals) == 60 and evals and calib
    assert not set(calib) & set(evals)
    assert info["n_documents"] == len(evals) and info["python"]
    # a filesystem that lists in another order gives the same corpus and hash
    real_walk = os.walk

    def reversed_walk(top):
        for d, dirs, files in real_walk(top):
            dirs.reverse()
            yield d, dirs, files[::-1]

    sc.stdlib_documents.cache_clear()
    monkeypatch.setattr(sc.os, "walk", reversed_walk)
    evals2, info2 = sc.stdlib_part("stdlib-docs", "evaluation", fake_stdlib)
    assert evals2 == evals and info2["corpus_sha256"] == info["corpus_sha256"]


def test_is_eval_module_fraction():
    names = [f"pkg{i}/mod{i}.py" for i in range(2000)]
    frac = sum(map(sc.is_eval_module, names)) / len(names)
    assert 0.07 < frac < 0.13
    assert sc.is_eval_module("json/decoder.py") == sc.is_eval_module("json/decoder.py")


def test_docstring_disk_cache(fake_stdlib, tmp_path, monkeypatch):
    first = sc.stdlib_documents("stdlib-docs", str(fake_stdlib))
    files = list((tmp_path / "cache" / "stdlib").glob("stdlib-docs-*.json"))
    assert len(files) == 1
    sc.stdlib_documents.cache_clear()

    def no_parse(_src):
        raise AssertionError("parsed although cached")

    monkeypatch.setattr(sc, "docstrings", no_parse)
    assert sc.stdlib_documents("stdlib-docs", str(fake_stdlib)) == first
    # a changed file is parsed again
    monkeypatch.undo()
    monkeypatch.setenv("DSNT_EXPORT_CACHE", str(tmp_path / "cache"))
    (fake_stdlib / "m001.py").write_text('"""Changed, and longer than before."""\n')
    sc.stdlib_documents.cache_clear()
    docs = dict(sc.stdlib_documents("stdlib-docs", str(fake_stdlib)))
    assert docs["m001.py"] == "Changed, and longer than before."


def test_missing_stdlib_dir(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        sc.stdlib_part("stdlib-docs", "calibration", tmp_path / "nope")


# ------------------------------------------------------------------------ the real stdlib


@pytest.fixture(scope="module")
def real_docs():
    calib = data.load_corpus("stdlib-docs", "calibration")
    evals = data.load_corpus("stdlib-docs", "evaluation")
    return calib, evals


def test_real_stdlib_docs_calibration(real_docs):
    calib, evals = real_docs
    assert len(calib.documents) > 100 and len(evals.documents) > 5
    assert not set(calib.documents) & set(evals.documents)
    x, desc = data.get_calibration("stdlib-docs", TOK, 8, 128, seed=0)
    assert x.shape == (8, 128) and x.dtype == torch.long
    assert desc["source"] == "stdlib-docs" and desc["split"] == "calibration"
    assert (desc["nsamples"], desc["seqlen"], desc["n_tokens"], desc["seed"]) == (8, 128, 1024, 0)
    cal_bytes = [d.encode() for d in calib.documents]
    ev_bytes = [d.encode() for d in evals.documents]
    for row in x.tolist():  # every window is a piece of one calibration document, of no eval one
        w = bytes(row)
        assert any(w in d for d in cal_bytes) and not any(w in d for d in ev_bytes)
    again, desc2 = data.get_calibration("stdlib-docs", TOK, 8, 128, seed=0)
    assert torch.equal(x, again) and desc2["hash"] == desc["hash"]
    other, desc3 = data.get_calibration("stdlib-docs", TOK, 8, 128, seed=1)
    assert not torch.equal(x, other) and desc3["hash"] != desc["hash"]
    json.dumps(desc)


def test_real_stdlib_eval_tokens(real_docs):
    _, evals = real_docs
    y, desc = data.get_eval_tokens("stdlib-docs", TOK)
    assert y.shape[0] == 1 and bytes(y[0].tolist()) == "\n\n".join(evals.documents).encode()
    assert desc["n_tokens"] == y.shape[1] and desc["split"] == "evaluation"
    assert desc["join"] == "\n\n" and desc["n_documents"] == len(evals.documents)
    y2, desc2 = data.get_eval_tokens("stdlib-docs", TOK, max_tokens=1000)
    assert y2.shape == (1, 1000) and torch.equal(y2[0], y[0, :1000])
    assert desc2["n_tokens_total"] == y.shape[1]


def test_real_stdlib_code():
    x, desc = data.get_calibration("stdlib-code", TOK, 4, 64, seed=5)
    assert x.shape == (4, 64) and desc["source"] == "stdlib-code"
    text = bytes(x[0].tolist())
    assert any(k in text for k in (b" ", b"\n"))  # looks like text, not padding


# ------------------------------------------------------------------------ local files


def test_jsonl_documents_sampling(tmp_path):
    p = tmp_path / "d.jsonl"
    long_doc = "".join(chr(97 + i % 26) for i in range(300))
    p.write_text("\n".join(json.dumps({"text": t}) for t in ("short", long_doc, "tiny")) + "\n")
    x, desc = data.get_calibration(f"file:{p}", TOK, 6, 50, seed=2)
    assert x.shape == (6, 50)
    for row in x.tolist():  # only the long document can give windows
        assert bytes(row).decode() in long_doc
    # the reference's sampling: random document until one is long enough, then a random offset
    rng, rows = random.Random(2), []
    while len(rows) < 6:
        i = rng.randint(0, 2)
        if i == 1:
            j = rng.randint(0, 300 - 50 - 1)
            rows.append(list(long_doc[j : j + 50].encode()))
    assert x.tolist() == rows
    assert desc["source"] == f"file:{p}" and len(desc["sha256"]) == 64
    with pytest.raises(DataSourceError, match="more than 400 tokens"):
        data.get_calibration(str(p), TOK, 2, 400)


def test_txt_stream_and_eval(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world. " * 50)
    x, _ = data.get_calibration(str(p), TOK, 3, 20, seed=0)
    assert x.shape == (3, 20)
    y, desc = data.get_eval_tokens(f"file:{p}", TOK)
    assert y.shape == (1, 650) and desc["split"] == "all"
    with pytest.raises(DataSourceError, match="only 650 tokens"):
        data.get_calibration(str(p), TOK, 1, 650)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{bad json\n", r":1 is not valid JSON"),
        ('{"txt": "x"}\n', 'no string field "text"'),
        ("\n\n", "no documents"),
    ],
)
def test_bad_jsonl(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataSourceError, match=match):
        data.get_eval_tokens(f"file:{p}", TOK)


def test_unknown_and_missing_sources(tmp_path):
    with pytest.raises(DataSourceError, match="stdlib-docs"):
        data.get_eval_tokens("pile", TOK)
    with pytest.raises(DataSourceError, match="does not exist"):
        data.get_eval_tokens(f"file:{tmp_path / 'none.txt'}", TOK)
    with pytest.raises(UserInputError, match="nsamples"):
        data.get_calibration("stdlib-docs", TOK, 0, 16)


def test_hf_fast_tokenizer_is_supported():
    from tests.evaluation.test_perplexity import byte_tokenizer

    tok = byte_tokenizer()
    assert data.encode(tok, "héllo") == tok("héllo")["input_ids"]
    assert len(data.encode(tok, "héllo")) == len("héllo".encode())


# ------------------------------------------------------------------------ hub sources, offline


class FakeDS:
    def __init__(self, texts):
        self.texts = texts

    def __getitem__(self, key):
        if key == "text":
            return list(self.texts)
        if isinstance(key, slice):
            return {"text": self.texts[key]}
        raise KeyError(key)


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_missing_datasets_package(monkeypatch, source):
    def missing(pkg, extra=None, purpose=""):
        raise MissingDependencyError(pkg, extra, purpose)

    monkeypatch.setattr(data, "require", missing)
    with pytest.raises(DataSourceError, match="stdlib-docs.*stdlib-code.*file:"):
        data.get_calibration(source, TOK, 2, 16)


@pytest.mark.parametrize("loader", ["load_model_for", "load_skeleton_for"])
def test_missing_datasets_fails_before_the_model_is_read(monkeypatch, loader):
    """A hub calibration source without ``datasets`` is refused before any config or weight is
    read (a new-user trial saw the model load first, then the refusal); offline sources pass."""
    from dsnt_export.recipe import Recipe
    from dsnt_export.workflow import loading

    def missing(pkg, extra=None, purpose=""):
        raise MissingDependencyError(pkg, extra, purpose)

    def no_model(*a, **k):
        raise AssertionError("the model source was resolved before the data source was checked")

    monkeypatch.setattr(data, "require", missing)
    monkeypatch.setattr(loading, "resolve_model_source", no_model)
    with pytest.raises(DataSourceError, match=r"dsnt-export\[data\].*offline alternatives"):
        getattr(loading, loader)(Recipe(calib="c4:4x32"))
    data.check_data_backend("stdlib-docs:4x32")  # offline: nothing to check here
    with pytest.raises(AssertionError, match="resolved before"):
        getattr(loading, loader)(Recipe(calib="stdlib-docs:4x32"))


@pytest.mark.parametrize("loader", ["load_model_for", "load_skeleton_for"])
@pytest.mark.parametrize(
    ("calib", "match"),
    [
        ("nosuchsource:8x16", r"unknown data source 'nosuchsource'.*stdlib-docs.*file:PATH"),
        ("file:/no/such/file.txt:8x16", r"data file /no/such/file.txt does not exist"),
    ],
)
def test_unknown_or_missing_source_fails_before_the_model_is_read(
    monkeypatch, loader, calib, match
):
    """An unknown source name or a missing data file is refused before the model is touched (a
    new-user trial waited for the weights to load first)."""
    from dsnt_export.recipe import Recipe
    from dsnt_export.workflow import loading

    def no_model(*a, **k):
        raise AssertionError("the model source was resolved before the data source was checked")

    monkeypatch.setattr(loading, "resolve_model_source", no_model)
    with pytest.raises(DataSourceError, match=match):
        getattr(loading, loader)(Recipe(calib=calib))


def test_resolve_source_kinds(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert data.resolve_source("stdlib-docs") == ("stdlib", "stdlib-docs")
    assert data.resolve_source("stdlib-topics") == ("topics", "stdlib-topics")
    assert data.resolve_source("WikiText-2") == ("hub", "wikitext2")
    assert data.resolve_source(f"file:{f}") == ("file", str(f))
    assert data.resolve_source(str(f)) == ("file", str(f))
    with pytest.raises(DataSourceError, match="expected one of"):
        data.resolve_source("nope")


def test_network_failure(monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", offline, raising=False)
    with pytest.raises(DataSourceError, match="ConnectionError.*offline alternatives") as e:
        data.get_eval_tokens("wikitext2", TOK)
    assert isinstance(e.value.__cause__, ConnectionError)


def test_hub_protocols_with_fake_datasets(monkeypatch):
    calls = []
    texts = [f"doc {i} " + "w" * (i * 10) for i in range(1200)]

    def load_dataset(**kwargs):
        calls.append(kwargs)
        return FakeDS(texts)

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    y, desc = data.get_eval_tokens("wikitext2", TOK)
    assert bytes(y[0].tolist()).decode() == "\n\n".join(texts)
    assert calls[-1] == {
        "path": "Salesforce/wikitext",
        "name": "wikitext-2-raw-v1",
        "split": "test",
    }
    y, desc = data.get_eval_tokens("c4", TOK)  # the reference's first 1100 documents, ' '-joined
    assert bytes(y[0].tolist()).decode() == " ".join(texts[:1100])
    assert calls[-1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    x, desc = data.get_calibration("c4", TOK, 4, 100, seed=0)
    assert x.shape == (4, 100) and desc["split"] == "train"
    assert calls[-1]["path"] == "allenai/c4" and calls[-1]["split"] == "train"
    x, desc = data.get_calibration("wikitext-2", TOK, 4, 100, seed=0)
    assert desc["source"] == "wikitext2" and desc["sampling"].startswith("random window")


def test_tokenizer_that_gives_no_tokens_is_named(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("some text " * 50)

    def empty(text, **kw):  # a tokenizer that does not fit the text
        return {"input_ids": []}

    with pytest.raises(DataSourceError, match="into 0 tokens"):
        data.get_eval_tokens(f"file:{p}", empty)
    with pytest.raises(DataSourceError, match="into 0 tokens"):
        data.get_calibration(f"file:{p}", empty, 2, 8)
    assert data.encode(empty, "   \n") == []  # blank text: nothing to tokenize, no error
