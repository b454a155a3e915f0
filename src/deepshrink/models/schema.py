"""Small schema checkers for JSON read from files (specs, edits, manifests).

A schema is a function ``check(value, where) -> value`` that returns the (possibly normalised)
value or raises :class:`FormatError` naming ``where`` (the field path, e.g.
``spec.edits[0].layers['fc1'].shape``). They compose::

    LAYER = Obj({"op": Str(choices=("linear", "conv2d")), "shape": List(Int(0, 1 << 31), max_len=8)},
                optional={"bias": Bool()})
    LAYER({"op": "linear", "shape": [4, 3]}, "edit.layers['fc1']")

Objects reject unknown keys, so a file cannot smuggle in fields that a replayer would pass on
(e.g. attribute names to ``setattr``). Every container has a length limit, every number a range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from deepshrink.errors import FormatError

Schema = Callable[[Any, str], Any]

MAX_INT = 1 << 40
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,256}")  # module paths like "encoder.layer.0.attention"


def _fail(where: str, message: str, value: Any) -> FormatError:
    return FormatError(f"{where}: {message}, got {value!r:.80}")


def Int(lo: int = -MAX_INT, hi: int = MAX_INT) -> Schema:
    def check(value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise _fail(where, f"must be an integer in [{lo}, {hi}]", value)
        return value
    return check


def Float(lo: float = -math.inf, hi: float = math.inf) -> Schema:
    def check(value: Any, where: str) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise _fail(where, f"must be a finite number in [{lo}, {hi}]", value)
        return value
    return check


def Bool() -> Schema:
    def check(value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise _fail(where, "must be true or false", value)
        return value
    return check


def Str(choices: tuple[str, ...] | None = None, pattern: re.Pattern[str] | None = None,
        max_len: int = 256) -> Schema:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise _fail(where, f"must be a string of at most {max_len} characters", value)
        if choices is not None and value not in choices:
            raise _fail(where, f"must be one of {list(choices)}", value)
        if pattern is not None and not pattern.fullmatch(value):
            raise _fail(where, f"must match {pattern.pattern}", value)
        return value
    return check


def Opt(inner: Schema) -> Schema:
    """``inner`` or null."""
    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)
    return check


def List(item: Schema, max_len: int = 1 << 16, min_len: int = 0) -> Schema:
    def check(value: Any, where: str) -> list[Any]:
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise _fail(where, f"must be a list of {min_len} to {max_len} items", value)
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


def Map(value_schema: Schema, key: Schema | None = None, max_len: int = 1 << 16) -> Schema:
    """A JSON object with arbitrary (checked) keys, all values of one schema."""
    key_schema = key or Str(pattern=NAME_RE)

    def check(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) > max_len:
            raise _fail(where, f"must be an object of at most {max_len} entries", value)
        return {key_schema(k, f"{where} key"): value_schema(v, f"{where}[{k!r:.60}]")
                for k, v in value.items()}
    return check


def Obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """A JSON object with exactly these keys (``optional`` ones may be missing); others rejected."""
    opt = optional or {}

    def check(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _fail(where, "must be an object", value)
        unknown = sorted(set(value) - set(required) - set(opt), key=str)
        if unknown:
            raise FormatError(f"{where}: unknown field(s) {unknown[:5]!r:.120} "
                              f"(allowed: {sorted({*required, *opt})})")
        out = {}
        for k, s in required.items():
            if k not in value:
                raise FormatError(f"{where}: missing field {k!r}")
            out[k] = s(value[k], f"{where}.{k}")
        for k, s in opt.items():
            if k in value:
                out[k] = s(value[k], f"{where}.{k}")
        return out
    return check


def OneOf(*schemas: Schema) -> Schema:
    """The first schema that accepts the value."""
    def check(value: Any, where: str) -> Any:
        errors = []
        for s in schemas:
            try:
                return s(value, where)
            except FormatError as exc:
                errors.append(str(exc))
        raise FormatError(errors[0] if len(errors) == 1 else f"{where}: none of the allowed forms "
                          f"matches ({'; '.join(e.split(': ', 1)[-1] for e in errors)[:300]})")
    return check


def Json(max_depth: int = 4, max_items: int = 4096, max_int: int = MAX_INT) -> Schema:
    """Plain JSON data (no non-finite numbers), bounded in depth, size and integer magnitude."""
    def check(value: Any, where: str, depth: int = 0) -> Any:
        if depth > max_depth:
            raise FormatError(f"{where}: nested deeper than {max_depth} levels")
        if value is None or isinstance(value, (bool, str)):
            if isinstance(value, str) and len(value) > 1 << 16:
                raise FormatError(f"{where}: string longer than {1 << 16} characters")
            return value
        if isinstance(value, int):
            return Int(-max_int, max_int)(value, where)
        if isinstance(value, float):
            return Float()(value, where)
        if isinstance(value, list) and len(value) <= max_items:
            return [check(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict) and len(value) <= max_items:
            return {Str()(k, f"{where} key"): check(v, f"{where}.{k}", depth + 1)
                    for k, v in value.items()}
        raise _fail(where, f"must be JSON data (containers of at most {max_items} items)", value)
    return check


# Keyword arguments of a recorded Conv layer (shared by the edits that rebuild conv layers).
_CONV_DIMS = OneOf(Int(0, 1 << 16), List(Int(0, 1 << 16), min_len=1, max_len=3))
CONV_ARGS = Obj({}, optional={"stride": _CONV_DIMS, "dilation": _CONV_DIMS,
                              "padding": OneOf(_CONV_DIMS, Str(choices=("same", "valid"))),
                              "groups": Int(1, 1 << 16)})
