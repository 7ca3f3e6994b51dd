#!/usr/bin/env bash
# Regenerate the README's figures (assets/*.png) and report.pdf from one real run of the demo:
# 3-fold training on the embedded synthetic data, evaluation on its test split, Grad-CAM maps and
# the report, all under outputs/assets/ (about 3 minutes on a 2-core CPU). Each figure's title
# names the data it shows. Extra arguments are Hydra overrides of the training run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=outputs/assets
rm -rf "$out"  # a fresh run: the same hydra.run.dir would otherwise resume the previous one
.venv/bin/melanoma-train experiment=demo hydra.run.dir="$out/train" "$@"
.venv/bin/melanoma-eval ckpt="$out/train" hydra.run.dir="$out/eval"
.venv/bin/melanoma-explain ckpt="$out/train" hydra.run.dir="$out/explain"
.venv/bin/melanoma-report "$out/train" "$out/eval" --out "$out/report" --figures assets
cp "$out/report/report.pdf" report.pdf
echo "wrote assets/{sample_augmented,loss_curve,confusion_matrix,activation_map}.png and report.pdf"
