"""Shared pytest fixtures: one tiny model per supported architecture.

Builders live in ``tests/tiny_models.py`` (importable as plain functions where a test needs
arguments); the fixtures here are the parametrized entry points:

* ``tiny_arch``: each of :data:`tests.tiny_models.ARCHS` in turn;
* ``tiny_lm``: :func:`tests.tiny_models.tiny_model` of that architecture (fresh per test);
* ``sparse_hf_dir``: a tiny 2:4-sparse checkpoint directory of that architecture, written as
  ``dsnt-export prune`` would.
"""

from __future__ import annotations

import pytest

from tests.tiny_models import ARCHS, make_sparse_hf_dir, tiny_model


@pytest.fixture(params=ARCHS)
def tiny_arch(request) -> str:
    """The architecture (``model_type``) under test; the test runs once per entry of ``ARCHS``."""
    return request.param


@pytest.fixture
def tiny_lm(tiny_arch):
    """A random tiny causal LM of ``tiny_arch`` (float32, CPU, eval mode, seed 0)."""
    return tiny_model(tiny_arch)


@pytest.fixture
def sparse_hf_dir(tiny_arch, tmp_path):
    """A tiny 2:4-sparse HF checkpoint directory of ``tiny_arch`` under ``tmp_path``."""
    return make_sparse_hf_dir(tmp_path / f"sparse-{tiny_arch}", tiny_arch, pattern="2:4")
