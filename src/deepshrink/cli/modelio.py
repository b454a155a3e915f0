"""Models and their data on the command line: loading with the session's trust (``--import``),
the data record a file carries (dataset, input shape, classes), and the arguments the CLI passes
to a model factory.

A model file remembers what it was trained on (:class:`deepshrink.data.DataRecord`, stored under
``extra["data"]`` of a checkpoint or ``.dsz``, and in an ``.onnx`` file's metadata), so later
commands need no ``--data``; ``--data`` overrides it, and a dataset of another input shape is an
error naming both shapes.

The factory signature: ``--model NAME`` or ``--model module:callable`` is called with keyword
arguments. The CLI offers ``in_size`` (image side), ``in_channels`` and ``num_classes`` from the
data, each passed only if the factory has a parameter of that name (or ``**kwargs``); anything
else comes from ``--model-arg NAME=VALUE`` (repeatable; VALUE is read as JSON, else as a string).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.cli.options import SESSION
from deepshrink.data import DataBundle, DataRecord, data_record, load_dataset
from deepshrink.errors import ConfigError, DataError, DeepShrinkError

DEFAULT_DATA = "digits"
ONNX_META_KEY = "deepshrink.data"
_SOURCES: dict[int, str] = {}  # id(bundle) -> the name it was loaded by (a directory's path)
_TOKENIZERS: dict[int, str] = {}  # id(bundle) -> its tokenizer folder (text data)


def load_model(path: Path, model: nn.Module | None = None) -> nn.Module:
    """:func:`deepshrink.load` trusting the modules named by ``--import``; a bare state_dict file's
    weights go into the ``--arch`` model (built with its ``--arch-arg``s)."""
    from deepshrink.checkpoint import load
    from deepshrink.models import create_model

    if model is None and SESSION.arch is not None:
        model = create_model(SESSION.arch, **parse_model_args(list(SESSION.arch_args)))
    return load(path, model=model, trust=SESSION.trust)


def _file_extra(path: Path) -> dict[str, Any]:
    """The free metadata (``extra``) of a checkpoint, ``.dsz`` or ``.onnx`` file ({} if none)."""
    from deepshrink.checkpoint import read_metadata
    from deepshrink.dsz import dsz_info, is_dsz

    if not path.is_file():
        return {}
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return read_metadata(path).get("extra") or {}
    if is_dsz(head[:8]):
        return dsz_info(path).get("extra") or {}
    if path.suffix.lower() == ".onnx":
        return _onnx_extra(path)
    return {}


def _onnx_extra(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == ONNX_META_KEY:
            try:
                return {"data": json.loads(prop.value)}
            except json.JSONDecodeError:
                return {}
    return {}


def recorded_data(path: Path) -> DataRecord | None:
    """The data record ``path`` carries (None for files written before records existed)."""
    extra = _file_extra(path)
    if "data" in extra:
        return DataRecord.from_dict(extra["data"])
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _tokenizer_dir(path: Path | None, rec: DataRecord | None) -> str:
    """``--tokenizer``, else the one the record names, else the model folder's own."""
    if SESSION.tokenizer:
        return SESSION.tokenizer
    if rec is not None and rec.tokenizer:
        return rec.tokenizer
    if path is not None and path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        return str(path.resolve())
    raise DataError("text data needs a tokenizer", hint="pass --tokenizer DIR (a folder written by "
                    "tokenizer.save_pretrained; nothing is downloaded)")


def dataset(name: str, data_dir: Path | None = None, *, path: Path | None = None,
            rec: DataRecord | None = None) -> DataBundle:
    """An image dataset by name / IDX folder, or text (a file of lines or a folder, tokenized
    with the tokenizer of :func:`_tokenizer_dir` to the recorded length, else 32 tokens)."""
    from deepshrink.data import is_text_source, load_text

    if is_text_source(name):
        tok = _tokenizer_dir(path, rec)
        length = rec.input_shape[0] if rec is not None and rec.tokenizer else 32
        bundle = load_text(name, tok, length)
        _TOKENIZERS[id(bundle)] = str(Path(tok).resolve())
    else:
        bundle = load_dataset(name, data_dir)
    _SOURCES[id(bundle)] = name
    return bundle


