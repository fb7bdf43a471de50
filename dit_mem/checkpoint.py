"""Checkpoints that survive a SIGKILL: write into a temporary folder, then rename.

Layout of one checkpoint (``<run>/checkpoints/step-000500/``)::

    encoder/             MemoryEncoder.save_pretrained (config.json + weights + BN statistics)
    accelerate/          Accelerator.save_state: encoder, optimizer, LR schedule, RNG
    rng/rank-00000.safetensors   this trainer's own generator + torch RNG state, per process
    config.yaml          the resolved TrainConfig
    trainer_state.json   {"step": 500, ...}; written last

Everything is written under ``checkpoints/.tmp-step-000500`` and renamed into place when
complete, so a killed run leaves either a whole checkpoint or a ``.tmp-*`` folder that
:func:`list_checkpoints` ignores (and :func:`remove_stale_temporaries` deletes). ``latest``
is never a link or a pointer file: it is the complete checkpoint with the highest step.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dit_mem.errors import UserError
from dit_mem.utils import get_logger, write_json_atomic, write_safetensors_atomic

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and the state recorded in it."""

    path: Path
    step: int
    state: dict[str, Any]

    @property
    def encoder_dir(self) -> Path:
        return self.path / "encoder"

    @property
    def accelerate_dir(self) -> Path:
        return self.path / "accelerate"

    def rng_file(self, process_index: int) -> Path:
        return self.path / "rng" / f"rank-{process_index:05d}.safetensors"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint folder; ValueError if it is not a complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(
            f"{path} is not a complete training checkpoint (no {STATE_FILE}); "
            "pass a step-* folder under <run>/checkpoints, a run folder, or 'latest'"
        )
    state = json.loads(state_file.read_text())
    for part in ("encoder", "accelerate"):
        if not (path / part).is_dir():
            raise UserError(f"checkpoint {path} is incomplete: missing {part}/")
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first (temporary and broken folders skipped)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir() or not _NAME.match(p.name):
            continue
        try:
            found.append(read_checkpoint(p))
        except (ValueError, OSError, json.JSONDecodeError, KeyError) as e:
            log.warning("ignoring incomplete checkpoint %s (%s)", p, e)
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str | Path, run_dir: str | Path) -> Checkpoint:
    """``latest`` → newest complete checkpoint of ``run_dir``; a run folder → its newest;
    a checkpoint folder → itself. Raises with a clear message when there is none."""
    if str(resume) == "latest":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(
                f"--resume latest: no complete checkpoint under {Path(run_dir) / CHECKPOINTS}"
            )
        return ckpt
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume: no such checkpoint or run folder: {path}")
    if (path / STATE_FILE).is_file() or _NAME.match(path.name):
        return read_checkpoint(path)  # says what is missing in a step-* folder
    if (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS:
        ckpt = latest_checkpoint(path if path.name != CHECKPOINTS else path.parent)
        if ckpt is not None:
            return ckpt
    raise UserError(
        f"--resume {path}: no complete checkpoint there (expected a step-* folder with "
        f"{STATE_FILE}, or a run folder with {CHECKPOINTS}/step-*)"
    )


def damaged_message(ckpt: Checkpoint, run_dir: str | Path, err: Exception) -> str:
    """What to say when a checkpoint's files cannot be loaded, with the previous one to use."""
    previous = [c for c in list_checkpoints(run_dir) if c.step < ckpt.step]
    hint = (
        f"; resume from the one before it: --resume {previous[-1].path}"
        if previous
        else "; no earlier checkpoint to resume from"
    )
    first = str(err).splitlines()[0] if str(err) else ""
    return f"checkpoint {ckpt.path} is damaged ({type(err).__name__}: {first}){hint}"


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete ``.tmp-*`` folders a killed run left behind (main process, before training)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                log.info("removing unfinished checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> None:
    """Keep only the newest ``keep`` complete checkpoints."""
    if keep is None:
        return
    for ckpt in list_checkpoints(run_dir)[:-keep]:
        log.info("removing old checkpoint %s", ckpt.path)
        shutil.rmtree(ckpt.path, ignore_errors=True)


# --------------------------------------------------------------------------------------
# RNG state of one process (tensors in safetensors; no pickle)
# --------------------------------------------------------------------------------------
def save_rng_state(path: Path, generator: torch.Generator) -> None:
    """This process's sampling generator and torch's global RNG (dropout) as uint8 tensors."""
    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    write_safetensors_atomic(path, tensors)


def load_rng_state(path: Path, generator: torch.Generator) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(
            f"checkpoint has no RNG state for this process ({path.name}): was it written by a "
            "run with a different number of processes?"
        )
    tensors = load_file(str(path))
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def write_state_file(path: Path, state: dict[str, Any]) -> None:
    write_json_atomic(path / STATE_FILE, state)
