"""Workflow commands: run (a recipe), shrink (search to a target), report (regenerate HTML)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch
import typer

from deepshrink import distributed
from deepshrink.cli.common import JSON_OPTION, emit_json, err, friendly_errors, out
from deepshrink.errors import ConfigError, FormatError

DATA = typer.Option(None, "--data", "-d", help="digits (embedded), fashion-mnist, mnist, or an IDX dir "
                    "(default: the dataset the model file records).")
DATA_DIR = typer.Option(None, "--data-dir", help="Directory of IDX files (overrides auto-detection).")
MAX_RESULTS_BYTES = 64 << 20


def _command() -> str:
    return "deepshrink " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _model(path: Path) -> torch.nn.Module:
    from deepshrink.cli.modelio import load_model

    if not path.exists():
        raise ConfigError(f"--model {path}: no such file",
                          hint="give a trained model file (deepshrink train -o model.safetensors)")
    return load_model(path)


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``.

    Long only because typer declares each CLI option as a parameter of the nested command
    function (one per option); the work is done by this module's short helpers.
    """
    @app.command("run")
    @friendly_errors
    def run_cmd(
        recipe: Path = typer.Argument(..., help="Recipe file (.yaml / .yml / .json) or a shipped recipe "
                                      "name: deep-compression, int8-ort, structured-int8, distill-int8, "
                                      "max-compression."),
        model: Path = typer.Option(..., "--model", "-m", help="A trained model file."),
        data: str | None = DATA,
        data_dir: Path | None = DATA_DIR,
        output: Path = typer.Option(..., "--out", "-o",
                                    help="Directory for artifacts, results.json, report.html."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Run a recipe: every stage's artifact, measured after each stage, plus an HTML report."""
        from deepshrink.cli.modelio import model_data
        from deepshrink.measure import ResultTable
        from deepshrink.report import write_report
        from deepshrink.workflow import load_recipe, run_recipe

        rec = load_recipe(recipe)  # validated before anything is loaded or trained
        res = run_recipe(rec, _model(model), model_data(model, data, data_dir), output, model_file=model,
                         progress=not as_json, command=_command())
        distributed.on_main(write_report, res.results, output / "report.html")
        if as_json:
            emit_json(res.results)
            return
        cols = ("index", "label", "bytes", "size_ratio", "macs_ratio", "val_top1", "test_top1")
        rows = [{c: r.get(c) for c in cols}
                | {"speedup_b1": (r.get("latency") or {}).get("1", {}).get("speedup")}
                for r in res.results["stages"]]
        ResultTable(f"recipe {rec.name}", rows).print(out)
        if distributed.is_main():  # err stays on for every rank (for errors); this is a result
            err.print(f"results in {res.path}, report in {output / 'report.html'}")

    @app.command("shrink")
    @friendly_errors
    def shrink_cmd(
        model: Path = typer.Argument(..., help="A trained model file."),
        data: str | None = DATA,
        data_dir: Path | None = DATA_DIR,
        output: Path = typer.Option(Path("shrink-out"), "--out", "-o",
                                    help="Directory (state, trials, report); the same one resumes."),
        max_drop: float = typer.Option(0.5, "--max-drop", help="Max validation top-1 drop, points."),
        objective: str = typer.Option("size", "--objective", help="size | latency | macs"),
        target: str | None = typer.Option(None, "--target", help="e.g. 50KB (size) or 2x."),
        time_budget: float | None = typer.Option(None, "--time-budget", help="Seconds (over resumes)."),
        candidates: int | None = typer.Option(None, help="Candidates in the first rung."),
        rungs: int | None = typer.Option(None, help="Successive-halving rungs."),
        epochs_scale: float | None = typer.Option(None, help="Multiply every fine-tune's epochs."),
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu", "--device", help="Trials' fine-tunes: cpu, cuda, cuda:N or auto "
                                   "(under torchrun: this process's GPU)."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Search compositions of techniques for the smallest / fastest model within --max-drop."""
        from deepshrink.cli.modelio import model_data
        from deepshrink.measure import ResultTable
        from deepshrink.report import write_report
        from deepshrink.workflow.search import SearchConfig, search

        cfg = SearchConfig(objective=objective, max_drop=max_drop, target=target,
                           time_budget=time_budget, seed=seed, device=device).override(
            candidates=candidates, rungs=rungs, epochs_scale=epochs_scale)
        res = search(_model(model), model_data(model, data, data_dir), cfg, output, model_file=model,
                     command=_command(), progress=not as_json)
        if "selected" not in res.results:  # cannot happen without max_trials; kept for clarity
            raise ConfigError("the search stopped before selecting a model")
        distributed.on_main(write_report, res.results, output / "report.html")
        if as_json:
            emit_json(res.results)
            return
        cols = ("trial", "role", "bytes", "size_ratio", "speedup_final", "val_top1", "test_top1",
                "test_drop_pt")
        ResultTable("chosen and Pareto-front models (selected on validation; test read once)",
                    [{c: s.get(c) for c in cols} for s in res.results["selected"]]).print(out)
        if distributed.is_main():  # err stays on for every rank (for errors); this is a result
            err.print(f"results in {res.path}, report in {output / 'report.html'}")

    @app.command("report")
    @friendly_errors
    def report_cmd(
        results: Path = typer.Argument(..., help="results.json (run) or search.json (shrink)."),
        output: Path | None = typer.Option(None, "--out", "-o",
                                           help="HTML file (default: report.html beside it)."),
    ) -> None:
        """Regenerate the self-contained HTML report (and the Pareto PNG) from a results file."""
        from deepshrink.report import write_report

        if results.stat().st_size > MAX_RESULTS_BYTES:
            raise FormatError(f"{results}: {results.stat().st_size} bytes is too large for a results file")
        try:
            data = json.loads(results.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{results}: not a JSON results file: {exc}") from None
        if not isinstance(data, dict):
            raise FormatError(f"{results}: expected a JSON object")
        try:
            path = write_report(data, output or results.with_name("report.html"))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{results}: not a deepshrink results file (missing or bad {exc})") from None
        err.print(f"wrote {path}")
