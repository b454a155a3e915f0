"""The multi-exit model: a base model plus exit heads at named modules, run with real skipping.

At inference, forward hooks on the attach points compute each active head on the feature that
module produced, score it (max softmax or normalised entropy) and compare with that exit's
threshold. Samples that exit get their logits written to the result; if every sample has
exited, the rest of the base model is *not run* (the hook ends the forward). Otherwise the
module's output is cut to the remaining rows, so later layers only see the samples still
alive; tensors passed around the blocks with the full batch (a `transformers` attention mask)
are cut the same way by pre-hooks on the blocks that follow. Hooks are installed for one call
and removed after it, so the base model is left untouched between calls.

A threshold of ``None`` means "never exit here" (the head is not even run); with every
threshold ``None`` the model computes exactly what the base model computes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.config import name_matches, unmatched_patterns
from deepshrink.early_exit.config import CRITERIA, ExitConfig
from deepshrink.early_exit.heads import build_head, head_spec, suggest_points
from deepshrink.errors import ConfigError, FormatError, ModelError
from deepshrink.modeling import as_inputs, batch_size, call, eval_mode, output_tensor
from deepshrink.models import ModelSpec, get_spec, register_edit, set_spec
from deepshrink.models.schema import Float, Int, List, Obj, Opt, Str

EDIT_KIND = "early_exit"
MAX_EXITS = 64


class _AllExited(Exception):
    """Raised inside a hook to stop the base model once no sample is left."""


@dataclasses.dataclass
class ExitRun:
    """One batch through a multi-exit model: the logits and the exit each sample took
    (``0..K-1`` = an exit head, ``K`` = the final head)."""

    logits: torch.Tensor
    exits: torch.Tensor


def exit_scores(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-sample confidence in [0, 1], higher = surer: max softmax, or 1 - H(p)/log C."""
    if criterion == "confidence":
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return 1.0 - entropy / math.log(max(2, logits.shape[-1]))


