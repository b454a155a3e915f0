"""The stage registry: each recipe stage is a small adapter over one family's public verb.

A stage receives the :class:`StageContext` (current model, data, the original model, output
directory) and its parsed :class:`StageSpec`, runs the family verb (and the stage's fine-tune),
writes its artifact file and returns a :class:`StageOutput`. Stages never measure: the recipe
runner measures every artifact the same way, from the file loaded back.

Families register nothing here; this module sits above them and imports only their public names.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepshrink import checkpoint
from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.distill import KDConfig
from deepshrink.dsz import PackConfig, load_dsz, pack
from deepshrink.early_exit import (
    CalibrationConfig,
    ExitConfig,
    ExitTrainConfig,
    add_exits,
    calibrate,
    train_exits,
)
from deepshrink.errors import ConfigError
from deepshrink.pruning import (
    ChannelConfig,
    UnstructuredConfig,
    iterative_prune,
    make_permanent,
    prune,
    save_sparse,
)
from deepshrink.quantization import PTQConfig, QATConfig, convert, prepare_qat, quantize
from deepshrink.redesign import LowRankConfig, SeparableConfig, factorize_with_report, separate_with_report
from deepshrink.sharing import CentroidFineTune, KMeansConfig, round_codebooks, share
from deepshrink.train import Callback, TrainConfig, TrainState, logits_of, train
from deepshrink.workflow.allocation import layer_ratios


@dataclasses.dataclass
class TeacherConfig(Config):
    """Fine-tune against the recipe's *original* model (knowledge distillation): ``alpha`` weighs
    the soft term, ``temperature`` softens both distributions."""

    alpha: float = 0.7
    temperature: float = 2.0

    def validate(self) -> None:
        n = type(self).__name__
        check(0.0 <= self.alpha <= 1.0, n, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.temperature > 0, n, "temperature", f"must be > 0, got {self.temperature}")


@dataclasses.dataclass
class ExportConfig(Config):
    """Export the current model to ONNX (run by ONNX Runtime from then on)."""

    format: str = "onnx"
    opset: int | None = None
    threads: int = 1  # ONNX Runtime intra-op threads for accuracy and latency

    def validate(self) -> None:
        n = type(self).__name__
        check(self.format == "onnx", n, "format", f"only 'onnx' is supported, got {self.format!r}")
        check(self.threads >= 1, n, "threads", f"must be >= 1, got {self.threads}")


@dataclasses.dataclass
class StudentConfig(Config):
    """The student a ``distill`` stage trains from scratch: a registry model name and its
    arguments (``in_size`` / ``num_classes`` default to the data's)."""

    model: str = "mlp"
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0


@dataclasses.dataclass
class EarlyExitConfig(Config):
    """The ``early_exit`` stage: attach heads (``exits``), train them with the stage's
    ``finetune`` settings (``mode``: ``heads`` keeps the backbone and distils each head from the
    final one with ``alpha`` / ``temperature``; ``joint`` trains everything), then choose the
    exit thresholds on the validation split within ``calibration.budget`` points."""

    exits: ExitConfig = dataclasses.field(default_factory=ExitConfig)
    mode: str = "heads"
    alpha: float = 0.5
    temperature: float = 4.0
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)

    def validate(self) -> None:
        # The family's own config checks mode / alpha / temperature (errors name its fields).
        ExitTrainConfig(mode=self.mode, alpha=self.alpha, temperature=self.temperature)


@dataclasses.dataclass
class StageSpec:
    """One parsed, validated recipe stage."""

    stage: str
    config: Config
    label: str = ""
    finetune: TrainConfig | None = None
    teacher: TeacherConfig | None = None
    rounds: int = 1  # prune: iterative prune -> fine-tune rounds
    spacing: str = "geometric"  # prune: how the rounds approach the target (geometric | cubic)
    allocate: str | None = None  # prune: spread config.ratio over the layers by a rule (allocation.py)
    student: StudentConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"stage": self.stage, "label": self.label, "config": self.config.to_dict()}
        if self.finetune is not None:
            d["finetune"] = self.finetune.to_dict()
        if self.teacher is not None:
            d["teacher"] = self.teacher.to_dict()
        if self.rounds != 1:
            d["rounds"] = self.rounds
            d["spacing"] = self.spacing
        if self.allocate is not None:
            d["allocate"] = self.allocate
        if self.student is not None:
            d["student"] = self.student.to_dict()
        return d


