"""Helpers shared by the bench scripts: result files and machine facts."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json (atomically) with the machine facts attached."""
    from deepshrink.fileio import atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path
