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
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "web-page.png")
    ap.add_argument("--port", type=int, default=7861)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1500)
    args = ap.parse_args()
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        raise SystemExit("needs chromium and chromedriver (apt install chromium chromium-driver)")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "dit_mem.cli", "serve", "--port", str(args.port)]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{args.port}/"
    try:
        wait_for(url, proc)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        profile = tempfile.mkdtemp(prefix="dit-mem-chromium-")
        for flag in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--window-size={args.width},{args.height}",
            f"--user-data-dir={profile}",
        ):  # fmt: skip
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_bin), options=options)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 180)
            box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
            box.send_keys(PROMPT)
            driver.find_element(By.CSS_SELECTOR, "#generate").click()
            wait.until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#without video, #with video")) == 2
            )
            wait.until(lambda d: PROMPT in d.find_element(By.CSS_SELECTOR, "#memory").text)
            time.sleep(2)  # let the videos show a frame
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
