"""Small shared helpers: atomic file writes, logging."""

from dit_mem.utils.io import (
    atomic_dir,
    atomic_path,
    folder_lock,
    read_json_mapping,
    write_json_atomic,
    write_safetensors_atomic,
    write_text_atomic,
)
from dit_mem.utils.logging import get_logger

__all__ = [
    "atomic_dir",
    "folder_lock",
    "read_json_mapping",
    "atomic_path",
    "get_logger",
    "write_json_atomic",
    "write_safetensors_atomic",
    "write_text_atomic",
]
