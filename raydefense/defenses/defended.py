"""A defended model: preprocessing (a denoiser, JPEG, ...) followed by a classifier, as one module.

This is the object to evaluate and to attack: an attack that differentiates
``DefendedModel`` sees the whole pipeline (e.g. UDDN + student), which is what an honest
evaluation of a denoiser defence needs (Athalye & Carlini 2018 broke HGD, the UDDN's closest
relative, this way). Attack the classifier alone only to reproduce the paper's white-box
setting, where the attacker ignores the defence.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DefendedModel"]


class DefendedModel(nn.Module):
    """``classifier(preprocess(x))`` as a single differentiable module.

    Args:
        classifier: takes [0, 1] images ``(B, 3, H, W)``; ``forward`` gives logits
            ``(B, K)``; ``features``, ``forward_with_features`` and ``head`` are passed
            through when the classifier has them (the models registry's contract).
        preprocess: image-to-image module applied first (UDDN, DAE, :class:`JPEG`, ...);
            None means no defence (identity).

    Shapes: ``forward(x: (B, C, H, W)) -> (B, K)``; ``features(x) -> (B, D)``.
    """

    def __init__(self, classifier: nn.Module, preprocess: nn.Module | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.preprocess = preprocess if preprocess is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocess(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's pooled last-conv features (l = -2) of the preprocessed input, ``(B, D)``."""
        return self.classifier.features(self.preprocess(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, K), features (B, D))`` from one pass through preprocess and classifier."""
        return self.classifier.forward_with_features(self.preprocess(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's head: features ``(B, D)`` -> logits ``(B, K)`` (no preprocessing)."""
        return self.classifier.head(features)
