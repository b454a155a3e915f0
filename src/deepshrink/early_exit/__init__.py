"""Dynamic computation: early exits that really skip work (BranchyNet, Teerapittayanon et al.
2016).

    from deepshrink.early_exit import ExitConfig, ExitTrainConfig, CalibrationConfig
    from deepshrink.early_exit import add_exits, train_exits, calibrate, evaluate_exits
    multi = add_exits(model, ExitConfig(), example_inputs=x)      # heads at stage boundaries
    train_exits(multi, data, ExitTrainConfig(mode="heads"))       # or "joint"
    result = calibrate(multi, CalibrationConfig(budget=0.5), calibration=data)  # val split only
    report = evaluate_exits(multi, data.loader("test", 256))      # shares, mean MACs, accuracy
    ds.save(multi, "model-exits.safetensors")                     # thresholds included

Importing this package registers the ``early_exit`` edit replayer used by ``deepshrink.load``.
"""

from deepshrink.early_exit.config import CalibrationConfig, ExitConfig, ExitTrainConfig
from deepshrink.early_exit.heads import build_head, head_spec, suggest_points
from deepshrink.early_exit.metrics import ExitCosts, ExitReport, evaluate_exits, exit_costs
from deepshrink.early_exit.model import (
    EDIT_KIND,
    ExitRun,
    MultiExitModel,
    add_exits,
    check_exit_edit,
    exit_scores,
    replay_exits,
)
from deepshrink.early_exit.policy import CalibrationResult, CurvePoint, calibrate
from deepshrink.early_exit.training import train_exits

__all__ = [
    "EDIT_KIND",
    "CalibrationConfig",
    "CalibrationResult",
    "CurvePoint",
    "ExitConfig",
    "ExitCosts",
    "ExitReport",
    "ExitRun",
    "ExitTrainConfig",
    "MultiExitModel",
    "add_exits",
    "build_head",
    "calibrate",
    "check_exit_edit",
    "evaluate_exits",
    "exit_costs",
    "exit_scores",
    "head_spec",
    "replay_exits",
    "suggest_points",
    "train_exits",
]
