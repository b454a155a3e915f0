"""The knowledge-distillation loss (Hinton, Vinyals & Dean 2015).

Convention: ``alpha`` is the weight of the SOFT term.

    loss = alpha * T² * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, y)

so ``alpha = 1`` is pure distillation (no labels needed) and ``alpha = 0`` is ordinary
cross-entropy training. The T² factor keeps the soft term's gradients on the same scale as the
hard term's when T changes (the soft gradients shrink as 1/T²). Everything works in log space
(``log_softmax`` / ``logsumexp``) so large logits and high temperatures do not overflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepshrink.errors import ModelError

COMBINE_MODES = ("logits", "probs")


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float, combine: str = "logits",
                      weights: Sequence[float] | None = None) -> torch.Tensor:
    """Soft targets as log-probabilities (N, C) at temperature ``temperature``.

    ``teacher_logits`` is (N, C) for one teacher or (N, K, C) for K teachers. An ensemble is
    combined by a weighted mean of the logits (``combine="logits"``: a renormalised geometric
    mean of the softened distributions) or of the softened probabilities (``"probs"``: the
    arithmetic mean, computed as a logsumexp). ``weights`` are normalised to sum to 1.
    """
    z = teacher_logits.detach().float()
    if z.dim() == 2:
        return F.log_softmax(z / temperature, dim=-1)
    if z.dim() != 3:
        raise ModelError(f"teacher logits must be (N, C) or (N, K, C), got shape {tuple(z.shape)}")
    k = z.shape[1]
    if weights is None:
        w = torch.full((k,), 1.0 / k)
    else:
        if len(weights) != k:
            raise ModelError(f"{len(weights)} ensemble weights given for {k} teachers")
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        w = w / w.sum()
    w = w.to(z.device)
    if combine == "logits":
        return F.log_softmax((z * w[None, :, None]).sum(1) / temperature, dim=-1)
    if combine == "probs":
        # log(sum_k w_k softmax(z_k / T)); zero weights give log 0 = -inf, which logsumexp skips.
        return torch.logsumexp(F.log_softmax(z / temperature, dim=-1) + w.log()[None, :, None], dim=1)
    raise ModelError(f"unknown ensemble combine mode {combine!r}; use one of {COMBINE_MODES}")


def soft_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher || student) at temperature T, averaged over the batch."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = teacher_logp.exp()
    # Where the teacher gives probability 0 (log p = -inf) the term is 0, not 0 * inf = nan.
    kl = torch.where(p > 0, p * (teacher_logp - s), torch.zeros_like(s)).sum(-1).mean()
    return temperature**2 * kl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None,
            *, temperature: float, alpha: float, combine: str = "logits",
            weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The mixed loss as a dict ``{"loss", "soft", "hard"}`` (the form
    :func:`deepshrink.train.train` accepts from a ``loss_fn``). ``targets`` may be None only
    when ``alpha == 1``."""
    if student_logits.shape[0] != teacher_logits.shape[0] or \
            student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ModelError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} disagree on batch size or class count")
    out: dict[str, torch.Tensor] = {}
    parts = []
    if alpha > 0:
        out["soft"] = soft_loss(student_logits,
                                teacher_log_probs(teacher_logits, temperature, combine, weights),
                                temperature)
        parts.append(out["soft"] if alpha == 1 else alpha * out["soft"])
    if alpha < 1:
        if targets is None:
            raise ModelError("hard-label targets are needed when alpha < 1")
        out["hard"] = F.cross_entropy(student_logits.float(), targets)
        parts.append(out["hard"] if alpha == 0 else (1 - alpha) * out["hard"])
    out["loss"] = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return out
