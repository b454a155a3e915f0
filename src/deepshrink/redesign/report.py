"""What a redesign did, layer by layer: a result dataclass (never an attribute on the model)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from deepshrink.config import unmatched_patterns
from deepshrink.measure import ResultTable


@dataclasses.dataclass
class LayerReport:
    """One candidate layer: rewritten (``action`` = the new form) or ``skipped`` with a reason.

    ``rank`` is the kept rank (Linear / conv SVD: one number; Tucker-2: input and output ranks;
    separable: the depth multiplier). ``params``/``macs`` are the layer's before -> after counts
    (MACs per sample, from the layer's input size in the example inputs; 0 when unknown).
    ``fit_error`` is the relative output error ||y' - y|| / ||y|| of the rewritten layer on the
    calibration inputs (weights only, before any fine-tuning); ``speedup`` the measured
    original/new latency ratio of the layer alone (None when not measured).
    """

    name: str
    op: str
    action: str
    rank: list[int] = dataclasses.field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    energy: float | None = None
    fit_error: float | None = None
    speedup: float | None = None
    reason: str = ""

    @property
    def rewritten(self) -> bool:
        return self.action != "skipped"

    def skip(self, reason: str) -> LayerReport:
        """Mark the layer as left whole (its after-counts become its before-counts); returns self."""
        self.action, self.reason = "skipped", reason
        self.params_after, self.macs_after = self.params_before, self.macs_before
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RedesignReport:
    """The result of :func:`~deepshrink.redesign.factorize_with_report` /
    :func:`~deepshrink.redesign.separate_with_report`: the (edited) model and one row per candidate."""

    model: nn.Module
    transform: str
    layers: list[LayerReport]
    config: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def rewritten(self) -> list[LayerReport]:
        return [r for r in self.layers if r.rewritten]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if not r.rewritten]

    def totals(self) -> dict[str, int]:
        """Params and MACs of the rewritten layers, before and after."""
        rows = self.rewritten
        return {k: sum(getattr(r, k) for r in rows)
                for k in ("params_before", "params_after", "macs_before", "macs_after")}

    def to_dict(self) -> dict[str, Any]:
        return {"transform": self.transform, "config": self.config, "notes": self.notes,
                "totals": self.totals(), "layers": [r.to_dict() for r in self.layers]}

    @classmethod
    def finish(cls, model: nn.Module, transform: str, rows: list[LayerReport], config: Any,
               patterns: list[str], notes: list[str]) -> RedesignReport:
        """The report of a finished rewrite: rows in module order, and a note naming any of the
        config's ``patterns`` that matched no layer."""
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        typos = unmatched_patterns(order, patterns)
        if typos:
            notes.append(f"patterns matching no layer (typo?): {typos}")
        rows.sort(key=lambda r: order.get(r.name, len(order)))
        return cls(model, transform, rows, config.to_dict(), notes)

    def table(self) -> ResultTable:
        t = ResultTable(f"{self.transform}: {len(self.rewritten)} layer(s) rewritten, "
                        f"{len(self.skipped)} skipped")
        for r in self.layers:
            t.add(layer=r.name, op=r.op, action=r.action, rank="x".join(map(str, r.rank)) or "-",
                  params=f"{r.params_before}->{r.params_after}" if r.rewritten else r.params_before,
                  MACs=f"{r.macs_before}->{r.macs_after}" if r.rewritten else r.macs_before,
                  fit_err=r.fit_error, speedup=r.speedup, reason=r.reason)
        return t
