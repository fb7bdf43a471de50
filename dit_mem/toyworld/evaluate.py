"""Scoring the toy world: does memory supply the concept the base model never learned?

Four cases, on the same prompts and the same initial noise:

* ``none``: the frozen base model alone;
* ``both``: memory in both CFG branches (the paper);
* ``cond``: memory in the conditional branch only;
* ``wrong``: memory retrieved for a *different* colour (held-out prompts: green; seen prompts:
  the next seen colour), in the conditional branch: a memory that must not help.

Prompt sets: ``held_out`` (every shape × direction in the held-out colour) and ``seen`` (every
concept in the other colours).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_mem.errors import UserError
from dit_mem.toyworld.metrics import accuracy
from dit_mem.toyworld.world import COLOURS, HELD_OUT, caption, concepts

CASES = ("none", "both", "cond", "wrong")
SEEN = [c for c in COLOURS if c != HELD_OUT]


@dataclass
class ToyGenerationSettings:
    steps: int = 20
    guidance_scale: float = 4.0
    k: int = 2


def wrong_colour(colour: str) -> str:
    """The colour whose memory is fetched in the ``wrong`` case."""
    if colour == HELD_OUT:
        return "green"
    return SEEN[(SEEN.index(colour) + 1) % len(SEEN)]


def toy_config(assets: Path, settings: ToyGenerationSettings | None = None, progress=False):
    """The :class:`~dit_mem.generation.GenerationConfig` of a toy-world asset folder."""
    from dit_mem.generation import GenerationConfig
    from dit_mem.toyworld.base import MAX_TOKENS
    from dit_mem.toyworld.world import FRAMES, SIZE

    s = settings or ToyGenerationSettings()
    return GenerationConfig(
        base_model=assets / "base",
        encoder=assets / "encoder",
        bank=assets / "bank",
        k=s.k,
        memory_mode="both",  # the paper: the same memory in both CFG branches
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        fps=8,
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        max_sequence_length=MAX_TOKENS,
        scheduler="flow-euler",  # the paper's sampler (the folder's own is diffusers' Euler)
        shift=5.0,
        negative_prompt="",
        dtype="float32",
        device="cpu",
        progress=progress,
    )


def load_toy_pipeline(assets: Path, settings: ToyGenerationSettings | None = None, progress=False):
    """``(pipe, cfg)``: the real :func:`~dit_mem.generation.load_pipeline` on a toy-world folder."""
    from dit_mem.generation import load_pipeline

    cfg = toy_config(assets, settings, progress)
    return load_pipeline(cfg), cfg


def generate_batch(
    pipe, cfg, prompts: list[str], case: str, seed: int, memory_prompts: list[str] | None = None
) -> list[np.ndarray]:
    """Videos (uint8 ``[F, H, W, 3]``) for ``prompts`` with one batch's noise from ``seed``."""
    import torch

    from dit_mem.generation import check_finite_frames
    from dit_mem.pipeline import SAME

    if case not in CASES:
        raise UserError(f"case must be one of {CASES}, got {case!r}")
    memory = None
    if case != "none":
        memory, _ = pipe.memory_bank.memory(
            memory_prompts or prompts, pipe.memory_encoder, cfg.k, vae=pipe.vae
        )
    out = pipe(
        prompts,
        negative_prompt=[cfg.negative_prompt] * len(prompts),
        memory=memory,
        negative_memory=SAME if case == "both" else None,
        height=cfg.height,
        width=cfg.width,
        num_frames=cfg.num_frames,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        max_sequence_length=cfg.max_sequence_length,
    )
    check_finite_frames(out.frames, f"toy-world generation of {case!r}")
    return list((np.clip(out.frames, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def prompt_set(name: str, repeats: int) -> list[tuple[str, str, str]]:
    """Targets of the ``held_out`` or ``seen`` set, each concept ``repeats`` times."""
    if name == "held_out":
        base = concepts([HELD_OUT])
    elif name == "seen":
        base = concepts(SEEN)
    else:
        raise UserError(f"prompt set must be 'held_out' or 'seen', got {name!r}")
    return [c for c in base for _ in range(repeats)]


def score_case(
    pipe, cfg, targets: list[tuple[str, str, str]], case: str, seed: int = 0, batch_size: int = 64
) -> dict[str, float]:
    """Colour / shape / direction accuracy of ``case`` on ``targets``."""
    videos = []
    for i in range(0, len(targets), batch_size):
        chunk = targets[i : i + batch_size]
        prompts = [caption(*t) for t in chunk]
        memory_prompts = None
        if case == "wrong":
            memory_prompts = [caption(wrong_colour(t[0]), t[1], t[2]) for t in chunk]
        videos += generate_batch(pipe, cfg, prompts, case, seed + i, memory_prompts)
    return accuracy(videos, targets)


def metric_table(
    pipe,
    cfg,
    held_out_repeats: int = 4,
    seen_repeats: int = 1,
    seed: int = 0,
    cases=CASES,
    seen_every: int = 1,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {case: {colour, shape, direction, n, seconds}}}`` for both prompt sets
    (``seen_every`` > 1 keeps every n-th seen prompt, still covering every colour)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, repeats in (("held_out", held_out_repeats), ("seen", seen_repeats)):
        targets = prompt_set(name, repeats)
        if name == "seen":
            targets = targets[::seen_every]
        table[name] = {}
        for case in cases:
            t = time.time()
            row = score_case(pipe, cfg, targets, case, seed)
            row["seconds"] = round(time.time() - t, 2)
            table[name][case] = row
    return table


def format_table(table: dict) -> str:
    """Markdown table of :func:`metric_table`'s result."""
    lines = [
        "| prompts | memory | colour | colour held | shape | direction | n |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    label = {
        "none": "none",
        "both": "both CFG branches",
        "cond": "conditional branch only",
        "wrong": "wrong colour (cond)",
    }
    for name, rows in table.items():
        for case, r in rows.items():
            held = f"{r['colour_held']:.1%}" if "colour_held" in r else "—"
            lines.append(
                f"| {name.replace('_', '-')} | {label[case]} | {r['colour']:.1%} | {held} "
                f"| {r['shape']:.1%} | {r['direction']:.1%} | {r['n']} |"
            )
    frames = [
        (n, c, r) for n, rows in table.items() for c, r in rows.items() if r.get("colour_by_frame")
    ]
    if frames:
        count = len(frames[0][2]["colour_by_frame"])
        lines += ["", "Prompt's colour by frame position (share of videos):", ""]
        lines.append("| prompts | memory | " + " | ".join(f"f{i}" for i in range(count)) + " |")
        lines.append("|---|---|" + "---:|" * count)
        for name, case, r in frames:
            shares = " | ".join(f"{v:.0%}" for v in r["colour_by_frame"])
            lines.append(f"| {name.replace('_', '-')} | {label[case]} | {shares} |")
    return "\n".join(lines)
