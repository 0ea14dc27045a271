"""GNR objective: WGAN-GP losses of Li & Wang (2019), equations 2-3 (Gulrajani et al. 2017).

Equation 3, the critic's loss::

    L = E_{x~ ~ P_g}[F(x~)] - E_{x ~ P_r}[F(x)] + lambda * E_{x- ~ P_x-}[(||grad_x- F(x-)||_2 - 1)^2]

with x- = eps * x + (1 - eps) * x~, eps ~ U[0, 1] per sample. The generator minimizes
-E[F(x~)]. :func:`critic_step` and :func:`generator_step` are one update each; :func:`train_step`
is one iteration of Algorithm 1 of Gulrajani et al. (n_critic critic updates, then one generator
update). The distributed loop (``raydefense.pipeline.gnr``) calls the two steps.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from raydefense.errors import ConfigError

__all__ = ["critic_loss", "critic_step", "generator_loss", "generator_step", "gradient_penalty", "make_optimizers",
           "train_step"]

Critic = Callable[[torch.Tensor], torch.Tensor]


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.ndim < 2:
        raise ValueError(f"real and fake must be batched (B, ...), got shape {tuple(real.shape)}")


def gradient_penalty(
    critic: Critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The penalty E[(||grad_x- F(x-)||_2 - 1)^2] of eq. 3 (Gulrajani et al. 2017, eq. 3).

    Args:
        critic: F, mapping ``(B, ...)`` to ``(B,)`` (or ``(B, 1)``) scores.
        real: real noise ``(B, C, H, W)``.
        fake: generated noise, same shape. Both are detached: the penalty trains the critic only.
        generator: seeds eps ~ U[0, 1] (one value per sample). Drawn on the generator's device.
        eps: the interpolation weights ``(B,)`` to use instead of random ones (tests, replay).

    Returns:
        A scalar, the batch mean of (||grad||_2 - 1)^2 with the gradient norm taken over each
        sample's flattened input; built with ``create_graph=True`` so it backpropagates into
        the critic's parameters.
    """
    _check_pair(real, fake)
    b = real.shape[0]
    if eps is None:
        draw_device = generator.device if generator is not None else real.device
        eps = torch.rand(b, generator=generator, device=draw_device, dtype=real.dtype)
    elif eps.shape != (b,):
        raise ValueError(f"eps must have shape ({b},), got {tuple(eps.shape)}")
    eps = eps.to(device=real.device, dtype=real.dtype).view(b, *([1] * (real.ndim - 1)))
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(mixed)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = torch.linalg.vector_norm(grad.flatten(1), dim=1)
    return ((norms - 1) ** 2).mean()


def critic_loss(
    critic: Critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    gp_weight: float = 10.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's loss, eq. 3: E[F(fake)] - E[F(real)] + gp_weight * GP.

    Args:
        critic: F, ``(B, C, H, W) -> (B,)``.
        real: real noise ``(B, C, H, W)``.
        fake: generated noise, same shape; detached here (the critic step never trains the
            generator).
        gp_weight: lambda of eqs. 2-3 (10, Gulrajani et al. 2017).
        generator: seeds the interpolation of the gradient penalty.

    Returns:
        ``(loss, stats)``; stats are detached 0-d tensors: ``wasserstein`` (the estimate
        E[F(real)] - E[F(fake)] of eq. 1), ``gradient_penalty``, ``critic_real``,
        ``critic_fake`` and ``loss``.
    """
    if gp_weight < 0:
        raise ConfigError(f"gp_weight must be >= 0, got {gp_weight!r}")
    _check_pair(real, fake)
    fake = fake.detach()
    score_real = critic(real).mean()
    score_fake = critic(fake).mean()
    gp = gradient_penalty(critic, real, fake, generator=generator)
    loss = score_fake - score_real + gp_weight * gp
    stats = {
        "loss": loss.detach(),
        "wasserstein": (score_real - score_fake).detach(),
        "gradient_penalty": gp.detach(),
        "critic_real": score_real.detach(),
        "critic_fake": score_fake.detach(),
    }
    return loss, stats


def generator_loss(critic: Critic, fake: torch.Tensor) -> torch.Tensor:
    """The generator's loss -E[F(fake)] (eq. 3's first term, maximized by the generator).

    ``fake`` ``(B, C, H, W)`` must carry the generator's graph; returns a scalar.
    """
    return -critic(fake).mean()


def make_optimizers(
    generator: nn.Module,
    critic: nn.Module,
    *,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.0, 0.9),
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the generator and the critic with the WGAN-GP settings of Gulrajani et al. (2017).

    (lr = 1e-4, betas = (0, 0.9); the paper of Li & Wang does not give its own.)
    Returns ``(generator_optimizer, critic_optimizer)``.
    """
    return (torch.optim.Adam(generator.parameters(), lr=lr, betas=betas),
            torch.optim.Adam(critic.parameters(), lr=lr, betas=betas))


