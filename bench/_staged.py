"""Two-phase benches: build and measure fidelity in one process (CPU-heavy: calibration,
training, export), time the exported ONNX files in another (short, run alone on a quiet machine).

``prepare`` phase: a case writes its ONNX files and its timing inputs under ``bench/.stage/``
and a manifest entry (:func:`stage`). ``time`` phase: :func:`time_staged` loads the files,
times them in one interleaved run (compare_latency), and writes the medians and speedups into
the section of the results JSON the case names. The machine load (``os.getloadavg``) before and
after the timing is recorded next to the numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from deepshrink.measure import compare_latency
from deepshrink.quantization import OrtModel

STAGE = Path(__file__).resolve().parent / ".stage"  # git-ignored


def case_dir(section: str, case: str, fresh: bool = True) -> Path:
    d = STAGE / section / case
    if fresh and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


def stage(section: str, case: str, *, files: dict[str, Path], batches: dict[str, Any], base: str,
          where: list[str], speedup_key: str = "speedup", repeats: int = 15, rounds: int = 3,
          extra: dict[str, Any] | None = None) -> None:
    """Record one case for the timing phase. ``files`` must lie in :func:`case_dir`; ``batches``
    maps a label ("b1", "b8xs128") to the input (tensor or dict of tensors); ``where`` is the
    key path of the ``variants`` dict in the results JSON; ``base`` the variant speedups are
    relative to."""
    d = case_dir(section, case, fresh=False)
    for label, x in batches.items():
        torch.save(x, d / f"input-{label}.pt")
    manifest = {"files": {k: p.name for k, p in files.items()}, "batches": list(batches), "base": base,
                "where": where, "speedup_key": speedup_key, "repeats": repeats, "rounds": rounds,
                "extra": extra or {}, "staged": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))


def staged_cases(section: str) -> list[tuple[str, dict[str, Any]]]:
    root = STAGE / section
    if not root.is_dir():
        return []
    return [(d.name, json.loads((d / "manifest.json").read_text()))
            for d in sorted(root.iterdir()) if (d / "manifest.json").is_file()]


def _load(p: Path) -> Any:
    return torch.load(p, weights_only=True)


def time_case(section: str, case: str, m: dict[str, Any], threads: int, quick: bool) -> dict[str, Any]:
    """{variant: {ms@<batch>, <speedup_key>@<batch>}} plus the load around the run."""
    d = STAGE / section / case
    runners = {k: OrtModel(d / f, threads=threads) for k, f in m["files"].items()}
    out: dict[str, Any] = {k: {} for k in runners}
    load_before = os.getloadavg()
    for label in m["batches"]:
        x = _load(d / f"input-{label}.pt")
        if isinstance(x, dict):  # named inputs: compare_latency passes one tensor along
            calls = {k: (lambda _x, r=r, x=x: r(x)) for k, r in runners.items()}
            lats = compare_latency(calls, next(iter(x.values())), rounds=m["rounds"],
                                   repeats=max(3, m["repeats"] // (3 if quick else 1)), warmup=2,
                                   min_time_s=0.05)
        else:
            lats = compare_latency(runners, x, rounds=m["rounds"],
                                   repeats=max(3, m["repeats"] // (3 if quick else 1)), warmup=2,
                                   min_time_s=0.05)
        base = lats[m["base"]].median_ms
        for k, lat in lats.items():
            out[k][f"ms@{label}"] = round(lat.median_ms, 3)
            out[k][f"{m['speedup_key']}@{label}"] = round(base / lat.median_ms, 3)
            out[k][f"ms_p10_p90@{label}"] = [round(lat.p10_ms, 3), round(lat.p90_ms, 3)]
        print(f"  {section}/{case} {label}: " + "  ".join(
            f"{k} {out[k][f'ms@{label}']} ms ({out[k][m['speedup_key'] + '@' + label]}x)" for k in out),
            flush=True)
    return {"variants": out, "load_avg_1_5_15": {"before": [round(v, 2) for v in load_before],
                                                  "after": [round(v, 2) for v in os.getloadavg()]},
            "timed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": threads}


def merge_timing(results: dict[str, Any], m: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """Write one case's timing into ``results`` at ``m["where"]``; return that case's dict
    (the parent of ``variants``)."""
    node = results
    for key in m["where"][:-1]:
        node = node.setdefault(key, {})
    variants = node.setdefault(m["where"][-1], {})
    for k, cells in timing["variants"].items():
        variants.setdefault(k, {}).update(cells)
    node["latency_run"] = {k: v for k, v in timing.items() if k != "variants"}
    return node
