"""The plug-in registries (refiners, initial methods), the legacy recipe translation, the shared
loss helpers and the typed per-layer record."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from dsnt_export.errors import UserInputError
from dsnt_export.methods import get_initial, initial_names
from dsnt_export.refine import (
    DSnoTConfig,
    HessianSwapConfig,
    LegacyConfigWarning,
    RefineOutcome,
    RefineSummary,
    config_from_legacy,
    get_refiner,
    refine_choices,
    refiner_for,
    register_refiner,
)
from dsnt_export.refine import registry as reg
from dsnt_export.refine.loss import (
    dampened_hessian,
    dampening,
    layer_loss,
    loss_and_gradient,
    relative_loss,
)
from dsnt_export.refine.refit import RefitConfig
from dsnt_export.sparsify.driver import SparsifyConfig, sparsify
from dsnt_export.sparsify.record import LayerRecord
from tests.tiny_models import calib_ids, tiny_model


def test_refiner_registry_lookups_and_errors():
    assert refine_choices() == ("dsnot", "hessian-swap", "refit", "none")
    assert get_refiner("hessian-swap").config_type is HessianSwapConfig
    assert get_refiner("refit").config_type is RefitConfig
    assert refiner_for(DSnoTConfig.official()).name == "dsnot"
    with pytest.raises(UserInputError, match=r"unknown refiner 'nope'.*'dsnot', 'hessian-swap'"):
        get_refiner("nope")
    with pytest.raises(UserInputError, match="no refiner takes a config of type dict"):
        refiner_for({})
    with pytest.raises(ValueError, match="registered already"):
        register_refiner("dsnot", dict, record_refine="x", record_criterion="y")(lambda: None)


def test_initial_registry():
    assert initial_names() == ("magnitude", "wanda", "sparsegpt")
    assert get_initial("sparsegpt").needs_hessian and not get_initial("wanda").needs_hessian
    with pytest.raises(UserInputError, match=r"unknown initial method 'obs'.*'magnitude'"):
        get_initial("obs")


def test_sparsify_config_selects_the_refiner_by_name_or_config_type():
    c = SparsifyConfig(pattern="2:4")
    assert (c.refine, c.refine_config, c.needs_hessian) == ("refit", RefitConfig(), True)
    c = SparsifyConfig(pattern="2:4", refine=HessianSwapConfig(percdamp=0.1))
    assert (c.refine, c.refine_config.percdamp) == ("hessian-swap", 0.1)
    c = SparsifyConfig(pattern="2:4", refine=DSnoTConfig.official())
    assert (c.refine, c.refine_config, c.needs_hessian) == ("dsnot", DSnoTConfig.official(), False)
    assert SparsifyConfig(pattern="2:4", init="sparsegpt", refine="none").needs_hessian
    c = SparsifyConfig(pattern="2:4", refine=None)
    assert (c.refine, c.refine_config, c.refiner) == ("none", None, None)
    assert c.to_json()["refine_config"] is None
    with pytest.raises(UserInputError, match="unknown refiner"):
        SparsifyConfig(pattern="2:4", refine="dsnot-hessian")
    with pytest.raises(UserInputError, match="takes a DSnoTConfig, got HessianSwapConfig"):
        SparsifyConfig(pattern="2:4", refine="dsnot", refine_config=HessianSwapConfig())
    with pytest.raises(UserInputError, match="refine is 'none'"):
        SparsifyConfig(pattern="2:4", refine="none", refine_config=DSnoTConfig())
    with pytest.raises(UserInputError, match="unknown initial method"):
        SparsifyConfig(pattern="2:4", init="obs")


def test_a_new_refiner_is_one_registration(monkeypatch):
    monkeypatch.setattr(reg, "_REFINERS", dict(reg._REFINERS))

    @dataclass(frozen=True)
    class KeepConfig:
        needs_hessian: bool = False

        def to_json(self) -> dict:
            return {}

    calls = []

    @register_refiner("keep", KeepConfig, record_refine="keep", record_criterion="none")
    def keep_refiner(reference, weight, keep, stats, pattern, config, *, metric=None, name=None):
        calls.append(name)
        return RefineOutcome(weight, keep, RefineSummary(0.0, 0.0, 0, 0))

    assert "keep" in refine_choices()
    a, b = tiny_model("llama"), tiny_model("llama")
    rep = sparsify(a, calib_ids(), SparsifyConfig(pattern="2:4", refine="keep"), progress=False)
    sparsify(b, calib_ids(), SparsifyConfig(pattern="2:4", refine="none"), progress=False)
    assert len(calls) == len(rep.layers) and all(r.method == "wanda+keep" for r in rep.layers)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # a refiner that keeps everything = no refinement


def test_config_from_legacy_translates_and_warns():
    with pytest.warns(LegacyConfigWarning, match="refine: hessian-swap"):
        assert config_from_legacy({"preset": "default"}) == (
            "hessian-swap",
            HessianSwapConfig(max_cycles=50, percdamp=0.03),
        )
    with pytest.warns(LegacyConfigWarning):  # the official preset's percdamp was 0.01
        name, cfg = config_from_legacy({"preset": "official", "criterion": "hessian"})
    assert (name, cfg) == ("hessian-swap", HessianSwapConfig(percdamp=0.01))
    with pytest.warns(LegacyConfigWarning, match="preset guarded"):
        name, cfg = config_from_legacy({"criterion": "mean", "update_threshold": 0.0})
    assert (name, cfg) == ("dsnot", DSnoTConfig.guarded(update_threshold=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DSnoT's own options with preset official are current
        assert config_from_legacy({"preset": "official", "max_cycles": 9}) == (
            "dsnot",
            DSnoTConfig.official(max_cycles=9),
        )
    with pytest.raises(UserInputError, match="known"):
        config_from_legacy({"preset": "default", "cycles": 3}, warn=False)
    with pytest.raises(UserInputError, match="criterion"):
        config_from_legacy({"criterion": "newton"}, warn=False)
    with pytest.raises(UserInputError, match="preset"):
        config_from_legacy({"preset": "paper"}, warn=False)


def test_loss_helpers_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g)
    H = 2 / 64 * X.T @ X
    ref, w = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    want = float(torch.einsum("ri,ij,rj->", ref - w, H, ref - w))
    assert layer_loss(ref, w, H) == pytest.approx(want, rel=1e-5)
    loss, grad = loss_and_gradient(ref - w, H)
    assert loss == layer_loss(ref, w, H) and torch.equal(grad, (ref - w) @ H)  # bit-identical
    y = ((ref - w) @ X.T).square().sum() / (ref @ X.T).square().sum()
    assert relative_loss(ref, w, H) == pytest.approx(float(y), rel=1e-4)
    assert float(dampening(H, 0.1)) == pytest.approx(0.1 * float(torch.diagonal(H).mean()))
    H[3, :] = H[:, 3] = 0.0  # a channel that never fires
    D = dampened_hessian(H, 0.1, dead="inf")
    assert D[3, 3] == float("inf") and D[0, 0] == H[0, 0] + dampening(H, 0.1)
    assert dampened_hessian(H, 0.1)[3, 3] == dampening(H, 0.1) and H[3, 3] == 0  # input untouched
    with pytest.raises(ValueError, match="dead"):
        dampened_hessian(H, 0.1, dead="zero")


def test_layer_record_json_omits_what_does_not_apply():
    r = LayerRecord("m.0.q", 0, "q", "attention", [4, 8], 32, "wanda", "2:4", method="wanda")
    d = r.to_json()
    assert d["refine"] is None and "criterion" not in d and "rel_recon_loss" not in d
    assert list(d)[:9] == [
        "name",
        "block",
        "linear",
        "kind",
        "shape",
        "numel",
        "init",
        "pattern",
        "refine",
    ]
    assert LayerRecord.from_json(d) == r
