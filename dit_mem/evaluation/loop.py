"""Resumable benchmark generation over a list of :class:`VideoJob` with any video generator.

The loop knows nothing about models. A generator is any object with

- ``__call__(prompt: str, seed: int) -> np.ndarray``: uint8 RGB frames ``[F, H, W, 3]``;
- ``metadata``: a JSON-able mapping describing what produced the videos (base model, memory
  on/off, k, strength, steps, resolution, ...); it is recorded in the run's
  ``generation.json`` and a run folder refuses a generator whose metadata differs, so a
  baseline (``no_memory: true``) never mixes with memory videos in one folder.

Resuming: a job whose mp4 exists and is a readable video (with ``expected_frames`` frames
when given) is skipped. Files are written atomically, so a killed run leaves no partial mp4.
Errors from the generator propagate: a failed generation never turns into a missing or a
blank video silently.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dit_mem.errors import UserError
from dit_mem.evaluation.plan import VideoJob
from dit_mem.evaluation.video_io import check_frames, is_complete_video, write_mp4
from dit_mem.utils import folder_lock, get_logger, write_json_atomic

logger = get_logger(__name__)

MANIFEST = "generation.json"


@runtime_checkable
class VideoGenerator(Protocol):
    """What the evaluation loop needs from a text-to-video pipeline."""

    metadata: Mapping[str, Any]

    def __call__(self, prompt: str, seed: int) -> np.ndarray: ...


@dataclass
class GenerationReport:
    """What a generation run did."""

    generated: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    replaced: list[Path] = field(default_factory=list)  # unreadable/incomplete files redone
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{len(self.generated)} generated ({len(self.replaced)} replacing incomplete files), "
            f"{len(self.skipped)} already complete, {self.seconds:.1f} s"
        )


def _check_manifest(root: Path, benchmark: str, metadata: Mapping[str, Any]) -> None:
    path = root / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("benchmark") != benchmark or old.get("generator") != dict(metadata):
        raise UserError(
            f"{root} holds videos from different settings (see {path}): recorded "
            f"{old.get('benchmark')} {old.get('generator')}, now {benchmark} {dict(metadata)}; "
            "use another output folder for another configuration"
        )


def run_generation(
    jobs: Sequence[VideoJob],
    generator: VideoGenerator,
    root: str | Path,
    *,
    benchmark: str,
    fps: int = 16,
    expected_frames: int | None = None,
    progress: bool = True,
) -> GenerationReport:
    """Generate every job's video under ``root`` (``root/<folder>/<filename>``), resumably.

    ``benchmark`` names the protocol ("vbench", "vbench-full", "phygenbench") in the manifest.
    One run per folder: a second one on the same folder is refused while the first runs.
    """
    root = Path(root)
    metadata = dict(getattr(generator, "metadata", {}) or {})
    json.dumps(metadata)  # fail early on a non-JSON-able description
    _check_manifest(root, benchmark, metadata)
    with folder_lock(root, f"{benchmark} generation"):
        return _generate(jobs, generator, root, benchmark, metadata, fps, expected_frames, progress)


def _generate(jobs, generator, root, benchmark, metadata, fps, expected_frames, progress):
    from tqdm import tqdm

    write_json_atomic(root / MANIFEST, {"benchmark": benchmark, "generator": metadata, "fps": fps})

    report = GenerationReport()
    start = time.perf_counter()
    bar = tqdm(jobs, desc=f"generate {benchmark}", unit="video", disable=not progress)
    for job in bar:
        path = root / job.relpath
        if path.exists():
            if is_complete_video(path, expected_frames):
                report.skipped.append(path)
                continue
            logger.warning("%s is not a complete video; generating it again", path)
            report.replaced.append(path)
        frames = check_frames(generator(job.prompt, job.seed))
        if expected_frames is not None and frames.shape[0] != expected_frames:
            raise UserError(
                f"generator returned {frames.shape[0]} frames for {job.relpath}, "
                f"expected {expected_frames}"
            )
        write_mp4(path, frames, fps=fps)
        report.generated.append(path)
        bar.set_postfix(new=len(report.generated), skipped=len(report.skipped))
    report.seconds = time.perf_counter() - start
    logger.info("%s: %s", root, report.summary())
    return report


def missing_videos(jobs: Sequence[VideoJob], root: str | Path) -> list[VideoJob]:
    """Jobs whose mp4 is absent under ``root`` (a cheap existence check)."""
    root = Path(root)
    return [job for job in jobs if not (root / job.relpath).is_file()]
