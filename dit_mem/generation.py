"""Config → :class:`~dit_mem.pipeline.DiTMemPipeline`, and one video per (prompt, seed).

    cfg = load_generation_config("config/generate.yaml", ["k=3"])
    pipe = load_pipeline(cfg)                       # stock WanPipeline + load_memory(...)
    result = generate(pipe, cfg, "a dog runs on the beach", seed=42)   # frames + what was retrieved

Every script (``dit-mem generate``, ``eval ... generate``, ``demo``, the web page) goes through
these two functions. Memory is never dropped silently: a missing bank, a failed retrieval or a
missing latent is an error, unless ``no_memory=True`` was asked for explicitly (then the output
is the plain base model's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dit_mem.config import ConfigError, to_dict
from dit_mem.pipeline import SAME
from dit_mem.retrieval.retriever import RetrievalResult
from dit_mem.schedulers import SchedulerKind
from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class GenerationConfig:
    """Everything generation needs; defaults are the paper's (SPEC §6). Checked when built."""

    base_model: Path = Path("model/Wan2.1-T2V-1.3B")  # a diffusers folder of any supported
    #  pipeline (Wan T2V / I2V / VACE, LTX-Video, HunyuanVideo-1.5), the original Wan2.1 folder,
    #  or a Hub id
    encoder: Path | None = Path("checkpoint/DiT-Mem-1.3B.safetensors")  # folder, file or Hub id
    encoder_weight_name: str | None = None  # a release-layout file inside a Hub repository
    bank: Path | None = None  # a bank folder or Hub id (dit-mem bank ...); else the parts below
    bank_subfolder: str | None = None  # the bank's folder inside a Hub repository
    index: Path | None = Path("memory_index")  # built by `dit-mem build-index`
    latents: Path | None = Path("latent")  # memory latents (`dit-mem encode-latents`)
    tokens: Path | None = None  # token cache (`dit-mem cache-tokens`), preferred over latents
    videos: Path | None = None  # the bank's video files, only for previews
    embedding_model: Path | None = None  # the index's embedding model, if not where it was
    trust_remote_code: str | None = None  # the one embedding model allowed to run its own code
    k: int = 5
    no_memory: bool = False
    memory_mode: Literal["both", "cond"] = "both"  # both CFG branches (the paper) | cond only
    memory_strength: float = 1.0
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    steps: int = 40
    shift: float = 5.0
    guidance_scale: float = 5.0
    max_sequence_length: int | None = None  # text tokens per prompt (None: the pipeline's; Wan 512)
    scheduler: SchedulerKind | None = None  # None: the family's (Wan: flow-euler, the paper's)
    negative_prompt: str | None = None  # None: the family's (Wan: Wan's standard one)
    seed: int = 42
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, low: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")

        for name in ("k", "height", "width", "num_frames", "fps", "steps"):
            positive_int(name)
        if self.max_sequence_length is not None:
            positive_int("max_sequence_length")
        positive_int("seed", 0)
        if self.seed >= 2**63:
            raise ConfigError(f"seed must be < 2**63, got {self.seed}")
        if self.height % 16 or self.width % 16:
            raise ConfigError(
                f"height and width must be multiples of 16, got {self.height}×{self.width}"
            )
        if (self.num_frames - 1) % 4:
            raise ConfigError(f"num_frames must be 4k+1 (e.g. 81), got {self.num_frames}")
        for name, low, strict in (
            ("shift", 0.0, True),
            ("memory_strength", 0.0, False),  # 0: memory off (the stock model's video)
            ("guidance_scale", 0.0, False),
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (strict and value == low):
                bound = f"> {low:g}" if strict else f"≥ {low:g}"
                raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"device: {self.device!r} is not a torch device") from None
        if not self.no_memory:
            if self.encoder is None:
                raise ConfigError("generation with memory needs encoder=... (or no_memory=true)")
            if self.bank is None and self.index is None:
                raise ConfigError(
                    "generation with memory needs a bank (bank=... or index=...), or no_memory=true"
                )
            if self.bank is None and self.latents is None and self.tokens is None:
                raise ConfigError(
                    "generation with memory needs memory latents or a token cache "
                    "(latents=... or tokens=...), or no_memory=true"
                )

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def resolved_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def metadata(self) -> dict[str, Any]:
        """What produced the videos (recorded beside them and by evaluation runs)."""
        d = to_dict(self)
        skip = {"negative_prompt", "seed", "device", "progress", "trust_remote_code"}
        if self.bank is not None:  # the bank folder holds the parts
            skip |= {"index", "latents", "tokens", "videos"}
        else:
            skip |= {"bank", "bank_subfolder"}
        return {key: value for key, value in d.items() if key not in skip}


