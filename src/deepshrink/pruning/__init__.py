"""Pruning: remove weights (unstructured) or whole neurons/channels (structured).

One verb, :func:`prune`, dispatching on the config type::

    prune(model, UnstructuredConfig(ratio=0.9, scope="global"))      # zeroes weights, attaches masks
    prune(model, ChannelConfig(ratio=0.5), example_inputs)           # physically smaller model

Fine-tune unstructured models with :class:`MaskCallback` so pruned weights stay exactly zero;
:func:`make_permanent` drops the masks, keeping the zeros.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deepshrink.config import Config
from deepshrink.errors import ConfigError
from deepshrink.pruning.lottery import lottery_ticket, rewind, snapshot
from deepshrink.pruning.masks import (
    MaskCallback,
    Masks,
    apply_masks,
    check_masks,
    get_masks,
    make_permanent,
    mask_sparsity,
    masks_from_zeros,
    reapply_masks,
    remove,
)
from deepshrink.pruning.schedules import (
    GradualPruning,
    gradual_frequency,
    iterative_prune,
    oneshot,
    polynomial_sparsity,
)
from deepshrink.pruning.sensitivity import Sensitivity, sensitivity_scan
from deepshrink.pruning.sparse import (  # importing registers the packed_sparse spec edit
    PackedLayer,
    SparseLinear,
    measure_crossover,
    save_sparse,
    sparse_inference_plan,
    to_dense_layers,
    to_packed_layers,
    to_sparse_inference,
)
from deepshrink.pruning.structured import (  # importing registers the structured edit replayer
    ChannelConfig,
    PruneResult,
    prune_channels,
)
from deepshrink.pruning.unstructured import (
    UnstructuredConfig,
    compute_masks,
    magnitude_scores,
    masks_for_ratio,
    masks_for_threshold,
    prune_unstructured,
    select_layers,
)


def prune(model: nn.Module, config: Config, *, example_inputs: Any = None,
          calibration: Any = None) -> nn.Module:
    """Prune ``model`` **in place** as ``config`` says and return it.

    * :class:`UnstructuredConfig`: pruned weights are zeroed and masks attached.
    * :class:`ChannelConfig` (structured): the model becomes physically smaller; needs
      ``example_inputs`` (tensor, tuple or tokenizer dict) to trace one forward pass;
      ``calibration`` feeds data criteria. For the report (what was pruned, what was skipped
      and why) call :func:`prune_channels`, which returns a :class:`PruneResult`.
    """
    if isinstance(config, UnstructuredConfig):
        if example_inputs is not None or calibration is not None:
            raise ConfigError("prune(UnstructuredConfig) reads no example_inputs or calibration")
        return prune_unstructured(model, config)
    if isinstance(config, ChannelConfig):
        return prune_channels(model, config, example_inputs=example_inputs, calibration=calibration).model
    raise ConfigError(f"prune() got a {type(config).__name__}; expected UnstructuredConfig or ChannelConfig")


__all__ = [
    "ChannelConfig",
    "GradualPruning",
    "MaskCallback",
    "Masks",
    "PackedLayer",
    "PruneResult",
    "Sensitivity",
    "SparseLinear",
    "UnstructuredConfig",
    "apply_masks",
    "check_masks",
    "compute_masks",
    "get_masks",
    "gradual_frequency",
    "iterative_prune",
    "lottery_ticket",
    "magnitude_scores",
    "make_permanent",
    "mask_sparsity",
    "masks_for_ratio",
    "masks_for_threshold",
    "masks_from_zeros",
    "measure_crossover",
    "oneshot",
    "polynomial_sparsity",
    "prune",
    "prune_channels",
    "prune_unstructured",
    "reapply_masks",
    "remove",
    "rewind",
    "save_sparse",
    "select_layers",
    "sensitivity_scan",
    "snapshot",
    "sparse_inference_plan",
    "to_dense_layers",
    "to_packed_layers",
    "to_sparse_inference",
]
