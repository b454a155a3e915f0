"""Recipes: validation errors name the stage and the key; every shipped recipe runs on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deepshrink import load
from deepshrink.errors import ConfigError
from deepshrink.workflow import load_recipe, parse_recipe, run_recipe
from deepshrink.workflow.recipe import shipped_recipes
from deepshrink.workflow.stages import STAGES

from .conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.*"))  # the repository link to the shipped recipes


def _recipe(*stages):
    return {"name": "t", "stages": list(stages)}


def test_unknown_config_key_names_stage_and_key():
    raw = _recipe({"stage": "prune", "config": {"ratio": 0.5}},
                  {"stage": "share", "config": {"bitz": 3}})
    with pytest.raises(ConfigError) as e:
        parse_recipe(raw)
    msg = str(e.value)
    assert "stage 2 (share)" in msg and "'bitz'" in msg and "KMeansConfig" in msg


def test_unknown_stage_key_names_stage_and_key():
    with pytest.raises(ConfigError, match=r"stage 1 \(quantize\): unknown key\(s\) \['rounds'\]"):
        parse_recipe(_recipe({"stage": "quantize", "rounds": 2}))
    with pytest.raises(ConfigError, match=r"stage 1 \(prune\) finetune: TrainConfig: unknown .*'epoch'"):
        parse_recipe(_recipe({"stage": "prune", "finetune": {"epoch": 1}}))
    with pytest.raises(ConfigError, match=r"stage 1 \(prune\) teacher: TeacherConfig.alpha"):
        parse_recipe(_recipe({"stage": "prune", "teacher": {"alpha": 2.0}}))


def test_bad_values_and_unknown_stages_are_named():
    with pytest.raises(ConfigError, match=r"stage 1 \(prune\) config: UnstructuredConfig.ratio"):
        parse_recipe(_recipe({"stage": "prune", "config": {"ratio": 1.5}}))
    with pytest.raises(ConfigError, match=r"stage 1 \(quantize\) config: type 'KMeansConfig' is not one of"):
        parse_recipe(_recipe({"stage": "quantize", "config": {"type": "KMeansConfig"}}))
    with pytest.raises(ConfigError, match=r"stage 1 \(sharpen\): unknown stage 'sharpen'"):
        parse_recipe(_recipe({"stage": "sharpen"}))
    with pytest.raises(ConfigError, match="unknown top-level key"):
        parse_recipe({"name": "t", "stages": [{"stage": "pack"}], "stagez": []})
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_recipe({"name": "t", "stages": []})


@pytest.mark.parametrize("name", ["factorize", "separable", "early_exit"])
def test_stages_of_families_not_in_this_build_say_so(name):
    if name in STAGES:
        pytest.skip(f"{name} is available in this build")
    with pytest.raises(ConfigError, match=rf"stage 1 \({name}\): stage '{name}'"):
        parse_recipe(_recipe({"stage": name}))


def test_yaml_and_json_recipes_agree(tmp_path):
    raw = _recipe({"stage": "prune", "config": {"ratio": 0.5}, "finetune": {"epochs": 1}},
                  {"stage": "pack", "config": {"codebook_dtype": "float16"}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "r.json").write_text(json.dumps(raw))
    assert load_recipe(tmp_path / "r.yaml").to_dict() == load_recipe(tmp_path / "r.json").to_dict()
    (tmp_path / "bad.yaml").write_text("stages: [unclosed")
    with pytest.raises(ConfigError, match="not valid yaml"):
        load_recipe(tmp_path / "bad.yaml")


def test_shipped_recipes_are_the_five_asked_for():
    names = {load_recipe(p).name for p in RECIPES}
    assert names == {"deep-compression", "int8-ort", "structured+int8", "distill+int8", "max-compression"}
    assert sorted(shipped_recipes().values()) == sorted(p.resolve() for p in RECIPES)
    assert load_recipe("int8-ort").name == "int8-ort"  # by name, from the installed package


def _tiny(path: Path) -> dict:
    """The shipped recipe with one-epoch fine-tunes and at most two pruning rounds (fast)."""
    raw = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    for s in raw["stages"]:
        if "finetune" in s:  # a student trained from scratch needs a few epochs to beat chance
            s["finetune"]["epochs"] = 8 if s["stage"] == "distill" else 1
        if "rounds" in s:
            s["rounds"] = min(2, s["rounds"])
    return raw


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_runs_on_digits(path, digits, digits_model, tmp_path):
    model, model_file = digits_model
    recipe = parse_recipe(_tiny(path), str(path))
    res = run_recipe(recipe, model, digits, tmp_path, model_file=model_file, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    stages = saved["stages"]
    assert [s["stage"] for s in stages] == ["original", *(s.stage for s in recipe.stages)]
    base = stages[0]
    assert base["bytes"] == model_file.stat().st_size
    for s in stages[1:]:
        f = tmp_path / s["file"]
        assert f.stat().st_size == s["bytes"]  # real bytes of the artifact on disk
        assert 0.0 <= s["val_top1"] <= 1.0 and 0.0 <= s["test_top1"] <= 1.0
        assert s["latency"]["1"]["speedup"] > 0
    final = stages[-1]
    assert final["size_ratio"] > 3.0  # every shipped recipe compresses
    assert final["test_top1"] > 0.5  # and the model still works (10 classes: chance is 0.1)
    if f.suffix in (".safetensors", ".dsz"):
        reloaded = load(f)  # the artifact rebuilds on its own
        assert sum(p.numel() for p in reloaded.parameters()) > 0
    assert len(saved["latency"]["1"]["samples_ms"]) == len(stages)
    assert res.path == tmp_path / "results.json"


def test_qat_stage_runs(digits, digits_model, tmp_path):
    model, model_file = digits_model
    raw = _recipe({"stage": "quantize", "config": {"type": "QATConfig", "bits": 4, "act_bits": None},
                   "finetune": {"epochs": 1}})
    res = run_recipe(parse_recipe(raw), model, digits, tmp_path, model_file=model_file, progress=False,
                     latency=False)
    final = res.results["stages"][-1]
    assert final["size_ratio"] > 4 and final["test_top1"] > 0.5
    assert {r["bits"] for r in final["layers"] if len(r["shape"]) == 2} == {4}
