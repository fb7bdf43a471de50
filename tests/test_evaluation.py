"""Evaluation protocol tests: names, seeds, flickering, aggregation, comparison, generation loop.

Offline and fast. The generation-loop test uses a deterministic synthetic frame generator
written here; the test through the real pipeline comes with the pipeline.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from dit_mem.cli import main
from dit_mem.evaluation import benchmarks as B
from dit_mem.evaluation import phygenbench_scores as P
from dit_mem.evaluation import vbench_scores as V
from dit_mem.evaluation.compare import compare, load_run, to_csv
from dit_mem.evaluation.flicker import (
    UNFILTERED_DIMENSION,
    flicker_folder,
    temporal_flickering_score,
)
from dit_mem.evaluation.loop import run_generation
from dit_mem.evaluation.plan import filter_jobs, plan_phygenbench, plan_vbench, vbench_filename
from dit_mem.evaluation.video_io import read_video, write_mp4


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """``main()`` binds the package logger to pytest's captured stderr; unbind it afterwards."""
    yield
    logging.getLogger("dit_mem").handlers.clear()


# ----------------------------------------------------------------------------- names, seeds


def test_vbench_standard_plan_names_and_seeds():
    jobs = plan_vbench()
    assert len(jobs) == 11 * 10 * 5
    by_name = {(j.folder, j.filename): j for j in jobs}
    color = B.vbench_prompt_lists()["color"]
    assert color[:2] == ["a black cat", "a blue car"]
    # p = 1-based position in its list, seed = 42 + 10 p + i
    assert by_name[("color", "a black cat-0.mp4")].seed == 52
    assert by_name[("color", "a black cat-4.mp4")].seed == 56
    assert by_name[("color", "a blue car-3.mp4")].seed == 65
    first_style = B.vbench_prompt_lists()["appearance_style"][0]
    job = by_name[("appearance_style", f"{first_style}-0.mp4")]
    assert job.prompt == first_style and job.seed == 52
    assert {j.folder for j in jobs} == set(B.VBENCH_LISTS)
    assert len({(j.folder, j.filename) for j in jobs}) == len(jobs)


def test_slash_in_prompt_becomes_underscore():
    assert vbench_filename("a cat/dog on a mat", 2) == "a cat_dog on a mat-2.mp4"
    jobs = plan_vbench({"color": ["x", "red/blue car"]}, standard=False)
    assert [j.filename for j in jobs[5:7]] == ["red_blue car-0.mp4", "red_blue car-1.mp4"]
    assert jobs[5].prompt == "red/blue car" and jobs[5].seed == 62


def test_full_mode_counts():
    lists = B.vbench_prompt_lists(full=True)
    assert sum(len(v) for v in lists.values()) == 946
    jobs = plan_vbench(full=True)
    assert len(jobs) == 946 * 5
    assert sum(j.folder == "human_action" for j in jobs) == 100 * 5
    # seeds restart per list: position 100 in human_action -> 42 + 1000 + i
    assert max(j.seed for j in jobs if j.folder == "human_action") == 42 + 1000 + 4


def test_prompt_not_in_vbench_info_is_a_clear_error():
    with pytest.raises(ValueError, match="not in VBench_full_info.json"):
        plan_vbench({"color": ["a purple giraffe made of glass"]})
    with pytest.raises(ValueError, match="only for"):  # known prompt, wrong folder
        plan_vbench({"color": ["a bus"]})


def test_phygenbench_plan_layout():
    jobs = plan_phygenbench("my-model")
    assert len(jobs) == 160
    assert str(jobs[0].relpath) == "PhyVideos/my-model/output_video_1.mp4"
    assert str(jobs[-1].relpath) == "PhyVideos/my-model/output_video_160.mp4"
    assert {j.seed for j in jobs} == {42}
    assert jobs[0].prompt == B.phygenbench_prompts()[0]["caption"]
    with pytest.raises(ValueError, match="plain folder name"):
        plan_phygenbench("a/b")


def test_filter_jobs_subset():
    jobs = plan_vbench()
    sel = filter_jobs(jobs, prompt_filter="CAT", limit=3)
    assert len(sel) == 3 and all("cat" in j.prompt.lower() for j in sel)
    assert len(filter_jobs(jobs, shard=(1, 4))) == len(jobs[1::4])
    with pytest.raises(ValueError, match="unknown folder"):
        filter_jobs(jobs, folders=["nope"])


# ----------------------------------------------------------------------------- flickering


