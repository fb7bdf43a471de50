"""Latent job: real mp4s (imageio-ffmpeg), real PyAV/decord decoding, a tiny real Wan VAE."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from memory_bank_utils import TINY_VAE, tiny_vae, to_original_wan_layout, write_mp4
from safetensors.torch import load_file

from dit_mem.cli import main
from dit_mem.data import (
    LatentJobConfig,
    LatentStore,
    VideoDecodeError,
    encode_frames,
    encode_latents,
    load_video,
    sample_frame_indices,
)
from dit_mem.models.base_model import load_vae
from dit_mem.testing import TINY_CLIP_ARGS

SIZE = {"num_frames": 17, "height": 64, "width": 64}  # latent [16, 5, 8, 8]
GOOD = ["aaaaaaaaaaa_1_0to40", "aaaaaaaaaaa_2_40to80", "b-b_bbbbbbb_1_0to9", "ccccccccccc_1_0to30"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> dict:
    """Videos (4 good incl. one shorter than 17 frames, 1 corrupt, 1 missing), CSV, VAE folder."""
    root = tmp_path_factory.mktemp("bank")
    videos = root / "video"
    videos.mkdir()
    for i, (vid, n) in enumerate(zip(GOOD, (40, 40, 9, 30), strict=True)):
        write_mp4(videos / f"{vid}.mp4", n, seed=i)
    (videos / "broken_1_0to5.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    rows = [*GOOD[:2], "broken_1_0to5", GOOD[2], "missing_1_0to5", GOOD[3]]
    csv = root / "bank.csv"
    csv.write_text("video,caption\n" + "".join(f"{v}.mp4,caption {v}\n" for v in rows))
    vae = tiny_vae()
    vae.save_pretrained(root / "wan" / "vae")
    return {"root": root, "videos": videos, "csv": csv, "base": root / "wan", "vae": vae}


def _cfg(bank: dict, out: Path, **kw) -> LatentJobConfig:
    return LatentJobConfig(
        csv=bank["csv"],
        out=out,
        base_model=bank["base"],
        videos=bank["videos"],
        num_workers=0,
        **SIZE,
        **kw,
    )


def test_frame_sampling() -> None:
    assert sample_frame_indices(81, 81).tolist() == list(range(81))
    idx = sample_frame_indices(200, 81)
    assert idx[0] == 0 and idx[-1] == 199 and np.all(np.diff(idx) >= 2)
    assert sample_frame_indices(5, 8).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 81)


def test_decoders_agree_and_resize_modes(bank: dict) -> None:
    path = bank["videos"] / f"{GOOD[0]}.mp4"
    a = load_video(path, 17, 64, 64, backend="pyav")
    b = load_video(path, 17, 64, 64, backend="decord")
    assert a.shape == (3, 17, 64, 64) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    crop = load_video(path, 17, 32, 64, resize="crop")
    assert crop.shape == (3, 17, 32, 64)
    short = load_video(bank["videos"] / f"{GOOD[2]}.mp4", 17, 64, 64)  # 9 frames: last repeats
    assert torch.equal(short[:, 8], short[:, 16]) and not torch.equal(short[:, 0], short[:, 8])
    with pytest.raises(VideoDecodeError, match="broken_1_0to5.mp4: cannot decode"):
        load_video(bank["videos"] / "broken_1_0to5.mp4")
    with pytest.raises(VideoDecodeError, match="nope.mp4: video file not found"):
        load_video(bank["videos"] / "nope.mp4")


def test_encode_latents_job(bank: dict, tmp_path: Path) -> None:
    out = tmp_path / "latent"
    s = encode_latents(_cfg(bank, out), vae=bank["vae"])
    assert (s.ok, s.skipped, s.failed) == (4, 0, 2)
    store = LatentStore(out)
    assert store.ids() == sorted(GOOD)
    m = store.manifest
    assert m["normalized"] is True and m["distribution"] == "mode"
    assert m["latent_shape"] == [16, 5, 8, 8] and m["latents_mean"][0] == pytest.approx(-0.7571)
    # Stored latents = mode of the VAE posterior, normalised, in bf16.
    frames = load_video(bank["videos"] / f"{GOOD[0]}.mp4", **SIZE)
    expected = encode_frames(bank["vae"], frames[None])[0].to(torch.bfloat16)
    assert torch.equal(store.load_one(GOOD[0]), expected)
    assert load_file(str(store.path(GOOD[0])))["latent"].dtype == torch.bfloat16
    x = store.load(GOOD[:3])
    assert x.shape == (1, 3, 16, 5, 8, 8) and x.dtype == torch.bfloat16
    # Failures are reported, one JSON line each, naming the file and the problem.
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r["error"] for r in records}
    assert set(by_id) == {"broken_1_0to5", "missing_1_0to5"}
    assert "broken_1_0to5.mp4: cannot decode video" in by_id["broken_1_0to5"]
    assert "missing_1_0to5.mp4: video file not found" in by_id["missing_1_0to5"]
    # A second run skips what is done and only retries the failures.
    s2 = encode_latents(_cfg(bank, out), vae=bank["vae"])
    assert (s2.ok, s2.skipped, s2.failed) == (0, 4, 2)
    with pytest.raises(FileNotFoundError, match="no latent for id 'zzz'"):
        store.load(["zzz"])


def test_interrupted_write_leaves_no_partial_file(bank, tmp_path, monkeypatch) -> None:
    import safetensors.torch as st

    out = tmp_path / "latent"
    real_save, calls = st.save_file, []

    def dying_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # killed half-way through the third file
            Path(filename).write_bytes(b"partial")
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        encode_latents(_cfg(bank, out), vae=bank["vae"])
    monkeypatch.setattr(st, "save_file", real_save)
    assert LatentStore(out).ids() == sorted(GOOD[:2])
    assert not list(out.glob(".tmp-*"))
    stale, recent = out / ".tmp-stale.safetensors.abc", out / ".tmp-recent.safetensors.abc"
    stale.write_bytes(b"left by kill -9")
    os.utime(stale, (time.time() - 3600,) * 2)
    recent.write_bytes(b"a lazy fill under way")  # another process's write: left alone
    s = encode_latents(_cfg(bank, out), vae=bank["vae"])
    assert (s.ok, s.skipped) == (2, 2)
    assert LatentStore(out).ids() == sorted(GOOD) and not stale.exists() and recent.exists()


def test_kill_and_resume_subprocess(bank: dict, tmp_path: Path) -> None:
    """SIGKILL a real run while it blocks on a video (a FIFO), resume, compare to a clean run."""
    videos = tmp_path / "video"
    videos.mkdir()
    for vid in GOOD:
        os.symlink(bank["videos"] / f"{vid}.mp4", videos / f"{vid}.mp4")
    fifo = videos / "stuck_1_0to5.mp4"
    os.mkfifo(fifo)
    csv = tmp_path / "bank.csv"
    order = [GOOD[0], GOOD[1], "stuck_1_0to5", GOOD[2], GOOD[3]]
    csv.write_text("video\n" + "".join(f"{v}.mp4\n" for v in order))
    out = tmp_path / "latent"
    args = [
        "encode-latents",
        "--csv",
        str(csv),
        "--out",
        str(out),
        "--base-model",
        str(bank["base"]),
        "--videos",
        str(videos),
        *TINY_CLIP_ARGS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dit_mem.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 60
        while len(list(out.glob("*.safetensors"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"{v}.safetensors" for v in sorted(GOOD[:2])
    ]
    for p in out.glob("*.safetensors"):
        assert load_file(str(p))["latent"].shape == (16, 5, 8, 8)  # complete files only
    fifo.unlink()
    write_mp4(fifo, 12, seed=9)
    assert main(args) == 0
    assert LatentStore(out).ids() == sorted([*GOOD, "stuck_1_0to5"])
    clean = tmp_path / "clean"
    encode_latents(
        LatentJobConfig(
            csv=csv, out=clean, base_model=bank["base"], videos=videos, num_workers=0, **SIZE
        )
    )
    for vid in LatentStore(clean).ids():
        assert torch.equal(LatentStore(out).load_one(vid), LatentStore(clean).load_one(vid))


def test_original_pth_checkpoint(bank: dict, tmp_path: Path) -> None:
    vae = bank["vae"]
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(to_original_wan_layout(vae.state_dict()), pth)
    cfg = {**dict(vae.config), **TINY_VAE}
    loaded = load_vae(tmp_path, config=cfg)  # folder holding Wan2.1_VAE.pth
    x = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    assert torch.equal(encode_frames(loaded, x), encode_frames(vae, x))
    with pytest.raises(ValueError, match="does not match the Wan2.1 VAE.*wrong shapes"):
        load_vae(pth)  # tiny weights vs the shipped full-size Wan2.1 config


def test_bad_inputs(bank: dict, tmp_path: Path, capsys) -> None:
    no_video = tmp_path / "nocol.csv"
    no_video.write_text("file,caption\na.mp4,x\n")
    with pytest.raises(
        ValueError, match=r"nocol.csv: missing required column\(s\) video \(or video_path\)"
    ):
        encode_latents(
            LatentJobConfig(csv=no_video, out=tmp_path / "o", base_model=bank["base"], **SIZE),
            vae=bank["vae"],
        )
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert (
        main(
            [
                "encode-latents",
                "--csv",
                str(empty),
                "--base-model",
                str(bank["base"]),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "empty.csv: the CSV is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="AutoencoderKLWan takes 4k\\+1 frames"):  # before it loads
        LatentJobConfig(csv=bank["csv"], out=tmp_path, base_model=bank["base"], num_frames=16)
    with pytest.raises(ValueError, match="no VAE found"):
        load_vae(tmp_path)
    # A folder made with other settings is refused before anything is written.
    out = tmp_path / "latent"
    encode_latents(_cfg(bank, out), vae=bank["vae"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    with pytest.raises(ValueError, match="already holds latents made with other settings.*resize"):
        encode_latents(_cfg(bank, out, resize="crop"), vae=bank["vae"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before


def test_failed_videos_leave_a_bank_that_says_so(bank: dict, tmp_path: Path, capsys):
    """2 of 6 videos cannot be encoded: the job exits 1 (0 with --allow-failures), bank.json and
    `bank info` name them, retrieval never returns them, cache-tokens says so; a clip far from
    the job's geometry is warned about."""
    from dit_mem.bank import MemoryBank
    from dit_mem.memory import MemoryEncoder

    b = tmp_path / "b"
    assert main(["build-index", "--csv", str(bank["csv"]), "--bank", str(b)]) == 0
    size = list(TINY_CLIP_ARGS)
    encode = ["encode-latents", "--csv", str(bank["csv"]), "--videos", str(bank["videos"])]
    encode += ["--base-model", str(bank["base"]), "--bank", str(b), *size]
    capsys.readouterr()
    assert main(encode) == 1
    captured = capsys.readouterr()
    assert "failed 2" in captured.out
    assert "2 video(s) could not be encoded" in captured.err
    assert "or accept them with --allow-failures" in captured.err
    assert "(8 frames repeated" in captured.err  # the 9-frame clip at 17 frames
    failed = ["broken_1_0to5", "missing_1_0to5"]
    assert json.loads((b / "bank.json").read_text())["without_memory"] == failed
    assert main([*encode, "--allow-failures"]) == 0  # the rest is kept; the failures remain
    assert main(["bank", "info", str(b)]) == 0
    assert "without memory: 2 videos whose encoding failed" in capsys.readouterr().out
    mb = MemoryBank.from_pretrained(b)
    assert len(mb) == 6
    hits = mb.retrieve(["caption broken_1_0to5", "caption missing_1_0to5"], k=6)
    assert all(not set(h.ids) & set(failed) and len(h.ids) == 4 for h in hits)
    encoder = MemoryEncoder.from_preset("tiny")
    with pytest.raises(ValueError, match="found 4 of k=5 memory videos"):
        mb.memory(["caption broken_1_0to5"], encoder, k=5)
    encoder.save_pretrained(tmp_path / "enc")
    capsys.readouterr()
    cache = ["cache-tokens", "--encoder", str(tmp_path / "enc"), "--bank", str(b)]
    assert main([*cache, "--num-workers", "0"]) == 0
    assert "2 bank video(s) have no latent" in capsys.readouterr().out
