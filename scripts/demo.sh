#!/usr/bin/env bash
# The main job on the real demo data shipped with the package: 3-fold fine-tuning of
# EfficientNet-Lite0 (offline ImageNet weights) on ISIC UDA-1 with every output, from a fresh clone,
# with no download of data or weights and no network (beyond installing packages once).
# Extra arguments are Hydra overrides, e.g. scripts/demo.sh trainer.epochs=3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)
.venv/bin/melanoma-train experiment=demo hydra.run.dir="$run" "$@"
cat <<NEXT

Next steps on this run:
  # the held-out test split, with CIs
  .venv/bin/melanoma-eval ckpt=$run hydra.run.dir=$run/eval
  # Grad-CAM maps of test lesions, and the occlusion test
  .venv/bin/melanoma-explain ckpt=$run
  # report.pdf, results.md and the model card
  .venv/bin/melanoma-report $run
NEXT
