"""``dit-mem bank build`` (eager, --lazy, --for-training, --add) and ``bank export`` / the Hub."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_mem.bank import MemoryBank
from dit_mem.cli import main
from dit_mem.memory import MemoryEncoder
from dit_mem.testing import TINY_GEOMETRY, build_tiny_wan, write_bank

FRAMES, HEIGHT, WIDTH = TINY_GEOMETRY["wan"]
SIZE = ["--num-frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]
PROMPT = "a blue circle moving left"


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bankbuild")
    csv_path = write_bank(root, videos=root / "videos")
    model = build_tiny_wan(root / "model")
    MemoryEncoder.from_preset("tiny").save_pretrained(root / "encoder")
    eager = root / "eager"
    build = ["bank", "build", "--csv", str(csv_path), "--videos", str(root / "videos")]
    build += ["--base-model", str(model), *SIZE, "--num-workers", "0"]
    assert main([*build, "--bank", str(eager), "--tokens", str(root / "encoder")]) == 0
    return {"root": root, "csv": csv_path, "model": model, "eager": eager, "build": build}


def lazy_copy(world, dest: Path) -> Path:
    """A lazy bank of the world's table, its videos copied into ``dest/videos``."""
    shutil.copytree(world["root"] / "videos", dest / "videos")
    argv = [*world["build"], "--bank", str(dest / "bank"), "--lazy"]
    argv[argv.index("--videos") + 1] = str(dest / "videos")
    assert main(argv) == 0
    return dest / "bank"


def encoder(world) -> MemoryEncoder:
    return MemoryEncoder.from_pretrained(world["root"] / "encoder").eval()


