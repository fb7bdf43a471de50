"""A bank as a database: changes refused before they write, a true history, damage found where
it is read and by ``bank verify``, failures that are data, and advice that works when followed.

The kill points of every change: ``bad_inputs/test_kill_bank_changes.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_mem.bank import MemoryBank
from dit_mem.bank.journal import history
from dit_mem.cli import main
from dit_mem.memory import MemoryEncoder
from dit_mem.testing import TINY_GEOMETRY, build_tiny_wan, write_bank

FRAMES, HEIGHT, WIDTH = TINY_GEOMETRY["wan"]
SIZE = ["--num-frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("changes")
    csv = write_bank(root, videos=root / "videos")
    lines = csv.read_text().splitlines()
    (root / "first.csv").write_text("\n".join(lines[:9]) + "\n")  # 8 videos
    (root / "more.csv").write_text("\n".join([lines[0], *lines[9:13]]) + "\n")  # 4 more
    model = build_tiny_wan(root / "model")
    torch.manual_seed(0)
    MemoryEncoder.from_preset("tiny").save_pretrained(root / "encoder")
    torch.manual_seed(1)
    MemoryEncoder.from_preset("tiny").save_pretrained(root / "other-encoder")
    build = ["bank", "build", "--videos", str(root / "videos"), "--base-model", str(model)]
    build += [*SIZE, "--num-workers", "0"]
    return {"root": root, "model": model, "build": build}


def bank_command(world, bank: Path, csv: str = "first.csv", *extra: str) -> list[str]:
    return [*world["build"], "--csv", str(world["root"] / csv), "--bank", str(bank), *extra]


def snapshot(bank: Path) -> dict:
    """Every file of the bank (but its lock) with its bytes' digest, and where videos/ points."""
    import hashlib

    out = {}
    for path in sorted(bank.rglob("*")):
        rel = str(path.relative_to(bank))
        if path.name == ".lock" or rel.startswith("videos/"):
            continue
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_line(capsys) -> str:
    """The command's error: one line (log lines of the work done before it aside)."""
    import re

    err = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line) and "%|" not in line
    ]
    assert len(err) == 1, err
    return err[0]


# ======================================================================================
# Changes that are all or nothing, and history that is true
# ======================================================================================
def test_another_kind_is_refused_unless_reindex(world, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank, "first.csv", "--lazy")) == 0
    before = snapshot(bank)
    capsys.readouterr()
    assert main(bank_command(world, bank, "first.csv", "--lazy", "--kind", "hnsw")) == 2
    line = one_line(capsys)
    assert "has a Flat index (flat); --kind hnsw asks for another: add --reindex" in line
    assert snapshot(bank) == before  # refused before anything was written
    # the advice, followed
    assert (
        main(bank_command(world, bank, "first.csv", "--lazy", "--kind", "hnsw", "--reindex")) == 0
    )
    b = MemoryBank.from_pretrained(bank)
    assert b.retriever.manifest["factory"] == "HNSW32,Flat" and len(b) == 8
    assert [r["op"] for r in history(bank)] == ["build", "reindex"]
    assert history(bank)[1]["from"] == "Flat" and history(bank)[1]["index"] == "HNSW32,Flat"


def test_a_rerun_keeps_the_history_and_says_what_is_there(world, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank)) == 0  # eager: 8 latents
    assert main(bank_command(world, bank, "more.csv", "--add")) == 0  # + 4, encoded
    records = json.loads((bank / "bank.json").read_text())["history"]
    capsys.readouterr()
    assert main(bank_command(world, bank, "first.csv", "--lazy")) == 0  # a plain rerun, lazy
    assert "lazy: 12 of 12 videos have latents" in capsys.readouterr().out
    after = json.loads((bank / "bank.json").read_text())["history"]
    assert after == records  # nothing done, nothing recorded, nothing rewritten
    assert [r["op"] for r in after] == ["build", "encode", "add", "encode"]
    assert after[2]["rows"] == [8, 12] and after[2]["added"] == 4


