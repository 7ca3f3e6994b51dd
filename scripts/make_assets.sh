#!/usr/bin/env bash
# Regenerate the README's figures (assets/*.png) and report.pdf from one real run of the demo:
# 3-fold fine-tuning of EfficientNet-Lite0 on the real ISIC UDA-1 images shipped in the package,
# evaluation of the fold ensemble on the set's held-out test split (no TTA), Grad-CAM maps of test
# lesions and the report, all under outputs/assets/ (about 4 minutes on a 2-core CPU). Each
# figure's title names the model and run it shows. Extra arguments are Hydra overrides of training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=outputs/assets
rm -rf "$out"  # a fresh run: the same hydra.run.dir would otherwise resume the previous one
.venv/bin/melanoma-train experiment=demo hydra.run.dir="$out/train" "$@"
.venv/bin/melanoma-eval ckpt="$out/train" hydra.run.dir="$out/train/eval"
.venv/bin/melanoma-explain ckpt="$out/train" hydra.run.dir="$out/explain"
.venv/bin/melanoma-report "$out/train" --out "$out/report" --figures assets
cp "$out/report/report.pdf" report.pdf
echo "wrote assets/{sample_augmented,loss_curve,confusion_matrix,activation_map}.png and report.pdf"
