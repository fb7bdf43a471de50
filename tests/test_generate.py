"""End to end on tiny random models: `dit-mem generate`, benchmark layouts, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_mem.cli import main
from dit_mem.config import ConfigError, load_config
from dit_mem.generation import GenerationConfig, generate, load_pipeline


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from dit_mem.testing import run_random_world

    out = tmp_path_factory.mktemp("demo")
    run_random_world(out, k=2, steps=2)
    return out


def tiny_overrides(demo: Path, **extra) -> list[str]:
    kv = {
        "base_model": demo / "model",
        "encoder": demo / "encoder",
        "bank": demo / "bank",
        "height": 64,
        "width": 64,
        "num_frames": 17,
        "steps": 2,
        "dtype": "float32",
        "device": "cpu",
        "progress": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in kv.items()]


def test_demo_writes_video_sidecar_and_contact_sheet(demo):
    stem = demo / "a_red_circle_moving_right"
    sidecar = json.loads(stem.with_suffix(".json").read_text())
    assert [r["rank"] for r in sidecar["retrieved"]] == [1, 2]
    assert sidecar["retrieved"][0]["caption"] == "a red circle moving right"
    assert sidecar["settings"]["no_memory"] is False and sidecar["settings"]["k"] == 2
    assert stem.with_suffix(".png").stat().st_size > 1000
    from dit_mem.evaluation.video_io import read_video

    frames = read_video(stem.with_suffix(".mp4"))
    assert frames.shape == (17, 64, 64, 3)


def test_generate_csv_is_resumable(demo, tmp_path, capsys):
    csv = tmp_path / "prompts.csv"
    csv.write_text(
        "prompt,filename,seed\na blue square moving left,blue.mp4,3\na green circle moving up,,\n"
    )
    out = tmp_path / "out"
    args = ["generate", "--csv", str(csv), "--out", str(out), *tiny_overrides(demo, k=3)]
    assert main(args) == 0
    assert (out / "blue.mp4").is_file() and (out / "0001_a_green_circle_moving_up.mp4").is_file()
    assert json.loads((out / "blue.json").read_text())["seed"] == 3
    assert len(json.loads((out / "blue.json").read_text())["retrieved"]) == 3
    assert (out / "generate_config.yaml").is_file()
    capsys.readouterr()
    assert main(args) == 0
    assert "2 already done, 0 to generate" in capsys.readouterr().out


def test_memory_changes_output_and_no_memory_is_explicit(demo):
    cfg = load_config(GenerationConfig, None, tiny_overrides(demo))
    pipe = load_pipeline(cfg)
    with_mem = generate(pipe, cfg, "a red circle moving right", seed=1)
    without = generate(pipe, cfg, "a red circle moving right", seed=1, no_memory=True)
    assert with_mem.retrieved.ids and not without.retrieved.ids
    assert not np.array_equal(with_mem.frames, without.frames)
    from dit_mem.generation import PipelineGenerator

    again = PipelineGenerator(pipe, cfg)("a red circle moving right", 1)  # VideoGenerator
    assert np.array_equal(again, with_mem.frames)
    cond = generate(pipe, cfg, "a red circle moving right", seed=1, memory_mode="cond")
    assert not np.array_equal(cond.frames, with_mem.frames)


def test_memory_from_token_cache_equals_memory_from_latents(demo, tmp_path):
    import shutil

    from dit_mem.bank import MemoryBank
    from dit_mem.data import build_token_cache
    from dit_mem.memory import MemoryEncoder

    encoder = MemoryEncoder.from_pretrained(demo / "encoder").eval()
    bank = MemoryBank.from_pretrained(demo / "bank")
    ids = [bank.retrieve(["a red circle moving right"], k=2)[0].ids]
    from_latents = bank.encode(ids, encoder)
    cached = tmp_path / "bank"
    shutil.copytree(demo / "bank", cached)
    build_token_cache(encoder, cached / "latents", cached / "tokens", num_workers=0)
    shutil.rmtree(cached / "latents")  # tokens only
    from_cache = MemoryBank.from_pretrained(cached).encode(ids, encoder)
    torch.testing.assert_close(from_cache.log_counts, from_latents.log_counts)
    err = (from_cache.tokens - from_latents.tokens).norm() / from_latents.tokens.norm()
    assert err < 1e-2  # the cache stores bf16
    other = MemoryEncoder.from_preset("tiny")  # another encoder: the cache refuses it
    with pytest.raises(
        ValueError,
        match="is a token-only bank of the memory encoder .*: its tokens serve that encoder alone",
    ):
        MemoryBank.from_pretrained(cached).encode(ids, other)


def test_nan_frames_are_an_error(demo):
    cfg = load_config(GenerationConfig, None, tiny_overrides(demo))
    pipe = load_pipeline(cfg)
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"generation for 'a red circle' \(seed 3\) "):
        generate(pipe, cfg, "a red circle", seed=3)


def test_missing_bank_is_an_error_not_a_silent_fallback(demo, tmp_path):
    cfg = load_config(GenerationConfig, None, tiny_overrides(demo, bank=tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pipeline(cfg)
    with pytest.raises(ConfigError, match="needs a bank"):
        load_config(GenerationConfig, None, tiny_overrides(demo, bank="null", index="null"))
    base_only = load_config(
        GenerationConfig, None, tiny_overrides(demo, bank="null", index="null", no_memory="true")
    )
    pipe = load_pipeline(base_only)
    assert generate(pipe, base_only, "a red circle").settings["no_memory"] is True
    with pytest.raises(ValueError, match="no_memory=true"):
        generate(pipe, base_only, "a red circle", no_memory=False)


def test_benchmark_layouts_through_the_real_pipeline(demo, tmp_path, capsys):
    run = tmp_path / "run"
    common = tiny_overrides(demo)
    assert (
        main(
            [
                "eval",
                "vbench",
                "generate",
                "--run",
                str(run),
                "--folders",
                "temporal_flickering",
                "--limit",
                "2",
                *common,
            ]
        )
        == 0
    )
    videos = sorted((run / "vbench" / "videos" / "temporal_flickering").glob("*.mp4"))
    assert len(videos) == 2 and all(v.name.endswith(("-0.mp4", "-1.mp4")) for v in videos)
    assert main(["eval", "vbench", "flicker", "--run", str(run)]) == 0
    assert "no static filter" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                "phygenbench",
                "generate",
                "--run",
                str(run),
                "--model-name",
                "tiny",
                "--limit",
                "2",
                *common,
            ]
        )
        == 0
    )
    phy = run / "phygenbench" / "PhyVideos" / "tiny"
    assert sorted(p.name for p in phy.glob("*.mp4")) == ["output_video_1.mp4", "output_video_2.mp4"]


def test_shipped_generation_config_is_the_paper_default():
    """config/generate.yaml names the paper's Wan settings (SPEC §6); the dataclass leaves what
    the family knows open (None: the family's or the stock pipeline's own)."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(GenerationConfig, root / "config" / "generate.yaml")
    assert (cfg.steps, cfg.shift, cfg.guidance_scale, cfg.seed, cfg.k) == (40, 5.0, 5.0, 42, 5)
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.fps) == (480, 832, 81, 16)
    assert (cfg.scheduler, cfg.negative_prompt) == ("flow-euler", None)
    family_keys = ("height", "width", "num_frames", "fps", "steps", "shift", "guidance_scale")
    family_keys += ("scheduler", "negative_prompt", "max_sequence_length")
    assert all(getattr(GenerationConfig(), k) is None for k in family_keys)
    # besides the paper's Wan settings: the README's layout (memory_bank/, gte's captions)
    layout = {"bank": Path("memory_bank"), "index": None, "latents": None, "vae_dtype": "float32"}
    layout["trust_remote_code"] = "gte-base-en-v1.5"
    named = set(family_keys) | set(layout)
    rest = [f.name for f in dataclasses.fields(cfg) if f.name not in named]
    assert {k: getattr(cfg, k) for k in layout} == layout
    assert {k: getattr(cfg, k) for k in rest} == {k: getattr(GenerationConfig(), k) for k in rest}


