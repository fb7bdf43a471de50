"""MP4 writing (atomic, imageio-ffmpeg) and reading (PyAV) of uint8 RGB frames ``[F, H, W, 3]``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dit_mem.errors import UserError
from dit_mem.utils.io import atomic_path


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Validate a video array: uint8, shape ``[F, H, W, 3]`` with F >= 1."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise UserError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise UserError(f"frames must have shape [F, H, W, 3] with F >= 1, got {frames.shape}")
    return frames


def write_mp4(
    path: str | os.PathLike, frames: np.ndarray, fps: int = 16, lossless: bool = False
) -> Path:
    """Write ``frames`` to ``path`` as H.264 mp4, atomically (whole file or nothing).

    Default: libx264, yuv420p, CRF 17 (what players and VBench read). ``lossless=True`` writes
    RGB H.264 at CRF 0 (``libx264rgb``), which decodes back to the exact input frames.
    """
    import imageio_ffmpeg

    frames = check_frames(frames)
    f, h, w, _ = frames.shape
    if not lossless and (h % 2 or w % 2):
        raise UserError(f"yuv420p needs even height and width, got {h}x{w}")
    if lossless:
        codec, pix_fmt, params = "libx264rgb", "rgb24", ["-crf", "0", "-preset", "ultrafast"]
    else:
        codec, pix_fmt, params = "libx264", "yuv420p", ["-crf", "17"]
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (w, h),
            fps=fps,
            codec=codec,
            pix_fmt_in="rgb24",
            pix_fmt_out=pix_fmt,
            macro_block_size=1,
            quality=None,
            output_params=[*params, "-f", "mp4"],  # the temporary name has no .mp4 suffix
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return path


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield the frames of a video as uint8 RGB ``[H, W, 3]`` arrays (PyAV)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video as ``[F, H, W, 3]`` uint8."""
    frames = list(iter_frames(path))
    if not frames:
        raise UserError(f"{path}: no video frames")
    return np.stack(frames)


def probe_frame_count(path: str | os.PathLike) -> int | None:
    """Frame count from the container header, or None if the file is not a readable video."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            return int(container.streams.video[0].frames)
    except (av.error.FFmpegError, OSError):
        return None


def is_complete_video(path: str | os.PathLike, expected_frames: int | None = None) -> bool:
    """True if ``path`` is a readable video (with ``expected_frames`` frames, if given)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    n = probe_frame_count(path)
    if n is None:
        return False
    return expected_frames is None or n == expected_frames
