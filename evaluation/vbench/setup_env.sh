#!/usr/bin/env bash
# Create a separate virtual environment for the `vbench` package (0.1.5).
#   bash evaluation/vbench/setup_env.sh [ENV_DIR]     (default: $VBENCH_ENV or ~/.venvs/dit-mem-vbench)
# vbench pins transformers==4.33.2, numpy<2 and timm<=1.0.12, which conflict with dit-mem's
# environment: it gets its own venv (Python <= 3.11) and dit-mem's environment is never touched
# (this script only ever runs ENV_DIR/bin/pip).
# Environment:
#   PYTHON=python3.11             interpreter for the venv (3.8-3.11)
#   TORCH_SPEC="torch==2.1.2 torchvision==0.16.2"   torch for the venv; install the CUDA build you
#                                  need, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu121
#   WITH_DETECTRON2=1             also build detectron2 (needed by object_class, multiple_objects,
#                                  color, spatial_relationship: the GRiT dimensions). It compiles
#                                  against the venv's torch and needs a CUDA toolkit (nvcc) that
#                                  matches it; without it those four dimensions fail in vbench.
# vbench downloads its weights on first use into $VBENCH_CACHE_DIR (default ~/.cache/vbench);
# on an offline machine copy that folder over and set VBENCH_LOAD_CKPT_FROM_LOCAL=1.
set -euo pipefail
ENV_DIR="${1:-${VBENCH_ENV:-$HOME/.venvs/dit-mem-vbench}}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.1.2 torchvision==0.16.2}"

if ! command -v "$PYTHON" >/dev/null; then
  echo "error: $PYTHON not found; set PYTHON to a Python 3.8-3.11 interpreter" >&2; exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 8) <= sys.version_info[:2] <= (3, 11) else 1)'; then
  echo "error: vbench needs Python <= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)" >&2; exit 2
fi
ENV_ABS="$(mkdir -p "$(dirname "$ENV_DIR")" && cd "$(dirname "$ENV_DIR")" && pwd)/$(basename "$ENV_DIR")"
if [[ -n "${VIRTUAL_ENV:-}" && "$(cd "$VIRTUAL_ENV" && pwd)" == "$ENV_ABS" ]]; then
  echo "error: $ENV_ABS is the active environment; deactivate it first" >&2; exit 2
fi
if [[ -f "$ENV_ABS/pyvenv.cfg" ]] && "$ENV_ABS/bin/python" -c 'import dit_mem' 2>/dev/null; then
  echo "error: $ENV_ABS has dit-mem installed; vbench needs an environment of its own" >&2; exit 2
fi

echo "creating $ENV_ABS with $("$PYTHON" -V 2>&1)"
"$PYTHON" -m venv "$ENV_ABS"
PIP=("$ENV_ABS/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip wheel "setuptools<70"
# shellcheck disable=SC2086
"${PIP[@]}" install $TORCH_SPEC ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
"${PIP[@]}" install "vbench==0.1.5" "transformers==4.33.2" "numpy<2" "timm<=1.0.12"
if [[ "${WITH_DETECTRON2:-0}" == "1" ]]; then
  "${PIP[@]}" install --no-build-isolation "detectron2@git+https://github.com/facebookresearch/detectron2.git"
else
  echo "note: detectron2 not installed (WITH_DETECTRON2=1 to build it); vbench's object_class,"
  echo "      multiple_objects, color and spatial_relationship need it."
fi
"$ENV_ABS/bin/vbench" --help >/dev/null
echo "done: $ENV_ABS/bin/vbench"
echo "use it with: VBENCH_ENV=$ENV_ABS bash evaluation/vbench/run_vbench_evaluation.sh RUN_DIR"
