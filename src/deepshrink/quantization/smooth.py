"""Outlier-aware int8 helpers: SmoothQuant migration, input statistics, bias correction.

Trained transformers have a few input *channels* with activations 10-100x the rest (after
LayerNorm and GELU). One int8 scale per token (or per tensor) spends its whole grid on them and
rounds every other channel coarsely. SmoothQuant (Xiao et al. 2023) divides input channel j by
``s_j = max|X_j|^α / max|W_:,j|^(1-α)`` and multiplies weight column j by ``s_j``: the float
product ``X W^T`` is unchanged, and the outliers move into weights, which are quantized per
output channel and absorb them easily.

The division is folded into whatever produced the input when that is exact:

* a LayerNorm / RMSNorm whose output feeds only these layers (pre-LN models: GPT-2, Llama):
  its ``weight`` (and ``bias``) are divided by s — free at run time;
* the Linear that ran last before the layer and has one output channel per input channel,
  when the layer's input is a channel-wise linear function of it (attention: the value
  projection's output rows scale the attention output projection's input channels) — free;
* otherwise (post-LN BERT, where the LayerNorm output is also the residual) the layer keeps
  ``1/s`` as an input multiplier (one ``Mul`` before quantization in the exported graph).

Whether a fold is exact is *measured*, not assumed: the model is run on a calibration batch
before and after folding, and a fold that changes the output by more than 1e-5 (relative) is
undone. So smoothing is an identity in float by construction (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepshrink.modeling import Inputs, call, eval_mode, output_tensor
from deepshrink.quantization.modules import float_weight, is_hf_conv1d

SAMPLE_ROWS = 1024  # input rows (tokens) kept per layer to measure activation quantization error
NORMS = ("LayerNorm", "RMSNorm", "LlamaRMSNorm", "T5LayerNorm", "MistralRMSNorm", "Qwen2RMSNorm")


class InputStats:
    """Per input channel max|x| and mean x of one layer's inputs over calibration batches."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0
        self.source: int | None = None  # id of the tensor object the layer received (last batch)
        self.sample: torch.Tensor | None = None  # up to SAMPLE_ROWS input rows (tokens)
        self.order: int | None = None  # call position among the observed layers (last batch)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        amax, total = flat.abs().amax(0), flat.sum(0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.total = total if self.total is None else self.total + total
        self.count += flat.shape[0]
        have = 0 if self.sample is None else self.sample.shape[0]
        if have < SAMPLE_ROWS:
            rows = flat[: SAMPLE_ROWS - have].clone()
            self.sample = rows if self.sample is None else torch.cat([self.sample, rows])

    def scale_by(self, f: torch.Tensor) -> None:
        """The statistics of ``x * f`` (``f`` > 0 per channel), e.g. after a fold divided x by s."""
        assert self.amax is not None and self.total is not None
        self.amax, self.total = self.amax * f, self.total * f
        if self.sample is not None:
            self.sample = self.sample * f

    @property
    def mean(self) -> torch.Tensor:
        assert self.total is not None
        return self.total / max(1, self.count)


@torch.no_grad()
def collect_stats(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Inputs],
                  norms: bool = False) -> tuple[dict[str, InputStats], dict[int, str]]:
    """Input statistics of each (linear) layer, and ``{id(output tensor): norm module name}``
    of the last batch, from which :func:`fold_groups` learns which norm feeds which layers.
    Every tensor whose id is recorded is kept alive until the end, so ids cannot be reused."""
    stats = {n: InputStats() for n, _ in layers}
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []
    last = [False]
    calls = [0]
    hooks = []
    for name, layer in layers:
        def pre(m: nn.Module, args: tuple, st: InputStats = stats[name]) -> None:
            st.update(args[0])
            if last[0]:
                st.source = id(args[0])
                st.order = calls[0]
                calls[0] += 1
                alive.append(args[0])
        hooks.append(layer.register_forward_pre_hook(pre))
    if norms:
        for name, m in model.named_modules():
            if type(m).__name__ in NORMS or isinstance(m, nn.LayerNorm):
                def post(mod: nn.Module, a: tuple, y: Any, n: str = name) -> None:
                    if last[0] and isinstance(y, torch.Tensor):
                        produced[id(y)] = n
                        alive.append(y)
                hooks.append(m.register_forward_hook(post))
    try:
        with eval_mode(model):
            for i, x in enumerate(batches):
                last[0] = i == len(batches) - 1
                call(model, x)
    finally:
        for h in hooks:
            h.remove()
    return stats, produced


