"""Base-model parts of any supported family, from whatever the user points at.

:func:`family_of_folder` and :func:`load_transformer` (training's frozen DiT) read a diffusers
model folder by the classes its configs name (the original Wan2.1 layout: Wan).
:func:`load_vae` (the latent job, the bank) takes:

* a diffusers model folder (``vae/config.json`` + weights) or a VAE folder itself
  (``config.json`` + weights): the class named by ``_class_name`` among the families' VAEs
  (``AutoencoderKLWan``, ``AutoencoderKLLTXVideo``, ``AutoencoderKLHunyuanVideo15``);
* the original Wan2.1 release folder holding ``Wan2.1_VAE.pth``, or that file itself: read with
  ``torch.load(weights_only=True)`` and loaded strictly into the shipped Wan2.1 config
  (``config`` replaces it, e.g. for a smaller VAE in the same layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dit_mem.loaders.wan import ORIGINAL_VAE, load_original_vae
from dit_mem.utils import get_logger

logger = get_logger(__name__)


def transformer_classes() -> dict[str, tuple[type, Any]]:
    """The families' transformer classes by name, with their family."""
    from dit_mem.backbone.families import families

    return {c.__name__: (c, f) for f in families() for c in f.transformer_classes}


def _transformer_config(base: Path) -> Path | None:
    path = Path(base) / "transformer" / "config.json"
    return path if path.is_file() else None


def family_of_folder(base: str | Path):
    """The DiT family of a base model folder (``ValueError`` naming what it found)."""
    from dit_mem.loaders.wan import detect_layout

    config = _transformer_config(base)
    if config is None:
        detect_layout(base, ("transformer",))  # the original Wan2.1 layout, or an error
        from dit_mem.backbone.families.wan import FAMILY

        return FAMILY
    name = json.loads(config.read_text()).get("_class_name")
    if name not in transformer_classes():
        raise ValueError(
            f"{config}: a {name}; memory attaches to {', '.join(transformer_classes())}"
        )
    return transformer_classes()[name][1]


def load_transformer(base: str | Path, dtype: torch.dtype = torch.bfloat16):
    """The base model's transformer (eval, frozen), from a diffusers folder of any family or the
    original Wan2.1 layout."""
    config = _transformer_config(base)
    if config is None:
        from dit_mem.loaders.wan import load_wan_components

        model = load_wan_components(
            base, torch_dtype=dtype, components=("transformer",)
        ).transformer
    else:
        family_of_folder(base)  # names an unsupported class
        cls = transformer_classes()[json.loads(config.read_text())["_class_name"]][0]
        model = cls.from_pretrained(base, subfolder="transformer", dtype=dtype)
    return model.eval().requires_grad_(False)


def vae_classes() -> dict[str, type]:
    """The families' VAE classes by name."""
    from dit_mem.backbone.families import families

    return {c.__name__: c for f in families() for c in f.vae_classes}


def _class_of(config: Path) -> type | None:
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
    return vae_classes().get(name)


def load_vae(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
):
    """The VAE at ``source`` (see the module docstring), eval and frozen."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in (".pth", ".pt", ".ckpt"):
            raise ValueError(f"{path}: expected a Wan2.1 VAE .pth file or a model folder")
        kind, vae = "original Wan2.1", load_original_vae(path, config, dtype)
    elif not path.is_dir():
        raise FileNotFoundError(f"base model not found: {path}")
    elif (path / "vae" / "config.json").is_file() and _class_of(path / "vae" / "config.json"):
        cls = _class_of(path / "vae" / "config.json")
        kind, vae = cls.__name__, cls.from_pretrained(path, subfolder="vae", dtype=dtype)
    elif (path / "config.json").is_file() and _class_of(path / "config.json"):
        cls = _class_of(path / "config.json")
        kind, vae = cls.__name__, cls.from_pretrained(path, dtype=dtype)
    elif (path / ORIGINAL_VAE).is_file():
        kind, vae = "original Wan2.1", load_original_vae(path / ORIGINAL_VAE, config, dtype)
    else:
        raise ValueError(
            f"{path}: no VAE found; expected a diffusers folder with vae/config.json or a VAE "
            f"folder with config.json ({', '.join(vae_classes())}), or {ORIGINAL_VAE}"
        )
    logger.info("loaded VAE (%s) from %s", kind, path)
    return vae.to(device).eval().requires_grad_(False)
