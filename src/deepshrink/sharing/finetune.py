"""Centroid fine-tuning (Han et al. 2016, sec. 3.1): train the codebooks, not the weights.

The gradient of every weight is grouped by its cluster and summed into that cluster's centroid,
``dL/dc_k = sum over {i : index_i = k} dL/dw_i``; pruned weights (index -1) contribute nothing
and stay zero. The weights are then rewritten as ``codebook[index]``, so the model stays an
ordinary module and the clustering (who belongs where) never changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepshrink import distributed
from deepshrink.errors import ModelError
from deepshrink.sharing.kmeans import get_sharing, write_shared_weights
from deepshrink.train import Callback, TrainState


def centroid_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-cluster sums of the current weight gradients, by shared parameter name."""
    params = dict(model.named_parameters())
    out = {}
    for name, st in get_sharing(model).items():
        g = params[name].grad
        cg = torch.zeros_like(st.codebook)
        if g is not None:
            keep = st.index >= 0
            cg.index_add_(0, st.index[keep], g.detach()[keep].to(cg.dtype))
        out[name] = cg
    return out


class CentroidFineTune(Callback):
    """Fine-tune shared codebooks inside :func:`deepshrink.train.train`.

    After ``backward`` the weight gradients are summed per cluster and then removed (set to
    ``None``), so the training loop's optimizer never moves shared weights itself (no weight
    decay or momentum on them); the other parameters (e.g. unshared biases) train normally. The
    centroids get their own optimizer (``"adam"`` or ``"sgd"``) whose learning rate follows the
    loop's (schedule included) times ``lr_scale``; after each step the weights are rewritten from
    the codebooks. ``last_grads`` holds the most recent centroid gradients (for inspection).
    """

    def __init__(self, optimizer: str = "adam", lr_scale: float = 1.0) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ModelError(f"CentroidFineTune.optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.optimizer_name, self.lr_scale = optimizer, lr_scale
        self.last_grads: dict[str, torch.Tensor] = {}

    def on_train_begin(self, state: TrainState) -> None:
        sharing = get_sharing(state.model)
        if not sharing:
            raise ModelError("CentroidFineTune: the model has no shared weights",
                             hint="call deepshrink.sharing.share(model, KMeansConfig(...)) first")
        self._params = dict(state.model.named_parameters())
        self._model = state.model
        for name, st in sharing.items():  # follow the model to its training device
            dev = self._params[name].device
            st.codebook, st.index = st.codebook.to(dev), st.index.to(dev)
        # Data-parallel: every process must fine-tune the same clustering (rank 0's).
        distributed.broadcast(t for st in sharing.values() for t in (st.codebook, st.index))
        self._books = {n: st.codebook.requires_grad_(False) for n, st in sharing.items()}
        books = list(self._books.values())
        lr = state.optimizer.param_groups[0]["lr"] * self.lr_scale
        self._opt = (torch.optim.Adam(books, lr=lr) if self.optimizer_name == "adam"
                     else torch.optim.SGD(books, lr=lr, momentum=0.9))
        self._best: tuple[float, dict[str, torch.Tensor]] | None = None
        write_shared_weights(state.model)

    def after_backward(self, state: TrainState) -> None:
        self.last_grads = centroid_grads(state.model)
        for name, cg in self.last_grads.items():
            self._books[name].grad = cg
            self._params[name].grad = None  # the loop's optimizer skips the shared weights

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        for group in self._opt.param_groups:
            group["lr"] = state.optimizer.param_groups[0]["lr"] * self.lr_scale
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        write_shared_weights(state.model)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        # Mirror the loop's keep_best choice (same metric, same strict '>') for the codebooks.
        val = metrics.get("val_top1")
        if val is not None and (self._best is None or val > self._best[0]):
            self._best = (val, {n: b.clone() for n, b in self._books.items()})

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        if state.config.keep_best and self._best is not None:
            for name, book in self._best[1].items():
                self._books[name].copy_(book)
        write_shared_weights(state.model)  # keep weights and codebooks in sync
        for st in get_sharing(state.model).values():  # sharing state lives on the CPU
            st.codebook, st.index = st.codebook.cpu(), st.index.cpu()

    def state_dict(self) -> dict[str, Any]:
        """Codebooks and their optimizer: the clustering is rebuilt by the script, the
        fine-tuned centroids are not (the loop's checkpoint alone would be overwritten)."""
        return {"books": {n: b.detach().cpu().clone() for n, b in self._books.items()},
                "optimizer": self._opt.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        books = state.get("books", {})
        if set(books) != set(self._books):
            raise ModelError(f"CentroidFineTune: saved codebooks for {sorted(books)}, "
                             f"the model shares {sorted(self._books)}")
        for name, book in books.items():
            self._books[name].copy_(book)
        self._opt.load_state_dict(state["optimizer"])
        write_shared_weights(self._model)