@dataclasses.dataclass
class StageContext:
    """What a stage works on. ``model`` is the current model (a stage may edit it in place);
    ``original`` is the recipe's input model, never modified."""

    model: nn.Module
    original: nn.Module
    data: DataBundle
    out_dir: Path
    index: int
    progress: bool = False

    def example(self, n: int = 2) -> torch.Tensor:
        return self.data.train.tensors[0][:n]

    def calibration(self, batches: int = 8, batch_size: int = 64) -> list[torch.Tensor]:
        loader = self.data.loader("train", batch_size, shuffle=True, seed=0)
        return [b[0] for _, b in zip(range(batches), loader, strict=False)]

    def path(self, spec: StageSpec, suffix: str) -> Path:
        return self.out_dir / f"{self.index:02d}-{spec.stage}{suffix}"


@dataclasses.dataclass
class StageOutput:
    """The model after the stage, its artifact file, and a runner when the artifact is not a
    torch model (ONNX Runtime). ``info`` holds stage facts for the report (e.g. rounds)."""

    model: nn.Module
    file: Path
    runner: Callable[[torch.Tensor], Any] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


Adapter = Callable[[StageContext, StageSpec], StageOutput]


@dataclasses.dataclass
class StageKind:
    """A registered stage: its config classes (the first is the default; a ``type`` key picks
    another), the extra stage keys it accepts, and the adapter."""

    configs: tuple[type[Config], ...]
    extras: frozenset[str]
    adapter: Adapter
    help: str = ""


STAGES: dict[str, StageKind] = {}


def register_stage(name: str, configs: tuple[type[Config], ...], extras: tuple[str, ...] = (),
                   help: str = "") -> Callable[[Adapter], Adapter]:
    def deco(fn: Adapter) -> Adapter:
        STAGES[name] = StageKind(configs, frozenset(extras), fn, help)
        return fn

    return deco


def stage_kind(name: str, where: str) -> StageKind:
    """The registered stage ``name``; a clear ConfigError for unknown or unavailable ones."""
    if name in STAGES:
        return STAGES[name]
    raise ConfigError(f"{where}: unknown stage {name!r}", hint=f"available stages: {sorted(STAGES)}")


# --- fine-tuning helpers ---------------------------------------------------------------------

# The original's logits are cached as a third train tensor when they fit in this many numbers.
MAX_CACHED_LOGITS = 1 << 24


