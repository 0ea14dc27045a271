"""Defences as modules: a defended model (preprocess + classifier) and the baselines JPEG and DCN."""
from raydefense.defenses.dcn import contractive_penalty, dcn_loss
from raydefense.defenses.defended import DefendedModel
from raydefense.defenses.jpeg import JPEG, JPEG_MODES, jpeg_compress, jpeg_compress_differentiable

__all__ = [
    "DefendedModel",
    "JPEG",
    "JPEG_MODES",
    "contractive_penalty",
    "dcn_loss",
    "jpeg_compress",
    "jpeg_compress_differentiable",
]