BANK_PARTS = ("index", "latents", "tokens", "videos")
_SOURCES = ("bank", "bank_subfolder", *BANK_PARTS)


def load_generation_config(path: str | Path | None, overrides: list[str] | None = None):
    """A :class:`GenerationConfig` from YAML and ``KEY=VALUE`` overrides (the command line wins).

    Where the memory comes from is one setting, given as a bank (``bank=``, ``bank_subfolder=``)
    or as its parts (``index=``, ``latents=``, ``tokens=``, ``videos=``): a command line that
    names any of them replaces the YAML's whole choice, and a bank with parts at the same level
    is an error naming both. With a bank, the parts' defaults do not apply.
    """
    from dit_mem.config import _from_dict, _set_path, parse_overrides, read_yaml

    data = read_yaml(path)
    pairs = parse_overrides(overrides)
    given = {k for k, _ in pairs}
    if given & set(_SOURCES):
        data = {k: v for k, v in data.items() if k not in _SOURCES}
    for key, raw in pairs:
        _set_path(data, GenerationConfig, key, raw)
    for level, keys in (("the command line", given), (str(path), set(data) - given)):
        parts = [k for k in BANK_PARTS if k in keys and data.get(k) is not None]
        if "bank" in keys and data.get("bank") is not None and parts:
            raise ConfigError(
                f"{level} gives bank= and {', '.join(p + '=' for p in parts)}: a bank folder holds "
                "its parts; give the bank, or its parts"
            )
    if data.get("bank") is not None:
        data.update(dict.fromkeys(BANK_PARTS))
    return _from_dict(GenerationConfig, data)


def settings_for(
    cfg: GenerationConfig, seed: int, no_memory: bool | None = None, memory_mode: str | None = None
) -> dict[str, Any]:
    """What a video of ``cfg`` records it was made with (its sidecar's ``settings``)."""
    no_memory = cfg.no_memory if no_memory is None else no_memory
    return {
        **cfg.metadata,
        "no_memory": no_memory,
        "memory_mode": memory_mode or cfg.memory_mode,
        "seed": seed,
    }


def load_bank(cfg: GenerationConfig):
    """The config's memory bank: ``bank=`` (folder or Hub id), or its parts."""
    from dit_mem.bank import MemoryBank

    model = str(cfg.embedding_model) if cfg.embedding_model is not None else None
    if cfg.bank is not None:
        return MemoryBank.from_pretrained(
            str(cfg.bank),
            subfolder=cfg.bank_subfolder,
            embedding_model=model,
            trust_remote_code=cfg.trust_remote_code,
        )
    return MemoryBank(
        cfg.index,
        cfg.latents,
        cfg.tokens,
        cfg.videos,
        embedding_model=model,
        trust_remote_code=cfg.trust_remote_code,
    )


def load_pipeline(cfg: GenerationConfig):
    """Base model (local folder or Hub id) → the memory pipeline of its flavour on the config's
    device, with the config's scheduler and, unless ``no_memory``, memory loaded.

    A Wan text-to-video model loads from either layout (diffusers or the original release); any
    other supported pipeline (Wan I2V / VACE, LTX-Video, HunyuanVideo-1.5) from its diffusers
    folder, picked from ``model_index.json``.
    """
    import json

    from dit_mem.backbone import family_of
    from dit_mem.loaders.wan import load_wan_components
    from dit_mem.pipeline import FLAVOURS, DiTMemPipeline
    from dit_mem.schedulers import make_scheduler
    from dit_mem.utils.hub import resolve_folder

    device, dtype = cfg.resolved_device(), cfg.torch_dtype()
    base = resolve_folder(str(cfg.base_model))
    index = base / "model_index.json"
    stock = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if stock is None or FLAVOURS.get(stock) is DiTMemPipeline:
        parts = load_wan_components(base, torch_dtype=dtype)
        components = {
            k: getattr(parts, k) for k in ("tokenizer", "text_encoder", "transformer", "vae")
        }
        pipe = DiTMemPipeline(**components, scheduler=make_scheduler("flow-euler", cfg.shift))
    elif stock in FLAVOURS:
        pipe = FLAVOURS[stock].from_pretrained(base, dtype=dtype)
    else:
        raise ValueError(
            f"{base}: model_index.json names a {stock}; memory pipelines exist for "
            f"{', '.join(sorted({f._stock.__name__ for f in FLAVOURS.values()}))}"
        )
    kind = cfg.scheduler or family_of(pipe.transformer).default_scheduler
    if kind != "model":
        pipe.scheduler = make_scheduler(kind, cfg.shift)
    elif stock is None or FLAVOURS.get(stock) is DiTMemPipeline:  # the folder's own scheduler
        pipe.scheduler = _scheduler_from_config(parts.scheduler_config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not cfg.progress)
    if not cfg.no_memory:
        encoder = str(cfg.encoder)
        pipe.load_memory(
            encoder,
            bank=load_bank(cfg),
            weight_name=cfg.encoder_weight_name,
            scale=cfg.memory_strength,
        )
    return pipe


