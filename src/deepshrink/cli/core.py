"""Core commands: train, evaluate, info, demo."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from deepshrink import distributed
from deepshrink.checkpoint import save
from deepshrink.cli.common import (
    DEVICE_OPTION,
    JSON_OPTION,
    emit_json,
    err,
    first_images,
    friendly_errors,
    out,
)
from deepshrink.cli.modelio import (
    check_inputs,
    data_extra,
    dataset,
    example_input,
    factory_kwargs,
    load_model,
    model_data,
    parse_model_args,
)
from deepshrink.cli.options import SESSION
from deepshrink.measure import measure_model
from deepshrink.models import create_model
from deepshrink.progress import step
from deepshrink.train import TrainConfig, evaluate, train

DATASET = typer.Option(None, "--data", "-d",
                       help="digits (embedded), fashion-mnist, mnist, or a directory of IDX files. "
                            "Default: the dataset the model file records.")
TRAIN_DATASET = typer.Option("digits", "--data", "-d",
                             help="digits (embedded), fashion-mnist, mnist, or a directory of IDX files.")
MODEL_ARG = typer.Option([], "--model-arg", help="NAME=VALUE passed to the model factory (VALUE as "
                         "JSON, else a string); repeat.")
DATA_DIR = typer.Option(None, "--data-dir", help="Directory of IDX files (overrides auto-detection).")


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``.

    Long only because typer declares each CLI option as a parameter of the nested command
    function (one per option); the work is done by this module's short helpers.
    """
    @app.command("train")
    @friendly_errors
    def train_cmd(
        model: str = typer.Option(..., "--model", "-m", help="Registry name or module:callable "
                                  "(called with in_size / in_channels / num_classes where it takes "
                                  "them, plus --model-arg), or a model file / save_pretrained "
                                  "folder to fine-tune."),
        output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write (.safetensors)."),
        data: str = TRAIN_DATASET,
        data_dir: Path | None = DATA_DIR,
        model_arg: list[str] = MODEL_ARG,
        model_args: str | None = typer.Option(None, help="JSON object of model arguments."),
        config: Path | None = typer.Option(None, help="TrainConfig as JSON/YAML."),
        epochs: int | None = typer.Option(None, help="Override config epochs."),
        lr: float | None = typer.Option(None, help="Override config learning rate."),
        seed: int = typer.Option(0),
        device: str | None = DEVICE_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Train a model and save a rebuildable safetensors checkpoint. Runs data-parallel when
        launched by torchrun (see the README)."""
        bundle = dataset(data, data_dir, path=Path(model))
        if Path(model).exists():  # a model file or save_pretrained folder: fine-tune it
            net = load_model(Path(model))
        else:
            torch.manual_seed(seed)
            kwargs = factory_kwargs(model, bundle, parse_model_args(model_arg, model_args))
            net = create_model(model, **kwargs)
        cfg = (TrainConfig.from_file(config) if config else TrainConfig()).override(
            epochs=epochs, lr=lr, seed=seed, device=device)
        check_inputs(net, first_images(bundle, "train"), f"{bundle.name} images")
        result = train(net, bundle, cfg)
        test = evaluate(net, bundle.loader("test", 512))
        distributed.on_main(save, net, output, extra={**data_extra(bundle, data), "train": cfg.to_dict(),
                                                      "test": test})
        res = {"model": model, "output": str(output), "test": test, "history": result.history}
        if as_json:
            emit_json(res)
        else:
            out.print(f"test top-1 {100 * test['top1']:.2f}%  top-5 {100 * test['top5']:.2f}%  "
                      f"-> {output}")

    @app.command("evaluate")
    @friendly_errors
    def evaluate_cmd(
        path: Path = typer.Argument(..., help="A model file written by deepshrink."),
        data: str = DATASET,
        data_dir: Path | None = DATA_DIR,
        split: str = typer.Option("test", help="test (held out) or val."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Top-1/top-5 accuracy of a saved model on a held-out split."""
        from deepshrink.cli.early_exit import exit_summary, print_exit_summary

        net = load_model(path)
        bundle = model_data(path, data, data_dir)
        check_inputs(net, first_images(bundle, split), f"{bundle.name} images", path)
        with step(f"evaluating {path.name} on {bundle.name} ({split})", enabled=not as_json):
            res = evaluate(net, bundle.loader(split, 512))
        exits = exit_summary(net, bundle.loader(split, 512))  # multi-exit: shares, mean MACs
        if as_json:
            emit_json({"path": str(path), "split": split, **res, **({"exits": exits} if exits else {})})
        else:
            out.print(f"{path}: {split} top-1 {100 * res['top1']:.2f}%  top-5 "
                      f"{100 * res['top5']:.2f}%  (n={res['n']})")
            if exits:
                print_exit_summary(exits)

    @app.command("info")
    @friendly_errors
    def info_cmd(
        path: Path = typer.Argument(..., help="A model file written by deepshrink."),
        shape_opt: str | None = typer.Option(None, "--input-shape", help="Input shape without "
                                             "batch, for MACs (default: the file's record)."),
        latency: bool = typer.Option(False, help="Also time batch 1 and 256."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Summary: parameters, MACs, bytes on disk, sparsity per layer."""
        example = example_input(path, shape_opt)
        net = load_model(path)
        check_inputs(net, example, "inputs", path)
        with step(f"measuring {path.name}" + (" (timing batch 1 and 256)" if latency else ""),
                  enabled=not as_json):
            rep = measure_model(net, example, name=path.name, file=path,
                                latency_batches=(1, 256) if latency else ())
        if getattr(net, "onnx_params", None):  # an ONNX graph: weights live in the graph, not torch
            rep.params = rep.nonzero = net.onnx_params
            rep.macs = None  # torch sees no layers in it: 0 MACs would be a wrong figure
        from deepshrink.cli.early_exit import exit_summary, print_exit_summary
        from deepshrink.dsz import dsz_info, is_dsz  # .dsz files also show their sections
        from deepshrink.models import get_spec
        from deepshrink.redesign import rewritten_layers  # low-rank / separable layers and ranks

        with path.open("rb") as f:
            dsz = dsz_info(path) if is_dsz(f.read(8)) else None
        rewrites = rewritten_layers(get_spec(net))
        exits = exit_summary(net, path=path)
        if as_json:
            extra = {**({"dsz": dsz} if dsz else {}), **({"exits": exits} if exits else {}),
                     **({"rewritten": rewrites} if rewrites else {})}
            emit_json({**rep.to_dict(), **extra})
        else:
            rep.summary_table().print(out)
            rep.layer_table().print(out)
            if rewrites:
                from deepshrink.cli.redesign import print_rewrites

                print_rewrites(rewrites)
            if exits:
                print_exit_summary(exits)
            if dsz:
                from deepshrink.cli.compress import print_dsz_info

                print_dsz_info(dsz)

    @app.command("demo")
    @friendly_errors
    def demo_cmd(
        output: Path = typer.Option(Path("demo-out"), "--output", "-o", help="Directory for files."),
        quick: bool = typer.Option(False, help="Fewer epochs (for tests)."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Train on the embedded digits data and run the whole compression pipeline."""
        from deepshrink.demo import run_demo

        table = run_demo(output, quick=quick, progress=not as_json, threads=SESSION.threads)
        if as_json:
            emit_json(table.to_dict())
        else:
            table.print(out)
            err.print(f"files in {output}/, results in {output}/demo.json")
        if (output / "report.html").exists():  # the workflow stage's run, as an HTML report
            err.print(f"report: {(output / 'report.html').resolve()}")
