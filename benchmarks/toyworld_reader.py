"""How well the toy world's readers read what a person sees: confusion matrices per concept on
a labelled set built from the world (renders, the shipped VAE's round trips, and the changes a
generation makes: soft or uneven edges, blur, small rotations, a wobbling shape, a drifting
colour), for the shape reader we ship and the bounding-box fill it replaced.

    python benchmarks/toyworld_reader.py [--seeds 3] [--json reader.json]

Prints one table row per change (accuracy of colour, shape, direction; every shape's own
accuracy, new reader and old), then the shape confusion matrices, then colour held by frame
position under a drifting colour. The last run's output is in benchmarks/toyworld.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dit_mem.toyworld.labelled import CHANGES, confusion, labelled_set
from dit_mem.toyworld.metrics import foreground
from dit_mem.toyworld.recipe import SHIPPED


def fill_shape(frames: np.ndarray) -> str | None:
    """The reader before issue 33: median bounding-box fill of the foreground."""
    fills = []
    for m in foreground(frames):
        ys, xs = np.nonzero(m)
        if len(ys) >= 6:
            fills.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    if not fills:
        return None
    fill = float(np.median(fills))
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="clips per concept and change")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(2)
    vae = AutoencoderKLWan.from_pretrained(SHIPPED / "base" / "vae").float().eval()
    seeds = tuple(range(100, 100 + args.seeds))
    report = {}
    print(
        "| videos | n | colour | shape | direction | circle | square | triangle | shape, old reader |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for change in CHANGES:
        for through_vae in (False, True):
            videos, targets = labelled_set(change, seeds, vae=vae if through_vae else None)
            c = confusion(videos, targets)
            old = np.mean([fill_shape(v) == t[1] for v, t in zip(videos, targets, strict=True)])
            name = change + (" → VAE → back" if through_vae else "")
            shapes = c.per_value["shape"]
            print(
                f"| {name} | {len(videos)} | {c.accuracy['colour']:.1%} | "
                f"{c.accuracy['shape']:.1%} | {c.accuracy['direction']:.1%} | "
                f"{shapes['circle']:.1%} | {shapes['square']:.1%} | {shapes['triangle']:.1%} | "
                f"{old:.1%} |",
                flush=True,
            )
            report[name] = {**c.__dict__, "old_shape": float(old)}
    for name in ("render → VAE → back", "blur → VAE → back", "wobble → VAE → back"):
        print(f"\nshape confusion, {name} (rows: truth; columns: read)")
        rows = report[name]["matrix"]["shape"]
        print("| | " + " | ".join(next(iter(rows.values()))) + " |")
        print("|---|" + "---:|" * len(next(iter(rows.values()))))
        for truth, reads in rows.items():
            print(f"| {truth} | " + " | ".join(str(v) for v in reads.values()) + " |")
    print(
        "\ncolour held by frame position (share of videos whose frame i reads as the clip's colour)"
    )
    for name in ("drift", "drift → VAE → back", "render → VAE → back"):
        held = report[name]["colour_by_frame"]
        print(f"{name}: " + " ".join(f"{h:.0%}" for h in held))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
