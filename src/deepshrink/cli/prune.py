"""`deepshrink prune`: unstructured (weight) or channel pruning of a saved model, with optional
fine-tuning, written as a compact sparse file (weights) or a smaller architecture (channels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from deepshrink import distributed
from deepshrink.checkpoint import save
from deepshrink.cli.common import JSON_OPTION, emit_json, friendly_errors, out, parse_shape
from deepshrink.cli.core import DATASET
from deepshrink.cli.guards import (
    FORCE,
    MAX_DROP,
    Warnings,
    check_drop,
    check_patterns,
    check_size,
    commit,
    layer_names,
    ratio_text,
    staged,
)
from deepshrink.cli.modelio import data_extra, load_model, model_data
from deepshrink.errors import ConfigError
from deepshrink.measure import ResultTable, count_params, file_bytes
from deepshrink.progress import step

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


def _check_options(method: str, schedule: str, fmt: str, rounds: int, epochs: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if fmt not in ("compact", "dense"):
        raise ConfigError(f"--format must be 'compact' or 'dense', got {fmt!r}")
    if rounds < 1 or epochs < 0:
        raise ConfigError(f"--rounds must be >= 1 and --epochs >= 0, got {rounds}, {epochs}")


def _prune_channels(model: Any, bundle: Any, cfg: Any, input_shape: str | None, ft: Any | None,
                    seed: int) -> Any:
    from deepshrink.pruning import prune
    from deepshrink.train import train

    example = (torch.rand(2, *parse_shape(input_shape, "--input-shape")) if input_shape
               else bundle.test.tensors[0][:2])
    calib = bundle.loader("train", 64, seed=seed)
    model = prune(model, cfg, example_inputs=example, calibration=calib)
    if ft is not None:
        train(model, bundle, ft)
    return model


def _prune_unstructured(model: Any, bundle: Any, cfg: Any, ft: Any, schedule: str, rounds: int,
                        spacing: str, tune: bool) -> dict[str, Any]:
    """Prune ``model`` in place on ``schedule`` (fine-tuning with ``ft`` when ``tune``, and always
    on the iterative and gradual schedules); returns the schedule's log for the JSON."""
    from deepshrink.pruning import (
        GradualPruning,
        MaskCallback,
        gradual_frequency,
        iterative_prune,
        make_permanent,
        prune,
    )
    from deepshrink.train import train

    info: dict[str, Any] = {}
    if schedule == "iterative":
        _, hist = iterative_prune(model, cfg, bundle, ft, rounds=rounds, spacing=spacing)
        info["rounds"] = [h.to_dict() for h in hist]
    elif schedule == "gradual":
        steps = len(bundle.loader("train", ft.batch_size)) * ft.epochs
        cb = GradualPruning(cfg, n=rounds, frequency=gradual_frequency(steps, rounds))
        train(model, bundle, ft, callbacks=[cb])
        info["gradual"] = [{"step": t, "sparsity": s} for t, s in cb.log]
    else:
        prune(model, cfg)
        if tune:
            train(model, bundle, ft, callbacks=[MaskCallback()])
    make_permanent(model)
    return info


def _write(model: Any, tmp: Path, input: Path, cfg: Any, bundle: Any, compact: bool) -> None:
    from deepshrink.pruning import save_sparse

    extra = {**data_extra(bundle), "pruning": cfg.to_dict()}
    if compact:
        save_sparse(model, tmp, extra=extra, protect=(input,))
    else:
        save(model, tmp, extra=extra, protect=(input,))


def _counts(model: Any, before: tuple[int, int], input: Path, output: Path, warns: Warnings
            ) -> dict[str, Any]:
    """Params, non-zeros and file bytes before and after (a warning when not smaller)."""
    after, sizes = count_params(model), [file_bytes(input), file_bytes(output)]
    check_size(*sizes, warns)
    return {"params": [before[0], after[0]], "nonzero": [before[1], after[1]], "bytes": sizes}


