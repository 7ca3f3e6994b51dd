#!/usr/bin/env bash
# Lint and run the test suite (CPU, no network, a few minutes on 2 cores).
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow, or scripts/test.sh -k folds
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check src tests
exec .venv/bin/python -m pytest --durations=20 "$@"
