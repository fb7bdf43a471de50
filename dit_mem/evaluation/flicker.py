"""Temporal flickering without a model, as VBench defines it, computed offline.

Per video: ``(255 - mean_t MAE(f_t, f_{t+1})) / 255`` over all consecutive frame pairs, the
MAE taken over every pixel and channel of uint8 frames compared in float32. The benchmark
score is the mean over videos.

VBench's official protocol first drops videos that its static filter (an optical-flow model)
does not consider static. That filter needs model weights, so the score here is computed
**without the static filter**; it is stored under the dimension name
``temporal_flickering_unfiltered`` and never substituted for VBench's ``temporal_flickering``
in the Quality/Total aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dit_mem.errors import UserError
from dit_mem.utils import get_logger, write_json_atomic

logger = get_logger(__name__)

UNFILTERED_DIMENSION = "temporal_flickering_unfiltered"
UNFILTERED_LABEL = "temporal flickering (no static filter)"


def temporal_flickering_score(frames: Iterable[np.ndarray]) -> float:
    """Flickering score of one video from its uint8 frames (an array ``[F, H, W, C]`` or an
    iterable of ``[H, W, C]`` frames); 1.0 for a constant video. Needs at least two frames.
    """
    total, pairs, prev = 0.0, 0, None
    for frame in frames:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8:
            raise UserError(f"frames must be uint8, got {frame.dtype}")
        cur = frame.astype(np.float32)
        if prev is not None:
            if cur.shape != prev.shape:
                raise UserError(f"frame shape changed from {prev.shape} to {cur.shape}")
            total += float(np.abs(cur - prev).mean(dtype=np.float64))
            pairs += 1
        prev = cur
    if pairs == 0:
        raise UserError("temporal flickering needs a video with at least two frames")
    return (255.0 - total / pairs) / 255.0


def flicker_folder(
    folder: str | Path, out: str | Path | None = None, expected: Iterable[str] | None = None
) -> dict:
    """Score every ``*.mp4`` in ``folder``; optionally write VBench-format results to ``out``.

    Returns ``{"temporal_flickering_unfiltered": [mean, [{video_path, video_results}, ...]],
    "missing_videos": [...], "unreadable_videos": [...]}``. Missing (``expected`` names not on
    disk) and unreadable videos are reported and left out of the mean, never scored 0.
    """
    import av

    from dit_mem.evaluation.video_io import iter_frames

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder not found: {folder}")
    videos = sorted(folder.glob("*.mp4"))
    missing = sorted(set(expected or ()) - {v.name for v in videos})
    per_video, unreadable = [], []
    for video in videos:
        try:
            score = temporal_flickering_score(iter_frames(video))
        except (ValueError, OSError, av.error.FFmpegError) as e:  # reported, not fatal
            logger.warning("cannot score %s: %s", video, e)
            unreadable.append(str(video))
            continue
        per_video.append({"video_path": str(video), "video_results": score})
    mean = float(np.mean([v["video_results"] for v in per_video])) if per_video else None
    result = {
        UNFILTERED_DIMENSION: [mean, per_video],
        "static_filter": False,
        "missing_videos": missing,
        "unreadable_videos": unreadable,
    }
    if out is not None:
        write_json_atomic(out, result)
    return result
