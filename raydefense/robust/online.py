"""Online adversarial examples and robust training losses (pure PyTorch, no Ray).

For the two adversarially trained defenses beyond the paper:

* ``pgd_at``: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant
  to Adversarial Attacks", ICLR 2018. Each batch, PGD examples are made against the *current*
  model (:func:`online_pgd`) and the model is trained on them: ``F.cross_entropy(model(x_adv), y)``
  (or the TRADES objective, :func:`trades_loss`).
* ``uddn_kt_adv``: the UDDN is trained with its guided loss on PGD examples made against
  UDDN + target; then the student is trained with the paper's knowledge-transfer loss on PGD
  examples made against UDDN + student, in the spirit of Adversarially Robust Distillation
  (Goldblum, Fowl, Feizi & Goldstein, AAAI 2020; :func:`ard_kt_loss`) or with a TRADES robust term
  (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, ICML 2019; :func:`trades_loss`).

A training step, e.g. for ``pgd_at``::

    x_adv = online_pgd(model, x, y, eps=eps, steps=7, generator=gen)   # model back in train mode
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward(); opt.step()
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydefense.attacks.base import Attack, EpsLike, _check_budget, attack_loss
from raydefense.distill.losses import knowledge_transfer_loss

__all__ = ["online_pgd", "trades_loss", "ard_kt_loss"]


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        what = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"online_pgd: images must be a float tensor (B, C, H, W), got {what}")
    if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
        raise ValueError(f"online_pgd: images must lie in [0, 1], got min {images.min().item():g}, max {images.max().item():g}")


def _as_column(value: float | Tensor, like: Tensor, what: str) -> Tensor:
    """A validated budget as a ``(B, 1, 1, 1)`` tensor with ``like``'s dtype and device."""
    if isinstance(value, Tensor):
        if value.shape[0] != like.shape[0]:
            raise ValueError(f"online_pgd: per-image {what} has {value.shape[0]} values for a batch of {like.shape[0]} images")
        return value.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)
    return torch.full((like.shape[0], 1, 1, 1), value, device=like.device, dtype=like.dtype)


def _kl_objective(model: nn.Module, x: Tensor, clean_log_probs: Tensor) -> Tensor:
    """Per-image KL(p_clean || p_model(x)), ``(B,)``: the TRADES inner objective."""
    log_q = F.log_softmax(model(x), dim=1)
    return F.kl_div(log_q, clean_log_probs, reduction="none", log_target=True).sum(dim=1)


