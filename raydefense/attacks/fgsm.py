"""FGSM: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from raydefense.attacks.base import Attack, EpsLike, _check_budget, _module_dtype, register_attack

__all__ = ["FGSM", "fgsm_levels"]


class FGSM(Attack):
    """Fast Gradient Sign Method, L-inf: ``x* = clip_[0,1](x + eps * sign(grad_x loss))``.

    Li & Wang (2019), section 5, use it for the GNR training data and both test sets.

    Args:
        model: maps ``[0, 1]`` images ``(B, C, H, W)`` to logits ``(B, K)``.
        eps: L-inf budget in ``[0, 1]`` units (default 8/255), a float or one value per image.
        targeted: step down the cross-entropy of the target labels instead of up that of the
            true labels.

    Shapes: images ``(B, C, H, W)`` in ``[0, 1]``, labels ``(B,)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, model: nn.Module, *, eps: EpsLike = 8 / 255, targeted: bool = False) -> None:
        super().__init__(model, eps=eps, targeted=targeted)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """One signed gradient step of size eps."""
        eps = self.budget(self.eps, images)
        grad = self.gradient(images, labels)
        return (images + eps * grad.sign()).clamp(0, 1)


class _StepSign(Attack):
    """FGSM's step direction as an image in [0, 1]: ``(sign(grad_x loss) + 1) / 2``, through
    :meth:`Attack.__call__`'s checks, eval mode and gradient handling (eps 1: never clipped)."""

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        return (self.gradient(images, labels).sign() + 1) / 2


def fgsm_levels(model: nn.Module, images: Tensor, labels: Tensor, levels: Sequence[float], *,
                targeted: bool = False) -> list[Tensor]:
    """``[FGSM(model, eps=e, targeted=targeted)(images, labels) for e in levels]``, exactly, from
    one forward and backward pass instead of one per level: FGSM's step ``sign(grad_x loss)``
    does not depend on eps. What an accuracy-vs-eps curve (the paper's Figure 7) needs.

    Shapes: images ``(B, C, H, W)`` in ``[0, 1]``, labels ``(B,)`` -> one ``(B, C, H, W)`` per
    level, on the model's device. Raises ValueError for a level outside ``[0, 1]`` or not a
    single number, and for the inputs :class:`FGSM` refuses. Images in another dtype than the
    model's (rounded back per level by :class:`FGSM`) take one FGSM call per level.
    """
    eps = []
    for e in levels:
        checked = _check_budget(e, what="eps level", owner="fgsm_levels")
        if isinstance(checked, Tensor):
            raise ValueError(f"fgsm_levels: each level must be one number, got {e!r}")
        eps.append(checked)
    dtype = _module_dtype(model)
    if len(eps) < 2 or images.dtype not in (torch.float32, torch.float64) or dtype not in (None, images.dtype):
        return [FGSM(model, eps=e, targeted=targeted)(images, labels) for e in eps]
    step = _StepSign(model, eps=1.0, targeted=targeted)(images, labels) * 2 - 1
    x = images.detach().to(step.device)
    # As FGSM.forward computes it: images + eps * sign, eps a tensor of the images' dtype, clipped.
    return [(x + torch.tensor(e, dtype=x.dtype, device=x.device) * step).clamp(0, 1) for e in eps]


@register_attack("fgsm")
def _fgsm(model: nn.Module, **kwargs) -> FGSM:
    return FGSM(model, **kwargs)
