"""PhyGenBench: combine PhyGenEval's per-video stage scores into category and overall scores.

Input: a JSON list with one entry per video, as PhyGenEval's ``overall.py`` writes it (e.g.
``result_kling.json``): ``single``, ``multi_gpt``, ``multi_llava``, ``video_gpt``,
``video_intern`` (each 0-3), ``main_category`` and ``video`` (``.../output_video_{i}.mp4``).

Combination rule (PhyGenEval; Python's ``round``, i.e. banker's rounding, as the official
script uses):

    closed = round((single + multi_gpt + video_gpt) / 3)
    open   = round((single + multi_llava + video_intern) / 3)
    final  = (closed + open) // 2
    category score = mean(final over the category's videos) / 3

Categories: Force (mechanics), Light (optics), Heat (thermal), Material (= Physical +
Chemical Properties).

**Overall** = mean(final over all scored videos) / 3, i.e. every video weighs the same (not the
mean of the four category scores). This is the rule that reproduces the leaderboard: for Kling
it gives 117/240 = 0.4875 -> 0.49, whereas the mean of the four categories is 0.4825 -> 0.48.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dit_mem.errors import UserError
from dit_mem.evaluation import benchmarks as B
from dit_mem.utils import get_logger

logger = get_logger(__name__)

STAGES: tuple[str, ...] = ("single", "multi_gpt", "multi_llava", "video_gpt", "video_intern")
_VIDEO_INDEX = re.compile(r"output_video_(\d+)\.mp4$")


def combine(scores: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(closed, open, final)`` for one video's stage scores (ints 0-3)."""
    values = {}
    for stage in STAGES:
        v = scores.get(stage)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 3:
            raise UserError(f"stage score {stage!r} must be a number in [0, 3], got {v!r}")
        values[stage] = v
    closed = round((values["single"] + values["multi_gpt"] + values["video_gpt"]) / 3)
    open_ = round((values["single"] + values["multi_llava"] + values["video_intern"]) / 3)
    return closed, open_, (closed + open_) // 2


@dataclass
class PhyGenBenchSummary:
    """Category and overall scores in [0, 1] (None for a category without scored videos)."""

    categories: dict[str, float | None]
    overall: float | None
    counts: dict[str, int]  # scored videos per category
    expected: dict[str, int]  # videos per category in prompts.json
    invalid: list[str] = field(default_factory=list)  # entries without usable stage scores
    missing_prompts: list[int] = field(default_factory=list)  # 1-based indices with no entry

    @property
    def complete(self) -> bool:
        return not self.invalid and not self.missing_prompts and self.counts == self.expected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"complete": self.complete}


def _category_of(entry: Mapping[str, Any], index: int | None, prompts: Sequence[Mapping]) -> str:
    main = entry.get("main_category")
    if main is None and index is not None and 1 <= index <= len(prompts):
        main = prompts[index - 1]["main_category"]
    if main not in B.PHYGENBENCH_CATEGORY:
        raise UserError(f"unknown main_category {main!r}")
    return B.PHYGENBENCH_CATEGORY[main]


def aggregate(entries: Sequence[Mapping[str, Any]]) -> PhyGenBenchSummary:
    """Aggregate per-video entries; bad or missing entries are reported, never scored 0."""
    prompts = B.phygenbench_prompts()
    expected = {c: 0 for c in B.PHYGENBENCH_CATEGORIES}
    for p in prompts:
        expected[B.PHYGENBENCH_CATEGORY[p["main_category"]]] += 1
    finals: dict[str, list[int]] = {c: [] for c in B.PHYGENBENCH_CATEGORIES}
    invalid, seen = [], set()
    for n, entry in enumerate(entries, start=1):
        match = _VIDEO_INDEX.search(str(entry.get("video", "")))
        index = int(match.group(1)) if match else n
        label = f"entry {n} ({entry.get('video', 'no video path')})"
        if index in seen:
            invalid.append(f"{label}: a second result for prompt {index}")
            continue
        try:
            category = _category_of(entry, index, prompts)
            _, _, final = combine(entry)
        except ValueError as e:
            invalid.append(f"{label}: {e}")
            continue
        seen.add(index)
        finals[category].append(final)
    for msg in invalid:
        logger.warning("PhyGenBench: %s", msg)
    categories = {c: (sum(v) / len(v) / 3 if v else None) for c, v in finals.items()}
    everything = [f for v in finals.values() for f in v]
    overall = sum(everything) / len(everything) / 3 if everything else None
    missing = [i for i in range(1, len(prompts) + 1) if i not in seen]
    counts = {c: len(v) for c, v in finals.items()}
    return PhyGenBenchSummary(categories, overall, counts, expected, invalid, missing)


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a PhyGenEval results file (a JSON list of per-video entries)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PhyGenBench results file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise UserError(f"{path}: expected a JSON list of per-video objects")
    return data


def format_summary(summary: PhyGenBenchSummary) -> str:
    """The leaderboard row as lines: ``Force 0.45`` ... ``overall 0.49`` (two decimals)."""

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}"

    lines = []
    for c in B.PHYGENBENCH_CATEGORIES:
        note = (
            f"({B.PHYGENBENCH_CATEGORY_ALIAS[c]}, {summary.counts[c]}/{summary.expected[c]} videos)"
        )
        lines.append(f"{c:<9} {fmt(summary.categories[c])}  {note}")
    total = sum(summary.counts.values())
    lines.append(f"{'overall':<9} {fmt(summary.overall)}  (mean over {total} videos)")
    if not summary.complete:
        lines.append(
            f"PARTIAL: {len(summary.missing_prompts)} prompt(s) without a result, "
            f"{len(summary.invalid)} invalid entr(y/ies)"
        )
    return "\n".join(lines)
