"""Video decoding for the memory bank (method §2).

``load_video(path)`` → float tensor ``[3, F, H, W]`` in [-1, 1]:

1. ``F`` frame indices sampled uniformly over the clip: ``floor(linspace(0, n-1, F))``;
   a clip shorter than ``F`` frames plays once and then repeats its last frame;
2. each frame resized to ``H×W`` (default 480×832): ``"stretch"`` (the paper: no crop) or
   ``"crop"`` (aspect-preserving resize, then center crop), bilinear with antialiasing;
3. RGB scaled from [0, 255] to [-1, 1].

Backends: PyAV (default, ~2× faster here) or decord; both give the same frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dit_mem.errors import UserError

Backend = Literal["pyav", "decord"]
ResizeMode = Literal["stretch", "crop"]


class VideoDecodeError(UserError):
    """A video that cannot be opened or decoded (missing, corrupt, no video stream, no frames)."""


def sample_frame_indices(num_total: int, num_frames: int) -> np.ndarray:
    """Indices of ``num_frames`` frames over a clip of ``num_total`` frames (method §2)."""
    if num_total < 1:
        raise UserError(f"a clip needs at least one frame, got {num_total}")
    if num_frames < 1:
        raise UserError(f"num_frames must be ≥ 1, got {num_frames}")
    if num_total >= num_frames:
        return np.floor(np.linspace(0, num_total - 1, num_frames)).astype(np.int64)
    return np.concatenate(
        [np.arange(num_total), np.full(num_frames - num_total, num_total - 1)]
    ).astype(np.int64)


def resize_frame(frame: np.ndarray, height: int, width: int, mode: ResizeMode) -> torch.Tensor:
    """``uint8 [h, w, 3]`` → float ``[3, height, width]`` in [0, 255]."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    if mode == "crop":
        scale = max(height / h, width / w)
        rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    elif mode == "stretch":
        rh, rw = height, width
    else:
        raise UserError(f"resize mode must be 'stretch' or 'crop', got {mode!r}")
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return x[0, :, top : top + height, left : left + width].clamp(0, 255)


def _pyav_frames(path: Path, indices: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = set(indices.tolist())
        last = int(indices.max())
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                yield i, frame.to_ndarray(format="rgb24")
            if i >= last:
                break


def _count_frames_pyav(path: Path) -> int:
    """Frames in the first video stream: container metadata, else counted packets."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        return sum(1 for p in container.demux(stream) if p.size > 0)


@dataclass(frozen=True)
class SourceGeometry:
    """What a clip held before sampling and resizing."""

    frames: int  # distinct frames sampled from it (fewer than asked: the last one repeats)
    height: int
    width: int


def load_video(
    path: str | Path,
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    resize: ResizeMode = "stretch",
    backend: Backend = "pyav",
    with_source: bool = False,
):
    """Decode ``path`` into ``[3, num_frames, height, width]`` float32 in [-1, 1] (and, with
    ``with_source``, its :class:`SourceGeometry`).

    Raises :class:`VideoDecodeError` (a ``ValueError``) naming the file when it is missing,
    unreadable or has no frames.
    """
    path = Path(path)
    if not path.exists():
        raise VideoDecodeError(f"{path}: video file not found")
    try:
        if backend == "pyav":
            frames, distinct = _decode_pyav(path, num_frames)
        elif backend == "decord":
            frames, distinct = _decode_decord(path, num_frames)
        else:
            raise UserError(f"video backend must be 'pyav' or 'decord', got {backend!r}")
    except VideoDecodeError:
        raise
    except ValueError as e:
        if "backend" in str(e):
            raise
        raise VideoDecodeError(f"{path}: cannot decode video ({e})") from e
    except Exception as e:  # decoders raise their own error types (av.error.*, DECORDError)
        raise VideoDecodeError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    out = torch.stack([resize_frame(f, height, width, resize) for f in frames], dim=1) / 127.5 - 1.0
    if not with_source:
        return out
    return out, SourceGeometry(distinct, frames[0].shape[0], frames[0].shape[1])


def _decode_pyav(path: Path, num_frames: int) -> tuple[list[np.ndarray], int]:
    total = _count_frames_pyav(path)
    if total < 1:
        raise VideoDecodeError(f"{path}: the video has no frames")
    indices = sample_frame_indices(total, num_frames)
    got = dict(_pyav_frames(path, indices))
    if not got:
        raise VideoDecodeError(f"{path}: no frame could be decoded")
    if len(got) < len(set(indices.tolist())):
        # Metadata over-counted the frames: resample over what really decodes.
        decoded = max(got) + 1
        indices = sample_frame_indices(decoded, num_frames)
        got = dict(_pyav_frames(path, indices))
    return [got[int(i)] for i in indices], len(set(indices.tolist()))


def _decode_decord(path: Path, num_frames: int) -> tuple[list[np.ndarray], int]:
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    total = len(reader)
    if total < 1:
        raise VideoDecodeError(f"{path}: the video has no frames")
    indices = sample_frame_indices(total, num_frames)
    unique, inverse = np.unique(indices, return_inverse=True)
    batch = reader.get_batch(unique.tolist()).asnumpy()
    return [batch[j] for j in inverse], len(unique)
