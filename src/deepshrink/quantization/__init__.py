"""Quantization: PTQ (weight-only any bits, dynamic and static int8, mixed precision), QAT
(STE, optional LSQ), packed storage, and ONNX export for real integer execution in ONNX Runtime.

    from deepshrink.quantization import PTQConfig, quantize, export_onnx, OrtModel
    q = quantize(model, PTQConfig(mode="static", bits=8), calibration=data)   # in place, returns the model
    export_onnx(q, "model-int8.onnx", example)
    evaluate(OrtModel("model-int8.onnx"), loader)
"""

from deepshrink.quantization.core import (
    QTensor,
    QuantSpec,
    dequantize_affine,
    qparams,
    qrange,
    quantize_affine,
    quantize_tensor,
)
from deepshrink.quantization.modules import (
    ActFakeQuant,
    FakeQuantLayer,
    QuantizedLayer,
    WeightFakeQuant,
)
from deepshrink.quantization.observers import (
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    weight_range,
)
from deepshrink.quantization.onnx_export import export_onnx
from deepshrink.quantization.ort import OrtModel
from deepshrink.quantization.ptq import PTQConfig, quantize, quantized_layers, weight_bytes
from deepshrink.quantization.qat import QATConfig, convert, prepare_qat

__all__ = [
    "ActFakeQuant",
    "FakeQuantLayer",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "OrtModel",
    "PTQConfig",
    "PercentileObserver",
    "QATConfig",
    "QTensor",
    "QuantSpec",
    "QuantizedLayer",
    "WeightFakeQuant",
    "convert",
    "dequantize_affine",
    "export_onnx",
    "prepare_qat",
    "qparams",
    "qrange",
    "quantize",
    "quantize_affine",
    "quantize_tensor",
    "quantized_layers",
    "weight_bytes",
    "weight_range",
]
