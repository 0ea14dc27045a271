"""Embedded synthetic identity dataset: cartoon faces drawn from a seed, no download.

It stands in for LFW (Huang et al., "Labeled Faces in the Wild", 2007), the data set of
Li & Wang (2019), section 5.1, so that the whole defense runs on a laptop with no data.

Each identity ``i`` has fixed traits drawn from ``default_rng([seed, 0, i])``: face shape
(width, length, jaw), skin tone, hair colour and style (bald, short, long, fringe, volume),
eye spacing / size / iris colour, eyebrows, nose, mouth, ears, and optional marks (beard,
moustache, glasses, mole, blush). Image ``k`` of identity ``i`` draws its own variation
from ``default_rng([seed, 1, i, k])``: pose (in-plane rotation, yaw-like squash and feature
shift, pitch), scale, translation, lighting (gain, contrast, directional gradient, colour
cast), background (gradient, low-frequency texture, clutter shapes), clothing, expression
(mouth open, smile, eye openness, gaze, eyebrow raise), occluders (bars, blobs, hands,
hats), blur and sensor noise. ``difficulty`` scales all within-identity variation:
0 gives (almost) the same image every time, 1 is the default that the project is tuned
for (see ``bench/synthetic_difficulty.py``).

Images are pure functions of ``(identity, index, image_size, seed, difficulty)``: each
image is drawn alone from its own generator, so shards rendered in parallel workers give
exactly the dataset a single call gives. Shapes are drawn at 1x with analytic soft edges
(signed distance to the outline, one pixel wide) instead of supersampling, and each shape
only touches its own bounding box, which keeps rendering fast (several hundred 80x80
images per second on one core).

The three seed words ``[seed, tag, ...]`` carry a tag because NumPy's ``SeedSequence`` pads
short entropy with zeros: ``[s, i]`` and ``[s, i, 0]`` would otherwise seed the same stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from raydefense.errors import ConfigError
from raydefense.seeding import numpy_rng

__all__ = ["render_identity_images", "make_synthetic_faces"]

# Tags that keep the identity stream and the image streams apart (see module docstring).
_TRAIT_TAG = 0
_IMAGE_TAG = 1

MIN_IMAGE_SIZE = 16  # below this the features are sub-pixel; 32..160 is the tested range
MAX_DIFFICULTY = 3.0  # beyond this faces leave the frame most of the time
# Internal variation scale at difficulty 1, tuned with bench/synthetic_difficulty.py: with
# it, FaceNet trained 8 epochs on 30 images x 16 identities scores ~0.87-0.89 clean test
# accuracy (0.77 at 1.0, 0.84 at 0.8, 0.92-0.94 at 0.7) and ~0.24-0.28 under FGSM 8/255.
_SPREAD_AT_ONE = 0.75

# RGB palettes in [0, 1].
_SKIN_TONES = np.array(
    [
        (0.98, 0.86, 0.76), (0.95, 0.79, 0.66), (0.89, 0.70, 0.56), (0.80, 0.60, 0.45),
        (0.69, 0.49, 0.34), (0.57, 0.39, 0.26), (0.45, 0.30, 0.20), (0.34, 0.23, 0.16),
    ],
    dtype=np.float32,
)
_HAIR_COLOURS = np.array(
    [
        (0.07, 0.06, 0.06), (0.20, 0.13, 0.09), (0.40, 0.26, 0.15), (0.55, 0.26, 0.11),
        (0.86, 0.73, 0.46), (0.66, 0.66, 0.66), (0.78, 0.40, 0.16), (0.93, 0.92, 0.88),
    ],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array(
    [
        (0.36, 0.21, 0.10), (0.14, 0.08, 0.05), (0.24, 0.45, 0.72), (0.28, 0.52, 0.30),
        (0.50, 0.56, 0.62), (0.52, 0.42, 0.20),
    ],
    dtype=np.float32,
)
_FRAME_COLOURS = np.array(
    [(0.05, 0.05, 0.05), (0.55, 0.55, 0.58), (0.45, 0.20, 0.10), (0.10, 0.15, 0.45)],
    dtype=np.float32,
)
_SCLERA = np.array((0.93, 0.91, 0.88), dtype=np.float32)
_MOUTH_INSIDE = np.array((0.25, 0.06, 0.07), dtype=np.float32)
_TEETH = np.array((0.92, 0.90, 0.84), dtype=np.float32)
_BLACK = np.zeros(3, dtype=np.float32)

# Hair styles.
_BALD, _SHORT, _LONG, _FRINGE, _VOLUME = range(5)


@dataclass(frozen=True)
class _Traits:
    """Fixed appearance of one identity, in face units (face half-height = 1)."""

    face_rw: float  # half-width of the face
    face_len: float  # half-height multiplier
    jaw: float  # how much the lower half narrows towards the chin
    skin: np.ndarray
    hair: np.ndarray
    hair_style: int
    hairline: float  # v of the hairline at the centre (negative = up)
    hair_volume: float
    hair_part: float
    eye_dx: float
    eye_v: float
    eye_rw: float
    eye_rh: float
    iris: np.ndarray
    brow_thick: float
    brow_gap: float
    brow_slope: float
    brow_len: float
    brow: np.ndarray
    nose_len: float
    nose_w: float
    mouth_v: float
    mouth_rw: float
    lip_h: float
    lips: np.ndarray
    ear_size: float
    beard: bool
    moustache: bool
    glasses: int  # 0 none, 1 round, 2 rectangular
    sunglasses: bool
    frame: np.ndarray
    mole: tuple[float, float] | None
    blush: float


def _identity_traits(identity: int, seed: int) -> _Traits:
    """Draw the fixed traits of ``identity`` (every draw happens, whatever the branches)."""
    rng = numpy_rng(seed, _TRAIT_TAG, identity)
    u = rng.random(40)  # uniform draws, used in order below
    skin = _SKIN_TONES[int(u[0] * len(_SKIN_TONES))] + (rng.random(3).astype(np.float32) - 0.5) * 0.06
    hair = _HAIR_COLOURS[int(u[1] * len(_HAIR_COLOURS))] + (rng.random(3).astype(np.float32) - 0.5) * 0.08
    iris = _IRIS_COLOURS[int(u[2] * len(_IRIS_COLOURS))]
    hair_style = int(u[3] * 5)
    hairline = -0.72 + 0.22 * u[4]
    if hair_style == _FRINGE:
        hairline = -0.42 + 0.10 * u[4]
    lips = 0.55 * skin + 0.45 * np.array((0.72, 0.28, 0.30), dtype=np.float32)
    brow = np.clip(hair * 0.75, 0.0, 1.0) if hair_style != _BALD else skin * 0.45
    mole = (float((u[5] - 0.5) * 1.0), float(0.05 + u[6] * 0.6)) if u[7] < 0.35 else None
    glasses = 0 if u[8] < 0.72 else (1 if u[9] < 0.5 else 2)
    return _Traits(
        face_rw=0.66 + 0.20 * u[10],
        face_len=0.95 + 0.13 * u[11],
        jaw=-0.05 + 0.40 * u[12],
        skin=np.clip(skin, 0.0, 1.0).astype(np.float32),
        hair=np.clip(hair, 0.0, 1.0).astype(np.float32),
        hair_style=hair_style,
        hairline=float(hairline),
        hair_volume=1.04 + 0.22 * u[13],
        hair_part=float((u[14] - 0.5) * 0.6),
        eye_dx=0.27 + 0.13 * u[15],
        eye_v=-0.16 + 0.16 * u[16],
        eye_rw=0.09 + 0.05 * u[17],
        eye_rh=0.040 + 0.028 * u[18],
        iris=iris,
        brow_thick=0.022 + 0.040 * u[19],
        brow_gap=0.12 + 0.09 * u[20],
        brow_slope=-0.10 + 0.22 * u[21],
        brow_len=0.13 + 0.10 * u[22],
        brow=brow.astype(np.float32),
        nose_len=0.24 + 0.17 * u[23],
        nose_w=0.07 + 0.08 * u[24],
        mouth_v=0.48 + 0.17 * u[25],
        mouth_rw=0.15 + 0.14 * u[26],
        lip_h=0.028 + 0.035 * u[27],
        lips=lips.astype(np.float32),
        ear_size=0.11 + 0.09 * u[28],
        beard=bool(u[29] < 0.2),
        moustache=bool(u[30] < 0.22),
        glasses=glasses,
        sunglasses=bool(glasses and u[31] < 0.3),
        frame=_FRAME_COLOURS[int(u[32] * len(_FRAME_COLOURS))],
        mole=mole,
        blush=float(u[33] * 0.25) if u[34] < 0.3 else 0.0,
    )


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


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class _Shot:
    """The variation of one image, already scaled by the difficulty ``d``.

    Lengths are in face units (face half-height = 1) unless named otherwise.
    """

    d: float
    # Background: gradient colours and direction, texture cells, clutter shapes.
    bg0: np.ndarray
    bg1: np.ndarray
    bg_angle: float
    bg_texture: np.ndarray  # (5, 5, 3), zero-mean
    clutter: np.ndarray  # (k, 9): kind, x, y, radius, aspect, angle / red, green, blue
    # Pose of the face in the picture.
    angle: float  # in-plane rotation, radians
    yaw: float  # -1..1: squashes the face, slides inner features sideways
    pitch: float  # -1..1: slides inner features up / down
    scale: float  # pixels per face unit
    cx: float  # face centre, pixels
    cy: float
    # Appearance and expression.
    cloth: np.ndarray
    hair_gain: float
    brow_raise: float
    openness: float  # eye openness, 1 = wide open
    gaze_u: float  # iris offset, in eye half-widths
    gaze_v: float  # iris offset, in eye half-heights
    smile: float  # mouth curvature, > 0 corners up
    mouth_open: float  # 0..1
    # Occluders.
    hat: bool
    hat_brim: float
    occluder: str  # "", "bar", "blob" or "hand"
    occ: np.ndarray  # (12,) uniform parameters of the occluder
    occ_colour: np.ndarray
    # Camera: lighting, optics, sensor.
    contrast: float
    gain: float
    light_angle: float
    light_strength: float
    cast: np.ndarray  # per-channel gains
    blur_sigma: float  # pixels
    noise: np.ndarray  # (H, W, 3), zero-mean uniform

    @property
    def shift(self) -> float:
        """Sideways slide of the inner features under yaw."""
        return 0.10 * self.yaw

    @property
    def lift(self) -> float:
        """Vertical slide of the inner features under pitch."""
        return 0.06 * self.pitch


def _draw_shot(identity: int, index: int, size: int, seed: int, d: float) -> _Shot:
    """Draw the variation of image ``index`` of ``identity`` from its own generator."""
    rng = numpy_rng(seed, _IMAGE_TAG, identity, index)
    # Every variate is drawn, in this order, whatever the branches take: a change of
    # ``difficulty`` scales the variation but never shifts the stream.
    z = rng.standard_normal(24)
    r = rng.random(24)
    bg = rng.random((2, 3)).astype(np.float32)
    bg_texture = rng.random((5, 5, 3)).astype(np.float32)
    clutter = rng.random((6, 9))
    occ = rng.random(12)
    occ_colour = rng.random(3).astype(np.float32)
    cloth = rng.random(3).astype(np.float32)
    noise = rng.random((size, size, 3), dtype=np.float32)  # uniform: a third of a normal's cost

    mix = min(d, 1.0)  # colours fade to grey as d goes to 0
    grey = np.float32(0.5)
    noise_std = (1.0 + 6.0 * d * r[6]) / 255.0
    noise -= 0.5
    noise *= np.float32(noise_std * math.sqrt(12.0))  # uniform noise with standard deviation noise_std
    if occ[2] >= 0.30 * d:
        occluder = ""
    else:
        occluder = "bar" if occ[3] < 0.35 else ("blob" if occ[3] < 0.65 else "hand")
    return _Shot(
        d=d,
        bg0=grey + (bg[0] - grey) * mix,
        bg1=grey + (bg[1] - grey) * mix,
        bg_angle=2.0 * math.pi * r[0],
        bg_texture=bg_texture - 0.5,
        clutter=clutter[:min(int(r[1] * 7.0 * mix), 6)],
        angle=float(np.clip(z[0] * 0.17 * d, -0.5, 0.5)),  # ~10 degrees at d = 1
        yaw=float(np.clip(z[1] * 0.40 * d, -0.9, 0.9)),
        pitch=float(np.clip(z[2] * 0.35 * d, -0.8, 0.8)),
        scale=size * 0.30 * math.exp(float(np.clip(z[3] * 0.10 * d, -0.3, 0.3))),
        cx=size * (0.5 + float(np.clip(z[4] * 0.05 * d, -0.15, 0.15))),
        cy=size * (0.54 + float(np.clip(z[5] * 0.05 * d, -0.15, 0.15))),
        cloth=np.float32(0.45) + (cloth - np.float32(0.45)) * mix,
        hair_gain=1.0 + z[6] * 0.05 * d,
        brow_raise=float(np.clip(z[7] * 0.035 * d, -0.06, 0.08)),
        openness=float(np.clip(1.0 - abs(z[8]) * 0.35 * d, 0.08, 1.0)),
        gaze_u=float(np.clip(z[9] * 0.25 * d, -0.5, 0.5)),
        gaze_v=float(np.clip(z[10] * 0.15 * d, -0.3, 0.3)),
        smile=float(np.clip(z[11] * 0.9 * d, -1.5, 2.0)),
        mouth_open=float(np.clip(z[12] * 0.8 * d, 0.0, 1.0)) if r[2] < 0.5 else 0.0,
        hat=bool(occ[0] < 0.12 * d),
        hat_brim=-0.45 - 0.25 * occ[1],
        occluder=occluder,
        occ=occ,
        occ_colour=occ_colour,
        contrast=math.exp(float(np.clip(z[13] * 0.18 * d, -0.5, 0.5))),
        gain=math.exp(float(np.clip(z[14] * 0.22 * d, -0.6, 0.6))),
        light_angle=2.0 * math.pi * r[3],
        light_strength=0.40 * d * r[4],
        cast=np.exp(np.clip(z[15:18] * 0.06 * d, -0.2, 0.2)).astype(np.float32),
        blur_sigma=0.9 * d * r[5],
        noise=noise,
    )


def _draw_background(img: np.ndarray, s: _Shot) -> None:
    """Two-colour linear gradient, low-frequency texture, clutter shapes."""
    size = img.shape[0]
    unit = _pixel_centres(size) * (2.0 / size) - 1.0  # [-1, 1] across the image
    ramp = np.clip(0.5 + 0.5 * (math.cos(s.bg_angle) * unit[None, :] + math.sin(s.bg_angle) * unit[:, None]), 0.0, 1.0)
    img[...] = s.bg0 + ramp[..., None] * (s.bg1 - s.bg0)
    up = _upsample_matrix(size, 5)
    tex = (up @ s.bg_texture.reshape(5, 15)).reshape(size, 5, 3).transpose(0, 2, 1) @ up.T  # (H, 3, W)
    img += (0.22 * s.d) * tex.transpose(0, 2, 1)
    pixel = _Frame(0.0, 0.0, 1.0, 0.0, 1.0, 1.0)
    for kind, px, py, rad, asp, ca, cr, cg, cb in s.clutter:
        rad_px = size * (0.06 + 0.2 * rad)
        g = pixel.grid(size, px * size, py * size, rad_px * 1.5)
        if g is None:
            continue
        rows, cols, u, v = g
        if kind < 0.5:
            a = _ellipse(u, v, px * size, py * size, rad_px, rad_px * (0.4 + asp), 1.0)
        else:
            a = _box(u, v, px * size, py * size, rad_px, rad_px * (0.3 + asp), 1.0, angle=ca * math.pi)
        _paint(img, rows, cols, a, np.array((cr, cg, cb), dtype=np.float32))


def _face_radius(t: _Traits, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Normalised radius of the egg-shaped face outline (1 on the outline)."""
    narrow = 1.0 - t.jaw * np.clip(v, 0.0, 1.0)  # the lower half narrows towards the chin
    du = u * (1.0 / t.face_rw) / narrow
    dv = v * (1.0 / t.face_len)
    return np.sqrt(du * du + dv * dv)


