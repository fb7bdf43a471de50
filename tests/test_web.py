"""The web page: the real server on localhost, driven by the Gradio client and by Chromium."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dit_mem.toyworld.recipe import SHIPPED

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``dit-mem serve`` (the shipped toy world) in its own process."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dit_mem.cli", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    out = None
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"dit-mem serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        out = Path(re.search(r"outputs in (\S+)\)", log.read_text()).group(1))
        assert out.is_dir()
        yield url
    finally:
        proc.terminate()  # SIGTERM: the server stops as on Ctrl-C, and removes its files
        proc.wait(timeout=30)
    assert out is not None and not out.exists(), log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()  # refused requests are one log line each


@pytest.fixture(scope="module")
def bank_captions() -> set[str]:
    from dit_mem.bank import MemoryBank

    return set(MemoryBank.from_pretrained(SHIPPED / "bank").captions)


def test_client_retrieve_and_generate(server, bank_captions):
    from gradio_client import Client
    from PIL import Image

    from dit_mem.evaluation.video_io import read_video

    client = Client(server, verbose=False)
    prompt = "a magenta circle moving right"
    gallery, report = client.predict(prompt, 3, api_name="/retrieve")
    assert len(gallery) == 3 and len(report["retrieved"]) == 3
    assert {r["caption"] for r in report["retrieved"]} <= bank_captions
    for item in gallery:  # moving previews: animated GIFs decoded from the bank's latents
        with Image.open(item["image"]) as gif:
            assert gif.n_frames == 9 and min(gif.size) >= 192
    shown_without, shown_with, report, files, gallery = client.predict(
        prompt, 2, 1.0, "conditional branch only", 0, 8, 4.0, api_name="/generate"
    )
    assert report["memory_mode"] == "cond" and len(report["retrieved"]) == 2
    assert {r["caption"] for r in report["retrieved"]} <= bank_captions
    names = sorted(Path(f).name for f in files)
    assert names == ["memory.json", "memory.mp4", "no_memory.mp4"]
    videos = {Path(f).name: read_video(f) for f in files if f.endswith(".mp4")}
    assert all(v.shape == (9, 32, 32, 3) for v in videos.values())
    assert not np.array_equal(videos["memory.mp4"], videos["no_memory.mp4"])
    assert read_video(shown_without).shape[1:3] == read_video(shown_with).shape[1:3] == (192, 192)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 2), "Type a prompt first"),
        (("a magenta circle moving right", 1000), r"k = 1000 is larger than the bank \(576"),
        (("a red circle", "abc"), "k must be a whole number ≥ 1, got 'abc'"),
        (("a red circle", 2.5), "k must be a whole number ≥ 1, got 2.5"),  # never truncated
        ((None, 2), "Type a prompt first"),
    ],
)
def test_bad_retrieve_input_is_a_message(server, args, message):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/retrieve")
    assert len(client.predict("a red circle moving left", 1, api_name="/retrieve")[0]) == 1


@pytest.mark.parametrize("scale", [-1.0, -0.5])
def test_bad_scale_is_a_message_and_the_server_keeps_serving(server, scale):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    with pytest.raises(AppError, match="memory scale must be a finite number ≥ 0"):
        client.predict(
            "a red circle", 2, scale, "conditional branch only", 0, 2, 4.0, api_name="/generate"
        )
    assert client.predict("a red circle", 1, api_name="/retrieve")[1]["retrieved"]


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"seed": None}, "seed must be a whole number ≥ 0, got None"),
        ({"seed": 1.5}, "seed must be a whole number ≥ 0, got 1.5"),
        ({"steps": 2.5}, r"steps must be a whole number in \[1, 100\], got 2.5"),
        ({"steps": 10**6}, r"steps must be a whole number in \[1, 100\]"),
        ({"guidance": "lots"}, r"guidance must be a number in \[0, 12\], got 'lots'"),
        ({"scale": "x"}, "memory scale must be a number, got 'x'"),
        ({"mode": "sideways"}, "memory mode must be one of"),
    ],
)
def test_bad_generate_input_is_a_message(server, changed, message):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    args = {"prompt": "a red circle", "k": 2, "scale": 1.0, "mode": "conditional branch only"}
    args |= {"seed": 0, "steps": 2, "guidance": 4.0} | changed
    with pytest.raises(AppError, match=message):
        Client(server, verbose=False).predict(*args.values(), api_name="/generate")


def test_request_files_are_bounded(monkeypatch):
    """Each request's previews go to a folder of its own; only the newest few are kept."""
    import dit_mem.web as web
    from dit_mem.toyworld.evaluate import load_toy_pipeline

    monkeypatch.setattr(web, "KEPT_REQUESTS", 3)
    pipe, cfg = load_toy_pipeline(SHIPPED)
    page = web.MemoryPage(pipe, cfg, [])
    for _ in range(5):
        page.retrieve("a red circle", 2)
    assert len([p for p in page.out.iterdir() if p.is_dir()]) == 3
    shutil.rmtree(page.out)


def test_bank_browser(server, bank_captions):
    from gradio_client import Client

    table, gallery = Client(server, verbose=False).predict("a cyan square", 5, api_name="/search")
    rows = table["data"] if isinstance(table, dict) else table
    assert len(rows) == 5 and all(row[2] in bank_captions for row in rows)
    assert all("cyan square" in row[2] for row in rows[:4])


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver"
)
def test_browser_generates_both_videos(server, tmp_path):
    from dit_mem.testing import generate_in_browser

    shot = tmp_path / "page.png"
    generate_in_browser(server, "a magenta circle moving right", shot, tmp_path / "profile")
    assert shot.stat().st_size > 20_000


def test_page_refuses_k_beyond_the_bank():
    """The slider caps k in the browser; the handler itself still checks (API callers)."""
    from dit_mem.toyworld.evaluate import load_toy_pipeline
    from dit_mem.web import MemoryPage

    pipe, cfg = load_toy_pipeline(SHIPPED)
    page = MemoryPage(pipe, cfg, [])
    with pytest.raises(ValueError, match=r"k = 1000 is larger than the bank \(576 videos\)"):
        page.retrieve("a red circle", 1000)
    with pytest.raises(ValueError, match="k must be a whole number ≥ 1"):
        page.retrieve("a red circle", 0)
    with pytest.raises(ValueError, match="memory scale must be a number"):
        page._scale("lots")
    import dataclasses

    with pytest.raises(ValueError, match=r"k=1000 is larger than the bank \(576 videos\)"):
        MemoryPage(pipe, dataclasses.replace(cfg, k=1000), [])  # `dit-mem serve k=1000`
    from dit_mem.web import build_app

    app = build_app(MemoryPage(pipe, dataclasses.replace(cfg, k=12), []))
    sliders = [c for c in app.blocks.values() if getattr(c, "label", None) == "k (memory videos)"]
    assert [(s.value, s.maximum) for s in sliders] == [(12, 12)]  # the default is on the slider
