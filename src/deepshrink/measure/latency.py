"""Latency: warm-up, repeated timing, median and spread, with the thread count recorded."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from deepshrink.modeling import Inputs, as_inputs, batch_size, call


@dataclasses.dataclass
class Latency:
    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    stdev_ms: float
    repeats: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _timed_runs(fn: Callable[[], Any], warmup: int, repeats: int, min_time_s: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time_s and len(times) < 10 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_latency(model: torch.nn.Module | Callable[..., Any], example: Inputs,
                    *, warmup: int = 5, repeats: int = 30, min_time_s: float = 0.2) -> Latency:
    """Time ``model(example)`` under inference mode. Works for nn.Modules and any callable
    (an ONNX Runtime session wrapper, say), so compressed and baseline models are timed alike.
    ``example`` is a tensor, a tuple of positional tensors or a dict of keyword tensors."""
    example = as_inputs(example, "example")
    if isinstance(model, torch.nn.Module):
        model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return call(model, example)

    times = _timed_runs(run, warmup, repeats, min_time_s)
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Latency(batch=batch_size(example), median_ms=statistics.median(times),
                   p10_ms=qs[0], p90_ms=qs[-1], mean_ms=statistics.fmean(times),
                   stdev_ms=statistics.pstdev(times), repeats=len(times),
                   threads=torch.get_num_threads())


def compare_latency(models: dict[str, Any], example: Inputs, rounds: int = 3,
                    **kw: Any) -> dict[str, Latency]:
    """Time several models in one run, interleaved round by round so that drift in machine load
    hits all of them alike; each model's result is the round with the lowest median."""
    best: dict[str, Latency] = {}
    for _ in range(rounds):
        for name, m in models.items():
            lat = measure_latency(m, example, **kw)
            if name not in best or lat.median_ms < best[name].median_ms:
                best[name] = lat
    return best


@dataclasses.dataclass
class Speedup:
    """``baseline / candidate`` latency: the ratio of medians and a spread from the p10/p90 of
    both runs (worst case to best case). ``overlaps_one`` says the spread includes 1.0, i.e. the
    measurement cannot tell the two apart on this machine."""

    ratio: float
    low: float
    high: float

    @property
    def overlaps_one(self) -> bool:
        return self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        flag = " (spread overlaps 1.0: not measurably different)" if self.overlaps_one else ""
        return f"{self.ratio:.2f}x [{self.low:.2f}-{self.high:.2f}]{flag}"

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "overlaps_one": self.overlaps_one}


def speedup(baseline: Latency, candidate: Latency) -> Speedup:
    """How much faster ``candidate`` is than ``baseline``, with its spread (see :class:`Speedup`)."""
    return Speedup(baseline.median_ms / candidate.median_ms, baseline.p10_ms / candidate.p90_ms,
                   baseline.p90_ms / candidate.p10_ms)
