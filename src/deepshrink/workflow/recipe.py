"""Recipes: a YAML/JSON file chaining compression stages, run and measured stage by stage.

    name: deep-compression
    stages:
      - stage: prune
        config: {ratio: 0.9, scope: global, overrides: {"6": 0.7}}
        rounds: 3
        finetune: {epochs: 2, lr: 3.0e-4}
        teacher: {alpha: 0.7, temperature: 2.0}     # fine-tune with KD from the original model
      - stage: share
        config: {bits: 3, bias_bits: 4}
        finetune: {epochs: 2, lr: 1.0e-4}
      - stage: pack
        config: {codebook_dtype: float16}

Every key is checked: an unknown key anywhere is an error naming the stage and the key. After
each stage the artifact is written, loaded back and measured (real bytes, params, MACs,
validation and test accuracy); at the end every stage's model is timed against the original in
one interleaved run. :func:`run_recipe` writes the artifacts and ``results.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink import checkpoint, distributed
from deepshrink.config import Config
from deepshrink.data import DataBundle
from deepshrink.errors import ConfigError
from deepshrink.fileio import atomic_write_text, scratch_dir
from deepshrink.measure import count_macs, count_params, file_bytes, layer_stats
from deepshrink.pruning import UnstructuredConfig
from deepshrink.train import TrainConfig, evaluate
from deepshrink.workflow.allocation import ALLOCATIONS
from deepshrink.workflow.latency import interleaved_latency, latency_summary
from deepshrink.workflow.stages import (
    StageContext,
    StageOutput,
    StageSpec,
    StudentConfig,
    TeacherConfig,
    stage_kind,
)

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a short text file; refuse anything larger unread
TOP_KEYS = ("name", "description", "seed", "stages", "latency_batches")
STAGE_KEYS = ("stage", "label", "config", "finetune", "teacher")


@dataclasses.dataclass
class Recipe:
    """A parsed, validated recipe."""

    name: str
    stages: list[StageSpec]
    description: str = ""
    seed: int = 0
    latency_batches: tuple[int, ...] = (1,)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "seed": self.seed,
                "latency_batches": list(self.latency_batches),
                "stages": [s.to_dict() for s in self.stages]}


def _prefixed(where: str, exc: ConfigError) -> ConfigError:
    return ConfigError(f"{where}: {exc.args[0]}", hint=exc.hint)


def _sub_config(cls: type[Config], value: Any, where: str, key: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key!r} must be a mapping, got {type(value).__name__}")
    try:
        return cls.from_dict(value)
    except ConfigError as exc:
        raise _prefixed(f"{where} {key}", exc) from None
    except TypeError as exc:  # a value of the wrong shape reaching a dataclass
        raise ConfigError(f"{where} {key}: {exc}") from None


def _stage_config(kind: Any, value: Any, where: str) -> Config:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'config' must be a mapping, got {type(value).__name__}")
    names = {c.__name__: c for c in kind.configs}
    cls = names.get(value.get("type", kind.configs[0].__name__))
    if cls is None:
        raise ConfigError(f"{where} config: type {value['type']!r} is not one of {sorted(names)}")
    return _sub_config(cls, value, where, "config")


def parse_stage(raw: Any, index: int, recipe: str) -> StageSpec:
    """Validate one stage mapping; every error names the stage (number and kind) and the key."""
    where = f"recipe {recipe!r} stage {index + 1}"
    if not isinstance(raw, dict) or not isinstance(raw.get("stage"), str):
        raise ConfigError(f"{where}: must be a mapping with a 'stage' name")
    name = raw["stage"]
    where = f"{where} ({name})"
    kind = stage_kind(name, where)
    unknown = sorted(set(raw) - set(STAGE_KEYS) - kind.extras)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}",
                          hint=f"valid keys: {sorted(set(STAGE_KEYS) | kind.extras)}")
    rounds = raw.get("rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"{where}: 'rounds' must be an integer >= 1, got {rounds!r}")
    spacing = raw.get("spacing", "geometric")
    if spacing not in ("geometric", "cubic"):
        raise ConfigError(f"{where}: 'spacing' must be 'geometric' or 'cubic', got {spacing!r}")
    allocate = raw.get("allocate")
    if allocate is not None and allocate not in ALLOCATIONS:
        raise ConfigError(f"{where}: 'allocate' must be one of {ALLOCATIONS}, got {allocate!r}")
    ft = _sub_config(TrainConfig, raw.get("finetune"), where, "finetune")
    if ft is not None and "progress" not in raw["finetune"]:
        ft = dataclasses.replace(ft, progress=False)
    config = _stage_config(kind, raw.get("config"), where)
    if allocate is not None and not isinstance(config, UnstructuredConfig):
        raise ConfigError(f"{where}: 'allocate' needs an UnstructuredConfig, got {type(config).__name__}")
    return StageSpec(stage=name, config=config,
                     label=str(raw.get("label", "")) or name, finetune=ft,
                     teacher=_sub_config(TeacherConfig, raw.get("teacher"), where, "teacher"),
                     rounds=rounds, spacing=spacing, allocate=allocate,
                     student=_sub_config(StudentConfig, raw.get("student"), where, "student"))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from a plain mapping (parsed YAML/JSON)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping at the top level")
    name = data.get("name", Path(source).stem)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"recipe {name!r}: unknown top-level key(s) {unknown}",
                          hint=f"valid keys: {TOP_KEYS}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"recipe {name!r}: 'stages' must be a non-empty list")
    seed = data.get("seed", 0)
    batches = data.get("latency_batches", [1])
    if not isinstance(seed, int) or not isinstance(batches, list) or not all(
            isinstance(b, int) and 1 <= b <= 4096 for b in batches):
        raise ConfigError(f"recipe {name!r}: 'seed' must be an int and 'latency_batches' a list of "
                          "ints in [1, 4096]")
    return Recipe(str(name), [parse_stage(s, i, str(name)) for i, s in enumerate(stages)],
                  str(data.get("description", "")), seed, tuple(batches))


SHIPPED = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with deepshrink, by file stem (``deep-compression``, ...)."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.*")) if p.suffix in (".yaml", ".yml", ".json")}


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (.yaml / .yml / .json), or a shipped recipe by name."""
    path = Path(path)
    if not path.exists() and str(path) in shipped_recipes():
        path = shipped_recipes()[str(path)]
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a recipe")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / JSONDecodeError: report where the parser stopped
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    return parse_recipe(data, str(path))


