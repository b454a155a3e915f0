"""Weight sharing (Deep Compression, Han et al. 2016): per-layer k-means codebooks, centroid
fine-tuning, and the prune -> share -> fine-tune -> entropy-code pipeline::

    share(model, KMeansConfig(bits=5, init="linear"))      # in place; codebooks attached
    train(model, data, cfg, callbacks=[CentroidFineTune()])
    deepshrink.dsz.pack(model, "model.dsz")                 # Huffman-coded .dsz file
    compress(model, data, CompressConfig(...))              # all of it, with a stage table
"""

from __future__ import annotations

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
from deepshrink.sharing.pipeline import CompressConfig, CompressResult, compress

__all__ = ["CentroidFineTune", "CompressConfig", "CompressResult", "KMeansConfig", "SharedTensor",
           "assign", "centroid_grads", "compress", "get_sharing", "init_centroids", "kmeans_1d",
           "round_codebooks", "set_sharing", "share", "sharing_summary", "write_shared_weights"]
