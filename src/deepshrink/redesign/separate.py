"""``separate(model, SeparableConfig(...))``: replace standard convolutions (k > 1, groups = 1)
by depthwise k x k + pointwise 1 x 1 pairs (maths and fitting in :mod:`deepshrink.redesign.dwsep`).

Which layers: every eligible conv (default), those matching ``layers``, minus ``ignore``; or, with
``budget``, the fewest that bring the model's MACs to that fraction, chosen by measured
sensitivity per saved MAC (each layer's fitted pair swapped in alone, output error on the
calibration batches). A layer is replaced only where the pair is smaller and (``check_speed``)
measured faster on its own input; the rest are reported as skipped with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from deepshrink.config import (
    Config,
    check,
    check_patterns,
    name_matches,
    override_for,
)
from deepshrink.errors import ConfigError, FormatError, ModelError
from deepshrink.modeling import Inputs, set_submodule
from deepshrink.models import record_edit, register_edit
from deepshrink.models.schema import Int, List, Obj, Str
from deepshrink.redesign import common, dwsep, ranks
from deepshrink.redesign.report import LayerReport, RedesignReport

EDIT_KIND = "separable"


@dataclasses.dataclass
class SeparableConfig(Config):
    """``multiplier``: depthwise channels per input channel (1 = MobileNet). ``between``: what
    sits between the pair: ``none`` (a linear pair, fitted by least squares), ``bn`` or
    ``bn_relu`` (MobileNet; fitted by ``distill_steps`` of layer-wise distillation).
    ``layers``: module-name regexes (full match) to replace (empty: every eligible conv);
    ``ignore``: never replaced; ``overrides``: regex -> multiplier. ``budget``: replace layers
    (least sensitive per saved MAC first) until the model's MACs are at most this fraction.
    ``fit_iters``: alternating least-squares rounds. ``check_speed`` / ``speed_batch`` /
    ``min_speedup``: as in :class:`~deepshrink.redesign.LowRankConfig`.
    ``calibration_batches``: batches whose layer inputs the fit reads."""

    multiplier: int = 1
    between: str = "none"
    layers: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)
    budget: float | None = None
    fit_iters: int = 2
    distill_steps: int = 200
    check_speed: bool = True
    speed_batch: int = 64
    min_speedup: float = 1.0
    calibration_batches: int = 4

    def __post_init__(self) -> None:
        self.layers, self.ignore = tuple(self.layers), tuple(self.ignore)
        super().__post_init__()

    def validate(self) -> None:
        n = type(self).__name__
        check(self.between in dwsep.BETWEEN, n, "between", f"must be one of {list(dwsep.BETWEEN)}, "
              f"got {self.between!r}")
        for field in ("multiplier", "speed_batch", "calibration_batches"):
            v = getattr(self, field)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, n, field,
                  f"must be an integer >= 1, got {v!r}")
        for field in ("fit_iters", "distill_steps"):
            v = getattr(self, field)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, n, field,
                  f"must be an integer >= 0, got {v!r}")
        for key, v in self.overrides.items():
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, n, f"overrides[{key!r}]",
                  f"must be a depth multiplier >= 1, got {v!r}")
        if self.budget is not None:
            check(isinstance(self.budget, (int, float)) and 0 < self.budget < 1, n, "budget",
                  f"must be in (0, 1) (the fraction of the model's MACs kept), got {self.budget!r}")
        check(isinstance(self.min_speedup, (int, float)) and self.min_speedup > 0, n, "min_speedup",
              f"must be > 0, got {self.min_speedup!r}")
        check_patterns(n, "layers/ignore/overrides", [*self.layers, *self.ignore, *self.overrides])


@dataclasses.dataclass
class _Plan:
    name: str
    conv: nn.Conv2d
    multiplier: int
    row: LayerReport
    pair: nn.Sequential | None = None


def _plans(model: nn.Module, config: SeparableConfig, seen: dict[str, common.LayerInputs]
           ) -> tuple[list[_Plan], list[LayerReport]]:
    plans, skipped = [], []
    for name, conv, reason in common.candidates(model, (nn.Conv2d,)):
        reason = reason or dwsep.eligible(conv)
        if not reason and config.layers and not name_matches(name, config.layers):
            reason = "not in the config's layers"
        if not reason and name_matches(name, config.ignore):
            reason = "ignored by the config"
        rec = seen.get(name)
        if not reason and (rec is None or not rec.x):
            reason = "not called on the calibration/example inputs (nothing to fit it to)"
        m = override_for(name, config.overrides, config.multiplier)
        params = conv.weight.numel() + (0 if conv.bias is None else conv.bias.numel())
        macs, macs_sep = dwsep.pair_macs(conv, m, rec.positions if rec else 0)
        row = LayerReport(name, "conv2d", "skipped", [m], params, params, macs, macs)
        if reason:
            row.reason = reason
            skipped.append(row)
            continue
        row.action, row.params_after = "separable", dwsep.pair_params(conv, m, config.between)
        row.macs_after = macs_sep
        plans.append(_Plan(name, conv, m, row))
    return plans, skipped


def _fit(p: _Plan, rec: common.LayerInputs, config: SeparableConfig) -> None:
    p.pair = dwsep.separable(p.conv, p.multiplier, config.between, inputs=rec.x,
                             iters=config.fit_iters, distill_steps=config.distill_steps)
    with torch.no_grad():
        xs = torch.cat(rec.x)
        p.pair.eval()
        p.row.fit_error = common.relative_error(p.pair(xs), p.conv(xs))
        p.pair.train(p.conv.training)


def _select_budget(model: nn.Module, plans: list[_Plan], batches: list[Inputs], budget: float
                   ) -> tuple[set[str], str]:
    """The layers to replace so the model's MACs reach ``budget``: least output error per saved
    MAC first (each fitted pair measured alone)."""
    total = ranks.model_total(model, batches[0], "macs")
    refs = ranks.reference_outputs(model, batches)
    scored = []
    for p in plans:
        set_submodule(model, p.name, p.pair)
        try:
            err = ranks.output_error(model, batches, refs)
        finally:
            set_submodule(model, p.name, p.conv)
        scored.append((err / max(1, p.row.macs_before - p.row.macs_after), p))
    target, now, chosen = budget * total, total, set()
    for _, p in sorted(scored, key=lambda t: t[0]):
        if now <= target:
            break
        chosen.add(p.name)
        now -= p.row.macs_before - p.row.macs_after
    return chosen, f"budget {budget} of MACs: model {total} -> planned {now} (target {int(target)}" \
                   f"{'' if now <= target else ', NOT reached'})"


def _pays(p: _Plan, rec: common.LayerInputs, config: SeparableConfig) -> str:
    """'' when the pair is smaller and (if checked) faster, else why not."""
    if p.row.params_after >= p.row.params_before:
        return f"does not pay: the pair has {p.row.params_after} >= {p.row.params_before} params"
    if config.check_speed:
        x = common.speed_input(rec, config.speed_batch)
        assert p.pair is not None and x is not None
        p.pair.eval()
        p.row.speedup = common.speed_ratio(p.conv, p.pair, x)
        p.pair.train(p.conv.training)
        if p.row.speedup < config.min_speedup:
            return (f"not faster: measured speedup {p.row.speedup:.2f}x < {config.min_speedup}x at "
                    f"batch {config.speed_batch}")
    return ""


def separate_with_report(model: nn.Module, config: SeparableConfig | None = None, *,
                         example_inputs: Any = None, calibration: Any = None) -> RedesignReport:
    """:func:`separate`, returning the per-layer report (with the edited model as ``.model``)."""
    config = config or SeparableConfig()
    if not isinstance(config, SeparableConfig):
        raise ModelError(f"separate needs a SeparableConfig, got {type(config).__name__}")
    batches = common.batches_for(example_inputs, calibration, config.calibration_batches)
    if not batches:
        raise ConfigError("separate needs example_inputs or calibration data",
                          hint="the new pairs are fitted to each layer's outputs on them")
    names = [n for n, _, _ in common.candidates(model, (nn.Conv2d,))]
    seen = common.capture_inputs(model, names, batches)
    plans, rows = _plans(model, config, seen)
    for p in plans:
        _fit(p, seen[p.name], config)
    notes: list[str] = []
    chosen = {p.name for p in plans}
    if config.budget is not None and plans:
        chosen, note = _select_budget(model, plans, batches, config.budget)
        notes.append(note)
    edit: dict[str, dict[str, Any]] = {}
    for p in plans:
        reason = "not needed to reach the budget" if p.name not in chosen else _pays(p, seen[p.name], config)
        if reason:
            p.row.skip(reason)
        else:
            set_submodule(model, p.name, p.pair)
            edit[p.name] = {"multiplier": p.multiplier, "between": config.between,
                            "shape": list(p.conv.weight.shape)}
        rows.append(p.row)
    if edit:
        record_edit(model, {"kind": EDIT_KIND, "layers": edit})
    return RedesignReport.finish(model, "depthwise-separable substitution", rows, config,
                                 [*config.layers, *config.ignore, *config.overrides], notes)


def separate(model: nn.Module, config: SeparableConfig | None = None, *, example_inputs: Any = None,
             calibration: Any = None) -> nn.Module:
    """Replace eligible convolutions of ``model`` by depthwise-separable pairs **in place** and
    return it. The pairs are fitted to each layer's outputs on ``calibration`` (or the
    ``example_inputs`` batch); fine-tune afterwards (:func:`~deepshrink.redesign.recover`, with KD
    from the original). The edit is recorded in the spec so :func:`deepshrink.load` rebuilds it.
    :func:`separate_with_report` gives the per-layer report."""
    return separate_with_report(model, config, example_inputs=example_inputs, calibration=calibration).model


# -- replay on load ------------------------------------------------------------------------------
_layer_fields = Obj({"multiplier": Int(1, 1 << 16), "between": Str(choices=dwsep.BETWEEN),
                     "shape": List(common.DIM, max_len=4, min_len=4)})


#: Schema of a recorded ``separable`` edit (every field but ``kind``): plain JSON, checked.
edit_fields = common.layers_edit_schema(_layer_fields)


def _rebuild(model: nn.Module, name: str, rec: dict[str, Any], at: str) -> nn.Module:
    conv = common.shaped_module_at(model, name, nn.Conv2d, rec["shape"], at)
    if dwsep.eligible(conv):
        raise FormatError(f"{at}: layer {name!r} cannot be separable ({dwsep.eligible(conv)})")
    return dwsep.build(conv, rec["multiplier"], rec["between"])


@register_edit(EDIT_KIND, schema=edit_fields)
def replay(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Rebuild the separable pairs on load (weights come from the file)."""
    return common.replay_layers(model, edit, EDIT_KIND, edit_fields, _rebuild)