# --------------------------------------------------------------------------------------
# Output folders: what "done" means, names, settings
# --------------------------------------------------------------------------------------
def test_done_means_this_prompt_seed_and_settings(demo, tmp_path, capsys):
    """A video counts as done only when its sidecar says it is this prompt, seed and settings;
    a name taken by another video is an error when the user gave it, a distinct name when it
    came from the prompt."""
    out = tmp_path / "out"
    base = ["generate", "--out", str(out), *tiny_overrides(demo, k=2)]
    assert main([*base, "--prompt", "a red circle", "--name", "v", "seed=1"]) == 0
    capsys.readouterr()
    assert main([*base, "--prompt", "a red circle", "--name", "v", "seed=1"]) == 0
    assert "1 already done, 0 to generate" in capsys.readouterr().out
    for change in (["--prompt", "a blue square", "seed=1"], ["--prompt", "a red circle", "seed=2"]):
        assert main([*base, *change, "--name", "v"]) == 2
        assert "v.mp4 is another video (prompt 'a red circle', seed 1" in capsys.readouterr().err
    # names made from prompts: CJK kept, and prompts that slug alike get distinct names
    csv = tmp_path / "p.csv"
    long = "a red circle moving right " * 4
    prompts = [
        "一只红色的圆",
        "一只蓝色的方块",
        "A red circle!",
        "a red circle",
        long + "x",
        long + "y",
    ]
    csv.write_text("prompt,seed\n" + "".join(f'"{p}",1\n' for p in prompts))
    again = ["generate", "--out", str(tmp_path / "csv-out"), *tiny_overrides(demo, k=2)]
    assert main([*again, "--csv", str(csv)]) == 0
    sidecars = sorted((tmp_path / "csv-out").glob("*.json"))
    made = {json.loads(p.read_text())["prompt"]: p.stem for p in sidecars}
    assert set(made) == set(prompts) and len(set(made.values())) == 6
    assert "一只红色的圆" in made["一只红色的圆"]
    capsys.readouterr()
    assert main([*again, "--csv", str(csv)]) == 0
    assert "6 videos, 6 already done, 0 to generate" in capsys.readouterr().out


