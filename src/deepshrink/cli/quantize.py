"""`deepshrink quantize`: post-training quantization (or QAT with ``--qat --epochs N``) of a saved
model, written as ONNX (run in ONNX Runtime) or packed safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from deepshrink.cli.common import JSON_OPTION, emit_json, friendly_errors, out
from deepshrink.cli.guards import (
    FORCE,
    MAX_DROP,
    Warnings,
    check_drop,
    check_size,
    check_speed,
    commit,
    ratio_text,
    staged,
)
from deepshrink.cli.modelio import data_extra, load_model, model_data, onnx_with_record
from deepshrink.cli.options import SESSION
from deepshrink.errors import ConfigError
from deepshrink.measure import Speedup
from deepshrink.progress import step


def _check(output: Path, epochs: int) -> None:
    if output.suffix not in (".onnx", ".safetensors"):
        raise ConfigError(f"--output must end in .onnx or .safetensors, got {output.name!r}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")


def _check_bits(output: Path, cfg: Any, warns: Warnings) -> None:
    if output.suffix == ".onnx" and cfg.bits < 8:
        warns.add(f"ONNX stores {cfg.bits}-bit weights as int8: the file is as large as 8-bit "
                  "(write .safetensors, packed, or compress to .dsz for the smaller file)")


def _ptq_config(config: Path | None, **fields: Any) -> Any:
    from deepshrink.quantization import PTQConfig

    if config is not None:
        return PTQConfig.from_file(config)
    alpha = fields.pop("smooth_alpha")
    return PTQConfig(smooth_alpha=None if alpha is None or alpha < 0 else alpha, **fields)


def _qat(model: Any, bundle: Any, ptq: Any, epochs: int, lr: float, as_json: bool) -> Any:
    """Quantization-aware training with the PTQ options' bits and ranges: static mode also
    fake-quantizes activations (8-bit); weight-only and dynamic train weights only."""
    from deepshrink.quantization import QATConfig, convert, prepare_qat
    from deepshrink.train import TrainConfig, train

    cfg = QATConfig(bits=ptq.bits, act_bits=8 if ptq.mode == "static" else None,
                    granularity=ptq.granularity, group_size=ptq.group_size,
                    weight_range=ptq.weight_range, ignore=ptq.ignore, overrides=ptq.overrides)
    prepare_qat(model, cfg, calibration=bundle)
    train(model, bundle, TrainConfig(epochs=epochs, lr=lr, progress=not as_json, keep_best=True))
    return convert(model)


def _write(q: Any, tmp: Path, path: Path, bundle: Any) -> Any:
    """Write ``q`` to ``tmp`` (ONNX or packed safetensors); return a runner for the evaluation."""
    from deepshrink.checkpoint import save
    from deepshrink.quantization import OrtModel, export_onnx

    if tmp.suffix == ".onnx":
        data = onnx_with_record(export_onnx(q, None, bundle.test.tensors[0][:2]), bundle)
        tmp.write_bytes(data)
        return OrtModel(data, threads=SESSION.threads)
    save(q, tmp, extra=data_extra(bundle), protect=(path,))
    return load_model(tmp)


def _print(res: dict[str, Any]) -> None:
    acc = (f"  top-1 {100 * res['input_top1']:.2f}% -> {100 * res['output_top1']:.2f}%"
           if res.get("output_top1") is not None else "")
    out.print(f"{res['input']} ({res['input_bytes']:,} B) -> {res['output']} ({res['output_bytes']:,} B, "
              f"{ratio_text(res['input_bytes'], res['output_bytes'])}){acc}", highlight=False)
    sp = res["speedup"]
    out.print(f"speed vs input at batch {sp['batch']}: {Speedup(sp['ratio'], sp['low'], sp['high'])}",
              highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``.

    Long only because typer declares each CLI option as a parameter of the nested command
    function (one per option); the work is done by this module's short helpers.
    """
    @app.command("quantize",
                 help=("Quantize a model (post-training, or QAT) and write it; reports bytes and "
                 "accuracy and refuses to write a result past --max-drop."))
    @friendly_errors
    def quantize_cmd(
        path: Path = typer.Argument(..., help="A model file (see `deepshrink info`)."),
        output: Path = typer.Option(..., "--output", "-o",
                                    help=".onnx (integer execution in ONNX Runtime) or .safetensors "
                                         "(packed, loadable with deepshrink.load)."),
        bits: int = typer.Option(8, help="Weight bits, 1-8 (1 = binary, 2 = ternary)."),
        mode: str = typer.Option("dynamic", help="weight-only | dynamic | static."),
        calib: str | None = typer.Option(None, "--calib", "--data", "-d",
                                         help="Calibration/evaluation dataset (digits, fashion-mnist, "
                                              "mnist or an IDX dir); default: the one in the file."),
        calibration_batches: int = typer.Option(8, help="Calibration batches of 64."),
        act_granularity: str = typer.Option("auto", help="Dynamic linears: tensor | token | auto."),
        smooth_alpha: float | None = typer.Option(0.5, help="SmoothQuant strength in [0, 1]; "
                                                              "negative: off."),
        target_cosine: float | None = typer.Option(None, help="Keep the most sensitive layers float "
                                                               "until the output cosine reaches this."),
        granularity: str = typer.Option("channel", help="tensor | channel | group."),
        group_size: int = typer.Option(64, help="Weights per group (granularity group)."),
        weight_range: str = typer.Option("mse", help="minmax | percentile | mse."),
        act_range: str = typer.Option("percentile", help="minmax | moving_average | percentile | mse."),
        config: Path | None = typer.Option(None, help="PTQConfig as JSON/YAML (overrides the flags)."),
        qat: bool = typer.Option(False, "--qat", help="Quantization-aware training instead of PTQ "
                                 "(static mode: 8-bit activations too)."),
        epochs: int = typer.Option(2, help="--qat: training epochs."),
        lr: float = typer.Option(5e-4, help="--qat: learning rate."),
        do_eval: bool = typer.Option(True, "--eval/--no-eval", help="Test accuracy before and after."),
        max_drop: float | None = MAX_DROP,
        force: bool = FORCE,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Quantize a model (post-training, or QAT) and write it; reports bytes and accuracy and
        refuses to write a result past --max-drop.

        Long only because of its option list (one parameter per CLI option); the body is
        short and the work is in this module's helpers.
        """
        from deepshrink.measure import file_bytes
        from deepshrink.quantization import quantize
        from deepshrink.train import evaluate

        _check(output, epochs)
        cfg = _ptq_config(config, mode=mode, bits=bits, granularity=granularity, group_size=group_size,
                          weight_range=weight_range, act_range=act_range,
                          calibration_batches=calibration_batches, act_granularity=act_granularity,
                          smooth_alpha=smooth_alpha, target_cosine=target_cosine)
        model, warns = load_model(path), Warnings()
        bundle = model_data(path, calib, None)
        test = bundle.loader("test", 512)
        res: dict = {"input": str(path), "output": str(output), "config": cfg.to_dict(), "qat": qat,
                     "dataset": bundle.name, "input_bytes": file_bytes(path), "output_top1": None}
        with step("evaluating the input model", enabled=not as_json):
            res["input_top1"] = evaluate(model, test)["top1"] if do_eval else None
        if qat:
            q = _qat(model, bundle, cfg, epochs, lr, as_json)
        else:
            with step(f"quantizing ({cfg.mode}, {cfg.bits}-bit; calibration)", enabled=not as_json):
                q = quantize(model, cfg, calibration=bundle)
        _check_bits(output, cfg, warns)
        with staged(output, (path,)) as tmp:
            runner = _write(q, tmp, path, bundle)
            if do_eval:
                with step("evaluating the quantized model", enabled=not as_json):
                    res["output_top1"] = evaluate(runner, test)["top1"]
            res["drop_pt"] = check_drop(res["input_top1"], res["output_top1"], max_drop, force, output, warns)
            commit(tmp, output)
        with step("timing the input and the result (batch 1)", enabled=not as_json):
            sp, batch = check_speed(load_model(path), runner, bundle.test.tensors[0][:1], warns)
            res["speedup"] = {**sp.to_dict(), "batch": batch}
        res["output_bytes"] = file_bytes(output)
        res["size_ratio"] = res["input_bytes"] / res["output_bytes"]
        check_size(res["input_bytes"], res["output_bytes"], warns)
        res["warnings"] = warns
        emit_json(res) if as_json else _print(res)
