"""Calibration on validation only (poisoned test split changes nothing), the budget, the
curve; training modes; save -> load with thresholds; hostile edits; config round trips."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch.utils.data import TensorDataset

import deepshrink as ds
from deepshrink.early_exit import (
    CalibrationConfig,
    ExitConfig,
    ExitTrainConfig,
    add_exits,
    calibrate,
    check_exit_edit,
    evaluate_exits,
    train_exits,
)
from deepshrink.errors import ConfigError, FormatError
from deepshrink.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(digits):
    """resnet_small on digits with exit heads trained on the frozen backbone."""
    torch.manual_seed(0)
    base = ds.create_model("resnet_small", in_size=8, num_classes=10, widths=(8, 16, 16))
    train(base, digits, TrainConfig(epochs=6, lr=3e-3, batch_size=64, progress=False))
    original = copy.deepcopy(base)
    multi = add_exits(base, ExitConfig(pool=2, hidden=32), example_inputs=digits.test.tensors[0][:2])
    train_exits(multi, digits, ExitTrainConfig(mode="heads", train=TrainConfig(
        epochs=6, lr=3e-3, batch_size=64, progress=False)))
    return original, multi


def test_heads_mode_keeps_the_backbone_and_trains_the_heads(trained, digits):
    original, multi = trained
    for (k, a), b in zip(original.state_dict().items(), multi.base.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # weights and BatchNorm statistics untouched
    x, y = digits.test.tensors
    with torch.no_grad():
        outs = multi.all_exits(x)
    accs = [float((z.argmax(-1) == y).float().mean()) for z in outs]
    assert min(accs[:-1]) > 0.5  # heads learned (chance is 0.1)


def test_joint_mode_trains_the_backbone_too(digits):
    torch.manual_seed(0)
    base = ds.create_model("mlp", in_size=8, hidden=32)
    before = copy.deepcopy(base.state_dict())
    multi = add_exits(base, ExitConfig(), example_inputs=digits.test.tensors[0][:2])
    res = train_exits(multi, digits, ExitTrainConfig(mode="joint", weights=(0.5, 1.0), train=TrainConfig(
        epochs=10, lr=3e-3, batch_size=64, progress=False)))
    assert not torch.equal(before["2.weight"], multi.base.state_dict()["2.weight"])
    assert res.history[-1]["val_top1"] > 0.5
    with pytest.raises(ConfigError, match="weights: 3 given, 2 needed"):
        train_exits(multi, digits, ExitTrainConfig(weights=(1, 1, 1)))


def _poisoned(bundle):
    g = torch.Generator().manual_seed(1)
    x, y = bundle.test.tensors
    bad = TensorDataset(torch.rand(x.shape, generator=g), torch.randint(0, 10, y.shape, generator=g))
    return dataclasses.replace(bundle, test=bad)


def test_calibration_never_reads_the_test_split(trained, digits):
    original, multi = trained
    a = calibrate(multi, CalibrationConfig(budget=1.0), calibration=digits, reference=original)
    b = calibrate(multi, CalibrationConfig(budget=1.0), calibration=_poisoned(digits), reference=original)
    assert a.thresholds == b.thresholds
    assert a.curve == b.curve
    assert a.n_val == len(digits.val)
    # ...while poisoning the validation split does change them (the test could fail).
    c = calibrate(multi, CalibrationConfig(budget=1.0), calibration=dataclasses.replace(
        digits, val=_poisoned(digits).test), reference=original)
    assert c.curve != a.curve


def test_budget_curve_and_real_skipping_agree(trained, digits):
    original, multi = trained
    res = calibrate(multi, CalibrationConfig(budget=2.0, risk=0.5), calibration=digits, reference=original)
    assert res.val_top1 >= res.reference_val_top1 - 0.02 - 1e-9
    assert res.mean_macs < res.full_macs  # exits were worth it
    macs = [p.mean_macs for p in res.curve]
    accs = [p.val_top1 for p in res.curve]
    assert macs == sorted(macs) and accs == sorted(accs)  # Pareto: cheaper is never more accurate
    assert res.curve[-1].val_top1 >= res.reference_val_top1  # "never exit" (= original) is on the curve
    # The runtime (real skipping, batches of 64) reproduces the calibration's figures exactly.
    rep = evaluate_exits(multi, digits.loader("val", 64), split="val")
    assert rep.top1 == pytest.approx(res.val_top1)
    assert rep.shares == pytest.approx(res.shares)
    assert rep.mean_macs == pytest.approx(res.mean_macs)
    tight = calibrate(multi, CalibrationConfig(budget=0.0, risk=0.5), calibration=digits)
    assert tight.val_top1 >= tight.reference_val_top1


def test_entropy_criterion_and_risk(trained, digits):
    original, multi = trained
    ent = calibrate(multi, CalibrationConfig(budget=2.0, criterion="entropy"), calibration=digits,
                    reference=original)
    assert multi.criterion == "entropy" and ent.thresholds != [None, None]
    plain = calibrate(multi, CalibrationConfig(budget=2.0, risk=0.5), calibration=digits, reference=original)
    safe = calibrate(multi, CalibrationConfig(budget=2.0, risk=0.01), calibration=digits, reference=original)
    assert safe.mean_macs >= plain.mean_macs  # a stricter bound never buys a cheaper policy


def test_holdout_checks_the_curve_on_samples_the_search_did_not_see(trained, digits):
    original, multi = trained
    cfg = CalibrationConfig(budget=2.0, risk=0.5, holdout=0.5)
    res = calibrate(multi, cfg, calibration=digits, reference=original)
    again = calibrate(multi, cfg, calibration=digits, reference=original)
    assert res.thresholds == again.thresholds  # the split is seeded
    # the reported figures are the chosen policy's on the whole validation split
    rep = evaluate_exits(multi, digits.loader("val", 64), split="val")
    assert rep.top1 == pytest.approx(res.val_top1) and rep.mean_macs == pytest.approx(res.mean_macs)
    # the search saw only half the samples: its curve differs from the full search's
    full = calibrate(multi, CalibrationConfig(budget=2.0, risk=0.5), calibration=digits, reference=original)
    assert [p.thresholds for p in res.curve] != [p.thresholds for p in full.curve]


def test_save_load_keeps_thresholds_and_outputs(trained, digits, tmp_path):
    original, multi = trained
    calibrate(multi, CalibrationConfig(budget=2.0, criterion="entropy"), calibration=digits,
              reference=original)
    path = ds.save(multi, tmp_path / "m.safetensors")
    back = ds.load(path)
    assert back.thresholds == multi.thresholds and back.criterion == "entropy"
    assert back.points == multi.points
    x = digits.test.tensors[0]
    with torch.no_grad():
        a, b = multi.run(x), back.run(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exits, b.exits)
    assert 0 < int((a.exits < 2).sum()) < len(x)
    meta = ds.read_metadata(path)["spec"]["edits"][-1]
    assert meta["kind"] == "early_exit" and meta["thresholds"] == multi.thresholds


@pytest.mark.parametrize(("path", "value", "field"), [
    (("thresholds", 0), 1.5, "thresholds[0]"),
    (("thresholds",), [0.5], "thresholds"),
    (("exits", 0, "head", "kind"), "os.system", "exits[0].head.kind"),
    (("exits", 0, "head", "in_features"), -3, "exits[0].head.in_features"),
    (("exits", 0, "head", "pool"), 10**9, "exits[0].head.pool"),
    (("exits", 0, "point"), "a b", "exits[0].point"),
    (("criterion",), "vibes", "criterion"),
    (("evil",), 1, "unknown field"),
])
def test_hostile_edits_name_the_field(trained, tmp_path, path, value, field):
    _, multi = trained
    edit = json.loads(json.dumps(multi.exit_edit()))
    target = edit
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(FormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check_exit_edit(edit)


def test_hostile_file_gives_format_error(trained, tmp_path):
    _, multi = trained
    path = ds.save(multi, tmp_path / "m.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["deepshrink"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["spec"]["edits"][-1]["exits"][0]["point"] = "layers.9"
    meta.pop("digest", None)  # crafted as an attacker would: a version-1 file without a digest
    meta["version"] = 1
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"deepshrink": json.dumps(meta)})
    with pytest.warns(UserWarning, match="digest"), \
            pytest.raises(FormatError, match=r"exits\[0\]\.point: the model has no module 'layers.9'"):
        ds.load(bad)


def test_configs_round_trip_and_validate():
    cfgs = [ExitConfig(points=("a", "b"), overrides={"a": {"head": "linear", "hidden": 8}}),
            ExitTrainConfig(mode="heads", weights=(1.0, 0.5), train=TrainConfig(epochs=2)),
            CalibrationConfig(budget=1.0, criterion="entropy", risk=0.05)]
    for cfg in cfgs:
        assert type(cfg).from_json(cfg.to_json()) == cfg
    for bad, field in [(lambda: ExitConfig(head="big"), "ExitConfig.head"),
                       (lambda: ExitConfig(overrides={"(": {}}), "ExitConfig.overrides"),
                       (lambda: ExitConfig(overrides={"a": {"depth": 3}}), r"overrides\['a'\]"),
                       (lambda: ExitTrainConfig(mode="all"), "ExitTrainConfig.mode"),
                       (lambda: CalibrationConfig(budget=-1), "CalibrationConfig.budget"),
                       (lambda: CalibrationConfig(risk=0.9), "CalibrationConfig.risk"),
                       (lambda: CalibrationConfig(holdout=1.0), "CalibrationConfig.holdout")]:
        with pytest.raises(ConfigError, match=field):
            bad()
    cfg = ExitConfig(overrides={"layers\\.0": {"head": "linear"}})
    assert cfg.head_options("layers.0")["head"] == "linear"
