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
from typing import Sequence

import numpy as np

from raydefense.data.synthetic_raster import (  # frames and soft-edged shapes
    _Frame,
    _pixel_centres,
    _upsample_matrix,
    _soft,
    _ellipse,
    _box,
    _capsule,
    _ring,
    _paint,
    _tri,
)
from raydefense.data.synthetic_traits import (  # the random draws; this module paints them
    MIN_IMAGE_SIZE,
    MAX_DIFFICULTY,
    _SPREAD_AT_ONE,
    _SKIN_TONES,
    _SCLERA,
    _MOUTH_INSIDE,
    _TEETH,
    _BLACK,
    _Traits,
    _identity_traits,
    _BALD,
    _FRINGE,
    _LONG,
    _VOLUME,
    _Shot,
    _draw_shot,
)
from raydefense.errors import ConfigError

__all__ = ["render_identity_images", "make_synthetic_faces"]


# ----------------------------------------------------------------------------- one image




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
    """Eyebrows, eyes, nose, mouth, facial hair, glasses, mole.

    One cohesive thing (the face's features, painted in order, each a few shapes), so it stays
    one function although it is longer than 80 lines."""
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