def pipeline(world, bank):
    from dit_mem import DiTMemPipeline

    pipe = DiTMemPipeline.from_pretrained(world["model"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_memory(world["root"] / "encoder", bank=bank)
    return pipe


def generate(pipe) -> torch.Tensor:
    out = pipe(
        PROMPT,
        memory="retrieve",
        k=2,
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return out.frames


def test_eager_build_records_the_geometry(world, capsys):
    manifest = json.loads((world["eager"] / "bank.json").read_text())
    assert manifest["parts"] == ["index", "latents", "tokens", "videos"]
    first = manifest["history"][0]
    assert (first["op"], first["memory"], manifest["videos"]) == ("build", "eager", 24)
    assert [r["op"] for r in manifest["history"]] == ["build", "encode", "tokens"]
    geometry = manifest["geometry"]
    assert (geometry["num_frames"], geometry["height"], geometry["width"]) == (
        FRAMES,
        HEIGHT,
        WIDTH,
    )
    assert geometry["latent_shape"] == [16, 5, 8, 8] and geometry["resize"] == "stretch"
    assert (world["eager"] / "videos").resolve() == (world["root"] / "videos").resolve()
    assert len(list((world["eager"] / "latents").glob("*.safetensors"))) == 24


def test_lazy_bank_equals_eager_and_outlives_its_videos(world, tmp_path, capsys):
    bank = lazy_copy(world, tmp_path)
    assert "lazy: 0 of 24 videos have latents" in capsys.readouterr().out
    assert not list((bank / "latents").glob("*.safetensors"))
    assert json.loads((bank / "bank.json").read_text())["history"][0]["memory"] == "lazy"
    eager = MemoryBank.from_pretrained(world["eager"])
    eager.tokens = None  # the same route: latents
    lazy = MemoryBank.from_pretrained(bank)
    enc = encoder(world)
    hits = eager.retrieve([PROMPT], 2)[0].ids
    with pytest.raises(ValueError, match="a lazy bank encodes them on first use with the VAE"):
        lazy.memory([PROMPT], enc, k=2)
    # through the pipeline (its VAE fills the bank): the same video as the eager bank's
    want = generate(pipeline(world, eager))
    pipe = pipeline(world, lazy)
    got = generate(pipe)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    filled = sorted(p.stem for p in (bank / "latents").glob("*.safetensors"))
    assert filled == sorted(hits)
    for vid in hits:  # the latent files are the eager build's, bit for bit
        a = load_file(str(bank / "latents" / f"{vid}.safetensors"))["latent"]
        b = load_file(str(world["eager"] / "latents" / f"{vid}.safetensors"))["latent"]
        assert torch.equal(a, b)
    # the videos go: what was filled is reused, the rest is an error naming the video
    shutil.rmtree(tmp_path / "videos")
    reopened = MemoryBank.from_pretrained(bank)
    again, _ = reopened.memory([PROMPT], enc, k=2, vae=pipe.vae)
    first, _ = eager.memory([PROMPT], enc, k=2)
    torch.testing.assert_close(again.tokens, first.tokens, rtol=0, atol=0)
    other = reopened.retrieve(["a green square moving right"], 1)[0].ids[0]
    with pytest.raises(FileNotFoundError, match=rf"bank video '{other}' has no memory yet"):
        reopened.memory(["a green square moving right"], enc, k=1, vae=pipe.vae)


def test_lazy_bank_refuses_a_foreign_vae(world, tmp_path):
    from diffusers import AutoencoderKLWan

    bank = MemoryBank.from_pretrained(lazy_copy(world, tmp_path))
    torch.manual_seed(1)
    other = AutoencoderKLWan(base_dim=2, z_dim=16, latents_mean=[0.5] * 16).eval()
    with pytest.raises(ValueError, match=r"a foreign VAE: .*latents_mean"):
        bank.memory([PROMPT], encoder(world), k=2, vae=other)
    assert not list((tmp_path / "bank" / "latents").glob("*.safetensors"))


FILL = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from dit_mem.bank import MemoryBank
    from dit_mem.models.base_model import load_vae
    from dit_mem.memory import MemoryEncoder
    bank = MemoryBank.from_pretrained(sys.argv[1])
    enc = MemoryEncoder.from_pretrained(sys.argv[2]).eval()
    vae = load_vae(sys.argv[3])
    prompts = ["a blue circle moving left", "a red square moving right", "a green circle"]
    memory, _ = bank.memory(prompts, enc, k=4, vae=vae)
    torch.save(memory.tokens, sys.argv[4])
    """
)


def test_concurrent_lazy_fills(world, tmp_path):
    """Two processes fill the same lazy bank at once: both get the eager bank's memory, and the
    bank holds whole latents, equal to the eager ones, and no temporary file."""
    bank = lazy_copy(world, tmp_path)
    args = [str(bank), str(world["root"] / "encoder"), str(world["model"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FILL, *args, str(tmp_path / f"m{i}.pt")],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    eager = MemoryBank.from_pretrained(world["eager"])
    eager.tokens = None
    prompts = ["a blue circle moving left", "a red square moving right", "a green circle"]
    want, _ = eager.memory(prompts, encoder(world), k=4)
    for i in range(2):
        got = torch.load(tmp_path / f"m{i}.pt", weights_only=True)
        torch.testing.assert_close(got, want.tokens, rtol=0, atol=0)
    files = sorted((bank / "latents").iterdir())
    assert not [p for p in files if p.name.startswith(".tmp-")]
    for p in files:
        if p.suffix == ".safetensors":
            ref = load_file(str(world["eager"] / "latents" / p.name))["latent"]
            assert torch.equal(load_file(str(p))["latent"], ref)


def test_for_training_encodes_what_training_reads(world, tmp_path, capsys):
    train = tmp_path / "train.csv"
    with train.open("w", newline="") as f:
        rows = list(csv.DictReader(world["csv"].open()))[:3]
        w = csv.DictWriter(f, fieldnames=["video", "caption"])
        w.writeheader()
        w.writerows(rows)
    argv = [*world["build"], "--bank", str(tmp_path / "bank"), "--for-training", str(train)]
    capsys.readouterr()
    assert main([*argv, "-k", "2"]) == 0
    out = capsys.readouterr().out
    bank = MemoryBank.from_pretrained(tmp_path / "bank")
    ids = [Path(r["video"]).stem for r in rows]
    hits = bank.retrieve([r["caption"] for r in rows], k=2, exclude=[[v] for v in ids])
    union = set(ids) | {v for h in hits for v in h.ids}
    encoded = {p.stem for p in (tmp_path / "bank" / "latents").glob("*.safetensors")}
    assert encoded == union and len(union) < 24
    assert f"for training: {len(union)} of 24 bank videos to encode" in out
    assert "3 training videos" in out and "data.latent_dir=" in out


def test_add_keeps_old_retrievals(world, tmp_path, capsys):
    rows = list(csv.DictReader(world["csv"].open()))
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    for path, part in ((first, rows[:16]), (second, rows[8:])):  # overlap: 8 rows in both
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["video", "caption"])
            w.writeheader()
            w.writerows(part)
    argv = [*world["build"], "--bank", str(tmp_path / "bank")]
    argv[argv.index("--csv") + 1] = str(first)
    assert main(argv) == 0
    old_captions = [r["caption"] for r in rows[:16]]
    before = MemoryBank.from_pretrained(tmp_path / "bank").retrieve(old_captions, 3)
    capsys.readouterr()
    argv[argv.index("--csv") + 1] = str(second)
    assert main(argv) == 2  # the bank exists: --add, or another folder
    err = capsys.readouterr().err
    assert "already holds a bank of another table; add rows with `dit-mem bank build --add`" in err
    assert main([*argv, "--add"]) == 0
    assert "24 videos (8 added, 8 already there)" in capsys.readouterr().out
    bank = MemoryBank.from_pretrained(tmp_path / "bank")
    assert len(bank) == 24 and bank.ids[:16] == [Path(r["video"]).stem for r in rows[:16]]
    after = bank.retrieve(old_captions, 3)
    for b, a in zip(before, after, strict=True):
        assert a.ids[0] == b.ids[0]  # every old caption still finds its own video first
        new = [v for v in a.ids if v not in b.ids]
        assert all(bank.ids.index(v) >= 16 for v in new)  # anything else that moved is new
    for r in rows[16:]:
        assert bank.retrieve([r["caption"]], 1)[0].ids == [Path(r["video"]).stem]
    assert len(list((tmp_path / "bank" / "latents").glob("*.safetensors"))) == 24
    assert main([*argv, "--add"]) == 0  # again: nothing new
    assert "(0 added, 16 already there)" in capsys.readouterr().out
    records = json.loads((tmp_path / "bank" / "bank.json").read_text())["history"]
    assert [r["op"] for r in records] == ["build", "encode", "add", "encode"]  # no no-op records
    assert records[0]["csv"] == str(first.resolve()) and records[2]["csv"] == str(second.resolve())
    assert (records[2]["rows"], records[2]["added"]) == ([16, 24], 8)


def test_a_killed_build_resumes(world, tmp_path, capsys, monkeypatch):
    """Killed while encoding, the same command again finishes the bank (the index is kept)."""
    import dit_mem.data.latents as latents

    real, calls = latents._encode_one, []

    def dying(vae, item, out):
        calls.append(item["id"])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(vae, item, out)

    monkeypatch.setattr(latents, "_encode_one", dying)
    argv = [*world["build"], "--bank", str(tmp_path / "bank")]
    assert main(argv) == 130  # interrupted
    index = (tmp_path / "bank" / "index" / "index.faiss").stat().st_mtime_ns
    monkeypatch.setattr(latents, "_encode_one", real)
    capsys.readouterr()
    assert main(argv) == 0
    assert "latents: 20 encoded, 4 already there, 0 failed" in capsys.readouterr().out
    assert (tmp_path / "bank" / "index" / "index.faiss").stat().st_mtime_ns == index


def test_export_round_trip_and_the_hub(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "shared"
    argv = ["bank", "export", "--bank", str(world["eager"]), "--out", str(out)]
    assert main([*argv, "--encoder", str(world["root"] / "encoder"), "--license", "cc-by-4.0"]) == 0
    said = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "bank.json", "index", "tokens"]
    card = (out / "README.md").read_text()
    assert "license: cc-by-4.0" in card and "| videos | 24 " in card
    size = sum(
        p.stat().st_size for p in out.rglob("*") if p.is_file() and p.parent.name != out.name
    )
    assert "B per video" in said and size / 24 < 20_000
    want = generate(pipeline(world, world["eager"]))  # the full bank, from its token cache
    torch.testing.assert_close(generate(pipeline(world, out)), want, rtol=0, atol=0)
    # push_to_hub: the folder the Hub gets (network replaced by a local copy), then loaded
    # from a Hub cache offline
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    hub, rev = tmp_path / "hub", "0" * 40

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns, repo_type, **kw):
        assert repo_type == "dataset"
        snapshot = hub / f"datasets--{repo_id.replace('/', '--')}" / "snapshots" / rev
        files = [
            str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
        ]
        for rel in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder_path) / rel, snapshot / rel)
        (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
        (snapshot.parents[1] / "refs" / "main").write_text(rev)
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert MemoryBank.from_pretrained(world["eager"]).push_to_hub("toy/full") == "commit"
    full = hub / "datasets--toy--full" / "snapshots" / rev
    assert sorted(p.name for p in full.iterdir()) == ["bank.json", "index", "latents", "tokens"]
    MemoryBank.from_pretrained(out).push_to_hub("toy/bank")  # the token-only bank, then used
    from dit_mem import DiTMemPipeline

    pipe = DiTMemPipeline.from_pretrained(world["model"])
    pipe.set_progress_bar_config(disable=True)
    opts = {"cache_dir": hub, "local_files_only": True}
    pipe.load_memory(world["root"] / "encoder", bank="toy/bank", **opts)
    assert pipe.memory_bank.latents is None and len(pipe.memory_bank) == 24
    torch.testing.assert_close(generate(pipe), want, rtol=0, atol=0)
