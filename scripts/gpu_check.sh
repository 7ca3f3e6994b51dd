#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md, in one go (target: under 8 minutes on one H100):
#   1. generate the benchmark set: 10,605 synthetic 300x300 JPEGs in the seed's layout
#      (9,605 train, 1,000 test);
#   2. melanoma-bench: model step vs full training loop vs evaluation vs timm's loader
#      (efficientnet_b0, 224 px, batch 64, AMP), once with the augmentation in the loader's
#      workers and once batched on the GPU (augmentation.on_device=true);
#   3. the seed's full protocol, timed: 3 folds x 25 epochs of efficientnet_b0 at 224 px, AMP,
#      decode-once cache, data loading included (target: under 5 minutes), with whichever
#      augmentation placement gave the faster training loop in step 2;
#   4. tests/test_gpu.py: the CUDA paths (precision auto, AMP + channels-last + fused Adam,
#      torch.compile, augmentation on the device, a GPU-trained run evaluated on the CPU),
#      last so that the timings come back even if time runs out (GPU_TESTS=0 skips them).
# After the data, a failing step is noted in summary.txt and the later steps still run.
#
# Usage (from the repository root):
#   scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else outputs/gpu_check
#   SMOKE=1 scripts/gpu_check.sh /tmp/x     # the same steps in a minute on a CPU (tiny sizes)
#   EXTRA="trainer.compile=true" scripts/gpu_check.sh   # more overrides for steps 2 and 3
#                                                       # (not augmentation.on_device: step 2 picks it)
#
# melanoma runs from src/ (no install needed) when its dependencies are importable. A machine
# that has torch, torchvision and timm but not the rest (Hydra, Captum, kornia...) installs them from
# wheels in .whl/, made beforehand on a machine with a package index:
#   scripts/gpu_check.sh --fetch-wheels     # Python 3.12 wheels for the GPU image into .whl/
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  py=${PYTHON:-.venv/bin/python}
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.2 omegaconf==2.3.0 captum==0.9.0 \
    hydra-joblib-launcher==1.2.0 hydra-submitit-launcher==1.2.0 submitit cloudpickle \
    kornia==0.9.0 kornia_rs==0.2.0 pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging pygments
  # omegaconf's parser runtime is published as source only; it is pure Python, so build its wheel here
  "$py" -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exit 0
fi

out=${1:-${OUT:-outputs/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=${PYTHON:-.venv/bin/python}
if ! "$py" -c "import hydra, captum, omegaconf, kornia, pytest" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu_check: Hydra/Captum/kornia/pytest missing and no .whl/ folder: run scripts/gpu_check.sh --fetch-wheels first" >&2; exit 1; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/melanoma-site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/melanoma-site"
fi
"$py" - <<'PY' | tee "$out/machine.txt"
import os, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cores", len(os.sched_getaffinity(0)))
PY

if [ -n "${SMOKE:-}" ]; then   # the same steps, sized for a CPU
  n_train=96 n_test=20 size=64 model=test_efficientnet image=32 batch=16 epochs=2 steps=2
else
  n_train=9605 n_test=1000 size=300 model=efficientnet_b0 image=224 batch=64 epochs=25 steps=50
fi
work=${WORK:-/tmp/melanoma-gpu-check}   # run folders (checkpoints) stay here; $out gets the summary files
data=$work/data-$n_train-$size
export MELANOMA_CACHE=${MELANOMA_CACHE:-$work/cache}
# shellcheck disable=SC2086  # EXTRA is a list of Hydra overrides
common=(data=kaggle "data.root=$data" "model.name=$model" model.pretrained=false "data.image_size=$image"
        "data.batch_size=$batch" ${EXTRA:-})

note() { echo "$*" | tee -a "$out/summary.txt"; }
rm -f "$out"/{summary.txt,benchmark.json,benchmark_device.json,protocol_metrics.json,gpu_tests.log}  # no stale results
t0=$(date +%s)
"$py" -m melanoma.cli.synth "$data" --n-train "$n_train" --n-test "$n_test" --size "$size"
t1=$(date +%s)
note "data: $n_train + $n_test JPEGs at ${size}px in $((t1 - t0)) s"

# Each timed step is guarded: a failure is noted and the later steps (and the tests) still run.
bench() {  # bench NAME OVERRIDES...: one melanoma-bench run into $out/NAME.json
  local name=$1; shift
  if "$py" -m melanoma.cli.bench "${common[@]}" "bench.steps=$steps" "hydra.run.dir=$work/$name" "$@" 2>&1 \
       | tee "$out/$name.log"; then
    cp "$work/$name/benchmark.json" "$out/$name.json"
  else
    note "$name: melanoma-bench $* FAILED (see $name.log)"
  fi
}
bench benchmark
bench benchmark_device augmentation.on_device=true bench.timm_loader=false
"$py" - "$out/benchmark.json" "$out/benchmark_device.json" > "$work/rates.txt" <<'PY' || true
import json, sys
from pathlib import Path
workers, device = ((json.loads(Path(p).read_text())["images_per_second"] if Path(p).is_file() else {})
                   for p in sys.argv[1:])
def rate(d, key):
    return f"{d[key]:.0f}" if key in d else "n/a"
print(f"model step {rate(workers, 'model_step')} images/s; training loop with the augmentation in the workers "
      f"{rate(workers, 'train_loop')}, on the device {rate(device, 'train_loop')}; timm loader "
      f"{rate(workers, 'timm_loader')}; eval {rate(workers, 'eval_loop')}")
print(str(device.get("train_loop", 0) > workers.get("train_loop", 0)).lower())
PY
[ -s "$work/rates.txt" ] || printf 'benchmark rates unreadable\nfalse\n' > "$work/rates.txt"
note "$(head -n 1 "$work/rates.txt")"
on_device=$(tail -n 1 "$work/rates.txt")
note "the protocol runs with augmentation.on_device=$on_device (the faster training loop in the benchmarks; false if unknown)"
t2=$(date +%s)

if "$py" -m melanoma.cli.train recipe=seed "${common[@]}" "trainer.epochs=$epochs" cv.folds=3 data.cache=memory \
     "augmentation.on_device=$on_device" "hydra.run.dir=$work/protocol-$t2" 2>&1 | tee "$out/protocol.log"; then
  cp "$work/protocol-$t2/metrics.json" "$out/protocol_metrics.json"
  result="full protocol (3 folds x $epochs epochs, $model, ${image}px, data loading included): $(($(date +%s) - t2)) s"
else
  result="full protocol FAILED after $(($(date +%s) - t2)) s (see protocol.log)"
fi
t3=$(date +%s)
note "benchmarks: $((t2 - t1)) s; $result; whole check: $((t3 - t0)) s"

# Last, so that the timings above come back even if time runs out here. Default time limit: what is
# left of 9.5 minutes since the data step (one device command may run 10), at least one minute.
if [ "${GPU_TESTS:-1}" != 0 ]; then
  left=$((570 - ($(date +%s) - t0))); [ "$left" -ge 60 ] || left=60
  if timeout -k 20 "${TESTS_TIMEOUT:-$left}" "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
       > "$out/gpu_tests.log" 2>&1
  then verdict=passed; else verdict="FAILED or timed out (see gpu_tests.log)"; fi
  note "GPU tests (tests/test_gpu.py): $verdict: $(tail -n 1 "$out/gpu_tests.log") in $(($(date +%s) - t3)) s"
fi
