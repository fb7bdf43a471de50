"""Benchmark data and protocol constants (VBench, PhyGenBench), read from package data.

The prompt lists, VBench's ``VBench_full_info.json`` and PhyGenBench's ``prompts.json`` ship
inside the package (``dit_mem/evaluation/data/``) so that the commands work after a plain
``pip install``; ``evaluation/`` at the repository root only links to them.

Protocol facts (paper + benchmarks):
- VBench: 11 prompt lists x 10 prompts x 5 videos, file ``{prompt}-{i}.mp4`` (``/`` -> ``_``),
  seed ``42 + 10*p + i`` (p = 1-based index of the prompt in its list), 480x832, 81 frames,
  16 fps. ``--full`` uses VBench's complete per-dimension lists instead.
- PhyGenBench: 160 prompts, one video each, seed 42, ``PhyVideos/<model>/output_video_{i}.mp4``
  with i = 1..160 in ``prompts.json`` order.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from dit_mem.errors import UserError

VBENCH_LISTS: tuple[str, ...] = (
    "appearance_style",
    "color",
    "human_action",
    "multiple_objects",
    "object_class",
    "overall_consistency",
    "scene",
    "spatial_relationship",
    "subject_consistency",
    "temporal_flickering",
    "temporal_style",
)
"""The 11 prompt lists (= video folders) the paper evaluates."""

# Folder -> the VBench dimensions its videos feed (standard mode).
FOLDER_DIMENSIONS: dict[str, tuple[str, ...]] = {name: (name,) for name in VBENCH_LISTS} | {
    "subject_consistency": ("subject_consistency", "motion_smoothness", "dynamic_degree"),
    "scene": ("scene", "background_consistency"),
    "overall_consistency": ("overall_consistency", "aesthetic_quality", "imaging_quality"),
}

VIDEOS_PER_PROMPT = 5
BASE_SEED = 42
SEED_STRIDE = 10
FPS = 16
HEIGHT, WIDTH, NUM_FRAMES = 480, 832, 81

PHYGENBENCH_SEED = 42
PHYGENBENCH_NUM_PROMPTS = 160
# prompts.json main_category -> the reported category (Material = Physical + Chemical).
PHYGENBENCH_CATEGORY: dict[str, str] = {
    "Force": "Force",
    "Light": "Light",
    "Heat": "Heat",
    "Physical Properties": "Material",
    "Chemical Properties": "Material",
}
PHYGENBENCH_CATEGORIES: tuple[str, ...] = ("Force", "Light", "Heat", "Material")
PHYGENBENCH_CATEGORY_ALIAS: dict[str, str] = {
    "Force": "mechanics",
    "Light": "optics",
    "Heat": "thermal",
    "Material": "material",
}


def data_dir() -> Path:
    """Folder of the packaged benchmark data (a real directory for installed packages)."""
    return Path(str(resources.files("dit_mem.evaluation") / "data"))


def vbench_info_path() -> Path:
    """Path of VBench's ``VBench_full_info.json`` (946 entries)."""
    return data_dir() / "vbench" / "VBench_full_info.json"


def read_prompt_file(path: str | Path) -> list[str]:
    """Read a prompt list: one prompt per line, blank lines skipped, order kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt list not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompt list {path} is empty")
    return prompts


def vbench_prompt_lists(
    full: bool = False, prompt_dir: str | Path | None = None
) -> dict[str, list[str]]:
    """The VBench prompt lists by folder name, in ``VBENCH_LISTS`` order.

    ``full=False``: the paper's 10 prompts per list; ``full=True``: VBench's complete
    per-dimension lists. ``prompt_dir`` replaces the packaged folder (``<name>.txt`` files).
    """
    if prompt_dir is None:
        prompt_dir = data_dir() / "vbench" / ("prompts_per_dimension" if full else "prompts")
    prompt_dir = Path(prompt_dir)
    return {name: read_prompt_file(prompt_dir / f"{name}.txt") for name in VBENCH_LISTS}


@cache
def _load_json(path: str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def vbench_info(path: str | Path | None = None) -> list[dict[str, Any]]:
    """VBench's full info: ``[{prompt_en, dimension: [...], auxiliary_info?}, ...]``."""
    return _load_json(str(path or vbench_info_path()))


def vbench_prompt_dimensions(path: str | Path | None = None) -> dict[str, set[str]]:
    """Prompt -> the set of VBench dimensions it is listed for in the info file."""
    out: dict[str, set[str]] = {}
    for entry in vbench_info(path):
        out.setdefault(entry["prompt_en"], set()).update(entry["dimension"])
    return out


def phygenbench_prompts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """PhyGenBench's 160 ``{caption, physical_laws, sub_category, main_category}`` entries."""
    return _load_json(str(path or data_dir() / "phygenbench" / "prompts.json"))


def phygenbench_reference_results() -> Path:
    """PhyGenBench's published per-video stage scores for Kling (``result_kling.json``)."""
    return data_dir() / "phygenbench" / "result_kling.json"
