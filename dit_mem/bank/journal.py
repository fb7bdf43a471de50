"""A bank folder's changes: each all or nothing, its history append-only and true.

Every change of a bank (``bank build`` and its reruns, ``--add``, ``--reindex``, a relink of its
videos, token caching, ``build-index`` / ``encode-latents`` / ``cache-tokens --bank``,
``import-release``) runs as one :class:`Change` under the folder's lock::

    with Change(bank, "add") as change:          # the lock; an interrupted change is finished
        build(change.stage("index"))             # new parts, written beside the bank
        change.commit({"rows": [24, 30], ...})   # one history record, then the parts in place

The protocol is a redo journal (SQLite's, by another name). Parts are written to staging paths
(``.tmp-tx-<id>-<part>``); nothing a reader sees changes until :meth:`Change.commit` writes the
journal ``.journal.json`` atomically: the commit point, naming every staged part and the history
record. Then each part is moved in place (the old one aside, then the new one in: two renames,
each atomic), ``bank.json`` is rewritten with the record appended, the old parts are deleted and
the journal last. A process killed before the journal exists leaves staging paths that the next
change (or reader) deletes: the bank is as it was. Killed after it, the next one replays the
journal from where it stopped (every step checks what is already done): the bank is as the change
made it. Readers that find a journal wait for the writer holding the lock, or finish it.

``bank.json``'s ``history`` is only ever appended to: each record says what the change did
(``op``, rows, ids added, settings, ``when``, its ``tx``). Latent files are written one by one
(each atomic, each complete: a resumable job's progress, not a change of the bank's meaning).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dit_mem.errors import UserError
from dit_mem.utils import get_logger, write_json_atomic
from dit_mem.utils.io import LOCK_FILE, TMP_PREFIX, folder_lock, read_json_mapping

log = get_logger(__name__)

BANK_MANIFEST = "bank.json"
FORMAT = "dit-mem-bank/2"
FORMATS = ("dit-mem-bank/1", FORMAT)  # /1: one "build" record instead of a history
JOURNAL = ".journal.json"
STAGING = ".tmp-tx-"
PARTS = ("index", "latents", "tokens", "videos")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------
# bank.json
# --------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    """``bank.json`` (``{}`` without one); a /1 manifest's build record becomes its history."""
    path = Path(folder) / BANK_MANIFEST
    if not path.is_file():
        return {}
    meta = read_json_mapping(path)
    if meta.get("format") not in FORMATS:
        raise UserError(f"{path}: not a {FORMAT} manifest")
    if "history" not in meta:
        build = meta.get("build")
        meta["history"] = [{"op": "build", **build}] if isinstance(build, dict) else []
        for added in (build or {}).get("added", []) if isinstance(build, dict) else []:
            meta["history"].append({"op": "add", **added})
    return meta


def history(folder: str | Path) -> list[dict]:
    """The bank's history, oldest first."""
    return list(read_manifest(folder).get("history") or [])


def describe(folder: Path, history: list[dict]) -> dict:
    """``bank.json`` of the parts present in ``folder``: counts, the embedding model, the
    geometry its latents are made at, the videos without memory, and ``history``."""
    from dit_mem.data.latents import LatentStore

    parts = [name for name in PARTS if (folder / name).is_dir()]
    manifest: dict[str, Any] = {"format": FORMAT, "parts": parts}
    index_manifest = folder / "index" / "manifest.json"
    if index_manifest.is_file():
        meta = json.loads(index_manifest.read_text())
        manifest["videos"] = meta.get("rows")
        manifest["embedding_model"] = meta.get("model")
        manifest["index"] = meta.get("factory")
    if (folder / "latents" / "manifest.json").is_file():
        store = LatentStore(folder / "latents")
        keys = ("num_frames", "height", "width", "resize", "latent_shape", "family")
        keys += ("vae_class", "vae")  # (the VAE's fingerprint: in latents/manifest.json)
        manifest["geometry"] = {k: store.manifest.get(k) for k in keys}
        manifest["without_memory"] = sorted(store.failed_ids())  # retrieval leaves them out
    manifest["history"] = history
    return manifest


