"""Post-training quantization: ``quantize(model, PTQConfig(...), calibration=batches)``.

Modes:

* ``weight-only``: weights to ``bits`` (1-8) with packed storage; activations stay float.
* ``dynamic``: int8 weights; activations quantized per tensor at run time (uint8 over the
  batch's own range) — no calibration.
* ``static``: int8 weights and activations; input (and conv output) ranges calibrated on
  ``calibration`` with the chosen observer.

Mixed precision: with ``target_bits`` set, a sensitivity pass picks per-layer weight bits from
``candidate_bits`` so that the parameter-weighted average meets the target (see :mod:`mixed`).
The quantized model records a ``{"kind": "quantize"}`` edit in its spec, so ``deepshrink.save``
writes a rebuildable file and ``deepshrink.load`` reads it back.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from deepshrink.config import Config, check, check_patterns, name_matches, override_for, warn_unmatched
from deepshrink.errors import DataError
from deepshrink.modeling import (
    Inputs,
    calibration_batches,
    call,
    eval_mode,
    output_tensor,
    run_hooked,
    set_submodule,
)
from deepshrink.models import record_edit, register_edit
from deepshrink.models.schema import CONV_ARGS, Bool, Float, Int, List, Map, Obj, Str
from deepshrink.quantization import cnn, residual
from deepshrink.quantization.core import GRANULARITIES, QuantSpec, validate_bits
from deepshrink.quantization.equalize import input_means
from deepshrink.quantization.modules import (
    ACT_GRANULARITIES,
    MODES,
    ActFakeQuant,
    QuantizedLayer,
    clamp_act,
    float_weight,
    is_hf_conv1d,
    is_quantizable,
)
from deepshrink.quantization.observers import ACT_RANGE_METHODS, RANGE_METHODS
from deepshrink.quantization.smooth import (
    InputStats,
    act_errors,
    bias_correction,
    migrate,
)


def validate_weight_fields(cfg: Any) -> None:
    """Checks shared by PTQConfig and QATConfig: weight bits, granularity, group size, range
    method and per-layer bits."""
    n = type(cfg).__name__
    validate_bits(n, "bits", cfg.bits)
    check(cfg.granularity in GRANULARITIES, n, "granularity",
          f"must be one of {GRANULARITIES}, got {cfg.granularity!r}")
    check(cfg.group_size >= 1, n, "group_size", f"must be >= 1, got {cfg.group_size}")
    check(cfg.weight_range in RANGE_METHODS, n, "weight_range",
          f"must be one of {RANGE_METHODS}, got {cfg.weight_range!r}")
    for pat, b in cfg.overrides.items():
        validate_bits(n, f"overrides[{pat!r}]", b)
    check_patterns(n, "overrides", cfg.overrides)
    check_patterns(n, "ignore", cfg.ignore)


@dataclasses.dataclass
class PTQConfig(Config):
    """Post-training quantization settings. The defaults are the measured best on a real
    pretrained transformer and still right for small CNNs/MLPs (see the README table):
    int8 weights per output channel; linear inputs quantized per token at run time after
    SmoothQuant migration (α = 0.5, when calibration data is given); convs per tensor;
    embedding tables to int8 when they hold at least ``embedding_share`` of the parameters."""

    mode: str = "dynamic"  # weight-only | dynamic | static
    bits: int = 8  # weight bits (1 = binary; 2 with symmetric = ternary)
    act_bits: int = 8  # static mode activations (ONNX export needs 8)
    symmetric: bool = True  # weights; static activations are affine (uint8 in ONNX)
    granularity: str = "channel"  # tensor | channel | group (group: weight-only / safetensors)
    group_size: int = 64
    weight_range: str = "mse"  # minmax | percentile | mse
    act_range: str = "percentile"  # static mode: minmax | moving_average | percentile | mse
    act_granularity: str = "auto"  # dynamic linears: tensor (uint8) | token (int8 per row) | auto
    token_threshold: float = 0.02  # auto: per token where per-tensor inputs cost more output error
    smooth_alpha: float | None = 0.5  # SmoothQuant migration strength (None: off); needs calibration
    bias_correction: bool = False  # cancel the mean output shift of quantized weights
    target_cosine: float | None = None  # keep the most sensitive layers float until output cosine >= this
    percentile: float = 99.99
    calibration_batches: int = 8
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)  # name regex -> weight bits
    ignore: tuple[str, ...] = ()  # name regexes (full match) left in float
    target_bits: float | None = None  # mixed precision: average weight bits to reach
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    embedding_bits: int | None = 8  # nn.Embedding tables (weight-only, per row); None: never
    embedding_share: float = 0.1  # ...only when embeddings hold at least this share of parameters
    # CNNs (static mode; see quantization/cnn.py): fold BatchNorm and absorb the following
    # ReLU/ReLU6 so ONNX Runtime fuses QLinearConv; cross-layer equalization (Nagel et al.).
    fold: bool = True
    equalize: bool = False
    # AdaRound (quantization/adaround.py): learned up/down rounding of the weights, layer by layer
    # on the already quantized model's inputs. Do not combine with bias_correction on CNNs: the
    # correction undoes what the rounding compensates (real MobileNetV2: cosine 0.976 vs 0.996).
    adaround: bool = False
    adaround_steps: int = 300
    adaround_batches: int = 8  # calibration batches AdaRound samples its rows from

    def validate(self) -> None:
        n = type(self).__name__
        check(self.mode in MODES, n, "mode", f"must be one of {MODES}, got {self.mode!r}")
        validate_weight_fields(self)
        validate_bits(n, "act_bits", self.act_bits)
        check(self.act_range in ACT_RANGE_METHODS, n, "act_range",
              f"must be one of {ACT_RANGE_METHODS}, got {self.act_range!r}")
        check(self.act_granularity in (*ACT_GRANULARITIES, "auto"), n, "act_granularity",
              f"must be one of {(*ACT_GRANULARITIES, 'auto')}, got {self.act_granularity!r}")
        check(self.token_threshold >= 0, n, "token_threshold", f"must be >= 0, got {self.token_threshold}")
        if self.smooth_alpha is not None:
            check(0.0 <= self.smooth_alpha <= 1.0, n, "smooth_alpha",
                  f"must be in [0, 1] or None, got {self.smooth_alpha}")
        if self.target_cosine is not None:
            check(0.0 < self.target_cosine <= 1.0, n, "target_cosine",
                  f"must be in (0, 1], got {self.target_cosine}")
        check(50.0 < self.percentile <= 100.0, n, "percentile",
              f"must be in (50, 100], got {self.percentile}")
        check(self.adaround_steps >= 1, n, "adaround_steps", f"must be >= 1, got {self.adaround_steps}")
        check(self.adaround_batches >= 1, n, "adaround_batches", f"must be >= 1, got {self.adaround_batches}")
        check(self.calibration_batches >= 1, n, "calibration_batches",
              f"must be >= 1, got {self.calibration_batches}")
        check(0.0 <= self.embedding_share <= 1.0, n, "embedding_share",
              f"must be in [0, 1], got {self.embedding_share}")
        for b in self.candidate_bits:
            validate_bits(n, "candidate_bits", b)
        if self.embedding_bits is not None:
            validate_bits(n, "embedding_bits", self.embedding_bits)
        if self.target_bits is not None:
            check(min(self.candidate_bits) <= self.target_bits <= max(self.candidate_bits), n,
                  "target_bits",
                  f"must lie within candidate_bits {self.candidate_bits}, got {self.target_bits}")

    def spec_for(self, name: str, bits: int | None = None) -> QuantSpec:
        return QuantSpec(bits=bits or override_for(name, self.overrides, self.bits),
                         symmetric=self.symmetric, granularity=self.granularity,
                         group_size=self.group_size)


def quantizable_layers(model: nn.Module, ignore: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv1d / Conv2d / HF Conv1D not matched by an ``ignore`` regex."""
    ignore = tuple(ignore)
    return [(n, m) for n, m in model.named_modules()
            if is_quantizable(m) and not name_matches(n, ignore)]