def smooth_factors(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_:,j|^(1-α)`` over the weights that share the
    input (clamped to [1e-2, 1e2]; 1 where a channel never fired or its weights are zero)."""
    w_amax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    a = act_amax.clamp_min(1e-5)
    s = a.pow(alpha) / w_amax.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where((act_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(1e-2, 1e2)


def fold_groups(layers: dict[str, nn.Module], stats: dict[str, InputStats], produced: dict[int, str]
                ) -> dict[str, list[str]]:
    """{norm name: [layer names]} for the layers whose input is exactly a norm's output."""
    groups: dict[str, list[str]] = {}
    for name in layers:
        src = stats[name].source
        if src is not None and src in produced:
            groups.setdefault(produced[src], []).append(name)
    return groups


@torch.no_grad()
def try_fold(model: nn.Module, norm: nn.Module, consumers: list[nn.Module], s: torch.Tensor,
             check: Callable[[], bool]) -> bool:
    """Divide ``norm``'s affine parameters by ``s`` and multiply each consumer's weight columns
    by ``s``; keep the change only if ``check()`` (the model output is unchanged) holds."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != s.shape:
        return False
    b = getattr(norm, "bias", None)
    return _rescale_or_undo([(w, s)] + ([] if b is None else [(b, s)]), consumers, s, check)


@torch.no_grad()
def _rescale_or_undo(divide: list[tuple[torch.Tensor, torch.Tensor]], consumers: list[nn.Module],
                     s: torch.Tensor, check: Callable[[], bool]) -> bool:
    """Divide each ``(parameter, scale)`` of the producer, multiply each consumer's weight columns
    by ``s``; keep the change only if ``check()`` holds, else restore every tensor."""
    params = [p for p, _ in divide] + [c.weight for c in consumers]
    saved = [p.data.clone() for p in params]
    for p, scale in divide:
        p.data.div_(scale.to(p.dtype))
    for c in consumers:
        scale = s[:, None] if is_hf_conv1d(c) else s[None, :]  # Conv1D stores (in, out)
        c.weight.data.mul_(scale.to(c.weight.dtype))
    if check():
        return True
    for p, v in zip(params, saved, strict=True):
        p.data.copy_(v)
    return False


def same_output(model: nn.Module, x: Inputs, ref: torch.Tensor, rtol: float = 1e-5) -> bool:
    """The model's output on ``x`` equals ``ref`` up to ``rtol`` relative to its magnitude."""
    with eval_mode(model), torch.no_grad():
        out = output_tensor(call(model, x)).float()
    return bool((out - ref).abs().max() <= rtol * ref.abs().max().clamp_min(1e-12))


def bias_correction(layer: nn.Module, dense_weight: torch.Tensor, mean_in: torch.Tensor,
                    smooth: torch.Tensor) -> torch.Tensor:
    """The bias that cancels the expected output shift of quantized weights on inputs with
    mean ``mean_in`` (Nagel et al. 2019): ``b - (W_q - W) E[x]``. ``dense_weight`` (the
    dequantized weight, (out, in)) and ``mean_in`` are in the space of the smoothed inputs;
    the layer's float weight is multiplied by ``smooth`` to get there."""
    w = float_weight(layer) * smooth[None, :]
    b = layer.bias.detach().float() if getattr(layer, "bias", None) is not None else torch.zeros(w.shape[0])
    return b - (dense_weight - w) @ mean_in


def shared_inputs(names: list[str], stats: dict[str, InputStats]) -> list[list[str]]:
    """Groups of layers that received the very same input tensor (e.g. query, key, value)."""
    groups: dict[int | str, list[str]] = {}
    for n in names:
        src = stats[n].source
        groups.setdefault(src if src is not None else n, []).append(n)
    return list(groups.values())


@torch.no_grad()
def act_errors(weight: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Relative output error of a linear layer (float weight, (out, in)) on inputs ``x`` when
    they are quantized per tensor (uint8, dynamic) vs per token (int8): the measurement behind
    ``act_granularity="auto"``. Both in the smoothed space when the layer is smoothed."""
    from deepshrink.quantization.modules import dynamic_fake_quant, token_fake_quant

    y = x @ weight.t()
    norm = y.norm().clamp_min(1e-12)
    return (float((dynamic_fake_quant(x) @ weight.t() - y).norm() / norm),
            float((token_fake_quant(x) @ weight.t() - y).norm() / norm))


def migrate(model: nn.Module, linears: list[tuple[str, nn.Module]], batches: list[Inputs],
            alpha: float | None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, InputStats]]:
    """SmoothQuant migration of strength ``alpha`` for ``linears`` (None: statistics only).

    Folds the division into a norm wherever that leaves the model output unchanged (measured;
    the model is edited in place and stays exactly equivalent in float); the other layers get
    factors ``s`` (shared by layers fed the same tensor) that the caller applies inside the
    quantized layer. Returns (factors per layer, where each layer's division went, the input
    statistics in the smoothed space of folded layers)."""
    stats, produced = collect_stats(model, linears, batches, norms=alpha is not None)
    if alpha is None:
        return {}, {}, stats
    by_name = dict(linears)
    smooth: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    with eval_mode(model), torch.no_grad():
        ref = output_tensor(call(model, batches[0])).float()
    for norm_name, names in fold_groups(by_name, stats, produced).items():
        s = smooth_factors(_group_amax(stats, names), [float_weight(by_name[n]) for n in names], alpha)
        if try_fold(model, model.get_submodule(norm_name), [by_name[n] for n in names], s,
                    lambda: same_output(model, batches[0], ref)):
            for n in names:
                where[n] = f"folded into {norm_name}"
                stats[n].scale_by(1 / s)
    rest = [n for n, _ in linears if n not in where and stats[n].amax is not None]
    for group in shared_inputs(rest, stats):  # one factor per shared input: one Mul in the graph
        s = smooth_factors(_group_amax(stats, group), [float_weight(by_name[n]) for n in group], alpha)
        producer = _producer_candidate(group, by_name, stats, s.numel())
        if producer is not None and try_fold_linear(
                by_name[producer], [by_name[n] for n in group], s,
                lambda: same_output(model, batches[0], ref)):
            for n in group:
                where[n] = f"folded into {producer}"
                stats[n].scale_by(1 / s)
            continue
        for n in group:
            smooth[n] = s
            where[n] = "in layer"
    return smooth, where, stats


def _producer_candidate(group: list[str], by_name: dict[str, nn.Module], stats: dict[str, InputStats],
                        channels: int) -> str | None:
    """The linear that ran last before ``group`` with ``channels`` outputs (the one whose output
    rows might scale the group's input channels; :func:`try_fold_linear` checks it)."""
    first = min((stats[n].order for n in group if stats[n].order is not None), default=None)
    if first is None:
        return None
    before = [(stats[n].order, n) for n, m in by_name.items()
              if n not in group and stats[n].order is not None and stats[n].order < first
              and float_weight(m).shape[0] == channels]
    return max(before)[1] if before else None


@torch.no_grad()
def try_fold_linear(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor,
                    check: Callable[[], bool]) -> bool:
    """Divide ``producer``'s output channels (weight rows and bias) by ``s`` and multiply each
    consumer's weight columns by ``s``; keep the change only if ``check()`` holds."""
    w, b = producer.weight, getattr(producer, "bias", None)
    rows = s[None, :] if is_hf_conv1d(producer) else s[:, None]  # Conv1D stores (in, out)
    return _rescale_or_undo([(w, rows)] + ([] if b is None else [(b, s)]), consumers, s, check)


def _group_amax(stats: dict[str, InputStats], names: list[str]) -> torch.Tensor:
    return torch.stack([stats[n].amax for n in names if stats[n].amax is not None]).amax(0)
