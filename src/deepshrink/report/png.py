"""The Pareto plot as a PNG for READMEs (matplotlib, the ``plot`` extra; skipped without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepshrink.fileio import atomic_path
from deepshrink.workflow.pareto import pareto_front


def _points(results: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if results.get("kind") == "search":
        trials = [t for t in results["trials"] if t.get("status") == "done"]
        return [t for t in trials if t.get("final")] or trials, results["original"]
    return results["stages"][1:], results["stages"][0]


def pareto_png(results: dict[str, Any], path: str | Path) -> Path | None:
    """Validation accuracy vs bytes on disk with the front and the original; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts, orig = _points(results)
    front = pareto_front([*pts, orig], "bytes", "val_top1")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.scatter([p["bytes"] for p in pts], [100 * p["val_top1"] for p in pts], s=14, alpha=0.6,
               label="candidates")
    ax.plot([p["bytes"] for p in front], [100 * p["val_top1"] for p in front], "-o", color="C1", ms=4,
            label="Pareto front")
    ax.scatter([orig["bytes"]], [100 * orig["val_top1"]], marker="s", color="C3", s=40, label="original")
    for c in results.get("selected", [])[:1]:
        ax.scatter([c["bytes"]], [100 * c["val_top1"]], marker="*", color="C2", s=120, label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (log)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
