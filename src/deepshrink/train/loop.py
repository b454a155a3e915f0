"""The shared training loop. Every fine-tune step in deepshrink (pruning, QAT, distillation,
centroid fine-tuning) runs through :func:`train`; techniques plug in with :class:`Callback`
hooks and an optional ``loss_fn`` instead of copying the loop.

Data-parallel: started by ``torchrun --nproc_per_node=N`` the same code trains with
DistributedDataParallel (``gloo`` on CPU, ``nccl`` on GPU, one device per process). Each process
takes its share of every *global* batch (:mod:`deepshrink.train.batches`), gradients are
averaged by DDP, epoch metrics are summed over processes, and only the main process (rank 0)
shows progress, prints and writes checkpoints. Callbacks always see the bare model
(``state.model``, parameter names unchanged), never the DDP wrapper.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from deepshrink import distributed
from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.errors import ModelError
from deepshrink.modeling import output_tensor, to_device
from deepshrink.progress import console, make_progress
from deepshrink.train.batches import LoaderBatches, TensorBatches
from deepshrink.train.resume import read_state, resume_path, write_state

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
    resume: bool = False  # continue from <checkpoint>.resume.pt when it exists (after a restart)
    device: str = "cpu"  # cpu | cuda (this process's GPU under torchrun) | cuda:N | auto;
    # the model trains there and is moved back to its own device afterwards
    find_unused_parameters: bool = False  # DDP: allow parameters that get no gradient in a step
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
        check(re.fullmatch(r"cpu|cuda(:\d+)?|auto", self.device) is not None, n, "device",
              f"must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        check(not self.resume or bool(self.checkpoint), n, "resume",
              "needs checkpoint (the resume state is saved next to it)")


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

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue after a restart (tensors, numbers, strings,
        lists, dicts); saved with the training state when ``TrainConfig.checkpoint`` is set."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called after ``on_train_begin`` when resuming)."""


class CheckpointCallback(Callback):
    """Save the model (atomically, with its architecture spec) after every epoch, or only when
    validation accuracy improves when ``best_only``. Only the main process writes."""

    def __init__(self, path: str, best_only: bool = False) -> None:
        self.path, self.best_only, self.best = path, best_only, -1.0

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        from deepshrink.checkpoint import save

        score = metrics.get("val_top1", -1.0)
        if self.best_only and score <= self.best:
            return
        self.best = max(self.best, score)
        if distributed.is_main():
            save(state.model, self.path, extra={"epoch": metrics["epoch"], "metrics": metrics,
                                                "train": state.config.to_dict()})

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", -1.0))


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
    """Stop at the first NaN/inf loss: every later step would only spread it into the weights.
    Data-parallel, the processes agree first (one stopping alone would leave the others waiting
    in the gradient all-reduce)."""
    value = float(loss.detach())
    bad = not math.isfinite(value)
    if distributed.is_distributed():
        bad = distributed.all_reduce_floats([float(bad)], "max")[0] > 0
    if bad:
        where = f" on rank {distributed.rank()}" if distributed.is_distributed() else ""
        raise ModelError(f"training diverged: the loss is {value}{where} at epoch {epoch + 1}, "
                         f"step {step}", hint=f"lower the learning rate (lr={cfg.lr}) or check the data "
                                              "for NaN/inf values")


def default_loss(cfg: TrainConfig) -> LossFn:
    def loss(outputs: torch.Tensor, targets: torch.Tensor, batch: Sequence[torch.Tensor]) -> Any:
        return F.cross_entropy(outputs, targets, label_smoothing=cfg.label_smoothing)

    return loss


def logits_of(outputs: Any) -> torch.Tensor:
    """The tensor a loss reads from a model's output (see :func:`deepshrink.modeling.output_tensor`)."""
    return output_tensor(outputs)


