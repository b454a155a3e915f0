"""Text classification data for `transformers` models, tokenized by a local tokenizer folder
(``save_pretrained`` form; nothing is downloaded).

A source is a file of lines, ``LABEL<TAB>TEXT`` (``.tsv`` / ``.txt``) or JSON lines with ``text``
and ``label`` (``.jsonl``), split deterministically 60/20/20; or a ``datasets``-style folder with
``train`` / ``validation`` (or ``val``) / ``test`` files of those forms (a missing validation split
is carved from train). Labels are integers or names (names become classes in sorted order).
Every example becomes ``input_ids`` padded / truncated to ``max_length``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from deepshrink.data.datasets import SPLIT_SEED, DataBundle
from deepshrink.errors import DataError

EXTS = (".tsv", ".txt", ".jsonl")
MAX_LINES = 1 << 22
MAX_LENGTH = 1 << 14


def _split_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for ext in EXTS:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def is_text_source(name: str | Path) -> bool:
    p = Path(name)
    if p.is_file():
        return p.suffix.lower() in EXTS
    return p.is_dir() and _split_file(p, ("train",)) is not None


def _read(path: Path) -> tuple[list[str], list[Any]]:
    texts, labels = [], []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if i > MAX_LINES:
                raise DataError(f"{path}: more than {MAX_LINES} lines")
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.suffix.lower() == ".jsonl":
                try:
                    row = json.loads(line)
                    text, label = row["text"], row["label"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{i}: expected a JSON object with 'text' and 'label'") from None
            else:
                label, tab, text = line.partition("\t")
                if not tab:
                    raise DataError(f"{path}:{i}: no label (expected LABEL<TAB>TEXT)")
            texts.append(str(text))
            labels.append(label)
    if not texts:
        raise DataError(f"{path}: no examples")
    return texts, labels


def _classes(labels: list[Any]) -> tuple[dict[Any, int], tuple[str, ...]]:
    keys = sorted({str(v) for v in labels})
    if all(k.lstrip("-").isdigit() for k in keys):
        n = max(int(k) for k in keys) + 1
        if min(int(k) for k in keys) < 0 or n > 1 << 16:
            raise DataError(f"integer labels must be in [0, 65536), got {keys[:5]}")
        return {k: int(k) for k in keys}, tuple(str(i) for i in range(n))
    return {k: i for i, k in enumerate(keys)}, tuple(keys)


def _tokenizer(directory: str | Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise DataError("text data needs transformers", hint="pip install 'deepshrink[hf]'") from exc
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{directory}: not a tokenizer folder: {str(exc)[:200]}",
                        hint="give a folder written by tokenizer.save_pretrained (--tokenizer)") from None


def _encode(tok: Any, texts: list[str], labels: list[Any], classes: dict[Any, int],
            max_length: int) -> TensorDataset:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    y = torch.tensor([classes[str(v)] for v in labels], dtype=torch.int64)
    return TensorDataset(enc["input_ids"].to(torch.int64), y)


def _splits(source: Path, seed: int) -> dict[str, tuple[list[str], list[Any]]]:
    if source.is_file():
        texts, labels = _read(source)
        perm = np.random.default_rng(seed).permutation(len(texts))
        a, b = int(0.6 * len(perm)), int(0.8 * len(perm))
        cut = {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}
        return {k: ([texts[i] for i in idx], [labels[i] for i in idx]) for k, idx in cut.items()}
    out = {"train": _read(_split_file(source, ("train",)))}  # type: ignore[arg-type]
    test = _split_file(source, ("test",))
    if test is None:
        raise DataError(f"{source}: no test split (test.tsv / test.txt / test.jsonl)")
    out["test"] = _read(test)
    val = _split_file(source, ("validation", "val", "dev"))
    if val is not None:
        out["val"] = _read(val)
    else:  # carve a fifth of train, seeded
        texts, labels = out["train"]
        perm = np.random.default_rng(seed).permutation(len(texts))
        k = max(1, len(perm) // 5)
        out["val"] = ([texts[i] for i in perm[:k]], [labels[i] for i in perm[:k]])
        out["train"] = ([texts[i] for i in perm[k:]], [labels[i] for i in perm[k:]])
    return out


def load_text(source: str | Path, tokenizer: str | Path, max_length: int = 32,
              seed: int = SPLIT_SEED) -> DataBundle:
    """A text file or folder (see the module docstring) as a :class:`DataBundle` of token ids."""
    source = Path(source)
    if not 1 <= max_length <= MAX_LENGTH:
        raise DataError(f"max_length must be in [1, {MAX_LENGTH}], got {max_length}")
    splits = _splits(source, seed)
    if any(not v[0] for v in splits.values()):
        raise DataError(f"{source}: too few examples for train / validation / test splits")
    classes, names = _classes([lab for _, labs in splits.values() for lab in labs])
    tok = _tokenizer(tokenizer)
    sets = {k: _encode(tok, t, lab, classes, max_length) for k, (t, lab) in splits.items()}
    return DataBundle(str(source), sets["train"], sets["val"], sets["test"], len(names), names)
