"""Measurement: the single source of every number deepshrink reports."""

from deepshrink.measure.counts import LayerStats, count_macs, count_params, layer_stats
from deepshrink.measure.latency import Latency, compare_latency, measure_latency
from deepshrink.measure.report import ModelReport, ResultTable, measure_model
from deepshrink.measure.size import file_bytes, fp32_safetensors_bytes

__all__ = [
    "Latency",
    "LayerStats",
    "ModelReport",
    "ResultTable",
    "compare_latency",
    "count_macs",
    "count_params",
    "file_bytes",
    "fp32_safetensors_bytes",
    "layer_stats",
    "measure_latency",
    "measure_model",
]
