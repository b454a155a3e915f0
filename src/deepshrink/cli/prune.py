"""`deepshrink prune`: unstructured (weight) or channel pruning of a saved model, with optional
fine-tuning, written as a compact sparse file (weights) or a smaller architecture (channels)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import typer

from deepshrink.checkpoint import load, save
from deepshrink.cli.common import JSON_OPTION, emit_json, friendly_errors, out
from deepshrink.errors import ConfigError
from deepshrink.measure import ResultTable, count_params, file_bytes

METHODS = ("magnitude", "layer", "global", "threshold", "quality", "channel")
SCHEDULES = ("oneshot", "iterative", "gradual")


def _overrides(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, val = item.rpartition("=")
        try:
            out[name] = float(val)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(f"--override expects NAME=AMOUNT (a layer name or regex), got {item!r}")
    return out


def _unstructured_config(method: str, ratio: float, scope: str, threshold: float | None,
                         quality: float | None, overrides: dict[str, float], skip_last: bool,
                         config: Path | None) -> Any:
    from deepshrink.pruning import UnstructuredConfig

    if config is not None:
        return UnstructuredConfig.from_file(config)
    if method in ("layer", "global"):
        method, scope = "magnitude", method
    return UnstructuredConfig(ratio=ratio, method=method, scope=scope, threshold=threshold,
                              quality=quality, overrides=overrides, skip_last=skip_last)


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @friendly_errors
    def prune_cmd(
        input: Path = typer.Argument(..., help="A model file written by deepshrink."),
        output: Path = typer.Option(..., "--output", "-o", help="Pruned model file to write."),
        method: str = typer.Option("magnitude", help=f"One of {', '.join(METHODS)}. 'layer'/'global' "
                                   "are magnitude pruning with that scope; 'channel' is structured."),
        ratio: float = typer.Option(0.5, help="Fraction of weights (or channels) to remove, in [0, 1)."),
        scope: str = typer.Option("layer", help="magnitude: prune each layer to the ratio, or 'global'."),
        threshold: float | None = typer.Option(None, help="threshold: remove weights with |w| < T."),
        quality: float | None = typer.Option(None, help="quality: remove |w| < q * std(w) per layer."),
        override: list[str] = typer.Option([], help="NAME=AMOUNT per layer (name or regex); repeat."),
        skip_last: bool = typer.Option(False, help="Leave the last layer (the classifier) dense."),
        importance: str = typer.Option("l1", help="channel: l1, l2, activation, apoz or taylor."),
        hidden: bool = typer.Option(False, help="channel: also prune the hidden size (residual "
                                    "stream, embeddings, norms); recover by fine-tuning."),
        config: Path | None = typer.Option(None, help="UnstructuredConfig / ChannelConfig as JSON/YAML."),
        schedule: str = typer.Option("oneshot", help=f"One of {', '.join(SCHEDULES)} (unstructured)."),
        rounds: int = typer.Option(3, help="iterative: prune/fine-tune rounds; gradual: pruning steps."),
        spacing: str = typer.Option("geometric", help="iterative: 'geometric' (same share of what is "
                                    "left each round) or 'cubic' (big steps first, small near the target)."),
        epochs: int = typer.Option(0, help="Fine-tune epochs (per round when iterative)."),
        lr: float = typer.Option(1e-3, help="Fine-tune learning rate."),
        data: str = typer.Option("digits", "--data", "-d", help="digits, fashion-mnist, mnist or a "
                                 "directory of IDX files: fine-tuning, calibration and the report."),
        data_dir: Path | None = typer.Option(None, help="Directory of IDX files."),
        evaluate_acc: bool = typer.Option(False, "--evaluate", help="Report test accuracy even "
                                          "without fine-tuning (needs --data to match the model)."),
        input_shape: str = typer.Option("1,28,28", help="channel: input shape (no batch) when no "
                                        "data is loaded."),
        fmt: str = typer.Option("compact", "--format", help="unstructured: 'compact' (relative-index "
                                "sparse file, smaller) or 'dense' (ordinary checkpoint with zeros)."),
        seed: int = typer.Option(0),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Prune a saved model; never overwrites the input file."""
        from deepshrink.data import load_dataset
        from deepshrink.fileio import atomic_path
        from deepshrink.pruning import (
            ChannelConfig,
            GradualPruning,
            MaskCallback,
            gradual_frequency,
            iterative_prune,
            make_permanent,
            prune,
            save_sparse,
        )
        from deepshrink.train import TrainConfig, evaluate, train

        if method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if fmt not in ("compact", "dense"):
            raise ConfigError(f"--format must be 'compact' or 'dense', got {fmt!r}")
        if rounds < 1 or epochs < 0:
            raise ConfigError(f"--rounds must be >= 1 and --epochs >= 0, got {rounds}, {epochs}")
        torch.manual_seed(seed)
        model = load(input)
        in_bytes = file_bytes(input)
        total0, nz0 = count_params(model)
        channel = method == "channel"
        needs_data = epochs > 0 or schedule != "oneshot" or evaluate_acc or (
            channel and importance in ("activation", "apoz", "taylor"))
        bundle = load_dataset(data, data_dir) if needs_data else None
        ft = TrainConfig(epochs=max(epochs, 1), lr=lr, seed=seed, keep_best=schedule != "gradual",
                         progress=not as_json)
        acc_before = evaluate(model, bundle.loader("test", 512))["top1"] if bundle else None
        info: dict[str, Any] = {}

        if channel:
            cfg: Any = (ChannelConfig.from_file(config) if config else
                        ChannelConfig(ratio=ratio, importance=importance, overrides=_overrides(override),
                                      hidden=hidden))
            if bundle is not None:
                example = bundle.test.tensors[0][:2]
            else:
                try:
                    example = torch.rand(2, *(int(s) for s in input_shape.split(",")))
                except ValueError as exc:
                    raise ConfigError(f"--input-shape must be comma-separated ints, "
                                      f"got {input_shape!r}") from exc
            calib = bundle.loader("train", 64, seed=seed) if bundle is not None else None
            model = prune(model, cfg, example_inputs=example, calibration=calib)
            if epochs > 0:
                train(model, bundle, ft)
            with atomic_path(output, protect=(input,)) as tmp:
                save(model, tmp, extra={"pruning": cfg.to_dict()})
        else:
            cfg = _unstructured_config(method, ratio, scope, threshold, quality, _overrides(override),
                                       skip_last, config)
            if schedule == "iterative":
                _, hist = iterative_prune(model, cfg, bundle, dataclasses.replace(ft, epochs=max(epochs, 1)),
                                          rounds=rounds, spacing=spacing)
                info["rounds"] = [h.to_dict() for h in hist]
            elif schedule == "gradual":
                steps = len(bundle.loader("train", ft.batch_size)) * ft.epochs
                cb = GradualPruning(cfg, n=rounds, frequency=gradual_frequency(steps, rounds))
                train(model, bundle, ft, callbacks=[cb])
                info["gradual"] = [{"step": t, "sparsity": s} for t, s in cb.log]
            else:
                prune(model, cfg)
                if epochs > 0:
                    train(model, bundle, ft, callbacks=[MaskCallback()])
            make_permanent(model)
            if fmt == "compact":
                save_sparse(model, output, extra={"pruning": cfg.to_dict()}, protect=(input,))
            else:
                with atomic_path(output, protect=(input,)) as tmp:
                    save(model, tmp, extra={"pruning": cfg.to_dict()})

        total1, nz1 = count_params(model)
        acc_after = evaluate(model, bundle.loader("test", 512))["top1"] if bundle else None
        res = {"input": str(input), "output": str(output), "config": cfg.to_dict(),
               "schedule": None if channel else schedule,
               "params": [total0, total1], "nonzero": [nz0, nz1],
               "bytes": [in_bytes, file_bytes(output)],
               "test_top1": [acc_before, acc_after], **info}
        if as_json:
            emit_json(res)
            return
        rows = [{"model": "input", "params": total0, "nonzero": nz0, "bytes": in_bytes,
                 "top1": acc_before},
                {"model": "pruned", "params": total1, "nonzero": nz1, "bytes": file_bytes(output),
                 "top1": acc_after}]
        ResultTable(f"deepshrink prune ({method}, {'structured' if channel else schedule})", rows).print(out)
        out.print(f"-> {output}")