def _scheduler_from_config(config: dict[str, Any] | None):
    """The scheduler a base model's ``scheduler_config.json`` describes (a diffusers class)."""
    import diffusers

    if not config or not isinstance(getattr(diffusers, config.get("_class_name", ""), None), type):
        raise ConfigError("scheduler=model: the base model has no diffusers scheduler config")
    return getattr(diffusers, config["_class_name"]).from_config(config)


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    prompt: str
    seed: int
    retrieved: RetrievalResult
    settings: dict[str, Any]

    def sidecar(self) -> dict[str, Any]:
        """The JSON written beside each video."""
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "retrieved": self.retrieved.records(),
            "settings": self.settings,
        }


def generate(
    pipe,
    cfg: GenerationConfig,
    prompt: str,
    seed: int | None = None,
    no_memory: bool | None = None,
    memory_mode: str | None = None,
) -> GenerationResult:
    """One video for ``prompt``: retrieve, encode memory, denoise, decode (the config's settings;
    ``no_memory`` / ``memory_mode`` override them for this call)."""
    seed = cfg.seed if seed is None else seed
    use_memory = not (cfg.no_memory if no_memory is None else no_memory)
    mode = memory_mode or cfg.memory_mode
    if use_memory and getattr(pipe, "memory_bank", None) is None:
        raise ValueError("this pipeline was loaded with no_memory=true (no bank to retrieve from)")
    out = pipe(prompt, **call_arguments(pipe, cfg, seed, use_memory, mode))
    check_finite_frames(out.frames[0], f"generation for {prompt!r} (seed {seed})")
    frames = (np.clip(out.frames[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
    retrieved = out.memory[0] if out.memory else RetrievalResult([], [], [])
    settings = settings_for(cfg, seed, not use_memory, mode)
    return GenerationResult(frames, prompt, seed, retrieved, settings)


def check_finite_frames(frames: np.ndarray, what: str) -> None:
    """Never a black video that looks like a result: NaN/Inf frames are an error."""
    if not np.isfinite(frames).all():
        raise FloatingPointError(
            f"{what} produced NaN/Inf frames; try dtype=float32 or check the base model and "
            "encoder weights"
        )


def call_arguments(pipe, cfg: GenerationConfig, seed: int, use_memory: bool, mode: str) -> dict:
    """The pipeline call of one generation: the config's settings, as this flavour takes them
    (the family's negative prompt by default; a guider pipeline's scale set on its guider)."""
    import inspect

    from dit_mem.backbone import family_of

    family = family_of(pipe.transformer)
    negative = (
        family.default_negative_prompt if cfg.negative_prompt is None else cfg.negative_prompt
    )
    call = {
        "negative_prompt": negative,
        "height": cfg.height,
        "width": cfg.width,
        "num_frames": cfg.num_frames,
        "num_inference_steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "max_sequence_length": cfg.max_sequence_length,
        "generator": torch.Generator(device="cpu").manual_seed(seed),
        "output_type": "np",
    }
    accepted = inspect.signature(pipe._stock.__call__).parameters
    if "guidance_scale" not in accepted and getattr(pipe, "guider", None) is not None:
        pipe.guider = pipe.guider.new(guidance_scale=cfg.guidance_scale)
    call = {k: v for k, v in call.items() if k in accepted and v is not None}
    return {
        **call,
        "memory": "retrieve" if use_memory else None,
        "negative_memory": SAME if mode == "both" else None,
        "k": cfg.k,
    }


class PipelineGenerator:
    """The ``VideoGenerator`` the evaluation loops take: ``gen(prompt, seed)`` → frames."""

    def __init__(self, pipe, cfg: GenerationConfig):
        self.pipe, self.cfg = pipe, cfg
        self.metadata = cfg.metadata

    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        return generate(self.pipe, self.cfg, prompt, seed).frames
