"""Recipes: validation, presets, YAML round trip, conversion to the driver's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnt_export.errors import PatternError, UserInputError
from dsnt_export.patterns import NM, Unstructured
from dsnt_export.recipe import KNOWN_KEYS, Recipe
from dsnt_export.refine.dsnot import DSnoTConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_presets():
    d = Recipe.preset("default")
    assert (d.init, d.refine, d.pattern, d.refine_exclude) == ("sparsegpt", "dsnot", "2:4", ())
    o = Recipe.preset("official")
    assert (o.init, o.refine_exclude, o.calib, o.seed) == ("wanda", ("mlp",), "c4:128x2048", 0)
    cfg = o.dsnot_config()
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
        dsnot={"max_cycles": 7, "sign_check": False},
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
    r = Recipe.from_yaml_text("base: official\npattern: '0.6'\ndsnot: {sign_check: true}\n")
    assert r.pattern == "unstructured:0.6" and r.init == "wanda" and r.refine_exclude == ("mlp",)
    assert r.dsnot["preset"] == "official" and r.dsnot_config().sign_check is True
    assert r.name == "official+custom"
    assert Recipe.from_yaml_text("") == Recipe.preset("default")
    assert Recipe.from_yaml_text("eval: null").eval is None


def test_unknown_keys_list_the_known_ones():
    with pytest.raises(UserInputError) as e:
        Recipe.from_yaml_text("patern: '2:4'\n")
    assert "patern" in str(e.value)
    for k in ("pattern", "init", "refine", "calib", "sequential"):
        assert k in str(e.value)
    assert set(KNOWN_KEYS) >= {"model", "dsnot", "exclude", "device", "dtype", "seed"}
    with pytest.raises(UserInputError, match="unknown 'dsnot' key.*max_cycle.*known"):
        Recipe.from_dict({"dsnot": {"max_cycle": 3}})
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
    s = r.replace(dsnot={"preset": "default"})
    assert s.dsnot_config().sign_check is True  # the default preset's own value, not official's
    with pytest.raises(UserInputError, match="unknown recipe override"):
        r.replace(bogus=1)


def test_sparsify_config():
    r = Recipe.preset("official").replace(pattern="1:4", sequential=True, batch_size=2)
    c = r.sparsify_config()
    assert c.pattern == NM(1, 4) and c.init == "wanda" and c.refine_exclude == ("mlp",)
    assert c.sequential and c.batch_size == 2 and c.dsnot == r.dsnot_config()
    assert c.sparsegpt_blocksize == 128 and c.sparsegpt_percdamp == 0.01


def test_dsnot_criterion_from_flags_and_yaml(tmp_path):
    import argparse

    from dsnt_export.commands.prune import add_recipe_arguments, recipe_from_args

    p = argparse.ArgumentParser()
    add_recipe_arguments(p)
    assert recipe_from_args(p.parse_args([])).dsnot_config().criterion == "hessian"
    r = recipe_from_args(p.parse_args(["--dsnot-criterion", "mean"]))
    assert r.dsnot_config().criterion == "mean" and r.dsnot_config().loss_guard is True
    r = recipe_from_args(p.parse_args(["--dsnot-preset", "official"]))
    assert r.dsnot_config() == DSnoTConfig.official()
    y = tmp_path / "r.yaml"
    y.write_text("dsnot:\n  preset: official\n  criterion: hessian\n")
    assert Recipe.load(y).dsnot_config().criterion == "hessian"
    y.write_text("dsnot:\n  criterion: newton\n")
    with pytest.raises(UserInputError, match="criterion"):
        Recipe.load(y)
