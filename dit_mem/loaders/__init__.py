"""Memory loaded into a pipeline (``MemoryLoaderMixin``), as diffusers' ``loaders`` do for adapters.

``MemoryLoaderMixin``: memory loaded into, scaled on and unloaded from a pipeline of any family.

Shaped like diffusers' ``IPAdapterMixin``::

    pipe.load_memory("checkpoint/DiT-Mem-1.3B.safetensors", bank="memory_bank/")   # or Hub ids
    pipe.set_memory_scale(1.0)
    pipe.unload_memory()                      # the stock pipeline again, bit for bit

``load_memory`` registers the encoder as the pipeline component ``memory_encoder`` (it moves
with ``pipe.to(...)`` and is saved by ``save_pretrained``), keeps the bank as ``memory_bank``,
and attaches memory to every expert (``transformer`` and, for Wan2.2 A14B, ``transformer_2``).

Base model folders (either layout) and their VAEs are :mod:`dit_mem.models`; loading one as a
pipeline is :func:`dit_mem.pipeline.load_base_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dit_mem.backbone.injection import attach_memory, check_width, detach_memory, experts
from dit_mem.memory.loading import RELEASE_WEIGHT_NAME, load_memory_encoder  # noqa: F401 (API)
from dit_mem.memory.tokens import check_memory_scale
from dit_mem.utils import get_logger

log = get_logger(__name__)


def memory_parts(
    pipe: Any,
    encoder: Any,
    bank: Any = None,
    *,
    subfolder: str | None = None,
    weight_name: str | None = None,
    revision: str | None = None,
    bank_subfolder: str | None = None,
    bank_revision: str | None = None,
    bank_repo_type: str = "dataset",
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    embedding_model: Any = None,
    trust_remote_code: str | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """``(encoder, bank)`` for ``pipe`` (any pipeline with a ``transformer``, modular ones too),
    loaded and checked against it: the encoder's width against every expert, the bank's family
    and VAE against the pipeline's; the encoder on the transformer's device, in its dtype (or
    ``torch_dtype``), frozen. See :meth:`MemoryLoaderMixin.load_memory` for the arguments."""
    from dit_mem.bank import MemoryBank

    models = experts(pipe)
    hub = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
    model = load_memory_encoder(
        encoder, subfolder=subfolder, weight_name=weight_name, revision=revision, **hub
    )
    for expert in models:
        check_width(model.config.dim, expert)
    if bank is not None and not isinstance(bank, MemoryBank):
        bank = MemoryBank.from_pretrained(
            bank,
            subfolder=bank_subfolder,
            revision=bank_revision,
            repo_type=bank_repo_type,
            embedding_model=embedding_model,
            trust_remote_code=trust_remote_code,
            **hub,
        )
    if bank is not None:  # a bank of another family's (or another VAE's) latents is noise
        from dit_mem.backbone import family_of

        bank.check_serves(family_of(models[0]).name, vae=getattr(pipe, "vae", None))
        if bank.tokens is not None and bank.latents is None:
            check_width(bank.tokens.manifest["dim"], models[0], "the bank's token width")
    dtype = torch_dtype or models[0].dtype
    device = models[0].device
    model = torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)
    log.info(
        "memory loaded: encoder %s (%s), bank %s",
        encoder if isinstance(encoder, str | Path) else type(encoder).__name__,
        dtype,
        "none" if bank is None else f"{len(bank)} videos",
    )
    return model, bank


class MemoryLoaderMixin:
    """``load_memory`` / ``set_memory_scale`` / ``unload_memory`` for a pipeline."""

    memory_bank = None
    _memory_scale: float = 1.0

    def load_memory(
        self, encoder: Any, bank: Any = None, *, scale: float = 1.0, route: str = "auto", **options
    ) -> None:
        """Load a memory encoder (and a bank to retrieve from), and attach memory to every expert.

        Args:
            encoder: a ``MemoryEncoder``, a ``save_pretrained`` folder, the release's
                ``DiT-Mem-1.3B.safetensors``, or a Hub id (options ``subfolder``,
                ``weight_name``, ``revision``).
            bank: a :class:`~dit_mem.bank.MemoryBank`, a bank folder or a Hub id (options
                ``bank_subfolder``, ``bank_revision``, ``bank_repo_type``); needed for
                ``memory="retrieve"``.
            scale: memory strength λ (log λ is added to the memory logits); see
                :meth:`set_memory_scale`.
            route: memory attention route (``"auto"``, ``"lse"``, ``"joint"``).
            options: where the encoder and the bank come from (above; ``cache_dir``,
                ``local_files_only``, ``token`` for both), ``embedding_model`` and
                ``trust_remote_code`` for the bank's caption index (its model folder if the
                recorded one is elsewhere; remote code only for the model named here),
                ``torch_dtype`` of the encoder (default: the transformer's); see
                :func:`memory_parts`.
        """
        scale = check_memory_scale(scale)  # checked before anything loads or changes
        model, bank = memory_parts(self, encoder, bank, **options)
        self.register_modules(memory_encoder=model)
        self.memory_bank = bank
        self._memory_scale = scale
        attach_memory(self, route=route)

    def set_memory_scale(self, scale: float) -> None:
        """Memory strength λ for the following calls: log λ is added to every memory logit
        (λ = 2 counts every memory token twice); 1 is the paper, 0 turns memory off."""
        self._memory_scale = check_memory_scale(scale)

    def unload_memory(self) -> None:
        """Detach memory from every expert and drop the encoder and the bank."""
        detach_memory(self)
        if getattr(self, "memory_encoder", None) is not None:
            self.memory_encoder = None
            self.register_to_config(memory_encoder=[None, None])
        self.memory_bank = None
        self._memory_scale = 1.0