def need_batches(calibration: Any, n: int, why: str) -> list[Inputs]:
    """Calibration batches, or a DataError saying why they are needed."""
    batches = calibration_batches(calibration, n)
    if not batches:
        raise DataError(f"{why} needs calibration data",
                        hint="pass calibration= (a DataBundle, DataLoader, tensor, tuple or tokenizer dict)")
    return batches


@torch.no_grad()
def calibrate(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Inputs],
              cfg: PTQConfig, smooth: dict[str, torch.Tensor] | None = None,
              clamps: dict[str, tuple[float, float]] | None = None
              ) -> dict[str, tuple[ActFakeQuant, ActFakeQuant | None]]:
    """Observe each layer's input (divided by its smoothing factors, if any) and conv output
    over the batches; return frozen quantizers."""
    smooth, clamps = smooth or {}, clamps or {}
    obs: dict[str, tuple[ActFakeQuant, ActFakeQuant | None]] = {}
    hooks = []
    for name, layer in layers:
        a_in = ActFakeQuant(cfg.act_bits, cfg.act_range, pct=cfg.percentile)
        conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
        a_out = ActFakeQuant(cfg.act_bits, cfg.act_range, pct=cfg.percentile) if conv else None
        # Hooks return None, so the float model runs unchanged while the observers watch.
        inv = 1.0 / smooth[name] if name in smooth else None
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, q=a_in, inv=inv: q.observer.update(
                args[0].detach() if inv is None else args[0].detach() * inv)))
        if a_out is not None:
            c = clamps.get(name)  # an absorbed activation: observe what the layer will output
            hooks.append(layer.register_forward_hook(
                lambda m, args, y, q=a_out, c=c: q.observer.update(clamp_act(y.detach(), c) if c
                                                                   else y.detach())))
        obs[name] = (a_in, a_out)
    run_hooked(model, batches, hooks)
    for a_in, a_out in obs.values():
        a_in.freeze()
        if a_out is not None:
            a_out.freeze()
    return obs


