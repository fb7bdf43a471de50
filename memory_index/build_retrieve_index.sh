#!/usr/bin/env bash
# Build the caption index of the memory bank, then try one retrieval.
# Every variable can be overridden from the environment, e.g.
#   CSV=data/OpenVidHD_memory.csv MODEL=model/gte-base-en-v1.5 bash memory_index/build_retrieve_index.sh
set -euo pipefail

CSV="${CSV:-data/memory.csv}"              # OpenVid-style table: video (or video_path), caption, ...
OUT="${OUT:-memory_index}"                 # index folder (index.faiss, ids.parquet, manifest.json)
BANK="${BANK:-}"                           # a bank folder instead: write BANK/index and BANK/bank.json
MODEL="${MODEL:-}"                         # sentence-transformers folder; empty = all-MiniLM-L6-v2
TRUST_REMOTE_CODE="${TRUST_REMOTE_CODE:-}" # the model allowed to run its own code, e.g. gte-base-en-v1.5
KIND="${KIND:-flat}"                       # flat (exact, paper) | ivf | hnsw
BATCH_SIZE="${BATCH_SIZE:-256}"
DEVICE="${DEVICE:-}"                       # cuda / cpu; empty = auto
OVERWRITE="${OVERWRITE:-0}"                # 1 = replace an existing index in OUT
PROMPT="${PROMPT:-A red fox running through fresh snow in a pine forest.}"
TOP_K="${TOP_K:-5}"

if [[ -n "$BANK" ]]; then where=(--bank "$BANK"); else where=(--index "$OUT"); fi
args=(--csv "$CSV" --kind "$KIND" --batch-size "$BATCH_SIZE")
if [[ -n "$BANK" ]]; then args+=(--bank "$BANK"); else args+=(--out "$OUT"); fi
[[ -n "$MODEL" ]] && args+=(--model "$MODEL")
[[ -n "$TRUST_REMOTE_CODE" ]] && args+=(--trust-remote-code "$TRUST_REMOTE_CODE")
[[ -n "$DEVICE" ]] && args+=(--device "$DEVICE")
[[ "$OVERWRITE" == 1 ]] && args+=(--overwrite)

dit-mem build-index "${args[@]}"
retrieve=("$PROMPT" -k "$TOP_K" "${where[@]}")
[[ -n "$TRUST_REMOTE_CODE" ]] && retrieve+=(--trust-remote-code "$TRUST_REMOTE_CODE")
dit-mem retrieve "${retrieve[@]}"