class MultiExitModel(nn.Module):
    """``base`` with exit heads after the modules named in ``points``.

    ``model(x)`` returns the logits under the current policy (``criterion`` and one threshold
    per exit); :meth:`run` also returns which exit each sample took; :meth:`all_exits` runs
    every head without skipping (training, calibration).
    """

    def __init__(self, base: nn.Module, points: Sequence[str], heads: Sequence[nn.Module],
                 head_specs: Sequence[dict[str, Any]], *, criterion: str = "confidence",
                 thresholds: Sequence[float | None] | None = None, output: str | None = None) -> None:
        super().__init__()
        if len(points) != len(heads) or len(points) != len(head_specs):
            raise ModelError("one head (and head spec) per exit point is needed")
        self.base = base
        self.heads = nn.ModuleList(heads)
        self.points = list(points)
        self.head_specs = [dict(s) for s in head_specs]
        self.output = output
        self.criterion = "confidence"
        self.thresholds: list[float | None] = [None] * len(points)
        self._followers = _follower_names(base, self.points)
        object.__setattr__(self, "_state", None)
        object.__setattr__(self, "_all_heads", False)
        self._install_hooks()
        self.set_policy(thresholds if thresholds is not None else self.thresholds, criterion)

    @property
    def num_exits(self) -> int:
        return len(self.points)

    # -- policy ---------------------------------------------------------------------------------
    def set_policy(self, thresholds: Sequence[float | None], criterion: str | None = None) -> None:
        """Set one threshold per exit (``None`` = never exit) and optionally the criterion."""
        criterion = criterion or self.criterion
        if criterion not in CRITERIA:
            raise ModelError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
        thresholds = list(thresholds)
        if len(thresholds) != self.num_exits:
            raise ModelError(f"{len(thresholds)} thresholds given for {self.num_exits} exits")
        for i, t in enumerate(thresholds):
            if t is not None and not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0):
                raise ModelError(f"threshold of exit {i} must be None or in [0, 1], got {t!r}")
        self.thresholds = [None if t is None else float(t) for t in thresholds]
        self.criterion = criterion
        spec = get_spec(self)
        if spec is not None:  # keep the recorded edit (what save() writes) in step
            for edit in reversed(spec.edits):
                if edit.get("kind") == EDIT_KIND:
                    edit.update(thresholds=list(self.thresholds), criterion=criterion)
                    break

    def never_exit(self) -> None:
        self.set_policy([None] * self.num_exits)

    def always_exit_at(self, k: int) -> None:
        """Every sample leaves at exit ``k`` (threshold 0), earlier exits off."""
        if not 0 <= k < self.num_exits:
            raise ModelError(f"exit {k} does not exist (the model has {self.num_exits})")
        self.set_policy([None] * k + [0.0] + [None] * (self.num_exits - k - 1))

    # -- running --------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        inputs = kwargs if kwargs else (args[0] if len(args) == 1 else tuple(args))
        if self._all_heads:
            return self.all_exits(inputs)[-1]
        return self.run(inputs).logits

    @contextmanager
    def all_heads(self) -> Iterator[MultiExitModel]:
        """Within this context ``model(x)`` runs every head on every sample (no exits) and
        returns the final logits: what static quantization's calibration needs so that every
        layer, heads included, sees data (``with multi.all_heads(): quantize(multi, ...)``)."""
        object.__setattr__(self, "_all_heads", True)
        try:
            yield self
        finally:
            object.__setattr__(self, "_all_heads", False)

    def run(self, inputs: Any) -> ExitRun:
        """The logits under the current policy and the exit each sample took, skipping the rest
        of the base model for samples that exit."""
        inputs = as_inputs(inputs, "inputs")
        state = _RunState(self, batch_size(inputs))
        with self._running(state):
            try:
                final = output_tensor(call(self.base, inputs), self.output)
            except _AllExited:
                final = None
        if state.logits is None:  # nobody exited: the base model's own output, untouched
            assert final is not None
            return ExitRun(final, state.exit_index())
        if final is not None:
            state.logits[state.alive_index()] = final.to(state.logits.dtype)
        return ExitRun(state.logits, state.exit_index())

    def all_exits(self, inputs: Any) -> list[torch.Tensor]:
        """Every head's logits and the final logits (last), for all samples (no skipping)."""
        inputs = as_inputs(inputs, "inputs")
        state = _RunState(self, batch_size(inputs), collect=True)
        with self._running(state):
            final = output_tensor(call(self.base, inputs), self.output)
        if len(state.collected) != self.num_exits:
            raise ModelError(f"{len(state.collected)} of {self.num_exits} exit points ran "
                             "(an attach point is not called once per forward)")
        return [*state.collected, final]

    def _install_hooks(self) -> None:
        # Installed once (registering hooks per call costs more than a small model's forward);
        # they do nothing unless a run is in progress.
        for k, point in enumerate(self.points):
            self.base.get_submodule(point).register_forward_hook(_PointHook(self, k))

    @contextmanager
    def _running(self, state: _RunState) -> Iterator[None]:
        object.__setattr__(self, "_state", state)
        try:
            yield
        finally:
            object.__setattr__(self, "_state", None)
            for h in state.handles:
                h.remove()

    # -- description ----------------------------------------------------------------------------
    def exit_edit(self) -> dict[str, Any]:
        """The JSON edit that rebuilds the exits on the base model (see :func:`replay_exits`)."""
        return {"kind": EDIT_KIND, "version": 1,
                "exits": [{"point": p, "head": dict(s)} for p, s in zip(self.points, self.head_specs,
                                                                         strict=True)],
                "criterion": self.criterion, "thresholds": list(self.thresholds), "output": self.output}

    def extra_repr(self) -> str:
        return f"points={self.points}, criterion={self.criterion}, thresholds={self.thresholds}"


class _PointHook:
    """Forward hook of exit point ``k`` (an object, so that deep copies follow the model)."""

    def __init__(self, owner: MultiExitModel, k: int) -> None:
        self.owner, self.k = owner, k

    def __call__(self, _module: nn.Module, _args: Any, out: Any) -> Any:
        state = self.owner._state
        return None if state is None else state.after_point(self.k, out)