def model_data(path: Path, data: str | None, data_dir: Path | None = None) -> DataBundle:
    """The dataset for the model in ``path``: ``--data`` if given (checked against the file's
    record), else the one the file records, else digits."""
    rec = recorded_data(path)
    name = data or (rec.dataset if rec else DEFAULT_DATA)
    try:
        bundle = dataset(name, data_dir, path=path, rec=rec)
    except DataError as exc:
        if data or rec is None:
            raise
        raise DataError(f"{path.name} was trained on {rec.dataset!r} (inputs of shape "
                        f"{rec.input_shape}), which cannot be loaded here: {exc.args[0]}",
                        hint="pass --data with that dataset (or one of the same input shape)") from None
    if rec is not None:
        rec.check(bundle, path.name)
    return bundle


def input_shape(path: Path, option: str | None) -> tuple[int, ...]:
    """``--input-shape`` if given, else the file's recorded input shape, else 1,28,28."""
    from deepshrink.cli.common import parse_shape

    if option:
        return parse_shape(option, "--input-shape")
    rec = recorded_data(path)
    return rec.input_shape if rec else (1, 28, 28)


def example_input(path: Path, option: str | None) -> torch.Tensor:
    """One example batch for counting and timing: token ids (zeros) for text models."""
    shape = input_shape(path, option)
    rec = recorded_data(path)
    if rec is not None and rec.tokenizer:
        return torch.zeros(1, *shape, dtype=torch.int64)
    return torch.rand(1, *shape)


def data_extra(bundle: DataBundle, source: str | None = None) -> dict[str, Any]:
    """The ``extra`` metadata every written model carries: its data record. ``source`` is the
    ``--data`` value it came from: a directory is recorded by its absolute path, so that later
    commands find it again."""
    rec = data_record(bundle, _TOKENIZERS.get(id(bundle)))
    source = source or _SOURCES.get(id(bundle))
    if source is not None and Path(source).exists():
        rec = dataclasses.replace(rec, dataset=str(Path(source).resolve()))
    return {"data": rec.to_dict(), "dataset": bundle.name}


def parse_model_args(items: list[str], json_text: str | None = None) -> dict[str, Any]:
    """``--model-arg k=v`` (repeatable; v as JSON, else a string) over ``--model-args JSON``."""
    from deepshrink.cli.common import json_object

    kwargs = json_object(json_text, "--model-args")
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-arg expects NAME=VALUE, got {item!r}")
        try:
            kwargs[key] = json.loads(val)
        except json.JSONDecodeError:
            kwargs[key] = val
    return kwargs


def _factory(name: str) -> Any:
    from deepshrink.models.registry import import_callable, registry_entry

    entry = registry_entry(name)
    if entry is not None:
        return entry.factory
    if ":" in name:
        return import_callable(name)
    return None  # create_model reports the unknown name with its hint


def factory_kwargs(name: str, bundle: DataBundle, given: dict[str, Any]) -> dict[str, Any]:
    """What the CLI passes to model factory ``name``: the data's sizes that its signature takes,
    then the user's ``--model-arg``s."""
    offered = {"in_size": bundle.in_size, "in_channels": int(bundle.input_shape[0]),
               "num_classes": bundle.num_classes}
    fn = _factory(name)
    try:
        params = inspect.signature(fn).parameters if fn is not None else {}
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    return {**kwargs, **given}


def check_inputs(model: Any, example: torch.Tensor, what: str, path: Path | None = None) -> None:
    """Run ``model`` on one example so that a size mismatch is a clear error naming the shape
    the model was trained on (when the file records it), not a torch trace."""
    try:
        with torch.no_grad():
            model.eval()(example)
    except DeepShrinkError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        rec = recorded_data(path) if path is not None else None
        trained = f" (it was trained on {rec.dataset}, inputs {rec.input_shape})" if rec else ""
        raise DataError(f"the model cannot take {what} of shape {tuple(example.shape[1:])}{trained}: "
                        f"{str(exc).splitlines()[0][:200]}",
                        hint="use data of the shape the model was trained on (--data / --input-shape)"
                        ) from None


def onnx_with_record(data: bytes, bundle: DataBundle) -> bytes:
    """The serialized ONNX model ``data`` with the data record in its metadata."""
    import onnx

    model = onnx.load_from_string(data)
    del model.metadata_props[:]  # keep one record, ours
    prop = model.metadata_props.add()
    prop.key, prop.value = ONNX_META_KEY, json.dumps(data_extra(bundle)["data"])
    return model.SerializeToString()
