"""What a model file remembers about its data, so later commands need no ``--data`` and a model
is never silently fed inputs of another shape.

``train`` (and every command that writes a model) stores ``data_record(bundle)`` in the file's
metadata under ``"data"``; commands read it back with :func:`DataRecord.from_dict` and check a
dataset against it with :meth:`DataRecord.check`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deepshrink.data.datasets import DataBundle
from deepshrink.errors import DataError, FormatError

#: How images are scaled before they reach the model: the loaders' own.
PREPROCESSING = "scale-0-1"
#: Text tokenized by the (local) tokenizer folder the record names, padded to the input shape.
TOKENS = "tokens"


@dataclasses.dataclass(frozen=True)
class DataRecord:
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    preprocessing: str = PREPROCESSING
    tokenizer: str | None = None  # text: the tokenizer folder

    def to_dict(self) -> dict[str, Any]:
        d = {"dataset": self.dataset, "input_shape": list(self.input_shape),
             "num_classes": self.num_classes, "preprocessing": self.preprocessing}
        return d if self.tokenizer is None else {**d, "tokenizer": self.tokenizer}

    @classmethod
    def from_dict(cls, d: Any) -> DataRecord:
        """Parse the record of an untrusted file: every field type-checked and bounded."""
        if not isinstance(d, dict):
            raise FormatError(f"the file's data record is {type(d).__name__}, not a mapping")
        shape, n, name = d.get("input_shape"), d.get("num_classes"), d.get("dataset")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 8
                and all(isinstance(s, int) and 0 < s <= 1 << 20 for s in shape)):
            raise FormatError(f"the file's data record has a bad input_shape: {shape!r}")
        if not (isinstance(n, int) and 1 <= n <= 1 << 24):
            raise FormatError(f"the file's data record has a bad num_classes: {n!r}")
        if not (isinstance(name, str) and 0 < len(name) <= 4096):
            raise FormatError("the file's data record has no dataset name")
        pre, tok = d.get("preprocessing", PREPROCESSING), d.get("tokenizer")
        if pre not in (PREPROCESSING, TOKENS):
            raise FormatError(f"the file's data record names unknown preprocessing {pre!r:.60}")
        if (pre == TOKENS) != (isinstance(tok, str) and 0 < len(tok) <= 4096):
            raise FormatError("the file's data record must name a tokenizer folder exactly for text")
        return cls(name, tuple(shape), n, pre, tok)

    def check(self, bundle: DataBundle, where: str = "the model") -> None:
        """A clear error when ``bundle`` is not what the model was trained on (input shape or
        number of classes), naming both."""
        if tuple(bundle.input_shape) != self.input_shape:
            raise DataError(
                f"{bundle.name} has inputs of shape {tuple(bundle.input_shape)} but {where} was "
                f"trained on {self.dataset} with inputs of shape {self.input_shape}",
                hint=f"use --data {self.dataset}, or a dataset of the same input shape")
        if bundle.num_classes > self.num_classes:
            raise DataError(f"{bundle.name} has {bundle.num_classes} classes but {where} predicts "
                            f"{self.num_classes} ({self.dataset})")


def data_record(bundle: DataBundle, tokenizer: str | None = None) -> DataRecord:
    """The record of ``bundle``; ``tokenizer`` (the folder) for text data."""
    return DataRecord(bundle.name, tuple(int(s) for s in bundle.input_shape), bundle.num_classes,
                      TOKENS if tokenizer else PREPROCESSING, tokenizer)
