"""benchmarks/quality_table.py: which rows make the README table and figure (no pruning here)."""

from __future__ import annotations

import pytest

from tests._scripts import load_script


@pytest.fixture(scope="module")
def qt():
    return load_script("quality_table")


def _row(config, pattern, calib="stdlib-docs", n=32, docs=30.0, code=20.0):
    return {
        "config": config,
        "pattern": pattern,
        "calib": calib,
        "prune_s": 1.0,
        "calibration": {"nsamples": n},
        "eval": {
            "stdlib-docs": {"domain": "stdlib-docs", "ppl": docs},
            "stdlib-code": {"domain": "stdlib-code", "ppl": code},
        },
    }


def test_canonical_cells(qt):
    damp = qt.HessianSwapConfig().percdamp
    rows = [
        _row("dense", "dense", calib=None, n=None, docs=20.0, code=12.0),
        _row("sparsegpt", "2:4", docs=45.0),
        _row("sparsegpt+dsnot(default percdamp=0.01)", "2:4", docs=43.1),  # not the default
        _row(f"sparsegpt+dsnot(default percdamp={damp})", "2:4", docs=43.0),  # = the default
        _row("sparsegpt+dsnot(default)", "2:4", n=64, docs=40.0),  # other calibration size
        _row("sparsegpt+dsnot(default)", "2:4", calib="stdlib-code", docs=51.0),  # other domain
        _row("wanda", "0.6", docs=80.0),
        _row("wanda", "0.6", docs=78.0),  # a later row replaces an earlier one
    ]
    cells = qt.canonical(rows, "stdlib-docs")
    assert set(cells) == {
        ("sparsegpt", "2:4"),
        ("sparsegpt+dsnot(default)", "2:4"),
        ("wanda", "0.6"),
    }
    assert cells[("sparsegpt+dsnot(default)", "2:4")]["eval"]["stdlib-docs"]["ppl"] == 43.0
    assert cells[("wanda", "0.6")]["eval"]["stdlib-docs"]["ppl"] == 78.0
    assert set(qt.canonical(rows, "stdlib-code")) == {("sparsegpt+dsnot(default)", "2:4")}


def test_figure_and_markdown(qt, tmp_path):
    rows = [
        _row("dense", "dense", calib=None, n=None, docs=20.0, code=12.0),
        _row("wanda", "2:4", docs=90.0, code=70.0),
        _row("wanda+dsnot(default)", "2:4", docs=50.0, code=40.0),
        _row("wanda+dsnot(official)", "2:4", docs=95.0, code=63.0),
        _row("wanda", "0.7", docs=900.0, code=700.0),
    ]
    png = qt.figure(rows, tmp_path / "fig" / "quality.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(png.parent.glob(".*"))  # no temporary file left
    md = qt.markdown(rows)
    assert "| dense | 20.00 | 12.00 | |" in md
    assert "| wanda + DSnoT default | **50.00 (-44.4 %)** | **40.00 (-42.9 %)** | 1 |" in md
    assert "| wanda + DSnoT official | 95.00 (+5.6 %, worse) | 63.00 (-10.0 %) | 1 |" in md
    assert "**70 % unstructured, calibrated on docstrings**" in md
    assert "calibrated on code" not in md
    summary = qt.summary_markdown(rows).splitlines()
    assert summary[0].startswith("| pattern | calibrated on | magnitude + DSnoT official |")
    assert summary[2] == "| 2:4 | docstrings | — | — | +5.6 / -10.0 | **-44.4 / -42.9** | — | — |"
    assert len(summary) == 3  # the 70 % cell has no refined configuration
    with pytest.raises(SystemExit, match="no rows calibrated on stdlib-code"):
        qt.figure(rows, tmp_path / "x.png", calib="stdlib-code")