@dataclasses.dataclass
class _Run:
    """Everything one call of :func:`train` works with, built by :func:`_prepare`."""

    model: nn.Module  # the bare model: callbacks, evaluation and checkpoints use it
    net: nn.Module  # what the forward pass calls: the DDP wrapper when data-parallel
    cfg: TrainConfig
    callbacks: list[Callback]
    loss_fn: LossFn
    batches: TensorBatches | LoaderBatches
    val_loader: DataLoader | None
    sched: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    device: torch.device
    aug_gen: torch.Generator
    home: torch.device | None = None  # where the model was before training; it goes back there
    start_epoch: int = 0
    best: tuple[float, dict[str, torch.Tensor]] | None = None


def train(model: nn.Module, data: DataBundle | DataLoader, config: TrainConfig | None = None,
          *, callbacks: Iterable[Callback] = (), loss_fn: LossFn | None = None,
          val_loader: DataLoader | None = None) -> TrainResult:
    """Train ``model`` in place and return the per-epoch history.

    ``data`` is a :class:`DataBundle` (its train split is used, its val split for validation)
    or a DataLoader yielding ``(inputs, targets, *extra)`` batches. Seeded and deterministic.
    Under ``torchrun`` it runs data-parallel (see the module docstring); ``config.batch_size``
    (or the loader's batch) is the global batch, split across the processes.
    """
    cfg = config or TrainConfig()
    run = _prepare(model, data, cfg, list(callbacks), loss_fn, val_loader)
    for cb in run.callbacks:
        cb.on_train_begin(run.state)
    if cfg.resume:
        _restore(run)
    run.net = _wrap_ddp(model, run.device, cfg)
    with make_progress(cfg.progress and distributed.is_main()) as bar:
        task = bar.add_task("train", total=run.state.total_steps, info="")
        for epoch in range(run.start_epoch, cfg.epochs):
            if run.state.step >= run.state.total_steps:
                break
            metrics = _train_epoch(run, epoch, lambda info: bar.update(task, advance=1, info=info))
            _end_epoch(run, metrics, live=bar.live.is_started)
            if run.state.stop:
                break
    run.net = model  # drop the DDP wrapper (and its gradient hooks) before the next train()
    return _finish(run)


def _prepare(model: nn.Module, data: DataBundle | DataLoader, cfg: TrainConfig,
             callbacks: list[Callback], loss_fn: LossFn | None,
             val_loader: DataLoader | None) -> _Run:
    device = distributed.setup(cfg.device)  # joins torchrun's process group on first use
    home = _model_device(model)
    model.to(device)
    if cfg.checkpoint:
        callbacks.append(CheckpointCallback(cfg.checkpoint, best_only=cfg.keep_best))
    seed_everything(cfg.seed)  # the same seed on every process: callbacks decide alike
    if isinstance(data, DataBundle):
        batches: TensorBatches | LoaderBatches = TensorBatches(data.train, cfg.batch_size, cfg.seed)
        val_loader = val_loader or data.loader("val", 512)
    else:
        batches = LoaderBatches(data, cfg.seed)
    opt = _optimizer(model, cfg)
    steps_per_epoch = len(batches)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total, steps_per_epoch))
    return _Run(model, model, cfg, callbacks, loss_fn or default_loss(cfg), batches, val_loader,
                sched, TrainState(model, opt, cfg, total_steps=total), device,
                torch.Generator().manual_seed(cfg.seed + 1), home)


def _wrap_ddp(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    """DistributedDataParallel around the model when there are several processes. Built after
    the callbacks' ``on_train_begin`` (which may prune or rewrite weights) and after a resume,
    so the weights it broadcasts from rank 0 are the ones training starts from."""
    if not distributed.is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=cfg.find_unused_parameters)


