"""Dependency graph for structured pruning: which channels of which layers must go together.

The model is traced with ``torch.fx`` and its shapes propagated on example inputs. Every layer that
makes new channels (Linear, Conv with groups=1, Embedding) opens a channel *space*; each tensor
carries a per-position map "position -> (space, channel)" along its channel axis. Ops pass maps on:

* activations, dropout, pooling, BatchNorm and depthwise conv keep the map (the last two are
  sliced along with it);
* flatten / view turn channel ``c`` into a block of features (flatten -> Linear);
* ``cat`` along the channel axis concatenates maps (offsets);
* ``add``/``mul``/... of two mapped tensors join their spaces into one group (residuals);
* Linear / Conv inputs are *consumers*: their input columns are sliced by the map.

A space that reaches the model output, an op the graph does not understand, a reshape it cannot
map, or a layer named in ``ignore`` is *blocked*: its group is left whole and reported with the
reason. Removing a channel is then exactly the same as forcing it to zero at every consumer.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from deepshrink.errors import ModelError

# Roles a layer can play in a group: "out" = its output channels (weight rows / Embedding columns),
# "in" = its input channels (weight columns), "along" = per-channel parameters sliced with the
# channels they see (BatchNorm, depthwise conv).
ROLES = ("out", "in", "along")


@dataclasses.dataclass
class Member:
    """One layer's share of a group: positions along the layer's ``role`` dimension and the group
    channel each position belongs to (several positions per channel after a flatten)."""

    module: str
    role: str
    positions: np.ndarray
    channels: np.ndarray


@dataclasses.dataclass
class ChannelGroup:
    """Channels that must be removed together. ``name`` is the first layer producing them."""

    name: str
    size: int
    members: list[Member]
    blocked: str | None = None  # reason the group is left whole, or None when prunable
    kind: str = "channel"  # "channel", or "head" / "ffn" for transformers groups

    @property
    def producers(self) -> list[str]:
        return [m.module for m in self.members if m.role == "out"]

    def layers(self) -> list[str]:
        return sorted({m.module for m in self.members})


@dataclasses.dataclass
class _Map:
    """Channel map of one tensor: along ``axis`` (negative, so broadcasting keeps it), position
    ``i`` belongs to channel ``idx[i]`` of space ``space[i]`` (-1: not prunable)."""

    axis: int
    space: np.ndarray
    idx: np.ndarray

    def spaces(self) -> set[int]:
        return {int(s) for s in np.unique(self.space) if s >= 0}


_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool1d,
    nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, operator.neg, torch.abs, operator.pos,
}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to", "abs",
                 "relu_", "type_as"}
_BINARY_FUNCTIONS: set[Any] = {operator.add, operator.sub, operator.mul, operator.truediv,
                               operator.iadd, operator.imul, torch.add, torch.sub, torch.mul,
                               torch.div, torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
# Ops that only read metadata: using a mapped tensor here constrains nothing.
_META_METHODS = {"size", "dim", "numel"}
_META_FUNCTIONS: set[Any] = {getattr, len}


class _Builder:
    def __init__(self, root: nn.Module, gm: fx.GraphModule, ignore: Callable[[str], bool]) -> None:
        self.root = root
        self.gm = gm
        self.ignore = ignore
        self.modules = dict(root.named_modules())
        self.maps: dict[fx.Node, _Map | None] = {}
        self.space_size: list[int] = []
        self.space_producer: list[str] = []
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.records: list[tuple[str, str, _Map]] = []  # (module, role, map along that dim)
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    # -- spaces and union-find -------------------------------------------------------------
    def new_space(self, size: int, producer: str) -> int:
        self.space_size.append(size)
        self.space_producer.append(producer)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, m: _Map | None, reason: str) -> None:
        if m is not None:
            for s in m.spaces():
                self.blocked.setdefault(s, reason)

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def map_of(self, arg: Any) -> _Map | None:
        return self.maps.get(arg) if isinstance(arg, fx.Node) else None

    def input_maps(self, node: fx.Node) -> list[_Map]:
        found: list[_Map] = []
        fx.node.map_arg((node.args, node.kwargs),
                        lambda n: found.append(self.maps[n]) if self.maps.get(n) is not None else None)
        return found

    def fresh(self, size: int, producer: str, axis: int) -> _Map:
        s = self.new_space(size, producer)
        return _Map(axis, np.full(size, s, dtype=np.int64), np.arange(size, dtype=np.int64))

    def unknown(self, node: fx.Node, what: str) -> None:
        for m in self.input_maps(node):
            self.block(m, f"feeds {what} (node {node.name}), which channel pruning does not understand")
        self.maps[node] = None

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.maps[node] = None
            elif node.op == "output":
                for m in self.input_maps(node):
                    self.block(m, "reaches the model output")
            elif node.op == "call_module":
                self.visit_module(node)
            elif node.op == "call_function":
                self.visit_function(node, node.target)
            elif node.op == "call_method":
                self.visit_method(node, node.target)
            else:  # pragma: no cover - fx has no other node kinds
                self.unknown(node, node.op)

    def visit_module(self, node: fx.Node) -> None:
        name = str(node.target)
        mod = self.modules[name]
        x = self.map_of(node.args[0]) if node.args else None
        if self.calls.get(name, 0) > 1 and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                             nn.BatchNorm1d, nn.BatchNorm2d,
                                                             nn.Embedding)):
            return self.unknown(node, f"layer {name} (called more than once)")
        if isinstance(mod, nn.Linear):
            if len(node.args) != 1 or node.kwargs:
                return self.unknown(node, f"layer {name} with extra arguments")
            self.consume(name, x, -1, f"Linear {name}")
            out = self.fresh(mod.out_features, name, -1)
            self.records.append((name, "out", out))
            self.maps[node] = out
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            axis = -(mod.weight.dim() - 1)  # channel axis of an (N, C, *spatial) input
            if depthwise:  # channel c in -> channel c out: the conv is sliced along its input map
                if x is not None and x.axis != axis:
                    self.block(x, f"depthwise conv {name} applied off the channel axis")
                    x = None
                if x is not None:
                    self.records.append((name, "along", x))
                self.maps[node] = x
                return None
            if mod.groups > 1:
                self.block(x, f"grouped conv {name} (groups={mod.groups}) is not pruned")
                out = self.fresh(mod.out_channels, name, axis)
                self.block(out, f"grouped conv {name} (groups={mod.groups}) is not pruned")
                self.maps[node] = out
                return None
            self.consume(name, x, axis, f"conv {name}")
            out = self.fresh(mod.out_channels, name, axis)
            self.records.append((name, "out", out))
            self.maps[node] = out
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            axis = 1 - len(self.shape(node) or (0, 0))  # dim 1 of (N, C, *)
            if x is not None and x.axis == axis:
                self.records.append((name, "along", x))
                self.maps[node] = x
            else:
                self.unknown(node, f"BatchNorm {name} off the channel axis")
        elif isinstance(mod, nn.Embedding):
            out = self.fresh(mod.embedding_dim, name, -1)
            self.records.append((name, "out", out))
            self.maps[node] = out
        elif isinstance(mod, nn.Flatten):
            self.maps[node] = self.flatten(node, x, mod.start_dim, mod.end_dim)
        elif isinstance(mod, _ACTIVATION_MODULES):
            self.maps[node] = x
        else:
            self.unknown(node, f"layer {name} ({type(mod).__name__})")
        return None

    def consume(self, name: str, x: _Map | None, axis: int, what: str) -> None:
        if x is None:
            return
        if x.axis != axis:
            self.block(x, f"{what} reads a different axis than the channel axis")
            return
        self.records.append((name, "in", x))

    def visit_function(self, node: fx.Node, fn: Any) -> None:
        if fn in _META_FUNCTIONS:
            self.maps[node] = None
        elif fn is operator.getitem and self.shape(node.args[0]) is None:
            self.maps[node] = None  # indexing a size tuple, not a tensor
        elif fn in _PASS_FUNCTIONS:
            self.maps[node] = self.map_of(node.args[0])
        elif fn in _BINARY_FUNCTIONS:
            self.binary(node)
        elif fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.maps[node] = self.flatten(node, self.map_of(node.args[0]), start, end)
        elif fn is torch.reshape:
            self.maps[node] = self.reshape(node)
        elif fn is torch.cat:
            self.cat(node)
        elif fn in (torch.mean, torch.sum, torch.amax):
            self.reduce(node)
        elif fn in (torch.transpose, torch.permute):
            self.maps[node] = self.move_axis(node, fn.__name__)
        else:
            self.unknown(node, f"function {getattr(fn, '__name__', fn)}")

    def visit_method(self, node: fx.Node, method: str) -> None:
        if method in _META_METHODS:
            self.maps[node] = None
        elif method in _PASS_METHODS:
            self.maps[node] = self.map_of(node.args[0])
        elif method in _BINARY_METHODS:
            self.binary(node)
        elif method == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.maps[node] = self.flatten(node, self.map_of(node.args[0]), start, end)
        elif method in ("view", "reshape"):
            self.maps[node] = self.reshape(node)
        elif method in ("mean", "sum", "amax"):
            self.reduce(node)
        elif method in ("transpose", "permute"):
            self.maps[node] = self.move_axis(node, method)
        else:
            self.unknown(node, f"method .{method}()")

    # -- op rules ---------------------------------------------------------------------------
    def binary(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        ma, mb = self.map_of(a), self.map_of(b)
        out_shape = self.shape(node)
        if ma is None and mb is None:
            self.maps[node] = None
            return
        if ma is not None and mb is not None:
            if ma.axis != mb.axis or len(ma.space) != len(mb.space):
                why = f"joins tensors with different channel axes or sizes (node {node.name})"
                self.block(ma, why)
                self.block(mb, why)
                self.maps[node] = None
                return
            aligned = bool(np.all(ma.space >= 0) and np.all(mb.space >= 0) and np.array_equal(ma.idx, mb.idx))
            if not aligned:
                why = f"joins misaligned channel ranges (node {node.name})"
                self.block(ma, why)
                self.block(mb, why)
                self.maps[node] = None
                return
            for sa, sb in zip(ma.space, mb.space, strict=True):
                self.union(int(sa), int(sb))
            self.maps[node] = ma
            return
        m, other = (ma, b) if ma is not None else (mb, a)
        # A plain tensor broadcast along the channel axis would keep its full size there.
        oshape = self.shape(other)
        k = -m.axis
        if oshape is not None and len(oshape) >= k and oshape[-k] != 1:
            self.block(m, f"combined with a fixed-size tensor along the channel axis (node {node.name})")
            self.maps[node] = None
            return
        if out_shape is not None and (len(out_shape) < k or out_shape[-k] != len(m.space)):
            self.block(m, f"broadcast changes the channel axis (node {node.name})")
            self.maps[node] = None
            return
        self.maps[node] = m

    def flatten(self, node: fx.Node, m: _Map | None, start: int, end: int) -> _Map | None:
        shape = self.shape(node.args[0])
        if m is None or shape is None:
            return None
        nd = len(shape)
        start, end = start % nd, end % nd
        axis = nd + m.axis
        if axis > end:
            return m  # counted from the end, the channel axis does not move
        if axis < start:
            return _Map(m.axis + (end - start), m.space, m.idx)
        # Inside the merged run: element j of the merged dim sits at channel coordinate along[j].
        dims = shape[start:end + 1]
        along = np.indices(dims)[axis - start].reshape(-1)
        new_axis = -(nd - end)  # the merged dim counted from the end
        return _Map(new_axis, m.space[along], m.idx[along])

    def reshape(self, node: fx.Node) -> _Map | None:
        m = self.map_of(node.args[0])
        src, dst = self.shape(node.args[0]), self.shape(node)
        if m is None:
            return None
        if src is None or dst is None:
            self.block(m, f"reshape at node {node.name} has unknown shapes")
            return None
        if src == dst:
            return m
        # Accept reshapes that merge one run of dims (a flatten); anything else is blocked.
        for start in range(len(src)):
            for end in range(start + 1, len(src)):
                merged = (*src[:start], int(np.prod(src[start:end + 1])), *src[end + 1:])
                if merged == dst:
                    return self.flatten(node, m, start, end)
        self.block(m, f"reshape {src} -> {dst} at node {node.name} splits or mixes the channel axis")
        return None

    def move_axis(self, node: fx.Node, how: str) -> _Map | None:
        """transpose / permute: the channel axis moves with its dim."""
        m, src = self.map_of(node.args[0]), self.shape(node.args[0])
        if m is None or src is None:
            return None
        nd = len(src)
        axis = nd + m.axis
        rest = list(node.args[1:]) or list(node.kwargs.values())
        if how == "transpose":
            d0, d1 = (int(d) % nd for d in rest[:2])
            new = d1 if axis == d0 else d0 if axis == d1 else axis
        else:
            dims = [int(d) % nd for d in (rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple))
                                          else rest)]
            new = dims.index(axis)
        return _Map(new - nd, m.space, m.idx)

    def cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shapes = [self.shape(t) for t in tensors]
        maps = [self.map_of(t) for t in tensors]
        if any(s is None for s in shapes):
            return self.unknown(node, "cat of unknown shapes")
        nd = len(shapes[0])
        dim_neg = dim - nd if dim >= 0 else dim
        axes = {m.axis for m in maps if m is not None}
        if axes and axes != {dim_neg}:
            return self.unknown(node, "cat along a non-channel axis")
        spaces, idxs = [], []
        for s, m in zip(shapes, maps, strict=True):
            n = s[dim_neg]
            spaces.append(m.space if m is not None else np.full(n, -1))
            idxs.append(m.idx if m is not None else np.zeros(n, dtype=np.int64))
        self.maps[node] = _Map(dim_neg, np.concatenate(spaces), np.concatenate(idxs)) if axes else None
        return None

    def reduce(self, node: fx.Node) -> None:
        m = self.map_of(node.args[0])
        src = self.shape(node.args[0])
        if m is None or src is None:
            self.maps[node] = None
            return
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None:
            self.block(m, f"reduction over all dims at node {node.name}")
            self.maps[node] = None
            return
        nd = len(src)
        dims = [d % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        axis = nd + m.axis
        if axis in dims:
            self.block(m, f"reduction over the channel axis at node {node.name}")
            self.maps[node] = None
            return
        after = sum(1 for d in dims if d > axis)
        self.maps[node] = _Map(m.axis if keep else m.axis + after, m.space, m.idx)

    # -- result -----------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        # Parameters read directly (F.linear(x, self.fc.weight)) or shared between layers (tied
        # weights) would not follow a cut of their layer: such layers are left whole.
        direct = {str(n.target) for n in self.gm.graph.nodes if n.op == "get_attr"}
        owners: dict[int, set[str]] = {}
        for mname, mod in self.modules.items():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(mname)
        for name, _role, m in self.records:
            mod = self.modules[name]
            if self.ignore(name):
                self.block(m, f"layer {name} is in the ignore list")
            elif any(t.startswith(f"{name}.") for t in direct):
                self.block(m, f"parameters of {name} are also used outside the layer")
            elif any(len(owners[id(p)]) > 1 for p in mod.parameters(recurse=False)):
                self.block(m, f"{name} shares (ties) a parameter with another layer")
        roots: dict[int, ChannelGroup] = {}
        for s in range(len(self.parent)):
            r = self.find(s)
            if r not in roots:
                roots[r] = ChannelGroup(self.space_producer[r], self.space_size[r], [])
            if self.space_size[s] != roots[r].size:
                self.blocked.setdefault(s, "joins spaces of different sizes")
            if s in self.blocked and roots[r].blocked is None:
                roots[r].blocked = f"{self.space_producer[s]}: {self.blocked[s]}"
        for name, role, m in self.records:
            root_of = np.array([self.find(int(s)) if s >= 0 else -1 for s in m.space])
            for r in np.unique(root_of):
                if r < 0:
                    continue
                pos = np.nonzero(root_of == r)[0]
                roots[int(r)].members.append(Member(name, role, pos, m.idx[pos]))
        return list(roots.values())


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with errors turned into :class:`ModelError`."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError, ... by op
        raise ModelError(
            f"cannot trace {type(model).__name__} with torch.fx for channel pruning: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="data-dependent control flow (if/for on tensor values) cannot be traced; move it "
                 "out of forward() or prune a traceable submodule; transformers models go through "
                 "deepshrink.pruning.hf",
        ) from exc


def build_groups(model: nn.Module, example_inputs: Any,
                 ignore: Callable[[str], bool] = lambda name: False) -> list[ChannelGroup]:
    """Trace ``model``, propagate shapes on ``example_inputs`` (a tensor or a tuple) and return
    every channel group, prunable or blocked (``group.blocked`` says why)."""
    if example_inputs is None:
        raise ModelError("channel pruning needs example_inputs to trace shapes",
                         hint="pass a batch, e.g. data.test.tensors[0][:2]")
    gm = trace(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()  # shape propagation must not update BatchNorm running statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise ModelError(f"running {type(model).__name__} on the example inputs failed: {exc}") from exc
    finally:
        model.train(was_training)
    builder = _Builder(model, gm, ignore)
    builder.run()
    return builder.groups()


def describe(groups: Iterable[ChannelGroup]) -> list[dict[str, Any]]:
    """A JSON-able summary: one row per group with its layers and (if any) why it is blocked."""
    return [{"group": g.name, "kind": g.kind, "size": g.size, "layers": g.layers(),
             "blocked": g.blocked} for g in groups]
