"""Guided denoiser losses of Li & Wang (2019), equation 5 (after HGD, Liao et al. 2018).

``L = || f_l(x_hat) - f_l(x) ||_1`` with f the frozen target model:

- ``'logits'`` (l = -1): the logits, the "logits-guided" denoiser;
- ``'features'`` (l = -2): the pooled last-conv features, the "feature-guided" denoiser;
- ``'pixel'``: L1 on the pixels themselves, the pixel-guided baseline.

Reduction: the mean absolute difference over every element (batch, and classes / feature
dims / pixels), i.e. the L1 norm divided by the element count, so the loss scale does not
depend on the batch size or the layer's width. The clean branch f_l(x) runs under
``torch.no_grad()``. These functions never touch ``requires_grad``: the caller freezes the
target model (``model.requires_grad_(False)``, ``model.eval()``); gradients then reach only
the denoiser, through x_hat.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from raydefense.errors import ConfigError

__all__ = [
    "GUIDED_LOSSES",
    "GuidanceModel",
    "feature_guided_loss",
    "guided_loss",
    "logits_guided_loss",
    "pixel_guided_loss",
    "pixel_mse",
]


@runtime_checkable
class GuidanceModel(Protocol):
    """What the guided losses need from a target classifier (the models registry's contract).

    Inputs are [0, 1] images ``(B, 3, H, W)``; ``model(x)`` gives logits ``(B, C)``
    (layer l = -1), ``features(x)`` the pooled last-conv features ``(B, D)`` (l = -2),
    ``head(features)`` maps features to logits.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def head(self, features: torch.Tensor) -> torch.Tensor: ...


def _check_pair(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat and x must have the same shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}")


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def pixel_guided_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Pixel-guided loss: mean |x_hat - x| over all pixels (the paper's pixel-guided baseline).

    Shapes: ``(B, C, H, W), (B, C, H, W) -> scalar``.
    """
    _check_pair(x_hat, x)
    return _l1(x_hat, x.detach())


def pixel_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel error ``mean((x_hat - x)^2)``, the pixel term of :func:`guided_loss`.

    Shapes: ``(B, C, H, W), (B, C, H, W) -> scalar``; pixels in [0, 1], so the unit is a
    squared pixel value. Not in the paper (see :func:`guided_loss` for why it is here).
    """
    _check_pair(x_hat, x)
    return (x_hat - x.detach()).pow(2).mean()


def logits_guided_loss(model: GuidanceModel, x_hat: torch.Tensor, x: torch.Tensor, *,
                       reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits-guided loss, eq. 5 with l = -1: mean |model(x_hat) - model(x)|.

    ``reference``: ``model(x)`` already computed (:func:`guidance_reference`), e.g. once per
    training row for every epoch, since the target is frozen; computed here under no_grad when
    None. Shapes: images ``(B, C, H, W)``, logits ``(B, K)`` -> scalar.
    """
    _check_pair(x_hat, x)
    target = guidance_reference("logits", model, x) if reference is None else reference.detach()
    return _l1(model(x_hat), target)


def feature_guided_loss(model: GuidanceModel, x_hat: torch.Tensor, x: torch.Tensor, *,
                        reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Feature-guided loss, eq. 5 with l = -2: mean |model.features(x_hat) - model.features(x)|.

    ``reference``: ``model.features(x)`` already computed (see :func:`logits_guided_loss`).
    Shapes: images ``(B, C, H, W)``, features ``(B, D)`` -> scalar.
    """
    _check_pair(x_hat, x)
    target = guidance_reference("features", model, x) if reference is None else reference.detach()
    return _l1(model.features(x_hat), target)


@torch.no_grad()
def guidance_reference(kind: str, model: GuidanceModel | None, x: torch.Tensor) -> Optional[torch.Tensor]:
    """What eq. 5 compares the denoised image's layer-l output with: the frozen ``model``'s
    output on the clean images ``x`` ``(B, C, H, W)``, without gradient: logits ``(B, K)`` for
    ``'logits'``, features ``(B, D)`` for ``'features'``, None for ``'pixel'`` (no model).
    A function of ``x`` alone, so a training loop may compute it once per row and pass it to
    :func:`guided_loss` as ``reference`` every epoch."""
    if kind == "logits":
        return model(x)
    if kind == "features":
        return model.features(x)
    return None


#: Registry: loss kind -> ``fn(model, x_hat, x, reference=None)`` (``model`` and ``reference``
#: are ignored by ``'pixel'``).
GUIDED_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "pixel": lambda model, x_hat, x, reference=None: pixel_guided_loss(x_hat, x),
    "logits": logits_guided_loss,
    "features": feature_guided_loss,
}


def guided_loss(kind: str, model: GuidanceModel | None, x_hat: torch.Tensor, x: torch.Tensor, *,
                pixel_weight: float = 0.0, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch eq. 5 on ``kind`` in ``GUIDED_LOSSES`` (``'pixel'``, ``'logits'``, ``'features'``),
    plus ``pixel_weight`` times the pixel mean squared error (:func:`pixel_mse`) for the guided kinds.

    The pixel term is not in the paper (eq. 5 has only the layer-l term). Without it nothing
    ties x_hat to the clean image beyond what the target's logits see: on the default preset
    the logits-guided UDDN moved white-box images *away* from their clean originals (mean L1
    0.059 against 0.024 for the adversarial input), unlike the paper's Table 1 (0.0167 vs
    0.0373), as HGD's logits-guided denoiser did (Liao et al. 2018, section 5). The term is a
    squared error, not L1: its gradient is proportional to the residual error, and in the step
    budget of the default preset (a few hundred Adam steps) an L1 pixel loss left the UDDN at
    the identity while the squared error taught it to remove noise (measured; README, "Table 1
    at this scale"). ``denoise.pixel_weight`` in the config; the README has the accuracy / L1
    trade-off. The logit term is a per-element mean of absolute logit differences and the pixel
    term a per-element mean of squared pixel differences in [0, 1], so weights are in the
    thousands (a residual of 0.03 costs 9e-4 per pixel).

    ``reference``: :func:`guidance_reference` of ``x`` when the caller has it (the same loss,
    one frozen-model forward fewer per step).

    ``model`` may be None for ``'pixel'`` (whose ``pixel_weight`` is ignored). Unknown kinds
    raise :class:`ConfigError` listing the known ones; a negative weight raises ValueError.
    Returns a scalar.
    """
    try:
        fn = GUIDED_LOSSES[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"guided loss kind {kind!r} is unknown; choose one of {', '.join(GUIDED_LOSSES)}") from None
    if kind != "pixel" and model is None:
        raise ValueError(f"guided loss kind {kind!r} needs a target model, got None")
    if pixel_weight < 0:
        raise ValueError(f"pixel_weight must be >= 0, got {pixel_weight}")
    loss = fn(model, x_hat, x, reference=reference)
    if kind != "pixel" and pixel_weight > 0:
        loss = loss + pixel_weight * pixel_mse(x_hat, x)
    return loss
