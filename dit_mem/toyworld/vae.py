"""Stage 1: a tiny ``AutoencoderKLWan`` for the toy world (9×32×32 → 8×3×8×8).

Trained on freshly rendered clips of every colour (a VAE is generic; only the DiT has a
held-out concept). Plain MSE spends its capacity on the dark background and gets colours
wrong, so object pixels weigh ``object_weight``× in the loss. After ``steps`` joint steps the
encoder is frozen and the decoder alone is fine-tuned for ``decoder_steps`` more; last, the
latents' per-channel mean and std are measured and stored as the VAE's ``latents_mean`` /
``latents_std``, so that normalised latents are what the DiT is trained on, as in Wan.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit_mem.toyworld.state import load_state, save_state
from dit_mem.toyworld.world import Clip, concepts, render
from dit_mem.utils import atomic_dir, get_logger

log = get_logger(__name__)


@dataclass
class VAEStageConfig:
    steps: int = 5000  # joint encoder + decoder steps
    decoder_steps: int = 2000  # decoder-only fine-tuning steps
    batch_size: int = 8
    lr: float = 1e-3
    decoder_lr: float = 5e-4
    min_lr: float | None = 2e-5  # cosine decay to this within each phase (None: constant)
    object_weight: float = 5.0
    save_every: int = 250
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) optimizer step ``step``: per phase, constant or cosine."""
        joint = step < self.steps
        peak = self.lr if joint else self.decoder_lr
        if self.min_lr is None:
            return peak
        done, length = (step, self.steps) if joint else (step - self.steps, self.decoder_steps)
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1 + math.cos(math.pi * done / length))


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=8,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_spatial=4,
        latents_mean=[0.0] * 8,
        latents_std=[1.0] * 8,
    )


def to_tensor(videos: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` clips → float ``[B, 3, F, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(np.stack(videos)).float().div(127.5).sub(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def random_batch(rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random clips and its loss weights (object pixels > background)."""
    all_concepts = concepts()
    picks = rng.integers(0, len(all_concepts), batch_size)
    videos = [render(Clip(*all_concepts[i], seed=int(rng.integers(1 << 30)))) for i in picks]
    x = to_tensor(videos)
    obj = (torch.from_numpy(np.stack(videos)).max(-1).values > 60).float()  # [B, F, H, W]
    return x, obj[:, None]


def psnr(vae, n: int = 32, seed: int = 12345) -> float:
    """PSNR (dB) of reconstructions of ``n`` fixed clips (mode of the posterior)."""
    rng = np.random.default_rng(seed)
    x, _ = random_batch(rng, n)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = (rec - x).pow(2).mean().item() / 4.0  # [-1, 1] → [0, 1] scale
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


@torch.no_grad()
def latent_stats(vae, n: int = 256, seed: int = 777) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    zs = []
    for _ in range(n // 32):
        x, _ = random_batch(rng, 32)
        zs.append(vae.encode(x).latent_dist.mode())
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # [C, ...]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def train_vae(out: Path, cfg: VAEStageConfig, progress: bool = True) -> Path:
    """Train (or resume) the VAE into ``out/vae`` (diffusers folder); returns that folder."""
    from tqdm.auto import tqdm

    final = out / "vae"
    if (final / "config.json").is_file():
        log.info("VAE: %s exists, skipping", final)
        return final
    work = out / "work" / "vae"
    vae = build_vae(cfg.seed)
    total = cfg.steps + cfg.decoder_steps

    def make_optimizer(decoder_only: bool):
        params = (
            list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
            if decoder_only
            else list(vae.parameters())
        )
        return torch.optim.AdamW(
            params, lr=cfg.decoder_lr if decoder_only else cfg.lr, weight_decay=0.0
        )

    phase = "joint"  # the saved phase decides which parameters the optimizer holds
    if (work / "state.json").is_file():
        phase = json.loads((work / "state.json").read_text()).get("phase", "joint")
    optimizer = make_optimizer(phase == "decoder")
    meta = load_state(work, {"vae": vae}, optimizer)
    step = meta["step"] if meta else 0
    if meta:
        log.info("VAE: resuming at step %d (%s)", step, phase)
    rng = np.random.default_rng([cfg.seed, step])
    bar = tqdm(total=total, initial=step, desc="vae", disable=not progress)
    t0 = time.time()
    vae.train()
    while step < total:
        if step == cfg.steps and phase == "joint":
            phase = "decoder"
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
            optimizer = make_optimizer(True)
            log.info("VAE: joint phase done, PSNR %.2f dB; decoder-only fine-tuning", psnr(vae))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        x, obj = random_batch(rng, cfg.batch_size)
        with torch.set_grad_enabled(phase == "joint"):
            z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        weight = 1.0 + (cfg.object_weight - 1.0) * obj
        loss = ((rec - x).pow(2) * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", phase=phase)
        if step % cfg.save_every == 0 or step == total:
            save_state(work, {"vae": vae}, optimizer, step, {"phase": phase})
            if step % (cfg.save_every * 4) == 0:
                log.info("VAE step %d: loss %.4f, PSNR %.2f dB", step, loss.item(), psnr(vae))
    bar.close()
    vae.eval()
    mean, std = latent_stats(vae)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    quality = psnr(vae)
    log.info("VAE done: PSNR %.2f dB, %.1f min this run", quality, (time.time() - t0) / 60)
    _save_module(vae, final, {"psnr_db": quality, "steps": total})
    return final


def _save_module(module, folder: Path, record: dict) -> None:
    """``save_pretrained`` + ``training.json``, put in place whole (``atomic_dir``)."""
    with atomic_dir(folder) as tmp:
        module.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
