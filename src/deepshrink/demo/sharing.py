"""The demo's Deep Compression stage: (pruned) lenet300 -> k-means sharing -> centroid
fine-tune -> Huffman-coded .dsz, reloaded with :func:`deepshrink.load` and measured."""

from __future__ import annotations

import copy
from typing import Any

from deepshrink.checkpoint import load
from deepshrink.dsz import pack
from deepshrink.pruning import UnstructuredConfig, iterative_prune, make_permanent
from deepshrink.sharing.finetune import CentroidFineTune
from deepshrink.sharing.kmeans import KMeansConfig, share
from deepshrink.train import TrainConfig, train


def _pruned(ctx: Any) -> Any:
    """The pruning stage's model when it left one, else prune a fresh baseline here."""
    shared = ctx.shared.get("pruned_unstructured")
    if shared is not None:
        return copy.deepcopy(shared)
    model = ctx.fresh_baseline()
    cfg = TrainConfig(epochs=3 if ctx.quick else 5, batch_size=64, lr=2e-3, progress=False,
                      keep_best=True)
    iterative_prune(model, UnstructuredConfig(ratio=0.85), ctx.data, cfg, rounds=2)
    return make_permanent(model)


def demo_stage(ctx: Any) -> None:
    model = _pruned(ctx)
    share(model, KMeansConfig(bits=4, bias_bits=5))
    cfg = TrainConfig(epochs=3 if ctx.quick else 5, batch_size=64, lr=5e-4, progress=False,
                      keep_best=True)
    train(model, ctx.data, cfg, callbacks=[CentroidFineTune()])
    path = ctx.out_dir / "model.dsz"
    report = pack(model, path)
    reloaded = load(path)
    rep = ctx.measure(reloaded, "dsz", file=path)
    ent = report.entropy_summary()
    ctx.add_row("prune + share 4b + Huffman (.dsz)", rep,
                coded_over_entropy=round(ent["payload_over_entropy"], 4))
