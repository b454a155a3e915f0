"""The shared training loop. Every fine-tune step in deepshrink (pruning, QAT, distillation,
centroid fine-tuning) runs through :func:`train`; techniques plug in with :class:`Callback`
hooks and an optional ``loss_fn`` instead of copying the loop.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.errors import ModelError
from deepshrink.modeling import output_tensor
from deepshrink.progress import console, make_progress

# loss_fn(outputs, targets, batch) -> loss tensor, or a dict with "loss" and named parts to log.
LossFn = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], Any]


@dataclasses.dataclass
class TrainConfig(Config):
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # none | cosine | step | onecycle
    step_size: int = 10  # step scheduler: epochs between decays
    gamma: float = 0.1
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    augment: str = "none"  # none | shift (random translation by up to 2 px, images only)
    seed: int = 0
    max_steps: int | None = None  # stop early after this many optimizer steps (quick runs)
    keep_best: bool = False  # restore the weights with the best validation accuracy at the end
    checkpoint: str | None = None  # safetensors path written after each epoch (best val if keep_best)
    progress: bool = True

    def validate(self) -> None:
        n = type(self).__name__
        check(self.epochs >= 0, n, "epochs", f"must be >= 0, got {self.epochs}")
        check(self.batch_size >= 1, n, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, n, "lr", f"must be > 0, got {self.lr}")
        check(self.optimizer in ("adam", "adamw", "sgd"), n, "optimizer",
              f"must be adam, adamw or sgd, got {self.optimizer!r}")
        check(self.scheduler in ("none", "cosine", "step", "onecycle"), n, "scheduler",
              f"must be none, cosine, step or onecycle, got {self.scheduler!r}")
        check(self.augment in ("none", "shift"), n, "augment",
              f"must be none or shift, got {self.augment!r}")
        check(0.0 <= self.label_smoothing < 1.0, n, "label_smoothing", "must be in [0, 1)")
        check(self.weight_decay >= 0, n, "weight_decay", "must be >= 0")


@dataclasses.dataclass
class TrainState:
    """What callbacks see. ``batch`` / ``outputs`` are set during a step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    batch: Sequence[torch.Tensor] = ()
    outputs: torch.Tensor | None = None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    stop: bool = False  # a callback may set this to end training after the current step


class Callback:
    """Hooks into :func:`train`. Override what you need; every method is a no-op by default."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_epoch_begin(self, state: TrainState) -> None: ...
    def on_batch_begin(self, state: TrainState) -> None: ...

    def on_loss(self, state: TrainState, loss: torch.Tensor) -> torch.Tensor:
        """Return the loss to minimise (e.g. add a regulariser or a hint term)."""
        return loss

    def after_backward(self, state: TrainState) -> None:
        """Gradients exist and the step has not happened (e.g. mask gradients)."""

    def on_step_end(self, state: TrainState) -> None:
        """After ``optimizer.step()`` (e.g. re-apply masks, update a sparsity schedule)."""

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


class CheckpointCallback(Callback):
    """Save the model (atomically, with its architecture spec) after every epoch, or only when
    validation accuracy improves when ``best_only``."""

    def __init__(self, path: str, best_only: bool = False) -> None:
        self.path, self.best_only, self.best = path, best_only, -1.0

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        from deepshrink.checkpoint import save

        score = metrics.get("val_top1", -1.0)
        if self.best_only and score <= self.best:
            return
        self.best = max(self.best, score)
        save(state.model, self.path, extra={"epoch": metrics["epoch"], "metrics": metrics,
                                            "train": state.config.to_dict()})


@dataclasses.dataclass
class TrainResult:
    history: list[dict[str, float]]
    steps: int
    best_val_top1: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: TrainConfig, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "cosine":
            t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // max(1, cfg.step_size * steps_per_epoch))
        if cfg.scheduler == "onecycle":
            peak = max(1, int(0.3 * total))
            if step < peak:
                return 0.1 + 0.9 * step / peak
            return max(1e-3, 1 - (step - peak) / max(1, total - peak))
        return 1.0

    return fn


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation (zero fill) per batch: cheap augmentation for 28x28 images."""
    if x.dim() != 4:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(F.pad(x, (max_shift,) * 4), shifts=(dy, dx), dims=(2, 3))[
        :, :, max_shift:-max_shift, max_shift:-max_shift]


def _check_finite(loss: torch.Tensor, epoch: int, step: int, cfg: TrainConfig) -> None:
    """Stop at the first NaN/inf loss: every later step would only spread it into the weights."""
    if not math.isfinite(float(loss.detach())):
        raise ModelError(f"training diverged: the loss is {float(loss.detach())} at epoch {epoch + 1}, "
                         f"step {step}", hint=f"lower the learning rate (lr={cfg.lr}) or check the data "
                                              "for NaN/inf values")


def default_loss(cfg: TrainConfig) -> LossFn:
    def loss(outputs: torch.Tensor, targets: torch.Tensor, batch: Sequence[torch.Tensor]) -> Any:
        return F.cross_entropy(outputs, targets, label_smoothing=cfg.label_smoothing)

    return loss


