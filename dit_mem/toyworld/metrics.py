"""Scores that read the concept back out of a toy-world video (uint8 ``[F, H, W, 3]``).

* colour: circular mean hue of the saturated, bright pixels → the nearest named hue;
* direction: foreground centroid of the last third of the frames minus the first third;
* shape: rotation-invariant moments of the object's soft mask about its centroid, per frame,
  median over the frames: the 3rd angular harmonic of the r²-weighted mass (a triangle's
  three-fold symmetry), the 4th (a square's four-fold) and the radial kurtosis
  E[r⁴]/E[r²]² (disk 4/3, square 7/5). A bounding-box fill, the first reader, called a square
  with soft corners or a small tilt a circle.

The shape rule's constants are calibrated and validated on a labelled set built from the world
itself (:mod:`dit_mem.toyworld.labelled`: renders, the toy VAE's round trips, and soft or uneven
edges, blur, small rotations, a shape that wobbles between frames, a colour that drifts); its
confusion matrices are in ``benchmarks/toyworld.md``. Each reader returns ``None`` when the
video holds no readable object (counted as wrong).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from dit_mem.errors import UserError
from dit_mem.toyworld.world import HUES

SATURATION_MIN = 0.45
VALUE_MIN = 0.35


def _hsv(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = frames.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0
    return hue, sat, mx


def foreground(frames: np.ndarray) -> np.ndarray:
    """Boolean ``[F, H, W]``: pixels of a saturated, bright object."""
    _, sat, val = _hsv(frames)
    return (sat > SATURATION_MIN) & (val > VALUE_MIN)


def colour_of(frames: np.ndarray) -> str | None:
    hue, sat, val = _hsv(frames)
    fg = (sat > SATURATION_MIN) & (val > VALUE_MIN)
    if fg.sum() < 4:
        return None
    angle = np.radians(hue[fg])
    mean = np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360.0
    return min(HUES, key=lambda c: min(abs(mean - HUES[c]), 360.0 - abs(mean - HUES[c])))


def direction_of(frames: np.ndarray, min_shift: float = 1.5) -> str | None:
    fg = foreground(frames)
    third = max(1, len(frames) // 3)

    def centroid(masks: np.ndarray) -> np.ndarray | None:
        points = [np.argwhere(m).mean(0) for m in masks if m.any()]  # (y, x) per frame
        return np.mean(points, axis=0) if points else None

    a, b = centroid(fg[:third]), centroid(fg[-third:])
    if a is None or b is None:
        return None
    dy, dx = b - a
    if max(abs(dx), abs(dy)) < min_shift:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


# The shape rule (calibrated on the labelled set; benchmarks/toyworld.md): a triangle's
# third harmonic is ≥ 0.28 there and every other shape's ≤ 0.15; square against circle is the
# line h4 + 0.6·(kurtosis − 4/3) = 0.163 (a linear SVM on both features; 1 of 1,344 wrong).
TRIANGLE_H3 = 0.2
SQUARE_H4, SQUARE_KURTOSIS, SQUARE_LINE = 1.0, 0.6, 0.163


def _soft_mask(frames: np.ndarray) -> np.ndarray:
    """``[F, H, W]`` in [0, 1]: how surely each pixel is the object's (saturated and bright)."""
    _, sat, val = _hsv(frames)
    return np.clip((sat - 0.25) / 0.4, 0, 1) * np.clip((val - 0.2) / 0.3, 0, 1)


def _frame_moments(w: np.ndarray) -> tuple[float, float, float] | None:
    """``(h3, h4, kurtosis)`` of one frame's soft mask (``None`` with no object)."""
    mass = float(w.sum())
    if mass < 6:
        return None
    ys, xs = np.mgrid[0 : w.shape[0], 0 : w.shape[1]].astype(np.float64) + 0.5
    w = w.astype(np.float64)
    dy, dx = ys - (w * ys).sum() / mass, xs - (w * xs).sum() / mass
    r2, angle = dx * dx + dy * dy, np.arctan2(dy, dx)
    wr2 = w * r2
    h3, h4 = (abs((wr2 * np.exp(1j * k * angle)).sum()) / wr2.sum() for k in (3, 4))
    kurtosis = (wr2 * r2).sum() / mass / (wr2.sum() / mass) ** 2
    return float(h3), float(h4), float(kurtosis)


def shape_features(frames: np.ndarray) -> tuple[float, float, float] | None:
    """``(h3, h4, kurtosis)``, the median over the frames that hold an object."""
    per_frame = [m for m in map(_frame_moments, _soft_mask(frames)) if m is not None]
    if not per_frame:
        return None
    return tuple(float(v) for v in np.median(np.array(per_frame), axis=0))


def shape_of(frames: np.ndarray) -> str | None:
    features = shape_features(frames)
    if features is None:
        return None
    h3, h4, kurtosis = features
    if h3 > TRIANGLE_H3:
        return "triangle"
    if SQUARE_H4 * h4 + SQUARE_KURTOSIS * (kurtosis - 4 / 3) > SQUARE_LINE:
        return "square"
    return "circle"


def colour_held(frames: np.ndarray) -> float:
    """Share of frames whose own colour reads as the clip's colour (0 with no readable colour).

    Catches a colour that is right on average but drifts (e.g. magenta turning blue late).
    """
    clip = colour_of(frames)
    if clip is None:
        return 0.0
    return float(np.mean([c == clip for c in colour_by_frame(frames)]))


def colour_by_frame(frames: np.ndarray) -> list[str | None]:
    """Each frame's own colour reading (a colour drifting within a clip shows here)."""
    return [colour_of(frame[None]) for frame in frames]


def read_concept(frames: np.ndarray) -> tuple[str | None, str | None, str | None]:
    """``(colour, shape, direction)`` as the metrics read them from ``frames``."""
    return colour_of(frames), shape_of(frames), direction_of(frames)


def accuracy(
    videos: Iterable[np.ndarray], targets: Sequence[tuple[str, str, str]]
) -> dict[str, float]:
    """Fraction of videos whose colour, shape and direction read back as ``targets``, the mean
    share of frames that keep each video's colour (``colour_held``), and per frame position the
    share of videos whose frame reads as the prompt's colour (``colour_by_frame``)."""
    hits = np.zeros(3)
    held, n, by_frame = 0.0, 0, None
    for frames, target in zip(videos, targets, strict=True):
        read = read_concept(frames)
        hits += [r == t for r, t in zip(read, target, strict=True)]
        held += colour_held(frames)
        frame_hits = np.array([c == target[0] for c in colour_by_frame(frames)], float)
        by_frame = frame_hits if by_frame is None else by_frame + frame_hits
        n += 1
    if n == 0:
        raise UserError("accuracy of no videos")
    colour, shape, direction = hits / n
    return {
        "colour": float(colour),
        "shape": float(shape),
        "direction": float(direction),
        "colour_held": held / n,
        "colour_by_frame": [float(v) for v in by_frame / n],  # frame i reads as the prompt's
        "n": n,
    }