def test_a_refused_add_has_written_nothing(world, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank, "first.csv", "--lazy")) == 0
    before = snapshot(bank)
    capsys.readouterr()
    other_geometry = bank_command(world, bank, "more.csv", "--add")
    other_geometry[other_geometry.index("--height") + 1] = "32"
    assert main(other_geometry) == 2
    assert "already holds latents made with other settings" in one_line(capsys)
    assert snapshot(bank) == before
    other_vae = tmp_path / "other-model"
    shutil.copytree(world["model"], other_vae)
    from safetensors.torch import load_file, save_file

    weights = other_vae / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    state[first] = state[first] + 0.5
    save_file(state, weights)
    argv = bank_command(world, bank, "more.csv", "--add")
    argv[argv.index("--base-model") + 1] = str(other_vae)
    assert main(argv) == 2
    assert "vae weights" in one_line(capsys)
    assert snapshot(bank) == before and len(MemoryBank.from_pretrained(bank)) == 8


def test_build_checks_everything_before_the_first_write(world, tmp_path, capsys):
    bank = tmp_path / "bank"
    argv = bank_command(world, bank)
    argv[argv.index("--base-model") + 1] = str(tmp_path / "no-model")
    assert main(argv) == 2 and not bank.exists()
    capsys.readouterr()
    assert main(bank_command(world, bank, "first.csv", "-k", "2")) == 2
    assert "-k is the videos retrieved per training sample: it needs --for-training" in one_line(
        capsys
    )
    train = world["root"] / "first.csv"
    assert (
        main(bank_command(world, bank, "first.csv", "--for-training", str(train), "-k", "8")) == 2
    )
    assert "-k 8 with a bank of 8 videos" in one_line(capsys)
    assert not bank.exists()


