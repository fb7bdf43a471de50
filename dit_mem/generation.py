"""Prompt → retrieved memory → video: the one loader every script uses.

    cfg = load_config(GenerationConfig, "config/generate.yaml", ["k=3"])
    gen = load_generator(cfg)
    result = gen.generate("a dog runs on the beach", seed=42)   # frames + what was retrieved
    frames = gen("a dog runs on the beach", 42)                 # VideoGenerator protocol

Memory is never dropped silently: a missing index, an empty bank, a failed retrieval or a
missing latent is an error, unless ``no_memory=True`` was asked for explicitly (then the
output is the plain base model's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dit_mem.config import to_dict
from dit_mem.memory.tokens import MemoryTokens
from dit_mem.pipeline import WAN_NEGATIVE_PROMPT, DiTMemPipeline, decode_latents, make_scheduler
from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class GenerationConfig:
    """Everything generation needs; defaults are the paper's (SPEC §6)."""

    base_model: Path = Path("model/Wan2.1-T2V-1.3B")  # diffusers folder or original Wan2.1 layout
    encoder: Path | None = Path("checkpoint/DiT-Mem-1.3B.safetensors")  # folder or release file
    index: Path | None = Path("memory_index")  # built by `dit-mem build-index`
    latents: Path | None = Path("latent")  # memory latents (`dit-mem encode-latents`)
    tokens: Path | None = None  # token cache (`dit-mem cache-tokens`), preferred over latents
    videos: Path | None = None  # the bank's video files, only for the contact sheet
    k: int = 5
    no_memory: bool = False
    memory_mode: Literal["both", "cond"] = "both"
    memory_strength: float = 1.0
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    steps: int = 40
    shift: float = 5.0
    guidance_scale: float = 5.0
    max_sequence_length: int = 512  # UMT5 tokens per prompt (Wan: 512)
    scheduler: Literal["flow-euler", "unipc"] = "flow-euler"
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    seed: int = 42
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"
    progress: bool = True

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def resolved_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Retrieved:
    """The memory videos used for one prompt, in retrieval order."""

    ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    prompt: str
    seed: int
    retrieved: Retrieved
    settings: dict[str, Any]

    def sidecar(self) -> dict[str, Any]:
        """The JSON written beside each video."""
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "retrieved": [
                {"rank": i + 1, "id": vid, "caption": cap, "score": score}
                for i, (vid, cap, score) in enumerate(
                    zip(
                        self.retrieved.ids,
                        self.retrieved.captions,
                        self.retrieved.scores,
                        strict=True,
                    )
                )
            ],
            "settings": self.settings,
        }


class MemorySource:
    """Retrieval plus memory tokens: from the token cache if there is one, else latents → encoder."""

    def __init__(self, cfg: GenerationConfig, encoder, device: torch.device, dtype: torch.dtype):
        from dit_mem.data import LatentStore, TokenCache
        from dit_mem.retrieval import Retriever

        if cfg.index is None:
            raise ValueError(
                "generation with memory needs an index (set index=..., or no_memory=true)"
            )
        self.retriever = Retriever(cfg.index)
        self.tokens = TokenCache(cfg.tokens) if cfg.tokens is not None else None
        self.latents = LatentStore(cfg.latents) if cfg.latents is not None else None
        if self.tokens is None and self.latents is None:
            raise ValueError(
                "generation with memory needs memory latents or a token cache "
                "(set latents=... or tokens=..., or no_memory=true)"
            )
        self.encoder = encoder
        self.device, self.dtype = device, dtype

    def retrieve(self, prompt: str, k: int) -> Retrieved:
        hits = self.retriever.retrieve([prompt], k=k)[0]
        if len(hits.ids) == 0:
            raise ValueError(f"retrieval returned no memory videos for prompt {prompt!r}")
        return Retrieved(list(hits.ids), list(hits.captions), [float(s) for s in hits.scores])

    @torch.no_grad()
    def memory_tokens(self, ids: list[str]) -> MemoryTokens:
        if self.tokens is not None:
            videos = self.tokens.load(ids)
            videos = dataclasses.replace(
                videos,
                high=videos.high.to(self.device, self.encoder.dtype),
                low=videos.low.to(self.device, self.encoder.dtype),
            )
            return self.encoder.aggregate(videos, shuffle=False)
        latents = self.latents.load(ids).to(self.device, self.encoder.dtype)
        return self.encoder(latents, shuffle=False)


def load_encoder(path: Path, device: torch.device, dtype: torch.dtype):
    """``MemoryEncoder.from_path`` on ``device`` in ``dtype``, in eval mode."""
    from dit_mem.memory import MemoryEncoder

    enc = MemoryEncoder.from_path(path)
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules even when there are none
    return torch.nn.Module.to(enc, device=device, dtype=dtype).eval()


