"""Start `ns-viewer --load-config` on a free local port and return the page it serves (shared by the CLI tests)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


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