def logits_of(outputs: Any) -> torch.Tensor:
    """The tensor a loss reads from a model's output (see :func:`deepshrink.modeling.output_tensor`)."""
    return output_tensor(outputs)


def train(model: nn.Module, data: DataBundle | DataLoader, config: TrainConfig | None = None,
          *, callbacks: Iterable[Callback] = (), loss_fn: LossFn | None = None,
          val_loader: DataLoader | None = None) -> TrainResult:
    """Train ``model`` in place and return the per-epoch history.

    ``data`` is a :class:`DataBundle` (its train split is used, its val split for validation)
    or a DataLoader yielding ``(inputs, targets, *extra)`` batches. Seeded and deterministic.
    """
    cfg = config or TrainConfig()
    cbs = list(callbacks)
    if cfg.checkpoint:
        cbs.append(CheckpointCallback(cfg.checkpoint, best_only=cfg.keep_best))
    seed_everything(cfg.seed)
    if isinstance(data, DataBundle):
        loader = data.loader("train", cfg.batch_size, seed=cfg.seed)
        val_loader = val_loader or data.loader("val", 512)
    else:
        loader = data
    loss_fn = loss_fn or default_loss(cfg)
    opt = _optimizer(model, cfg)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total, steps_per_epoch))
    state = TrainState(model, opt, cfg, total_steps=total)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    best: tuple[float, dict[str, torch.Tensor]] | None = None

    for cb in cbs:
        cb.on_train_begin(state)
    with make_progress(cfg.progress) as bar:
        task = bar.add_task("train", total=total, info="")
        for epoch in range(cfg.epochs):
            state.epoch = epoch
            model.train()
            for cb in cbs:
                cb.on_epoch_begin(state)
            run_loss, run_correct, run_n = 0.0, 0, 0
            for batch in loader:
                if state.step >= total:
                    break
                x, y = batch[0], batch[1]
                if cfg.augment == "shift":
                    x = _shift(x, aug_gen)
                    batch = (x, y, *batch[2:])
                state.batch = batch
                for cb in cbs:
                    cb.on_batch_begin(state)
                out = logits_of(model(x))
                state.outputs = out
                res = loss_fn(out, y, batch)
                loss = res["loss"] if isinstance(res, dict) else res
                for cb in cbs:
                    loss = cb.on_loss(state, loss)
                _check_finite(loss, epoch, state.step, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for cb in cbs:
                    cb.after_backward(state)
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                state.step += 1
                for cb in cbs:
                    cb.on_step_end(state)
                n = len(y)
                run_loss += float(loss.detach()) * n
                run_correct += int((out.detach().argmax(1) == y).sum())
                run_n += n
                bar.update(task, advance=1, info=f"ep {epoch + 1}/{cfg.epochs} "
                           f"loss {run_loss / run_n:.4f} acc {run_correct / run_n:.4f}")
                if state.stop:
                    break
            metrics = {"epoch": epoch + 1, "train_loss": run_loss / max(1, run_n),
                       "train_top1": run_correct / max(1, run_n)}
            if val_loader is not None:
                ev = evaluate(model, val_loader)
                metrics.update(val_loss=ev["loss"], val_top1=ev["top1"])
                if cfg.keep_best and (best is None or ev["top1"] > best[0]):
                    best = (ev["top1"], copy.deepcopy(model.state_dict()))
            state.history.append(metrics)
            if cfg.progress and not bar.live.is_started:
                # No live bar (not a terminal): one line per epoch so long runs show progress.
                console.print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in metrics.items()), highlight=False)
            for cb in cbs:
                cb.on_epoch_end(state, metrics)
            if state.stop or state.step >= total:
                break
    if best is not None:
        model.load_state_dict(best[1])
    for cb in cbs:
        cb.on_train_end(state)
    model.eval()
    vals = [h["val_top1"] for h in state.history if "val_top1" in h]
    return TrainResult(state.history, state.step, max(vals) if vals else None)


@torch.no_grad()
def evaluate(model: nn.Module | Callable[[torch.Tensor], Any], loader: DataLoader,
             topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy and mean cross-entropy on a loader. ``model`` may be any callable
    (e.g. an ONNX Runtime wrapper) returning logits."""
    if isinstance(model, nn.Module):
        was_training = model.training
        model.eval()
    correct = {k: 0 for k in topk}
    loss_sum, n = 0.0, 0
    for batch in loader:
        x, y = batch[0], batch[1]
        out = logits_of(model(x)).float()
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        top = out.topk(min(max(topk), out.shape[1]), dim=1).indices
        for k in topk:
            correct[k] += int((top[:, :k] == y[:, None]).any(1).sum())
        n += len(y)
    if isinstance(model, nn.Module) and was_training:
        model.train()
    res = {f"top{k}": correct[k] / max(1, n) for k in topk}
    res.update(loss=loss_sum / max(1, n), n=n)
    return res
