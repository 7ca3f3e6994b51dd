#!/usr/bin/env bash
# The main job on the embedded demo data: 3-fold cross-validation with every output, from a fresh
# clone, with no download of data or weights and no network (beyond installing packages once).
# Extra arguments are Hydra overrides, e.g. scripts/demo.sh trainer.epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/melanoma-train experiment=demo "$@"