class _RunState:
    """Book-keeping of one forward: who is still alive, the logits of those who left."""

    def __init__(self, model: MultiExitModel, n: int, collect: bool = False) -> None:
        self.model, self.n, self.collect = model, n, collect
        self.alive: torch.Tensor | None = None  # original row indices still running; None = all
        self.logits: torch.Tensor | None = None
        self.exits: torch.Tensor | None = None
        self.collected: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def alive_index(self) -> torch.Tensor:
        return torch.arange(self.n) if self.alive is None else self.alive

    def exit_index(self) -> torch.Tensor:
        return torch.full((self.n,), self.model.num_exits, dtype=torch.long) if self.exits is None \
            else self.exits

    def after_point(self, k: int, out: Any) -> Any:
        model = self.model
        t = model.thresholds[k]
        if t is None and not self.collect:
            return None
        z = model.heads[k](output_tensor(out))
        if self.collect:
            self.collected.append(z)
            return None
        score = exit_scores(z, model.criterion)
        if self.n == 1:  # batch 1: one comparison, and either leave now or carry on untouched
            if float(score) < t:
                return None
            self.logits, self.exits = z, torch.full((1,), k, dtype=torch.long)
            raise _AllExited
        done = score >= t
        n_done = int(done.sum())
        if n_done == 0:
            return None
        idx = self.alive_index()
        if self.logits is None:
            self.logits = z.new_empty((self.n, z.shape[-1]))
            self.exits = self.exit_index()
        assert self.exits is not None
        self.logits[idx[done]] = z[done]
        self.exits[idx[done]] = k
        if n_done == done.numel():
            raise _AllExited
        keep = ~done
        if self.alive is None:  # first cut: later blocks get their full-batch side inputs cut too
            for name in model._followers:
                self.handles.append(model.base.get_submodule(name).register_forward_pre_hook(
                    lambda _m, a, kw: self.cut_inputs(a, kw), with_kwargs=True))
        self.alive = idx[keep]
        return _cut(out, keep, done.numel())

    def cut_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.alive is None:
            return None
        return _cut(args, self.alive, self.n), _cut(kwargs, self.alive, self.n)


