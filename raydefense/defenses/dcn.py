"""Deep Contractive Network baseline (Gu & Rigazio 2015, "Towards Deep Neural Network
Architectures Robust to Adversarial Examples"), one of Li & Wang's (2019) baselines.

DCN trains the classifier with a contractive penalty that keeps its input-output Jacobian
small, so small input perturbations move the output little. Gu & Rigazio penalize the sum
of layer-wise Jacobian norms (a cheap upper-bound surrogate); here the end-to-end Jacobian
of the **logits** is penalized directly, with a stochastic estimate that works for any
model: for v ~ N(0, I) on the output, E_v ||J^T v||^2 = trace(J J^T) = ||J||_F^2, and J^T v
is one vector-Jacobian product (one extra backward pass per projection). Logits rather
than log-softmax: the log-softmax Jacobian vanishes on confidently classified inputs, so
the penalty would stop acting exactly where the network is most confident.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.errors import ConfigError

__all__ = ["contractive_penalty", "dcn_loss"]


def _penalty_from_output(
    out: torch.Tensor,
    x: torch.Tensor,
    *,
    num_projections: int,
    generator: torch.Generator | None,
    projections: torch.Tensor | None,
) -> torch.Tensor:
    """Mean over projections v and the batch of ||J^T v||^2, J = d out_b / d x_b."""
    b = out.shape[0]
    if projections is not None:
        if projections.ndim != out.ndim or projections.shape[1:] != out.shape[1:]:
            raise ValueError(
                f"projections must have shape (K, {', '.join(map(str, out.shape[1:]))}), "
                f"got {tuple(projections.shape)}"
            )
        vectors = [projections[k].to(out).expand_as(out) for k in range(projections.shape[0])]
    else:
        draw_device = generator.device if generator is not None else out.device
        vectors = [
            torch.randn(out.shape, generator=generator, device=draw_device, dtype=out.dtype).to(out.device)
            for _ in range(num_projections)
        ]
    if not out.requires_grad:  # the output does not depend on x (or on anything trainable)
        return out.new_zeros(())
    total = out.sum() * 0  # zero that stays in the graph if out does not depend on x
    for v in vectors:
        (vjp,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=True, retain_graph=True,
                                     allow_unused=True)
        if vjp is not None:
            total = total + vjp.pow(2).sum()
    return total / (len(vectors) * b)


def contractive_penalty(
    model: nn.Module,
    x: torch.Tensor,
    *,
    num_projections: int = 1,
    generator: torch.Generator | None = None,
    projections: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stochastic estimate of the batch-mean ||d f(x) / d x||_F^2 of the logits (Gu & Rigazio 2015).

    Args:
        model: the classifier f, ``(B, C, H, W) -> (B, K)`` logits.
        x: inputs ``(B, C, H, W)``; detached here (only the penalty's x is differentiated).
        num_projections: random v ~ N(0, I) per call; the estimate is unbiased for any
            count, its variance falls as 1 / num_projections.
        generator: seeds v (drawn on the generator's device).
        projections: fixed vectors ``(K_proj, K)`` used instead of random ones (each is
            applied to every sample); e.g. sqrt(K) times the K basis vectors give the exact
            Frobenius norm.

    Returns:
        A scalar built with ``create_graph=True``: backpropagating it trains the model's
        parameters to contract. Assumes samples are independent (no batch norm in train
        mode, whose cross-sample terms would leak into J).
    """
    if projections is None and (not isinstance(num_projections, int) or num_projections < 1):
        raise ConfigError(f"num_projections must be a positive int, got {num_projections!r}")
    x = x.detach().requires_grad_(True)
    out = model(x)
    return _penalty_from_output(out, x, num_projections=num_projections, generator=generator,
                                projections=projections)


def dcn_loss(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: float,
    num_projections: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DCN training loss: cross-entropy + ``weight`` * :func:`contractive_penalty` (Gu & Rigazio 2015).

    One forward pass serves both terms. ``weight`` >= 0 (the contractive strength; Gu &
    Rigazio tune it per dataset). Shapes: x ``(B, C, H, W)``, labels ``(B,)`` -> scalar.
    """
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"DCN weight must be a finite number >= 0, got {weight!r}")
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ConfigError(f"num_projections must be a positive int, got {num_projections!r}")
    x = x.detach().requires_grad_(True)
    out = model(x)
    ce = F.cross_entropy(out, labels)
    if weight == 0:
        return ce
    penalty = _penalty_from_output(out, x, num_projections=num_projections, generator=generator,
                                   projections=None)
    return ce + weight * penalty
