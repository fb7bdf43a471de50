"""Scores that read the concept back out of a toy-world video (uint8 ``[F, H, W, 3]``).

* colour: circular mean hue of the saturated, bright pixels → the nearest named hue;
* direction: foreground centroid of the last third of the frames minus the first third;
* shape: mean bounding-box fill of the foreground (square ≈ 1, circle ≈ π/4, triangle ≈ ½).

Each returns ``None`` when the video holds no readable object (counted as wrong).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

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


def shape_of(frames: np.ndarray) -> str | None:
    fills = []
    for m in foreground(frames):
        ys, xs = np.nonzero(m)
        if len(ys) < 6:
            continue
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
    if not fills:
        return None
    fill = float(np.median(fills))
    if fill > 0.9:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def colour_held(frames: np.ndarray) -> float:
    """Share of frames whose own colour reads as the clip's colour (0 with no readable colour).

    Catches a colour that is right on average but drifts (e.g. magenta turning blue late).
    """
    clip = colour_of(frames)
    if clip is None:
        return 0.0
    per_frame = [colour_of(frame[None]) for frame in frames]
    return float(np.mean([c == clip for c in per_frame]))


def read_concept(frames: np.ndarray) -> tuple[str | None, str | None, str | None]:
    """``(colour, shape, direction)`` as the metrics read them from ``frames``."""
    return colour_of(frames), shape_of(frames), direction_of(frames)


def accuracy(
    videos: Iterable[np.ndarray], targets: Sequence[tuple[str, str, str]]
) -> dict[str, float]:
    """Fraction of videos whose colour, shape and direction read back as ``targets``, and the
    mean share of frames that keep each video's colour (``colour_held``)."""
    hits = np.zeros(3)
    held, n = 0.0, 0
    for frames, target in zip(videos, targets, strict=True):
        read = read_concept(frames)
        hits += [r == t for r, t in zip(read, target, strict=True)]
        held += colour_held(frames)
        n += 1
    if n == 0:
        raise ValueError("accuracy of no videos")
    colour, shape, direction = hits / n
    return {
        "colour": float(colour),
        "shape": float(shape),
        "direction": float(direction),
        "colour_held": held / n,
        "n": n,
    }