def _print(res: dict[str, Any], method: str, title: str, output: Path) -> None:
    (total0, total1), (nz0, nz1) = res["params"], res["nonzero"]
    (b0, b1), (a0, a1) = res["bytes"], res["test_top1"]
    rows = [{"model": "input", "params": total0, "nonzero": nz0, "bytes": b0, "top1": a0},
            {"model": "pruned", "params": total1, "nonzero": nz1, "bytes": b1, "top1": a1}]
    ResultTable(f"deepshrink prune ({method}, {title})", rows).print(out)
    out.print(f"-> {output} ({ratio_text(b0, b1)})")


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``.

    Long only because typer declares each CLI option as a parameter of the nested command
    function (one per option); the work is done by this module's short helpers.
    """
    @app.command("prune",
                 help=("Prune a saved model; never overwrites the input file. Fine-tunes data-parallel "
                 "when launched by torchrun. Refuses to write a result past --max-drop."))
    @friendly_errors
    def prune_cmd(
        input: Path = typer.Argument(..., help="A model file (see `deepshrink info`)."),
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
        data: str | None = DATASET,
        data_dir: Path | None = typer.Option(None, help="Directory of IDX files."),
        input_shape: str | None = typer.Option(None, help="channel: example input shape (no batch); "
                                               "default: the data's."),
        fmt: str = typer.Option("compact", "--format", help="unstructured: 'compact' (relative-index "
                                "sparse file, smaller) or 'dense' (ordinary checkpoint with zeros)."),
        max_drop: float | None = MAX_DROP,
        force: bool = FORCE,
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu", "--device", help="Fine-tune on cpu, cuda (under torchrun: "
                                   "each process's own GPU), cuda:N or auto."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Prune a saved model; never overwrites the input file. Fine-tunes data-parallel when
        launched by torchrun. Refuses to write a result past --max-drop.

        Long only because of its option list (one parameter per CLI option); the body is
        short and the work is in this module's helpers.
        """
        from deepshrink.pruning import ChannelConfig
        from deepshrink.train import TrainConfig, evaluate

        _check_options(method, schedule, fmt, rounds, epochs)
        torch.manual_seed(seed)
        model = load_model(input)
        bundle = model_data(input, data, data_dir)
        channel, warns = method == "channel", Warnings()
        before, counts0 = evaluate(model, bundle.loader("test", 512))["top1"], count_params(model)
        ft = TrainConfig(epochs=max(epochs, 1), lr=lr, seed=seed, keep_best=schedule != "gradual",
                         progress=not as_json, device=device)
        check_patterns(layer_names(model), _overrides(override), "--override", warns)
        if channel:
            cfg: Any = (ChannelConfig.from_file(config) if config else
                        ChannelConfig(ratio=ratio, importance=importance, overrides=_overrides(override),
                                      hidden=hidden))
            model, info = _prune_channels(model, bundle, cfg, input_shape, ft if epochs else None, seed), {}
        else:
            cfg = _unstructured_config(method, ratio, scope, threshold, quality, _overrides(override),
                                       skip_last, config)
            info = _prune_unstructured(model, bundle, cfg, ft, schedule, rounds, spacing, epochs > 0)
        with step("evaluating the pruned model", enabled=not as_json):
            after = evaluate(model, bundle.loader("test", 512))["top1"]
        with staged(output, (input,)) as tmp:
            drop = check_drop(before, after, max_drop, force, output, warns)
            distributed.on_main(_write, model, tmp, input, cfg, bundle, fmt == "compact" and not channel)
            distributed.on_main(commit, tmp, output)
        res = {"input": str(input), "output": str(output), "config": cfg.to_dict(),
               "schedule": None if channel else schedule, **_counts(model, counts0, input, output, warns),
               "test_top1": [before, after], "drop_pt": drop, "warnings": warns, **info}
        if as_json:
            emit_json(res)
        else:
            _print(res, method, "structured" if channel else schedule, output)
