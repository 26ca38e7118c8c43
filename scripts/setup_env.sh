#!/usr/bin/env bash
# Creates ./.venv with nerfstudio 1.1.5, gsplat 1.4.0 and this package (editable). Idempotent: a second run only
# re-checks the install. torch and torchvision are pinned as a matching pair from PyPI; that build runs on
# machines with or without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# open3d (imported by nerfstudio's ns-export) needs the system library libusb-1.0.
if ! ldconfig -p 2>/dev/null | grep -q "libusb-1.0.so.0"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing libusb-1.0-0 (needed by open3d for ns-export)"
    (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) >/dev/null 2>&1 || echo "[setup] warning: could not install libusb-1.0-0"
  else
    echo "[setup] warning: libusb-1.0 is missing; ns-export needs it (Debian/Ubuntu: sudo apt-get install libusb-1.0-0)"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import nerfstudio, gsplat, torchvision, nerfstudio_splat_ext, pytest, pytorch_msssim, selenium" 2>/dev/null; then
  # The CUDA build of torch and its libraries unpack to about 7.5 GB; a full disk otherwise surfaces later as a
  # confusing "No module named torch".
  FREE_KB=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${FREE_KB:-0}" -lt 9000000 ]; then
    echo "[setup] error: $(( FREE_KB / 1048576 )) GB free on the disk holding $PWD; the install needs about 9 GB." >&2
    echo "[setup] free some space (old clones, pip caches) and run this again." >&2
    exit 1
  fi
  echo "[setup] installing torch, nerfstudio, gsplat and nerfstudio-splat-ext into .venv (a few minutes, about 7.5 GB)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  PIP_LOG=$(mktemp)
  # --no-cache-dir: the wheels are not kept a second time in ~/.cache (5 GB for torch alone).
  if ! .venv/bin/python -m pip install -q --no-cache-dir "torch==2.11.0" "torchvision==0.26.0" -e ".[test]" >"$PIP_LOG" 2>&1; then
    grep -v "is ignored" "$PIP_LOG" | tail -n 30 >&2
    echo "[setup] error: pip could not install the environment into $PWD/.venv (its last lines are above)." >&2
    rm -f "$PIP_LOG"
    exit 1
  fi
  rm -f "$PIP_LOG"
fi
.venv/bin/python -c "import nerfstudio_splat_ext, torch; print('[setup] ready: torch', torch.__version__, '| CUDA' if torch.cuda.is_available() else '| CPU only')"
