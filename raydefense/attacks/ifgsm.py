"""I-FGSM (basic iterative method): Kurakin, Goodfellow & Bengio, "Adversarial Examples in the
Physical World", ICLR 2017 workshop."""
from __future__ import annotations

from torch import Tensor, nn

from raydefense.attacks.base import Attack, EpsLike, _check_budget, register_attack

__all__ = ["IFGSM"]


class IFGSM(Attack):
    """Iterative FGSM, L-inf, as Li & Wang (2019) use it (IFGSM2/4/8 = 2/4/8 steps).

    ``x_0 = x``; ``x_{k+1} = Proj_{B_inf(x, eps) and [0,1]}(x_k + alpha * sign(grad loss(x_k)))``,
    ``steps`` times, no random start. With ``alpha = eps / steps`` (default) the last iterate can
    reach the ball's boundary; with ``steps=1`` this is exactly :class:`~raydefense.attacks.FGSM`.

    Args:
        model: maps ``[0, 1]`` images ``(B, C, H, W)`` to logits ``(B, K)``.
        eps: L-inf budget in ``[0, 1]`` units (default 8/255), a float or one value per image.
        steps: number of iterations (default 4, the paper's FGSM4).
        alpha: step size; ``None`` (default) means ``eps / steps`` (per image when eps is).
            Kurakin et al. used alpha = 1/255 with ``min(eps*255 + 4, 1.25 eps*255)`` steps; the
            paper fixes the step count instead.
        targeted: pull towards the target labels instead of away from the true ones.

    Shapes: images ``(B, C, H, W)`` in ``[0, 1]``, labels ``(B,)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: EpsLike = 8 / 255,
        steps: int = 4,
        alpha: EpsLike | None = None,
        targeted: bool = False,
    ) -> None:
        super().__init__(model, eps=eps, targeted=targeted)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"IFGSM: steps must be a positive int, got {steps!r}")
        self.steps = steps
        self.alpha = None if alpha is None else _check_budget(alpha, what="alpha", owner="IFGSM")

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """``steps`` projected signed-gradient steps from the clean images."""
        eps = self.budget(self.eps, images)
        alpha = eps / self.steps if self.alpha is None else self.budget(self.alpha, images)
        adv = images
        for _ in range(self.steps):
            grad = self.gradient(adv, labels)
            adv = self.project(adv + alpha * grad.sign(), images, eps)
        return adv

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, steps={self.steps}, alpha={'eps/steps' if self.alpha is None else self.alpha})"


def _ifgsm_with_steps(steps: int):
    """Factory for the registry names ``ifgsm<steps>``, which fix the step count."""

    def factory(model: nn.Module, **kwargs) -> IFGSM:
        if "steps" in kwargs:
            raise ValueError(f"attack 'ifgsm{steps}' fixes steps={steps}; use 'ifgsm' with steps=... for another count")
        return IFGSM(model, steps=steps, **kwargs)

    return factory


@register_attack("ifgsm")
def _ifgsm(model: nn.Module, **kwargs) -> IFGSM:
    return IFGSM(model, **kwargs)


for _steps in (2, 4, 8):
    register_attack(f"ifgsm{_steps}")(_ifgsm_with_steps(_steps))
