"""The toy world: one coloured shape moving across a dark 32×32 frame for 9 frames.

A clip is a pure function of its :class:`Clip` (colour, shape, direction, seed): the seed only
varies size, start position, speed, background level and a small colour jitter, never the
concept, so a caption ("a red circle moving left") names exactly what is in the video.

    clip = Clip("red", "circle", "left", seed=3)
    frames = render(clip)              # uint8 [9, 32, 32, 3]
    clip.caption                       # "a red circle moving left"
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from dit_mem.errors import UserError

FRAMES, SIZE = 9, 32
# Named colours (RGB) and their hues in degrees, the hue the colour metric snaps to.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (225, 215, 35),
    "green": (40, 210, 50),
    "cyan": (35, 210, 220),
    "blue": (45, 70, 235),
    "magenta": (220, 40, 220),
}
HUES: dict[str, float] = {
    "red": 0.0,
    "yellow": 57.0,
    "green": 123.0,
    "cyan": 182.0,
    "blue": 231.0,
    "magenta": 300.0,
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
HELD_OUT = "magenta"  # the colour the base DiT never sees


@dataclass(frozen=True)
class Clip:
    """One clip of the toy world; ``seed`` picks its nuisance factors."""

    colour: str
    shape: str
    direction: str
    seed: int = 0

    def __post_init__(self) -> None:
        for value, known, what in (
            (self.colour, COLOURS, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.direction, DIRECTIONS, "direction"),
        ):
            if value not in known:
                raise UserError(f"unknown {what} {value!r}; known: {', '.join(known)}")

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction)

    @property
    def id(self) -> str:
        return f"{self.colour}_{self.shape}_{self.direction}_{self.seed:05d}"


def caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """``"a red circle moving left"`` → ``("red", "circle", "left")``; ValueError otherwise."""
    words = text.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise UserError(
            f"not a toy-world caption: {text!r} (expected 'a <colour> <shape> moving <direction>')"
        )
    colour, shape, direction = words[1], words[2], words[4]
    Clip(colour, shape, direction)  # validates
    return colour, shape, direction


def concepts(colours=None) -> list[tuple[str, str, str]]:
    """Every (colour, shape, direction), in a fixed order; ``colours`` restricts the colours."""
    colours = list(COLOURS) if colours is None else list(colours)
    return list(itertools.product(colours, SHAPES, DIRECTIONS))


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    # triangle pointing up: apex at (cx, cy - r), base from cx - r to cx + r at cy + r
    inside_y = (yy >= cy - r) & (yy <= cy + r)
    half = (yy - (cy - r)) / 2.0
    return inside_y & (np.abs(xx - cx) <= half)


def render(clip: Clip) -> np.ndarray:
    """The clip's frames, uint8 ``[9, 32, 32, 3]``; deterministic in ``clip``."""
    rng = np.random.default_rng(clip.seed)
    r = float(rng.uniform(4.0, 6.0))  # half-size of the object
    travel = float(rng.uniform(11.0, 16.0))  # pixels moved from first to last frame
    dx, dy = DIRECTIONS[clip.direction]
    margin = r + 1.0
    # along the motion: start so that the whole path stays inside the frame
    lo, hi = (
        margin + (travel if (dx < 0 or dy < 0) else 0.0),
        SIZE - margin - (travel if (dx > 0 or dy > 0) else 0.0),
    )
    along = float(rng.uniform(lo, hi))
    across = float(rng.uniform(margin, SIZE - margin))
    background = int(rng.integers(8, 28))
    colour = np.clip(np.array(COLOURS[clip.colour]) + rng.integers(-12, 13, size=3), 0, 255)
    out = np.full((FRAMES, SIZE, SIZE, 3), background, dtype=np.uint8)
    for f in range(FRAMES):
        s = along + travel * f / (FRAMES - 1) * (dx + dy)  # dx + dy is ±1 along the axis
        cx, cy = (s, across) if dx else (across, s)
        out[f][_mask(clip.shape, cx, cy, r)] = colour.astype(np.uint8)
    return out


def clips(concept_list, per_concept: int, seed: int = 0) -> list[Clip]:
    """``per_concept`` clips of every concept, clip seeds ``seed·10⁵ + concept·10³ + j`` (unique)."""
    out = []
    for c, (colour, shape, direction) in enumerate(concept_list):
        for j in range(per_concept):
            out.append(Clip(colour, shape, direction, seed=seed * 100_000 + c * 1000 + j))
    return out