# --- measuring ---------------------------------------------------------------------------------

def layer_rows(model: nn.Module, original: nn.Module | None, example: torch.Tensor) -> list[dict[str, Any]]:
    """Per-layer facts for the report: sparsity, bits (shared / quantized), kept channels, rank."""
    from deepshrink.quantization import quantized_layers
    from deepshrink.sharing import get_sharing

    _, per_module = count_macs(model, example[:1])
    shared = get_sharing(model)
    quant = quantized_layers(model)
    orig_out = {}
    if original is not None:
        orig_out = {r.name: r.shape[0] for r in layer_stats(original, {}) if r.shape}
    rows = []
    for r in layer_stats(model, per_module):
        d = r.to_dict()
        st = shared.get(f"{r.name}.weight" if r.name else "weight")
        if st is not None:
            d["bits"] = max(1, math.ceil(math.log2(max(2, st.codebook.numel()))))
        elif r.name in quant:
            d["bits"] = int(quant[r.name].spec.bits)
        else:
            d["bits"] = 32
        if r.shape:
            d["channels"] = r.shape[0]
            d["channels_original"] = orig_out.get(r.name, r.shape[0])
        rank = getattr(model.get_submodule(r.name) if r.name else model, "rank", None)
        if isinstance(rank, int):
            d["rank"] = rank
        rows.append(d)
    return rows


def measure_artifact(out: StageOutput, data: DataBundle, original: nn.Module | None, *,
                     test: bool = True) -> tuple[dict[str, Any], Callable[[torch.Tensor], Any]]:
    """Measure what the stage wrote: the file loaded back (or its runner), never the in-memory
    model's accuracy. Returns the row and the callable to time."""
    if out.runner is not None:
        runner: Callable[[torch.Tensor], Any] = out.runner
    else:
        runner = checkpoint.load(out.file)
    example = data.train.tensors[0][:1]
    total, nonzero = count_params(out.model)
    macs, _ = count_macs(out.model, example)
    row: dict[str, Any] = {"file": out.file.name, "bytes": file_bytes(out.file), "params": total,
                           "nonzero": nonzero, "macs": macs,
                           "val_top1": evaluate(runner, data.loader("val", 1000))["top1"]}
    if test:
        row["test_top1"] = evaluate(runner, data.loader("test", 1000))["top1"]
    row["layers"] = layer_rows(out.model, original, example)
    return row, runner


def machine_info() -> dict[str, Any]:
    import os
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- running -----------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    """The measured run: ``results`` is what ``results.json`` holds; ``model`` the final model."""

    results: dict[str, Any]
    model: nn.Module
    path: Path


def _original_row(model: nn.Module, data: DataBundle, out_dir: Path, model_file: Path | None,
                  test: bool) -> tuple[dict[str, Any], Path]:
    if model_file is None:
        model_file = checkpoint.save(model, out_dir / "00-original.safetensors")
    row, _ = measure_artifact(StageOutput(model, Path(model_file), runner=model), data, model, test=test)
    row["file"] = str(model_file)
    return row, Path(model_file)


