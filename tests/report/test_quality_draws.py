"""benchmarks/quality_table.py calibration draws: spread arithmetic, paired differences, the
draws table (golden), and a whole run on a tiny model (rows per draw, three evaluation texts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsnt_export.data import tokens_hash
from dsnt_export.refine import RefitConfig
from tests._scripts import load_script
from tests.tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def qt():
    return load_script("quality_table")


def _row(config, draw, docs, code, topics):
    ev = {"stdlib-docs": docs, "stdlib-code": code, "stdlib-topics": topics}
    return {
        "config": config,
        "pattern": "2:4",
        "calib": "stdlib-docs",
        "draw": draw,
        "prune_s": 1.0,
        "calibration": {"nsamples": 64, "seqlen": 256},
        "eval": {k: {"ppl": v} for k, v in ev.items()},
    }


def test_spread_golden(qt):
    st = qt.spread([1.0, 2.0, 4.0])
    assert st["n"] == 3 and st["mean"] == pytest.approx(7 / 3)
    # sample std: sqrt(((-4/3)^2 + (-1/3)^2 + (5/3)^2) / 2) = sqrt(7/3)
    assert st["std"] == pytest.approx(math.sqrt(7 / 3))
    assert (st["min"], st["max"]) == (1.0, 4.0)
    assert qt.spread([5.0])["std"] is None
    with pytest.raises(ValueError):
        qt.spread([])


def test_is_gain(qt):
    assert qt.is_gain(qt.spread([-3.0, -4.0, -5.0]))  # mean -4, std 1
    assert not qt.is_gain(qt.spread([-1.0, -10.0]))  # every draw better, but mean -5.5 < std 6.4
    assert not qt.is_gain(qt.spread([-6.0, 0.5, -6.0]))  # one draw worse
    assert not qt.is_gain(qt.spread([-6.0]))  # one draw says nothing


def test_paired_changes_use_the_same_draw(qt):
    base = {0: _row("sparsegpt", 0, 40, 20, 10), 1: _row("sparsegpt", 1, 50, 25, 12)}
    cfg = {0: _row("x", 0, 36, 21, 9), 1: _row("x", 1, 45, 25, 12), 2: _row("x", 2, 1, 1, 1)}
    ch = qt.paired_changes(cfg, base, "stdlib-docs")
    assert ch == pytest.approx([-10.0, -10.0])  # draw 2 has no base: left out
    assert qt.paired_changes(cfg, base, "stdlib-code") == pytest.approx([5.0, 0.0])


def test_draws_markdown_golden(qt):
    rows = [
        {
            "config": "dense",
            "pattern": "dense",
            "calib": None,
            "prune_s": 0.0,
            "eval": {
                "stdlib-docs": {"ppl": 20.0},
                "stdlib-code": {"ppl": 10.0},
                "stdlib-topics": {"ppl": 15.0},
            },
        },
        _row("sparsegpt", 0, 40.0, 20.0, 30.0),
        _row("sparsegpt", 1, 44.0, 22.0, 30.0),
        _row("sparsegpt+dsnot(default)", 0, 36.0, 20.2, 30.0),
        _row("sparsegpt+dsnot(default)", 1, 39.6, 21.78, 31.5),
        _row("old-single", None, 1.0, 1.0, 1.0),  # no draw: not in this table
    ]
    md = qt.draws_markdown(rows)
    assert "calibrated on docstrings (64 x 256 windows), draws [0, 1]" in md
    assert "| configuration | draws | ppl docstrings | ppl code | ppl manual |" in md
    assert "| dense | — | 20.00 | 10.00 | 15.00 |  |  |  |" in md
    # sparsegpt docs: 40, 44 -> mean 42, sample std 2.83; no change against itself
    assert "| sparsegpt | 2 | 42.00 ± 2.83 (40.00..44.00) | 21.00 ± 1.41 (20.00..22.00) |" in md
    # default vs sparsegpt: docs -10 %, -10 % (gain: every draw, |mean| > std 0);
    # code +1 %, -1 % (no gain); manual 0 %, +5 %
    line = next(x for x in md.splitlines() if x.startswith("| sparsegpt+dsnot(default) |"))
    assert "**-10.0 ± 0.0 % (-10.0..-10.0) gain**" in line
    assert (
        "+0.0 ± 1.4 % (-1.0..+1.0) |" in line and "gain** |" not in line.split("-10.0) gain**")[1]
    )
    assert "+2.5 ± 3.5 % (+0.0..+5.0)" in line
    assert "old-single" not in md


def test_tiny_run_rows_per_draw(qt, tmp_path, monkeypatch):
    class ByteTok:
        name_or_path = "bytes"

        def __call__(self, text, **_):
            return {"input_ids": list(text.encode("utf-8"))}

    dense = tiny_model("llama", vocab=VOCAB, max_positions=64)
    monkeypatch.setattr(qt, "load_embedded", lambda: (dense, ByteTok()))
    peer_calls = []

    def fake_peer(method, ids, pattern, **kw):
        peer_calls.append((method, ids.clone(), pattern))
        return {k: v.clone() for k, v in dense.state_dict().items()}, {
            "status": "ok",
            "seconds": 1.0,
        }

    monkeypatch.setattr(qt, "run_peer", fake_peer)
    out = tmp_path / "rows.jsonl"
    configs = "dense,sparsegpt,sparsegpt+dsnot(default),sparsegpt+refit,llmcompressor-sparsegpt"
    rc = qt.main(
        [
            "--configs",
            configs,
            "--draws",
            "2",
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--eval-windows",
            "2",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["config"], r.get("draw")) for r in rows] == [("dense", None)] + [
        (c, d) for d in (0, 1) for c in configs.split(",")[1:]
    ]
    for r in rows:
        assert set(r["eval"]) == {"stdlib-docs", "stdlib-code", "stdlib-topics"}
        assert all(v["ppl"] > 1 and v["n_tokens_scored"] == 2 * 31 for v in r["eval"].values())
    # one set of windows per draw, shared by every configuration of that draw
    for d in (0, 1):
        hashes = {r["calibration"]["hash"] for r in rows if r.get("draw") == d}
        assert len(hashes) == 1 and rows[1 + 4 * d]["calibration"]["seed"] == d
    assert rows[1]["calibration"]["hash"] != rows[5]["calibration"]["hash"]
    assert [c[0] for c in peer_calls] == ["sparsegpt", "sparsegpt"]
    assert tokens_hash(peer_calls[0][1]) == rows[1]["calibration"]["hash"]
    # the peer got the dense weights back here: its ppl is the dense one
    assert rows[4]["eval"]["stdlib-docs"]["ppl"] == pytest.approx(
        rows[0]["eval"]["stdlib-docs"]["ppl"]
    )
    assert rows[3]["refine"] == "refit" and rows[3]["refine_config"] == RefitConfig().to_json()
    md = qt.draws_markdown(rows)
    assert "| sparsegpt | 2 |" in md and "| llmcompressor-sparsegpt | 2 |" in md
    assert torch.is_tensor(peer_calls[0][1])


@pytest.fixture
def peer_job_seen(qt, monkeypatch):
    """bench_pipeline's child runner replaced by one that records the job it was given (returned
    dict, filled on each call) and answers a skip, as a machine without llm-compressor would."""
    bp = qt._bench_pipeline()
    seen = {}

    def fake_child(python, job, tmp, **kw):
        seen.update(job)
        return {"status": "skipped", "reason": "no llmcompressor here"}

    monkeypatch.setattr(bp, "run_child", fake_child)
    return seen


def test_run_peer_builds_bench_pipelines_job(qt, peer_job_seen, tmp_path):
    """The peer call is bench_pipeline's job (its llm-compressor pattern mapping), not a copy:
    2:4 stays 2:4 for llm-compressor, and the job carries our SparseGPT options."""
    seen = peer_job_seen
    state, info = qt.run_peer(
        "sparsegpt",
        torch.zeros(2, 8, dtype=torch.long),
        "2:4",
        peer_python=None,
        threads=1,
        tmp=tmp_path,
    )
    assert state is None and info["status"] == "skipped"
    assert seen["kind"] == "peer" and seen["config"] == "llmcompressor-sparsegpt"
    assert seen["nm"] == "2:4" and seen["blocksize"] == 128 and seen["percdamp"] == 0.01


def test_run_peer_wanda_job_and_unknown_method(qt, peer_job_seen, tmp_path):
    """The Wanda peer is the same child with ``method: wanda`` (llm-compressor's
    WandaPruningModifier); a method without a peer is a skip with the reason, not an error."""
    bp, seen = qt._bench_pipeline(), peer_job_seen
    ids = torch.zeros(2, 8, dtype=torch.long)
    qt.run_peer("wanda", ids, "1:4", peer_python=None, threads=1, tmp=tmp_path)
    assert seen["method"] == "wanda" and seen["config"] == "llmcompressor-wanda"
    assert (seen["nm"], seen["sparsity"]) == ("3:4", 0.75)
    assert bp.PEER_MODIFIERS["wanda"] == "WandaPruningModifier"
    state, info = qt.run_peer("magnitude", ids, "2:4", peer_python=None, threads=1, tmp=tmp_path)
    assert state is None and info["status"] == "skipped" and "magnitude" in info["reason"]
    with pytest.raises(ValueError, match="no llm-compressor peer for 'obs'"):
        bp.peer_job(ids="x", model_path="y", pattern=None, state_out="z", method="obs")
