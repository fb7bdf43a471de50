"""Frames ↔ the latents a Wan DiT works in: normalisation and de-normalisation in one place.

Latents (:func:`encode_frames`) are the mode (= mean) of the VAE encoder's Gaussian, as the
paper's pipeline uses, normalised per channel, ``(z - latents_mean) / latents_std``: the space in
which a Wan DiT works (the original Wan VAE's ``encode`` returns the same). :func:`decode_latents`
inverts it (the map stock ``WanPipeline`` applies before decoding). The VAE itself is loaded by
:func:`dit_mem.backbone.loading.load_wan_vae` (re-exported here).
"""

from __future__ import annotations

import torch

from dit_mem.backbone.loading import load_wan_vae

__all__ = ["decode_latents", "encode_frames", "latent_stats", "load_wan_vae"]


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` of the VAE's latent space, float32 ``[C]``."""
    cfg = vae.config
    if cfg.latents_mean is None or cfg.latents_std is None:
        raise ValueError("the VAE config has no latents_mean/latents_std to normalise with")
    return torch.tensor(cfg.latents_mean).float(), torch.tensor(cfg.latents_std).float()


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = latent_stats(vae)
    return tuple(s.to(like.device, like.dtype).view(1, -1, 1, 1, 1) for s in (mean, std))


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    """``frames [B, 3, F, H, W]`` in [-1, 1] → normalised latents ``[B, C, T, h, w]`` (float32)."""
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [B, 3, F, H, W], got {tuple(frames.shape)}")
    param = next(vae.parameters())
    z = vae.encode(frames.to(param.device, param.dtype)).latent_dist.mode().float()
    mean, std = _stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[B, C, T, H, W]`` → video ``[B, 3, F, H', W']`` in [-1, 1]."""
    param = next(vae.parameters())
    z = latents.to(param.device, param.dtype)
    mean, std = _stats(vae, z)
    return vae.decode(z * std + mean, return_dict=False)[0].clamp(-1, 1)
