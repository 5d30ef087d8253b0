"""Recipes: validation, presets, YAML round trip, conversion to the driver's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnt_export.errors import PatternError, UserInputError
from dsnt_export.patterns import NM, Unstructured
from dsnt_export.recipe import KNOWN_KEYS, Recipe
from dsnt_export.refine import DSnoTConfig, HessianSwapConfig, LegacyConfigWarning, RefitConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_presets():
    d = Recipe.preset("default")
    assert (d.init, d.refine, d.pattern, d.refine_exclude) == (
        "sparsegpt",
        "refit",
        "2:4",
        (),
    )
    assert d.refiner_config() == RefitConfig(percdamp=0.1, steps=8, solver="cg")
    o = Recipe.preset("official")
    assert (o.init, o.refine_exclude, o.calib, o.seed) == ("wanda", ("mlp",), "c4:128x2048", 0)
    cfg = o.refiner_config()
    assert cfg == DSnoTConfig.official()
    assert (cfg.max_cycles, cfg.update_threshold, cfg.var_power) == (50, 0.1, 1.0)
    assert cfg.sign_check_for(NM(2, 4)) and not cfg.sign_check_for(Unstructured(0.5))
    with pytest.raises(UserInputError, match="unknown recipe preset 'fast'.*default.*official"):
        Recipe.preset("fast")


@pytest.mark.parametrize(
    "fname,preset", [("default.yaml", "default"), ("official-dsnot.yaml", "official")]
)
def test_shipped_yaml_files_equal_the_presets(fname, preset):
    assert Recipe.load(RECIPES / fname) == Recipe.preset(preset)


def test_yaml_round_trip(tmp_path):
    r = Recipe.preset("default").replace(
        model="some/dir",
        pattern="4:8",
        init="wanda",
        refine="dsnot",
        refine_options={"max_cycles": 7, "sign_check": False},
        exclude=["mlp.down_proj", "0-1:attention"],
        refine_exclude=["mlp"],
        sequential=True,
        batch_size=4,
        sparsegpt={"percdamp": 0.05},
    )
    path = tmp_path / "r.yaml"
    r.to_yaml(path)
    back = Recipe.from_yaml(path)
    assert back == r
    assert back.hash() == r.hash() != Recipe.preset("default").hash()
    assert back.exclude == ("mlp.down_proj", "0-1:attention")
    assert back.sparsegpt == {"blocksize": 128, "percdamp": 0.05}


def test_partial_yaml_fills_from_base():
    text = "base: official\npattern: '0.6'\nrefine_options: {sign_check: true}\n"
    r = Recipe.from_yaml_text(text)
    assert r.pattern == "unstructured:0.6" and r.init == "wanda" and r.refine_exclude == ("mlp",)
    assert r.refine_options["preset"].startswith("official") and r.refiner_config().sign_check
    assert r.refiner_config() == DSnoTConfig.official(sign_check=True)
    with pytest.warns(LegacyConfigWarning):  # the old key, merged onto the base's refiner
        old = Recipe.from_yaml_text(text.replace("refine_options", "dsnot"))
    assert old.refiner_config() == r.refiner_config() and old.refine == "dsnot"
    assert r.name == "official+custom"
    assert Recipe.from_yaml_text("") == Recipe.preset("default")
    assert Recipe.from_yaml_text("eval: null").eval is None


def test_unknown_keys_list_the_known_ones():
    with pytest.raises(UserInputError) as e:
        Recipe.from_yaml_text("patern: '2:4'\n")
    assert "patern" in str(e.value)
    for k in ("pattern", "init", "refine", "calib", "sequential"):
        assert k in str(e.value)
    assert set(KNOWN_KEYS) >= {"model", "refine_options", "exclude", "device", "dtype", "seed"}
    with pytest.raises(UserInputError, match="max_cycle.*known"):
        Recipe.from_dict({"dsnot": {"max_cycle": 3}})
    with pytest.raises(UserInputError, match="unknown refine_options key.*max_cycle.*known"):
        Recipe.from_dict({"refine_options": {"max_cycle": 3}})
    with pytest.raises(UserInputError, match="unknown 'sparsegpt' key"):
        Recipe.from_dict({"sparsegpt": {"damp": 0.1}})


@pytest.mark.parametrize(
    "bad,err",
    [
        ({"pattern": "5:4"}, PatternError),
        ({"pattern": 24}, UserInputError),
        ({"init": "obs"}, UserInputError),
        ({"refine": "dsnt"}, UserInputError),
        ({"dtype": "fp8"}, UserInputError),
        ({"batch_size": 0}, UserInputError),
        ({"seed": "zero"}, UserInputError),
        ({"sequential": "yes"}, UserInputError),
        ({"exclude": "mlp"}, UserInputError),
        ({"dsnot": {"preset": "paper"}}, UserInputError),
        ({"dsnot": {"max_cycles": -1}}, UserInputError),
        ({"refine_options": {"max_cycles": -1}}, UserInputError),
        ({"refine": "dsnot", "refine_options": {"preset": "paper"}}, UserInputError),
        ({"refine": "none", "refine_options": {"max_cycles": 3}}, UserInputError),
        ({"sparsegpt": {"percdamp": 2}}, UserInputError),
        ({"calib": ""}, UserInputError),
    ],
)
def test_invalid_values(bad, err):
    with pytest.raises(err):
        Recipe.from_dict(bad)


def test_bad_files(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("pattern: [2:4\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        Recipe.load(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(UserInputError, match="mapping"):
        Recipe.load(p)


def test_replace_ignores_unset_flags_and_switches_dsnot_preset():
    r = Recipe.preset("official")
    assert r.replace(pattern=None, init=None) == r
    with pytest.warns(LegacyConfigWarning):  # the old default preset = the hessian-swap refiner
        s = r.replace(dsnot={"preset": "default"})
    assert s.refiner_config() == HessianSwapConfig(max_cycles=50, percdamp=0.03)
    t = s.replace(refine="dsnot")  # another refiner: its own defaults, not hessian-swap's options
    assert t.refiner_config() == DSnoTConfig() and s.replace(refine="none").refine_options == {}
    u = s.replace(refine_options={"percdamp": 0.05})  # same refiner: merged
    assert u.refiner_config() == HessianSwapConfig(max_cycles=50, percdamp=0.05)
    with pytest.raises(UserInputError, match="unknown recipe override"):
        r.replace(bogus=1)


def test_sparsify_config():
    r = Recipe.preset("official").replace(pattern="1:4", sequential=True, batch_size=2)
    c = r.sparsify_config()
    assert c.pattern == NM(1, 4) and c.init == "wanda" and c.refine_exclude == ("mlp",)
    assert c.sequential and c.batch_size == 2
    assert (c.refine, c.refine_config) == ("dsnot", DSnoTConfig.official())
    assert c.sparsegpt_blocksize == 128 and c.sparsegpt_percdamp == 0.01


def test_refiner_flags_new_and_deprecated(tmp_path):
    import argparse

    from dsnt_export.commands.prune import add_recipe_arguments, recipe_from_args

    p = argparse.ArgumentParser()
    add_recipe_arguments(p)
    assert recipe_from_args(p.parse_args([])).refine == "refit"
    r = recipe_from_args(p.parse_args(["--refine-option", "percdamp=0.05"]))
    assert r.refiner_config() == RefitConfig(percdamp=0.05, steps=8)
    r = recipe_from_args(
        p.parse_args(["--refine", "hessian-swap", "--refine-option", "percdamp=0.05"])
    )
    assert r.refiner_config() == HessianSwapConfig(max_cycles=50, percdamp=0.05)
    r = recipe_from_args(p.parse_args(["--refine", "dsnot", "--refine-option", "preset=official"]))
    assert r.refiner_config() == DSnoTConfig.official()
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        recipe_from_args(p.parse_args(["--refine-option", "percdamp"]))
    with pytest.warns(LegacyConfigWarning):
        r = recipe_from_args(p.parse_args(["--dsnot-criterion", "mean"]))
    assert r.refine == "dsnot" and r.refiner_config() == DSnoTConfig.guarded()
    with pytest.warns(LegacyConfigWarning):
        r = recipe_from_args(p.parse_args(["--dsnot-percdamp", "0.05"]))
    assert r.refiner_config() == HessianSwapConfig(max_cycles=50, percdamp=0.05)
    r = recipe_from_args(p.parse_args(["--dsnot-preset", "official"]))
    assert r.refine == "dsnot" and r.refiner_config() == DSnoTConfig.official()
    y = tmp_path / "r.yaml"
    y.write_text("dsnot:\n  criterion: newton\n")
    with pytest.raises(UserInputError, match="criterion"):
        Recipe.load(y)


OLD_DEFAULT_YAML = """base: default
name: default
model: null
pattern: "2:4"
init: sparsegpt
refine: dsnot
dsnot:
  preset: default
  criterion: hessian
  percdamp: 0.03
calib: stdlib-docs:64x256
eval: stdlib-docs
eval_seqlen: 256
eval_max_windows: 64
"""


def test_old_recipe_files_keep_loading_with_a_deprecation_message():
    with pytest.warns(LegacyConfigWarning, match="hessian-swap"):
        old = Recipe.from_yaml_text(OLD_DEFAULT_YAML)
    # the old default's algorithm, now under its own name (the default moved on to refit)
    was = Recipe.preset("default").replace(
        refine="hessian-swap", refine_options={"max_cycles": 50, "percdamp": 0.03}
    )
    assert old == was
    assert old.sparsify_config() == was.sparsify_config()
    text = "base: official\nrefine: dsnot\ndsnot: {preset: official, max_cycles: 50}\n"
    assert Recipe.from_yaml_text(text).refiner_config() == DSnoTConfig.official()
