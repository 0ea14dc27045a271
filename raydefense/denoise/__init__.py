"""Denoisers of Li & Wang (2019), section 3: UDDN, the DAE baseline, and the guided losses (eq. 5)."""
from raydefense.denoise.losses import (
    GUIDED_LOSSES,
    GuidanceModel,
    feature_guided_loss,
    guidance_reference,
    guided_loss,
    logits_guided_loss,
    pixel_guided_loss,
    pixel_mse,
)
from raydefense.denoise.uddn import C2, C3, DAE, UDDN, UPSAMPLE_MODES, C, Fuse

__all__ = [
    "C",
    "C2",
    "C3",
    "DAE",
    "Fuse",
    "GUIDED_LOSSES",
    "GuidanceModel",
    "UDDN",
    "UPSAMPLE_MODES",
    "feature_guided_loss",
    "guidance_reference",
    "guided_loss",
    "logits_guided_loss",
    "pixel_guided_loss",
    "pixel_mse",
]