def _cut(value: Any, index: torch.Tensor, n: int) -> Any:
    """Rows ``index`` of every tensor in ``value`` whose leading dimension is the batch ``n``."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cut(v, index, n) for v in value)
    if isinstance(value, list):
        return [_cut(v, index, n) for v in value]
    if isinstance(value, dict):
        return type(value)(**{k: _cut(v, index, n) for k, v in value.items()}) \
            if type(value) is not dict else {k: _cut(v, index, n) for k, v in value.items()}
    return value


def _follower_names(base: nn.Module, points: list[str]) -> list[str]:
    """Blocks after the first exit that share a parent with an exit point: they get pre-hooks
    that cut full-batch side inputs (attention masks) to the rows still running."""
    names: list[str] = []
    for point in points:
        parent, _, _ = point.rpartition(".")
        container = base.get_submodule(parent) if parent else base
        for child, _ in container.named_children():
            full = f"{parent}.{child}" if parent else child
            if full not in names:
                names.append(full)
    return names


# -- the verb -----------------------------------------------------------------------------------
def add_exits(model: nn.Module, config: ExitConfig | None = None, *, example_inputs: Any = None,
              calibration: Any = None) -> MultiExitModel:
    """Attach exit heads to ``model`` (which becomes the returned model's ``base``).

    ``example_inputs`` (or the first batch of ``calibration``) is run once to learn each
    feature's shape and the class count. Heads start untrained and every threshold at ``None``
    (never exit): train them with :func:`deepshrink.early_exit.train_exits` and choose the
    thresholds with :func:`deepshrink.early_exit.calibrate`.
    """
    from deepshrink.modeling import calibration_batches

    cfg = config or ExitConfig()
    if example_inputs is None and calibration is not None:
        example_inputs = calibration_batches(calibration, 1, batch_size_hint=2)[0]
    if example_inputs is None:
        raise ModelError("add_exits needs example_inputs (or calibration) to see the feature shapes")
    candidates = list(cfg.points) or suggest_points(model)
    points = [p for p in candidates if not name_matches(p, cfg.ignore)]
    unmatched = unmatched_patterns(candidates, [*cfg.ignore, *cfg.overrides])
    if unmatched:
        raise ConfigError(f"ExitConfig: pattern(s) {unmatched} match no exit point",
                          hint=f"exit points: {candidates}")
    if not points:
        raise ModelError("no exit points left", hint="check ExitConfig.points / ignore")
    if len(points) > MAX_EXITS:
        raise ModelError(f"{len(points)} exit points; at most {MAX_EXITS}")
    shapes, num_classes = _feature_shapes(model, points, example_inputs, cfg.output)
    specs = []
    for p in points:
        o = cfg.head_options(p)
        specs.append(head_spec(o["head"], shapes[p], num_classes, o["pool"], o["hidden"]))
    multi = MultiExitModel(model, points, [build_head(s) for s in specs], specs, output=cfg.output)
    multi.train(model.training)
    spec = get_spec(model)
    if spec is not None:
        set_spec(multi, ModelSpec(spec.name, dict(spec.kwargs), [*spec.edits, multi.exit_edit()]))
    return multi


def _feature_shapes(model: nn.Module, points: list[str], example: Any, output: str | None
                    ) -> tuple[dict[str, tuple[int, ...]], int]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for p in points:
        try:
            module = model.get_submodule(p)
        except AttributeError as exc:
            raise ModelError(f"the model has no module {p!r} to attach an exit to") from exc
        handles.append(module.register_forward_hook(
            lambda _m, _a, out, p=p: shapes.update({p: tuple(output_tensor(out).shape)})))
    try:
        with eval_mode(model), torch.no_grad():
            final = output_tensor(call(model, as_inputs(example)), output)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in points if p not in shapes]
    if missing:
        raise ModelError(f"exit points {missing} did not run in a forward pass")
    if final.dim() != 2:
        raise ModelError(f"the model's output has shape {tuple(final.shape)}; exits need (batch, classes)"
                         " logits", hint="name the logits output with ExitConfig.output")
    return shapes, int(final.shape[-1])


# -- rebuilding from a file ---------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_HEAD_KINDS = ("pool_linear", "conv_pool_linear", "linear", "cls_linear")
HEAD_SCHEMA = Obj({"kind": Str(choices=_HEAD_KINDS), "in_features": Int(1, 1 << 20),
                   "num_classes": Int(1, 1 << 20), "hidden": Int(0, 1 << 16)},
                  optional={"pool": Int(1, 16)})
EDIT_SCHEMA = Obj({"version": Int(1, 1),
                   "exits": List(Obj({"point": Str(pattern=_NAME), "head": HEAD_SCHEMA}), max_len=MAX_EXITS,
                                 min_len=1),
                   "criterion": Str(choices=CRITERIA),
                   "thresholds": List(Opt(Float(0.0, 1.0)), max_len=MAX_EXITS),
                   "output": Opt(Str(pattern=_NAME))})


def check_exit_edit(edit: Any, where: str = "edit") -> dict[str, Any]:
    """Validate an ``early_exit`` edit read from a file (the registered schema plus the checks
    across fields); FormatError names the bad field."""
    if not isinstance(edit, dict):
        raise FormatError(f"{where}: must be an object, got {edit!r:.60}")
    fields = EDIT_SCHEMA({k: v for k, v in edit.items() if k != "kind"}, where)
    _check_across(fields, where)
    return {"kind": EDIT_KIND, **fields}


def _check_across(edit: dict[str, Any], where: str) -> None:
    if len(edit["thresholds"]) != len(edit["exits"]):
        raise FormatError(f"{where}.thresholds: must have one entry per exit ({len(edit['exits'])}), "
                          f"got {len(edit['thresholds'])}")
    for i, e in enumerate(edit["exits"]):
        head = e["head"]
        pooled = head["kind"] in ("pool_linear", "conv_pool_linear")
        if pooled != ("pool" in head):
            raise FormatError(f"{where}.exits[{i}].head.pool: {'required' if pooled else 'not allowed'} "
                              f"for kind {head['kind']!r}")
        if head["kind"] == "conv_pool_linear" and head["hidden"] < 1:
            raise FormatError(f"{where}.exits[{i}].head.hidden: must be >= 1 for conv_pool_linear")


@register_edit(EDIT_KIND, schema=EDIT_SCHEMA)
def replay_exits(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Rebuild the exits recorded by :func:`add_exits` on a freshly built base model (``edit``
    already checked against :data:`EDIT_SCHEMA`)."""
    _check_across(edit, "edit")
    points = [e["point"] for e in edit["exits"]]
    for i, p in enumerate(points):
        try:
            model.get_submodule(p)
        except AttributeError as exc:
            raise FormatError(f"edit.exits[{i}].point: the model has no module {p!r}") from exc
    specs = [e["head"] for e in edit["exits"]]
    return MultiExitModel(model, points, [build_head(s) for s in specs], specs,
                          criterion=edit["criterion"], thresholds=edit["thresholds"],
                          output=edit["output"])
