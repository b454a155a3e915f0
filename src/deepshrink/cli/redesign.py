"""`deepshrink factorize` (low-rank) and `deepshrink separable` (depthwise-separable convs): rewrite
a saved model's layers, optionally fine-tune (with KD from the original by default), report per
layer what was rewritten or skipped and why, and write the new model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import typer

from deepshrink.checkpoint import save
from deepshrink.cli.common import JSON_OPTION, emit_json, friendly_errors, out
from deepshrink.cli.core import DATA_DIR, DATASET
from deepshrink.cli.guards import FORCE, MAX_DROP, Warnings, check_drop, commit, staged
from deepshrink.cli.modelio import data_extra, load_model, model_data
from deepshrink.errors import ConfigError
from deepshrink.measure import ResultTable, count_macs, count_params

EPOCHS = typer.Option(0, "--epochs", help="Fine-tuning epochs after the rewrite (0: none).")
LR = typer.Option(5e-4, "--lr", help="Fine-tuning learning rate.")
NO_KD = typer.Option(False, "--no-kd", help="Fine-tune on labels only (default: KD from the original).")
NO_SPEED = typer.Option(False, "--no-speed-check", help="Keep rewritten layers even if not measured faster.")


def _overrides(items: list[str], what: str) -> dict[str, int]:
    res: dict[str, int] = {}
    for item in items:
        name, sep, val = item.rpartition("=")
        if not sep or not name or not val.isdigit():
            raise ConfigError(f"--override expects NAME_REGEX={what}, got {item!r}")
        res[name] = int(val)
    return res


def _run(path: Path, output: Path, data: str | None, data_dir: Path | None, transform: Any,
         epochs: int, lr: float, no_kd: bool, seed: int, as_json: bool,
         guard: tuple[float | None, bool] = (None, False)) -> None:
    """Load, rewrite with ``transform(model, bundle, x) -> RedesignReport``, fine-tune, check the
    drop against ``guard`` (--max-drop, --force), save, report."""
    from deepshrink.redesign import recover
    from deepshrink.train import TrainConfig, evaluate

    if output.exists() and output.resolve() == path.resolve():
        raise ConfigError(f"--output {output} is the input file", hint="choose another output path")
    original = load_model(path)
    bundle = model_data(path, data, data_dir)
    x = bundle.test.tensors[0][:1]
    test = bundle.loader("test", 512)
    before = {"params": count_params(original)[0], "macs": count_macs(original, x)[0],
              "test_top1": evaluate(original, test)["top1"]}
    model = copy.deepcopy(original)
    torch.manual_seed(seed)
    report = transform(model, bundle, x)
    fitted = evaluate(model, test)["top1"]
    if epochs > 0:
        tc = TrainConfig(epochs=epochs, lr=lr, seed=seed, progress=not as_json)
        recover(model, bundle, tc, teacher=None if no_kd else original)
    after = {"params": count_params(model)[0], "macs": count_macs(model, x)[0],
             "test_top1_before_finetune": fitted, "test_top1": evaluate(model, test)["top1"]}
    warns = Warnings()
    with staged(output, (path,)) as tmp:
        drop = check_drop(before["test_top1"], after["test_top1"], *guard, output, warns)
        save(model, tmp, extra={**data_extra(bundle), "redesign": report.to_dict(),
                                "finetune_epochs": epochs, "kd": not no_kd and epochs > 0})
        commit(tmp, output)
    res = {"input": str(path), "output": str(output), "before": before, "after": after,
           "drop_pt": drop, "warnings": warns, **report.to_dict()}
    if as_json:
        emit_json(res)
        return
    report.table().print(out)
    for note in report.notes:
        out.print(note)
    t = ResultTable(f"{report.transform} -> {output}")
    t.add(model="original", params=before["params"], MACs=before["macs"], top1=before["test_top1"])
    t.add(model="rewritten", params=after["params"], MACs=after["macs"], top1=after["test_top1"],
          top1_before_finetune=fitted)
    t.print(out)


def register(app: typer.Typer) -> None:
    @app.command("factorize")
    @friendly_errors
    def factorize_cmd(
        path: Path = typer.Argument(..., help="A model file written by deepshrink."),
        output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write."),
        rank: int | None = typer.Option(None, help="A fixed rank for every layer."),
        energy: float | None = typer.Option(None, help="Keep this fraction of the spectral energy."),
        budget: float | None = typer.Option(None, help="Whole-model params (or MACs) kept, e.g. 0.3."),
        metric: str = typer.Option("params", help="Budget metric: params or macs."),
        conv: str = typer.Option("svd", help="Conv2d form: svd (kxk + 1x1), tucker2 or cp."),
        override: list[str] = typer.Option([], help="NAME_REGEX=RANK for matching layers; repeatable."),
        ignore: list[str] = typer.Option([], help="Layer-name regex never factorized; repeatable."),
        config: Path | None = typer.Option(None, help="LowRankConfig as JSON/YAML (options override it)."),
        no_speed_check: bool = NO_SPEED,
        data: str | None = DATASET, data_dir: Path | None = DATA_DIR, epochs: int = EPOCHS, lr: float = LR,
        no_kd: bool = NO_KD, seed: int = typer.Option(0), max_drop: float | None = MAX_DROP,
        force: bool = FORCE, as_json: bool = JSON_OPTION,
    ) -> None:
        """Low-rank factorization of Linear/Conv2d layers (truncated SVD / Tucker-2 / CP)."""
        from deepshrink.redesign import LowRankConfig, factorize_with_report

        cfg = LowRankConfig.from_file(config) if config else LowRankConfig()
        if rank is not None or energy is not None or budget is not None:
            # the options choose the mode, replacing the config file's
            cfg = LowRankConfig.from_dict({**cfg.to_dict(), "rank": rank, "energy": energy, "budget": budget})
        cfg = cfg.override(budget_metric=metric, conv=conv, overrides=_overrides(override, "RANK") or None,
                           ignore=tuple(ignore) or None, check_speed=False if no_speed_check else None)
        _run(path, output, data, data_dir,
             lambda m, b, x: factorize_with_report(m, cfg, example_inputs=x, calibration=b),
             epochs, lr, no_kd, seed, as_json, (max_drop, force))

    @app.command("separable")
    @friendly_errors
    def separable_cmd(
        path: Path = typer.Argument(..., help="A model file written by deepshrink."),
        output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write."),
        multiplier: int | None = typer.Option(None, help="Depthwise channels per input channel."),
        between: str | None = typer.Option(None, help="Between the pair: none, bn or bn_relu."),
        layer: list[str] = typer.Option([], help="Layer-name regex to replace (default: all); repeatable."),
        ignore: list[str] = typer.Option([], help="Layer-name regex never replaced; repeatable."),
        budget: float | None = typer.Option(None, help="Replace layers until MACs are this fraction."),
        config: Path | None = typer.Option(None, help="SeparableConfig as JSON/YAML (options override it)."),
        no_speed_check: bool = NO_SPEED,
        data: str | None = DATASET, data_dir: Path | None = DATA_DIR, epochs: int = EPOCHS, lr: float = LR,
        no_kd: bool = NO_KD, seed: int = typer.Option(0), max_drop: float | None = MAX_DROP,
        force: bool = FORCE, as_json: bool = JSON_OPTION,
    ) -> None:
        """Depthwise-separable substitution of k x k convolutions, fitted on calibration data."""
        from deepshrink.redesign import SeparableConfig, separate_with_report

        cfg = SeparableConfig.from_file(config) if config else SeparableConfig()
        cfg = cfg.override(multiplier=multiplier, between=between, layers=tuple(layer) or None,
                           ignore=tuple(ignore) or None, budget=budget,
                           check_speed=False if no_speed_check else None)
        _run(path, output, data, data_dir,
             lambda m, b, x: separate_with_report(m, cfg, calibration=b),
             epochs, lr, no_kd, seed, as_json, (max_drop, force))


def print_rewrites(rows: list[dict[str, Any]]) -> None:
    """The table `deepshrink info` shows for a model with redesign edits."""
    t = ResultTable("rewritten layers (architecture redesign)")
    for r in rows:
        t.add(layer=r["layer"], edit=r["edit"], form=r["form"],
              rank="x".join(map(str, r["rank"])) if r.get("rank") else f"multiplier {r.get('multiplier')}",
              shape=r["shape"])
    t.print(out)
