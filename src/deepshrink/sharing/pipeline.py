"""Deep Compression end to end: prune -> share (k-means) -> centroid fine-tune -> entropy code.

:func:`compress` runs the stages on a trained model and measures each one from a real file:
every stage's model is written (pruned: fp32 non-zeros + fixed-width relative indices; shared:
fixed-width cluster indices; final: Huffman), loaded back with :func:`deepshrink.load` and
evaluated, so each row of the stage table is the accuracy of exactly the bytes it reports.

With ``distill_alpha > 0`` every fine-tuning step (after each pruning round, and of the
centroids) also matches the *uncompressed* model's softened outputs (knowledge distillation,
:func:`deepshrink.distill.kd_loss`): the dense model is the best teacher the compressed one has.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink import distributed
from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.dsz import PackConfig, PackReport, load_dsz, pack
from deepshrink.fileio import scratch_dir
from deepshrink.measure import ResultTable, count_params, fp32_safetensors_bytes
from deepshrink.pruning import MaskCallback, UnstructuredConfig, iterative_prune, make_permanent
from deepshrink.sharing.finetune import CentroidFineTune
from deepshrink.sharing.kmeans import KMeansConfig, round_codebooks, share
from deepshrink.train import Callback, TrainConfig, TrainState, evaluate, logits_of, train


def _default_prune() -> UnstructuredConfig:
    return UnstructuredConfig(ratio=0.9, scope="layer")


@dataclasses.dataclass
class CompressConfig(Config):
    """The whole pipeline. ``prune=None`` skips pruning (e.g. the model is already sparse);
    ``finetune=None`` skips centroid fine-tuning."""

    prune: UnstructuredConfig | None = dataclasses.field(default_factory=_default_prune)
    prune_rounds: int = 3
    prune_train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=2, lr=5e-4, progress=False, keep_best=True))
    prune_final: TrainConfig | None = None  # one more fine-tune at the final sparsity
    sharing: KMeansConfig = dataclasses.field(default_factory=KMeansConfig)
    finetune: TrainConfig | None = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=2, lr=1e-4, progress=False, keep_best=True))
    pack: PackConfig = dataclasses.field(default_factory=PackConfig)
    distill_alpha: float = 0.0  # weight of the teacher (input model) term in fine-tuning losses
    distill_temperature: float = 4.0

    def validate(self) -> None:
        n = type(self).__name__
        check(self.prune_rounds >= 1, n, "prune_rounds", f"must be >= 1, got {self.prune_rounds}")
        check(0.0 <= self.distill_alpha <= 1.0, n, "distill_alpha",
              f"must be in [0, 1], got {self.distill_alpha}")
        check(self.distill_temperature > 0, n, "distill_temperature",
              f"must be > 0, got {self.distill_temperature}")


class SelfDistill(Callback):
    """Replace the training loss by ``kd_loss`` against a frozen copy of the dense ``teacher``."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float) -> None:
        self.teacher = copy.deepcopy(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def on_loss(self, state: TrainState, loss: torch.Tensor) -> torch.Tensor:
        from deepshrink.distill import kd_loss

        with torch.no_grad():
            t_logits = logits_of(self.teacher(state.batch[0]))
        return kd_loss(state.outputs, t_logits, state.batch[1], temperature=self.temperature,
                       alpha=self.alpha)["loss"]


def _teacher_callbacks(cfg: CompressConfig, teacher: nn.Module) -> list[Callback]:
    return [SelfDistill(teacher, cfg.distill_alpha, cfg.distill_temperature)] if cfg.distill_alpha else []


def prune_step(model: nn.Module, data: DataBundle, cfg: CompressConfig,
               teacher: nn.Module | None = None) -> list[Any]:
    """The pruning stage alone (in place): ``cfg.prune_rounds`` prune -> fine-tune rounds, then
    the masks are dropped (the zeros stay). Returns the per-round records."""
    if cfg.prune is None:
        return []
    teacher = teacher if teacher is not None else copy.deepcopy(model)
    _, rounds = iterative_prune(model, cfg.prune, data, cfg.prune_train, rounds=cfg.prune_rounds,
                                callbacks=_teacher_callbacks(cfg, teacher))
    if cfg.prune_final is not None:
        train(model, data, cfg.prune_final, callbacks=[MaskCallback(), *_teacher_callbacks(cfg, teacher)])
    make_permanent(model)
    return rounds


@dataclasses.dataclass
class CompressResult:
    model: nn.Module  # the final model, loaded back from the .dsz file
    table: ResultTable
    report: PackReport  # coding statistics of the final file
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"stages": self.table.rows, "pack": self.report.to_dict(), "seconds": self.seconds}


