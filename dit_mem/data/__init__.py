"""Memory-bank data: video tables, decoding, VAE latents and the token cache.

Readers other modules call:

- ``LatentStore(dir).load(ids)`` → latents ``[1, N, C, T, H, W]`` (bf16, normalised)
- ``TokenCache(dir).load(ids)`` → ``VideoTokens`` for ``MemoryEncoder.aggregate``
"""

from dit_mem.data.latents import LatentJobConfig, LatentStore, encode_latents
from dit_mem.data.table import read_video_table, source_id, video_id
from dit_mem.data.token_cache import TokenCache, build_token_cache, encoder_fingerprint
from dit_mem.data.vae import decode_latents, encode_frames
from dit_mem.data.video import VideoDecodeError, load_video, sample_frame_indices

__all__ = [
    "LatentJobConfig",
    "LatentStore",
    "TokenCache",
    "VideoDecodeError",
    "build_token_cache",
    "decode_latents",
    "encode_frames",
    "encode_latents",
    "encoder_fingerprint",
    "load_video",
    "read_video_table",
    "sample_frame_indices",
    "source_id",
    "video_id",
]
