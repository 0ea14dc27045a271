"""JPEG compression as a defence (Dziugaite et al. 2016, "A study of the effect of JPG
compression on adversarial images"), the "Data Compression" baseline of Li & Wang (2019).

Three ways to run it:

- ``'real'``: the actual codec (Pillow / libjpeg, uint8 round trip). Not differentiable; an
  attack that needs gradients through it gets none (gradient masking).
- ``'differentiable'``: kornia's differentiable JPEG (Reich et al. 2024), a smooth
  approximation of the codec that attacks can backpropagate through.
- ``'bpda'``: the real codec forward, identity backward (Athalye et al. 2018, "Obfuscated
  Gradients Give a False Sense of Security", BPDA): the standard way to attack it.

Inputs are images in [0, 1] of shape ``(*, C, H, W)`` with C = 1 or 3.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from kornia.enhance import jpeg_codec_differentiable
from PIL import Image
from torch import nn

from raydefense.errors import ConfigError

__all__ = ["JPEG", "JPEG_MODES", "jpeg_compress", "jpeg_compress_differentiable"]

#: Modes :class:`JPEG` accepts.
JPEG_MODES = ("real", "differentiable", "bpda")

# Values this far outside [0, 1] are treated as float rounding, not as a wrong range.
_RANGE_TOL = 1e-4


def _check_quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be an int in [1, 100], got {quality!r}")
    return quality


def _check_images(x: torch.Tensor, name: str) -> None:
    if x.ndim < 3 or x.shape[-3] not in (1, 3):
        raise ValueError(f"{name} expects images of shape (*, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} expects float images in [0, 1], got dtype {x.dtype}")
    if x.numel() and (x.min() < -_RANGE_TOL or x.max() > 1 + _RANGE_TOL):
        raise ValueError(
            f"{name} expects images in [0, 1], got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]"
        )


def jpeg_compress(x: torch.Tensor, *, quality: int = 75) -> torch.Tensor:
    """Encode and decode each image with the real JPEG codec (Pillow), non-differentiable.

    Pixels are rounded to uint8, encoded at ``quality`` (Pillow's default 4:2:0 chroma
    subsampling for RGB; grayscale for C = 1), decoded, and scaled back to [0, 1].

    Args:
        x: images in [0, 1], ``(*, C, H, W)``, C in (1, 3).
        quality: JPEG quality in [1, 100] (75, Pillow's and Dziugaite et al.'s default).

    Returns:
        ``(*, C, H, W)`` on x's device and dtype, detached from any graph.
    """
    quality = _check_quality(quality)
    _check_images(x, "jpeg_compress")
    shape = x.shape
    c = shape[-3]
    batch = x.detach().reshape(-1, *shape[-3:])
    pixels = (batch * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, img in enumerate(pixels):
        pil = Image.fromarray(np.ascontiguousarray(img[..., 0] if c == 1 else img))  # "L" / "RGB"
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            arr = np.asarray(decoded.convert("L" if c == 1 else "RGB"))
        out[i] = arr[..., None] if c == 1 else arr
    result = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255
    return result.reshape(shape)


def jpeg_compress_differentiable(x: torch.Tensor, *, quality: int = 75) -> torch.Tensor:
    """kornia's differentiable JPEG (``kornia.enhance.jpeg_codec_differentiable``).

    Approximates :func:`jpeg_compress` with smooth rounding so gradients flow to x. The
    image is replicate-padded on the bottom and right to a multiple of 16 (the 4:2:0 MCU;
    libjpeg pads the same way) and cropped back, so any H, W works whatever kornia version
    is installed. Grayscale images go through the codec as gray RGB (zero chroma) and come
    back as one channel.

    Args:
        x: images in [0, 1], ``(*, C, H, W)``, C in (1, 3).
        quality: JPEG quality in [1, 100].

    Returns:
        ``(*, C, H, W)``, same device and dtype, differentiable w.r.t. x.
    """
    quality = _check_quality(quality)
    _check_images(x, "jpeg_compress_differentiable")
    shape = x.shape
    c, h, w = shape[-3:]
    batch = x.reshape(-1, c, h, w)
    if c == 1:
        batch = batch.expand(-1, 3, h, w)
    pad_h = math.ceil(h / 16) * 16 - h
    pad_w = math.ceil(w / 16) * 16 - w
    if pad_h or pad_w:
        batch = F.pad(batch, (0, pad_w, 0, pad_h), mode="replicate")
    q = torch.tensor([float(quality)], device=x.device, dtype=x.dtype)
    out = jpeg_codec_differentiable(batch, q)[..., :h, :w]
    if c == 1:
        out = out.mean(dim=-3, keepdim=True)
    return out.reshape(shape)


class _BPDAJPEG(torch.autograd.Function):
    """Real JPEG forward, identity backward (BPDA, Athalye et al. 2018)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quality: int) -> torch.Tensor:  # noqa: D102
        return jpeg_compress(x, quality=quality)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        return grad_output, None


class JPEG(nn.Module):
    """JPEG compression as a preprocessing module (Dziugaite et al. 2016).

    Args:
        quality: JPEG quality in [1, 100] (default 75).
        mode: ``'real'`` (Pillow codec, no gradient), ``'differentiable'`` (kornia's
            approximation) or ``'bpda'`` (real codec forward, identity gradient; Athalye et
            al. 2018). Use ``'real'`` or ``'bpda'`` to evaluate: they run the true codec.

    Shapes: ``(*, C, H, W) -> (*, C, H, W)``, C in (1, 3), values in [0, 1].
    """

    def __init__(self, *, quality: int = 75, mode: str = "bpda") -> None:
        super().__init__()
        if mode not in JPEG_MODES:
            raise ConfigError(f"JPEG mode {mode!r} is unknown; choose one of {', '.join(JPEG_MODES)}")
        self.quality = _check_quality(quality)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "real":
            return jpeg_compress(x, quality=self.quality)
        if self.mode == "differentiable":
            return jpeg_compress_differentiable(x, quality=self.quality)
        _check_images(x, "JPEG")
        return _BPDAJPEG.apply(x, self.quality)

    def extra_repr(self) -> str:
        return f"quality={self.quality}, mode={self.mode!r}"
