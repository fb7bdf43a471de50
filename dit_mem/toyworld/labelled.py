"""A labelled set of toy-world videos, built from the world itself, to validate the readers.

    videos, targets = labelled_set("soft", seeds=(0, 1), vae=vae)   # (through the VAE and back)
    report = confusion(videos, targets)     # per concept: confusion matrix, accuracy

The changes a generated video shows besides the renders (``CHANGES``): soft edges and blur (a
decoder's smoothing), uneven edges (a noisy boundary), a small rotation, a shape that wobbles
between frames (its size and tilt change per frame), and a colour that drifts within the clip
(its hue turning by up to 32°). With ``vae`` every video also goes through the toy world's VAE
and back, as everything a generation makes does. The concept of every video is its clip's:
a change never alters it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dit_mem.errors import UserError
from dit_mem.toyworld.world import (
    COLOURS,
    DIRECTIONS,
    FRAMES,
    SHAPES,
    SIZE,
    Clip,
    concepts,
    render,
)

CHANGES = ("render", "soft", "blur", "uneven", "rotate", "wobble", "drift")


def _mask(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Coverage ``[SIZE, SIZE]`` of a shape turned by ``angle`` radians (the world's triangle
    points up at angle 0)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    c, s = np.cos(angle), np.sin(angle)
    x, y = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    else:
        inside = (y >= -r) & (y <= r) & (np.abs(x) <= (y + r) / 2)
    return inside.astype(np.float32)


def changed(clip: Clip, change: str, rng: np.random.Generator) -> np.ndarray:
    """``clip`` rendered with one of :data:`CHANGES` (``"render"``: the world's own render)."""
    from scipy import ndimage

    if change not in CHANGES:
        raise UserError(f"change must be one of {CHANGES}, got {change!r}")
    if change == "render":
        return render(clip)
    r, travel = float(rng.uniform(4.0, 6.0)), float(rng.uniform(11.0, 16.0))
    dx, dy = DIRECTIONS[clip.direction]
    margin = r + 1.5
    lo = margin + (travel if (dx < 0 or dy < 0) else 0.0)
    hi = SIZE - margin - (travel if (dx > 0 or dy > 0) else 0.0)
    along, across = float(rng.uniform(lo, hi)), float(rng.uniform(margin, SIZE - margin))
    background = int(rng.integers(8, 28))
    colour = np.clip(np.array(COLOURS[clip.colour]) + rng.integers(-12, 13, 3), 0, 255) / 255.0
    tilt = float(rng.uniform(-0.3, 0.3)) if change in ("rotate", "wobble") else 0.0
    out = np.full((FRAMES, SIZE, SIZE, 3), background / 255.0, np.float32)
    for f in range(FRAMES):
        s = along + travel * f / (FRAMES - 1) * (dx + dy)
        cx, cy = (s, across) if dx else (across, s)
        angle, size = tilt, r
        if change == "wobble":
            angle += float(rng.uniform(-0.25, 0.25))
            size *= float(rng.uniform(0.85, 1.15))
        m = _mask(clip.shape, cx, cy, size, angle)
        if change == "uneven":
            noise = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 1.0)
            m = (ndimage.gaussian_filter(m, 0.7) + 0.3 * noise > 0.5).astype(np.float32)
        elif change in ("soft", "blur"):
            m = ndimage.gaussian_filter(m, 0.8 if change == "soft" else 1.2)
        c = colour
        if change == "drift":
            h, light, sat = colorsys.rgb_to_hls(*colour)
            c = np.array(colorsys.hls_to_rgb((h + 0.09 * f / (FRAMES - 1)) % 1.0, light, sat))
        out[f] = out[f] * (1 - m[..., None]) + c * m[..., None]
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def round_trip(vae, videos: Sequence[np.ndarray], batch: int = 48) -> list[np.ndarray]:
    """``videos`` through the VAE and back (encoded to latents, decoded), uint8."""
    import torch

    from dit_mem.data.vae import decode_latents, encode_frames

    out = []
    for i in range(0, len(videos), batch):
        x = torch.tensor(np.stack(videos[i : i + batch])).permute(0, 4, 1, 2, 3).float()
        video = decode_latents(vae, encode_frames(vae, x / 127.5 - 1))
        frames = ((video.permute(0, 2, 3, 4, 1).float() + 1) * 127.5).round().clamp(0, 255)
        out += list(frames.byte().cpu().numpy())
    return out


def labelled_set(
    change: str, seeds: Sequence[int] = (0,), vae=None, colours=None
) -> tuple[list[np.ndarray], list[tuple[str, str, str]]]:
    """Every concept (of ``colours``) once per seed, with ``change``, through ``vae`` and back
    when given; ``(videos, targets)``."""
    rng = np.random.default_rng([CHANGES.index(change), *seeds])
    clips = [Clip(*concept, seed=s) for concept in concepts(colours) for s in seeds]
    videos = [changed(c, change, rng) for c in clips]
    if vae is not None:
        videos = round_trip(vae, videos)
    return videos, [(c.colour, c.shape, c.direction) for c in clips]


@dataclass
class Confusion:
    """Per concept (colour, shape, direction): ``matrix[truth][read]`` counts and accuracy."""

    matrix: dict[str, dict[str, dict[str, int]]]
    accuracy: dict[str, float]
    per_value: dict[str, dict[str, float]]  # accuracy of each true value (e.g. every shape)
    colour_by_frame: list[float]  # share of videos whose frame i reads as the clip's colour


def confusion(videos: Sequence[np.ndarray], targets: Sequence[tuple[str, str, str]]) -> Confusion:
    """How the readers of :mod:`dit_mem.toyworld.metrics` read ``videos`` against ``targets``."""
    from dit_mem.toyworld.metrics import colour_by_frame, read_concept

    values = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}
    matrix = {k: {t: dict.fromkeys([*v, "none"], 0) for t in v} for k, v in values.items()}
    held = np.zeros(FRAMES)
    for frames, target in zip(videos, targets, strict=True):
        for key, truth, read in zip(values, target, read_concept(frames), strict=True):
            matrix[key][truth][read or "none"] += 1
        held += [c == target[0] for c in colour_by_frame(frames)]
    accuracy, per_value = {}, {}
    for key, rows in matrix.items():
        total = sum(sum(r.values()) for r in rows.values())
        accuracy[key] = sum(rows[t][t] for t in rows) / total
        per_value[key] = {
            t: rows[t][t] / sum(rows[t].values()) for t in rows if sum(rows[t].values())
        }
    return Confusion(matrix, accuracy, per_value, list(held / len(videos)))