def _ratios(row: dict[str, Any], base: dict[str, Any]) -> None:
    row["size_ratio"] = base["bytes"] / row["bytes"]
    row["macs_ratio"] = base["macs"] / max(1, row["macs"])
    row["val_drop_pt"] = 100 * (base["val_top1"] - row["val_top1"])
    if "test_top1" in row and "test_top1" in base:
        row["test_drop_pt"] = 100 * (base["test_top1"] - row["test_top1"])


def run_recipe(recipe: Recipe, model: nn.Module, data: DataBundle, out_dir: str | Path, *,
               model_file: str | Path | None = None, test: bool = True, latency: bool = True,
               progress: bool = True, command: str | None = None,
               log: Callable[[str], None] | None = None) -> RunResult:
    """Run every stage on a copy of ``model``; write artifacts and ``results.json`` into
    ``out_dir`` (render it with :func:`deepshrink.report.write_report`). ``test=False`` skips the
    test split (used by the search, which
    selects on validation and reads test only for the models it returns).

    Under torchrun every process runs every stage (the fine-tunes are data-parallel) but only
    rank 0 writes into ``out_dir`` and times the models; the others write their artifacts into
    a private scratch directory (to load them back and measure them like rank 0), removed after.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    # Under torchrun, join the process group now (the fine-tunes' device decides the backend).
    distributed.setup(next((s.finetune.device for s in recipe.stages if s.finetune), "cpu"))
    with _workdir(Path(out_dir)) as out:
        t0 = time.perf_counter()
        torch.manual_seed(recipe.seed)
        original = copy.deepcopy(model).eval()
        base, base_file = _original_row(original, data, out, Path(model_file) if model_file else None, test)
        rows: list[dict[str, Any]] = [{"index": 0, "stage": "original", "label": "original", **base}]
        _ratios(rows[0], base)
        runners: dict[str, Callable[[torch.Tensor], Any]] = {"original": original}
        current = copy.deepcopy(model)
        for i, spec in enumerate(recipe.stages, start=1):
            res, row = _measured_stage(StageContext(current, original, data, out, i, progress), spec, test)
            runners[f"{i}:{spec.label}"] = res.runner  # type: ignore[assignment]
            _ratios(row, base)
            rows.append(row)
            current = res.model
            tested = f", test {100 * row['test_top1']:.2f}%" if test else ""
            log(f"[{i}/{len(recipe.stages)}] {spec.label}: {row['bytes']:,} B ({row['size_ratio']:.1f}x), "
                f"val {100 * row['val_top1']:.2f}%{tested} ({row['seconds']:.0f} s)")
        timed = latency and distributed.is_main()
        lat = _latency(runners, data, recipe.latency_batches, rows) if timed else {}
        results = {"kind": "run", "recipe": recipe.to_dict(), "model_file": str(base_file), "data": data.name,
                   "command": command or " ".join(sys.argv), "machine": machine_info(),
                   "stages": rows, "latency": lat, "seconds": time.perf_counter() - t0}
        path = Path(out_dir) / "results.json"
        distributed.on_main(atomic_write_text, path, json.dumps(results, indent=2, default=str))
    return RunResult(results, current, path)


@contextlib.contextmanager
def _workdir(out_dir: Path) -> Iterator[Path]:
    """Where this process writes: ``out_dir`` on the main process, a scratch directory elsewhere."""
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        yield out_dir
    else:
        with scratch_dir() as tmp:
            yield tmp


def _measured_stage(ctx: StageContext, spec: StageSpec, test: bool) -> tuple[StageOutput, dict[str, Any]]:
    """Run one stage and measure its artifact; the output's ``runner`` is what gets timed."""
    s0 = time.perf_counter()
    res = _run_stage(ctx, spec)
    row, runner = measure_artifact(res, data=ctx.data, original=ctx.original, test=test)
    row.update(index=ctx.index, stage=spec.stage, label=spec.label, spec=spec.to_dict(), info=res.info,
               seconds=time.perf_counter() - s0)
    return dataclasses.replace(res, runner=runner), row


def _run_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    kind = stage_kind(spec.stage, f"stage {ctx.index} ({spec.stage})")
    return kind.adapter(ctx, spec)


def _latency(runners: dict[str, Callable[[torch.Tensor], Any]], data: DataBundle,
             batches: tuple[int, ...], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every stage's model against the original, in one interleaved run per batch size."""
    out: dict[str, Any] = {}
    x1 = data.test.tensors[0][:1]
    for b in batches:
        x = x1.expand(b, *x1.shape[1:]).contiguous()
        samples = interleaved_latency(runners, x)
        summ = latency_summary(samples, "original")
        out[str(b)] = {"samples_ms": samples, "summary": summ}
        for row, name in zip(rows, runners, strict=True):
            row.setdefault("latency", {})[str(b)] = summ[name]
    return out
