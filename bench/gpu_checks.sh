#!/usr/bin/env bash
# The GPU checks of issue 15, as one script for a lent accelerator (about 12 minutes in all):
#   1. the CUDA tests: tests/test_gpu_path.py on the GPU (bf16 vs fp32 through the trainer, no host sync
#      under torch.cuda.set_sync_debug_mode("error"), pinned batches, SDPA in every tower, the bench's pieces);
#   2. bench/gpu_step.py: the largest named config and batch that fit, per objective samples/s, the step split,
#      peak memory and MFU (JSON lines and a markdown table).
# Usage: bash bench/gpu_checks.sh [OUT_DIR]   (PYTHON: the interpreter with mmcl's dependencies; default python3)
set -u
OUT="${1:-${OUT:-gpu_checks_out}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); sys.exit(0 if torch.cuda.is_available() else 3)"
} 2>&1 | tee "$OUT/device.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_checks: no usable CUDA torch for $PY" | tee -a "$OUT/device.txt"; exit 3; }

timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_path.py -m "not slow" 2>&1 | tail -n 40 \
  | tee "$OUT/tests.txt"
echo "tests exit ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"

timeout 420 "$PY" bench/gpu_step.py --batch "${BATCH:-256}" --steps "${STEPS:-20}" --warmup 5 \
  > "$OUT/gpu_step.txt" 2> "$OUT/gpu_step.err"
echo "gpu_step exit $?" | tee -a "$OUT/gpu_step.err"
tail -n 20 "$OUT/gpu_step.err"
cat "$OUT/gpu_step.txt"
