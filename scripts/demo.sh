#!/usr/bin/env bash
# README command (a): set up .venv if needed, then generate the default scene, train splat-ext on it, evaluate it
# and print the metrics and how to open the viewer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/splat-ext-demo "$@"