def _draw_head(img: np.ndarray, t: _Traits, s: _Shot, face: _Frame) -> None:
    """Clothes, neck, hair behind the head, ears, the shaded face, hair on top."""
    size, ppu = img.shape[0], face.ppu
    g = face.grid(size, 0.0, 2.25, 1.9)
    if g is not None:
        rows, cols, u, v = g
        _paint(img, rows, cols, _ellipse(u, v, 0.0, 2.25, 1.9, 1.0, ppu), s.cloth)
    g = face.grid(size, 0.0, 1.05, 0.6)
    if g is not None:
        rows, cols, u, v = g
        _paint(img, rows, cols, _box(u, v, 0.0, 1.0, 0.32 * t.face_rw / 0.75, 0.45, ppu), t.skin * 0.82)

    hair = np.clip(t.hair * s.hair_gain, 0.0, 1.0).astype(np.float32)
    if t.hair_style in (_LONG, _VOLUME):  # falls behind the face
        rw = t.face_rw * (1.35 if t.hair_style == _LONG else 1.55)
        rv = 1.30 if t.hair_style == _LONG else 1.25
        g = face.grid(size, 0.0, 0.05, max(rw, rv))
        if g is not None:
            rows, cols, u, v = g
            _paint(img, rows, cols, _ellipse(u, v, 0.0, 0.05, rw, rv, ppu), hair * 0.9)

    for side in (-1.0, 1.0):
        eu = side * (t.face_rw * (1.0 - 0.12 * side * s.yaw) - 0.01)
        g = face.grid(size, eu, t.eye_v + 0.12, t.ear_size + 0.1)
        if g is not None:
            rows, cols, u, v = g
            _paint(img, rows, cols, _ellipse(u, v, eu, t.eye_v + 0.12, 0.085, t.ear_size, ppu), t.skin * 0.9)
    g = face.grid(size, 0.0, 0.0, 1.2)
    if g is not None:
        rows, cols, u, v = g
        rho = _face_radius(t, u, v)
        alpha = _soft((rho - 1.0) * t.face_rw, ppu)
        # Darker towards the outline, lit from the side the face turns to.
        shade = (1.0 - 0.20 * np.clip(rho, 0.0, 1.0) ** 2) * (1.0 + 0.12 * s.yaw * np.clip(u, -1.0, 1.0))
        _paint(img, rows, cols, alpha, shade[..., None] * t.skin)
        if t.blush:
            for side in (-1.0, 1.0):
                a = _ellipse(u, v, side * t.eye_dx * 1.1 + s.shift, 0.28, 0.16, 0.10, ppu) * (t.blush * alpha)
                _paint(img, rows, cols, a, np.array((0.85, 0.35, 0.35), dtype=np.float32))

    if t.hair_style != _BALD:
        vol = t.hair_volume * (1.15 if t.hair_style == _VOLUME else 1.0)
        g = face.grid(size, 0.0, -0.2, 1.1 * vol + 0.3)
        if g is not None:
            rows, cols, u, v = g
            cap = _ellipse(u, v, 0.0, -0.15, t.face_rw * vol * 1.04, 1.02 * vol, ppu)
            line = t.hairline + 0.55 * (u - t.hair_part * 0.3) ** 2  # lower at the temples
            if t.hair_style == _FRINGE:
                line = line + 0.05 * _tri(u * 7.0)
            cap = cap * _soft(v - line, ppu)
            strands = 1.0 + 0.10 * (_tri(u * 9.0 + 0.3 * v) - 0.5)
            _paint(img, rows, cols, cap, strands[..., None] * hair)