def test_a_failed_run_leaves_the_folder_usable(demo, tmp_path, capsys):
    """k beyond the bank fails at retrieval: no settings are recorded, so the fixed rerun runs;
    a folder that holds videos refuses other settings."""
    out = tmp_path / "out"
    base = ["generate", "--prompt", "a red circle", "--out", str(out)]
    assert main([*base, *tiny_overrides(demo, k=99)]) == 2
    assert "found 24 of k=99" in capsys.readouterr().err
    assert not (out / "generate_config.yaml").exists()
    assert main([*base, *tiny_overrides(demo, k=2)]) == 0
    assert (out / "generate_config.yaml").is_file()
    assert main([*base, *tiny_overrides(demo, k=3)]) == 2
    assert "made with other settings" in capsys.readouterr().err


def test_the_release_inference_csv(demo, tmp_path):
    """The release's data/inference.csv (video_path, caption): captions are the prompts, the
    video_path stems the names."""
    csv = tmp_path / "inference.csv"
    csv.write_text(
        "video_path,caption\nclips/red_1.mp4,a red circle\nclips/blue.mp4,a blue square\n"
    )
    out = tmp_path / "out"
    assert main(["generate", "--csv", str(csv), "--out", str(out), *tiny_overrides(demo)]) == 0
    assert sorted(p.name for p in out.glob("*.mp4")) == ["blue.mp4", "red_1.mp4"]
    assert json.loads((out / "red_1.json").read_text())["prompt"] == "a red circle"


def test_bank_or_parts_one_documented_way(tmp_path):
    """The command line's memory source replaces the YAML's; a bank and its parts at one level
    is an error naming both."""
    from dit_mem.generation import load_generation_config

    yaml_bank = tmp_path / "bank.yaml"
    yaml_bank.write_text("bank: my-bank\n")
    cfg = load_generation_config(yaml_bank, ["index=my-index", "latents=my-latents"])
    assert (cfg.bank, str(cfg.index), str(cfg.latents)) == (None, "my-index", "my-latents")
    yaml_parts = tmp_path / "parts.yaml"
    yaml_parts.write_text("index: my-index\ntokens: my-tokens\n")
    cfg = load_generation_config(yaml_parts, ["bank=other-bank"])
    assert (str(cfg.bank), cfg.index, cfg.tokens) == ("other-bank", None, None)
    assert str(load_generation_config(yaml_bank, []).bank) == "my-bank"
    both = tmp_path / "both.yaml"
    both.write_text("bank: my-bank\nindex: my-index\n")
    with pytest.raises(ConfigError, match=r"both\.yaml gives bank= and index="):
        load_generation_config(both, [])


def test_toyworld_generation_offline(tmp_path, capsys, monkeypatch):
    """`generate --toyworld` and the shipped config/toyworld.yaml (from the repository root)
    are one configuration and make the same video."""
    from dit_mem.config import to_dict
    from dit_mem.generation import load_generation_config
    from dit_mem.toyworld.evaluate import toy_config
    from dit_mem.toyworld.recipe import SHIPPED

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    shipped = to_dict(load_generation_config(Path("config/toyworld.yaml"), []))
    builtin = to_dict(toy_config(SHIPPED.relative_to(root)))
    assert {k: v for k, v in shipped.items() if k != "progress"} == {
        k: v for k, v in builtin.items() if k not in ("progress", "index", "latents")
    } | {"index": None, "latents": None}
    prompt = ["--prompt", "a magenta circle moving left", "steps=4"]
    assert main(["generate", "--toyworld", "--out", str(tmp_path / "a"), *prompt]) == 0
    yaml = ["--config", "config/toyworld.yaml"]
    assert main(["generate", *yaml, "--out", str(tmp_path / "b"), *prompt]) == 0
    from dit_mem.evaluation.video_io import read_video

    name = "a_magenta_circle_moving_left.mp4"
    a, b = read_video(tmp_path / "a" / name), read_video(tmp_path / "b" / name)
    assert a.shape == (9, 32, 32, 3) and np.array_equal(a, b)
