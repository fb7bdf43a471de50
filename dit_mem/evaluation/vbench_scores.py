"""VBench results: parse ``*_eval_results.json`` files and aggregate Quality / Semantic / Total.

VBench writes ``{name}_eval_results.json`` as ``{dimension: [mean, per_video]}`` with
``per_video`` a list of ``{"video_path": ..., "video_results": ...}``. The aggregation follows
VBench's published rule (its ``scripts/constant.py`` and ``cal_final_score.py``; our own code):

- per dimension ``(x - Min) / (Max - Min) * weight`` (weights 1, dynamic degree 0.5);
- Quality = sum over the 7 quality dimensions / 6.5; Semantic = sum over the other 9 / 9;
- Total = (4 * Quality + Semantic) / 5.

Unlike VBench's script, a missing dimension is never counted as 0: a group score exists only
when all its dimensions are present; otherwise it is None and a *partial* value over the
available dimensions (renormalised by their weights) is reported, labelled as such.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dit_mem.errors import UserError
from dit_mem.evaluation.flicker import UNFILTERED_DIMENSION
from dit_mem.utils import get_logger

logger = get_logger(__name__)

QUALITY_DIMENSIONS: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC_DIMENSIONS: tuple[str, ...] = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
ALL_DIMENSIONS: tuple[str, ...] = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS

# (Min, Max) for normalisation; every other dimension is (0, 1).
NORMALIZE: dict[str, tuple[float, float]] = {d: (0.0, 1.0) for d in ALL_DIMENSIONS} | {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
WEIGHT: dict[str, float] = {d: 1.0 for d in ALL_DIMENSIONS} | {"dynamic_degree": 0.5}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0

# Dimensions a results file may hold: VBench's 16 and our offline, unfiltered flickering.
KNOWN_DIMENSIONS: tuple[str, ...] = ALL_DIMENSIONS + (UNFILTERED_DIMENSION,)


@dataclass
class DimensionResult:
    """One dimension's score as read from a results file."""

    dimension: str
    mean: float
    num_videos: int | None  # None if the file has no per-video list
    source: Path | None = None


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def parse_results_file(path: str | Path) -> dict[str, DimensionResult]:
    """Read one ``*_eval_results.json``; unknown keys and non-numeric means are logged and skipped."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: expected {{dimension: [mean, per_video]}}, got {type(data).__name__}"
        )
    out: dict[str, DimensionResult] = {}
    for key, value in data.items():
        if key not in KNOWN_DIMENSIONS:
            if isinstance(value, list) and len(value) == 2 and not isinstance(value[0], str):
                logger.warning("%s: unknown dimension %r ignored", path, key)
            continue
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise UserError(f"{path}: {key} must be [mean, per_video], got {value!r:.80}")
        mean = _as_score(value[0])
        if mean is None:
            logger.warning(
                "%s: %s has no numeric mean (%r); treated as missing", path, key, value[0]
            )
            continue
        per_video = value[1]
        out[key] = DimensionResult(
            key, mean, len(per_video) if isinstance(per_video, list) else None, path
        )
    return out


def collect_results(root: str | Path) -> dict[str, DimensionResult]:
    """All dimensions found in ``*_eval_results.json`` files under ``root`` (recursively).

    When several files hold the same dimension (re-runs), the most recently modified wins.
    """
    root = Path(root)
    if not root.exists():
        return {}
    files = sorted(root.rglob("*_eval_results.json"), key=lambda p: (p.stat().st_mtime, str(p)))
    out: dict[str, DimensionResult] = {}
    for path in files:
        out.update(parse_results_file(path))
    return out


@dataclass
class VBenchSummary:
    """Quality / Semantic / Total in [0, 1] (None when a group is incomplete)."""

    dimensions: dict[str, float]  # raw scores of the dimensions present
    quality: float | None
    semantic: float | None
    total: float | None
    missing_dimensions: list[str] = field(default_factory=list)  # of VBench's 16
    quality_partial: float | None = None  # over the available quality dimensions
    semantic_partial: float | None = None

    @property
    def complete(self) -> bool:
        return not self.missing_dimensions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalized(dimension: str, value: float) -> float:
    """``(x - Min) / (Max - Min) * weight`` for one dimension."""
    lo, hi = NORMALIZE[dimension]
    return (value - lo) / (hi - lo) * WEIGHT[dimension]


def _group(scores: Mapping[str, float], dims: tuple[str, ...]) -> tuple[float | None, float | None]:
    present = [d for d in dims if d in scores]
    if not present:
        return None, None
    partial = sum(normalized(d, scores[d]) for d in present) / sum(WEIGHT[d] for d in present)
    return (partial if len(present) == len(dims) else None), partial


def aggregate(scores: Mapping[str, float]) -> VBenchSummary:
    """Aggregate raw dimension scores (``{dimension: mean}``, in [0, 1]) the VBench way."""
    raw = {d: float(v) for d, v in scores.items() if d in KNOWN_DIMENSIONS}
    quality, quality_partial = _group(raw, QUALITY_DIMENSIONS)
    semantic, semantic_partial = _group(raw, SEMANTIC_DIMENSIONS)
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (
            QUALITY_WEIGHT + SEMANTIC_WEIGHT
        )
    missing = [d for d in ALL_DIMENSIONS if d not in raw]
    return VBenchSummary(raw, quality, semantic, total, missing, quality_partial, semantic_partial)


def format_summary(summary: VBenchSummary) -> str:
    """Human-readable table (percent, like VBench's leaderboard)."""

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.2f}%"

    lines = [f"{'dimension':<40} score"]
    for d in KNOWN_DIMENSIONS:
        label = d if d != UNFILTERED_DIMENSION else f"{d} (no static filter; not in Quality)"
        lines.append(f"{label:<40} {pct(summary.dimensions.get(d))}")
    lines.append("")
    for name, full, part, dims in (
        ("Quality", summary.quality, summary.quality_partial, QUALITY_DIMENSIONS),
        ("Semantic", summary.semantic, summary.semantic_partial, SEMANTIC_DIMENSIONS),
    ):
        if full is not None:
            lines.append(f"{name:<40} {pct(full)}")
        else:
            n = sum(d in summary.dimensions for d in dims)
            extra = f" (partial over {n}/{len(dims)} dimensions: {pct(part)})" if n else ""
            lines.append(f"{name:<40} —{extra}")
    lines.append(f"{'Total':<40} {pct(summary.total)}")
    if missing := summary.missing_dimensions:
        lines.append(f"missing dimensions ({len(missing)}): {', '.join(missing)}")
    return "\n".join(lines)
