#!/usr/bin/env bash
# The deepspeed launcher:  NPROC=8 ZERO=1|2|3 launch/deepspeed.sh CONFIG [mmcl train args]
# Uses configs/deepspeed/zero$ZERO.json (default 2). NPROC defaults to the GPUs, or 2 on CPU
# (plain `deepspeed script.py` starts ONE process on a CPU machine: it counts NUMA nodes, so --num_gpus is
# always given).
set -euo pipefail
CONFIG=${1:?usage: launch/deepspeed.sh CONFIG [mmcl train args]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
DS_CONFIG="$HERE/../configs/deepspeed/zero${ZERO:-2}.json"
[ -f "$DS_CONFIG" ] || { echo "launch/deepspeed.sh: no DeepSpeed config $DS_CONFIG (ZERO=1|2|3)" >&2; exit 2; }
if [ "$GPUS" -eq 0 ]; then export DS_ACCELERATOR=cpu; fi
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --module mmcl.cli train --config "$CONFIG" \
  --set train.deepspeed="$DS_CONFIG" "$@"