class _OriginalTeacher(Callback):
    """Replace the loss by KD against a frozen copy of the original model. ``cached``: the index
    in each batch of the original's precomputed logits (see :func:`with_teacher`), else None."""

    def __init__(self, teacher: nn.Module, cfg: TeacherConfig, cached: int | None = None) -> None:
        self.teacher = copy.deepcopy(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg, self.cached = cfg, cached

    def on_loss(self, state: TrainState, loss: torch.Tensor) -> torch.Tensor:
        from deepshrink.distill import kd_loss

        if self.cached is not None:
            t_logits = state.batch[self.cached]
        else:
            with torch.no_grad():
                t_logits = logits_of(self.teacher(state.batch[0]))
        return kd_loss(state.outputs, t_logits, state.batch[1], temperature=self.cfg.temperature,
                       alpha=self.cfg.alpha)["loss"]


def teacher_callbacks(ctx: StageContext, spec: StageSpec) -> list[Callback]:
    return [_OriginalTeacher(ctx.original, spec.teacher)] if spec.teacher and spec.teacher.alpha else []


def _logits(teacher: nn.Module, x: torch.Tensor, limit: int, chunk: int = 1024) -> torch.Tensor | None:
    """The teacher's logits for every row of ``x`` (None past ``limit`` numbers in all)."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            out.append(logits_of(teacher(x[i:i + chunk])).float())
            if out[0][0].numel() * len(x) > limit:
                return None
    return torch.cat(out)


def with_teacher(ctx: StageContext, spec: StageSpec, cfg: TrainConfig) -> tuple[DataBundle, list[Callback]]:
    """The data to fine-tune on and the KD callbacks. Without augmentation the original's outputs
    are the same every epoch, so they are computed once per stage and carried beside each train
    sample (the teacher's forward pass was about a quarter of every step)."""
    callbacks = teacher_callbacks(ctx, spec)
    train_set = ctx.data.train
    if not callbacks or cfg.augment != "none" or not isinstance(train_set, TensorDataset) \
            or len(train_set.tensors) != 2:
        return ctx.data, callbacks
    teacher = callbacks[0]
    assert isinstance(teacher, _OriginalTeacher)
    logits = _logits(teacher.teacher, train_set.tensors[0], MAX_CACHED_LOGITS)
    if logits is None:
        return ctx.data, callbacks
    teacher.cached = 2
    return dataclasses.replace(ctx.data, train=TensorDataset(*train_set.tensors, logits)), callbacks


def _train_cfg(ctx: StageContext, spec: StageSpec) -> TrainConfig | None:
    if spec.finetune is None or spec.finetune.epochs == 0:
        return None
    return spec.finetune.override(progress=ctx.progress and spec.finetune.progress)


def finetune(ctx: StageContext, spec: StageSpec, model: nn.Module, *extra: Callback) -> dict[str, Any]:
    cfg = _train_cfg(ctx, spec)
    if cfg is None:
        return {}
    data, kd = with_teacher(ctx, spec, cfg)
    res = train(model, data, cfg, callbacks=[*extra, *kd])
    return {"finetune_best_val_top1": res.best_val_top1, "finetune_steps": res.steps}


# --- the adapters ----------------------------------------------------------------------------
def _save(ctx: StageContext, spec: StageSpec, model: nn.Module) -> Path:
    path = ctx.path(spec, ".safetensors")
    checkpoint.save(model, path, extra={"stage": spec.to_dict()})
    return path


@register_stage("prune", (UnstructuredConfig, ChannelConfig), ("rounds", "spacing", "allocate"),
                "unstructured (zeros, compact sparse file) or channel pruning (smaller layers)")
def prune_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    if isinstance(spec.config, ChannelConfig):
        return channels_stage(ctx, spec)
    model, info, config = ctx.model, {}, spec.config
    assert isinstance(config, UnstructuredConfig)
    if spec.allocate is not None:  # per-layer ratios by rule; the recipe's own overrides win
        ratios = layer_ratios(model, config, spec.allocate, ctx.data)
        info["allocation"] = {"rule": spec.allocate, "ratios": ratios}
        config = dataclasses.replace(config, overrides={**{re.escape(n): r for n, r in ratios.items()},
                                                        **config.overrides})
    cfg = _train_cfg(ctx, spec)
    if cfg is not None:
        data, kd = with_teacher(ctx, spec, cfg)
        _, records = iterative_prune(model, config, data, cfg, rounds=spec.rounds, spacing=spec.spacing,
                                     callbacks=kd)
        info["rounds"] = [dataclasses.asdict(r) for r in records]
    else:
        prune(model, config)
    make_permanent(model)  # the zeros stay; later stages (sharing) keep them at zero
    path = ctx.path(spec, ".safetensors")
    save_sparse(model, path, extra={"stage": spec.to_dict()})
    return StageOutput(model, path, info=info)


@register_stage("channels", (ChannelConfig,), (), "channel / neuron pruning: a physically smaller model")
def channels_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    assert isinstance(spec.config, ChannelConfig)
    model = prune(ctx.model, spec.config, example_inputs=ctx.example(), calibration=ctx.calibration())
    info = finetune(ctx, spec, model)
    return StageOutput(model, _save(ctx, spec, model), info=info)


def _redesigned(ctx: StageContext, spec: StageSpec, report: Any) -> StageOutput:
    """Fine-tune a factorized / separable model (KD from the original with ``teacher``) and save
    it (the spec records the rewrite, so the file reloads as the new architecture)."""
    info: dict[str, Any] = {"rewritten": [r.name for r in report.rewritten], "totals": report.totals(),
                            "skipped": {r.name: r.reason for r in report.skipped}}
    info.update(finetune(ctx, spec, report.model))
    return StageOutput(report.model, _save(ctx, spec, report.model), info=info)


@register_stage("factorize", (LowRankConfig,), (), "low-rank Linear / Conv2d (SVD, Tucker-2)")
def factorize_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    assert isinstance(spec.config, LowRankConfig)
    rep = factorize_with_report(ctx.model, spec.config, example_inputs=ctx.example(),
                                calibration=ctx.calibration())
    return _redesigned(ctx, spec, rep)


@register_stage("separable", (SeparableConfig,), (), "depthwise-separable convolutions")
def separable_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    assert isinstance(spec.config, SeparableConfig)
    rep = separate_with_report(ctx.model, spec.config, example_inputs=ctx.example(),
                               calibration=ctx.calibration())
    return _redesigned(ctx, spec, rep)


@register_stage("early_exit", (EarlyExitConfig,), (),
                "exit heads, trained, thresholds chosen on validation (fewer MACs per sample)")
def early_exit_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    cfg = spec.config
    assert isinstance(cfg, EarlyExitConfig)
    if spec.teacher is not None:
        raise ConfigError(f"stage {ctx.index} (early_exit): 'teacher' is not supported here",
                          hint="heads mode distils each head from the final head (alpha, temperature)")
    multi = add_exits(ctx.model, cfg.exits, example_inputs=ctx.example())
    tc = _train_cfg(ctx, spec) or TrainConfig(epochs=2, progress=False)
    train_exits(multi, ctx.data, ExitTrainConfig(mode=cfg.mode, alpha=cfg.alpha, temperature=cfg.temperature,
                                                  train=tc))
    cal = calibrate(multi, cfg.calibration, calibration=ctx.data)
    info = {"exits": list(multi.points), "thresholds": cal.thresholds, "shares": cal.shares,
            "val_mac_reduction": cal.full_macs / cal.mean_macs}
    return StageOutput(multi, _save(ctx, spec, multi), info=info)


@register_stage("share", (KMeansConfig,), (), "k-means weight sharing + centroid fine-tuning")
def share_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    model = share(ctx.model, spec.config)
    extra: list[Callback] = [CentroidFineTune()]
    info = finetune(ctx, spec, model, *extra)
    # The shared model's real size: fixed-width cluster codes (the pack stage adds entropy coding).
    path = ctx.path(spec, ".dsz")
    pack(model, path, PackConfig(entropy="fixed"))
    return StageOutput(model, path, info=info)


@register_stage("pack", (PackConfig,), (), "write the .dsz container (Huffman-coded codes + sparse index)")
def pack_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    assert isinstance(spec.config, PackConfig)
    model = ctx.model
    if spec.config.codebook_dtype == "float16":
        round_codebooks(model, torch.float16)  # the model then equals what the file stores
    path = ctx.path(spec, ".dsz")
    rep = pack(model, path, spec.config)
    reloaded = load_dsz(path)
    return StageOutput(reloaded, path, info={"entropy": rep.entropy_summary()})


@register_stage("quantize", (PTQConfig, QATConfig), (), "PTQ (weight-only / dynamic / static) or QAT")
def quantize_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    model = ctx.model
    if isinstance(spec.config, QATConfig):
        prepare_qat(model, spec.config, calibration=ctx.data)
        info = finetune(ctx, spec, model)
        convert(model)
    else:
        quantize(model, spec.config, calibration=ctx.data)
        info = {}
    return StageOutput(model, _save(ctx, spec, model), info=info)


@register_stage("distill", (KDConfig,),
                ("student",), "train a new student from the current model (the teacher)")
def distill_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    from deepshrink.distill import distill
    from deepshrink.models import create_model

    st = spec.student or StudentConfig()
    kwargs = {"in_size": ctx.data.in_size, "num_classes": ctx.data.num_classes, **st.args}
    torch.manual_seed(st.seed)
    student = create_model(st.model, **kwargs)
    tc = _train_cfg(ctx, spec) or TrainConfig(epochs=10, progress=False)
    distill(student, spec.config, teacher=ctx.model, data=ctx.data, train_config=tc)
    return StageOutput(student, _save(ctx, spec, student), info={"student": st.to_dict()})


@register_stage("export", (ExportConfig,), (), "ONNX export, run by ONNX Runtime")
def export_stage(ctx: StageContext, spec: StageSpec) -> StageOutput:
    from deepshrink.quantization import OrtModel, export_onnx

    cfg = spec.config
    assert isinstance(cfg, ExportConfig)
    path = ctx.path(spec, ".onnx")
    kw = {"opset": cfg.opset} if cfg.opset else {}
    export_onnx(ctx.model, path, ctx.example(), **kw)
    return StageOutput(ctx.model, path, runner=OrtModel(path, threads=cfg.threads))


__all__ = ["STAGES", "EarlyExitConfig", "ExportConfig", "StageContext", "StageKind", "StageOutput",
           "StageSpec", "StudentConfig", "TeacherConfig", "register_stage", "stage_kind", "teacher_callbacks"]