def _train_epoch(run: _Run, epoch: int, show: Callable[[str], None]) -> dict[str, float]:
    state, cfg = run.state, run.cfg
    state.epoch = epoch
    run.model.train()
    for cb in run.callbacks:
        cb.on_epoch_begin(state)
    loss_sum, correct, seen = 0.0, 0, 0
    for batch, n_global in run.batches.epoch(epoch):
        if state.step >= state.total_steps:
            break
        step_loss, step_correct, n = _train_step(run, batch, n_global)
        loss_sum, correct, seen = loss_sum + step_loss, correct + step_correct, seen + n
        show(f"ep {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.4f} acc {correct / seen:.4f}")
        if _any_stop(state):
            break
    # Sums over every process: the metrics of the global batches, identical everywhere.
    loss_sum, correct, seen = distributed.all_reduce_floats([loss_sum, correct, seen])
    metrics: dict[str, float] = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
                                 "train_top1": correct / max(1, seen)}
    if run.val_loader is not None:
        ev = _evaluate_shared(run.model, run.val_loader)
        metrics.update(val_loss=ev["loss"], val_top1=ev["top1"])
    return metrics


def _train_step(run: _Run, batch: Sequence[Any], n_global: int) -> tuple[float, int, int]:
    """One optimizer step on this process's share of a global batch; returns its summed loss,
    correct count and size (this process's only)."""
    state, cfg = run.state, run.cfg
    batch = tuple(to_device(t, run.device) for t in batch)
    x, y = batch[0], batch[1]
    if cfg.augment == "shift":
        x = _shift(x, run.aug_gen)  # one shift per global batch: the same on every process
        batch = (x, y, *batch[2:])
    state.batch = batch
    for cb in run.callbacks:
        cb.on_batch_begin(state)
    out = logits_of(run.net(x))
    state.outputs = out
    res = run.loss_fn(out, y, batch)
    loss = res["loss"] if isinstance(res, dict) else res
    for cb in run.callbacks:
        loss = cb.on_loss(state, loss)
    _check_finite(loss, state.epoch, state.step, cfg)
    state.optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over processes; weighting each share's mean loss by its size makes
    # that average the global batch's mean gradient (shares differ by one sample at most).
    share = len(y) * distributed.world_size() / n_global
    (loss * share if share != 1 else loss).backward()
    for cb in run.callbacks:
        cb.after_backward(state)
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    state.optimizer.step()
    run.sched.step()
    state.step += 1
    for cb in run.callbacks:
        cb.on_step_end(state)
    return float(loss.detach()) * len(y), int((out.detach().argmax(1) == y).sum()), len(y)


def _any_stop(state: TrainState) -> bool:
    """A callback's stop request ends training on every process at the same step."""
    if distributed.is_distributed():
        state.stop = distributed.all_reduce_floats([float(state.stop)], "max")[0] > 0
    return state.stop


def _end_epoch(run: _Run, metrics: dict[str, float], *, live: bool) -> None:
    cfg, state = run.cfg, run.state
    val = metrics.get("val_top1")
    if cfg.keep_best and val is not None and (run.best is None or val > run.best[0]):
        run.best = (val, copy.deepcopy(run.model.state_dict()))
    state.history.append(metrics)
    if cfg.progress and not live and distributed.is_main():
        # No live bar (not a terminal): one line per epoch so long runs show progress.
        console.print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in metrics.items()), highlight=False)
    for cb in run.callbacks:
        cb.on_epoch_end(state, metrics)
    if cfg.checkpoint and distributed.is_main():
        _save_resume_state(run, int(metrics["epoch"]))


def _finish(run: _Run) -> TrainResult:
    if run.best is not None:
        run.model.load_state_dict(run.best[1])
    for cb in run.callbacks:
        cb.on_train_end(run.state)
    run.model.eval()
    if run.home is not None:
        run.model.to(run.home)  # e.g. trained on a GPU, handed back on the CPU like it came
    distributed.barrier()  # files written by the main process exist when train() returns
    vals = [h["val_top1"] for h in run.state.history if "val_top1" in h]
    return TrainResult(run.state.history, run.state.step, max(vals) if vals else None)


