"""Config base class: dataclasses that validate themselves and round-trip through JSON/YAML.

Every technique takes one of these. The same objects serve the Python API, the CLI, recipes and
reports, so a config must survive ``from_dict(to_dict())`` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from deepshrink.errors import ConfigError

C = TypeVar("C", bound="Config")
T = TypeVar("T")


@dataclasses.dataclass
class Config:
    """Base for config dataclasses. Subclasses override :meth:`validate`."""

    def __post_init__(self) -> None:
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
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_plain(v, hints.get(k)) for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Read a config from a .json or .yaml/.yml file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)


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
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
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
