"""The internal float32 matmul precision of our statistics and solvers (dsnt_export.precision):
"auto" takes torch's fast "medium" only where it is as accurate as float32, the setting is
scoped (the caller's is restored, also on error), the Hessian keeps float32's accuracy under what
"auto" resolves to, reference statistics stay on "highest", and recipes/configs validate it."""

from __future__ import annotations

import pytest
import torch

from dsnt_export import precision as P
from dsnt_export.errors import UserInputError
from dsnt_export.recipe import Recipe
from dsnt_export.sparsify.driver import SparsifyConfig
from dsnt_export.stats import ActivationStats


@pytest.fixture(autouse=True)
def _restore_precision():
    before = torch.get_float32_matmul_precision()
    yield
    assert torch.get_float32_matmul_precision() == before  # nothing leaked out of a test
    torch.set_float32_matmul_precision(before)


def test_context_sets_and_restores_also_on_error():
    torch.set_float32_matmul_precision("highest")
    with P.matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(RuntimeError, match="boom"), P.matmul_precision("high"):
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("bad", ["fast", "", None, "HIGHEST", 1])
def test_unknown_values_are_refused_with_the_known_ones(bad):
    with pytest.raises(UserInputError, match="auto.*highest.*high.*medium"):
        P.check_matmul_precision(bad)
    with pytest.raises(UserInputError, match="matmul_precision"):
        SparsifyConfig(pattern="2:4", matmul_precision=bad)
    if bad is not None:  # Recipe.replace reads None as "flag not set"
        with pytest.raises(UserInputError, match="matmul_precision"):
            Recipe.preset("default").replace(matmul_precision=bad)


def test_explicit_values_pass_through_and_auto_follows_the_probe(monkeypatch):
    for p in ("highest", "high", "medium"):
        assert P.resolve_matmul_precision(p, "cpu") == p
    monkeypatch.setattr(P, "fast_matmul_is_accurate", lambda device_type: False)
    assert P.resolve_matmul_precision("auto", "cpu") == "highest"
    monkeypatch.setattr(P, "fast_matmul_is_accurate", lambda device_type: True)
    assert P.resolve_matmul_precision("auto", None) == "medium"


def test_the_probe_is_cached_and_answers_a_bool():
    first = P.fast_matmul_is_accurate("cpu")
    assert isinstance(first, bool) and P.fast_matmul_is_accurate("cpu") is first
    assert P.fast_matmul_is_accurate.cache_info().hits >= 1


def _rel_err(h: torch.Tensor, exact: torch.Tensor) -> float:
    return float((h.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("width", [96, 576])  # one full product; the 4-chunk upper triangle
def test_hessian_under_auto_keeps_float32_accuracy(width):
    """Whatever "auto" resolves to on this machine, the Hessian of realistic activations (heavy
    tailed channels, as in LLMs) is within a small factor of float32's own error."""
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-1, 1.5, width, dtype=torch.float64)[torch.randperm(width, generator=g)]
    batches = [
        torch.randn(4, 64, width, generator=g, dtype=torch.float64) * scale for _ in range(3)
    ]
    X = torch.cat([b.reshape(-1, width) for b in batches])
    exact = 2 / 12 * X.T @ X
    errs = {}
    for p in ("highest", P.resolve_matmul_precision("auto", "cpu")):
        st = ActivationStats(width, hessian=True, accumulate="sum", matmul_precision=p)
        for b in batches:
            st.update(b.float())
        errs[p] = _rel_err(st.hessian, exact)
        assert torch.equal(st.hessian, st.hessian.T)  # the mirrored triangle is exact
    assert max(errs.values()) <= P.ACCURACY_FACTOR * errs["highest"] + 1e-7, errs


def test_stats_refuse_an_unresolved_precision():
    with pytest.raises(UserInputError, match="resolve 'auto' first"):
        ActivationStats(8, hessian=True, accumulate="sum", matmul_precision="auto")


def test_config_resolution_and_recipe_plumbing():
    # reference statistics (DSnoT's bit-for-bit path) never leave float32 under "auto"
    ref = SparsifyConfig(pattern="2:4", init="wanda", refine="dsnot")
    assert ref.statistics == "reference" and ref.resolved_matmul_precision("cpu") == "highest"
    assert (
        SparsifyConfig(pattern="2:4", matmul_precision="high").resolved_matmul_precision("cpu")
        == "high"
    )
    auto = SparsifyConfig(pattern="2:4")
    assert auto.resolved_matmul_precision("cpu") == P.resolve_matmul_precision("auto", "cpu")
    # recipes: "auto" is the default and not listed (old recipe hashes unchanged); others are
    r = Recipe.preset("default")
    assert r.matmul_precision == "auto" and "matmul_precision" not in r.to_dict()
    hi = r.replace(matmul_precision="highest")
    assert hi.to_dict()["matmul_precision"] == "highest" and hi.hash() != r.hash()
    assert hi.sparsify_config().matmul_precision == "highest"
    assert Recipe.from_dict(hi.to_dict()) == hi


def test_cli_flag_reaches_the_recipe():
    import argparse

    from dsnt_export.commands.prune import add_recipe_arguments, recipe_from_args

    p = argparse.ArgumentParser()
    add_recipe_arguments(p)
    assert recipe_from_args(p.parse_args([])).matmul_precision == "auto"
    assert recipe_from_args(p.parse_args(["--matmul-precision", "highest"])).matmul_precision == (
        "highest"
    )
    with pytest.raises(SystemExit):
        p.parse_args(["--matmul-precision", "fast"])


def test_a_prune_records_what_auto_resolved_to_and_leaves_the_setting_alone():
    from dsnt_export.sparsify.driver import sparsify
    from tests.tiny_models import calib_ids, tiny_model

    torch.set_float32_matmul_precision("high")  # the caller's own choice survives the prune
    reports = {}
    for p in ("auto", "highest"):
        model = tiny_model("llama")
        cfg = SparsifyConfig(pattern="2:4", init="sparsegpt", matmul_precision=p)
        reports[p] = sparsify(model, calib_ids(), cfg, device="cpu", progress=False)
        assert torch.get_float32_matmul_precision() == "high"
    assert reports["auto"].config["matmul_precision"] == "auto"
    assert reports["auto"].config["matmul_precision_used"] == P.resolve_matmul_precision(
        "auto", "cpu"
    )
    assert reports["highest"].config["matmul_precision_used"] == "highest"
    torch.set_float32_matmul_precision("highest")
