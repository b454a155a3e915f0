"""``factorize(model, LowRankConfig(...))``: rewrite Linear / Conv2d layers as low-rank pairs
(see :mod:`deepshrink.redesign.lowrank` for the forms and :mod:`deepshrink.redesign.ranks` for
how ranks are chosen). A layer is rewritten only where the factors are really smaller (fewer
weights) and, when ``check_speed`` is on, measured faster on its own input; every other
candidate is reported as skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import math
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
from deepshrink.models.schema import List, Obj, Str
from deepshrink.redesign import common, lowrank, ranks
from deepshrink.redesign.report import LayerReport, RedesignReport

EDIT_KIND = "lowrank"
CONV_FORMS = {"svd": "conv_svd", "tucker2": "tucker2", "cp": "cp"}
TARGETS = ("linear", "conv2d")


@dataclasses.dataclass
class LowRankConfig(Config):
    """How to choose the rank of each layer: exactly one of

    * ``rank``: a fixed rank for every layer (Tucker-2: for both channel modes);
    * ``energy``: the smallest rank keeping this fraction of sum(sigma^2) (default 0.9 when none
      of the three is given);
    * ``budget``: the whole model's parameters (``budget_metric="params"``) or MACs per sample
      (``"macs"``) after factorization, as a fraction of before, spread over the layers by
      their measured sensitivity (needs example inputs or calibration data).

    ``conv``: the Conv2d form, ``"svd"`` (k x k conv with r filters + 1 x 1), ``"tucker2"`` or
    ``"cp"`` (1 x 1, depthwise k x 1, depthwise 1 x k, 1 x 1; with ``energy`` its rank is read off
    the spectrum of the weight unfolded along its outputs, as for ``"svd"``).
    ``targets``: layer types to consider (``linear``, ``conv2d``). ``ignore``: module-name regexes
    (full match) never rewritten. ``overrides``: module-name regex -> fixed rank for those layers.
    ``round_to``: round ranks up to a multiple of this. ``check_speed``: time each rewritten
    layer against the original on its own input (batch ``speed_batch``) and keep the original
    unless it is at least ``min_speedup`` times faster. ``calibration_batches``: batches read
    for the budget search, for the fit error and the layer timings.
    """

    rank: int | None = None
    energy: float | None = None
    budget: float | None = None
    budget_metric: str = "params"
    conv: str = "svd"
    targets: tuple[str, ...] = TARGETS
    ignore: tuple[str, ...] = ()
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)
    round_to: int = 1
    check_speed: bool = True
    speed_batch: int = 64
    min_speedup: float = 1.0
    calibration_batches: int = 4

    def __post_init__(self) -> None:
        if self.rank is None and self.energy is None and self.budget is None:
            self.energy = 0.9
        self.targets = tuple(self.targets)
        self.ignore = tuple(self.ignore)
        super().__post_init__()

    def validate(self) -> None:
        n = type(self).__name__
        given = [k for k in ("rank", "energy", "budget") if getattr(self, k) is not None]
        check(len(given) == 1, n, "rank/energy/budget", f"give exactly one, got {given}")
        if self.rank is not None:
            check(_is_int(self.rank) and self.rank >= 1, n, "rank",
                  f"must be an integer >= 1, got {self.rank!r}")
        if self.energy is not None:
            check(_is_num(self.energy) and 0 < self.energy <= 1, n, "energy",
                  f"must be in (0, 1], got {self.energy!r}")
        if self.budget is not None:
            check(_is_num(self.budget) and 0 < self.budget < 1, n, "budget",
                  f"must be in (0, 1) (the fraction of the model kept), got {self.budget!r}")
        check(self.budget_metric in ("params", "macs"), n, "budget_metric",
              f"must be 'params' or 'macs', got {self.budget_metric!r}")
        check(self.conv in CONV_FORMS, n, "conv", f"must be one of {sorted(CONV_FORMS)}, got {self.conv!r}")
        check(len(self.targets) > 0 and set(self.targets) <= set(TARGETS), n, "targets",
              f"must be a non-empty subset of {list(TARGETS)}, got {list(self.targets)}")
        for key, v in self.overrides.items():
            check(_is_int(v) and v >= 1, n, f"overrides[{key!r}]", f"must be a rank >= 1, got {v!r}")
        check_patterns(n, "ignore/overrides", [*self.ignore, *self.overrides])
        for field in ("round_to", "speed_batch", "calibration_batches"):
            v = getattr(self, field)
            check(_is_int(v) and v >= 1, n, field, f"must be an integer >= 1, got {v!r}")
        check(_is_num(self.min_speedup) and self.min_speedup > 0, n, "min_speedup",
              f"must be > 0, got {self.min_speedup!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- planning -----------------------------------------------------------------------------------
def _form(layer: nn.Module, config: LowRankConfig) -> str:
    return "linear" if isinstance(layer, nn.Linear) else CONV_FORMS[config.conv]


def _targets(model: nn.Module, config: LowRankConfig) -> tuple[list[ranks.Candidate], list[LayerReport]]:
    types = tuple(t for t, key in ((nn.Linear, "linear"), (nn.Conv2d, "conv2d")) if key in config.targets)
    live, skipped = [], []
    for name, layer, reason in common.candidates(model, types):
        op = "linear" if isinstance(layer, nn.Linear) else "conv2d"
        if not reason and isinstance(layer, nn.Conv2d) and layer.groups != 1:
            reason = f"grouped conv (groups={layer.groups})"
        if not reason and name_matches(name, config.ignore):
            reason = "ignored by the config"
        if reason:
            skipped.append(LayerReport(name, op, "skipped", params_before=layer.weight.numel(),
                                       reason=reason))
        else:
            live.append(ranks.Candidate(name, layer, _form(layer, config), 1))
    return live, skipped


def _round(rank: list[int], step: int) -> list[int]:
    return [-(-r // step) * step for r in rank]


def plan_ranks(model: nn.Module, cands: list[ranks.Candidate], config: LowRankConfig,
               batches: list[Inputs]) -> tuple[dict[str, list[int]], list[str]]:
    """The rank(s) of every candidate (before the size and speed checks), and notes."""
    notes: list[str] = []
    chosen: dict[str, list[int]] = {}
    rest = []
    for c in cands:
        fixed = override_for(c.name, config.overrides, config.rank)
        if fixed is not None:
            chosen[c.name] = [fixed] * len(lowrank.full_rank(c.layer, c.form))
        elif config.energy is not None:
            chosen[c.name] = [lowrank.energy_rank(s, config.energy)
                              for s in lowrank.spectrum(c.layer, c.form)]
        else:
            rest.append(c)
    if rest:
        if not batches:
            raise ConfigError("LowRankConfig.budget: the sensitivity search needs data",
                              hint="pass example_inputs or calibration")
        planned, info = ranks.budget_ranks(model, rest, batches, config.budget, config.budget_metric)
        chosen.update(planned)
        notes.append(f"budget {config.budget} of {info['metric']}: model {info['model_total']} -> "
                     f"planned {info['planned_total']} (target {info['target_total']}"
                     f"{'' if info['reached'] else ', NOT reached'})")
    return {k: lowrank.clamp_rank(c.layer, c.form, _round(chosen[c.name], config.round_to))
            for c in cands for k in [c.name] if k in chosen}, notes


# -- applying -----------------------------------------------------------------------------------
def _try_layer(c: ranks.Candidate, rank: list[int], rec: common.LayerInputs | None,
               config: LowRankConfig) -> tuple[LayerReport, nn.Module | None]:
    """Build the factorized layer and decide whether it pays; returns its report row and the
    new module (None when skipped)."""
    layer, form = c.layer, c.form
    op = "linear" if form == "linear" else "conv2d"
    bias = 0 if layer.bias is None else layer.bias.numel()
    row = LayerReport(c.name, op, form, list(rank), layer.weight.numel() + bias,
                      lowrank.weight_params(layer, form, rank) + bias,
                      c.cost(None, "macs"), c.cost(rank, "macs"),
                      energy=lowrank.kept_energy(layer, form, rank))
    if row.params_after >= row.params_before:
        even = f" (break-even rank {lowrank.break_even(layer, form):.1f})" if form != "tucker2" else ""
        return row.skip(f"does not pay: rank {rank} needs {row.params_after} >= "
                          f"{row.params_before} params{even}"), None
    new = lowrank.factorized(layer, form, rank)
    x = _speed_input(layer, rec, config.speed_batch)
    if rec is not None and rec.x:
        with torch.no_grad():
            xs = torch.cat(rec.x)
            row.fit_error = common.relative_error(new(xs), layer(xs))
    if config.check_speed:
        if x is None:
            return row.skip("not called on the example inputs, so its speed cannot be measured "
                              "(pass example_inputs, or check_speed=False)"), None
        row.speedup = common.speed_ratio(layer, new, x)
        if row.speedup < config.min_speedup:
            return row.skip(f"not faster: measured speedup {row.speedup:.2f}x < {config.min_speedup}x "
                              f"at batch {config.speed_batch}"), None
    return row, new


def _speed_input(layer: nn.Module, rec: common.LayerInputs | None, batch: int) -> torch.Tensor | None:
    x = common.speed_input(rec, batch) if rec is not None else None
    if x is None and isinstance(layer, nn.Linear):
        x = torch.randn(batch, layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
    return x


def factorize_with_report(model: nn.Module, config: LowRankConfig | None = None, *,
                          example_inputs: Any = None, calibration: Any = None) -> RedesignReport:
    """:func:`factorize`, returning the per-layer report (with the edited model as ``.model``)."""
    config = config or LowRankConfig()
    if not isinstance(config, LowRankConfig):
        raise ModelError(f"factorize needs a LowRankConfig, got {type(config).__name__}")
    cands, rows = _targets(model, config)
    batches = common.batches_for(example_inputs, calibration, config.calibration_batches)
    seen = common.capture_inputs(model, [c.name for c in cands], batches) if batches else {}
    for c in cands:
        rec = seen.get(c.name)
        # MACs per sample need the output size; a Linear without data counts one position.
        c.positions = rec.positions if rec and rec.positions else int(isinstance(c.layer, nn.Linear))
        if rec and rec.x and isinstance(c.layer, nn.Conv2d):
            c.in_positions = rec.x[0].shape[-1] * rec.x[0].shape[-2]
    chosen, notes = plan_ranks(model, cands, config, batches)
    edit: dict[str, dict[str, Any]] = {}
    for c in cands:
        row, new = _try_layer(c, chosen[c.name], seen.get(c.name), config) if c.name in chosen else (
            LayerReport(c.name, "linear" if c.form == "linear" else "conv2d", "skipped",
                        params_before=c.layer.weight.numel(), macs_before=c.cost(None, "macs")
                        ).skip("left whole by the budget search"), None)
        rows.append(row)
        if new is not None:
            set_submodule(model, c.name, new)
            edit[c.name] = {"form": c.form, "rank": row.rank, "shape": list(c.layer.weight.shape)}
    if edit:
        record_edit(model, {"kind": EDIT_KIND, "layers": edit})
    return RedesignReport.finish(model, "low-rank factorization", rows, config,
                                 [*config.ignore, *config.overrides], notes)


def factorize(model: nn.Module, config: LowRankConfig | None = None, *, example_inputs: Any = None,
              calibration: Any = None) -> nn.Module:
    """Factorize ``model``'s Linear/Conv2d layers **in place** and return it.

    ``example_inputs`` (one batch: tensor, tuple or dict) or ``calibration`` (batches, a loader,
    a DataBundle) tell each layer's input size (for MACs and timing) and feed the budget search.
    The edit is recorded in the model's spec, so :func:`deepshrink.load` rebuilds the factorized
    architecture. Use :func:`factorize_with_report` for the per-layer report (ranks, sizes, skips).
    """
    return factorize_with_report(model, config, example_inputs=example_inputs, calibration=calibration).model


# -- replay on load ------------------------------------------------------------------------------
_LAYER = Obj({"form": Str(choices=lowrank.FORMS), "rank": List(common.DIM, max_len=2, min_len=1),
              "shape": List(common.DIM, max_len=4, min_len=2)})


def _layer_fields(rec: Any, where: str) -> dict[str, Any]:
    rec = _LAYER(rec, where)
    ranks, dims = (2 if rec["form"] == "tucker2" else 1), (2 if rec["form"] == "linear" else 4)
    for field, n in (("rank", ranks), ("shape", dims)):
        if len(rec[field]) != n:
            raise FormatError(f"{where}.{field}: a {rec['form']} layer records {n} integers, "
                              f"got {rec[field]!r:.60}")
    return rec


#: Schema of a recorded ``lowrank`` edit (every field but ``kind``): plain JSON, checked.
edit_fields = common.layers_edit_schema(_layer_fields)


def _rebuild(model: nn.Module, name: str, rec: dict[str, Any], at: str) -> nn.Module:
    want = nn.Linear if rec["form"] == "linear" else nn.Conv2d
    layer = common.shaped_module_at(model, name, want, rec["shape"], at)
    full = lowrank.full_rank(layer, rec["form"])
    for i, (r, f) in enumerate(zip(rec["rank"], full, strict=True)):
        if r > f:
            raise FormatError(f"{at}.rank[{i}]: {r} exceeds the layer's full rank {f}")
    return lowrank.build(layer, rec["form"], rec["rank"])


@register_edit(EDIT_KIND, schema=edit_fields)
def replay(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Rebuild the factorized structure on load (weights come from the file)."""
    return common.replay_layers(model, edit, EDIT_KIND, edit_fields, _rebuild)
