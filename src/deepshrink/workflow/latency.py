"""Latency of several models in one interleaved run: A, B, C, A, B, C, ... so that load from
other processes on a shared machine hits every model alike. Raw samples are kept (the report
draws their distribution); ratios are medians of the per-round ratios, with their spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _block(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, calls: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(calls):
            fn(x)
    return (time.perf_counter() - t0) * 1e3 / calls


def interleaved_latency(runners: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, *,
                        rounds: int = 30, warmup: int = 3, min_block_ms: float = 2.0
                        ) -> dict[str, list[float]]:
    """Milliseconds per call for each runner, ``rounds`` samples each, interleaved round by round.

    A sample is the mean of a block of calls long enough (``min_block_ms``) that the timer's
    resolution does not dominate tiny models; every runner uses the same block length.
    """
    for fn in runners.values():
        if isinstance(fn, torch.nn.Module):
            fn.eval()
        for _ in range(warmup):
            _block(fn, x, 1)
    fastest = min(_block(fn, x, 1) for fn in runners.values())
    calls = max(1, min(200, int(min_block_ms / max(fastest, 1e-3))))
    samples: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners.items())
    for r in range(rounds):
        # Alternate the direction every round: on a loaded machine the first block of a round
        # is systematically slower (the process was just rescheduled), which would favour
        # whichever model always runs second.
        for name, fn in order if r % 2 == 0 else order[::-1]:
            samples[name].append(_block(fn, x, calls))
    return samples


def latency_summary(samples: dict[str, list[float]], reference: str) -> dict[str, dict[str, Any]]:
    """Median, p10/p90 and the speedup over ``reference`` (median of per-round ratios, p10/p90)."""
    ref = samples[reference]
    out = {}
    for name, s in samples.items():
        ratios = sorted(r / t for r, t in zip(ref, s, strict=True) if t > 0)
        qs = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
        rq = statistics.quantiles(ratios, n=10) if len(ratios) >= 2 else [ratios[0]] * 9
        out[name] = {"median_ms": statistics.median(s), "p10_ms": qs[0], "p90_ms": qs[-1],
                     "speedup": statistics.median(ratios), "speedup_p10": rq[0], "speedup_p90": rq[-1],
                     "samples": len(s), "threads": torch.get_num_threads()}
    return out
