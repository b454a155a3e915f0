"""Fidelity fallback: keep the most sensitive layers in float until the output meets a target.

Fidelity is the mean, over calibration samples, of the cosine similarity between the quantized
and the float model's output (each sample's output flattened). Sensitivity of a layer is the
fidelity gained by putting that one layer back in float; layers go back greedily, most
sensitive first, re-measuring after each, until the target is met (or nothing is left).
Measured on the calibration batches, never on evaluation data.
"""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.modeling import Inputs, call, eval_mode, output_tensor, set_submodule


@torch.no_grad()
def output_cosine(model: nn.Module, batches: list[Inputs], refs: list[torch.Tensor]) -> float:
    """Mean per-sample cosine of ``model``'s output against ``refs`` (one tensor per batch)."""
    sims = []
    with eval_mode(model):
        for x, r in zip(batches, refs, strict=True):
            out = output_tensor(call(model, x)).float()
            sims.append(nn.functional.cosine_similarity(out.reshape(len(out), -1),
                                                        r.reshape(len(r), -1), dim=1))
    return float(torch.cat(sims).mean())


def keep_float_until(model: nn.Module, floats: dict[str, nn.Module], batches: list[Inputs],
                     refs: list[torch.Tensor], target: float) -> tuple[list[str], float, float]:
    """Put layers of ``floats`` (name -> the float module) back into ``model`` until
    :func:`output_cosine` reaches ``target``. Returns (names kept float, cosine before, after)."""
    before = output_cosine(model, batches, refs)
    if before >= target:
        return [], before, before
    gains: dict[str, float] = {}
    for name, layer in floats.items():
        q = set_submodule(model, name, layer)
        gains[name] = output_cosine(model, batches, refs) - before
        set_submodule(model, name, q)
    kept: list[str] = []
    now = before
    for name in sorted(gains, key=lambda n: -gains[n]):
        set_submodule(model, name, floats[name])
        kept.append(name)
        now = output_cosine(model, batches, refs)
        if now >= target:
            break
    return kept, before, now
