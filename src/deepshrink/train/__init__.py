"""The shared training / evaluation loop."""

from deepshrink.train.loop import (
    Callback,
    CheckpointCallback,
    TrainConfig,
    TrainResult,
    TrainState,
    evaluate,
    logits_of,
    seed_everything,
    train,
)

__all__ = ["Callback", "CheckpointCallback", "TrainConfig", "TrainResult", "TrainState", "evaluate",
           "logits_of", "seed_everything", "train"]
