"""Weight sharing (Deep Compression, Han et al. 2016): per-layer k-means codebooks, centroid
fine-tuning, and the prune -> share -> fine-tune -> entropy-code pipeline::

    share(model, KMeansConfig(bits=5, init="linear"))      # in place; codebooks attached
    train(model, data, cfg, callbacks=[CentroidFineTune()])
    deepshrink.dsz.pack(model, "model.dsz")                 # Huffman-coded .dsz file
    compress(model, data, CompressConfig(...))              # all of it, with a stage table

Importing this package registers the .dsz loader with :func:`deepshrink.load`.
"""

from __future__ import annotations

from typing import Any

from deepshrink.sharing import loader as _loader  # noqa: F401  (registers the .dsz loader)
from deepshrink.sharing.finetune import CentroidFineTune, centroid_grads
from deepshrink.sharing.kmeans import (
    KMeansConfig,
    SharedTensor,
    assign,
    get_sharing,
    init_centroids,
    kmeans_1d,
    round_codebooks,
    set_sharing,
    share,
    sharing_summary,
    write_shared_weights,
)

_LAZY = {"compress": "deepshrink.sharing.pipeline", "CompressConfig": "deepshrink.sharing.pipeline",
         "CompressResult": "deepshrink.sharing.pipeline"}


def __getattr__(name: str) -> Any:
    # The pipeline imports deepshrink.dsz, which imports this package: load it on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepshrink.sharing' has no attribute {name!r}")


__all__ = ["CentroidFineTune", "CompressConfig", "CompressResult", "KMeansConfig", "SharedTensor",
           "assign", "centroid_grads", "compress", "get_sharing", "init_centroids", "kmeans_1d",
           "round_codebooks", "set_sharing", "share", "sharing_summary", "write_shared_weights"]
