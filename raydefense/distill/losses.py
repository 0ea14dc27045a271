"""Knowledge transfer (Li & Wang 2019, section 4, eqs. 6-7) and defensive distillation.

Knowledge transfer (eq. 6)::

    L = KL(P_t || P_s) + lambda * KL(P_t^T || P_s^T),   P^T = softmax(z / T)  (eq. 7)

where P_t comes from the teacher (trained on denoised images with one-hot labels) and P_s
from the student (same architecture, trained on denoised images). Defensive distillation
(Papernot et al. 2016, "Distillation as a Defense to Adversarial Perturbations against Deep
Neural Networks") is the baseline: train a teacher at temperature T on hard labels
(:func:`temperature_ce`), train a student at the same T on the teacher's soft labels
(:func:`distillation_soft_targets`, :func:`defensive_distillation_loss`), deploy the student
at T = 1.

All losses take logits ``(B, K)`` and return the batch mean (a scalar).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raydefense.errors import ConfigError

__all__ = [
    "defensive_distillation_loss",
    "distillation_soft_targets",
    "knowledge_transfer_loss",
    "softmax_t",
    "temperature_ce",
]


def _check_number(value: float, name: str, *, minimum: float, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        op = ">" if strict else ">="
        raise ConfigError(f"{name} must be a finite number {op} {minimum}, got {value!r}")
    return float(value)


def _check_logits(logits: torch.Tensor, name: str) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must be logits of shape (B, K), got {tuple(logits.shape)}")


def softmax_t(logits: torch.Tensor, T: float) -> torch.Tensor:
    """Softmax at temperature T, eq. 7: ``softmax(z / T)`` over the last dim.

    T > 0 (T = 1 is the plain softmax; larger T gives a smoother distribution).
    Shapes: ``(..., K) -> (..., K)``.
    """
    T = _check_number(T, "T", minimum=0.0, strict=True)
    return torch.softmax(logits / T, dim=-1)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Batch-mean KL(softmax(t / T) || softmax(s / T)), computed in log space for stability."""
    log_pt = F.log_softmax(teacher_logits / T, dim=-1)
    log_ps = F.log_softmax(student_logits / T, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def knowledge_transfer_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    lam: float,
    T: float,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """Knowledge-transfer loss of eq. 6: KL(P_t || P_s) + lam * KL(P_t^T || P_s^T).

    Args:
        student_logits: ``(B, K)``, the student's logits (gradients flow here).
        teacher_logits: ``(B, K)``, the teacher's logits (detached).
        lam: lambda, the "harmonic parameter" of eq. 6, >= 0.
        T: the temperature of eq. 7, >= 1 (the paper's constraint).
        scale_by_t2: multiply the tempered term by T^2. Eq. 6 has no such factor (the
            default follows the paper); Hinton et al. (2015) add it because the tempered
            term's gradients shrink as 1/T^2, which keeps lam's meaning independent of T.

    Returns:
        A scalar: both KL terms are summed over classes and averaged over the batch.
    """
    lam = _check_number(lam, "lam", minimum=0.0)
    T = _check_number(T, "T", minimum=1.0)
    _check_logits(student_logits, "student_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    teacher_logits = teacher_logits.detach()
    hard = _kl(teacher_logits, student_logits, 1.0)
    soft = _kl(teacher_logits, student_logits, T)
    return hard + lam * (T * T if scale_by_t2 else 1.0) * soft


def distillation_soft_targets(teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """The teacher's soft labels softmax(z_t / T) for defensive distillation (Papernot et al. 2016).

    T >= 1. Detached. Shapes: ``(B, K) -> (B, K)``, rows sum to 1.
    """
    T = _check_number(T, "T", minimum=1.0)
    _check_logits(teacher_logits, "teacher_logits")
    return softmax_t(teacher_logits.detach(), T)


def defensive_distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, T: float) -> torch.Tensor:
    """Cross-entropy between the soft targets and softmax(z_s / T) (Papernot et al. 2016).

    Minimized (over the student's logits) where softmax(z_s / T) equals the soft targets,
    e.g. z_s = z_t at the same T. T >= 1.
    Shapes: ``(B, K), (B, K) -> scalar`` (batch mean).
    """
    T = _check_number(T, "T", minimum=1.0)
    _check_logits(student_logits, "student_logits")
    if soft_targets.shape != student_logits.shape:
        raise ValueError(
            f"soft_targets must match student_logits' shape {tuple(student_logits.shape)}, "
            f"got {tuple(soft_targets.shape)}"
        )
    log_ps = F.log_softmax(student_logits / T, dim=-1)
    return -(soft_targets.detach() * log_ps).sum(dim=-1).mean()


def temperature_ce(logits: torch.Tensor, labels: torch.Tensor, T: float) -> torch.Tensor:
    """Cross-entropy of softmax(z / T) against hard labels: trains the distillation teacher.

    (Papernot et al. 2016, step 1.) T >= 1. Shapes: ``(B, K)``, labels ``(B,)`` int64 -> scalar.
    """
    T = _check_number(T, "T", minimum=1.0)
    _check_logits(logits, "logits")
    return F.cross_entropy(logits / T, labels)
