#!/usr/bin/env bash
# Train the DiT-Mem memory encoder with accelerate.
#
#   scripts/train_dit_mem.sh [key=value ...] [--resume latest]
#   NUM_PROCESSES=8 scripts/train_dit_mem.sh optim.lr=2e-5
#   CONFIG=my.yaml NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 scripts/train_dit_mem.sh
#
# Environment: NUM_PROCESSES (default 1), CONFIG (default config/train_dit_mem.yaml),
# NUM_MACHINES / MACHINE_RANK / MAIN_PROCESS_IP / MAIN_PROCESS_PORT for several nodes,
# ACCELERATE_EXTRA (more `accelerate launch` flags), ACCELERATE_USE_CPU=true to force CPU
# processes (set automatically when several processes are asked for and CUDA is absent; they
# then talk over gloo). Extra arguments go to
# `dit-mem train` (config overrides win over the YAML).
set -euo pipefail

cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-config/train_dit_mem.yaml}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
NUM_MACHINES="${NUM_MACHINES:-1}"

launch=(accelerate launch
  --num_processes "${NUM_PROCESSES}"
  --num_machines "${NUM_MACHINES}"
  --dynamo_backend no)
if [ "${NUM_PROCESSES}" -gt 1 ] || [ "${NUM_MACHINES}" -gt 1 ]; then
  launch+=(--multi_gpu)  # torchrun-style launch; on a machine without CUDA:
  if [ -z "${ACCELERATE_USE_CPU:-}" ] && \
     ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    export ACCELERATE_USE_CPU=true  # several CPU processes over gloo (DistributedType.MULTI_CPU)
  fi
fi
if [ "${NUM_MACHINES}" -gt 1 ]; then
  launch+=(--machine_rank "${MACHINE_RANK:?set MACHINE_RANK}"
           --main_process_ip "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP}"
           --main_process_port "${MAIN_PROCESS_PORT:-29500}")
fi
# shellcheck disable=SC2206
launch+=(${ACCELERATE_EXTRA:-})

exec "${launch[@]}" -m dit_mem.cli train --config "${CONFIG}" "$@"
