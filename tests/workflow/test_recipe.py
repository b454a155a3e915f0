"""Recipes: validation errors name the stage and the key; every shipped recipe runs on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from deepshrink import load
from deepshrink.errors import ConfigError
from deepshrink.models import create_model
from deepshrink.workflow import load_recipe, parse_recipe, run_recipe
from deepshrink.workflow.recipe import shipped_recipes

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


def test_redesign_and_early_exit_stage_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"stage 1 \(factorize\) config: LowRankConfig.rank/energy/budget"):
        parse_recipe(_recipe({"stage": "factorize", "config": {"rank": 4, "energy": 0.9}}))
    with pytest.raises(ConfigError, match=r"stage 1 \(separable\) config: SeparableConfig: unknown .*'mult'"):
        parse_recipe(_recipe({"stage": "separable", "config": {"mult": 2}}))
    with pytest.raises(ConfigError, match=r"stage 1 \(early_exit\) config: ExitTrainConfig.mode"):
        parse_recipe(_recipe({"stage": "early_exit", "config": {"mode": "both"}}))
    with pytest.raises(ConfigError, match=r"stage 1 \(early_exit\) config: .*CalibrationConfig.budget"):
        parse_recipe(_recipe({"stage": "early_exit", "config": {"calibration": {"budget": -1}}}))


def test_factorize_then_early_exit_stages_run(digits, digits_model, tmp_path):
    """Low-rank rewrite (KD fine-tune), then exit heads calibrated on validation; both files
    reload as their new architecture."""
    model, model_file = digits_model
    raw = _recipe({"stage": "factorize", "config": {"rank": 12, "check_speed": False},
                   "finetune": {"epochs": 1}, "teacher": {"alpha": 0.5}},
                  {"stage": "early_exit", "finetune": {"epochs": 1},
                   "config": {"exits": {"points": ["3"]}, "calibration": {"budget": 2.0}}})
    res = run_recipe(parse_recipe(raw), model, digits, tmp_path, model_file=model_file, progress=False,
                     latency=False)
    base, fac, ex = res.results["stages"]
    assert fac["info"]["rewritten"] and fac["params"] < base["params"]
    assert ex["info"]["exits"] == ["3"] and ex["info"]["val_mac_reduction"] >= 1.0
    assert fac["test_top1"] > 0.5 and ex["test_top1"] > 0.5
    multi = load(tmp_path / ex["file"])
    assert multi.points == ["3"] and multi.thresholds == ex["info"]["thresholds"]
    assert any(isinstance(m, torch.nn.Sequential) and len(m) == 2 for m in multi.base.modules())


def test_separable_stage_runs(digits, tmp_path):
    torch.manual_seed(0)
    model = create_model("vgg_small", in_size=8, width=8, hidden=16)
    raw = _recipe({"stage": "separable", "config": {"check_speed": False}, "finetune": {"epochs": 1}})
    res = run_recipe(parse_recipe(raw), model, digits, tmp_path, progress=False, latency=False)
    base, sep = res.results["stages"]
    assert sep["info"]["rewritten"] and sep["macs"] < base["macs"]
    assert load(tmp_path / sep["file"])(digits.test.tensors[0][:2]).shape == (2, 10)


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


def test_allocate_key_is_checked_and_spreads_the_ratio_by_rule(digits, digits_model, tmp_path):
    with pytest.raises(ConfigError, match=r"stage 1 \(prune\): 'allocate' must be one of"):
        parse_recipe(_recipe({"stage": "prune", "allocate": "flat"}))
    with pytest.raises(ConfigError, match=r"stage 1 \(prune\): 'allocate' needs an UnstructuredConfig"):
        parse_recipe(_recipe({"stage": "prune", "config": {"type": "ChannelConfig"}, "allocate": "even"}))
    model, model_file = digits_model
    # No layer named: the rule finds the classifier (the last layer) and spares it.
    raw = _recipe({"stage": "prune", "config": {"ratio": 0.9, "overrides": {"4": 0.5}}, "allocate": "even"})
    res = run_recipe(parse_recipe(raw), model, digits, tmp_path, model_file=model_file, progress=False,
                     latency=False, test=False)
    row = res.results["stages"][1]
    ratios = row["info"]["allocation"]["ratios"]
    sparsity = {r["name"]: r["sparsity"] for r in row["layers"]}
    assert ratios["6"] == pytest.approx(0.7) and sparsity["6"] == pytest.approx(0.7, abs=0.01)
    assert sparsity["4"] == pytest.approx(0.5, abs=0.01)  # the recipe's own override wins
    assert sparsity["2"] == pytest.approx(ratios["2"], abs=0.01) and ratios["2"] > 0.9


def test_cached_teacher_outputs_train_like_the_teacher_itself(digits, digits_model):
    from deepshrink.train import TrainConfig, train
    from deepshrink.workflow.stages import (
        StageContext,
        StageSpec,
        TeacherConfig,
        teacher_callbacks,
        with_teacher,
    )

    model, _ = digits_model
    spec = StageSpec(stage="prune", config=None, teacher=TeacherConfig(alpha=0.7, temperature=4.0))
    ctx = StageContext(model, model, digits, Path("."), 1)
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=64, progress=False)
    data, kd = with_teacher(ctx, spec, cfg)
    assert len(data.train.tensors) == 3 and kd[0].cached == 2  # the teacher's logits ride along
    cached = create_model("lenet300", in_size=digits.in_size, num_classes=10)
    plain = create_model("lenet300", in_size=digits.in_size, num_classes=10)
    plain.load_state_dict(cached.state_dict())
    train(cached, data, cfg, callbacks=kd)
    train(plain, digits, cfg, callbacks=teacher_callbacks(ctx, spec))
    for a, b in zip(cached.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # With augmentation the outputs change every epoch: nothing is cached.
    data, kd = with_teacher(ctx, spec, TrainConfig(epochs=1, augment="shift", progress=False))
    assert data is digits and kd[0].cached is None
