"""Local paths or Hugging Face Hub ids, resolved to local files the way diffusers does.

A source that exists on disk is used as it is. Anything else of the form ``org/name`` is a Hub
repository, fetched (or found in the local cache, ``HF_HOME`` / ``cache_dir``; with
``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` nothing is downloaded) with
``huggingface_hub``. Errors name the source and what was looked for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(source: str | Path) -> bool:
    """Whether ``source`` reads as a Hub repository id (``org/name``) rather than a path."""
    return isinstance(source, str) and bool(_REPO_ID.match(source)) and ".." not in source


def _hub_error(source: str, what: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"{source}: not a local path, and {what} could not be found on the Hub or in the local "
        f"cache ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else err})"
    )


def _hub_kwargs(
    source, repo_type="model", revision=None, token=None, cache_dir=None, local_files_only=None
) -> dict[str, Any]:
    """``huggingface_hub`` download options for ``source``, which must read as a Hub id (a
    path that does not exist and is no repository id is a ``FileNotFoundError``)."""
    if not is_repo_id(str(source)):
        raise FileNotFoundError(f"{source}: no such file or folder (and not a Hub id 'org/name')")
    kwargs: dict[str, Any] = {"repo_type": repo_type, "revision": revision, "token": token}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    return kwargs


def resolve_folder(
    source: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    repo_type: str = "model",
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local folder for ``source`` (a folder, or a Hub repository id), ``subfolder`` applied."""
    path = Path(source)
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        return folder
    kwargs = _hub_kwargs(source, repo_type, revision, token, cache_dir, local_files_only)
    from huggingface_hub import snapshot_download

    if subfolder:
        kwargs["allow_patterns"] = [f"{subfolder.strip('/')}/**"]
    try:
        root = Path(snapshot_download(str(source), **kwargs))
    except Exception as err:  # huggingface_hub raises many kinds (offline, 404, auth, ...)
        raise _hub_error(str(source), f"{repo_type} repository {source!r}", err) from err
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{source}: the Hub repository has no folder {subfolder!r}")
    return folder


def resolve_file(source: str | Path, filename: str, **options: Any) -> Path:
    """A local file ``filename`` of ``source`` (a folder or a Hub repository id); ``options``
    as for :func:`resolve_folder` (``subfolder``, ``revision``, ``repo_type``, ``cache_dir``,
    ``local_files_only``, ``token``)."""
    subfolder = options.pop("subfolder", None)
    path = Path(source)
    if path.exists():
        file = (path / subfolder if subfolder else path) / filename
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found")
        return file
    hub = {"repo_type": "model", **options}
    kwargs = _hub_kwargs(source, **hub)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), filename, subfolder=subfolder, **kwargs))
    except Exception as err:
        raise _hub_error(str(source), f"{filename!r}", err) from err