def test_flicker_formula_on_arrays():
    const = np.full((5, 4, 6, 3), 77, np.uint8)
    assert temporal_flickering_score(const) == 1.0
    black_white = np.stack([np.zeros((4, 6, 3), np.uint8), np.full((4, 6, 3), 255, np.uint8)] * 3)
    assert temporal_flickering_score(black_white) == 0.0
    # 0, 51, 0: both pairs have MAE 51 -> (255 - 51) / 255 = 0.8
    v = np.stack([np.full((2, 2, 3), x, np.uint8) for x in (0, 51, 0)])
    assert temporal_flickering_score(v) == pytest.approx(0.8)
    # one of four pixels jumps 0 -> 255: MAE 63.75 -> 0.75; uint8 must not wrap around (255 -> 0)
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 255
    assert temporal_flickering_score(np.stack([a, b])) == pytest.approx(0.75)
    assert temporal_flickering_score(np.stack([b, a])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least two frames"):
        temporal_flickering_score(const[:1])


def _alternating(n: int, lo: int, hi: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.stack([np.full((h, w, 3), lo if t % 2 == 0 else hi, np.uint8) for t in range(n)])


def test_flicker_on_mp4_files(tmp_path):
    const = np.full((6, 16, 16, 3), 90, np.uint8)
    alt = _alternating(6, 0, 102)  # MAE 102 -> 0.6
    write_mp4(tmp_path / "const-0.mp4", const, lossless=True)
    write_mp4(tmp_path / "alt-0.mp4", alt, lossless=True)
    np.testing.assert_array_equal(read_video(tmp_path / "alt-0.mp4"), alt)  # lossless reader check
    out = tmp_path / "res" / "flicker_eval_results.json"
    res = flicker_folder(tmp_path, out=out, expected=["const-0.mp4", "alt-0.mp4", "gone-0.mp4"])
    mean, per_video = res[UNFILTERED_DIMENSION]
    scores = {Path(v["video_path"]).name: v["video_results"] for v in per_video}
    assert scores["const-0.mp4"] == pytest.approx(1.0)
    assert scores["alt-0.mp4"] == pytest.approx(0.6)
    assert mean == pytest.approx(0.8)
    assert res["missing_videos"] == ["gone-0.mp4"] and res["static_filter"] is False
    assert V.parse_results_file(out)[UNFILTERED_DIMENSION].mean == pytest.approx(0.8)
    # lossy (default yuv420p H.264): same answer within codec tolerance
    write_mp4(tmp_path / "lossy" / "alt-0.mp4", alt)
    lossy = flicker_folder(tmp_path / "lossy")[UNFILTERED_DIMENSION][0]
    assert lossy == pytest.approx(0.6, abs=0.02)


# ----------------------------------------------------------------------------- VBench scores


def _hand_scores() -> dict[str, float]:
    # Quality: 1, 1, 1, 1 (at Max), 0.5, 0.5, dynamic 0.5 * weight 0.5 -> 5.25 / 6.5
    # Semantic: every dimension exactly halfway between Min and Max -> 0.5
    return {
        "subject_consistency": 1.0,
        "background_consistency": 1.0,
        "temporal_flickering": 1.0,
        "motion_smoothness": 0.9975,
        "aesthetic_quality": 0.5,
        "imaging_quality": 0.5,
        "dynamic_degree": 0.5,
        "object_class": 0.5,
        "multiple_objects": 0.5,
        "human_action": 0.5,
        "color": 0.5,
        "spatial_relationship": 0.5,
        "scene": 0.4111,
        "appearance_style": (0.0009 + 0.2855) / 2,
        "temporal_style": 0.182,
        "overall_consistency": 0.182,
    }


def test_vbench_aggregation_hand_computed():
    s = V.aggregate(_hand_scores())
    assert s.quality == pytest.approx(5.25 / 6.5)
    assert s.semantic == pytest.approx(0.5)
    assert s.total == pytest.approx((4 * 5.25 / 6.5 + 0.5) / 5)  # 0.746154
    assert s.missing_dimensions == [] and s.complete
    at_min = V.aggregate({d: V.NORMALIZE[d][0] for d in V.ALL_DIMENSIONS})
    assert at_min.total == pytest.approx(0.0)
    at_max = V.aggregate({d: V.NORMALIZE[d][1] for d in V.ALL_DIMENSIONS})
    assert at_max.quality == pytest.approx(1.0) and at_max.total == pytest.approx(1.0)


def test_vbench_partial_is_never_zero_filled():
    scores = _hand_scores()
    del scores["dynamic_degree"], scores["color"]
    s = V.aggregate(scores)
    assert s.quality is None and s.semantic is None and s.total is None
    assert s.missing_dimensions == ["dynamic_degree", "color"]
    assert s.quality_partial == pytest.approx(5.0 / 6.0)  # renormalised over weight 6
    assert s.semantic_partial == pytest.approx(0.5)
    text = V.format_summary(s)
    assert "partial over 6/7" in text and re.search(r"Total\s+—", text)


def test_vbench_results_parser(tmp_path):
    # vbench's documented format: {dimension: [mean, [{video_path, video_results}, ...]]}
    path = tmp_path / "results_2025-01-01-00:00:00_eval_results.json"
    path.write_text(
        json.dumps(
            {
                "subject_consistency": [
                    0.95,
                    [
                        {"video_path": "a dog running-0.mp4", "video_results": 0.94},
                        {"video_path": "a dog running-1.mp4", "video_results": 0.96},
                    ],
                ],
                "dynamic_degree": [0.4, [{"video_path": "x-0.mp4", "video_results": False}]],
                "motion_smoothness": [float("nan"), []],
            }
        )
    )
    res = V.parse_results_file(path)
    assert set(res) == {"subject_consistency", "dynamic_degree"}  # NaN is missing, not 0
    assert res["subject_consistency"].mean == 0.95
    assert res["subject_consistency"].num_videos == 2
    (tmp_path / "bad_eval_results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected"):
        V.parse_results_file(tmp_path / "bad_eval_results.json")


# ----------------------------------------------------------------------------- PhyGenBench


def test_phygenbench_kling_reproduces_leaderboard(capsys):
    path = B.phygenbench_reference_results()
    s = P.aggregate(P.load_results(path))
    assert s.complete and s.counts == {"Force": 40, "Light": 50, "Heat": 30, "Material": 40}
    assert s.overall == pytest.approx(117 / 240)  # video-weighted: 0.4875 -> 0.49
    assert main(["eval", "phygenbench", "score", "--results", str(path)]) == 0
    out = capsys.readouterr().out
    for name, value in [
        ("Force", "0.45"),
        ("Light", "0.58"),
        ("Heat", "0.50"),
        ("Material", "0.40"),
        ("overall", "0.49"),
    ]:
        assert re.search(rf"^{name}\s+{re.escape(value)}\b", out, re.M), out


def test_phygenbench_combination_rule_and_bad_entries():
    assert P.combine(dict(single=3, multi_gpt=0, multi_llava=3, video_gpt=1, video_intern=0)) == (
        1,
        2,
        1,
    )
    assert P.combine(dict(single=2, multi_gpt=2, multi_llava=3, video_gpt=3, video_intern=3)) == (
        2,
        3,
        2,
    )
    entries = P.load_results(B.phygenbench_reference_results())[:10]
    entries[3] = dict(entries[3], video_gpt=None)
    s = P.aggregate(entries)
    assert not s.complete and len(s.invalid) == 1 and len(s.missing_prompts) == 151
    assert s.counts["Force"] == 9 and s.categories["Light"] is None  # absent, not 0
    assert "PARTIAL" in P.format_summary(s) and "—" in P.format_summary(s)


# ----------------------------------------------------------------------------- compare


def _write_results(folder: Path, scores: dict[str, float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {d: [v, [{"video_path": "v-0.mp4", "video_results": v}]] for d, v in scores.items()}
    (folder / "results_x_eval_results.json").write_text(json.dumps(data))


def test_compare_with_partial_results(tmp_path, capsys):
    full, part = tmp_path / "mem", tmp_path / "base"
    _write_results(full / "vbench" / "results" / "all", _hand_scores())
    assert (
        main(
            [
                "eval",
                "phygenbench",
                "score",
                "--results",
                str(B.phygenbench_reference_results()),
                "--run",
                str(full),
            ]
        )
        == 0
    )
    partial_scores = {k: v for k, v in _hand_scores().items() if k != "color"}
    _write_results(part / "vbench" / "results" / "some", partial_scores)
    runs = [load_run(full), load_run(part, "baseline")]
    md = compare(runs, tmp_path / "cmp")
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "74.62" in lines["VBench Total"] and "—" in lines["VBench Total"]
    assert lines["color"].rstrip(" |").endswith("—")
    assert "0.49" in lines["PhyGenBench overall"] and "—" in lines["PhyGenBench overall"]
    assert [c.strip() for c in lines["color"].split("|")[3:5]] == ["50.00", "—"]
    rows = {r.split(",")[1]: r.split(",") for r in to_csv(runs).splitlines()[1:]}
    assert rows["vbench.color"][-1] == ""  # missing is an empty cell, not 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "compare.csv").is_file()
    assert "missing 1 dimension(s): color" in md


def test_vbench_score_results_only_reports_missing(tmp_path, capsys):
    run = tmp_path / "run"
    # two videos of one folder exist, all other folders are absent; one folder has results
    folder = run / "vbench" / "videos" / "color"
    folder.mkdir(parents=True)
    for name in ("a black cat-0.mp4", "a black cat-1.mp4"):
        (folder / name).write_bytes(b"x")
    _write_results(run / "vbench" / "results" / "color", {"color": 0.8})
    assert main(["eval", "vbench", "score", "--run", str(run), "--results-only"]) == 0
    out = capsys.readouterr().out
    assert "color: 48 of 50 videos missing" in out
    assert re.search(r"Total\s+—", out) and "missing dimensions (15)" in out
    summary = json.loads((run / "vbench" / "scores.json").read_text())
    assert summary["total"] is None and summary["dimensions"] == {"color": 0.8}


def test_vbench_score_without_env_says_what_to_run(tmp_path, capsys):
    rc = main(
        ["eval", "vbench", "score", "--run", str(tmp_path), "--vbench-env", str(tmp_path / "nope")]
    )
    assert rc == 2
    assert "evaluation/vbench/setup_env.sh" in capsys.readouterr().out


# ----------------------------------------------------------------------------- generation loop


class StripeGenerator:
    """A real (tiny) generator of synthetic videos: a bright stripe whose position and colour
    depend on the prompt and seed, moving one pixel per frame."""

    def __init__(self, frames: int = 4, size: int = 16, no_memory: bool = False):
        self.frames, self.size = frames, size
        self.metadata = {"generator": "stripes", "frames": frames, "no_memory": no_memory}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        self.calls.append((prompt, seed))
        rng = np.random.default_rng(seed)
        video = np.zeros((self.frames, self.size, self.size, 3), np.uint8)
        color = rng.integers(64, 256, 3, dtype=np.uint8)
        start = len(prompt) % self.size
        for t in range(self.frames):
            cols = [(start + t + dx) % self.size for dx in range(4)]
            video[t, :, cols] = color
        return video


def test_generation_loop_names_seeds_and_resume(tmp_path):
    jobs = filter_jobs(plan_vbench(), folders=["color"], limit=3) + plan_phygenbench("m")[:1]
    gen = StripeGenerator()
    report = run_generation(
        jobs, gen, tmp_path, benchmark="test", expected_frames=4, progress=False
    )
    assert len(report.generated) == 4 and not report.skipped
    assert gen.calls == [(j.prompt, j.seed) for j in jobs]
    assert (tmp_path / "color" / "a black cat-2.mp4").is_file()
    assert (tmp_path / "PhyVideos" / "m" / "output_video_1.mp4").is_file()
    video = read_video(tmp_path / "color" / "a black cat-1.mp4")
    assert video.shape == (4, 16, 16, 3)
    own = np.abs(video.astype(float) - gen("a black cat", 53)).mean()  # the seed's own video
    other = np.abs(video.astype(float) - gen("a black cat", 52)).mean()
    assert own < 8 and own < other / 2
    assert not list(tmp_path.rglob(".tmp-*"))

    gen2 = StripeGenerator()
    again = run_generation(
        jobs, gen2, tmp_path, benchmark="test", expected_frames=4, progress=False
    )
    assert len(again.skipped) == 4 and gen2.calls == []  # resumed: nothing regenerated
    (tmp_path / "color" / "a black cat-0.mp4").unlink()
    (tmp_path / "color" / "a black cat-1.mp4").write_bytes(b"not a video")  # a broken file
    third = run_generation(
        jobs, gen2, tmp_path, benchmark="test", expected_frames=4, progress=False
    )
    assert sorted(s for _, s in gen2.calls) == [52, 53] and len(third.replaced) == 1

    with pytest.raises(ValueError, match="different settings"):
        run_generation(
            jobs, StripeGenerator(no_memory=True), tmp_path, benchmark="test", progress=False
        )
    with pytest.raises(ValueError, match="expected 5"):
        run_generation(
            jobs[:1],
            StripeGenerator(),
            tmp_path / "other",
            benchmark="test",
            expected_frames=5,
            progress=False,
        )
