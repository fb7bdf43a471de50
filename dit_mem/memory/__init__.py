"""The memory encoder and the memory-token types."""

from dit_mem.memory.encoder import (
    PRESETS,
    MemoryEncoder,
    MemoryEncoderConfig,
    cnn_output_shape,
    frequency_gains,
    get_preset,
    pooling_groups,
)
from dit_mem.memory.tokens import MemoryTokens, VideoTokens

__all__ = [
    "PRESETS",
    "MemoryEncoder",
    "MemoryEncoderConfig",
    "MemoryTokens",
    "VideoTokens",
    "cnn_output_shape",
    "frequency_gains",
    "get_preset",
    "pooling_groups",
]
