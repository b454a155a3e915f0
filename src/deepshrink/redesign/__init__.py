"""Architecture redesign: rewrite layers into cheaper structures, then recover accuracy.

Two transforms, one contract each (in place; the model is returned; ``*_report`` variants return
a :class:`RedesignReport` with one row per candidate layer, rewritten or skipped with the reason)::

    factorize(model, LowRankConfig(energy=0.9), example_inputs=x)        # low-rank Linear / Conv2d
    separate(model, SeparableConfig(), calibration=data)                 # depthwise-separable convs
    recover(model, data, TrainConfig(epochs=2), teacher=original)        # fine-tune, KD switch

The new layers are plain ``nn.Linear`` / ``nn.Conv2d`` (and ``BatchNorm2d``/``ReLU``) inside
``nn.Sequential`` containers, so pruning, quantization, weight sharing, .dsz, ONNX export and MAC
counting treat them as any other layer. Both edits are recorded in the model's spec (kinds
``lowrank`` and ``separable``) and replayed by :func:`deepshrink.load`.
"""

from deepshrink.redesign.factorize import LowRankConfig, factorize, factorize_with_report
from deepshrink.redesign.recover import recover
from deepshrink.redesign.report import LayerReport, RedesignReport
from deepshrink.redesign.rewrites import rewritten_layers
from deepshrink.redesign.separate import SeparableConfig, separate, separate_with_report

__all__ = ["LayerReport", "LowRankConfig", "RedesignReport", "SeparableConfig", "factorize",
           "factorize_with_report", "recover", "rewritten_layers", "separate", "separate_with_report"]
