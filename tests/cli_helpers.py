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
