"""`deepshrink early-exit`: attach exit heads, train them, calibrate the exit policy on the
validation split to an accuracy budget, report the test split; and the exit summary that
`evaluate` and `info` print for multi-exit models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import typer
from rich.table import Table

from deepshrink.checkpoint import read_metadata, save
from deepshrink.cli.common import JSON_OPTION, emit_json, friendly_errors, out
from deepshrink.cli.modelio import data_extra, load_model, model_data
from deepshrink.early_exit import (
    CalibrationConfig,
    ExitConfig,
    ExitReport,
    ExitTrainConfig,
    MultiExitModel,
    add_exits,
    calibrate,
    evaluate_exits,
    train_exits,
)
from deepshrink.errors import ConfigError
from deepshrink.train import evaluate


def exit_summary(net: Any, loader: Any = None, path: Path | None = None) -> dict[str, Any] | None:
    """For a multi-exit model: exits, thresholds, and either the shares / mean MACs measured on
    ``loader`` or those recorded in the file at save time. ``None`` for other models."""
    if not isinstance(net, MultiExitModel):
        return None
    info: dict[str, Any] = {"points": net.points, "criterion": net.criterion, "thresholds": net.thresholds}
    if loader is not None:
        info.update(evaluate_exits(net, loader).to_dict())
    elif path is not None and path.suffix == ".safetensors":
        recorded = read_metadata(path).get("extra", {}).get("test")
        if isinstance(recorded, dict) and "shares" in recorded:
            info["recorded_test"] = {k: recorded.get(k) for k in ("top1", "shares", "mean_macs", "full_macs")}
    return info


def print_exit_summary(info: dict[str, Any]) -> None:
    measured = info.get("shares") is not None
    rec = info.get("recorded_test") or {}
    shares = info.get("shares") or rec.get("shares")
    t = Table(title=f"exits ({info['criterion']}; shares {'measured' if measured else 'recorded at save'})")
    for col in ("exit", "point", "threshold", "share"):
        t.add_column(col)
    for k, point in enumerate([*info["points"], "(final)"]):
        th = info["thresholds"][k] if k < len(info["thresholds"]) else None
        t.add_row(str(k), point, "-" if th is None else f"{th:.4f}",
                  "?" if shares is None else f"{100 * shares[k]:.1f} %")
    out.print(t)
    macs, full = info.get("mean_macs") or rec.get("mean_macs"), info.get("full_macs") or rec.get("full_macs")
    if macs and full:
        out.print(f"mean MACs per sample {macs:,.0f} (full model {full:,}; {full / macs:.2f}x fewer)")


def _print_result(res: dict[str, Any]) -> None:
    t = Table(title="trade-off on the validation split (Pareto points, cheapest first)")
    for col in ("mean MACs", "val top-1", "shares"):
        t.add_column(col)
    for p in res["calibration"]["curve"]:
        t.add_row(f"{p['mean_macs']:,.0f}", f"{100 * p['val_top1']:.2f} %",
                  " / ".join(f"{100 * s:.0f}" for s in p["shares"]))
    out.print(t)
    rep = res["test"]
    print_exit_summary(rep)
    out.print(f"test top-1 {100 * rep['top1']:.2f} % (original {100 * res['original_test_top1']:.2f} %), "
              f"{rep['mac_reduction']:.2f}x fewer mean MACs -> {res['output']}")


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``.

    Long only because typer declares each CLI option as a parameter of the nested command
    function (one per option); the work is done by this module's short helpers.
    """
    @app.command("early-exit",
                 help=("Early exits (BranchyNet): heads at intermediate layers, calibrated on "
                 "validation."))
    @friendly_errors
    def early_exit_cmd(
        path: Path = typer.Argument(..., help="A model file (or a multi-exit file to recalibrate)."),
        output: Path = typer.Option(..., "--output", "-o", help="Multi-exit checkpoint to write."),
        data: str | None = typer.Option(None, "--data", "-d", help="digits, fashion-mnist, mnist, IDX "
                                        "dir (default: the file's recorded dataset)."),
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Directory of IDX files."),
        budget: float = typer.Option(0.5, help="Accuracy points the exits may lose on validation."),
        points: str | None = typer.Option(None, help="Comma-separated module names (default: suggested)."),
        head: str | None = typer.Option(None, help="Head kind (auto, pool_linear, ...)."),
        pool: int | None = typer.Option(None, help="Pooled grid side of image heads."),
        hidden: int | None = typer.Option(None, help="Hidden width of the heads (0 = none)."),
        mode: str | None = typer.Option(None, help="heads (frozen backbone + KD) or joint."),
        criterion: str | None = typer.Option(None, help="confidence (max softmax) or entropy."),
        risk: float | None = typer.Option(None, help="Calibration risk (0.5 = plain validation estimate)."),
        holdout: float | None = typer.Option(None, help="Share of validation kept out of the search to "
                                             "check the budget (e.g. 0.5)."),
        epochs: int | None = typer.Option(None, help="Training epochs of the exits (0: recalibrate only)."),
        lr: float | None = typer.Option(None, help="Learning rate."),
        onnx: Path | None = typer.Option(None, help="Export ONNX stages + If graph here."),
        seed: int = typer.Option(0),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Early exits (BranchyNet): heads at intermediate layers, calibrated on validation.

        Long only because of its option list (one parameter per CLI option); the body is
        short and the work is in this module's helpers.
        """
        if output.exists() and path.exists() and output.resolve() == path.resolve():
            raise ConfigError(f"--output {output} is the input model file", hint="choose another output path")
        net = load_model(path)
        bundle = model_data(path, data, data_dir)
        torch.manual_seed(seed)
        tc = ExitTrainConfig(mode="heads").override(mode=mode)
        tc = tc.override(train=tc.train.override(epochs=epochs if epochs is not None else 5, lr=lr,
                                                 seed=seed, progress=not as_json))
        if isinstance(net, MultiExitModel):
            multi, original = net, None
        else:
            cfg = ExitConfig().override(points=tuple(p for p in points.split(",") if p) if points else None,
                                        head=head, pool=pool, hidden=hidden)
            original = copy.deepcopy(net)
            multi = add_exits(net, cfg, example_inputs=bundle.test.tensors[0][:2])
        if tc.train.epochs > 0:
            train_exits(multi, bundle, tc)
        cal = calibrate(multi, CalibrationConfig(budget=budget).override(criterion=criterion, risk=risk,
                                                                          holdout=holdout),
                        calibration=bundle, reference=original)
        test_loader = bundle.loader("test", 512)
        rep: ExitReport = evaluate_exits(multi, test_loader, costs=cal.costs)
        orig_top1 = evaluate(original, test_loader)["top1"] if original is not None else None
        if orig_top1 is None:
            with multi.all_heads():
                orig_top1 = evaluate(multi, test_loader)["top1"]  # the final head = the full model
        save(multi, output, extra={**data_extra(bundle), "budget_pt": budget, "test": rep.to_dict(),
                                   "calibration": {k: v for k, v in cal.to_dict().items() if k != "curve"}})
        res = {"output": str(output), "original_test_top1": orig_top1, "test": rep.to_dict(),
               "calibration": cal.to_dict(), "train": tc.to_dict()}
        if onnx is not None:
            from deepshrink.early_exit.onnx import export_exits_onnx

            res["onnx"] = str(export_exits_onnx(multi, onnx, bundle.test.tensors[0][:1]))
        if as_json:
            emit_json(res)
        else:
            _print_result(res)
