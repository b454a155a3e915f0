"""The CLI's default thread count (issue 17): time LeNet-5 / LeNet-300 forward passes (batch 1
and 256) with 1, 2 (= physical cores here) and 2x the cores threads, interleaved (A,B,C,A,B,C...),
and report each thread count's median time relative to 1 thread, with its p10-p90 spread.

Run the timing alone: ``/work/bin/quiet .venv/bin/python bench/cli_threads.py`` (about a minute).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from _common import write_results
from deepshrink.cli.options import physical_cores
from deepshrink.models import create_model

ROUNDS = 7


def _time(model: torch.nn.Module, x: torch.Tensor, threads: int, reps: int) -> float:
    torch.set_num_threads(threads)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    cores = physical_cores()
    counts = sorted({1, cores, 2 * cores})
    rows = []
    for name in ("lenet5", "lenet300"):
        model = create_model(name).eval()
        for batch, reps in ((1, 100), (256, 4)):
            x = torch.rand(batch, 1, 28, 28)
            times: dict[int, list[float]] = {n: [] for n in counts}
            for _ in range(ROUNDS):
                for n in counts:
                    times[n].append(_time(model, x, n, reps))
            for n in counts:
                ratios = sorted(a / b for a, b in zip(times[1], times[n], strict=True))  # speedup vs 1
                rows.append({"model": name, "batch": batch, "threads": n,
                             "median_ms": statistics.median(times[n]),
                             "speedup_vs_1": statistics.median(ratios),
                             "p10": ratios[len(ratios) // 10], "p90": ratios[-1 - len(ratios) // 10]})
                print(rows[-1])
    write_results("cli_threads", {"physical_cores": cores, "cpu_count": os.cpu_count(),
                                  "load_before": os.getloadavg(), "rows": rows,
                                  "command": "/work/bin/quiet .venv/bin/python bench/cli_threads.py"})


if __name__ == "__main__":
    main()