@dataclasses.dataclass
class PTQResult:
    """What :func:`quantize_with_report` did. ``smoothed`` maps a layer to where its SmoothQuant
    division went ("in layer" or the norm it was folded into); ``kept_float`` lists the layers
    the fidelity fallback left in float; ``per_token`` the dynamic linears whose inputs are
    quantized per token; ``cosine`` is the output cosine (mean over calibration
    samples) against the float model, when it was measured."""

    model: nn.Module
    quantized: list[str]
    kept_float: list[str]
    smoothed: dict[str, str]
    embeddings: list[str]
    cosine: float | None = None
    cosine_before_fallback: float | None = None
    per_token: list[str] = dataclasses.field(default_factory=list)


def quantize(model: nn.Module, config: PTQConfig | None = None, *, example_inputs: Any = None,
             calibration: Any = None) -> nn.Module:
    """Quantize ``model`` **in place** (its Linear/Conv layers become :class:`QuantizedLayer`)
    and return it. ``calibration`` (a DataBundle, DataLoader, list of batches, tensor, tuple or
    tokenizer dict) is needed for ``static`` mode, mixed precision, smoothing and the fidelity
    fallback; ``example_inputs`` (one batch) serves as calibration when none is given.
    :func:`quantize_with_report` says what was done."""
    return quantize_with_report(model, config, example_inputs=example_inputs,
                                calibration=calibration).model


def quantize_with_report(model: nn.Module, config: PTQConfig | None = None, *,
                         example_inputs: Any = None, calibration: Any = None) -> PTQResult:
    """:func:`quantize`, returning a :class:`PTQResult`."""
    cfg = config or PTQConfig()
    model.eval()
    if calibration is None and example_inputs is not None:
        calibration = [example_inputs]
    layers = quantizable_layers(model, cfg.ignore)
    warn_unmatched(type(cfg).__name__, (n for n, _ in model.named_modules()), [*cfg.ignore, *cfg.overrides])
    batches = _batches(cfg, calibration)
    prep = None
    if cfg.mode == "static" and cfg.fold and batches:
        # fold BN, equalize: the conv modules change in place, so `layers` stays valid
        prep = cnn.prepare(model, batches, equalize_weights=cfg.equalize)
    clamps = prep.clamps() if prep else {}
    layer_bits = _layer_bits(model, layers, batches, cfg)
    refs = _reference_outputs(model, batches) if cfg.target_cosine is not None else None
    smooth, where, stats = _smooth(model, layers, batches, cfg)
    acts = calibrate(model, layers, batches or [], cfg, smooth, clamps) if cfg.mode == "static" else {}
    has_convs = any(isinstance(m, nn.Conv2d) for _, m in layers)
    outputs = _residual_outputs(model, batches, cfg) if prep and batches and has_convs else {}
    if prep:
        prep.outputs = list(outputs)
    links = cnn.link_chains(model, layers, batches[0], clamps, list(outputs)) if prep and batches else {}
    float_weights = {n: float_weight(m).clone() for n, m in layers} if prep else {}
    if prep and cfg.bias_correction and batches:
        # input means of the float model as it will be quantized (after folding, equalization
        # and SmoothQuant edits), in the same space as float_weights
        prep.means = input_means(model, [n for n, _ in layers], batches)
    floats = dict(layers)
    granularity = _act_granularity(layers, stats, smooth, cfg)
    float_model = copy.deepcopy(model) if cfg.adaround and batches and cfg.granularity != "group" else None
    for name, layer in layers:
        spec = cfg.spec_for(name, override_for(name, layer_bits, cfg.bits))
        a_in, a_out = acts.get(name, (None, None))
        q = QuantizedLayer.from_float(layer, spec, cfg.mode, method=cfg.weight_range, act=a_in, out=a_out,
                                      act_granularity=granularity.get(name, "tensor"),
                                      smooth=smooth.get(name), activation=clamps.get(name))
        if cfg.bias_correction and prep is None and name in stats and q.bias is not None:
            s = smooth.get(name, torch.ones(1))
            q.bias.data.copy_(bias_correction(layer, q.dense_weight(), stats[name].mean / s, s))
            q.reset_cache()
        set_submodule(model, name, q)
    residual.quantize_outputs(model, outputs)
    ada = None
    if float_model is not None:
        assert batches is not None
        ada = lambda: _adaround(model, float_model, [n for n, _ in layers], batches, cfg)  # noqa: E731
    if prep:  # shared chain parameters, AdaRound, bias correction (CNN path), absorbed activations
        cnn.finish(model, prep, float_weights, links, absorb=cfg.target_cosine is None, adaround=ada)
    elif ada is not None:
        ada()
    embeddings = _quantize_embeddings(model, cfg)
    res = PTQResult(model, [n for n, _ in layers], [], where, embeddings,
                    per_token=[n for n, g in granularity.items() if g == "token"])
    if refs is not None:
        assert batches is not None
        _fall_back(res, floats, batches, refs, cfg)
    _record(model, prep, cfg)
    return res