def _save_resume_state(run: _Run, epochs_done: int) -> None:
    assert run.cfg.checkpoint is not None
    best_val, best_model = run.best if run.best is not None else (-1.0, None)
    write_state(resume_path(run.cfg.checkpoint), {
        "epoch": epochs_done, "step": run.state.step, "model": run.model.state_dict(),
        "optimizer": run.state.optimizer.state_dict(), "scheduler": run.sched.state_dict(),
        "aug_rng": run.aug_gen.get_state(), "history": json.dumps(run.state.history),
        "best_val": float(best_val), "best_model": best_model,
        "callbacks": [cb.state_dict() for cb in run.callbacks],
        "config": run.cfg.to_json()})


def _restore(run: _Run) -> None:
    """Continue from the saved training state, if there is one (every process reads it)."""
    assert run.cfg.checkpoint is not None
    path = resume_path(run.cfg.checkpoint)
    if not path.is_file():
        return
    saved = read_state(path)
    if len(saved["callbacks"]) != len(run.callbacks):
        raise ModelError(f"{path}: saved with {len(saved['callbacks'])} callbacks, "
                         f"this run has {len(run.callbacks)}",
                         hint="resume with the same callbacks, or delete the file to start over")
    try:
        run.model.load_state_dict(saved["model"])
        run.state.optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: does not fit this model/optimizer: {exc}",
                         hint="resume the same model and TrainConfig, or delete the file") from None
    run.sched.load_state_dict(saved["scheduler"])
    run.aug_gen.set_state(saved["aug_rng"])
    run.state.step, run.start_epoch = saved["step"], saved["epoch"]
    run.state.history = saved["history"]
    if isinstance(saved.get("best_model"), dict):
        run.best = (saved["best_val"], saved["best_model"])
    for cb, cb_state in zip(run.callbacks, saved["callbacks"], strict=True):
        cb.load_state_dict(cb_state)


def _model_device(model: Any) -> torch.device | None:
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        return p.device if p is not None else None
    return None


def _batch_counts(model: Any, batches: Iterable[Sequence[torch.Tensor]], topk: tuple[int, ...]
                  ) -> list[float]:
    """[loss sum, n, correct@k for each k] over ``batches``."""
    device = _model_device(model)
    counts = [0.0, 0.0] + [0.0] * len(topk)
    for batch in batches:
        x, y = batch[0], batch[1]
        if device is not None:
            x, y = x.to(device), y.to(device)
        out = logits_of(model(x)).float()
        counts[0] += float(F.cross_entropy(out, y, reduction="sum"))
        counts[1] += len(y)
        top = out.topk(min(max(topk), out.shape[1]), dim=1).indices
        for i, k in enumerate(topk):
            counts[2 + i] += int((top[:, :k] == y[:, None]).any(1).sum())
    return counts


def _as_metrics(counts: list[float], topk: tuple[int, ...]) -> dict[str, float]:
    n = int(counts[1])
    res: dict[str, float] = {f"top{k}": counts[2 + i] / max(1, n) for i, k in enumerate(topk)}
    res.update(loss=counts[0] / max(1, n), n=n)
    return res


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def evaluate(model: nn.Module | Callable[[torch.Tensor], Any], loader: DataLoader,
             topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy and mean cross-entropy on a loader. ``model`` may be any callable
    (e.g. an ONNX Runtime wrapper) returning logits; a module's inputs are moved to its device."""
    with _eval_mode(model):
        return _as_metrics(_batch_counts(model, loader, topk), topk)


@torch.no_grad()
def _evaluate_shared(model: nn.Module, loader: DataLoader, topk: tuple[int, ...] = (1, 5)
                     ) -> dict[str, float]:
    """:func:`evaluate` with the batches dealt round-robin to the processes and the counts
    summed: the same numbers on every process, each doing 1/N of the work."""
    r, w = distributed.rank(), distributed.world_size()
    mine = (b for i, b in enumerate(loader) if i % w == r)
    with _eval_mode(model):
        counts = _batch_counts(model, mine, topk)
    return _as_metrics(distributed.all_reduce_floats(counts), topk)
