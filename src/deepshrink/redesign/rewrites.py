"""Which layers a model's recorded redesign edits rewrote, and to what (for ``deepshrink info``)."""

from __future__ import annotations

from typing import Any

from deepshrink.models import ModelSpec


def rewritten_layers(spec: ModelSpec | dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per layer rewritten by a ``lowrank`` or ``separable`` edit in ``spec``:
    ``{"layer", "edit", "form", "rank" | "multiplier", "shape"}``, in edit order."""
    if spec is None:
        return []
    edits = spec.edits if isinstance(spec, ModelSpec) else spec.get("edits", [])
    rows = []
    for edit in edits if isinstance(edits, list) else []:
        if not isinstance(edit, dict) or edit.get("kind") not in ("lowrank", "separable"):
            continue
        for name, rec in (edit.get("layers") or {}).items():
            if edit["kind"] == "lowrank":
                rows.append({"layer": name, "edit": "lowrank", "form": rec.get("form"),
                             "rank": rec.get("rank"), "shape": rec.get("shape")})
            else:
                rows.append({"layer": name, "edit": "separable",
                             "form": f"depthwise+pointwise ({rec.get('between')})",
                             "multiplier": rec.get("multiplier"), "shape": rec.get("shape")})
    return rows
