"""`deepshrink quantize`: PTQ of a saved model to ONNX (run in ONNX Runtime) or packed safetensors."""

from __future__ import annotations

from pathlib import Path

import typer

from deepshrink.cli.common import JSON_OPTION, emit_json, friendly_errors, out
from deepshrink.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @friendly_errors
    def quantize_cmd(
        path: Path = typer.Argument(..., help="Model file written by deepshrink (.safetensors)."),
        output: Path = typer.Option(..., "--output", "-o",
                                    help=".onnx (integer execution in ONNX Runtime) or .safetensors "
                                         "(packed, loadable with deepshrink.load)."),
        bits: int = typer.Option(8, help="Weight bits, 1-8 (1 = binary, 2 = ternary)."),
        mode: str = typer.Option("dynamic", help="weight-only | dynamic | static."),
        calib: str | None = typer.Option(None, "--calib",
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
        do_eval: bool = typer.Option(True, "--eval/--no-eval", help="Test accuracy before and after."),
        threads: int = typer.Option(1, help="ONNX Runtime threads for the evaluation."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Quantize a model (post-training) and write it; reports bytes and accuracy."""
        from deepshrink.checkpoint import load, read_metadata, save
        from deepshrink.data import load_dataset
        from deepshrink.fileio import atomic_path
        from deepshrink.measure import file_bytes
        from deepshrink.quantization import OrtModel, PTQConfig, export_onnx, quantize
        from deepshrink.train import evaluate

        if output.suffix not in (".onnx", ".safetensors"):
            raise ConfigError(f"--output must end in .onnx or .safetensors, got {output.name!r}")
        if output.exists() and path.exists() and output.resolve() == path.resolve():
            raise ConfigError(f"refusing to overwrite the input file {path}", hint="choose another -o")
        if config is not None:
            cfg = PTQConfig.from_file(config)
        else:
            cfg = PTQConfig(mode=mode, bits=bits, granularity=granularity, group_size=group_size,
                            weight_range=weight_range, act_range=act_range,
                            calibration_batches=calibration_batches, act_granularity=act_granularity,
                            smooth_alpha=None if smooth_alpha is None or smooth_alpha < 0 else smooth_alpha,
                            target_cosine=target_cosine)
        model = load(path)
        dataset = calib
        if dataset is None:
            try:
                dataset = (read_metadata(path).get("extra") or {}).get("dataset")
            except Exception:  # not a safetensors checkpoint: fall back to the default
                dataset = None
        bundle = load_dataset(dataset or "digits")
        test = bundle.loader("test", 512)
        res: dict = {"input": str(path), "output": str(output), "config": cfg.to_dict(),
                     "dataset": bundle.name, "input_bytes": file_bytes(path)}
        if do_eval:
            res["input_top1"] = evaluate(model, test)["top1"]
        q = quantize(model, cfg, calibration=bundle)
        if output.suffix == ".onnx":
            data = export_onnx(q, None, bundle.test.tensors[0][:2])
            with atomic_path(output, protect=(path,)) as tmp:
                tmp.write_bytes(data)
            runner = OrtModel(output, threads=threads) if do_eval else None
        else:
            with atomic_path(output, protect=(path,)) as tmp:
                save(q, tmp)
            runner = load(output) if do_eval else None
        res["output_bytes"] = file_bytes(output)
        res["size_ratio"] = res["input_bytes"] / res["output_bytes"]
        if runner is not None:
            res["output_top1"] = evaluate(runner, test)["top1"]
            res["drop_pt"] = 100 * (res["input_top1"] - res["output_top1"])
        if as_json:
            emit_json(res)
        else:
            acc = (f"  top-1 {100 * res['input_top1']:.2f}% -> {100 * res['output_top1']:.2f}%"
                   if runner is not None else "")
            out.print(f"{path} ({res['input_bytes']:,} B) -> {output} ({res['output_bytes']:,} B, "
                      f"{res['size_ratio']:.2f}x smaller){acc}")
