#!/usr/bin/env bash
# The deepspeed launcher:  NPROC=8 ZERO=0|1|2|3 launch/deepspeed.sh CONFIG [mmcl train args]
# ZERO=1|2|3 uses configs/deepspeed/zero$ZERO.json (default 2; "auto" fields filled from the train config);
# ZERO=0 trains without DeepSpeed (torch DDP; the launcher only starts the processes).
# NPROC defaults to the GPUs, or 2 on CPU (plain `deepspeed script.py` starts ONE process on a CPU
# machine: it counts NUMA nodes, so --num_gpus is always given).
set -euo pipefail
CONFIG=${1:?usage: launch/deepspeed.sh CONFIG [mmcl train args]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ZERO=${ZERO:-2}
case "$ZERO" in
  0) DS_ARGS=() ;;
  1|2|3) DS_ARGS=(--set "train.deepspeed=$ROOT/configs/deepspeed/zero$ZERO.json") ;;
  *) echo "launch/deepspeed.sh: unknown ZERO=$ZERO (allowed: 0 (DDP), 1, 2, 3)" >&2; exit 2 ;;
esac
if [ -n "${NPROC:-}" ] && ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/deepspeed.sh: NPROC=$NPROC is not a positive integer" >&2; exit 2
fi
PY=${PYTHON:-python}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
if [ "$GPUS" -eq 0 ]; then export DS_ACCELERATOR=cpu; fi
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --no_local_rank --module mmcl.cli train --config "$CONFIG" \
  "${DS_ARGS[@]}" "$@"
