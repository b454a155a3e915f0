"""Config base class: dataclasses that validate themselves and round-trip through JSON/YAML.

Every technique takes one of these. The same objects serve the Python API, the CLI, recipes and
reports, so a config must survive ``from_dict(to_dict())`` unchanged.

Before a subclass's :meth:`Config.validate` runs, every field is checked against its type hint
(an ``int`` field rejects 1.5 and "abc", a ``float`` field rejects non-finite numbers, a nested
config must be that config), so ``validate`` only states ranges and relations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from deepshrink.errors import ConfigError, DeepShrinkWarning

C = TypeVar("C", bound="Config")
T = TypeVar("T")


@dataclasses.dataclass
class Config:
    """Base for config dataclasses. Subclasses override :meth:`validate`."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in hints:
                _check_type(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field when a value is out of range."""

    def override(self: C, **values: Any) -> C:
        """A validated copy with the given fields replaced; ``None`` values are ignored, so CLI
        options that were not given leave the config's value alone."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ConfigError(f"config type {kind!r} given where {cls.__name__} was expected")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown config key(s) {unknown}",
                hint=f"valid keys: {sorted(names)}",
            )
        hints = _hints(cls)
        kwargs = {k: _from_plain(v, hints.get(k)) for k, v in data.items()}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing required key(s) {missing}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"{cls.__name__}: not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Read a config from a .json or .yaml/.yml file (any problem is a ConfigError)."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
        data = _parse_text(text, path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.args[0]}", hint=exc.hint) from None


def _parse_text(text: str, path: Path) -> Any:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc)[:300]}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}",
                          hint="YAML files must end in .yaml or .yml") from None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_ok(value: Any, hint: Any) -> bool:
    """Shallow check of ``value`` against a field's type hint (unknown hints pass)."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    container = {tuple: (tuple, list), list: (list, tuple), dict: (dict,)}.get(origin or hint)
    if container is not None:
        return isinstance(value, container)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _check_type(value: Any, hint: Any, where: str) -> None:
    if not _type_ok(value, hint):
        finite = " (finite)" if isinstance(value, float) and not math.isfinite(value) else ""
        raise ConfigError(f"{where}: must be {_hint_name(hint)}{finite}, got {value!r:.60}")


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return value


def _from_plain(value: Any, hint: Any) -> Any:
    """Convert JSON values back to the declared field type (tuples, nested configs)."""
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nested = [a for a in args if isinstance(a, type) and issubclass(a, Config)]
        if nested and isinstance(value, dict):
            # An optional nested config: its own errors must surface, not be swallowed.
            kind = value.get("type")
            match = [a for a in nested if a.__name__ == kind] or nested[:1]
            return match[0].from_dict(value)
        for arg in args:
            try:
                return _from_plain(value, arg)
            except (TypeError, ConfigError):
                continue
        return value
    if isinstance(hint, type) and issubclass(hint, Config) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin is dict and isinstance(value, dict):
        args = typing.get_args(hint)
        if len(args) == 2:
            return {k: _from_plain(v, args[1]) for k, v in value.items()}
    return value


def check(condition: bool, cls_name: str, field: str, message: str) -> None:
    """Raise a ConfigError of the form ``ChannelConfig.ratio: must be in [0, 1), got 1.5``."""
    if not condition:
        raise ConfigError(f"{cls_name}.{field}: {message}")


# -- the layer-selection vocabulary shared by every config ------------------------------------
# ``ignore``: module names (regular expressions, full match) a technique leaves alone.
# ``overrides``: module-name regex -> the value to use for those modules instead of the default.
def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True when module ``name`` equals or fully matches (as a regex) one of ``patterns``."""
    return any(name == p or re.fullmatch(p, name) for p in patterns)


def override_for(name: str, overrides: Mapping[str, T], default: T) -> T:
    """The value of the first pattern in ``overrides`` that matches ``name``, else ``default``."""
    for pattern, value in overrides.items():
        if name_matches(name, (pattern,)):
            return value
    return default


def check_patterns(cls_name: str, field: str, patterns: Iterable[str]) -> None:
    """ConfigError naming the field when a pattern is not a string or not a valid regex."""
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"{cls_name}.{field}: module-name patterns are strings, got {p!r}")
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"{cls_name}.{field}: {p!r} is not a valid regular expression ({e})") from None


def unmatched_patterns(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The patterns that match none of ``names`` (a typo in ``ignore`` or ``overrides``)."""
    names = list(names)
    return [p for p in patterns if not any(name_matches(n, (p,)) for n in names)]


def warn_unmatched(cls_name: str, names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Warn (DeepShrinkWarning) about patterns that match none of ``names``; returns them.

    A warning rather than an error, because one recipe is often applied to several models and a
    pattern may legitimately name a layer only some of them have."""
    typos = unmatched_patterns(names, patterns)
    if typos:
        warnings.warn(f"{cls_name}: pattern(s) {typos} match no layer (typo?)", DeepShrinkWarning,
                      stacklevel=3)
    return typos