def _fall_back(res: PTQResult, floats: dict[str, nn.Module], batches: list[Inputs],
               refs: list[torch.Tensor], cfg: PTQConfig) -> None:
    """``target_cosine``: put layers back to float until the model's output meets it."""
    from deepshrink.quantization.fallback import keep_float_until

    assert cfg.target_cosine is not None
    res.kept_float, res.cosine_before_fallback, res.cosine = keep_float_until(
        res.model, floats, batches, refs, cfg.target_cosine)
    res.quantized = [n for n in res.quantized if n not in res.kept_float]


def _record(model: nn.Module, prep: Any, cfg: PTQConfig) -> None:
    """Record the quantize edit (every layer's meta, and the CNN preparation) so the file rebuilds."""
    metas = {n: m.meta for n, m in quantized_layers(model).items()}
    edit: dict[str, Any] = {"kind": "quantize", "layers": metas}
    if prep:
        edit["cnn"] = prep.edit(set(metas), absorbed=cfg.target_cosine is None)
    record_edit(model, edit)


def _residual_outputs(model: nn.Module, batches: list[Inputs], cfg: PTQConfig) -> dict[str, ActFakeQuant]:
    """Calibrated output quantizers of the residual blocks (ONNX Runtime then fuses QLinearAdd)."""
    names = residual.find_residual_outputs(model, batches[0])
    return residual.calibrate_outputs(model, names, batches, cfg.act_bits, cfg.act_range, cfg.percentile)


def _adaround(model: nn.Module, float_model: nn.Module, names: list[str], batches: list[Inputs],
              cfg: PTQConfig) -> None:
    """Sequential AdaRound (quantization/adaround.py) over the quantized layers, in the order
    the model runs them."""
    from deepshrink.quantization.adaround import adaround_sequential, run_order

    adaround_sequential(model, float_model, run_order(float_model, names, batches[0]),
                        batches[:cfg.adaround_batches], steps=cfg.adaround_steps)


def _batches(cfg: PTQConfig, calibration: Any) -> list[Inputs] | None:
    needs = [why for why, on in (("static quantization", cfg.mode == "static"),
                                 ("mixed precision (target_bits)", cfg.target_bits is not None),
                                 ("the fidelity fallback (target_cosine)", cfg.target_cosine is not None))
             if on]
    if needs:
        return need_batches(calibration, cfg.calibration_batches, needs[0])
    if calibration is not None:  # optional uses: smoothing, bias correction
        return calibration_batches(calibration, cfg.calibration_batches) or None
    return None


def _layer_bits(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Inputs] | None,
                cfg: PTQConfig) -> dict[str, int]:
    layer_bits = dict(cfg.overrides)
    if cfg.target_bits is None:
        return layer_bits
    from deepshrink.quantization.mixed import choose_bits, layer_sensitivity

    assert batches is not None
    sens = layer_sensitivity(model, layers, batches, cfg)
    sizes = {n: m.weight.numel() for n, m in layers}
    return {**choose_bits(sens, sizes, cfg.target_bits), **layer_bits}


