"""DiT-Mem: plug-and-play memory for video diffusion transformers.

Public names are imported lazily so that ``import dit_mem`` (and ``dit-mem --help``) does not
pull in torch; ``from dit_mem import MemoryEncoder`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "DiTMemHunyuanVideo15Pipeline": "dit_mem.pipeline",
    "DiTMemLTXPipeline": "dit_mem.pipeline",
    "DiTMemPipeline": "dit_mem.pipeline",
    "DiTMemPipelineOutput": "dit_mem.pipeline",
    "DiTMemWanImageToVideoPipeline": "dit_mem.pipeline",
    "DiTMemWanVACEPipeline": "dit_mem.pipeline",
    "MemoryBank": "dit_mem.bank",
    "MemoryEncoder": "dit_mem.memory",
    "MemoryTokens": "dit_mem.memory",
    "PaperEulerScheduler": "dit_mem.schedulers",
    "attach_memory": "dit_mem.backbone",
    "detach_memory": "dit_mem.backbone",
    "family_of": "dit_mem.backbone",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dit_mem' has no attribute {name!r}")
