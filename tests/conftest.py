"""Shared pytest fixtures: one tiny model per supported architecture.

Builders live in ``tests/tiny_models.py`` (importable as plain functions where a test needs
arguments); the fixtures here are the parametrized entry points:

* ``tiny_arch``: each of :data:`tests.tiny_models.ARCHS` in turn;
* ``tiny_lm``: :func:`tests.tiny_models.tiny_model` of that architecture (fresh per test).

Sparse checkpoint directories: :func:`tests.tiny_models.make_sparse_hf_dir` (called with the
architecture and pattern a test needs; parametrizing it over every architecture would multiply
the export tests' run time by five).
"""

from __future__ import annotations

import pytest

from tests.tiny_models import ARCHS, tiny_model


@pytest.fixture(params=ARCHS)
def tiny_arch(request) -> str:
    """The architecture (``model_type``) under test; the test runs once per entry of ``ARCHS``."""
    return request.param


@pytest.fixture
def tiny_lm(tiny_arch):
    """A random tiny causal LM of ``tiny_arch`` (float32, CPU, eval mode, seed 0)."""
    return tiny_model(tiny_arch)
