"""PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from raydefense.attacks.base import Attack, EpsLike, _check_budget, attack_loss, register_attack

__all__ = ["PGD"]


class PGD(Attack):
    """Projected gradient descent with random start and restarts, L-inf.

    Per restart: ``x_0 = clip_[0,1](x + U(-eps, eps))`` (or ``x`` without random start), then
    ``steps`` times ``x_{k+1} = Proj_{B_inf(x, eps) and [0,1]}(x_k + alpha * sign(g_k))``, where
    ``g_k`` is the input gradient of the loss, averaged over ``eot_samples`` forward passes
    (Expectation over Transformation, Athalye, Carlini & Wagner, ICML 2018) for randomised
    models. Across restarts each image keeps the last iterate of the best restart: one that
    fools the model (untargeted: not the label; targeted: the target) beats one that does not,
    then the higher loss wins.

    With ``early_stop`` (for evaluation) an image stops at the first iterate that fools the
    model: that iterate is returned and no more gradients are spent on it, and later restarts
    attack only the images no restart has fooled yet (as APGD and AutoAttack do). An image
    counts as broken if *any* iterate fools the model, so the attack's success rate is at least
    that of classic PGD (which returns the last iterate) at a fraction of its cost when most
    images fall early. Off by default: adversarial training wants the last, highest-loss
    iterate, not the first one past the decision boundary.

    Used for the adaptive evaluation, where ``model`` is the whole defended pipeline
    (denoiser + classifier): any ``nn.Module`` mapping ``[0, 1]`` images to logits works.

    Args:
        model: maps ``[0, 1]`` images ``(B, C, H, W)`` to logits ``(B, K)``.
        eps: L-inf budget in ``[0, 1]`` units (default 8/255), a float or one value per image.
        alpha: step size (default 2/255), a float or one value per image.
        steps: iterations per restart (default 10).
        random_start: start from a uniform point in the eps-ball (default ``True``, as Madry et al.).
        restarts: independent runs; the best per image is kept (default 1).
        targeted: pull towards the target labels instead of away from the true ones.
        loss: ``'ce'`` (cross-entropy, default) or ``'dlr'`` (Croce & Hein, ICML 2020; needs
            >= 3 classes, >= 4 when targeted); see :func:`~raydefense.attacks.base.attack_loss`.
        eot_samples: forward passes averaged per gradient (default 1: deterministic models).
        early_stop: freeze each image at its first fooling iterate (default ``False``; see above).

    Shapes: images ``(B, C, H, W)`` in ``[0, 1]``, labels ``(B,)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: EpsLike = 8 / 255,
        alpha: EpsLike = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        targeted: bool = False,
        loss: str = "ce",
        eot_samples: int = 1,
        early_stop: bool = False,
    ) -> None:
        super().__init__(model, eps=eps, targeted=targeted)
        for key, value in (("steps", steps), ("restarts", restarts), ("eot_samples", eot_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PGD: {key} must be a positive int, got {value!r}")
        if loss not in ("ce", "dlr"):
            raise ValueError(f"PGD: unknown loss {loss!r}; known: 'ce', 'dlr'")
        self.alpha = _check_budget(alpha, what="alpha", owner="PGD")
        self.steps = steps
        self.random_start = bool(random_start)
        self.restarts = restarts
        self.loss = loss
        self.eot_samples = eot_samples
        self.early_stop = bool(early_stop)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Best-of-``restarts`` PGD runs."""
        eps = self.budget(self.eps, images)
        alpha = self.budget(self.alpha, images)
        if self.early_stop:
            return self._forward_early_stop(images, labels, eps, alpha)
        best = best_score = best_fooled = None
        for restart in range(self.restarts):
            adv = self._run(images, labels, eps, alpha, restart=restart)
            if self.restarts == 1:
                return adv
            score, fooled = self._evaluate(adv, labels)
            if best is None:
                best, best_score, best_fooled = adv, score, fooled
                continue
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (score > best_score))
            best = torch.where(better.reshape(-1, 1, 1, 1), adv, best)
            best_score = torch.where(better, score, best_score)
            best_fooled = best_fooled | fooled
        return best

    def _run(self, images: Tensor, labels: Tensor, eps: Tensor, alpha: Tensor, *, restart: int = 0) -> Tensor:
        adv = images
        if self.random_start:
            adv = self.uniform_start(images, eps, restart=restart)
        for _ in range(self.steps):
            grad = self.gradient(adv, labels, loss=self.loss, samples=self.eot_samples)
            adv = self.project(adv + alpha * grad.sign(), images, eps)
        return adv

    def _forward_early_stop(self, images: Tensor, labels: Tensor, eps: Tensor, alpha: Tensor) -> Tensor:
        """``early_stop``: per restart, step only the images not fooled yet; a fooled image keeps
        the iterate that fooled it. An image never fooled keeps the last iterate of its last restart
        (each restart's iterates are inside the ball, so any of them is a valid answer)."""
        b = images.shape[0]
        eps = eps.expand(b, 1, 1, 1) if eps.ndim == 0 else eps
        alpha = alpha.expand(b, 1, 1, 1) if alpha.ndim == 0 else alpha
        out = images.clone()
        fooled = torch.zeros(b, dtype=torch.bool, device=images.device)
        for restart in range(self.restarts):
            rows = (~fooled).nonzero().flatten()
            if rows.numel() == 0:
                break
            x, y, e, a = images[rows], labels[rows], eps[rows], alpha[rows]
            adv = self.uniform_start(x, e, restart=restart, rows=rows) if self.random_start else x.clone()
            active = torch.arange(rows.numel(), device=images.device)  # positions in x still attacked
            for step in range(self.steps + 1):
                logits, grad = self._logits_and_gradient(adv[active], y[active], need_grad=step < self.steps)
                pred = logits.argmax(dim=1)
                hit = pred == y[active] if self.targeted else pred != y[active]
                fooled[rows[active[hit]]] = True
                active, grad = active[~hit], None if grad is None else grad[~hit]
                if step == self.steps or active.numel() == 0:
                    break
                adv[active] = self.project(adv[active] + a[active] * grad.sign(), x[active], e[active])
            out[rows] = adv.detach()
        return out

    def _logits_and_gradient(self, x: Tensor, y: Tensor, *, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """EOT-averaged logits ``(B, K)`` at ``x`` and, when ``need_grad``, the objective's input
        gradient ``(B, C, H, W)`` from the same forward passes."""
        if not need_grad:
            with torch.no_grad():
                return sum(self.model(x) for _ in range(self.eot_samples)) / self.eot_samples, None
        _, logits, grad = self.loss_logits_gradient(x, y, loss=self.loss, samples=self.eot_samples)
        return logits, grad

    @torch.no_grad()
    def _evaluate(self, adv: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image ``(objective (B,), fooled (B,) bool)`` of ``adv``, averaged over EOT samples."""
        logits = sum(self.model(adv) for _ in range(self.eot_samples)) / self.eot_samples
        score = attack_loss(logits, labels, loss=self.loss, targeted=self.targeted)
        pred = logits.argmax(dim=1)
        fooled = pred == labels if self.targeted else pred != labels
        return score, fooled

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, alpha={self.alpha if isinstance(self.alpha, float) else '<per-image>'}, "
            f"steps={self.steps}, random_start={self.random_start}, restarts={self.restarts}, loss={self.loss!r}, "
            f"eot_samples={self.eot_samples}, early_stop={self.early_stop})"
        )


@register_attack("pgd")
def _pgd(model: nn.Module, **kwargs) -> PGD:
    return PGD(model, **kwargs)