@torch.no_grad()
def _reference_outputs(model: nn.Module, batches: list[Inputs] | None) -> list[torch.Tensor]:
    assert batches is not None
    with eval_mode(model):
        return [output_tensor(call(model, x)).float() for x in batches]


def _smooth(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Inputs] | None,
            cfg: PTQConfig) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, InputStats]]:
    linears = [(n, m) for n, m in layers if _layer_kind_is_linear(m)]
    want_smooth = cfg.smooth_alpha is not None and cfg.mode != "weight-only"
    auto = cfg.mode == "dynamic" and cfg.act_granularity == "auto"
    if batches is None or not linears or not (want_smooth or cfg.bias_correction or auto):
        return {}, {}, {}
    return migrate(model, linears, batches, cfg.smooth_alpha if want_smooth else None)


def _act_granularity(layers: list[tuple[str, nn.Module]], stats: dict[str, InputStats],
                     smooth: dict[str, torch.Tensor], cfg: PTQConfig) -> dict[str, str]:
    """Input granularity of each dynamic linear. ``auto`` measures each layer on calibration
    inputs: per token (more ops at run time) only where per-tensor inputs cost more than
    ``token_threshold`` relative output error; per tensor without calibration data."""
    if cfg.mode != "dynamic":
        return {}
    if cfg.act_granularity != "auto":
        return {n: cfg.act_granularity for n, m in layers if _layer_kind_is_linear(m)}
    out = {}
    for n, m in layers:
        st = stats.get(n)
        if not _layer_kind_is_linear(m) or st is None or st.sample is None:
            continue
        s = smooth.get(n, torch.ones(1))
        tensor_err, _ = act_errors(float_weight(m) * s[None, :], st.sample / s)
        out[n] = "token" if tensor_err > cfg.token_threshold else "tensor"
    return out


def _layer_kind_is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_hf_conv1d(m)


def _quantize_embeddings(model: nn.Module, cfg: PTQConfig) -> list[str]:
    """Embedding tables to ``embedding_bits`` (weight-only, one scale per row) when they hold at
    least ``embedding_share`` of the model's parameters (in a small-vocabulary model they are
    not worth the gather-and-scale step)."""
    if cfg.embedding_bits is None:
        return []
    emb = [(n, m) for n, m in model.named_modules() if type(m) is nn.Embedding
           and m.max_norm is None and not name_matches(n, cfg.ignore)]
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.weight_bytes() for m in model.modules() if isinstance(m, QuantizedLayer))
    if not emb or sum(m.weight.numel() for _, m in emb) < cfg.embedding_share * total:
        return []
    # 8-bit rows gain nothing measurable from MSE clipping, which costs ~1 min on a 30k vocabulary.
    method = "minmax" if cfg.embedding_bits >= 8 else cfg.weight_range
    for name, layer in emb:
        spec = QuantSpec(bits=cfg.embedding_bits, symmetric=True, granularity="channel")
        set_submodule(model, name, QuantizedLayer.from_float(layer, spec, "weight-only", method=method))
    return [n for n, _ in emb]


_QSPEC = Obj({}, optional={"type": Str(choices=("QuantSpec",)), "bits": Int(1, 8), "symmetric": Bool(),
                           "granularity": Str(choices=GRANULARITIES), "group_size": Int(1, 1 << 20),
                           "narrow": Bool(), "axis": Int(-8, 8)})
QUANTIZE_SCHEMA = Obj({"layers": Map(Obj(
    {"kind": Str(choices=("linear", "conv1d", "conv2d", "embedding")), "mode": Str(choices=MODES),
     "spec": _QSPEC, "shape": List(Int(0, 1 << 31), min_len=1, max_len=5)},
    optional={"bias": Bool(), "conv": CONV_ARGS, "act_bits": Int(1, 16), "out_q": Bool(),
              "smooth": Bool(), "transposed": Bool(), "act_granularity": Str(choices=ACT_GRANULARITIES),
              "act": Obj({"lo": Float()}, optional={"hi": Float()})}))},
    optional={"cnn": cnn.EDIT_SCHEMA})


@register_edit("quantize", schema=QUANTIZE_SCHEMA)
def _replay_quantize(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Rebuild empty quantized layers of the recorded shapes; the file fills their buffers."""
    cnn.replay(model, edit.get("cnn", {}))
    for name, meta in edit["layers"].items():
        set_submodule(model, name, QuantizedLayer(meta))
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all quantized weights as stored (codes, scales, zero points)."""
    return sum(m.weight_bytes() for m in quantized_layers(model).values())
