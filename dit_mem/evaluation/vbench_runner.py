"""Run the ``vbench`` package (in its own virtual environment) per video folder.

``vbench`` 0.1.5 pins ``transformers==4.33.2``, ``numpy<2`` and ``timm<=1.0.12``, so it lives
in a separate venv (``evaluation/vbench/setup_env.sh``) and is called as a subprocess:
``<venv>/bin/vbench evaluate --videos_path <folder> --dimension <dims...> --mode vbench_standard``
with the folder's dimensions (``FOLDER_DIMENSIONS``). Results land in
``RUN/vbench/results/<folder>/results_<time>_eval_results.json``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from dit_mem.evaluation import benchmarks as B
from dit_mem.utils import get_logger

logger = get_logger(__name__)

ENV_VAR = "VBENCH_ENV"
LOCAL_CKPT_ENV_VAR = "VBENCH_LOAD_CKPT_FROM_LOCAL"
DEFAULT_ENV = Path("~/.venvs/dit-mem-vbench")


def default_env() -> Path:
    """``$VBENCH_ENV`` or ``~/.venvs/dit-mem-vbench`` (the same default as setup_env.sh)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ENV).expanduser()


def load_local_default() -> bool:
    """``$VBENCH_LOAD_CKPT_FROM_LOCAL`` set to 1/true/yes: weights are cached locally."""
    return os.environ.get(LOCAL_CKPT_ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def vbench_executable(env: str | Path) -> Path | None:
    exe = Path(env).expanduser() / "bin" / "vbench"
    return exe if exe.is_file() else None


def setup_hint(env: str | Path) -> str:
    return (
        f"VBench's environment was not found at {env} (no bin/vbench).\n"
        "Create it once (a separate venv; ours is never touched), from a dit-mem checkout:\n"
        f"    bash evaluation/vbench/setup_env.sh {env}\n"
        f"or point --vbench-env / ${ENV_VAR} at an existing one. "
        "To aggregate result files you already have, add --results-only."
    )


def vbench_command(
    exe: str | Path,
    videos: str | Path,
    dimensions: Sequence[str],
    output: str | Path,
    info_path: str | Path | None = None,
    load_ckpt_from_local: bool = False,
) -> list[str]:
    """The ``vbench evaluate`` command line for one folder (standard mode)."""
    cmd = [
        str(exe),
        "evaluate",
        "--videos_path",
        str(videos),
        "--dimension",
        *dimensions,
        "--mode",
        "vbench_standard",
        "--full_json_dir",
        str(info_path or B.vbench_info_path()),
        "--output_path",
        str(output),
    ]
    if load_ckpt_from_local:
        # vbench parses this flag with type=bool: any non-empty value means True.
        cmd += ["--load_ckpt_from_local", "True"]
    return cmd


def run_folder(
    exe: str | Path,
    folder: str | Path,
    output: str | Path,
    dimensions: Sequence[str],
    load_ckpt_from_local: bool = False,
) -> None:
    """Run vbench on one folder; a failing vbench raises CalledProcessError (not swallowed)."""
    Path(output).mkdir(parents=True, exist_ok=True)
    cmd = vbench_command(exe, folder, dimensions, output, None, load_ckpt_from_local)
    logger.info("running: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