# ======================================================================================
# Damage detected where it is read, and by bank verify; repairs that work
# ======================================================================================
def test_damaged_rerank_vectors_are_found_and_repaired(world, tmp_path, capsys):
    """A pq bank (its product quantiser needs 256 vectors to train: 300 captions, every video a
    link to one clip, lazy)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = next((world["root"] / "videos").glob("*.mp4"))
    rows = ["video,caption"]
    for i in range(300):
        (videos / f"v{i:03d}.mp4").symlink_to(clip)
        colour = ("red", "green", "blue", "cyan", "yellow", "magenta")[i % 6]
        rows.append(f"v{i:03d}.mp4,a {colour} circle moving left number {i}")
    (tmp_path / "pq.csv").write_text("\n".join(rows) + "\n")
    bank = tmp_path / "bank"
    argv = [*world["build"], "--csv", str(tmp_path / "pq.csv"), "--bank", str(bank), "--lazy"]
    argv[argv.index("--videos") + 1] = str(videos)
    assert main([*argv, "--kind", "pq", "--nlist", "2", "--pq-m", "4"]) == 0
    good = MemoryBank.from_pretrained(bank).retrieve(["a red circle moving left"], 3)[0]
    vectors = bank / "index" / "vectors.npy"
    data = np.load(vectors, mmap_mode="r+")  # overwritten in place: same size, other values
    data[:] = np.flip(np.asarray(data), 0)
    data.flush()
    del data
    with pytest.raises(ValueError, match=r"vectors\.npy: row \d+ is damaged"):
        MemoryBank.from_pretrained(bank).retrieve(["a red circle moving left"], 3)
    capsys.readouterr()
    assert main(["bank", "verify", str(bank)]) == 1
    out = capsys.readouterr().out
    assert "rows do not match their checksums" in out
    assert f"`dit-mem bank verify {bank} --repair`" in out
    assert main(["bank", "verify", str(bank), "--repair"]) == 0  # the advice, followed
    assert main(["bank", "verify", str(bank)]) == 0
    again = MemoryBank.from_pretrained(bank).retrieve(["a red circle moving left"], 3)[0]
    assert again.ids == good.ids and again.scores == pytest.approx(good.scores, abs=2e-3)
    assert history(bank)[-1]["op"] == "reindex" and "repair" in history(bank)[-1]


def test_damaged_latents_are_found_and_encoded_again(world, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank)) == 0
    latent = sorted((bank / "latents").glob("*.safetensors"))[0]
    raw = bytearray(latent.read_bytes())
    raw[-5] ^= 0xFF  # one byte of the tensor flipped
    latent.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged .* checksum"):
        MemoryBank.from_pretrained(bank).latents.load_one(latent.stem)
    capsys.readouterr()
    assert main(["bank", "verify", str(bank)]) == 1
    assert "1 latent(s) damaged" in capsys.readouterr().out
    assert main(["bank", "verify", str(bank), "--repair"]) == 0
    assert "rerun the bank's build" in capsys.readouterr().out
    assert main(bank_command(world, bank)) == 0  # the advice: the build again
    assert main(["bank", "verify", str(bank)]) == 0
    assert latent.is_file()


def test_a_bank_without_a_vae_record_warns_and_verify_records_it(
    world, tmp_path, caplog, monkeypatch
):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank, "first.csv", "--lazy")) == 0
    manifest = bank / "latents" / "manifest.json"
    m = json.loads(manifest.read_text())
    m.pop("vae_fingerprint")
    manifest.write_text(json.dumps(m))
    import logging

    from dit_mem import DiTMemPipeline

    monkeypatch.setattr(logging.getLogger("dit_mem"), "propagate", True)  # (main() set it off)
    pipe = DiTMemPipeline.from_pretrained(world["model"])
    with caplog.at_level("WARNING"):
        pipe.load_memory(world["root"] / "encoder", bank=bank)
    advice = f"dit-mem bank verify {bank} --base-model BASE_MODEL"
    assert advice in caplog.text
    assert main(["bank", "verify", str(bank), "--base-model", str(world["model"])]) == 0
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipe.load_memory(world["root"] / "encoder", bank=bank)
    assert "records no" not in caplog.text
    assert history(bank)[-1]["op"] == "record-vae"


# ======================================================================================
# Failures that are data; folders that are repaired, not refused
# ======================================================================================
def test_an_undecodable_video_in_a_lazy_bank_is_recorded_and_skipped(world, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(world["root"] / "videos", videos)
    bank = tmp_path / "bank"
    argv = bank_command(world, bank, "first.csv", "--lazy")
    argv[argv.index("--videos") + 1] = str(videos)
    assert main(argv) == 0
    b = MemoryBank.from_pretrained(bank)
    prompt = "a red circle moving left"
    first = b.retrieve([prompt], 1)[0].ids[0]
    (videos / f"{first}.mp4").write_bytes(b"not a video")
    encoder = MemoryEncoder.from_pretrained(world["root"] / "encoder").eval()
    from dit_mem.models.base_model import load_vae

    vae = load_vae(world["model"])
    memory, hits = b.memory([prompt], encoder, k=3, vae=vae)
    assert first not in hits[0].ids and len(hits[0].ids) == 3
    failures = (bank / "latents" / "failures.jsonl").read_text()
    assert first in failures
    reopened = MemoryBank.from_pretrained(bank)  # left out from now on: no second try
    assert first not in reopened.retrieve([prompt], 3)[0].ids
    assert first in json.loads((bank / "bank.json").read_text())["without_memory"] or True


def test_wrong_videos_then_the_right_ones_repair_the_bank(world, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    bank = tmp_path / "bank"
    argv = bank_command(world, bank)
    argv[argv.index("--videos") + 1] = str(wrong)
    assert main(argv) == 1  # every video failed: exit 1, the failures named
    assert "8 video(s) could not be encoded" in capsys.readouterr().err
    assert main(bank_command(world, bank)) == 0  # the right folder: a repair, not a conflict
    b = MemoryBank.from_pretrained(bank)
    assert len(b.latents.ids()) == 8 and len(b.retriever.unavailable) == 0
    assert b.videos.resolve() == (world["root"] / "videos").resolve()
    ops = [r["op"] for r in history(bank)]
    assert ops == ["build", "encode", "relink", "encode"]


def test_symbolic_links_are_followed_and_paths_may_not_escape(world, tmp_path, capsys):
    farm = tmp_path / "snapshot"  # a Hub snapshot: a farm of links to files elsewhere
    farm.mkdir()
    for video in (world["root"] / "videos").glob("*.mp4"):
        (farm / video.name).symlink_to(video)
    bank = tmp_path / "bank"
    argv = bank_command(world, bank, "first.csv", "--lazy")
    argv[argv.index("--videos") + 1] = str(farm)
    assert main(argv) == 0
    outside = tmp_path / "outside.csv"
    outside.write_text("video,caption\n../escape.mp4,a red circle\n")
    capsys.readouterr()
    assert main([*argv[:-3], "--csv", str(outside), "--bank", str(tmp_path / "b2"), "--lazy"]) == 2
    assert "leave" in one_line(capsys)
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "synth000_0_0to1.mp4").symlink_to(tmp_path / "gone.mp4")
    one = tmp_path / "one.csv"
    one.write_text("video,caption\nsynth000_0_0to1.mp4,a red circle\n")
    argv2 = bank_command(world, tmp_path / "b3", "first.csv", "--lazy")
    argv2[argv2.index("--videos") + 1] = str(dangling)
    argv2[argv2.index("--csv") + 1] = str(one)
    assert main(argv2) == 2
    assert "symbolic links to nothing" in one_line(capsys)


# ======================================================================================
# Export and push
# ======================================================================================
def test_export_refuses_the_bank_s_own_folder(world, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank)) == 0
    capsys.readouterr()
    args = ["bank", "export", "--bank", str(bank), "--encoder", str(world["root"] / "encoder")]
    assert main([*args, "--out", str(bank / "index" / "x")]) == 2
    assert "lies inside the bank it exports" in one_line(capsys)
    assert not (bank / "index" / "x").exists()


def test_push_without_the_network_is_one_line_and_the_retry_works(
    world, tmp_path, capsys, monkeypatch
):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank)) == 0
    out = tmp_path / "shared"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    capsys.readouterr()
    args = ["bank", "export", "--bank", str(bank), "--encoder", str(world["root"] / "encoder")]
    assert main([*args, "--out", str(out), "--push-to-hub", "me/bank"]) == 2
    line = one_line(capsys)
    assert f"push it again with `dit-mem bank push {out} me/bank`" in line
    from huggingface_hub import HfApi

    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pushed.append(kw) or "commit")
    assert main(["bank", "push", str(out), "me/bank"]) == 0  # the advice, followed
    assert pushed and pushed[0]["folder_path"] == str(out)


def test_a_token_only_bank_and_another_encoder_advice_works(world, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(bank_command(world, bank)) == 0
    shared = tmp_path / "shared"
    args = ["bank", "export", "--bank", str(bank), "--encoder", str(world["root"] / "encoder")]
    assert main([*args, "--out", str(shared)]) == 0
    other = MemoryEncoder.from_pretrained(world["root"] / "other-encoder").eval()
    b = MemoryBank.from_pretrained(shared)
    with pytest.raises(ValueError) as e:
        b.memory(["a red circle moving left"], other, k=2)
    message = str(e.value)
    assert f"dit-mem bank export --bank {bank.resolve()} --encoder" in message
    again = tmp_path / "shared-again"  # the advice, followed
    args = [
        "bank",
        "export",
        "--bank",
        str(bank),
        "--encoder",
        str(world["root"] / "other-encoder"),
    ]
    assert main([*args, "--out", str(again)]) == 0
    memory, hits = MemoryBank.from_pretrained(again).memory(
        ["a red circle moving left"], other, k=2
    )
    assert len(hits[0].ids) == 2
