#!/usr/bin/env bash
# torchrun on one machine:  NPROC=4 launch/torchrun.sh CONFIG [mmcl train args: --out DIR --set k=v ...]
# DDP by default; DeepSpeed ZeRO with --set train.deepspeed=configs/deepspeed/zero2.json.
# NPROC defaults to the number of GPUs, or 2 processes on a CPU-only machine (gloo).
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [mmcl train args]}
shift
if [ -n "${NPROC:-}" ] && ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/torchrun.sh: NPROC=$NPROC is not a positive integer" >&2; exit 2
fi
PY=${PYTHON:-python}
NPROC=${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m mmcl.cli train --config "$CONFIG" "$@"