def _measure(model: nn.Module, data: DataBundle) -> dict[str, float]:
    return {"val_top1": evaluate(model, data.loader("val", 1000))["top1"],
            "top1": evaluate(model, data.loader("test", 1000))["top1"]}


def _stage(table: ResultTable, label: str, model: nn.Module, nbytes: int, fp32: int,
           base_top1: float, data: DataBundle, **extra: Any) -> None:
    acc = _measure(model, data)
    _, nonzero = count_params(model)
    table.add(stage=label, nonzero=nonzero, bytes=nbytes, ratio=fp32 / nbytes, top1=acc["top1"],
              val_top1=acc["val_top1"], drop_pt=100 * (base_top1 - acc["top1"]), **extra)


def _packed(model: nn.Module, path: Path, cfg: PackConfig, extra: dict[str, Any] | None = None
            ) -> tuple[nn.Module, PackReport]:
    rep = pack(model, path, cfg, extra=extra)
    return load_dsz(path), rep


def compress(model: nn.Module, data: DataBundle, config: CompressConfig | None = None,
             output: str | Path | None = None, *, stage_dir: str | Path | None = None,
             reference: nn.Module | None = None, extra: dict[str, Any] | None = None) -> CompressResult:
    """Compress ``model`` (not modified) and write the final .dsz to ``output``.

    Stage files go to ``stage_dir`` (kept) or a temporary directory. Accuracy: test split
    (``top1``, reported) and validation split (``val_top1``, for choosing settings).
    ``reference`` is the model the baseline row and the drops refer to (default: ``model``), e.g.
    the dense original when ``model`` was pruned beforehand and ``config.prune`` is None.
    ``extra`` is free metadata for the final file (e.g. its data record).
    """
    cfg = config or CompressConfig()
    t0 = time.perf_counter()
    model = copy.deepcopy(model)
    ref = reference if reference is not None else copy.deepcopy(model)  # the dense original
    fp32 = fp32_safetensors_bytes(ref)
    table = ResultTable("Deep Compression stages (bytes are real files; accuracy of the reloaded file)")
    base = _measure(ref, data)
    _, nz = count_params(ref)
    table.add(stage="baseline (fp32 safetensors)", nonzero=nz, bytes=fp32, ratio=1.0, top1=base["top1"],
              val_top1=base["val_top1"], drop_pt=0.0)
    with scratch_dir() as tmp:
        # Data-parallel: every process packs and reloads each stage (same model, same table),
        # but only the main process writes where the caller asked; the others use their tmp.
        main = distributed.is_main()
        sdir = Path(stage_dir) if stage_dir and main else Path(tmp)
        sdir.mkdir(parents=True, exist_ok=True)
        fixed = dataclasses.replace(cfg.pack, entropy="fixed")
        prune_step(model, data, cfg, teacher=ref)
        pruned, rep = _packed(model, sdir / "1-pruned.dsz", fixed)
        _stage(table, "pruned (fp32 non-zeros + relative index)", pruned, rep.bytes, fp32,
               base["top1"], data)
        share(model, cfg.sharing)
        shared, rep = _packed(model, sdir / "2-shared.dsz", fixed)
        _stage(table, "+ weight sharing (k-means, fixed-width codes)", shared, rep.bytes, fp32,
               base["top1"], data)
        if cfg.finetune is not None:
            train(model, data, cfg.finetune, callbacks=[CentroidFineTune(), *_teacher_callbacks(cfg, ref)])
            tuned, rep = _packed(model, sdir / "3-finetuned.dsz", fixed)
            _stage(table, "+ centroid fine-tuning", tuned, rep.bytes, fp32, base["top1"], data)
        if cfg.pack.codebook_dtype == "float16":
            round_codebooks(model, torch.float16)  # the model then equals what the file stores
        out = Path(output) if output and main else sdir / "4-huffman.dsz"
        final, rep = _packed(model, out, cfg.pack, extra)
        ent = rep.entropy_summary()
        _stage(table, f"+ {cfg.pack.entropy} coding (.dsz)", final, rep.bytes, fp32, base["top1"], data,
               coded_over_entropy=ent["payload_over_entropy"])
    return CompressResult(final, table, rep, time.perf_counter() - t0)
