"""Video tables: OpenVid-style CSVs → a clean frame of ``id, video, caption, ...``.

OpenVid-HD ships ``video, caption, aesthetic score, motion score, temporal consistency score,
camera motion, frame, fps, seconds``; other lists name the file column ``video_path``. A video's
**id** is its file name without extension (``abc_1_0to120.mp4`` → ``abc_1_0to120``); latents,
token-cache entries and index rows are all keyed by it.

OpenVid clips are named ``<youtube_id>_<n>_<start>to<end>``; :func:`source_id` recovers the
YouTube id so that retrieval can drop every clip cut from the same source video.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path, PurePosixPath

import pandas as pd

from dit_mem.errors import UserError
from dit_mem.utils import get_logger

log = get_logger(__name__)

VIDEO_COLUMNS = ("video", "video_path")
CAPTION_COLUMN = "caption"
_CLIP_NAME = re.compile(r"^(?P<source>.+)_\d+_[\d.]+to[\d.]+$")


def video_id(video: str) -> str:
    """The id of a video file: its base name without extension."""
    name = PurePosixPath(str(video).replace("\\", "/")).name
    stem = name.rsplit(".", 1)[0] if "." in name else name
    if not stem:
        raise UserError(f"cannot derive a video id from {video!r}")
    return stem


def is_safe_id(vid: str) -> bool:
    """Whether an id can name a file inside a folder (no separators, no ``..``, not empty)."""
    return bool(vid) and vid not in (".", "..") and not any(c in vid for c in "/\\\0")


def source_id(vid: str) -> str:
    """Source video of an OpenVid clip id (``<youtube_id>_<n>_<start>to<end>`` → youtube id).

    Ids that do not follow the pattern are their own source.
    """
    m = _CLIP_NAME.match(vid)
    return m.group("source") if m else vid


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_csv_strict(path: str | Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV as text cells, strictly: every row has the header's number of fields.

    No cell becomes a number or NaN (a video named ``null`` stays ``"null"``), a comma inside an
    unquoted caption is an error naming the line instead of a silent column shift, and missing
    ``required`` columns are an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, strict=True))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(cell.strip() for cell in r)]
    if not numbered:
        raise UserError(f"{path}: the CSV is empty (no header, no rows)")
    (_, header), body = numbered[0], numbered[1:]
    header = [h.strip() for h in header]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup or "" in header:
        raise UserError(
            f"{path}: the header has {'duplicate' if dup else 'empty'} column names {dup}"
        )
    for line, row in body:
        if len(row) != len(header):
            raise UserError(
                f"{path}, line {line}: {len(row)} fields, but the header has {len(header)} "
                f"({', '.join(header)}); quote fields that contain commas"
            )
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(
            f"{path}: missing required column(s) {', '.join(missing)}; found columns {header}"
        )
    return pd.DataFrame([r for _, r in body], columns=header, dtype=str)


def read_video_table(path: str | Path, require_caption: bool = True) -> pd.DataFrame:
    """Read a CSV of videos into a frame with ``id``, ``video`` (and ``caption``) first.

    The file column may be called ``video`` or ``video_path``. Rows with an empty caption are
    dropped (with a count in the log) when ``require_caption``. Other columns (scores, fps, ...)
    are kept. Raises ``ValueError`` naming the file for a missing or empty CSV, missing
    columns, or duplicate ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video table not found: {path}")
    df = read_csv_strict(path)
    video_col = next((c for c in VIDEO_COLUMNS if c in df.columns), None)
    needed = [CAPTION_COLUMN] if require_caption else []
    missing = ([] if video_col else ["video (or video_path)"]) + [
        c for c in needed if c not in df.columns
    ]
    if missing:
        raise UserError(
            f"{path}: missing required column(s) {', '.join(missing)}; "
            f"found columns {list(df.columns)}"
        )
    if df.empty:
        raise UserError(f"{path}: the CSV has a header but no rows")
    if video_col != "video":
        df = df.rename(columns={video_col: "video"})
    df = df.assign(video=df["video"].str.strip())
    df = df[df["video"] != ""]
    if require_caption:
        caption = df[CAPTION_COLUMN].fillna("").astype(str).str.strip()
        dropped = int((caption == "").sum())
        if dropped:
            log.warning("%s: dropped %d row(s) with an empty caption", path, dropped)
        df = df.assign(caption=caption)[caption != ""]
    else:
        dropped = 0
    if df.empty:
        raise UserError(f"{path}: no usable rows (every row lacks a video or a caption)")
    ids = df["video"].map(video_id)
    unsafe = ids[~ids.map(is_safe_id)]
    if len(unsafe):
        raise UserError(f"{path}: video {unsafe.index[0]!r} gives no usable id")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise UserError(
            f"{path}: {len(dup)} duplicate video id(s) (file name without extension), "
            f"e.g. {dup.iloc[0]!r}; ids must be unique"
        )
    df = df.assign(id=ids.values)
    first = ["id", "video"] + ([CAPTION_COLUMN] if CAPTION_COLUMN in df.columns else [])
    df = df[first + [c for c in df.columns if c not in first]].reset_index(drop=True)
    df.attrs["dropped_empty_captions"] = dropped
    return df
