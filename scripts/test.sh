#!/usr/bin/env bash
# README command (b): set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests -v -rs --durations=15 "$@"
