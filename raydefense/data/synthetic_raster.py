"""The synthetic faces' raster toolkit: local frames (an affine map to pixels) and soft-edged
shapes (ellipse, box, capsule, ring) painted into their bounding box only, with analytic
one-pixel edges instead of supersampling. Used by :mod:`raydefense.data.synthetic`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class _Frame:
    """An affine map between pixel coordinates and a local frame.

    Local (u, v) maps to pixel x = cx + scale * (cos * squash * u - sin * v),
    y = cy + scale * (sin * squash * u + cos * v).
    """

    cx: float
    cy: float
    cos: float
    sin: float
    scale: float  # pixels per unit
    squash: float  # horizontal compression (yaw-like)

    @property
    def ppu(self) -> float:
        """Pixels per unit along the narrowest axis: the width of the soft edge."""
        return self.scale * min(self.squash, 1.0)

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        su = self.squash * u
        return (self.cx + self.scale * (self.cos * su - self.sin * v),
                self.cy + self.scale * (self.sin * su + self.cos * v))

    def grid(self, size: int, u0: float, v0: float, radius: float):
        """Local coordinates over the pixel box that holds a disc of ``radius`` at (u0, v0).

        Returns ``(rows, cols, u, v)`` with ``u``, ``v`` float32 of the box's shape, or None
        when the box misses the image.
        """
        px, py = self.to_pixel(u0, v0)
        half = radius * self.scale * max(self.squash, 1.0) + 2.0
        x0, x1 = max(int(math.floor(px - half)), 0), min(int(math.ceil(px + half)) + 1, size)
        y0, y1 = max(int(math.floor(py - half)), 0), min(int(math.ceil(py + half)) + 1, size)
        if x0 >= x1 or y0 >= y1:
            return None
        centres = _pixel_centres(size)
        dx = centres[x0:x1][None, :] - np.float32(self.cx)
        dy = centres[y0:y1][:, None] - np.float32(self.cy)
        ku = 1.0 / (self.scale * self.squash)
        u = (self.cos * ku) * dx + (self.sin * ku) * dy
        v = (-self.sin / self.scale) * dx + (self.cos / self.scale) * dy
        return slice(y0, y1), slice(x0, x1), u, v


@lru_cache(maxsize=32)
def _pixel_centres(size: int) -> np.ndarray:
    out = np.arange(size, dtype=np.float32) + np.float32(0.5)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=32)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) bilinear weights that stretch a ``cells``-long grid over ``size`` pixels."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size * (cells - 1)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    w = (pos - lo).astype(np.float32)
    out = np.zeros((size, cells), dtype=np.float32)
    out[np.arange(size), lo] = 1.0 - w
    out[np.arange(size), lo + 1] = w
    out.flags.writeable = False
    return out


# ----------------------------------------------------------------------------- shapes
# Each returns an alpha map in [0, 1] with a one-pixel soft edge: alpha = 0.5 - d * ppu,
# clipped, where d is an estimate of the signed distance to the outline in local units.


def _soft(dist: np.ndarray, ppu: float) -> np.ndarray:
    alpha = 0.5 - dist * ppu
    np.maximum(alpha, 0.0, out=alpha)  # ufuncs with out=: np.clip's wrapper costs more than the work
    return np.minimum(alpha, 1.0, out=alpha)


def _ellipse(u, v, cu, cv, ru, rv, ppu):
    du = (u - cu) * (1.0 / ru)
    dv = (v - cv) * (1.0 / rv)
    return _soft((np.sqrt(du * du + dv * dv) - 1.0) * min(ru, rv), ppu)


def _box(u, v, cu, cv, hu, hv, ppu, angle=0.0):
    du, dv = u - cu, v - cv
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    return _soft(np.maximum(np.abs(du) - hu, np.abs(dv) - hv), ppu)


def _capsule(u, v, p0, p1, r, ppu):
    """A segment from p0 to p1 thickened to radius r."""
    ax, ay = p1[0] - p0[0], p1[1] - p0[1]
    inv = 1.0 / max(ax * ax + ay * ay, 1e-12)
    du, dv = u - p0[0], v - p0[1]
    t = np.clip((du * ax + dv * ay) * inv, 0.0, 1.0)
    ex, ey = du - t * ax, dv - t * ay
    return _soft(np.sqrt(ex * ex + ey * ey) - r, ppu)


def _ring(u, v, cu, cv, ru, rv, width, ppu, square=False):
    """Outline of an ellipse (or of a rounded-corner box when ``square``) of line ``width``."""
    du = (u - cu) * (1.0 / ru)
    dv = (v - cv) * (1.0 / rv)
    if square:
        norm = np.maximum(np.abs(du), np.abs(dv))
    else:
        norm = np.sqrt(du * du + dv * dv)
    return _soft(np.abs(norm - 1.0) * min(ru, rv) - width, ppu)


def _paint(img, rows, cols, alpha, colour):
    """Blend ``colour`` ((3,) or (h, w, 3)) into ``img[rows, cols]`` with ``alpha`` (h, w)."""
    region = img[rows, cols]
    region += alpha[..., None] * (colour - region)


def _tri(x):
    """Triangle wave with period 1 and range [0, 1]; arithmetic only (no libm per pixel)."""
    f = x - np.floor(x)
    return np.abs(2.0 * f - 1.0)