def critic_step(
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    gp_weight: float = 10.0,
    loss_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One critic update on eq. 3's loss (:func:`critic_loss`); ``fake`` is detached.

    ``loss_weight`` scales the loss before ``backward`` (a data-parallel loop's share of a
    short last batch). Returns the detached stats of :func:`critic_loss`.
    """
    loss, stats = critic_loss(critic, real, fake, gp_weight=gp_weight, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_weight).backward()
    optimizer.step()
    return stats


def generator_step(
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    fake: Callable[[], torch.Tensor],
    *,
    loss_weight: float = 1.0,
) -> torch.Tensor:
    """One generator update on -E[F(fake)], the critic frozen (standard WGAN-GP).

    Args:
        critic: F. Its parameters are frozen for the step (no gradient into them, so nothing
            of the generator step can leak into the next critic update) and restored after.
            Under DistributedDataParallel pass the bare module: the critic takes no part in
            the generator's gradient synchronisation.
        optimizer: the generator's optimizer.
        fake: makes the generated batch ``(B, C, H, W)`` with the generator's graph.
        loss_weight: scales the loss before ``backward``.

    Returns:
        The detached generator loss (a 0-d tensor).
    """
    flags = [p.requires_grad for p in critic.parameters()]
    for p in critic.parameters():
        p.requires_grad_(False)
    try:
        loss = generator_loss(critic, fake())
        optimizer.zero_grad(set_to_none=True)
        (loss * loss_weight).backward()
        optimizer.step()
    finally:
        for p, flag in zip(critic.parameters(), flags):
            p.requires_grad_(flag)
    return loss.detach()


def train_step(
    generator: nn.Module,
    critic: nn.Module,
    generator_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer,
    real_batches: Iterable[torch.Tensor],
    *,
    n_critic: int = 5,
    gp_weight: float = 10.0,
    rng: torch.Generator | None = None,
) -> dict[str, float]:
    """One WGAN-GP iteration: ``n_critic`` critic updates, then one generator update.

    Args:
        generator: a :class:`~raydefense.gnr.networks.Generator` (anything with ``sample``).
        critic: the critic F.
        generator_optimizer / critic_optimizer: e.g. from :func:`make_optimizers`.
        real_batches: yields real-noise batches ``(B, C, H, W)``; exactly ``n_critic`` are
            taken, one per critic update (Gulrajani et al. 2017, Algorithm 1).
        n_critic: critic updates per generator update (5, Gulrajani et al. 2017).
        gp_weight: lambda of eq. 3.
        rng: seeds z and the penalty's interpolation.

    Returns:
        Floats: the last critic step's stats (see :func:`critic_loss`) and ``generator_loss``.
    """
    if n_critic < 1:
        raise ConfigError(f"n_critic must be >= 1, got {n_critic!r}")
    generator.train()
    critic.train()
    batches = iter(real_batches)
    stats: dict[str, torch.Tensor] = {}
    batch_size = 0
    for i in range(n_critic):
        try:
            real = next(batches)
        except StopIteration:
            raise ValueError(f"real_batches ran out after {i} of n_critic={n_critic} batches") from None
        batch_size = real.shape[0]
        with torch.no_grad():
            fake = generator.sample(batch_size, generator=rng, device=real.device)
        stats = critic_step(critic, critic_optimizer, real, fake, gp_weight=gp_weight, generator=rng)
    g_loss = generator_step(critic, generator_optimizer,
                            lambda: generator.sample(batch_size, generator=rng, device=real.device))
    out = {k: float(v) for k, v in stats.items()}
    out["generator_loss"] = float(g_loss)
    return out