class DiTMemGenerator:
    """A loaded pipeline plus its memory source; see :func:`load_generator`."""

    def __init__(self, cfg: GenerationConfig, pipe: DiTMemPipeline, memory: MemorySource | None):
        self.cfg, self.pipe, self.memory = cfg, pipe, memory

    @property
    def metadata(self) -> dict[str, Any]:
        """What produced the videos (recorded by evaluation runs)."""
        keep = [
            "base_model",
            "encoder",
            "index",
            "tokens",
            "latents",
            "k",
            "no_memory",
            "memory_mode",
            "memory_strength",
            "height",
            "width",
            "num_frames",
            "fps",
            "steps",
            "shift",
            "guidance_scale",
            "max_sequence_length",
            "scheduler",
            "dtype",
        ]
        d = to_dict(self.cfg)
        return {key: d[key] for key in keep}

    def generate(self, prompt: str, seed: int | None = None, no_memory: bool | None = None):
        """One video for ``prompt``: retrieve, encode memory, denoise, decode."""
        cfg = self.cfg
        seed = cfg.seed if seed is None else seed
        use_memory = not (cfg.no_memory if no_memory is None else no_memory)
        if use_memory and self.memory is None:
            raise ValueError("this generator was loaded with no_memory=true")
        retrieved, memory = Retrieved(), None
        if use_memory:
            retrieved = self.memory.retrieve(prompt, cfg.k)
            memory = self.memory.memory_tokens(retrieved.ids)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        video = self.pipe(
            prompt,
            negative_prompt=cfg.negative_prompt,
            memory=memory,
            memory_mode=cfg.memory_mode,
            memory_strength=cfg.memory_strength,
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=generator,
            output_type="np",
            max_sequence_length=cfg.max_sequence_length,
            progress=cfg.progress,
        )
        frames = (np.clip(video[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        settings = {**self.metadata, "no_memory": not use_memory, "seed": seed}
        return GenerationResult(frames, prompt, seed, retrieved, settings)

    @torch.no_grad()
    def memory_previews(self, retrieved: Retrieved, num_frames: int = 6) -> list[np.ndarray]:
        """Frames of the retrieved videos for the contact sheet.

        From the bank's video files when ``videos`` is set, else by decoding the memory latents
        with the VAE; empty when neither is available (e.g. a token-cache-only bank).
        """
        from dit_mem.data import load_video

        cfg, out = self.cfg, []
        if not retrieved.ids:
            return out
        if cfg.videos is not None:
            for vid in retrieved.ids:
                path = next(
                    (p for p in (cfg.videos / vid, cfg.videos / f"{vid}.mp4") if p.is_file()), None
                )
                if path is None:
                    raise FileNotFoundError(f"memory video {vid} not found under {cfg.videos}")
                clip = load_video(path, num_frames, cfg.height // 4, cfg.width // 4)
                out.append(((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy())
            return out
        if self.memory is None or self.memory.latents is None:
            return out
        for vid in retrieved.ids:
            video = decode_latents(
                self.pipe.vae, self.memory.latents.load([vid])[0]
            )  # [1, 3, F, H, W]
            frames = ((video[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte()
            out.append(frames.cpu().numpy())
        return out

    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        return self.generate(prompt, seed).frames


def load_generator(cfg: GenerationConfig) -> DiTMemGenerator:
    """Load base model, attach memory, load encoder and memory bank, as ``cfg`` says."""
    from dit_mem.backbone import attach_memory, load_wan_components

    device, dtype = cfg.resolved_device(), cfg.torch_dtype()
    parts = load_wan_components(cfg.base_model, torch_dtype=dtype)
    pipe = DiTMemPipeline(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        transformer=parts["transformer"],
        vae=parts["vae"],
        scheduler=make_scheduler(cfg.scheduler, cfg.shift),
    ).to(device)
    attach_memory(pipe.transformer)
    memory = None
    if not cfg.no_memory:
        if cfg.encoder is None:
            raise ValueError("generation with memory needs encoder=... (or no_memory=true)")
        encoder = load_encoder(cfg.encoder, device, dtype)
        if (
            encoder.config.dim
            != pipe.transformer.config.num_attention_heads
            * pipe.transformer.config.attention_head_dim
        ):
            raise ValueError(
                f"memory encoder width {encoder.config.dim} does not match the DiT's hidden size "
                f"{pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim}"
            )
        memory = MemorySource(cfg, encoder, device, dtype)
    return DiTMemGenerator(cfg, pipe, memory)
