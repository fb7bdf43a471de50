#!/usr/bin/env bash
# Encode the memory bank's videos into normalised Wan2.1-VAE latents (bf16, one file per video).
# Resumable: re-run the same command after an interruption. Override any variable from the
# environment, e.g.
#   NUM_GPUS=8 CSV=data/OpenVidHD_memory.csv VIDEOS=data/video BASE_MODEL=model/Wan2.1-T2V-1.3B \
#     bash latent_processing/vae_latent_processing.sh
set -euo pipefail

CSV="${CSV:-data/memory.csv}"              # table with a video (or video_path) column
VIDEOS="${VIDEOS:-data/video}"             # folder the CSV's relative video paths start from
OUT="${OUT:-latent}"                       # latent folder (ignored when BANK is set)
BANK="${BANK:-}"                           # a bank folder: write BANK/latents and BANK/bank.json
BASE_MODEL="${BASE_MODEL:-model/Wan2.1-T2V-1.3B}"  # diffusers folder, VAE folder or Wan2.1_VAE.pth
NUM_GPUS="${NUM_GPUS:-1}"                  # >1: one process per GPU via accelerate launch
NUM_FRAMES="${NUM_FRAMES:-81}"
HEIGHT="${HEIGHT:-480}"
WIDTH="${WIDTH:-832}"
RESIZE="${RESIZE:-stretch}"                # stretch (paper) | crop
BACKEND="${BACKEND:-pyav}"                 # pyav | decord
VAE_DTYPE="${VAE_DTYPE:-float32}"          # float32 | bfloat16 | float16
NUM_WORKERS="${NUM_WORKERS:-4}"            # decoding processes per GPU

if [[ -n "$BANK" ]]; then where=(--bank "$BANK"); else where=(--out "$OUT"); fi
args=(encode-latents --csv "$CSV" --videos "$VIDEOS" "${where[@]}" --base-model "$BASE_MODEL"
      --num-frames "$NUM_FRAMES" --height "$HEIGHT" --width "$WIDTH" --resize "$RESIZE"
      --backend "$BACKEND" --vae-dtype "$VAE_DTYPE" --num-workers "$NUM_WORKERS")

if [[ "$NUM_GPUS" -gt 1 ]]; then
  accelerate launch --num_processes "$NUM_GPUS" -m dit_mem.cli "${args[@]}"
else
  dit-mem "${args[@]}"
fi
