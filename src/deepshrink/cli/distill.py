"""`deepshrink distill`: train a student on the soft targets of one or more teacher files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from deepshrink import distributed
from deepshrink.checkpoint import save
from deepshrink.cli.common import DEVICE_OPTION, JSON_OPTION, emit_json, friendly_errors, out
from deepshrink.cli.core import DATASET
from deepshrink.cli.modelio import data_extra, factory_kwargs, load_model, model_data, parse_model_args
from deepshrink.errors import ConfigError
from deepshrink.train import TrainConfig, evaluate


def _parse_hints(items: list[str]) -> dict[str, str]:
    hints = {}
    for item in items:
        s, sep, t = item.partition("=")
        if not sep or not s or not t:
            raise ConfigError(f"--hint must be STUDENT_MODULE=TEACHER_MODULE, got {item!r}")
        hints[s] = t
    return hints


def _kd_config(config: Path | None, temperature: float | None, alpha: float | None,
               combine: str | None, weights: str | None, no_cache: bool, hint: list[str]) -> Any:
    from deepshrink.distill import KDConfig

    try:
        w = tuple(float(v) for v in weights.split(",")) if weights else None
    except ValueError as exc:
        raise ConfigError(f"--weights must be comma-separated numbers, got {weights!r}") from exc
    kd = KDConfig.from_file(config) if config else KDConfig()
    return kd.override(temperature=temperature, alpha=alpha, combine=combine, weights=w,
                       cache=False if no_cache else None, hints=_parse_hints(hint) or None)


def _student(student: str, bundle: Any, args: dict[str, Any]) -> Any:
    """A student model file, or a new model from a registry name / module:callable."""
    from deepshrink.models import create_model

    if Path(student).is_file():
        if args:
            raise ConfigError("--student-arg(s) apply to a registry name, not to a model file")
        return load_model(Path(student))
    return create_model(student, **factory_kwargs(student, bundle, args))


def _teacher_accuracy(paths: list[Path], teachers: list[Any], ens: Any, kd: Any, loader: Any
                      ) -> dict[str, float]:
    acc = {str(p): evaluate(t, loader)["top1"] for p, t in zip(paths, teachers, strict=True)}
    if len(teachers) > 1:
        from deepshrink.distill import teacher_log_probs

        acc["ensemble"] = evaluate(
            lambda x: teacher_log_probs(ens(x), 1.0, kd.combine, kd.weights), loader)["top1"]
    return acc


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``.

    Long only because typer declares each CLI option as a parameter of the nested command
    function (one per option); the work is done by this module's short helpers.
    """
    @app.command("distill")
    @friendly_errors
    def distill_cmd(
        teacher: list[Path] = typer.Option(..., "--teacher", "-t",
                                           help="Teacher model file; repeat for an ensemble."),
        student: str = typer.Option(..., "--student", "-s",
                                    help="A model file (e.g. a pruned model) or a registry name."),
        output: Path = typer.Option(..., "--output", "-o", help="Student checkpoint to write."),
        data: str | None = DATASET,
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Directory of IDX files."),
        student_args: str | None = typer.Option(None, help="JSON object of model arguments "
                                                "(registry name only), e.g. '{\"hidden\": 30}'."),
        student_arg: list[str] = typer.Option([], "--student-arg", help="NAME=VALUE for the student "
                                              "factory (VALUE as JSON, else a string); repeat."),
        temperature: float | None = typer.Option(None, "--temperature", "-T", help="Softmax temperature."),
        alpha: float | None = typer.Option(None, help="Weight of the soft term: 1 = soft only, "
                                           "0 = labels only."),
        combine: str | None = typer.Option(None, help="Ensemble average: logits or probs."),
        weights: str | None = typer.Option(None, help="Ensemble weights, comma-separated."),
        hint: list[str] = typer.Option([], help="STUDENT_MODULE=TEACHER_MODULE feature hint; repeatable."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Run the teacher on every batch."),
        config: Path | None = typer.Option(None, help="KDConfig as JSON/YAML (options override it)."),
        train_config: Path | None = typer.Option(None, help="TrainConfig as JSON/YAML."),
        epochs: int | None = typer.Option(None, help="Override the training epochs."),
        lr: float | None = typer.Option(None, help="Override the learning rate."),
        seed: int = typer.Option(0),
        device: str | None = DEVICE_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Distil one teacher or an ensemble into a student; report teacher and student accuracy.
        Trains data-parallel when launched by torchrun (the teacher cache is built once, split)."""
        from deepshrink.distill import Teacher, distill

        inputs = [*teacher, *([Path(student)] if Path(student).is_file() else [])]
        if any(output.exists() and output.resolve() == p.resolve() for p in inputs):
            raise ConfigError(f"--output {output} is one of the input model files",
                              hint="choose another output path")
        teachers = [load_model(p) for p in teacher]
        bundle = model_data(teacher[0], data, data_dir)
        kd = _kd_config(config, temperature, alpha, combine, weights, no_cache, hint)
        tc = TrainConfig.from_file(train_config) if train_config else TrainConfig()
        tc = tc.override(epochs=epochs, lr=lr, seed=seed, device=device)
        torch.manual_seed(seed)
        net = _student(student, bundle, parse_model_args(student_arg, student_args))
        test_loader = bundle.loader("test", 512)
        before = evaluate(net, test_loader)["top1"]
        ens = Teacher(teachers)
        teacher_acc = _teacher_accuracy(teacher, teachers, ens, kd, test_loader)
        distill(net, kd, teacher=ens, data=bundle, train_config=tc)
        test = evaluate(net, test_loader)
        distributed.on_main(save, net, output, extra={
            **data_extra(bundle), "distill": kd.to_dict(), "train": tc.to_dict(),
            "teachers": [str(p) for p in teacher], "test": test})
        res = {"output": str(output), "teacher_test_top1": teacher_acc, "student_before_top1": before,
               "student_test": test, "kd_config": kd.to_dict()}
        if as_json:
            emit_json(res)
        else:
            for name, acc in teacher_acc.items():
                out.print(f"teacher {name}: test top-1 {100 * acc:.2f}%")
            out.print(f"student: test top-1 {100 * before:.2f}% -> {100 * test['top1']:.2f}%  -> {output}")