def refresh_manifest(folder: str | Path) -> dict:
    """Rewrite ``bank.json``'s counts from the parts, its history unchanged (after a job that
    added latent files)."""
    folder = Path(folder)
    manifest = describe(folder, history(folder))
    write_json_atomic(folder / BANK_MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------
# Changes
# --------------------------------------------------------------------------------------
class Change:
    """One change of the bank folder ``bank``: staged parts and one history record, committed
    together or not at all (see the module docstring). Holds ``bank/.lock`` while open."""

    def __init__(self, bank: str | Path, op: str, lock: bool = True):
        self.bank, self.op, self._lock = Path(bank), op, lock
        self.tx = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        self.staged: dict[str, Path] = {}
        self.committed = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Change:
        if self._lock:
            self._stack.enter_context(folder_lock(self.bank, f"bank {self.op}"))
        else:
            self.bank.mkdir(parents=True, exist_ok=True)
        recover(self.bank)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self.committed:  # a failed or abandoned change leaves the bank as it was
                for path in self.staged.values():
                    _remove(path)
        finally:
            self._stack.close()

    def stage(self, part: str) -> Path:
        """The path where this change writes the new ``part`` (a folder, or a link for videos)."""
        if part not in PARTS:
            raise UserError(f"unknown bank part {part!r}; parts: {PARTS}")
        path = self.bank / f"{STAGING}{self.tx}-{part}"
        _remove(path)
        self.staged[part] = path
        return path

    def stage_file(self, relpath: str) -> Path:
        """The path where this change writes a new version of the file ``relpath`` of a part
        (e.g. ``latents/manifest.json``), put in place at the commit."""
        if relpath.split("/")[0] not in PARTS or ".." in relpath.split("/"):
            raise UserError(f"{relpath!r} is not a file of a bank part")
        path = self.bank / f"{STAGING}{self.tx}-file{len(self.staged)}"
        self.staged[relpath] = path
        return path

    def commit(self, record: dict | None = None) -> dict:
        """Put the staged parts in place and append ``record`` (``op``, ``tx``, ``when`` added)
        to the history, as one change; returns the new ``bank.json``."""
        entry = None
        if record is not None:
            entry = {"op": self.op, **record, "tx": self.tx, "when": now()}
        missing = [p for p, path in self.staged.items() if not os.path.lexists(path)]
        if missing:
            raise UserError(f"change {self.tx}: nothing was staged for {missing}")
        journal = {
            "tx": self.tx,
            "swaps": {part: path.name for part, path in self.staged.items()},
            "record": entry,
        }
        write_json_atomic(self.bank / JOURNAL, journal)  # the commit point
        self.committed = True
        return _replay(self.bank, journal)


def recover(bank: Path) -> None:
    """Finish a committed change that a killed process left halfway, then delete what an
    uncommitted one staged (the caller holds the lock)."""
    journal_path = bank / JOURNAL
    if journal_path.is_file():
        try:
            journal = read_json_mapping(journal_path)
        except ValueError:  # cannot be torn (written atomically): anything else is damage
            raise UserError(
                f"{journal_path} is damaged: the bank's last change cannot be finished; run "
                f"`dit-mem bank verify {bank}`"
            ) from None
        log.warning("%s: finishing change %s, interrupted after its commit", bank, journal["tx"])
        _replay(bank, journal)
    for leftover in bank.glob(f"{TMP_PREFIX}*"):  # staged parts, and temporary files beside them
        _remove(leftover)


def wait_for_changes(bank: Path, timeout: float = 30.0) -> None:
    """For readers: a change being committed right now is waited for; one a killed process left
    is finished (it takes the lock, which a killed process no longer holds)."""
    if not (bank / JOURNAL).is_file():
        return
    deadline = time.monotonic() + timeout
    while (bank / JOURNAL).is_file():
        try:
            with folder_lock(bank, "bank recovery"):
                recover(bank)
            return
        except ValueError as e:
            if "in use by another job" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _replay(bank: Path, journal: dict) -> dict:
    """Apply a committed journal; every step checks whether it is done already."""
    for part, staged_name in journal["swaps"].items():
        staged, final = bank / staged_name, bank / part
        old = bank / f"{staged_name}-old"
        if os.path.lexists(staged):
            if os.path.lexists(final) and not os.path.lexists(old):
                os.rename(final, old)
            if os.path.lexists(final):  # the old part was set aside once already: drop it
                _remove(final)
            os.rename(staged, final)
    manifest_history = history(bank)
    record = journal.get("record")
    if record is not None and not any(r.get("tx") == journal["tx"] for r in manifest_history):
        manifest_history.append(record)
    manifest = describe(bank, manifest_history)
    write_json_atomic(bank / BANK_MANIFEST, manifest)
    for staged_name in journal["swaps"].values():
        _remove(bank / f"{staged_name}-old")
    (bank / JOURNAL).unlink(missing_ok=True)
    return manifest


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def is_bank_file(name: str) -> bool:
    """Whether a name in a bank folder is the bank's own (not a stranger's file)."""
    own = (*PARTS, BANK_MANIFEST, LOCK_FILE, JOURNAL, "README.md", ".building-tokens")
    return name in own or name.startswith(TMP_PREFIX)


@contextlib.contextmanager
def locked(bank: str | Path, job: str) -> Iterator[None]:
    """Hold the bank's lock (the main process of a multi-process job; the others wait for it
    elsewhere) and finish or undo what an interrupted change left first."""
    from dit_mem.data.folder_job import process_state

    if not process_state().is_main_process:
        yield
        return
    with folder_lock(bank, job):
        recover(Path(bank))
        yield
