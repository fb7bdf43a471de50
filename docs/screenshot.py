"""Take the README's screenshot of ``dit-mem serve`` (the shipped toy world) with headless Chromium.

    python docs/screenshot.py [--out docs/web-page.png] [--port 7861]

Needs Debian's ``chromium`` and ``chromium-driver`` and ``pip install -e ".[dev]"`` (Gradio,
Selenium). Starts the server, types the demo's held-out prompt, presses Generate, waits for both
videos and the retrieved memory, and saves the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "a magenta circle moving left"


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dit-mem serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer in {seconds:.0f} s")


def main() -> None:
    from dit_mem.testing import generate_in_browser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "web-page.png")
    ap.add_argument("--port", type=int, default=7861)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1500)
    args = ap.parse_args()
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        raise SystemExit("needs chromium and chromedriver (apt install chromium chromium-driver)")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "dit_mem.cli", "serve", "--port", str(args.port)]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{args.port}/"
    try:
        wait_for(url, proc)
        with tempfile.TemporaryDirectory(prefix="dit-mem-chromium-") as profile:
            generate_in_browser(url, PROMPT, args.out, Path(profile), (args.width, args.height))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