def _draw_features(img: np.ndarray, t: _Traits, s: _Shot, face: _Frame) -> None:
    """Eyebrows, eyes, nose, mouth, facial hair, glasses, mole."""
    size, ppu, shift, lift = img.shape[0], face.ppu, s.shift, s.lift
    for side in (-1.0, 1.0):
        cu = side * t.eye_dx + shift
        cv = t.eye_v - t.brow_gap - s.brow_raise + lift
        p0 = (cu - side * t.brow_len * 0.5, cv + t.brow_slope * 0.5 * t.brow_len)
        p1 = (cu + side * t.brow_len * 0.5, cv - t.brow_slope * 0.5 * t.brow_len)
        g = face.grid(size, cu, cv, t.brow_len + t.brow_thick + 0.05)
        if g is not None:
            rows, cols, u, v = g
            _paint(img, rows, cols, _capsule(u, v, p0, p1, t.brow_thick, ppu), t.brow)

    # Eyes: sclera, iris and pupil (clipped to the sclera), outline.
    gaze_u, gaze_v = s.gaze_u * t.eye_rw, s.gaze_v * t.eye_rh
    for side in (-1.0, 1.0):
        cu, cv = side * t.eye_dx + shift, t.eye_v + lift
        rh = t.eye_rh * s.openness
        g = face.grid(size, cu, cv, t.eye_rw + 0.06)
        if g is None:
            continue
        rows, cols, u, v = g
        sclera = _ellipse(u, v, cu, cv, t.eye_rw, rh, ppu)
        _paint(img, rows, cols, sclera, _SCLERA)
        iris_r = t.eye_rh * 1.05
        _paint(img, rows, cols, _ellipse(u, v, cu + gaze_u, cv + gaze_v, iris_r, iris_r, ppu) * sclera, t.iris)
        pupil = _ellipse(u, v, cu + gaze_u, cv + gaze_v, iris_r * 0.45, iris_r * 0.45, ppu)
        _paint(img, rows, cols, pupil * sclera, _BLACK)
        _paint(img, rows, cols, _ring(u, v, cu, cv, t.eye_rw, rh, 0.008, ppu) * 0.8, t.skin * 0.3)

    # Nose: a shaded ridge and two nostrils.
    g = face.grid(size, shift * 1.5, t.eye_v + t.nose_len * 0.6, t.nose_len + 0.2)
    if g is not None:
        rows, cols, u, v = g
        top = (shift * 1.2, t.eye_v + 0.06 + lift)
        tip = (shift * 1.8, t.eye_v + t.nose_len + lift)
        _paint(img, rows, cols, _capsule(u, v, top, tip, t.nose_w * 0.3, ppu) * 0.45, t.skin * 0.72)
        for side in (-1.0, 1.0):
            a = _ellipse(u, v, tip[0] + side * t.nose_w * 0.55, tip[1] + 0.02, t.nose_w * 0.32, 0.025, ppu)
            _paint(img, rows, cols, a * 0.85, t.skin * 0.4)

    # Mouth: lips bent by the smile; an open mouth shows its inside and teeth.
    mu, mv = shift * 1.2, t.mouth_v + lift
    g = face.grid(size, mu, mv, t.mouth_rw + 0.15)
    if g is not None:
        rows, cols, u, v = g
        bent = v + s.smile * 1.2 * (u - mu) ** 2
        lip_h = t.lip_h * (1.0 + 1.6 * s.mouth_open)
        _paint(img, rows, cols, _ellipse(u, bent, mu, mv, t.mouth_rw, lip_h, ppu), t.lips)
        if s.mouth_open > 0.05:
            inner_h = lip_h * 0.65 * s.mouth_open
            inside = _ellipse(u, bent, mu, mv, t.mouth_rw * 0.8, inner_h, ppu)
            _paint(img, rows, cols, inside, _MOUTH_INSIDE)
            teeth = inside * _soft(bent - (mv - inner_h * 0.4), ppu)
            _paint(img, rows, cols, teeth, _TEETH)
        else:
            seam = _capsule(u, bent, (mu - t.mouth_rw * 0.85, mv), (mu + t.mouth_rw * 0.85, mv), 0.006, ppu)
            _paint(img, rows, cols, seam * 0.7, t.lips * 0.5)

    hair = np.clip(t.hair * s.hair_gain, 0.0, 1.0).astype(np.float32)
    if t.beard:  # the lower face below the cheeks, minus the mouth
        g = face.grid(size, 0.0, 0.65, 1.0)
        if g is not None:
            rows, cols, u, v = g
            inside_face = _soft((_face_radius(t, u, v) - 1.03) * t.face_rw, ppu)
            below = _soft(t.mouth_v - 0.12 - v + 0.25 * np.abs(u), ppu)
            clear = 1.0 - _ellipse(u, v + s.smile * 1.2 * (u - mu) ** 2, mu, mv, t.mouth_rw * 1.05, t.lip_h * 1.8, ppu)
            texture = 0.88 + 0.12 * _tri(u * 13.0 + v * 5.0)
            _paint(img, rows, cols, inside_face * below * clear * 0.9, texture[..., None] * hair * 0.9)
    if t.moustache:
        g = face.grid(size, mu, mv - 0.08, t.mouth_rw + 0.1)
        if g is not None:
            rows, cols, u, v = g
            a = _capsule(u, v, (mu - t.mouth_rw * 0.9, mv - 0.02), (mu + t.mouth_rw * 0.9, mv - 0.02), 0.035, ppu)
            a = a * _soft(v - (mv - t.lip_h - 0.02) - 0.06, ppu)  # keep it above the upper lip
            _paint(img, rows, cols, a, hair * 0.85)

    if t.glasses:
        ru, rv = t.eye_rw * 1.7, t.eye_rw * 1.25
        for side in (-1.0, 1.0):
            cu, cv = side * t.eye_dx + shift, t.eye_v + lift
            g = face.grid(size, cu, cv, ru + 0.05)
            if g is None:
                continue
            rows, cols, u, v = g
            if t.sunglasses:
                lens = _ellipse(u, v, cu, cv, ru, rv, ppu) if t.glasses == 1 else _box(u, v, cu, cv, ru, rv, ppu)
                _paint(img, rows, cols, lens * 0.85, np.array((0.08, 0.08, 0.1), dtype=np.float32))
            _paint(img, rows, cols, _ring(u, v, cu, cv, ru, rv, 0.018, ppu, square=t.glasses == 2), t.frame)
        g = face.grid(size, shift, t.eye_v + lift, 0.2)
        if g is not None:
            rows, cols, u, v = g
            inner = t.eye_dx - ru
            bridge_v = t.eye_v + lift - 0.02
            _paint(img, rows, cols, _capsule(u, v, (shift - inner, bridge_v), (shift + inner, bridge_v), 0.016, ppu), t.frame)

    if t.mole is not None:
        mole_u, mole_v = t.mole[0] * t.face_rw + shift, t.mole[1] + lift
        g = face.grid(size, mole_u, mole_v, 0.1)
        if g is not None:
            rows, cols, u, v = g
            _paint(img, rows, cols, _ellipse(u, v, mole_u, mole_v, 0.035, 0.035, ppu), t.skin * 0.35)


