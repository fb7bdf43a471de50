"""Frames ↔ the latents a DiT denoises in, for any family's VAE.

Latents (:func:`encode_frames`) are the mode (= mean) of the VAE encoder's Gaussian, as the
paper's pipeline uses, normalised the way the family's pipeline normalises them (Wan:
``(z - latents_mean) / latents_std``; LTX-Video: ``(z - mean) · scaling_factor / std``;
HunyuanVideo-1.5: ``z · scaling_factor``), which is the space its DiT works in.
:func:`decode_latents` inverts it (the map the stock pipeline applies before decoding).
"""

from __future__ import annotations

import torch

from dit_mem.backbone.families import family_of_vae
from dit_mem.errors import UserError
from dit_mem.utils.device import execution_device


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    """``frames [B, 3, F, H, W]`` in [-1, 1] → normalised latents ``[B, C, T, h, w]`` (float32)."""
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise UserError(f"frames must be [B, 3, F, H, W], got {tuple(frames.shape)}")
    dtype = next(vae.parameters()).dtype
    z = vae.encode(frames.to(execution_device(vae), dtype)).latent_dist.mode().float()
    return family_of_vae(vae).latents.normalize(vae, z)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[B, C, T, H, W]`` → video ``[B, 3, F, H', W']`` in [-1, 1]."""
    family = family_of_vae(vae)
    dtype = next(vae.parameters()).dtype
    z = family.latents.denormalize(vae, latents.to(execution_device(vae), dtype))
    return family.latents.decode(vae, z).clamp(-1, 1)
