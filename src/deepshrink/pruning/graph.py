"""Dependency graph for structured pruning, built from what one forward pass computes.

The model runs once on ``example_inputs`` under a :class:`torch.overrides.TorchFunctionMode` that
sees every tensor operation as it executes (``F.linear``, ``torch.cat``, ``Tensor.view``, ``+``,
...) with its real arguments and results. Because the model really runs, Python control flow on
tensor values, ``transformers`` input checks and output dataclasses are no obstacle (``torch.fx``
refused all three); because the operations are seen with their arguments, nothing is matched by
module name. (Torch-Pruning walks the autograd graph instead; the autograd graph hides the
arguments of an op - the ``dim`` of a ``cat``, the target shape of a ``view`` - which this
design reads directly. ``torch.export`` refuses data-dependent control flow.)

The unit of the graph is one *channel*: index ``i`` of dimension ``d`` of a parameter or buffer
is a node. Every tensor the forward pass makes carries, for each of its axes that holds channels,
an array "position -> node". Operations join nodes that must be removed together (union-find):

* ``linear`` / ``conv`` / ``addmm`` / ``matmul`` join the input channels with the weight's input
  dimension; their output carries the weight's output dimension (and the bias joins it);
* elementwise ops with broadcasting (residual ``+``, SE gate ``*``, layer scale ``x * gamma``,
  biases) join the channels they line up;
* norms join their parameters; GroupNorm and grouped convolutions join each whole group into one
  unit; ``view`` that splits a channel axis into (heads, head_dim) joins each head into one unit,
  and a later merge hands the head back to every position it covers;
* ``cat`` / ``split`` / ``chunk`` / ``permute`` / ``getitem`` / reductions move maps around.

What cannot follow a cut is *fixed* with the reason: channels reaching the model output, read by
an op the rules do not know (named in the reason), indexed by token ids (vocabulary), or coming
from the model input. Channels whose removal changes statistics of the others (LayerNorm / RMSNorm
over the channel axis, means over channels) or that form a residual stream are *hidden-size*
channels: prunable only on request (``ChannelConfig(hidden=True)``).

A connected set of nodes is a *unit* (a channel, a head, a conv group); units that share a tensor
dimension form a :class:`ChannelGroup`, the thing a ratio applies to. Removing a unit is exactly
forcing its channels to zero at every consumer, except for hidden-size units.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from deepshrink.errors import ModelError
from deepshrink.modeling import as_inputs, call, eval_mode

# Roles a tensor dimension plays: "out" makes the channels (weight rows of a Linear, filters of a
# conv, embedding columns), "in" reads them (weight columns), "along" is sliced with them (bias,
# norm parameters, running statistics, layer scale).
ROLES = ("out", "in", "along")


@dataclasses.dataclass
class Member:
    """One tensor dimension's share of a group: positions along ``dim`` of tensor ``tensor`` (a
    qualified parameter / buffer name) and the unit (0 .. group.size-1) each position belongs to."""

    tensor: str
    dim: int
    role: str
    positions: np.ndarray
    units: np.ndarray

    @property
    def module(self) -> str:
        return self.tensor.rpartition(".")[0]


@dataclasses.dataclass
class ChannelGroup:
    """Units that share tensor dimensions; a ratio removes that share of its free units.

    ``kind`` is ``channel``, ``head`` (units are attention heads) or ``hidden`` (hidden size /
    residual stream). ``fixed[u]`` says unit ``u`` must stay (``notes`` say why); ``blocked`` is
    set when the whole group is left alone.
    """

    name: str
    size: int
    members: list[Member]
    kind: str = "channel"
    fixed: np.ndarray | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    blocked: str | None = None
    hidden_reason: str | None = None

    @property
    def producers(self) -> list[str]:
        return sorted({m.module for m in self.members if m.role == "out"})

    def layers(self) -> list[str]:
        return sorted({m.module for m in self.members})

    @property
    def free(self) -> int:
        return self.size - int(self.fixed.sum()) if self.fixed is not None else self.size


@dataclasses.dataclass
class Consumer:
    """A module whose first input carries channels along ``axis``: where data criteria measure."""

    module: str
    axis: int
    nodes: np.ndarray


@dataclasses.dataclass
class SizeUse:
    """An integer literal equal to a channel count, passed by ``module`` to a shape op (e.g.
    ``view(b, s, self.all_head_size)``): after the cut, module attributes holding it are updated."""

    modules: tuple[str, ...]
    nodes: np.ndarray
    heads: bool = False  # the literal counts heads (a channel axis split into heads)


@dataclasses.dataclass
class Graph:
    """Everything the trace found: the groups plus what surgery and scoring need."""

    groups: list[ChannelGroup]
    consumers: list[Consumer]
    size_uses: list[SizeUse]
    unit_of: Callable[[np.ndarray], np.ndarray]  # node ids -> (group index, unit) pairs
    tensor_names: dict[str, list[str]]  # canonical name -> every alias (tied weights)
    output_shape: Any = None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


@dataclasses.dataclass
class _Space:
    names: list[str]
    dim: int
    size: int
    base: int
    roles: set[str] = dataclasses.field(default_factory=set)


class Builder:
    """State of one trace: nodes, per-tensor channel maps and the marks the rules leave."""

    def __init__(self, model: nn.Module) -> None:
        self.uf = _UnionFind()
        self.spaces: list[_Space] = []
        self.space_of: dict[tuple[int, int], int] = {}  # (id(tensor), dim) -> space index
        self.owned: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for name, t in [*model.named_parameters(remove_duplicate=False),
                        *model.named_buffers(remove_duplicate=False)]:
            if t is not None:
                self.owned.setdefault(id(t), (t, []))[1].append(name)
        self.maps: dict[int, dict[int, np.ndarray]] = {}
        self.alive: list[Any] = []  # keeps traced tensors alive so their ids stay unique
        self.input_ids: set[int] = set()
        self.dependent: set[int] = set()  # ids of tensors computed from the model input
        self.fixed: dict[int, str] = {}  # node -> reason (fixed nodes are extra nodes)
        self.hidden: dict[int, str] = {}
        self.heads: set[int] = set()
        self.consumers: list[Consumer] = []
        self.size_uses: list[SizeUse] = []
        self.stack: list[str] = [""]
        self.root = type(model).__name__

    # -- nodes ------------------------------------------------------------------------------
    def fix(self, nodes: Iterable[int] | np.ndarray, reason: str) -> None:
        nodes = np.asarray(list(nodes) if not isinstance(nodes, np.ndarray) else nodes).reshape(-1)
        if nodes.size == 0:
            return
        f = self.uf.add(1)
        self.fixed[f] = reason
        for n in np.unique(nodes):
            self.uf.union(f, int(n))

    def fix_all(self, tensors: Iterable[Any], reason: str) -> None:
        for t in tensors:
            for nodes in self.maps_of(t).values():
                self.fix(nodes, reason)

    def join(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Union ``a[i]`` with ``b[i]``; True when something new was joined."""
        new = False
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            new |= self.uf.union(x, y)
        return new

    def mark_hidden(self, nodes: np.ndarray, reason: str) -> None:
        if nodes.size:
            self.hidden.setdefault(int(nodes[0]), reason)

    def merge_units(self, nodes: np.ndarray, head: bool = False) -> None:
        """Make ``nodes`` one unit (a head, a conv group)."""
        first = int(nodes[0])
        for n in nodes[1:].tolist():
            self.uf.union(first, n)
        if head:
            self.heads.add(first)

    # -- tensors ----------------------------------------------------------------------------
    def leave(self) -> None:
        self.stack.pop()

    def where(self) -> str:
        return self.stack[-1] or self.root

    def is_owned(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.owned

    def space(self, t: torch.Tensor, dim: int) -> _Space:
        key = (id(t), dim % t.dim())
        if key not in self.space_of:
            size = int(t.shape[key[1]])
            self.space_of[key] = len(self.spaces)
            self.spaces.append(_Space(self.owned[id(t)][1], key[1], size, self.uf.add(size), {"along"}))
        return self.spaces[self.space_of[key]]

    def role(self, t: Any, dim: int, role: str) -> None:
        if self.is_owned(t):
            self.space(t, dim).roles.add(role)

    def maps_of(self, t: Any) -> dict[int, np.ndarray]:
        """Channel maps of ``t`` by negative axis (empty for tensors holding no channels)."""
        if not isinstance(t, torch.Tensor):
            return {}
        if id(t) in self.maps:
            return self.maps[id(t)]
        if id(t) in self.owned and t.dim() > 0:
            out = {}
            for d in range(t.dim()):
                s = self.space(t, d)
                out[d - t.dim()] = np.arange(s.base, s.base + s.size, dtype=np.int64)
            return out
        return {}

    def set_maps(self, out: Any, maps: dict[int, np.ndarray], inputs: Iterable[Any]) -> None:
        if not isinstance(out, torch.Tensor):
            return
        self.alive.append(out)
        if id(out) in self.owned:
            return  # an in-place op on a parameter: its own dims stay its maps
        clean = {k: v for k, v in maps.items() if -out.dim() <= k < 0 and out.shape[k] == len(v)}
        self.maps[id(out)] = clean
        if any(id(t) in self.dependent for t in inputs if isinstance(t, torch.Tensor)):
            self.dependent.add(id(out))

    def protect_output(self, output: Any) -> None:
        for t in top_level_tensors(output):
            self.fix_all([t], "reaches the model output")

    # -- assembly ---------------------------------------------------------------------------
    def graph(self) -> Graph:
        uf = self.uf
        unit_fixed: dict[int, list[str]] = {}
        for n, why in self.fixed.items():
            unit_fixed.setdefault(uf.find(n), []).append(why)
        unit_hidden = {uf.find(n): why for n, why in self.hidden.items()}
        unit_head = {uf.find(n) for n in self.heads}
        # Spaces sharing a unit belong to one group.
        sp = _UnionFind()
        sp.add(len(self.spaces))
        first_space: dict[int, int] = {}
        roots_per_space = []
        for i, s in enumerate(self.spaces):
            roots = np.array([uf.find(n) for n in range(s.base, s.base + s.size)], dtype=np.int64)
            roots_per_space.append(roots)
            for r in np.unique(roots).tolist():
                if r in first_space:
                    sp.union(first_space[r], i)
                else:
                    first_space[r] = i
        # A dimension joined to nothing (a conv kernel's height, a dead output) is no target.
        shared = {r for r, n in Counter(r for roots in roots_per_space for r in np.unique(roots).tolist()
                                        ).items() if n > 1} | set(unit_fixed)
        by_group: dict[int, list[int]] = {}
        for i, roots in enumerate(roots_per_space):
            if shared.intersection(roots.tolist()):
                by_group.setdefault(sp.find(i), []).append(i)
        groups: list[ChannelGroup] = []
        unit_index: dict[int, tuple[int, int]] = {}
        for members in by_group.values():
            g = self._group(members, roots_per_space, unit_fixed, unit_hidden, unit_head)
            for u, r in enumerate(g.pop("roots")):
                unit_index[r] = (len(groups), u)
            groups.append(g["group"])

        def unit_of(nodes: np.ndarray) -> np.ndarray:
            return np.array([unit_index.get(uf.find(int(n)), (-1, -1)) for n in nodes],
                            dtype=np.int64).reshape(-1, 2)

        names = {s.names[0]: s.names for s in self.spaces}
        return Graph(groups, self.consumers, self.size_uses, unit_of, names)

    def _group(self, members: list[int], roots_per_space: list[np.ndarray],
               unit_fixed: dict[int, list[str]], unit_hidden: dict[int, str],
               unit_head: set[int]) -> dict[str, Any]:
        roots = sorted({r for i in members for r in roots_per_space[i].tolist()})
        index = {r: u for u, r in enumerate(roots)}
        out_members = []
        for i in members:
            s = self.spaces[i]
            role = "out" if "out" in s.roles else "in" if "in" in s.roles else "along"
            units = np.array([index[r] for r in roots_per_space[i].tolist()], dtype=np.int64)
            out_members.append(Member(s.names[0], s.dim, role, np.arange(s.size, dtype=np.int64), units))
        fixed = np.array([r in unit_fixed for r in roots], dtype=bool)
        notes = sorted({why for r in roots for why in unit_fixed.get(r, [])})
        hidden = next((unit_hidden[r] for r in roots if r in unit_hidden), None)
        kind = "hidden" if hidden else "head" if any(r in unit_head for r in roots) else "channel"
        producers = [m for m in out_members if m.role == "out"]
        first = (producers or out_members)[0]
        name = first.module or first.tensor
        if not producers:  # no layer makes these channels here: name the side that reads them
            name = f"{name} (input)" if first.role == "in" else first.tensor
        g = ChannelGroup(name, len(roots), out_members, kind, fixed, notes, hidden_reason=hidden)
        if fixed.all():
            g.blocked = "; ".join(notes[:3]) or "fixed"
        return {"group": g, "roots": roots}


def top_level_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors a caller reads from a model output: a tensor, the tensors of a tuple, or the
    tensor fields of a dict / ``ModelOutput`` (nested caches and per-layer tuples are not)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict) or hasattr(output, "values"):
        return [v for v in output.values() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        return [v for v in output if isinstance(v, torch.Tensor)]
    return []


class _Tracer(torch.overrides.TorchFunctionMode):
    def __init__(self, builder: Builder, visit: Callable[..., None]) -> None:
        super().__init__()
        self.b = builder
        self.visit = visit

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self.visit(self.b, func, args, kwargs, out)
        except Exception as exc:  # a rule that cannot read this call: fix what it touches
            name = getattr(func, "__name__", repr(func))
            self.b.fix_all(tensor_args(args, kwargs), f"{name} in {self.b.where()} could not be "
                                                        f"analysed ({type(exc).__name__}: {exc})")
        return out


def tensor_args(args: Any, kwargs: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(args)
    walk(kwargs)
    return found


def trace_graph(model: nn.Module, example_inputs: Any) -> Graph:
    """Run ``model`` once on ``example_inputs`` (tensor, tuple or dict) and build its graph."""
    from deepshrink.pruning.rules import visit

    if example_inputs is None:
        raise ModelError("channel pruning needs example_inputs to trace the model",
                         hint="pass a batch, e.g. data.test.tensors[0][:2] or tokenizer(...)")
    inputs = as_inputs(example_inputs)
    b = Builder(model)
    for t in tensor_args(inputs, {}):
        b.input_ids.add(id(t))
        b.dependent.add(id(t))
    hooks = []
    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: b.stack.append(n)))
        hooks.append(mod.register_forward_hook(lambda m, a, o: b.leave(), always_call=True))
    try:
        # Grad on keeps nn.MultiheadAttention / TransformerEncoderLayer off their fused fast path.
        with eval_mode(model), torch.enable_grad(), _Tracer(b, visit):
            out = call(model, inputs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"running {type(model).__name__} on the example inputs failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for h in hooks:
            h.remove()
    b.protect_output(out)
    g = b.graph()
    g.output_shape = _shapes(out)
    return g


def _shapes(output: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in top_level_tensors(output)]


def describe(groups: Iterable[ChannelGroup]) -> list[dict[str, Any]]:
    """A JSON-able summary: one row per group with its layers and (if any) why it is blocked."""
    return [{"group": g.name, "kind": g.kind, "size": g.size, "fixed": int(g.size - g.free),
             "layers": g.layers(), "blocked": g.blocked, "hidden": g.hidden_reason,
             "notes": g.notes[:3]} for g in groups]


__all__ = ["ROLES", "ChannelGroup", "Consumer", "Graph", "Member", "SizeUse", "describe",
           "trace_graph"]