def _draw_occluders(img: np.ndarray, t: _Traits, s: _Shot, face: _Frame) -> None:
    """A hat, then one of: a bar (scarf, strap, microphone), a blob, a hand."""
    size, ppu, occ = img.shape[0], face.ppu, s.occ
    if s.hat:
        g = face.grid(size, 0.0, -0.95, 1.4)
        if g is not None:
            rows, cols, u, v = g
            crown = _ellipse(u, v, 0.0, s.hat_brim, t.face_rw * 1.2, 0.75, ppu) * _soft(v - s.hat_brim, ppu)
            crown = np.maximum(crown, _box(u, v, 0.0, s.hat_brim, t.face_rw * 1.45, 0.035, ppu))
            _paint(img, rows, cols, crown, s.occ_colour)
    ou, ov = (occ[4] - 0.5) * 1.2, (occ[5] - 0.35) * 1.6
    if s.occluder == "bar":
        g = face.grid(size, ou, ov, 1.6)
        if g is not None:
            rows, cols, u, v = g
            a = _box(u, v, ou, ov, 0.5 + 0.8 * occ[6], 0.07 + 0.15 * occ[7], ppu, angle=(occ[8] - 0.5) * math.pi)
            _paint(img, rows, cols, a, s.occ_colour)
    elif s.occluder == "blob":
        ru, rv = 0.18 + 0.3 * occ[6], 0.15 + 0.3 * occ[7]
        g = face.grid(size, ou, ov, max(ru, rv))
        if g is not None:
            rows, cols, u, v = g
            _paint(img, rows, cols, _ellipse(u, v, ou, ov, ru, rv, ppu), s.occ_colour)
    elif s.occluder == "hand":  # palm and four fingers, in some skin tone, from below
        hand = _SKIN_TONES[int(occ[9] * len(_SKIN_TONES))]
        hu, hv = (occ[4] - 0.5) * 1.0, 0.5 + 0.5 * occ[5]
        tilt = (occ[8] - 0.5) * 1.4
        dirx, diry = math.sin(tilt), -math.cos(tilt)
        g = face.grid(size, hu, hv - 0.3, 1.0)
        if g is not None:
            rows, cols, u, v = g
            a = _ellipse(u, v, hu, hv, 0.30, 0.34, ppu)
            for f in range(4):
                off = (f - 1.5) * 0.13
                base = (hu + off * math.cos(tilt) + dirx * 0.2, hv + off * math.sin(tilt) + diry * 0.2)
                length = 0.34 - 0.06 * abs(f - 1.5)
                a = np.maximum(a, _capsule(u, v, base, (base[0] + dirx * length, base[1] + diry * length), 0.055, ppu))
            _paint(img, rows, cols, a, hand)


