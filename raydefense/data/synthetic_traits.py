"""The synthetic faces' random draws: an identity's fixed traits and one image's variation
(pose, lighting, background, expression, occluders), each from its own seeded stream. The
painter that turns them into pixels is :mod:`raydefense.data.synthetic`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raydefense.seeding import numpy_rng


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
