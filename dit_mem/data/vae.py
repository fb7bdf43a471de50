"""Loading the Wan VAE and turning frames into the latents a Wan DiT consumes.

Accepted ``--base-model`` values (:func:`load_wan_vae`):

- a diffusers-format Wan folder (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``): ``<dir>/vae/config.json``
  + weights, loaded with ``AutoencoderKLWan.from_pretrained(dir, subfolder="vae")``;
- a diffusers VAE folder itself (``config.json`` + weights);
- the original release's ``Wan2.1_VAE.pth`` (or a folder holding it, e.g. ``Wan2.1-T2V-1.3B``):
  read with ``torch.load(weights_only=True)``, renamed with diffusers' own
  ``convert_wan_vae_to_diffusers`` and loaded **strictly** into an ``AutoencoderKLWan`` built
  from the config shipped in this package (``wan2.1_vae_config.json``), so no network is needed.

Latents (:func:`encode_frames`): the mode (= mean) of the encoder's Gaussian, as the paper's
pipeline uses, then normalised per channel, ``(z - latents_mean) / latents_std``: the space in
which a Wan DiT works (diffusers' ``WanPipeline`` applies the same map before decoding).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from dit_mem.utils import get_logger

log = get_logger(__name__)

WAN21_VAE_FILE = "Wan2.1_VAE.pth"
WAN21_VAE_CONFIG = "wan2.1_vae_config.json"


def wan21_vae_config() -> dict:
    """The Wan2.1 VAE's diffusers config (shipped with the package)."""
    text = resources.files("dit_mem.data").joinpath(WAN21_VAE_CONFIG).read_text()
    return json.loads(text)


def resolve_vae_source(path: str | Path) -> tuple[str, Path]:
    """``("diffusers", folder)`` or ``("original", file)`` for a ``--base-model`` path."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".pth", ".pt", ".ckpt"):
            return "original", path
        raise ValueError(f"{path}: expected a Wan2.1 VAE .pth file or a model folder")
    if not path.is_dir():
        raise FileNotFoundError(f"base model not found: {path}")
    if (path / "vae" / "config.json").is_file():
        return "diffusers", path / "vae"
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("_class_name") == "AutoencoderKLWan":
            return "diffusers", path
    if (path / WAN21_VAE_FILE).is_file():
        return "original", path / WAN21_VAE_FILE
    raise ValueError(
        f"{path}: no Wan VAE found; expected a diffusers folder with vae/config.json, a VAE "
        f"folder with config.json (AutoencoderKLWan), or {WAN21_VAE_FILE}"
    )


def load_wan_vae(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: dict | None = None,
):
    """Load an ``AutoencoderKLWan`` (eval mode, no grad) from any source listed above.

    ``config`` replaces the shipped Wan2.1 config for an original-layout ``.pth`` file
    (e.g. a smaller VAE in the same layout); diffusers folders carry their own config.
    """
    from diffusers import AutoencoderKLWan

    kind, src = resolve_vae_source(path)
    if kind == "diffusers":
        vae = AutoencoderKLWan.from_pretrained(src, torch_dtype=dtype, local_files_only=True)
    else:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ValueError(f"{src}: not a plain state dict of tensors")
        state = convert_wan_vae_to_diffusers(state)
        vae = AutoencoderKLWan.from_config(config if config is not None else wan21_vae_config())
        expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(
            k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k]
        )
        if missing or unexpected or wrong:
            raise ValueError(
                f"{src}: does not match the Wan2.1 VAE; missing keys {missing[:3]} "
                f"({len(missing)}), unexpected keys {unexpected[:3]} ({len(unexpected)}), "
                f"wrong shapes {wrong[:3]} ({len(wrong)})"
            )
        vae.load_state_dict(state, strict=True)
        if dtype != torch.float32:
            vae = vae.to(dtype=dtype)
    log.info("loaded Wan VAE (%s) from %s", kind, src)
    return vae.to(device).eval().requires_grad_(False)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` of the VAE's latent space, float32 ``[C]``."""
    cfg = vae.config
    if cfg.latents_mean is None or cfg.latents_std is None:
        raise ValueError("the VAE config has no latents_mean/latents_std to normalise with")
    return torch.tensor(cfg.latents_mean).float(), torch.tensor(cfg.latents_std).float()


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    """``frames [B, 3, F, H, W]`` in [-1, 1] → normalised latents ``[B, C, T, h, w]`` (float32)."""
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [B, 3, F, H, W], got {tuple(frames.shape)}")
    param = next(vae.parameters())
    z = vae.encode(frames.to(param.device, param.dtype)).latent_dist.mode().float()
    mean, std = (s.to(z.device).view(1, -1, 1, 1, 1) for s in latent_stats(vae))
    return (z - mean) / std
