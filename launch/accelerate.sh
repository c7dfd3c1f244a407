#!/usr/bin/env bash
# accelerate launch:  NPROC=4 ACCEL=ddp|zero1|zero2|zero3 launch/accelerate.sh CONFIG [mmcl train args]
# ACCEL picks configs/accelerate/$ACCEL.yaml (default ddp); the zero* ones use configs/deepspeed/zero*.json
# ("auto" fields filled from the train config). NPROC defaults to the GPUs, or 2 on CPU.
# On a CPU-only machine `accelerate launch --cpu` silently runs ONE process, so this script uses the
# multi-GPU launcher with ACCELERATE_USE_CPU=1 instead (gloo; see shared/ENV.md).
set -euo pipefail
CONFIG=${1:?usage: launch/accelerate.sh CONFIG [mmcl train args]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ACCEL=${ACCEL:-ddp}
case "$ACCEL" in
  ddp) DS_ARGS=() ;;
  zero1|zero2|zero3) DS_ARGS=(--deepspeed_config_file "$ROOT/configs/deepspeed/$ACCEL.json") ;;
  *) echo "launch/accelerate.sh: unknown ACCEL=$ACCEL (allowed: ddp, zero1, zero2, zero3)" >&2; exit 2 ;;
esac
if [ -n "${NPROC:-}" ] && ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/accelerate.sh: NPROC=$NPROC is not a positive integer" >&2; exit 2
fi
PY=${PYTHON:-python}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
# DDP on CPU needs ACCELERATE_USE_CPU=1; with it, accelerate would drop a DeepSpeed config without a word.
if [ "$GPUS" -eq 0 ] && [ "$ACCEL" = ddp ]; then export ACCELERATE_USE_CPU=1; fi
# The precision is the train config's (train.precision; mmcl passes it to accelerate), never the launcher's.
exec "$PY" -m accelerate.commands.launch --config_file "$ROOT/configs/accelerate/$ACCEL.yaml" "${DS_ARGS[@]}" \
  --mixed_precision no --num_processes "$NPROC" --num_machines 1 -m mmcl.cli train --config "$CONFIG" "$@"
