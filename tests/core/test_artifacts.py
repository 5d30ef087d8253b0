"""``atomic_output_dir``: all or nothing, and a normal directory mode on success."""

from __future__ import annotations

import os
import stat

import pytest

from dsnt_export.artifacts import atomic_output_dir
from dsnt_export.errors import UserInputError


def test_success_renames_with_the_umask_mode(tmp_path):
    target = tmp_path / "out"
    old = os.umask(0o022)
    try:
        with atomic_output_dir(target) as tmp:
            (tmp / "a.txt").write_text("x")
            assert not target.exists()
    finally:
        os.umask(old)
    assert (target / "a.txt").read_text() == "x"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's private 0700
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing_and_keeps_the_old_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "half.bin").write_bytes(b"\0")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="--overwrite"):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
