"""The DiT families memory attaches to, one module each (:class:`~.base.Family`).

    family = family_of(pipe.transformer)        # picked from the model's class
    family.injection.blocks(transformer)        # what the attention sees
    family.latents.normalize(vae, z)            # its VAE's latent space
    family.training.predict(...), family.generation.fps

Adding a family is one module whose ``FAMILY`` holds its parts (an :class:`~.base.Injection`
with its memory processor, a :class:`~.base.LatentSpace`, a :class:`~.base.Training`), listed
in :data:`FAMILY_MODULES`.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from dit_mem.backbone.families.base import Family, names
from dit_mem.errors import UserError

FAMILY_MODULES: tuple[str, ...] = ("wan", "ltx", "hunyuan15")


@cache
def families() -> tuple[Family, ...]:
    """Every family, in :data:`FAMILY_MODULES` order."""
    return tuple(
        importlib.import_module(f"{__name__}.{module}").FAMILY for module in FAMILY_MODULES
    )


def family_of(model: Any) -> Family:
    """The family of a diffusers transformer; ``ValueError`` naming the supported classes."""
    for family in families():
        if family.matches(model):
            return family
    supported = names([c for f in families() for c in f.injection.transformer_classes])
    raise UserError(
        f"memory attaches to a diffusers {supported} (or a pipeline holding one), "
        f"got {type(model).__name__}"
    )


def family_of_class_name(name: str | None, where: Any = None) -> Family:
    """The family of a transformer class named in a config (``ValueError`` naming ``where``)."""
    for family in families():
        if name in {c.__name__ for c in family.injection.transformer_classes}:
            return family
    supported = names([c for f in families() for c in f.injection.transformer_classes])
    raise UserError(f"{where or 'the model'}: a {name}; memory attaches to a diffusers {supported}")


def family_of_vae(vae: Any) -> Family:
    """The family whose latent space a VAE encodes into."""
    for family in families():
        if isinstance(vae, family.latents.vae_classes):
            return family
    supported = names([c for f in families() for c in f.latents.vae_classes])
    raise UserError(f"no DiT family uses a {type(vae).__name__} (known VAEs: {supported})")


__all__ = [
    "FAMILY_MODULES",
    "Family",
    "families",
    "family_of",
    "family_of_class_name",
    "family_of_vae",
]
