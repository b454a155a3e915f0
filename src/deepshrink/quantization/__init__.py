"""Quantization: PTQ (weight-only any bits, dynamic and static int8, mixed precision), QAT
(STE, optional LSQ), packed storage, and ONNX export for real integer execution in ONNX Runtime.

    from deepshrink.quantization import PTQConfig, quantize, export_onnx, OrtModel
    q = quantize(model, PTQConfig(), calibration=data)   # in place, returns the model
    res = quantize_with_report(model, PTQConfig(target_cosine=0.999), calibration=data)
    res.kept_float, res.per_token, res.smoothed           # what it did
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
from deepshrink.quantization.equalize import EqualizeResult, equalize
from deepshrink.quantization.fold import FoldResult, fold_batchnorm
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
from deepshrink.quantization.ptq import (
    PTQConfig,
    PTQResult,
    quantize,
    quantize_with_report,
    quantized_layers,
    weight_bytes,
)
from deepshrink.quantization.qat import QATConfig, convert, prepare_qat
from deepshrink.quantization.speed import ModelSpeed, SpeedPlan, compare_onnx_speed, measure_conv_speed

__all__ = [
    "ActFakeQuant",
    "EqualizeResult",
    "FakeQuantLayer",
    "FoldResult",
    "MSEObserver",
    "MinMaxObserver",
    "ModelSpeed",
    "MovingAverageObserver",
    "OrtModel",
    "PTQConfig",
    "PTQResult",
    "PercentileObserver",
    "QATConfig",
    "QTensor",
    "QuantSpec",
    "QuantizedLayer",
    "SpeedPlan",
    "WeightFakeQuant",
    "compare_onnx_speed",
    "convert",
    "dequantize_affine",
    "equalize",
    "export_onnx",
    "fold_batchnorm",
    "measure_conv_speed",
    "prepare_qat",
    "qparams",
    "qrange",
    "quantize",
    "quantize_affine",
    "quantize_tensor",
    "quantize_with_report",
    "quantized_layers",
    "weight_bytes",
    "weight_range",
]
