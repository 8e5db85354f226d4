#!/usr/bin/env bash
# DDP over one or several machines with torchrun: run this on every machine, NODE_RANK differing.
#
#   machine 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 RUN_ID=exp1 scripts/torchrun.sh [overrides]
#   machine 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 RUN_ID=exp1 scripts/torchrun.sh [overrides]
#
# [overrides] are train.py's (e.g. experiment=paper data.root=/shared/cifake); do not pass
# trainer=...: this script selects trainer=ddp and sets trainer.devices and trainer.num_nodes.
# Settings (environment, default):
#   NNODES (1)           machines taking part
#   NODE_RANK (0)        this machine's index, 0..NNODES-1
#   NPROC_PER_NODE       processes per machine (default: its number of GPUs, at least 1)
#   MASTER_ADDR (127.0.0.1), MASTER_PORT (29500): address of machine 0, reachable from the others
#   RUN_ID               the run folder logs/train/runs/$RUN_ID, the same on every machine
#                        (required with NNODES > 1; one machine: a time stamp)
#   PYTHON (python)      the interpreter of the project's environment
# logs/ (checkpoints, TensorBoard) must be on a filesystem that every machine sees: only global
# rank 0 writes, and after training every rank reads the best checkpoint back for the test.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
if [[ -z "${RUN_ID:-}" ]]; then
  if ((NNODES > 1)); then
    echo "error: set RUN_ID=NAME, the same on every machine: it names the shared run folder" >&2
    exit 2
  fi
  RUN_ID="$(date +%Y-%m-%d_%H-%M-%S)_$$"
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --rdzv-id "$RUN_ID" \
  "$here/../train.py" trainer=ddp trainer.devices="$NPROC_PER_NODE" trainer.num_nodes="$NNODES" "$@"
