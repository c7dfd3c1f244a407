#!/usr/bin/env bash
# accelerate launch:  NPROC=4 ACCEL=ddp|zero2|zero3 launch/accelerate.sh CONFIG [mmcl train args]
# ACCEL picks configs/accelerate/$ACCEL.yaml (default ddp). NPROC defaults to the GPUs, or 2 on CPU.
# On a CPU-only machine `accelerate launch --cpu` silently runs ONE process, so this script uses the
# multi-GPU launcher with ACCELERATE_USE_CPU=1 instead (gloo; see shared/ENV.md).
set -euo pipefail
CONFIG=${1:?usage: launch/accelerate.sh CONFIG [mmcl train args]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
ACCEL_CONFIG="$HERE/../configs/accelerate/${ACCEL:-ddp}.yaml"
[ -f "$ACCEL_CONFIG" ] || { echo "launch/accelerate.sh: no accelerate config $ACCEL_CONFIG (ACCEL=ddp|zero2|zero3)" >&2; exit 2; }
if [ "$GPUS" -eq 0 ]; then export ACCELERATE_USE_CPU=1; fi
exec "$PY" -m accelerate.commands.launch --config_file "$ACCEL_CONFIG" --num_processes "$NPROC" \
  --num_machines 1 -m mmcl.cli train --config "$CONFIG" "$@"
