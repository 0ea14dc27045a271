"""GNR: the WGAN-GP noise generator of Li & Wang (2019), section 2 (networks and losses)."""
from raydefense.gnr.losses import (
    critic_loss,
    critic_step,
    generator_loss,
    generator_step,
    gradient_penalty,
    make_optimizers,
    train_step,
)
from raydefense.gnr.networks import CRITIC_NORMS, ConvUnit, Critic, DeconvUnit, Generator

__all__ = [
    "CRITIC_NORMS",
    "ConvUnit",
    "Critic",
    "DeconvUnit",
    "Generator",
    "critic_loss",
    "critic_step",
    "generator_loss",
    "generator_step",
    "gradient_penalty",
    "make_optimizers",
    "train_step",
]
