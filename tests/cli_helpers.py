"""Helpers shared by the CLI tests: train then evaluate through ns-train / ns-eval, and fetch the viewer page."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def train_and_eval(method: str, data: Path, out: Path, flags: list) -> tuple:
    """`ns-train METHOD --data DATA <flags>` into OUT, then `ns-eval` on the test views: (results dict, config path)."""
    train = subprocess.run(
        [str(BIN / "ns-train"), method, "--data", str(data), "--output-dir", str(out), "--experiment-name", "cpu",
         "--timestamp", "run", *flags],
        capture_output=True, text=True, timeout=1200,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    config = out / "cpu" / method / "run" / "config.yml"
    metrics = out / "eval.json"
    ev = subprocess.run([str(BIN / "ns-eval"), "--load-config", str(config), "--output-path", str(metrics)],
                        capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    return json.loads(metrics.read_text())["results"], config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def viewer_page(config: Path, timeout_s: float = 180.0) -> str:
    """The HTML the viewer serves for this run; raises AssertionError with the server's output if it dies."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "ns-viewer"), "--load-config", str(config), "--viewer.websocket-port", str(port),
         "--viewer.websocket-host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + timeout_s
        page = None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.read().decode("utf-8", "replace")
                    break
            except OSError:
                time.sleep(1.0)
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
        assert page is not None, "the viewer did not answer in time"
        return page
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def browser_unavailable_reason() -> str:
    """Why the headless-browser viewer test cannot run here ('' when it can)."""
    import shutil

    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs the selenium package (pip install -e '.[test]')"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"needs `{exe}` on the PATH (Debian: apt-get install chromium chromium-driver; .ci/run installs it)"
    return ""


def _resolution_shown(driver) -> tuple:
    """The last 'Resolution: WxHpx' the viewer's control panel shows (the size of the last frame it received)."""
    import re

    found = re.findall(r"Resolution: (\d+)\D(\d+)px", driver.find_element("tag name", "body").text)
    return tuple(int(v) for v in found[-1]) if found else ()


def _wait_for_frame(driver, max_res: int, timeout_s: float, after_low_res: bool) -> tuple:
    """Waits for a frame whose long side is `max_res` (the viewer's static render); with `after_low_res`, only one
    that follows a lower-resolution frame (the viewer renders small while the camera moves, then at full size)."""
    seen_low = not after_low_res
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        res = _resolution_shown(driver)
        if res and max(res) < max_res:
            seen_low = True
        if res and seen_low and max(res) >= max_res:
            return res
        time.sleep(0.2)
    raise AssertionError(f"no {max_res}px frame reached the browser in {timeout_s:.0f} s (last shown: {res})")


def viewer_screenshot(config: Path, screenshot: Path, timeout_s: float = 240.0) -> dict:
    """Serves the run with `ns-viewer` on 127.0.0.1, opens it in headless Chromium, waits for a full-resolution frame,
    zooms the camera out (nerfstudio's default camera starts inside Blender-style objects), waits for the next
    full-resolution frame and saves a screenshot of the 3D canvas. Returns what the browser saw."""
    import numpy as np
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    import shutil

    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "ns-viewer"), "--load-config", str(config), "--viewer.websocket-port", str(port),
         "--viewer.websocket-host", "127.0.0.1",
         # no training-image frustums: the canvas then shows only the rendered scene
         "--viewer.max-num-display-images", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                # WebGL in software: headless machines have no GPU
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = None
    try:
        deadline = time.time() + 120
        while True:  # wait for the server before pointing the browser at it
            assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
                break
            except OSError:
                assert time.time() < deadline, "ns-viewer did not start serving in 120 s"
                time.sleep(1.0)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        driver.get(f"http://127.0.0.1:{port}/")
        max_res = 512  # the viewer's default "Max res"
        first = _wait_for_frame(driver, max_res, timeout_s, after_low_res=False)
        canvas = driver.find_elements("tag name", "canvas")[-1]
        for _ in range(10):
            ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 300).perform()
            time.sleep(0.05)
        zoomed = _wait_for_frame(driver, max_res, timeout_s, after_low_res=True)
        time.sleep(1.0)  # the frame's texture is drawn on the next animation frame
        canvas.screenshot(str(screenshot))
        connected = "Connected" in driver.find_element("tag name", "body").text
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(np.int32).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]  # the empty viewport's colour: the most frequent one
    foreground = float((np.abs(pixels - background).sum(-1) > 30).mean())
    return {"connected": connected, "first_frame": first, "zoomed_frame": zoomed, "foreground_fraction": foreground}