def online_pgd(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    eps: EpsLike,
    steps: int = 10,
    alpha: EpsLike | None = None,
    loss: str = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD examples for one training batch against the current ``model`` (Madry et al. 2018).

    One cohesive thing (the PGD loop with its save/restore of the model state), hence its length.

    ``x_0 = clip(x + U(-eps, eps))`` (or ``x``), then ``steps`` times
    ``x_{k+1} = Proj_{B_inf(x, eps) and [0, 1]}(x_k + alpha * sign(grad_x L(x_k)))``, returning
    the last iterate (as Madry et al. train on it; no best-of selection, which would cost a
    forward pass per step).

    While it runs, every submodule of ``model`` is in eval mode (batch-norm statistics are not
    updated by the attack and dropout is off); each module's own mode is restored afterwards,
    also on error. Only the input's gradient is computed (``torch.autograd.grad``), so the
    parameters' ``.grad`` are left as they were; the result is detached. Runs with gradients
    enabled even when called under ``torch.no_grad``.

    Args:
        model: maps ``[0, 1]`` images ``(B, C, H, W)`` to logits ``(B, K)``: the classifier for
            ``pgd_at``, or UDDN + target / UDDN + student for ``uddn_kt_adv``.
        images: ``(B, C, H, W)`` float in ``[0, 1]``, on the model's device (a training batch).
        labels: ``(B,)`` integer classes; needed for ``loss='ce'``, ignored for ``'kl'``.
        eps: L-inf budget in ``[0, 1]`` units, a float or one value per image (``(B,)``).
        steps: PGD iterations (default 10; Madry et al. trained CIFAR-10 with 7).
        alpha: step size, a float or per image; default ``2.5 * eps / steps`` (Madry et al. 2018,
            appendix: enough to reach the ball's boundary from any start).
        loss: ``'ce'`` maximises the cross-entropy of the labels (Madry et al.; ARD's inner
            maximisation); ``'kl'`` maximises KL(p(x) || p(x_adv)) against the model's own clean
            prediction (TRADES' inner maximisation; needs no labels).
        random_start: start from a uniform point of the ball (default ``True``).
        generator: ``torch.Generator`` for the random start (``None``: torch's global RNG). Draws
            are made on the generator's device and moved to the images'.

    Returns:
        ``(B, C, H, W)`` detached, same dtype and device as ``images``, within ``eps`` of them and
        in ``[0, 1]``.

    Raises:
        ValueError: a bad argument or input (named).
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"online_pgd: model must be an nn.Module, got {type(model).__name__}")
    _check_images(images)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"online_pgd: steps must be an int >= 0, got {steps!r}")
    if loss not in ("ce", "kl"):
        raise ValueError(f"online_pgd: unknown loss {loss!r}; known: 'ce', 'kl'")
    if loss == "ce":
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"online_pgd: loss='ce' needs labels of shape ({images.shape[0]},)")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"online_pgd: labels must be integer class indices, got dtype {labels.dtype}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"online_pgd: generator must be a torch.Generator or None, got {type(generator).__name__}")
    eps_v = _check_budget(eps, what="eps", owner="online_pgd")
    alpha_v = None if alpha is None else _check_budget(alpha, what="alpha", owner="online_pgd")

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # clone: an ordinary tensor even if the caller made the batch under inference_mode
            x = images.detach().clone()
            eps_t = _as_column(eps_v, x, "eps")
            alpha_t = eps_t * (2.5 / max(steps, 1)) if alpha_v is None else _as_column(alpha_v, x, "alpha")
            y = labels.to(device=x.device, dtype=torch.long).clone() if loss == "ce" else None
            clean_log_probs = None
            if loss == "kl":
                with torch.no_grad():
                    clean_log_probs = F.log_softmax(model(x), dim=1)
            adv = x
            if random_start:
                where = generator.device if generator is not None else x.device
                noise = torch.rand(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
                adv = Attack.project(x + (2 * noise - 1) * eps_t, x, eps_t)
            for _ in range(steps):
                adv = adv.detach().requires_grad_(True)
                if loss == "ce":
                    objective = attack_loss(model(adv), y, loss="ce").sum()
                else:
                    objective = _kl_objective(model, adv, clean_log_probs).sum()
                (grad,) = torch.autograd.grad(objective, adv)
                adv = Attack.project(adv.detach() + alpha_t * grad.sign(), x, eps_t)
    finally:
        for module, training in modes:
            module.training = training
    return adv.detach()


def _check_logits_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must be logits of the same shape (B, K), got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_weight(value: float, name: str, *, high: float = math.inf) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number in [0, {high:g}], got {value!r}")
    return float(value)


def trades_loss(
    clean_logits: Tensor,
    adv_logits: Tensor,
    *,
    beta: float,
    labels: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    lam: float = 0.0,
    T: float = 1.0,
) -> Tensor:
    """TRADES objective (Zhang et al., ICML 2019, eq. 5): natural term + ``beta`` * KL(p(x) || p(x_adv)).

    The natural term is the cross-entropy of ``labels`` (``pgd_at`` with TRADES), or, given
    ``teacher_logits``, the paper's knowledge-transfer loss (Li & Wang 2019, eq. 6, with ``lam``
    and ``T``; :func:`raydefense.distill.losses.knowledge_transfer_loss`) of the student's clean
    logits (``uddn_kt_adv``). The robust term is the batch-mean KL between the model's clean and
    adversarial softmax at T = 1; gradients flow through both, as in the TRADES reference code.

    Shapes: logits ``(B, K)``, labels ``(B,)`` -> scalar. ``beta = 0`` gives the natural term alone;
    ``adv_logits == clean_logits`` makes the robust term 0.

    Raises:
        ValueError: shapes differ, ``beta < 0``, or not exactly one of ``labels`` / ``teacher_logits``.
    """
    _check_logits_pair(clean_logits, adv_logits, "clean_logits and adv_logits")
    beta = _check_weight(beta, "trades_loss: beta")
    if (labels is None) == (teacher_logits is None):
        raise ValueError("trades_loss: pass exactly one of labels (cross-entropy) or teacher_logits (knowledge transfer)")
    if labels is not None:
        natural = F.cross_entropy(clean_logits, labels.long())
    else:
        _check_logits_pair(clean_logits, teacher_logits, "clean_logits and teacher_logits")
        natural = knowledge_transfer_loss(clean_logits, teacher_logits, lam=lam, T=T)
    robust = F.kl_div(F.log_softmax(adv_logits, dim=1), F.log_softmax(clean_logits, dim=1),
                      reduction="batchmean", log_target=True)
    return natural + beta * robust


def ard_kt_loss(
    student_adv_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    lam: float,
    T: float,
    student_clean_logits: Tensor | None = None,
    scale_by_t2: bool = False,
) -> Tensor:
    """Adversarially robust knowledge transfer, ARD-style (Goldblum et al., AAAI 2020, eq. 3):
    ``(1 - alpha) * KT(student(x_adv), teacher(x)) + alpha * KT(student(x), teacher(x))``.

    ``KT`` is the paper's knowledge-transfer loss KL(P_t || P_s) + lam KL(P_t^T || P_s^T)
    (Li & Wang 2019, eq. 6; :func:`raydefense.distill.losses.knowledge_transfer_loss`). ARD pairs
    the teacher's output on the *clean* image with the student's on the adversarial one, so the
    student learns to answer an attacked image as the teacher answers the clean one; its natural
    term is a cross-entropy on labels, here replaced by the clean KT term, since the paper's
    student learns from the teacher alone. For ``uddn_kt_adv``: ``student_adv_logits =
    student(uddn(x_adv))`` with ``x_adv = online_pgd(uddn + student, x, y, ...)``,
    ``teacher_logits = teacher(uddn(x))`` (detached here), ``student_clean_logits =
    student(uddn(x))``.

    Args:
        student_adv_logits: ``(B, K)``, the student's logits on adversarial images.
        teacher_logits: ``(B, K)``, the teacher's logits on the clean images (detached).
        alpha: weight of the clean term in ``[0, 1]``; 0 is the robust term alone, 1 is plain
            knowledge transfer on clean images (then ``student_adv_logits`` is unused).
        lam, T, scale_by_t2: as in :func:`~raydefense.distill.losses.knowledge_transfer_loss`.
        student_clean_logits: ``(B, K)``; required when ``alpha > 0``.

    Returns:
        A scalar.

    Raises:
        ValueError: shapes differ, ``alpha`` outside ``[0, 1]``, or clean logits missing when needed.
        ConfigError: ``lam < 0`` or ``T < 1`` (from the KT loss).
    """
    alpha = _check_weight(alpha, "ard_kt_loss: alpha", high=1.0)
    _check_logits_pair(student_adv_logits, teacher_logits, "student_adv_logits and teacher_logits")
    if alpha > 0 and student_clean_logits is None:
        raise ValueError("ard_kt_loss: alpha > 0 needs student_clean_logits")

    def kt(student: Tensor) -> Tensor:
        return knowledge_transfer_loss(student, teacher_logits, lam=lam, T=T, scale_by_t2=scale_by_t2)

    if alpha == 1.0:
        return kt(student_clean_logits)
    robust = kt(student_adv_logits)
    if alpha == 0.0:
        return robust
    _check_logits_pair(student_clean_logits, teacher_logits, "student_clean_logits and teacher_logits")
    return (1 - alpha) * robust + alpha * kt(student_clean_logits)
