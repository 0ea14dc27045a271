"""APGD: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 (the attack at the heart of AutoAttack).

Why this file exists instead of ``torchattacks.APGD``: torchattacks 3.5.1 (the latest
release) declares ``requests~=2.25.1``, which conflicts with our dev dependencies (moto's
``responses`` needs ``requests>=2.30``, ``docker`` needs ``>=2.26``) and would downgrade
requests/urllib3/idna to releases with known CVEs; it also imports scipy at import time
(not one of our dependencies). So raydefense carries its own APGD, written from the paper.

Not in the attack registry yet: ``raydefense.attacks.__init__`` (and its registry test) would
have to import it, which is outside this module; import :class:`APGD` from here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raydefense.attacks.base import Attack, EpsLike, attack_loss, register_attack

__all__ = ["APGD", "apgd_checkpoints"]


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step size (Croce & Hein 2020, section 3.2).

    ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``: the phases shrink from 22% of the
    budget to 6%. For 100 steps: ``[22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"apgd_checkpoints: steps must be a positive int, got {steps!r}")
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    # round() first: 0.22 + 0.19 is 0.41000000000000003 in floating point.
    return sorted({min(steps, math.ceil(round(pj * steps, 9))) for pj in p[1:]} - {0})


@register_attack("apgd")
class APGD(Attack):
    """Auto-PGD, L-inf: PGD with momentum and a step size that adapts itself (Croce & Hein 2020).

    Per restart, from ``x_0`` (a uniform random point of the eps-ball, or ``x``) with step
    ``eta = 2 eps``::

        z_{k+1} = P(x_k + eta * sign(grad f(x_k)))
        x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1}))   a = momentum (1 at k = 0)

    ``P`` projects onto the eps-ball and ``[0, 1]``. At each checkpoint ``w_j``
    (:func:`apgd_checkpoints`) an image's step is halved and it restarts from its best point
    so far if (1) its loss rose in fewer than ``rho`` of the steps since ``w_{j-1}``, or
    (2) its step was not halved at ``w_{j-1}`` and its best loss has not improved since.
    The attack returns, per image, a point that fools the model if it met one, else the
    highest-loss point; over restarts (which only re-attack images not fooled yet, as in
    AutoAttack) a fooling point beats any other, then the higher loss wins.

    Args:
        model: maps ``[0, 1]`` images ``(B, C, H, W)`` to logits ``(B, K)``; for an adaptive
            evaluation, the whole defended model.
        eps: L-inf budget in ``[0, 1]`` units (default 8/255), a float or one value per image.
        steps: iterations per restart (default 100, the paper's).
        restarts: random restarts (default 1).
        loss: ``'ce'`` (APGD-CE) or ``'dlr'`` (APGD-DLR, the paper's scale-invariant
            Difference of Logits Ratio; needs >= 3 classes). See
            :func:`~raydefense.attacks.base.attack_loss`.
        rho: condition (1)'s threshold (default 0.75, the paper's).
        momentum: ``a`` above (default 0.75, the paper's).
        eot_samples: forward passes averaged per gradient and loss (Expectation over
            Transformation, Athalye et al. 2018) for randomised models (default 1).
        random_start: start from a uniform point in the eps-ball (default ``True``).
        targeted: labels are targets; the loss is the targeted CE / DLR.

    With ``early_stop`` an image that fools the model is frozen at that point: no more
    gradients are spent on it (the attack returns a fooling point for it either way, so the
    accuracy under attack is the same; the cost falls with the share of images broken early).

    After a call, ``last_step_size`` holds each image's final step size ``(B,)`` (of the last
    restart that attacked it), for diagnostics.

    Shapes: images ``(B, C, H, W)`` in ``[0, 1]``, labels ``(B,)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: EpsLike = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        momentum: float = 0.75,
        eot_samples: int = 1,
        random_start: bool = True,
        targeted: bool = False,
        early_stop: bool = False,
    ) -> None:
        super().__init__(model, eps=eps, targeted=targeted)
        for key, value in (("steps", steps), ("restarts", restarts), ("eot_samples", eot_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"APGD: {key} must be a positive int, got {value!r}")
        if loss not in ("ce", "dlr"):
            raise ValueError(f"APGD: unknown loss {loss!r}; known: 'ce', 'dlr'")
        for key, value in (("rho", rho), ("momentum", momentum)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"APGD: {key} must be in [0, 1], got {value!r}")
        self.steps, self.restarts, self.loss = steps, restarts, loss
        self.rho, self.momentum = float(rho), float(momentum)
        self.eot_samples = eot_samples
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)
        self.checkpoints = frozenset(apgd_checkpoints(steps))
        self.last_step_size: Tensor | None = None

    # ------------------------------------------------------------------ the attack
    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Best over ``restarts`` runs; later restarts only attack images not fooled yet."""
        b = images.shape[0]
        eps = self.budget(self.eps, images)
        eps = eps.expand(b, 1, 1, 1) if eps.ndim == 0 else eps
        best = images.clone()
        best_loss = torch.full((b,), -math.inf, device=images.device, dtype=images.dtype)
        fooled = torch.zeros(b, dtype=torch.bool, device=images.device)
        step_size = torch.zeros(b, device=images.device, dtype=images.dtype)
        for restart in range(self.restarts):
            todo = (~fooled).nonzero().flatten()
            if todo.numel() == 0:
                break
            adv, loss, hit, step = self._run(images[todo], labels[todo], eps[todo], restart=restart, rows=todo)
            better = (hit & ~fooled[todo]) | (~hit & (loss > best_loss[todo]))
            idx = todo[better]
            best[idx], best_loss[idx] = adv[better], loss[better]
            fooled[todo] = fooled[todo] | hit
            step_size[todo] = step
        self.last_step_size = step_size
        return best

    def _run(self, x: Tensor, y: Tensor, eps: Tensor, *, restart: int = 0,
             rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One APGD run: ``(adv, its loss, fooled, final step)``, each with leading dim B; ``rows``:
        the positions of ``x``'s images in the batch (for image-keyed random starts)."""
        b = x.shape[0]
        step = 2 * eps.clone()  # eta^(0) = 2 eps
        adv = x
        if self.random_start:
            adv = self.uniform_start(x, eps, restart=restart, rows=rows)
        loss, hit, grad = self._loss_grad(adv, y)
        best_adv, fooled = adv.clone(), hit.clone()  # a point that fools the model, once met
        x_best, loss_best, grad_best = adv.clone(), loss.clone(), grad.clone()
        prev = adv
        loss_prev = loss.clone()
        increases = torch.zeros(b, device=x.device, dtype=x.dtype)
        halved_last = torch.zeros(b, dtype=torch.bool, device=x.device)
        loss_best_last = loss_best.clone()
        last_checkpoint = 0
        for k in range(self.steps):
            if self.early_stop and bool(fooled.all()):
                break
            with torch.no_grad():
                z = self.project(adv + step * grad.sign(), x, eps)
                a = self.momentum if k > 0 else 1.0
                new = self.project(adv + a * (z - adv) + (1 - a) * (adv - prev), x, eps)
                if self.early_stop:  # fooled images stay where they are
                    new = torch.where(fooled.view(-1, 1, 1, 1), adv, new)
            prev, adv = adv, new
            if self.early_stop:
                act = (~fooled).nonzero().flatten()
                loss_a, hit_a, grad_a = self._loss_grad(adv[act], y[act])
                loss, grad = loss_prev.clone(), grad.clone()
                hit = torch.zeros_like(fooled)
                loss[act], hit[act], grad[act] = loss_a, hit_a, grad_a
            else:
                loss, hit, grad = self._loss_grad(adv, y)
            best_adv[hit] = adv[hit]
            fooled |= hit
            increases += (loss > loss_prev).to(x.dtype)
            loss_prev = loss
            improved = loss > loss_best
            x_best[improved], loss_best[improved], grad_best[improved] = adv[improved], loss[improved], grad[improved]
            if k + 1 in self.checkpoints:
                window = k + 1 - last_checkpoint
                cond1 = increases < self.rho * window
                cond2 = ~halved_last & (loss_best <= loss_best_last)
                halve = cond1 | cond2
                step[halve] = step[halve] / 2
                # Restart the halved images from their best point, without momentum.
                adv = torch.where(halve.view(-1, 1, 1, 1), x_best, adv)
                prev = torch.where(halve.view(-1, 1, 1, 1), x_best, prev)
                grad = torch.where(halve.view(-1, 1, 1, 1), grad_best, grad)
                loss_prev = torch.where(halve, loss_best, loss_prev)
                halved_last, loss_best_last = halve, loss_best.clone()
                increases.zero_()
                last_checkpoint = k + 1
        out = torch.where(fooled.view(-1, 1, 1, 1), best_adv, x_best)
        return out.detach(), loss_best, fooled, step.flatten()

    def _loss_grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image loss ``(B,)``, fooled flags ``(B,)`` and input gradient, EOT-averaged."""
        loss, logits, grad = self.loss_logits_gradient(x, y, loss=self.loss, samples=self.eot_samples)
        pred = logits.argmax(dim=1)
        hit = pred == y if self.targeted else pred != y
        return loss, hit, grad

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, steps={self.steps}, restarts={self.restarts}, loss={self.loss!r}, "
                f"early_stop={self.early_stop}, "
                f"rho={self.rho}, momentum={self.momentum}, eot_samples={self.eot_samples})")


@register_attack("apgd_dlr")
def _apgd_dlr(model: nn.Module, **kwargs) -> APGD:
    """APGD with the DLR loss (the second attack of AutoAttack's standard version)."""
    return APGD(model, **{**kwargs, "loss": "dlr"})
