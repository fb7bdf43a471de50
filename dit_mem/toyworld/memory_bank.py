"""Stage 3: the toy world's memory bank, in the formats the real jobs write.

Clips of **every** colour (the held-out one included: the bank is where the concept lives)
are rendered, encoded by the stage-1 VAE into a ``LatentStore`` folder (one
``<id>.safetensors`` per clip + the same ``manifest.json`` that ``dit-mem encode-latents``
writes), listed in ``bank.csv`` (``video``, ``caption``) and indexed by ``build_index`` with
the bundled all-MiniLM-L6-v2: exactly what ``dit-mem train`` and ``dit-mem generate`` read.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dit_mem.toyworld.world import FRAMES, SIZE, Clip, clips, concepts
from dit_mem.utils import atomic_path, get_logger

log = get_logger(__name__)


@dataclass
class BankStageConfig:
    clips_per_concept: int = 8
    seed: int = 0


def bank_clips(cfg: BankStageConfig) -> list[Clip]:
    return clips(concepts(), cfg.clips_per_concept, seed=cfg.seed + 2)


def build_bank(out: Path, vae_dir: Path, cfg: BankStageConfig) -> Path:
    """Write ``out/bank/{bank.csv, latent/, index/}``; each part skipped when complete."""
    import torch
    from diffusers import AutoencoderKLWan

    from dit_mem.bank.journal import Change, history, refresh_manifest
    from dit_mem.data.latents import LatentJobConfig, latent_manifest, write_latent
    from dit_mem.retrieval import build_index
    from dit_mem.toyworld.base import encode_clips
    from dit_mem.utils import write_json_atomic

    bank = out / "bank"
    bank.mkdir(parents=True, exist_ok=True)
    items = bank_clips(cfg)
    csv_path = bank / "bank.csv"
    if not csv_path.is_file():
        with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["video", "caption"])
            writer.writerows([c.id, c.caption] for c in items)

    latent_dir = bank / "latents"
    if not (latent_dir / "manifest.json").is_file():
        t = time.time()
        vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()
        job = LatentJobConfig(
            csv=csv_path,
            out=latent_dir,
            base_model=vae_dir,
            num_frames=FRAMES,
            height=SIZE,
            width=SIZE,
        )
        latent_dir.mkdir(parents=True, exist_ok=True)
        todo = [c for c in items if not (latent_dir / f"{c.id}.safetensors").is_file()]
        for i in range(0, len(todo), 64):
            chunk = todo[i : i + 64]
            z = encode_clips(vae, chunk).to(torch.bfloat16)
            for c, zi in zip(chunk, z, strict=True):
                write_latent(latent_dir / f"{c.id}.safetensors", zi, c.id)
        manifest = latent_manifest(job, vae)
        manifest["vae"] = "toy-world VAE (stage 1)"
        manifest["source"] = "rendered toy-world clips (dit_mem.toyworld.world.render)"
        write_json_atomic(latent_dir / "manifest.json", manifest)  # last: marks it complete
        log.info("bank: %d latents in %.1f s", len(items), time.time() - t)

    index_dir = bank / "index"
    if not (index_dir / "manifest.json").is_file():
        shutil.rmtree(index_dir, ignore_errors=True)
        build_index(csv_path, index_dir)
    if history(bank):
        refresh_manifest(bank)
    else:  # the parts above, built in place stage by stage, recorded as the bank's build
        with Change(bank, "build") as change:
            change.commit({"memory": "eager", "source": "toy world stage 3 (rendered clips)"})
    return bank
