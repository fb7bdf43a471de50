"""The Wan backbone: memory injection into a stock diffusers transformer, and base-model loading."""

from dit_mem.backbone.attention import ROUTES, memory_attention
from dit_mem.backbone.injection import (
    MEMORY_STRENGTH_KEY,
    MEMORY_TOKENS_KEY,
    MemoryAttachment,
    MemoryAttnProcessor,
    WanAdapter,
    attach_memory,
    attach_memory_to_pipeline,
    detach_memory,
    detach_memory_from_pipeline,
    get_attachment,
    is_memory_attached,
    memory_attention_kwargs,
    track_cfg_branches,
)
from dit_mem.backbone.loading import (
    COMPONENTS,
    WanComponents,
    detect_layout,
    load_wan_components,
    load_wan_t5,
    transformers_t5_to_wan,
    wan_t5_to_transformers,
)
from dit_mem.backbone.reference import PaperFormMemory

__all__ = [
    "COMPONENTS",
    "MEMORY_STRENGTH_KEY",
    "MEMORY_TOKENS_KEY",
    "ROUTES",
    "MemoryAttachment",
    "MemoryAttnProcessor",
    "PaperFormMemory",
    "WanAdapter",
    "WanComponents",
    "attach_memory",
    "attach_memory_to_pipeline",
    "detach_memory",
    "detach_memory_from_pipeline",
    "detect_layout",
    "get_attachment",
    "is_memory_attached",
    "load_wan_components",
    "load_wan_t5",
    "memory_attention",
    "memory_attention_kwargs",
    "track_cfg_branches",
    "transformers_t5_to_wan",
    "wan_t5_to_transformers",
]
