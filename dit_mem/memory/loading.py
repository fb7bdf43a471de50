"""One way to get a memory encoder from what a user names: a loaded ``MemoryEncoder``, a
``save_pretrained`` folder, the release's ``DiT-Mem-1.3B.safetensors``, or a Hub id. Every front
door (``load_memory``, the bank's token cache, ``dit-mem token-cache``) calls it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dit_mem.errors import UserError

RELEASE_WEIGHT_NAME = "DiT-Mem-1.3B.safetensors"


def load_memory_encoder(
    encoder: Any,
    *,
    subfolder: str | None = None,
    weight_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
):
    """A ``MemoryEncoder`` from a loaded one, a ``save_pretrained`` folder, the release's
    ``DiT-Mem-1.3B.safetensors`` file, or a Hub id (a folder there, or ``weight_name`` for a
    release-layout file)."""
    from dit_mem.memory.encoder import MemoryEncoder
    from dit_mem.utils.hub import resolve_file, resolve_folder

    if isinstance(encoder, MemoryEncoder):
        return encoder
    if not isinstance(encoder, str | Path):
        raise UserError(
            f"memory encoder must be a MemoryEncoder, a path or a Hub id, got {type(encoder).__name__}"
        )
    hub = {
        "subfolder": subfolder,
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "token": token,
    }
    path = Path(encoder)
    if path.is_file():
        return MemoryEncoder.from_path(path)
    if weight_name is not None:
        return MemoryEncoder.from_path(resolve_file(encoder, weight_name, **hub))
    folder = resolve_folder(encoder, **hub)
    if (folder / "config.json").is_file():
        return MemoryEncoder.from_pretrained(folder)
    release = folder / RELEASE_WEIGHT_NAME
    if release.is_file():
        return MemoryEncoder.from_path(release)
    hint = _encoders_inside(folder)
    if hint:
        raise FileNotFoundError(f"{folder} is a training run or checkpoint folder: {hint}")
    raise FileNotFoundError(
        f"{folder}: no memory encoder here (expected config.json + weights from save_pretrained, "
        f"or {RELEASE_WEIGHT_NAME}; pass weight_name= for another file name)"
    )


def _encoders_inside(folder: Path) -> str | None:
    """Where the encoders of a ``dit-mem train`` run (or one checkpoint) folder are."""
    from dit_mem.checkpoint import latest_checkpoint

    found = []
    if (folder / "encoder" / "config.json").is_file():
        found.append(f"its encoder is {folder / 'encoder'}")
    ckpt = latest_checkpoint(folder) if (folder / "checkpoints").is_dir() else None
    if ckpt is not None:
        found.append(f"its latest checkpoint's encoder is {ckpt.encoder_dir} (step {ckpt.step})")
    return "; ".join(found) or None
