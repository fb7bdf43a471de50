"""The memory encoder and the memory-token types."""

from dit_mem.memory.encoder import (
    PRESETS,
    MemoryEncoder,
    cnn_output_shape,
    feature_dim,
    frequency_gains,
    get_preset,
    pooling_groups,
)
from dit_mem.memory.tokens import MemoryTokens, VideoTokens

__all__ = [
    "PRESETS",
    "MemoryEncoder",
    "MemoryTokens",
    "VideoTokens",
    "cnn_output_shape",
    "feature_dim",
    "frequency_gains",
    "get_preset",
    "pooling_groups",
]
