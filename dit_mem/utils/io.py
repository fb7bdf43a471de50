"""Atomic file writes: every file a long job writes appears whole or not at all.

A writer gets a temporary path in the destination's folder (same file system), writes
there, and the temporary file is renamed over the destination only if the writer finished
without an exception. A killed process leaves at most a ``.tmp-*`` file, never a partial
destination; readers and resumable jobs only look at final names.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dit_mem.errors import UserError

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"


def _new_file(folder: Path, prefix: str) -> Path:
    """A new empty file ``folder/<prefix><random>``, mode 0o666 less the umask (as ``open`` would
    make it; ``tempfile.mkstemp`` makes 0o600, which a renamed file would keep)."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(6)}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name in {folder}")


def honour_umask(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` the mode a new file gets here (0o666 less the umask):
    libraries that write 0o600 files (safetensors' ``save_file``) would leave a folder other
    users cannot read."""
    folder = Path(folder)
    probe = _new_file(folder, f"{TMP_PREFIX}mode.")
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success. The file gets
    the mode any new file gets here (the umask applies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(path.parent, f"{TMP_PREFIX}{path.name}.")
    mode = tmp_path.stat().st_mode & 0o777
    try:
        yield tmp_path
        if tmp_path.stat().st_mode & 0o777 != mode:  # a writer that made its own file
            os.chmod(tmp_path, mode)  # (safetensors' save_file makes 0o600)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a libc without renameat2
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system says no
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; put it in place of ``path`` on success.

    An existing ``path`` is swapped with the new folder in one step (``renameat2`` exchange), so
    a reader, or a process killed at any moment, sees the old folder or the new one, whole; the
    old one is deleted afterwards. Where the exchange is unsupported the old folder is moved
    aside first. On an exception the temporary folder is removed.
    """
    import shutil

    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    old = path.with_name(f"{TMP_PREFIX}{path.name}-old")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not path.exists():  # a move-aside fallback killed halfway: put it back
        old.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        honour_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        tmp.rename(path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)


def read_json_mapping(path: str | os.PathLike) -> dict:
    """A JSON file that must hold an object; ``ValueError`` naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, job: str) -> Iterator[None]:
    """Hold ``folder/.lock`` for the block; a second job on the same folder is refused.

    ``fcntl.flock`` (released by the kernel when the process dies, so a killed job never leaves
    a stale lock behind); the holder's pid and job are written in the file for the message.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"{folder} is in use by another job ({holder}); wait for it to finish, or use "
                "another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{job}, pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def changed_settings(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    keys: Any = None,
    ignore: Any = (),
    keep_whole: Any = (),
) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between a folder's record and this run: ``{key: (old, new)}``.

    Nested mappings compare key by key (dotted keys), except those named in ``keep_whole``;
    ``keys``: compare only these; ``ignore``: never these.
    """

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping) and k not in keep_whole:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(old or {}), flat(new or {})
    names = sorted(set(a) | set(b)) if keys is None else list(keys)
    return {k: (a.get(k), b.get(k)) for k in names if k not in ignore and a.get(k) != b.get(k)}


def refuse_other_settings(
    where: Any, what: str, changes: Mapping[str, tuple[Any, Any]], fix: str
) -> None:
    """``ValueError`` ("``where`` already holds ``what`` made with other settings") if any."""
    if changes:
        details = "; ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changes.items())
        raise UserError(
            f"{where} already holds {what} made with other settings ({', '.join(changes)} "
            f"differ: {details}); {fix}"
        )


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_safetensors_atomic(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Save a dict of tensors with ``safetensors.torch.save_file`` atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata) if metadata else None,
        )
