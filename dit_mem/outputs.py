"""What a generation leaves on disk: the mp4, a JSON sidecar, and a contact sheet PNG.

The contact sheet has one row of frames per retrieved memory video (retrieval order), then
a row for the generated video, each labelled, so a reader sees at a glance what memory the
model was given and what it made of it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dit_mem.errors import UserError
from dit_mem.evaluation.video_io import write_mp4
from dit_mem.utils.io import atomic_path, write_json_atomic


def slugify(text: str, max_len: int = 80) -> str:
    """A file-name-safe version of a prompt: its words (any script) joined by ``_``, lower case.

    Prompts that differ only in case, punctuation or after ``max_len`` characters share a slug;
    :func:`distinct_stem` tells their files apart.
    """
    slug = re.sub(r"[^\w]+", "_", text).strip("_").lower()
    return slug[:max_len].strip("_") or "video"


def distinct_stem(stem: str, prompt: str, seed: int) -> str:
    """``stem`` with a short hash of the prompt and seed: another file for another video."""
    digest = hashlib.sha1(f"{prompt}\0{seed}".encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def check_stem(name: str, what: str) -> str:
    """A user-given output name as a plain file stem inside the output folder (``.mp4``
    dropped); ``ValueError`` for anything that would be a path (``..``, ``/``, absolute)."""
    stem = name.strip()
    if stem.lower().endswith(".mp4"):
        stem = stem[: -len(".mp4")]
    if not stem or stem in (".", "..") or stem.startswith(".") or any(c in stem for c in "/\\\0"):
        raise UserError(
            f"{what}: bad file name {name!r} (a name inside the output folder: no '/', no '..', "
            "not starting with '.')"
        )
    return stem


def sidecar_of(folder: str | Path, stem: str) -> dict | None:
    """The JSON sidecar of ``folder/stem.mp4`` (``None`` if there is none, or it is unreadable)."""
    path = Path(folder) / f"{stem}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def videos_in(folder: str | Path) -> list[Path]:
    """The videos of a folder that have their sidecar."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.glob("*.mp4")) if p.with_suffix(".json").is_file()]


def _pick(frames: np.ndarray, n: int) -> np.ndarray:
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return frames[idx]


def contact_sheet(
    rows: list[tuple[str, np.ndarray]], path: str | Path, columns: int = 6, cell: int = 128
) -> Path:
    """Write rows of ``columns`` frames (each ``[F, H, W, 3]`` uint8) with a label above each row."""
    if not rows:
        raise UserError("contact sheet needs at least one row")
    label_h, pad = 16, 4
    first = rows[0][1]
    aspect = first.shape[2] / first.shape[1]
    cw, ch = int(cell * aspect), cell
    sheet = Image.new(
        "RGB", (pad + columns * (cw + pad), pad + len(rows) * (ch + label_h + pad)), (24, 24, 24)
    )
    draw = ImageDraw.Draw(sheet)
    for r, (label, frames) in enumerate(rows):
        y = pad + r * (ch + label_h + pad)
        draw.text((pad, y + 2), label[:160], fill=(235, 235, 235))
        for c, frame in enumerate(_pick(np.asarray(frames), columns)):
            tile = Image.fromarray(frame).resize((cw, ch), Image.Resampling.BILINEAR)
            sheet.paste(tile, (pad + c * (cw + pad), y + label_h))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def save_generation(
    result, out_dir: str | Path, name: str, memory_frames: list[np.ndarray | None] | None = None
) -> dict[str, Path]:
    """Write ``name.mp4``, ``name.json`` and ``name.png`` for a ``GenerationResult``; a memory
    video without a preview (``None``: a token-only bank) is a grey row, and the sidecar's
    ``no_preview`` names it."""
    out_dir = Path(out_dir)
    check_stem(name, "output name")
    paths = {
        "video": out_dir / f"{name}.mp4",
        "json": out_dir / f"{name}.json",
        "sheet": out_dir / f"{name}.png",
    }
    write_mp4(paths["video"], result.frames, fps=result.settings.get("fps") or 16)
    sidecar = result.sidecar()
    rows, missing = [], []
    for i, frames in enumerate(memory_frames or []):
        vid = result.retrieved.ids[i]
        cap = result.retrieved.captions[i]
        if frames is None:
            missing.append(vid)
            frames = np.full_like(result.frames[:1], 64)
            cap += " (no preview: the bank has no video or latent of it)"
        rows.append((f"memory {i + 1}: {vid} - {cap}", frames))
    if missing:
        sidecar["no_preview"] = missing
    write_json_atomic(paths["json"], sidecar)
    mode = "no memory" if result.settings.get("no_memory") else "with memory"
    rows.append((f"generated ({mode}), seed {result.seed}: {result.prompt}", result.frames))
    contact_sheet(rows, paths["sheet"])
    return paths
