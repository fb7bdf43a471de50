"""Where memory goes: injection into stock diffusers video DiTs, one module per family."""

from dit_mem.backbone.attention import ROUTES, memory_attention
from dit_mem.backbone.families import family_of
from dit_mem.backbone.injection import (
    MEMORY_STRENGTH_KEY,
    MEMORY_TOKENS_KEY,
    NEGATIVE_MEMORY_TOKENS_KEY,
    MemoryAttachment,
    attach_memory,
    detach_memory,
    get_attachment,
)
from dit_mem.backbone.reference import PaperFormMemory

__all__ = [
    "MEMORY_STRENGTH_KEY",
    "MEMORY_TOKENS_KEY",
    "NEGATIVE_MEMORY_TOKENS_KEY",
    "ROUTES",
    "MemoryAttachment",
    "PaperFormMemory",
    "attach_memory",
    "detach_memory",
    "family_of",
    "get_attachment",
    "memory_attention",
]
