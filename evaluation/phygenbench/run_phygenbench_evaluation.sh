#!/usr/bin/env bash
# Score one run's PhyGenBench videos with PhyGenEval, then aggregate with dit-mem.
#   bash evaluation/phygenbench/run_phygenbench_evaluation.sh RUN_DIR PHYGENBENCH_CHECKOUT [MODEL_NAME]
#   MODEL_NAME defaults to dit-mem (the folder RUN_DIR/phygenbench/PhyVideos/MODEL_NAME).
# Environment:
#   STAGES="single multi_clip multi_gpt multi_llava video_gpt video_intern overall"  stages to run
#   INTERNVIDEO2_CKPT=path        InternVideo2-Stage2_1B-224p-f4 checkpoint (video_intern stage)
#   DRY_RUN=1                     print the commands only
#
# What PhyGenEval needs (its README): a checkout of https://github.com/OpenGVLab/PhyGenBench,
# VQAScore (https://github.com/linzhiqiu/t2v_metrics, `pip install t2v_metrics`) for the single
# and multi_clip stages, an OpenAI API configured in PhyGenEval/*/GPT4o.py for the GPT-4o stages,
# LLaVA-NeXT-interleave (https://github.com/LLaVA-VL/LLaVA-NeXT) for multi_llava, and
# ChronoMagic-Bench's environment with InternVideo2 for video_intern. Each tool has its own pins:
# use one environment per tool, as PhyGenBench's README says.
#
# PhyGenEval's scripts hard-code their root (/PhyGenBench/...) and the model name ('kelingall').
# This script therefore (1) links the videos to CHECKOUT/PhyVideos/MODEL_NAME, (2) needs
# /PhyGenBench to be (a link to) the checkout, and (3) runs a copy of each stage script written
# beside the original as _dit_mem_<script>.py with the model name replaced; originals are never
# edited. Some scripts also carry site-specific paths (a local CLIP snapshot in
# multi/multiimage_clip.py, API keys in the GPT4o.py files) and intermediate file names that
# overall.py reads: check them once in your checkout before a long run.
# overall.py writes CHECKOUT/result/MODEL_NAME.json, which `dit-mem eval phygenbench score` reads.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,8p' "$0"
  cat <<'HELP'

Without a PhyGenBench checkout, install it first:
  git clone https://github.com/OpenGVLab/PhyGenBench.git
  sudo ln -s "$PWD/PhyGenBench" /PhyGenBench        # PhyGenEval's scripts use this root
  pip install t2v_metrics                            # VQAScore, in a separate environment
  # GPT-4o stages: set base_url/api_key in PhyGenEval/multi/GPT4o.py and PhyGenEval/video/GPT4o.py
  # multi_llava: LLaVA-NeXT (interleave) as in PhyGenEval/multi/LLaVA-NeXT-interleave_inference
  # video_intern: ChronoMagic-Bench's environment + InternVideo2-Stage2_1B-224p-f4 (INTERNVIDEO2_CKPT)
Already have PhyGenEval's result JSON? Aggregate it directly:
  dit-mem eval phygenbench score --results result/MODEL.json --run RUN_DIR
HELP
  exit 2
fi
RUN="$1"; CHECKOUT="$(cd "$2" && pwd)"; MODEL="${3:-dit-mem}"
STAGES="${STAGES:-single multi_clip multi_gpt multi_llava video_gpt video_intern overall}"
VIDEOS="$(cd "$RUN/phygenbench/PhyVideos/$MODEL" 2>/dev/null && pwd)" || {
  echo "error: no videos at $RUN/phygenbench/PhyVideos/$MODEL; run evaluation/phygenbench/generate.sh first" >&2; exit 2; }
for f in PhyGenBench/prompts.json PhyGenEval/overall.py PhyGenEval/single/vqascore.py; do
  [[ -f "$CHECKOUT/$f" ]] || { echo "error: $CHECKOUT is not a PhyGenBench checkout (no $f)" >&2; exit 2; }
done
if [[ "$(cd /PhyGenBench 2>/dev/null && pwd -P)" != "$(cd "$CHECKOUT" && pwd -P)" ]]; then
  echo "error: PhyGenEval's scripts read and write under /PhyGenBench; link it to the checkout:" >&2
  echo "  sudo ln -sfn $CHECKOUT /PhyGenBench" >&2
  exit 2
fi
n=$(find "$VIDEOS" -maxdepth 1 -name 'output_video_*.mp4' | wc -l)
[[ "$n" -eq 160 ]] || echo "warning: $n of 160 videos in $VIDEOS; missing ones will fail in PhyGenEval"

run() { echo "+ (cd $1 && ${*:2})"; [[ "${DRY_RUN:-0}" == "1" ]] || (cd "$1" && "${@:2}"); }
# Copy a stage script beside its original with our model name (modelname = / modelnames = lines).
patched() {
  local src="$CHECKOUT/$1" dst
  dst="$(dirname "$src")/_dit_mem_$(basename "$src")"
  sed -e "s/^\(\s*\)modelname = .*/\1modelname = '$MODEL'/" \
      -e "s/^\(\s*\)modelnames = .*/\1modelnames = ['$MODEL']/" "$src" > "$dst"
  echo "$dst"
}

mkdir -p "$CHECKOUT/PhyVideos"
ln -sfn "$VIDEOS" "$CHECKOUT/PhyVideos/$MODEL"
for stage in $STAGES; do
  case "$stage" in
    single)       run "$CHECKOUT" python "$(patched PhyGenEval/single/vqascore.py)" ;;
    multi_clip)   run "$CHECKOUT" python "$(patched PhyGenEval/multi/multiimage_clip.py)" ;;
    multi_gpt)    run "$CHECKOUT" python "$(patched PhyGenEval/multi/GPT4o.py)" ;;
    multi_llava)  run "$CHECKOUT/PhyGenEval/multi/LLaVA-NeXT-interleave_inference" \
                    python "$(patched PhyGenEval/multi/LLaVA-NeXT-interleave_inference/llava/eval/model_vqa_multi.py)" ;;
    video_gpt)    run "$CHECKOUT" python "$(patched PhyGenEval/video/GPT4o.py)" ;;
    video_intern) run "$CHECKOUT/PhyGenEval/video/MTScore" \
                    python "$(patched PhyGenEval/video/MTScore/InternVideo_physical.py)" \
                    ${INTERNVIDEO2_CKPT:+--model_pth "$INTERNVIDEO2_CKPT"} ;;
    overall)      run "$CHECKOUT" python "$(patched PhyGenEval/overall.py)" ;;
    *) echo "error: unknown stage $stage" >&2; exit 2 ;;
  esac
done
RESULT="$CHECKOUT/result/$MODEL.json"
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "+ dit-mem eval phygenbench score --results $RESULT --run $RUN"; exit 0
fi
exec dit-mem eval phygenbench score --results "$RESULT" --run "$RUN"
