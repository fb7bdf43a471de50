"""The memory encoder and the memory-token types."""

from dit_mem.memory.encoder import (
    PRESET_FAMILY,
    PRESETS,
    MemoryEncoder,
    cnn_output_shape,
    feature_dim,
    frequency_gains,
    get_preset,
    pooling_groups,
    preset_for,
)
from dit_mem.memory.tokens import MemoryTokens, VideoTokens

__all__ = [
    "PRESET_FAMILY",
    "PRESETS",
    "MemoryEncoder",
    "MemoryTokens",
    "VideoTokens",
    "cnn_output_shape",
    "feature_dim",
    "frequency_gains",
    "get_preset",
    "pooling_groups",
    "preset_for",
]
