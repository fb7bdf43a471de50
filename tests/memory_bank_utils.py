"""Helpers for the memory-bank tests: synthetic mp4s and a tiny Wan VAE in both layouts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

TINY_VAE = {"base_dim": 2, "z_dim": 16}  # Wan2.1 layout (dim_mult, num_res_blocks) at width 2


def write_mp4(
    path: Path, num_frames: int, width: int = 64, height: int = 48, seed: int = 0
) -> Path:
    """A small H.264 clip with moving colour patterns (written with imageio-ffmpeg)."""
    import imageio_ffmpeg

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=8, macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(num_frames):
        frame = np.empty((height, width, 3), np.uint8)
        for c in range(3):
            frame[..., c] = (base[c] + 4 * xx + 3 * yy * (c + 1) + 9 * i) % 256
        writer.send(frame.tobytes())
    writer.close()
    return path


def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY_VAE).eval()


def _residual(rest: str) -> str:
    for new, old in (
        ("norm1.gamma", "residual.0.gamma"),
        ("conv1.", "residual.2."),
        ("norm2.gamma", "residual.3.gamma"),
        ("conv2.", "residual.6."),
        ("conv_shortcut.", "shortcut."),
    ):
        if rest.startswith(new):
            return old + rest[len(new) :]
    return rest


_RULES = [
    (
        r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)",
        lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_residual(m[3])}",
    ),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
    (r"(encoder|decoder)\.norm_out\.(.*)", lambda m: f"{m[1]}.head.0.{m[2]}"),
    (r"(encoder|decoder)\.conv_out\.(.*)", lambda m: f"{m[1]}.head.2.{m[2]}"),
    (r"(encoder|decoder)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}"),
    (r"quant_conv\.(.*)", lambda m: f"conv1.{m[1]}"),
    (r"post_quant_conv\.(.*)", lambda m: f"conv2.{m[1]}"),
    (
        r"encoder\.down_blocks\.(\d+)\.(.*)",
        lambda m: f"encoder.downsamples.{m[1]}.{_residual(m[2])}",
    ),
    (
        r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
        lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_residual(m[3])}",
    ),
    (
        r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
        lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}",
    ),
]


def to_original_wan_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKLWan`` keys → the original Wan2.1 release's keys (for tests)."""
    out = {}
    for key, value in state.items():
        for pattern, fn in _RULES:
            m = re.fullmatch(pattern, key)
            if m:
                out[fn(m)] = value
                break
        else:
            out[key] = value
    return out
