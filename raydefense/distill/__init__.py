"""Knowledge transfer (Li & Wang 2019, section 4, eqs. 6-7) and defensive distillation (Papernot et al. 2016)."""
from raydefense.distill.losses import (
    defensive_distillation_loss,
    distillation_soft_targets,
    knowledge_transfer_loss,
    softmax_t,
    temperature_ce,
)

__all__ = [
    "defensive_distillation_loss",
    "distillation_soft_targets",
    "knowledge_transfer_loss",
    "softmax_t",
    "temperature_ce",
]
