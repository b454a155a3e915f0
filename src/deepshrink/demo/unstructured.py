"""Demo stage: unstructured pruning of the demo's LeNet-300-100 (digits), iterative prune ->
fine-tune with masks, saved in compact sparse form and measured from that file."""

from __future__ import annotations

from typing import Any

from deepshrink.checkpoint import load
from deepshrink.pruning.schedules import iterative_prune
from deepshrink.pruning.sparse import save_sparse
from deepshrink.pruning.unstructured import UnstructuredConfig
from deepshrink.train import TrainConfig

# Han et al.'s pattern: the big first layer takes the most pruning, the classifier the least.
DEMO_CONFIG = UnstructuredConfig(ratio=0.9, overrides={"6": 0.6})


def demo_stage(ctx: Any) -> None:
    """Prune ``ctx``'s baseline to ~89 % sparsity in rounds, add its row, share the masked model."""
    model = ctx.fresh_baseline()
    rounds, epochs = (2, 3) if ctx.quick else (3, 6)
    ft = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, scheduler="cosine", keep_best=True,
                     progress=False)
    iterative_prune(model, DEMO_CONFIG, ctx.data, ft, rounds=rounds)
    path = save_sparse(model, ctx.out_dir / "pruned-unstructured.safetensors",
                       extra={"pruning": DEMO_CONFIG.to_dict(), "dataset": ctx.data.name})
    # Measure the model as loaded back from its compact file: that is what a user would ship.
    rep = ctx.measure(load(path), "pruned-unstructured", file=path)
    ctx.add_row(f"pruned (unstructured {100 * rep.sparsity:.0f}%, iterative)", rep)
    ctx.shared["pruned_unstructured"] = model  # masks attached: weight sharing builds on it
