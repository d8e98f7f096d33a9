#!/usr/bin/env bash
# GPU pretraining-step benchmark in one command, on a machine with a CUDA PyTorch but no network
# (e.g. a lent H100/H200 whose python3 holds torch, einops and PyYAML but not MONAI).
#
#   here (with network), once:   bash benchmarks/gpu_pretrain_step.sh --fetch
#   there:                       bash benchmarks/gpu_pretrain_step.sh [OUT_DIR] [extra pretrain_step.py options]
#   check it here, on the CPU:   bash benchmarks/gpu_pretrain_step.sh --dry-run [OUT_DIR] [extra options]
#
# --fetch downloads the pure-Python MONAI wheel into .whl/ (git-ignored; carry it to the GPU machine).
# The run installs every wheel of .whl/ into /tmp/site without dependencies, prints the GPU, then runs
# benchmarks/pretrain_step.py on CUDA: base encoder, 256x256, batch 64, bf16 autocast, all variants
# (correctness check of loss and gradients first, then images/s, peak memory per image, FLOP/s),
# plus torch.compile, and writes OUT_DIR/pretrain_step_gpu.json and .txt.
# --dry-run runs the same code path on the CPU at tiny sizes (tiny encoder, batch 2, 64x64, bf16 autocast,
# every variant and torch.compile, the loss and gradient checks first, one timed step) and writes
# OUT_DIR/pretrain_step_dry_run.json and .txt; its rates mean nothing. PYTHON picks the interpreter (python3);
# COMPILE= (empty) leaves torch.compile out (its C++ build takes minutes on a CPU: the test suite does that).
set -euo pipefail
cd "$(dirname "$0")/.."
MONAI_VERSION=${MONAI_VERSION:-1.6.1}
if [ "${1:-}" = "--fetch" ]; then
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: -d .whl "monai==${MONAI_VERSION}"
  ls -l .whl
  exit 0
fi
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ]; then
  shift
  out=${1:-${OUT:-gpu_results}}
  shift || true
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  "$PYTHON" benchmarks/pretrain_step.py --device cpu --size tiny --batch-size 2 --image-size 64 --amp on \
    --warmup 1 --steps 1 --repeats 1 ${COMPILE---compile} --out "$out/pretrain_step_dry_run.json" "$@" 2>&1 | tee "$out/pretrain_step_dry_run.txt"
  exit "${PIPESTATUS[0]}"
fi
out=${1:-${OUT:-gpu_results}}
shift || true
mkdir -p "$out"
if ! python3 -c "import monai" 2>/dev/null; then
  ls .whl/monai-*.whl >/dev/null 2>&1 || { echo "MONAI is missing: run 'bash $0 --fetch' where pip can download, and carry .whl/"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name(0))"
export PYTHONUNBUFFERED=1
python3 benchmarks/pretrain_step.py --device cuda --compile --out "$out/pretrain_step_gpu.json" "$@" 2>&1 | tee "$out/pretrain_step_gpu.txt"
