"""FGSM: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015."""
from __future__ import annotations

from torch import Tensor, nn

from raydefense.attacks.base import Attack, EpsLike, register_attack

__all__ = ["FGSM"]


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


@register_attack("fgsm")
def _fgsm(model: nn.Module, **kwargs) -> FGSM:
    return FGSM(model, **kwargs)
