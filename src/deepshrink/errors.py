"""Exception types. Every error deepshrink raises on bad input is one of these, with a message
that names the offending thing (a layer, a config key, a file and offset) and, where useful, a hint.
"""

from __future__ import annotations


class DeepShrinkError(Exception):
    """Base class: the CLI prints these as one readable line plus the hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (hint: {self.hint})" if self.hint else base


class ConfigError(DeepShrinkError, ValueError):
    """A config field has a bad value or an unknown key."""


class DataError(DeepShrinkError):
    """A dataset is missing, truncated or malformed."""


class FormatError(DeepShrinkError):
    """A model file is corrupt, truncated, hostile or of an unknown format."""


class ModelError(DeepShrinkError):
    """A model cannot be built, traced or edited as asked."""


class DeepShrinkWarning(UserWarning):
    """A result or config that works but is probably not what the user meant (a pattern that
    matches no layer, a model that got slower). Filter with ``warnings.simplefilter``."""


class OutputError(DeepShrinkError, OSError):
    """An output cannot be written (no such directory, disk full, would replace an input).
    Also an OSError, so callers that guard file writes with ``except OSError`` still catch it."""
