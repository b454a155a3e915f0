"""How each traced tensor operation moves and joins channel maps (see :mod:`.graph`).

One function per family of operations, looked up by the operation's name in :data:`RULES`
(``F.linear``, ``torch.Tensor.view`` and ``torch.cat`` are seen as ``linear``, ``view``,
``cat``). An operation without a rule fixes every channel it reads, with its name as the reason;
:func:`register_rule` teaches the graph a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deepshrink.pruning.graph import Builder, Consumer, SizeUse, tensor_args

Maps = dict[int, np.ndarray]
Rule = Callable[[Builder, str, tuple, dict, Any], None]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: ``fn(builder, name, args, kwargs, out)`` handles the operations ``names``."""

    def wrap(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return wrap


# Calls that only read metadata or make tensors from nothing: no channel constraint.
_META = {"size", "dim", "numel", "__len__", "ndimension", "nelement", "item", "tolist", "__bool__",
         "__format__", "__repr__", "is_floating_point", "is_contiguous", "element_size",
         "data_ptr", "requires_grad_", "retain_grad", "stride", "storage_offset", "get_device",
         "__index__", "__int__", "__float__", "is_complex", "has_names", "__hash__", "numpy",
         "_is_view", "equal", "allclose", "is_same_size", "__iter__", "__reversed__"}
_FIRST_ONLY = {"contiguous", "clone", "detach", "to", "type_as", "float", "half", "double", "bfloat16",
               "long", "int", "bool", "cpu", "cuda", "type", "zeros_like", "ones_like", "empty_like",
               "full_like", "rand_like", "randn_like", "fill_", "zero_", "detach_", "requires_grad_",
               "view_as_real", "dropout", "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout",
               "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "relu6", "hardswish",
               "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign",
               "logsigmoid", "gelu_", "silu_", "sigmoid_", "tanh_", "hardtanh_", "exp", "log", "sqrt",
               "rsqrt", "abs", "neg", "__neg__", "__pos__", "__abs__", "cos", "sin", "erf", "square",
               "reciprocal", "sign", "floor", "ceil", "round", "log1p", "expm1", "nan_to_num",
               "logical_not", "__invert__", "bitwise_not", "isnan", "isinf", "isfinite", "pow_",
               "exp_", "neg_", "clamp_", "clamp_min_", "clamp_max_", "threshold", "_conv_forward"}
_ELEMENTWISE = {"add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
                "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
                "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__pow__",
                "__rpow__", "__floordiv__", "__mod__", "add_", "sub_", "mul_", "div_", "maximum",
                "minimum", "where", "masked_fill", "masked_fill_", "clamp", "clip", "clamp_min",
                "clamp_max", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt", "le", "gt", "ge",
                "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__or__",
                "__xor__", "__iand__", "__ior__", "logical_and", "logical_or", "bitwise_and",
                "bitwise_or", "copy_", "rsub", "fmax", "fmin", "atan2", "hypot", "xlogy"}
_RESIDUAL = {"add", "sub", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
             "add_", "sub_", "rsub"}


def visit(b: Builder, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Apply the rule for one traced call."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property such as x.shape or x.T
        name = "property:" + getattr(getattr(func, "__self__", None), "__name__", "?")
        if not isinstance(out, torch.Tensor):
            return
    if name in _META:
        return
    tensors = tensor_args(args, kwargs)
    if name in _FIRST_ONLY:
        return b.set_maps(out, dict(b.maps_of(args[0])) if args else {}, tensors)
    if name in _ELEMENTWISE:
        return elementwise(b, name, tensors, out)
    rule = RULES.get(name)
    if rule is not None:
        return rule(b, name, args, kwargs, out)
    if not any(b.maps_of(t) for t in tensors):
        for o in _outs(out):
            b.set_maps(o, {}, tensors)
        return None
    b.fix_all(tensors, f"{name} in {b.where()} (an op channel pruning does not understand)")
    for o in _outs(out):
        b.set_maps(o, {}, tensors)
    return None


def _outs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


# -- elementwise with broadcasting -------------------------------------------------------------
def elementwise(b: Builder, name: str, tensors: list[torch.Tensor], out: Any) -> None:
    """Join what lines up along each output axis; a mapped axis meeting a full-size unmapped
    one (a fixed-size tensor) is fixed. ``+`` of two input-dependent tensors from different
    groups is a residual connection: hidden size."""
    if not isinstance(out, torch.Tensor):
        return
    maps: Maps = {}
    for k in range(-out.dim(), 0):
        size = out.shape[k]
        mapped, plain = [], []
        for t in tensors:
            if t.dim() < -k or t.shape[k] != size or size == 1:
                continue
            m = b.maps_of(t).get(k)
            (mapped if m is not None else plain).append((t, m))
        if not mapped:
            continue
        if plain:
            for _, m in mapped:
                b.fix(m, f"{name} in {b.where()} combines channels with a fixed-size tensor")
            continue
        first = mapped[0][1]
        for t, m in mapped[1:]:
            joined = b.join(first, m)
            if (joined and name in _RESIDUAL and id(t) in b.dependent
                    and id(mapped[0][0]) in b.dependent):
                b.mark_hidden(first, f"residual connection ({name} in {b.where()})")
        maps[k] = first
    b.set_maps(out, maps, tensors)


# -- layers ------------------------------------------------------------------------------------
def _consume(b: Builder, x: Any, axis: int, w_nodes: np.ndarray, what: str) -> None:
    """Join the channels of ``x`` along ``axis`` with a weight's input dimension."""
    xm = b.maps_of(x).get(axis) if isinstance(x, torch.Tensor) else None
    if xm is None:
        src = "the model input" if isinstance(x, torch.Tensor) and id(x) in b.input_ids else \
            "features computed from the model input, not by a prunable layer" \
            if isinstance(x, torch.Tensor) and id(x) in b.dependent else "a fixed-size tensor"
        b.fix(w_nodes, f"{what} reads {src}")
        return
    b.join(xm, w_nodes)
    b.consumers.append(Consumer(b.where(), axis, xm))


@register_rule("linear")
def linear(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    wm = b.maps_of(w)
    _consume(b, x, -1, wm[-1], f"Linear {b.where()}")
    b.role(w, -1, "in")
    b.role(w, -2, "out")
    if bias is not None:
        b.join(b.maps_of(bias)[-1], wm[-2])
        b.role(bias, 0, "along")
    maps = {k - 0: v for k, v in b.maps_of(x).items() if k < -1}
    maps[-1] = wm[-2]
    b.set_maps(out, maps, [x, w])


@register_rule("addmm")
def addmm(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """GPT-2's Conv1D: ``bias + x @ W`` with W of shape (in, out)."""
    bias, x, w = args[0], args[1], args[2]
    wm = b.maps_of(w)
    _consume(b, x, -1, wm[-2], f"Conv1D/addmm {b.where()}")
    b.role(w, 0, "in")
    b.role(w, 1, "out")
    bm = b.maps_of(bias).get(-1)
    if bm is not None and bias.dim() == 1:
        b.join(bm, wm[-1])
        b.role(bias, 0, "along")
    maps = {-1: wm[-1]}
    if -2 in b.maps_of(x):
        maps[-2] = b.maps_of(x)[-2]
    b.set_maps(out, maps, [x, w])


@register_rule("matmul", "bmm", "mm", "__matmul__", "__rmatmul__")
def matmul(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    a, c = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
    if a.dim() < 2 or c.dim() < 2:
        return b.fix_all([a, c], f"{name} of a vector in {b.where()}")
    am, cm = b.maps_of(a), b.maps_of(c)
    ka, kc = am.get(-1), cm.get(-2)
    if ka is not None and kc is not None:
        b.join(ka, kc)
    elif ka is not None or kc is not None:
        b.fix(ka if ka is not None else kc, f"{name} in {b.where()} contracts channels with a "
                                            "fixed-size tensor")
    maps: Maps = {}
    if -2 in am:
        maps[-2] = am[-2]
    if -1 in cm:
        maps[-1] = cm[-1]
    for k in range(-out.dim(), -2):  # batch axes broadcast like elementwise ops
        ms = [m[k] for t, m in ((a, am), (c, cm)) if t.dim() >= -k and k in m and t.shape[k] == out.shape[k]]
        plain = [t for t, m in ((a, am), (c, cm)) if t.dim() >= -k and k not in m
                 and t.shape[k] == out.shape[k] > 1]
        if ms and plain:
            for m in ms:
                b.fix(m, f"{name} in {b.where()} batches channels with a fixed-size tensor")
        elif ms:
            for m in ms[1:]:
                b.join(ms[0], m)
            maps[k] = ms[0]
    b.set_maps(out, maps, [a, c])
    return None


@register_rule("conv1d", "conv2d", "conv3d")
def conv(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    axis = -(w.dim() - 1)
    wm = b.maps_of(w)
    out_nodes, in_nodes = wm[-w.dim()], wm[-w.dim() + 1]
    where = b.where()
    b.role(w, 0, "out")
    if bias is not None:
        b.join(b.maps_of(bias)[-1], out_nodes)
        b.role(bias, 0, "along")
    if groups == 1:
        _consume(b, x, axis, in_nodes, f"conv {where}")
        b.role(w, 1, "in")
    else:
        xm = b.maps_of(x).get(axis)
        cin, cout = x.shape[axis], w.shape[0]
        if xm is None:
            b.fix(out_nodes, f"grouped conv {where} reads "
                             + ("the model input" if id(x) in b.input_ids else "unprunable channels"))
        else:
            gi, go = cin // groups, cout // groups
            for j in range(groups):  # a group (its inputs and outputs) goes whole
                b.merge_units(np.concatenate([xm[j * gi:(j + 1) * gi], out_nodes[j * go:(j + 1) * go]]))
            b.consumers.append(Consumer(where, axis, xm))
    maps = {axis: out_nodes}
    b.set_maps(out, maps, [x, w])


@register_rule("batch_norm", "instance_norm")
def batch_norm(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    axis = 1 - x.dim()
    params = [t for t in args[1:5] if isinstance(t, torch.Tensor)]
    params += [kwargs[k] for k in ("running_mean", "running_var", "weight", "bias")
               if isinstance(kwargs.get(k), torch.Tensor)]
    _follow_channels(b, params, b.maps_of(x).get(axis), name)
    b.set_maps(out, dict(b.maps_of(x)), [x])


def _follow_channels(b: Builder, params: list[torch.Tensor], xm: Any, name: str) -> None:
    """A norm's per-channel parameters go with the channels they normalise (``xm``, the input's
    channel map), or are fixed when those channels cannot be pruned."""
    for p in params:
        b.role(p, 0, "along")
        if xm is None:
            b.fix(b.maps_of(p)[-1], f"{name} {b.where()} normalises unprunable channels")
        else:
            b.join(xm, b.maps_of(p)[-1])


def _norm_params(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in (*args[2:4], kwargs.get("weight"), kwargs.get("bias")) if isinstance(t, torch.Tensor)]


@register_rule("layer_norm", "rms_norm")
def layer_norm(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    params = _norm_params(args, kwargs)
    xm = b.maps_of(x)
    if len(tuple(shape)) != 1:
        b.fix_all([x, *params], f"{name} {b.where()} over several axes")
        return b.set_maps(out, {}, [x])
    _follow_channels(b, params, xm.get(-1), name)
    if -1 in xm:
        b.mark_hidden(xm[-1], f"normalised over channels by {name} in {b.where()}")
    b.set_maps(out, dict(xm), [x])
    return None


@register_rule("group_norm")
def group_norm(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, groups = args[0], int(_arg(args, kwargs, 1, "num_groups"))
    params = _norm_params(args, kwargs)
    axis = 1 - x.dim()
    xm = b.maps_of(x).get(axis)
    _follow_channels(b, params, xm, "GroupNorm")
    if xm is not None:
        per = len(xm) // groups
        for j in range(groups):  # statistics are per group: a group goes whole
            b.merge_units(xm[j * per:(j + 1) * per])
    b.set_maps(out, dict(b.maps_of(x)), [x])


@register_rule("embedding")
def embedding(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    ids, w = args[0], _arg(args, kwargs, 1, "weight")
    wm = b.maps_of(w)
    b.fix(wm[-2], f"vocabulary rows of {b.where()} are indexed by token ids")
    b.role(w, 1, "out")
    maps = {k - 1: v for k, v in b.maps_of(ids).items()}
    maps[-1] = wm[-1]
    b.set_maps(out, maps, [ids, w])


# -- attention ---------------------------------------------------------------------------------
@register_rule("scaled_dot_product_attention")
def sdpa(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    q, k, v = args[0], args[1], args[2]
    qm, km, vm = b.maps_of(q), b.maps_of(k), b.maps_of(v)
    where = b.where()
    if -3 in km and -3 in vm:
        b.join(km[-3], vm[-3])
    hq, hk = q.shape[-3] if q.dim() >= 3 else 1, k.shape[-3] if k.dim() >= 3 else 1
    if -3 in qm and -3 in km:
        rep = hq // hk
        b.join(qm[-3], np.repeat(km[-3], rep))  # grouped-query attention: a kv head and its q heads
    elif -3 in qm or -3 in km:
        b.fix(qm.get(-3, km.get(-3)), f"attention in {where} mixes prunable and fixed heads")
    if -1 in qm and -1 in km:
        b.join(qm[-1], km[-1])
        if _arg(args, kwargs, 6, "scale") is None:
            b.mark_hidden(qm[-1], f"attention scale in {where} depends on the head width")
    elif -1 in qm or -1 in km:
        b.fix(qm.get(-1, km.get(-1)), f"attention in {where} contracts channels with fixed ones")
    mask = _arg(args, kwargs, 3, "attn_mask")
    if isinstance(mask, torch.Tensor) and b.maps_of(mask):
        mm = b.maps_of(mask)
        if -3 in mm and -3 in qm and len(mm[-3]) == len(qm[-3]):
            b.join(qm[-3], mm[-3])
        else:
            b.fix_all([mask], f"attention mask in {where} carries channels")
    maps = {a: m for a, m in qm.items() if a not in (-1,)}
    if -1 in vm:
        maps[-1] = vm[-1]
    b.set_maps(out, maps, [q, k, v])


@register_rule("multi_head_attention_forward")
def mha(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``nn.MultiheadAttention``: embedding channel ``e`` is input column ``e`` of the packed
    q/k/v projection, rows ``e``, ``E+e``, ``2E+e`` of it, input column ``e`` and output row ``e``
    of the output projection; heads (``head_dim`` consecutive channels) go whole."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
             "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
             "out_proj_bias")
    a = {n: _arg(args, kwargs, i, n) for i, n in enumerate(names)}
    sep = _arg(args, kwargs, 17, "use_separate_proj_weight", False)
    tensors = tensor_args(args, kwargs)
    where = b.where()
    if sep or a["in_proj_weight"] is None or a["bias_k"] is not None or a["add_zero_attn"]:
        return _fix_outs(b, tensors, out, f"MultiheadAttention {where} with separate projections, "
                                          "bias_k/bias_v or add_zero_attn")
    e, heads = int(a["embed_dim_to_check"]), int(a["num_heads"])
    w_in, w_out = b.maps_of(a["in_proj_weight"]), b.maps_of(a["out_proj_weight"])
    chans = [w_in[-1], w_in[-2][:e], w_in[-2][e:2 * e], w_in[-2][2 * e:], w_out[-1], w_out[-2]]
    if a["in_proj_bias"] is not None:
        bi = b.maps_of(a["in_proj_bias"])[-1]
        chans += [bi[:e], bi[e:2 * e], bi[2 * e:]]
        b.role(a["in_proj_bias"], 0, "along")
    if a["out_proj_bias"] is not None:
        chans.append(b.maps_of(a["out_proj_bias"])[-1])
        b.role(a["out_proj_bias"], 0, "along")
    for c in chans[1:]:
        b.join(chans[0], c)
    d = e // heads
    for h in range(heads):
        b.merge_units(chans[0][h * d:(h + 1) * d], head=True)
    for t in {id(a[n]): a[n] for n in ("query", "key", "value")}.values():
        _consume(b, t, -1, chans[0], f"MultiheadAttention {where}")
    b.role(a["in_proj_weight"], 0, "out")
    b.role(a["in_proj_weight"], 1, "in")
    b.role(a["out_proj_weight"], 0, "out")
    b.role(a["out_proj_weight"], 1, "in")
    qm = b.maps_of(a["query"])
    maps = {k: v for k, v in qm.items() if k != -1}
    maps[-1] = chans[0]
    b.set_maps(out[0], maps, tensors)
    if isinstance(out[1], torch.Tensor):
        b.set_maps(out[1], {}, tensors)
    return None


def _fix_outs(b: Builder, tensors: list[torch.Tensor], out: Any, reason: str) -> None:
    b.fix_all(tensors, reason)
    for o in _outs(out):
        b.set_maps(o, {}, tensors)


# -- shapes ------------------------------------------------------------------------------------
def _blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into runs of source and target dims with equal products."""
    i = j = 0
    out = []
    while i < len(src) or j < len(dst):
        si, dj, ps, pd = [], [], 1, 1
        if i < len(src):
            si.append(i)
            ps *= src[i]
            i += 1
        if j < len(dst):
            dj.append(j)
            pd *= dst[j]
            j += 1
        while ps != pd:
            if ps < pd and i < len(src):
                si.append(i)
                ps *= src[i]
                i += 1
            elif pd < ps and j < len(dst):
                dj.append(j)
                pd *= dst[j]
                j += 1
            else:
                return None
        out.append((si, dj))
    return out


def reshape_maps(b: Builder, x: torch.Tensor, out: torch.Tensor, where: str) -> Maps:
    """Maps after a view / reshape / flatten / unflatten / (un)squeeze from ``x.shape`` to
    ``out.shape``: a merged run hands each position its channel; a channel axis split into
    (n, rest) makes each run of ``rest`` channels one unit (a head) on the leading axis."""
    xm = b.maps_of(x)
    if not xm:
        return {}
    src, dst = tuple(x.shape), tuple(out.shape)
    blocks = _blocks(src, dst)
    if blocks is None:
        b.fix_all([x], f"reshape {src} -> {dst} in {where}")
        return {}
    maps: Maps = {}
    for si, dj in blocks:
        mapped = [i for i in si if (i - len(src)) in xm]
        if not mapped:
            continue
        if len(mapped) > 1:
            for i in mapped:
                b.fix(xm[i - len(src)], f"reshape {src} -> {dst} in {where} mixes channel axes")
            continue
        a = mapped[0]
        nodes = xm[a - len(src)]
        big_src = [i for i in si if src[i] > 1]
        big_dst = [j for j in dj if dst[j] > 1]
        if not big_dst:
            continue
        if len(big_dst) == 1:  # merge (or move): each position of the merged dim has a channel
            coords = np.indices([src[i] for i in si]).reshape(len(si), -1)[si.index(a)]
            maps[big_dst[0] - len(dst)] = nodes[coords]
        elif big_src == [a]:  # split: (C,) -> (n, rest...)
            lead = big_dst[0]
            rest = len(nodes) // dst[lead]
            for h in range(dst[lead]):
                b.merge_units(nodes[h * rest:(h + 1) * rest], head=rest > 1)
            maps[lead - len(dst)] = nodes[::rest]
            b.size_uses.append(SizeUse(tuple(b.stack), nodes[::rest], heads=rest > 1))
        else:
            b.fix(nodes, f"reshape {src} -> {dst} in {where} splits a channel axis across dims")
    return maps


def _record_literals(b: Builder, sizes: Any, out: torch.Tensor, maps: Maps) -> None:
    if isinstance(sizes, int):
        sizes = (sizes,)
    if not isinstance(sizes, (tuple, list, torch.Size)) or len(sizes) != out.dim():
        return
    for k, m in maps.items():
        lit = sizes[k]
        if isinstance(lit, int) and lit == len(m) and lit != -1:
            b.size_uses.append(SizeUse(tuple(b.stack), m))


@register_rule("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_",
               "unsqueeze_", "view_as", "reshape_as", "ravel")
def reshape(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    maps = reshape_maps(b, x, out, b.where())
    if name in ("view", "reshape"):
        sizes = args[1] if len(args) == 2 else args[1:]
        _record_literals(b, sizes if not isinstance(sizes, int) else (sizes,), out, maps)
    b.set_maps(out, maps, [x])


@register_rule("expand", "expand_as", "broadcast_to", "repeat_interleave_noop")
def expand(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    maps = {k: m for k, m in b.maps_of(x).items() if out.shape[k] == len(m)}
    if name == "expand":
        sizes = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
        _record_literals(b, sizes, out, maps)
    b.set_maps(out, maps, [x])


def _perm_maps(xm: Maps, nd: int, perm: list[int]) -> Maps:
    """Output axis i takes input axis perm[i]."""
    maps = {}
    for i, src in enumerate(perm):
        m = xm.get(src - nd)
        if m is not None:
            maps[i - nd] = m
    return maps


@register_rule("permute", "transpose", "transpose_", "swapaxes", "swapdims", "t", "movedim", "moveaxis",
               "property:T", "property:mT", "property:H", "property:mH", "numpy_T")
def permute(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    nd = x.dim()
    perm = list(range(nd))
    if name == "permute":
        dims = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
        dims = kwargs.get("dims", dims)
        perm = [int(d) % nd for d in dims]
    elif name in ("transpose", "transpose_", "swapaxes", "swapdims"):
        d0, d1 = (int(_arg(args, kwargs, 1, "dim0")) % nd, int(_arg(args, kwargs, 2, "dim1")) % nd)
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif name in ("t", "property:T", "property:H"):
        perm = perm[::-1]
    elif name in ("property:mT", "property:mH"):
        perm[-1], perm[-2] = perm[-2], perm[-1]
    else:  # movedim(source, destination)
        srcs, dsts = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
        srcs = [srcs] if isinstance(srcs, int) else list(srcs)
        dsts = [dsts] if isinstance(dsts, int) else list(dsts)
        srcs, dsts = [s % nd for s in srcs], [d % nd for d in dsts]
        rest = [i for i in range(nd) if i not in srcs]
        perm = [-1] * nd
        for s, d in zip(srcs, dsts, strict=True):
            perm[d] = s
        it = iter(rest)
        perm = [p if p >= 0 else next(it) for p in perm]
    b.set_maps(out, _perm_maps(b.maps_of(x), nd, perm), [x])


@register_rule("__getitem__")
def getitem(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, idx = args[0], args[1]
    xm = b.maps_of(x)
    if not isinstance(out, torch.Tensor):
        return None
    if not xm:
        return b.set_maps(out, {}, [x, *tensor_args(idx, {})])
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx) or \
            sum(isinstance(i, (torch.Tensor, list)) for i in idx) > 1:
        return _fix_outs(b, [x], out, f"boolean / multiple advanced indexing in {b.where()}")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (x.dim() - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (x.dim() - sum(1 for i in expanded if i is not None))
    maps: Maps = {}
    src = out_pos = 0
    for i in expanded:
        if i is None:
            out_pos += 1
            continue
        m = xm.get(src - x.dim())
        if isinstance(i, slice):
            if m is not None:
                sel = range(x.shape[src])[i]
                if len(sel) == len(m):
                    maps[out_pos - out.dim()] = m[list(sel)]
                else:
                    b.fix(m, f"partial slice of a channel axis in {b.where()}")
            out_pos += 1
        elif isinstance(i, int):
            if m is not None:
                b.fix(m, f"single channel picked by index in {b.where()}")
        else:  # one integer tensor / list index: its dims take this place
            if m is not None:
                b.fix(m, f"channels gathered by an index tensor in {b.where()}")
            out_pos += torch.as_tensor(i).dim()
        src += 1
    b.set_maps(out, maps, [x])
    return None


@register_rule("cat", "concat", "concatenate", "stack")
def cat(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    tensors = list(_arg(args, kwargs, 0, "tensors"))
    dim = int(_arg(args, kwargs, 1, "dim", 0))
    where = b.where()
    nd = out.dim()
    axis = (dim % nd) - nd
    maps: Maps = {}
    if name != "stack":
        parts, any_mapped = [], False
        for t in tensors:
            m = b.maps_of(t).get(axis) if t.dim() == nd else None
            any_mapped |= m is not None
            if m is None:
                m = np.full(t.shape[axis] if t.dim() == nd else 0, -1, dtype=np.int64)
            parts.append(m)
        if any_mapped:
            joined = np.concatenate(parts)
            plain = joined < 0
            if plain.any():  # positions from tensors without channels: fresh fixed nodes
                base = b.uf.add(int(plain.sum()))
                joined[plain] = np.arange(base, base + int(plain.sum()))
                b.fix(joined[plain], f"concatenated with a tensor not from a prunable layer in {where}")
            maps[axis] = joined
    for k in range(-nd, 0):  # every other axis lines up across the inputs
        if k == axis:
            continue
        src_k = k if name != "stack" else (k + 1 if k > axis else k)
        if name == "stack" and k < axis:
            src_k = k + 1
        if name == "stack" and k > axis:
            src_k = k
        ms = [b.maps_of(t).get(src_k) for t in tensors]
        got = [m for m in ms if m is not None]
        if not got:
            continue
        if len(got) < len(ms) and out.shape[k] > 1:
            for m in got:
                b.fix(m, f"{name} in {where} lines channels up with a fixed-size tensor")
            continue
        for m in got[1:]:
            b.join(got[0], m)
        maps[k] = got[0]
    b.set_maps(out, maps, tensors)


@register_rule("split", "chunk", "tensor_split", "split_with_sizes", "unbind")
def split(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    dim = int(_arg(args, kwargs, 2, "dim", 0 if name != "unbind" else _arg(args, kwargs, 1, "dim", 0)))
    if name == "unbind":
        dim = int(_arg(args, kwargs, 1, "dim", 0))
    axis = (dim % x.dim()) - x.dim()
    xm = b.maps_of(x)
    outs = list(out)
    m = xm.get(axis)
    sizes = [o.shape[axis] if name != "unbind" else 1 for o in outs]
    equal = len(set(sizes[:-1])) <= 1 and (not sizes or sizes[-1] <= sizes[0])
    if m is not None and (name in ("unbind", "split_with_sizes", "tensor_split") or not equal
                          or isinstance(_arg(args, kwargs, 1, "split_size"), (list, tuple))):
        b.fix(m, f"{name} of a channel axis into unequal parts in {b.where()}")
        m = None
    start = 0
    chunks = []
    for o, s in zip(outs, sizes, strict=True):
        maps = {k: v for k, v in xm.items() if k != axis}
        if name == "unbind":
            maps = {(k + 1 if k < axis else k): v for k, v in maps.items()}
        if m is not None:
            maps[axis] = m[start:start + s]
            chunks.append(maps[axis])
        start += s
        b.set_maps(o, maps, [x])
    if m is not None and len(chunks) > 1 and all(len(c) == len(chunks[0]) for c in chunks):
        for c in chunks[1:]:  # the parts must keep equal sizes: their k-th channels go together
            b.join(chunks[0], c)
        if name == "split" and isinstance(_arg(args, kwargs, 1, "split_size"), int):
            b.size_uses.append(SizeUse(tuple(b.stack), chunks[0]))
    elif m is not None and len(chunks) > 1:
        b.fix(m, f"{name} of a channel axis into unequal parts in {b.where()}")


_REDUCE_EXACT = {"sum"}
_REDUCE_STATS = {"mean", "var", "std", "norm", "var_mean", "std_mean", "nanmean", "logsumexp"}


@register_rule("sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "nanmean",
               "logsumexp", "prod", "argmax", "argmin", "all", "any")
def reduce(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    if not isinstance(x, torch.Tensor):
        return None
    others = [t for t in tensor_args(args[1:], kwargs)]
    if others:  # torch.max(a, b): elementwise
        return elementwise(b, name, [x, *others], out)
    dims = _arg(args, kwargs, 1, "dim")
    if name == "norm":
        dims = _arg(args, kwargs, 2, "dim")
    keep = bool(_arg(args, kwargs, 2 if name != "norm" else 3, "keepdim", False))
    nd = x.dim()
    if dims is None:
        dims = list(range(nd))
    dims = [int(d) % nd for d in ([dims] if isinstance(dims, int) else dims)]
    xm = b.maps_of(x)
    maps: Maps = {}
    for k, m in xm.items():
        a = k + nd
        if a in dims:
            if name in _REDUCE_STATS:
                if keep:  # kept dims broadcast the statistic back over the channels (a norm)
                    b.mark_hidden(m, f"statistics over channels ({name} in {b.where()})")
            elif name not in _REDUCE_EXACT:
                b.fix(m, f"{name} over channels in {b.where()}")
            continue
        after = sum(1 for d in dims if d > a)
        maps[k if keep else k + after] = m
    for o in _outs(out)[:1]:
        b.set_maps(o, maps, [x])
    for o in _outs(out)[1:]:
        b.set_maps(o, maps, [x])
    return None


@register_rule("softmax", "log_softmax", "_softmax", "cumsum", "cumprod", "argsort", "sort", "topk",
               "flip", "roll", "normalize")
def along_dim(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Ops acting along given dims: channel axes elsewhere pass; among them they are fixed."""
    x = args[0]
    nd = x.dim()
    if name == "roll":
        dims = _arg(args, kwargs, 2, "dims")
    elif name == "flip":
        dims = _arg(args, kwargs, 1, "dims")
    elif name == "topk":
        dims = _arg(args, kwargs, 2, "dim", -1)
    elif name == "normalize":
        dims = _arg(args, kwargs, 2, "dim", 1)
    else:
        dims = _arg(args, kwargs, 1, "dim", -1)
    dims = [int(d) % nd for d in ([dims] if isinstance(dims, int) else (dims or range(nd)))]
    maps: Maps = {}
    for k, m in b.maps_of(x).items():
        if k + nd in dims:
            if name == "normalize":
                b.mark_hidden(m, f"normalize over channels in {b.where()}")
                maps[k] = m
            else:
                b.fix(m, f"{name} along channels in {b.where()}")
        else:
            maps[k] = m
    for o in _outs(out):
        b.set_maps(o, maps if o.shape == x.shape else {}, [x])


@register_rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
               "adaptive_max_pool1d", "adaptive_max_pool2d", "pad", "interpolate", "upsample",
               "max_pool2d_with_indices", "lp_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
               "fractional_max_pool2d", "pixel_unshuffle_noop")
def spatial(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Pooling, padding, resizing: channel axes whose size is unchanged pass."""
    x = args[0]
    res = _outs(out)
    if not res:
        return
    maps: Maps = {}
    for k, m in b.maps_of(x).items():
        if res[0].dim() >= -k and res[0].shape[k] == x.shape[k]:
            maps[k] = m
        else:
            b.fix(m, f"{name} in {b.where()} resizes a channel axis")
    for o in res:
        b.set_maps(o, maps, [x])


@register_rule("__setitem__")
def setitem(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    tensors = tensor_args(args, kwargs)
    if any(b.maps_of(t) for t in tensors):
        b.fix_all(tensors, f"in-place item assignment in {b.where()}")


@register_rule("repeat", "tile")
def repeat(b: Builder, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    maps = {k: m for k, m in b.maps_of(x).items() if out.shape[k] == len(m)}
    for k, m in b.maps_of(x).items():
        if k not in maps:
            b.fix(m, f"{name} along channels in {b.where()}")
    b.set_maps(out, maps, [x])


__all__ = ["RULES", "register_rule", "reshape_maps", "visit"]
