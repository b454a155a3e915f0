"""Knowledge distillation: KD loss, single / ensemble teachers with cached outputs, hints."""

from deepshrink.distill.api import Distiller, DistillResult, KDConfig, distill
from deepshrink.distill.hints import HintAdapter, Hints
from deepshrink.distill.loss import kd_loss, soft_loss, teacher_log_probs
from deepshrink.distill.recover import RecoverConfig, RecoverResult, prune_and_recover
from deepshrink.distill.teachers import FeatureTap, Teacher, cache_teacher_outputs, transfer_loader

__all__ = ["DistillResult", "Distiller", "FeatureTap", "HintAdapter", "Hints", "KDConfig", "RecoverConfig",
           "RecoverResult", "Teacher", "cache_teacher_outputs", "distill", "kd_loss", "prune_and_recover",
           "soft_loss", "teacher_log_probs", "transfer_loader"]
