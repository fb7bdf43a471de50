"""The Wan backbone: memory injection into a stock diffusers transformer, and base-model loading."""

from dit_mem.backbone.attention import memory_attention
from dit_mem.backbone.injection import (
    MEMORY_STRENGTH_KEY,
    MEMORY_TOKENS_KEY,
    MemoryAttnProcessor,
    attach_memory,
    attach_memory_to_pipeline,
    detach_memory,
    detach_memory_from_pipeline,
    is_memory_attached,
    memory_attention_kwargs,
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

__all__ = [
    "COMPONENTS",
    "WanComponents",
    "detect_layout",
    "load_wan_components",
    "load_wan_t5",
    "transformers_t5_to_wan",
    "wan_t5_to_transformers",
    "MEMORY_STRENGTH_KEY",
    "MEMORY_TOKENS_KEY",
    "MemoryAttnProcessor",
    "attach_memory",
    "attach_memory_to_pipeline",
    "detach_memory",
    "detach_memory_from_pipeline",
    "is_memory_attached",
    "memory_attention",
    "memory_attention_kwargs",
]