def _apply_camera(img: np.ndarray, s: _Shot) -> np.ndarray:
    """Contrast, gain, a directional light gradient, a colour cast; then blur and noise."""
    size = img.shape[0]
    unit = _pixel_centres(size) * (2.0 / size) - 1.0
    slope = 1.0 + s.light_strength * (math.cos(s.light_angle) * unit[None, :] + math.sin(s.light_angle) * unit[:, None])
    img -= 0.5
    img *= s.contrast
    img += 0.5
    img *= (s.gain * slope)[..., None] * s.cast
    if s.blur_sigma > 0.25:
        img = _gaussian_blur(img, s.blur_sigma)
    img += s.noise
    return img


def _render_one(t: _Traits, identity: int, index: int, size: int, seed: int, d: float) -> np.ndarray:
    """Draw image ``index`` of an identity with traits ``t``: float32 (size, size, 3), about [0, 1]."""
    s = _draw_shot(identity, index, size, seed, d)
    img = np.empty((size, size, 3), dtype=np.float32)
    _draw_background(img, s)
    face = _Frame(s.cx, s.cy, math.cos(s.angle), math.sin(s.angle), s.scale, 1.0 - 0.12 * abs(s.yaw))
    _draw_head(img, t, s, face)
    _draw_features(img, t, s, face)
    _draw_occluders(img, t, s, face)
    return _apply_camera(img, s)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) image with edge padding (arithmetic only)."""
    radius = max(1, int(math.ceil(2.0 * sigma)))
    weights = [math.exp(-(k * k) / (2.0 * sigma * sigma)) for k in range(-radius, radius + 1)]
    total = sum(weights)
    weights = [w / total for w in weights]
    h, w = img.shape[:2]
    pad = np.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    rows = sum(wk * pad[k:k + h] for k, wk in enumerate(weights))
    pad = np.pad(rows, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(wk * pad[:, k:k + w] for k, wk in enumerate(weights)).astype(np.float32)


# ----------------------------------------------------------------------------- public API


def _check_common(*, image_size: int, seed: int, difficulty: float) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(difficulty, (int, float, np.floating)) and 0.0 <= float(difficulty) <= MAX_DIFFICULTY):
        raise ConfigError(f"difficulty must be a number in [0, {MAX_DIFFICULTY}], got {difficulty!r}")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def render_identity_images(
    identity: int,
    indices: Sequence[int],
    *,
    image_size: int,
    seed: int,
    difficulty: float = 1.0,
) -> np.ndarray:
    """Render images ``indices`` of synthetic identity ``identity``.

    A pure function of ``(identity, index, image_size, seed, difficulty)`` per image: image
    ``k`` is the same whichever other indices the call renders, so shards rendered apart
    (Ray workers) equal one call. Stands in for LFW faces (Li & Wang 2019, section 5.1).

    Args:
        identity: non-negative identity number; fixes the face's traits.
        indices: non-negative image numbers within the identity; fix the pose, lighting,
            background, expression, occluders and noise.
        image_size: side H = W in pixels (>= 16; 32..160 is the tested range).
        seed: non-negative dataset seed; another seed gives another population.
        difficulty: scale of the within-identity variation, 0 (nearly identical images)
            to 3; 1 (default) is tuned so a FaceNet-sized model trained briefly reaches
            high but imperfect accuracy (``bench/synthetic_difficulty.py``).

    Returns:
        uint8 array (len(indices), H, W, 3), RGB.
    """
    _check_count("identity", identity)
    _check_common(image_size=image_size, seed=seed, difficulty=difficulty)
    indices = list(indices)
    for k in indices:
        _check_count("image index", k)
    traits = _identity_traits(int(identity), int(seed))
    out = np.empty((len(indices), image_size, image_size, 3), dtype=np.uint8)
    for n, k in enumerate(indices):
        img = _render_one(traits, int(identity), int(k), int(image_size), int(seed), float(difficulty) * _SPREAD_AT_ONE)
        out[n] = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return out


def make_synthetic_faces(
    *,
    num_identities: int,
    images_per_identity: int,
    image_size: int,
    seed: int,
    difficulty: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the whole synthetic face dataset in one call.

    Equal to concatenating ``render_identity_images(i, range(images_per_identity), ...)``
    for ``i`` in ``range(num_identities)``.

    Args:
        num_identities: number of classes C (>= 1).
        images_per_identity: images per class (>= 1); Li & Wang (2019, section 5.1) use
            10 (GNR) + 20 (denoiser) + 5 (validation) + 5 (test) = 40 per class.
        image_size: side H = W in pixels.
        seed: non-negative dataset seed.
        difficulty: within-identity variation; see :func:`render_identity_images`.

    Returns:
        ``(images, labels)``: uint8 (C * images_per_identity, H, W, 3) RGB and int64 labels
        (C * images_per_identity,), ordered identity-major (all of identity 0 first).
    """
    _check_count("num_identities", num_identities)
    _check_count("images_per_identity", images_per_identity)
    if num_identities < 1 or images_per_identity < 1:
        raise ConfigError(
            f"num_identities and images_per_identity must be >= 1, got {num_identities} and {images_per_identity}"
        )
    _check_common(image_size=image_size, seed=seed, difficulty=difficulty)
    images = np.empty((num_identities * images_per_identity, image_size, image_size, 3), dtype=np.uint8)
    for i in range(num_identities):
        start = i * images_per_identity
        images[start:start + images_per_identity] = render_identity_images(
            i, range(images_per_identity), image_size=image_size, seed=seed, difficulty=difficulty
        )
    labels = np.repeat(np.arange(num_identities, dtype=np.int64), images_per_identity)
    return images, labels
