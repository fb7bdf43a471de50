"""One skeleton for the jobs that fill a folder (latents, token cache).

    with FolderJob(out, "encode-latents") as job:   # the main process locks out/ (one job)
        job.claim(manifest, compare)                 # a new folder is claimed; an old one checked
        mine = job.share(todo)                       # process i of n takes items i::n
        for item in ...: write each result atomically; bar = job.bar(...)
        job.wait()                                   # then the main process finishes the folder

A killed job leaves only temporary files, which the next run removes (once they are ten minutes
old: a lazy bank may be filling the same folder); every result is a file
written whole (temp file + rename), so a rerun resumes from what is on disk. The processes are
``accelerate``'s: ``accelerate launch -m dit_mem.cli ...`` shards the work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dit_mem.utils import get_logger
from dit_mem.utils.io import TMP_PREFIX, folder_lock, read_json_mapping, write_json_atomic

log = get_logger(__name__)

MANIFEST = "manifest.json"
STALE_AFTER_S = 600  # a temporary file untouched this long belongs to no running writer


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.is_file() and path.stat().st_mtime < cutoff
    except FileNotFoundError:  # renamed into place meanwhile
        return False


def process_state():
    """This process's ``accelerate.PartialState`` (rank, world size, device).

    Without CUDA the state is built with ``cpu=True`` so that a CPU multi-process launch
    (``torchrun`` / ``accelerate launch --cpu``) still shards the work.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class FolderJob:
    """A resumable job filling ``out``, locked by its main process, sharded over processes."""

    def __init__(self, out: str | Path, name: str):
        self.out, self.name = Path(out), name
        self.state = process_state()
        self._lock = contextlib.ExitStack()

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def device(self) -> torch.device:
        return self.state.device

    def __enter__(self) -> FolderJob:
        if self.is_main:  # one job per folder; a killed job's temporary files go
            self._lock.enter_context(folder_lock(self.out, self.name))
            # a killed job's temporary files go; recent ones may be a lazy bank's fill under way
            cutoff = time.time() - STALE_AFTER_S
            stale = [p for p in self.out.glob(f"{TMP_PREFIX}*") if _older(p, cutoff)]
            for p in stale:
                p.unlink(missing_ok=True)
            if stale:
                log.info("removed %d temporary file(s) left by an interrupted run", len(stale))
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()

    def claim(self, manifest: dict[str, Any], compare: Callable[[dict], None]) -> None:
        """The folder's ``manifest.json``: written by the main process into a new folder; an
        existing one is passed to ``compare``, which raises if this run may not add to it."""
        path = self.out / MANIFEST
        if path.is_file():
            compare(read_json_mapping(path))
        elif self.is_main:
            write_json_atomic(path, manifest)
        self.wait()

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This process's items: ``items[rank::world]``."""
        return list(items[self.rank :: self.state.num_processes])

    def bar(self, total: int, initial: int = 0, unit: str = "video"):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=f"{self.name}[{self.rank}]",
            position=self.rank,
            unit=unit,
            dynamic_ncols=True,
        )

    def wait(self) -> None:
        self.state.wait_for_everyone()
