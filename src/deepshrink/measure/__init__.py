"""Measurement: the single source of every number deepshrink reports."""

from deepshrink.measure.counts import LayerStats, count_macs, count_params, layer_stats
from deepshrink.measure.latency import Latency, Speedup, compare_latency, measure_latency, speedup
from deepshrink.measure.report import ModelReport, ResultTable, measure_model
from deepshrink.measure.size import file_bytes, fp32_safetensors_bytes, size_change

__all__ = [
    "Latency",
    "LayerStats",
    "ModelReport",
    "ResultTable",
    "Speedup",
    "compare_latency",
    "count_macs",
    "count_params",
    "file_bytes",
    "fp32_safetensors_bytes",
    "layer_stats",
    "measure_latency",
    "measure_model",
    "size_change",
    "speedup",
]
