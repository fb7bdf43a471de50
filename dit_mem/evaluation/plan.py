"""Job planning: which video to generate, under which file name, with which seed.

A :class:`VideoJob` is one video: its prompt, the folder (relative to the run's video root)
and file name it goes to, and its seed. Planning is pure (no I/O beyond reading the packaged
prompt lists), so names and seeds are easy to test against the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dit_mem.errors import UserError
from dit_mem.evaluation import benchmarks as B


@dataclass(frozen=True)
class VideoJob:
    """One video to generate."""

    prompt: str
    folder: str  # relative to the video root ("color", "PhyVideos/dit-mem", ...)
    filename: str  # "a black cat-0.mp4", "output_video_1.mp4"
    seed: int

    @property
    def relpath(self) -> Path:
        return Path(self.folder) / self.filename


def vbench_filename(prompt: str, index: int) -> str:
    """VBench's file name for video ``index`` of ``prompt``: ``{prompt}-{i}.mp4``, ``/`` -> ``_``."""
    if index < 0:
        raise UserError(f"video index must be >= 0, got {index}")
    return f"{prompt.replace('/', '_')}-{index}.mp4"


def vbench_seed(prompt_position: int, index: int, base_seed: int = B.BASE_SEED) -> int:
    """Seed ``base + 10*p + i`` with ``p`` the 1-based prompt position in its list."""
    if prompt_position < 1:
        raise UserError(f"prompt position is 1-based, got {prompt_position}")
    if not 0 <= index < B.SEED_STRIDE:
        raise UserError(f"video index must be in [0, {B.SEED_STRIDE}), got {index}")
    return base_seed + B.SEED_STRIDE * prompt_position + index


def check_prompts_in_vbench_info(
    lists: Mapping[str, Sequence[str]], info_path: str | Path | None = None
) -> None:
    """Standard mode needs every prompt in VBench's info file for its folder's dimensions.

    Raises a ValueError naming the first offending prompts (VBench would silently skip them).
    """
    known = B.vbench_prompt_dimensions(info_path)
    problems = []
    for folder, prompts in lists.items():
        wanted = set(B.FOLDER_DIMENSIONS.get(folder, (folder,)))
        for prompt in prompts:
            if prompt not in known:
                problems.append(f"{folder}: {prompt!r} is not in VBench_full_info.json")
            elif not wanted & known[prompt]:
                problems.append(
                    f"{folder}: {prompt!r} is listed in VBench_full_info.json only for "
                    f"{sorted(known[prompt])}, not for {sorted(wanted)}"
                )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(
            "VBench standard mode scores only prompts from its info file; "
            + "; ".join(problems[:3])
            + more
        )


def plan_vbench(
    lists: Mapping[str, Sequence[str]] | None = None,
    *,
    full: bool = False,
    videos_per_prompt: int = B.VIDEOS_PER_PROMPT,
    base_seed: int = B.BASE_SEED,
    standard: bool = True,
    info_path: str | Path | None = None,
) -> list[VideoJob]:
    """All VBench jobs, one folder per prompt list, in list order then prompt then index.

    ``lists`` defaults to the packaged lists (``full`` picks the per-dimension ones). In
    ``standard`` mode every prompt must appear in VBench's info file (clear error otherwise).
    """
    if not 1 <= videos_per_prompt <= B.SEED_STRIDE:
        raise UserError(f"videos_per_prompt must be in [1, {B.SEED_STRIDE}]")
    if lists is None:
        lists = B.vbench_prompt_lists(full=full)
    if standard:
        check_prompts_in_vbench_info(lists, info_path)
    jobs = []
    for folder, prompts in lists.items():
        for p, prompt in enumerate(prompts, start=1):
            for i in range(videos_per_prompt):
                jobs.append(
                    VideoJob(
                        prompt, folder, vbench_filename(prompt, i), vbench_seed(p, i, base_seed)
                    )
                )
    return jobs


def plan_phygenbench(
    model_name: str,
    prompts: Sequence[str] | None = None,
    seed: int = B.PHYGENBENCH_SEED,
) -> list[VideoJob]:
    """PhyGenEval's layout: ``PhyVideos/<model>/output_video_{i}.mp4``, i from 1, one seed."""
    if not model_name or "/" in model_name or model_name in (".", ".."):
        raise UserError(f"model name must be a plain folder name, got {model_name!r}")
    if prompts is None:
        prompts = [entry["caption"] for entry in B.phygenbench_prompts()]
    folder = f"PhyVideos/{model_name}"
    return [
        VideoJob(prompt, folder, f"output_video_{i}.mp4", seed)
        for i, prompt in enumerate(prompts, start=1)
    ]


def filter_jobs(
    jobs: Iterable[VideoJob],
    *,
    prompt_filter: str | None = None,
    folders: Sequence[str] | None = None,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
) -> list[VideoJob]:
    """Select a subset for smoke tests or multi-GPU runs; names and seeds are unchanged.

    ``prompt_filter`` keeps prompts containing the text (case-insensitive); ``folders`` keeps
    those folders; ``shard=(i, n)`` keeps every n-th job from i; ``limit`` keeps the first N.
    """
    out = list(jobs)
    if folders:
        unknown = sorted(set(folders) - {j.folder for j in out})
        if unknown:
            raise UserError(
                f"unknown folder(s) {unknown}; known: {sorted({j.folder for j in out})}"
            )
        out = [j for j in out if j.folder in set(folders)]
    if prompt_filter:
        needle = prompt_filter.lower()
        out = [j for j in out if needle in j.prompt.lower()]
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise UserError(f"shard index must be in [0, {count}), got {index}")
        out = out[index::count]
    if limit is not None:
        if limit < 0:
            raise UserError(f"limit must be >= 0, got {limit}")
        out = out[:limit]
    return out
