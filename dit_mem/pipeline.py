"""Generation with memory: a ``WanPipeline`` whose denoising loop carries memory tokens.

``DiTMemPipeline`` is diffusers' ``WanPipeline`` (same components, same ``encode_prompt``,
``prepare_latents`` and decoding) with its own ``__call__`` so that memory can be given to both
CFG branches (the paper) or the conditional branch only, with a strength λ. The transformer(s)
must have memory attached (``dit_mem.attach_memory``); with ``memory=None`` the loop is the
stock Wan loop.

Stages of ``__call__``:
    1. check inputs   2. encode prompts   3. timesteps   4. initial noise
    5. memory per CFG branch   6. denoising loop   7. decode to frames
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

from dit_mem.memory.tokens import MemoryTokens
from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)

# Wan2.1's standard negative prompt (``sample_neg_prompt`` in Wan's shared config).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

SchedulerKind = Literal["flow-euler", "unipc"]
MemoryMode = Literal["both", "cond"]


def make_scheduler(kind: SchedulerKind = "flow-euler", shift: float = 5.0):
    """Flow-matching Euler (the paper's sampler) or UniPC (Wan's own default), with ``shift``."""
    if kind == "flow-euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if kind == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
    raise ValueError(f"unknown scheduler {kind!r}; choose 'flow-euler' or 'unipc'")


def set_paper_timesteps(scheduler, num_steps: int, device=None) -> None:
    """The paper's schedule: σ = linspace(1, 0, steps + 1)[:-1], shifted by the scheduler.

    For the Euler scheduler this gives exactly the sampler the paper used (DiffSynth's
    ``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)``); UniPC uses its own.
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        scheduler.set_timesteps(num_steps, device=device)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised Wan latents ``[B, C, T, H, W]`` → video in [-1, 1] (the stock Wan arithmetic)."""
    z = latents.to(vae.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return vae.decode(z / inv_std + mean, return_dict=False)[0]


class DiTMemPipeline(WanPipeline):
    """``WanPipeline`` + memory tokens in the self-attention of its (memory-attached) DiT."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = WAN_NEGATIVE_PROMPT,
        memory: MemoryTokens | None = None,
        memory_mode: MemoryMode = "both",
        memory_strength: float = 1.0,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 40,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["np", "pt", "latent"] = "np",
        max_sequence_length: int = 512,
        progress: bool = True,
    ) -> np.ndarray | torch.Tensor:
        """Generate videos; returns frames ``[B, F, H, W, 3]`` in [0, 1] (``np``), or latents."""
        # 1. check inputs
        self.check_inputs(prompt, negative_prompt, height, width)
        if memory_mode not in ("both", "cond"):
            raise ValueError(f"memory_mode must be 'both' or 'cond', got {memory_mode!r}")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(
                f"num_frames must be 1 + a multiple of {self.vae_scale_factor_temporal}, got {num_frames}"
            )
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        do_cfg = guidance_scale > 1.0
        if self.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale

        # 2. encode prompts (UMT5, padding positions zeroed)
        prompt_embeds, negative_embeds = self.encode_prompt(
            prompt=prompts,
            negative_prompt=negative_prompt if do_cfg else None,
            do_classifier_free_guidance=do_cfg,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        model = self.transformer if self.transformer is not None else self.transformer_2
        dtype = model.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        if negative_embeds is not None:
            negative_embeds = negative_embeds.to(dtype)

        # 3. timesteps
        set_paper_timesteps(self.scheduler, num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        boundary = (
            self.config.boundary_ratio * self.scheduler.config.num_train_timesteps
            if self.config.boundary_ratio is not None
            else None
        )

        # 4. initial noise
        latents = self.prepare_latents(
            batch,
            model.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )

        # 5. memory per CFG branch
        cond_kwargs = uncond_kwargs = None
        if memory is not None:
            memory = memory.to(device=device, dtype=dtype)
            cond_kwargs = {"memory_tokens": memory, "memory_strength": memory_strength}
            uncond_kwargs = cond_kwargs if memory_mode == "both" else None

        # 6. denoising loop
        self.scheduler.set_begin_index(0)
        for t in self.progress_bar(timesteps) if progress else timesteps:
            if boundary is None or t >= boundary:
                current, scale = (self.transformer or self.transformer_2), guidance_scale
            else:
                current, scale = self.transformer_2, guidance_scale_2
            x = latents.to(dtype)
            if self.config.expand_timesteps:  # Wan2.2 TI2V: one timestep per latent token
                p = current.config.patch_size
                n_tok = x.shape[2] * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
                timestep = t.expand(batch, n_tok)
            else:
                timestep = t.expand(batch)
            noise = current(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                attention_kwargs=cond_kwargs,
                return_dict=False,
            )[0]
            if do_cfg:
                noise_uncond = current(
                    hidden_states=x,
                    timestep=timestep,
                    encoder_hidden_states=negative_embeds,
                    attention_kwargs=uncond_kwargs,
                    return_dict=False,
                )[0]
                noise = noise_uncond + scale * (noise - noise_uncond)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]

        # 7. decode
        if output_type == "latent":
            return latents
        video = decode_latents(self.vae, latents)
        return self.video_processor.postprocess_video(video, output_type=output_type)
