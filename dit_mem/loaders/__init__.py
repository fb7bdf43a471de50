"""How models are loaded: memory into a pipeline (``MemoryLoaderMixin``), base models and VAEs.

``MemoryLoaderMixin``: memory loaded into, scaled on and unloaded from a pipeline of any family.

Shaped like diffusers' ``IPAdapterMixin``::

    pipe.load_memory("checkpoint/DiT-Mem-1.3B.safetensors", bank="memory_bank/")   # or Hub ids
    pipe.set_memory_scale(1.0)
    pipe.unload_memory()                      # the stock pipeline again, bit for bit

``load_memory`` registers the encoder as the pipeline component ``memory_encoder`` (it moves
with ``pipe.to(...)`` and is saved by ``save_pretrained``), keeps the bank as ``memory_bank``,
and attaches memory to every expert (``transformer`` and, for Wan2.2 A14B, ``transformer_2``).

Base models: :mod:`dit_mem.loaders.base_model` (one way to read and load a base model folder of
either layout, and its VAE); :mod:`dit_mem.loaders.wan` (the original Wan2.1 release layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dit_mem.backbone.injection import attach_memory, check_width, detach_memory, experts
from dit_mem.memory.tokens import check_memory_scale
from dit_mem.utils import get_logger

log = get_logger(__name__)

RELEASE_WEIGHT_NAME = "DiT-Mem-1.3B.safetensors"


def load_memory_encoder(
    encoder: Any,
    *,
    subfolder: str | None = None,
    weight_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
):
    """A ``MemoryEncoder`` from a loaded one, a ``save_pretrained`` folder, the release's
    ``DiT-Mem-1.3B.safetensors`` file, or a Hub id (a folder there, or ``weight_name`` for a
    release-layout file)."""
    from dit_mem.memory import MemoryEncoder
    from dit_mem.utils.hub import resolve_file, resolve_folder

    if isinstance(encoder, MemoryEncoder):
        return encoder
    if not isinstance(encoder, str | Path):
        raise ValueError(
            f"memory encoder must be a MemoryEncoder, a path or a Hub id, got {type(encoder).__name__}"
        )
    hub = {
        "subfolder": subfolder,
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "token": token,
    }
    path = Path(encoder)
    if path.is_file():
        return MemoryEncoder.from_path(path)
    if weight_name is not None:
        return MemoryEncoder.from_path(resolve_file(encoder, weight_name, **hub))
    folder = resolve_folder(encoder, **hub)
    if (folder / "config.json").is_file():
        return MemoryEncoder.from_pretrained(folder)
    release = folder / RELEASE_WEIGHT_NAME
    if release.is_file():
        return MemoryEncoder.from_path(release)
    hint = _encoders_inside(folder)
    if hint:
        raise FileNotFoundError(f"{folder} is a training run or checkpoint folder: {hint}")
    raise FileNotFoundError(
        f"{folder}: no memory encoder here (expected config.json + weights from save_pretrained, "
        f"or {RELEASE_WEIGHT_NAME}; pass weight_name= for another file name)"
    )


def _encoders_inside(folder: Path) -> str | None:
    """Where the encoders of a ``dit-mem train`` run (or one checkpoint) folder are."""
    from dit_mem.training.checkpoint import latest_checkpoint

    found = []
    if (folder / "encoder" / "config.json").is_file():
        found.append(f"its encoder is {folder / 'encoder'}")
    ckpt = latest_checkpoint(folder) if (folder / "checkpoints").is_dir() else None
    if ckpt is not None:
        found.append(f"its latest checkpoint's encoder is {ckpt.encoder_dir} (step {ckpt.step})")
    return "; ".join(found) or None


class MemoryLoaderMixin:
    """``load_memory`` / ``set_memory_scale`` / ``unload_memory`` for a pipeline."""

    memory_bank = None
    _memory_scale: float = 1.0

    def load_memory(
        self,
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
        scale: float = 1.0,
        route: str = "auto",
        torch_dtype: torch.dtype | None = None,
    ) -> None:
        """Load a memory encoder (and a bank to retrieve from), and attach memory to every expert.

        Args:
            encoder: a ``MemoryEncoder``, a ``save_pretrained`` folder, the release's
                ``DiT-Mem-1.3B.safetensors``, or a Hub id (``subfolder``, ``weight_name``,
                ``revision``).
            bank: a :class:`~dit_mem.bank.MemoryBank`, a bank folder or a Hub id
                (``bank_subfolder``, ``bank_revision``, ``bank_repo_type``); needed for
                ``memory="retrieve"``.
            embedding_model, trust_remote_code: for the bank's caption index (its model folder if
                the recorded one is elsewhere; remote code only for the model named here).
            scale: memory strength λ (log λ is added to the memory logits); see
                :meth:`set_memory_scale`.
            route: memory attention route (``"auto"``, ``"lse"``, ``"joint"``).
            torch_dtype: dtype of the encoder (default: the transformer's).
        """
        from dit_mem.bank import MemoryBank

        models = experts(self)
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

            bank.check_serves(family_of(models[0]).name, vae=getattr(self, "vae", None))
            if bank.tokens is not None and bank.latents is None:
                check_width(bank.tokens.manifest["dim"], models[0], "the bank's token width")
        self.set_memory_scale(scale)  # checked before anything changes
        dtype = torch_dtype or models[0].dtype
        device = models[0].device
        model = torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)
        self.register_modules(memory_encoder=model)
        self.memory_bank = bank
        attach_memory(self, route=route)
        log.info(
            "memory loaded: encoder %s (%s), bank %s",
            encoder if isinstance(encoder, str | Path) else type(encoder).__name__,
            dtype,
            "none" if bank is None else f"{len(bank)} videos",
        )

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
