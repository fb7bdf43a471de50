"""Config → the memory pipeline of the base model's flavour, and one video per (prompt, seed).

    cfg = resolve_config(load_generation_config("config/generate.yaml", ["k=3"]))
    pipe = load_pipeline(cfg)                     # the flavour's from_pretrained + load_memory
    result = generate(pipe, cfg, "a dog runs on the beach", seed=42)   # frames + what was retrieved

Every front door (``dit-mem generate``, ``eval ... generate``, ``demo``, the web page) goes through
these functions, so a flavour behaves the same through each. A setting left ``None`` is the
family's or the stock pipeline's own (:func:`resolve_config`: geometry, steps, guidance, text
length, the folder's own scheduler, the negative prompt, frames per second), checked against the
base model before any weight loads. Conditioning inputs (``image``, ``last_image``, ``video``,
``mask``, ``reference_images``) are named as the stock pipeline names its arguments. Memory is
never dropped silently: a missing bank, a failed retrieval or a missing latent is an error, unless
``no_memory=True`` was asked for explicitly (then the output is the plain base model's).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dit_mem.config import ConfigError, to_dict
from dit_mem.errors import UserError
from dit_mem.retrieval.retriever import RetrievalResult
from dit_mem.schedulers import SchedulerKind
from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)

# Conditioning inputs, as the stock pipelines name their arguments (I2V: image, last_image;
# VACE: video, mask, reference_images; a Wan2.2 TI2V folder takes an image too)
INPUTS = ("image", "last_image", "video", "mask", "reference_images")


@dataclass
class GenerationConfig:
    """Everything generation needs. ``None``: the family's or the stock pipeline's own (see the
    module docstring); config/generate.yaml names the paper's Wan settings (method §6)."""

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
    height: int | None = None  # None: the pipeline's default (Wan 480, LTX-Video 512, ...)
    width: int | None = None
    num_frames: int | None = None
    fps: int | None = None  # of the written video (None: the family's; LTX-Video's frame_rate)
    steps: int | None = None  # None: the pipeline's default
    shift: float | None = None  # flow shift of a named scheduler (None: the family's)
    guidance_scale: float | None = None  # None: the pipeline's (or its guider's) default
    max_sequence_length: int | None = None  # text tokens per prompt (None: the pipeline's)
    scheduler: SchedulerKind | None = None  # None: the base model's own (its scheduler/ folder)
    negative_prompt: str | None = None  # None: the family's (Wan: Wan's standard one)
    image: Path | None = None  # conditioning inputs (see INPUTS), for every prompt
    last_image: Path | None = None
    video: Path | None = None
    mask: Path | None = None
    reference_images: tuple[Path, ...] | None = None
    seed: int = 42
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    vae_dtype: Literal["bfloat16", "float16", "float32"] | None = None  # None: dtype
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        def whole(name: str, low: int = 1) -> None:
            value = getattr(self, name)
            if value is None and name not in ("k", "seed"):
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")

        for name in ("k", "height", "width", "num_frames", "fps", "steps", "max_sequence_length"):
            whole(name)
        whole("seed", 0)
        if self.seed >= 2**63:
            raise ConfigError(f"seed must be < 2**63, got {self.seed}")
        for name, low, strict in (
            ("shift", 0.0, True),
            ("memory_strength", 0.0, False),  # 0: memory off (the stock model's video)
            ("guidance_scale", 0.0, False),
        ):
            value = getattr(self, name)
            if value is None and name != "memory_strength":
                continue
            if not math.isfinite(value) or value < low or (strict and value == low):
                bound = f"> {low:g}" if strict else f"≥ {low:g}"
                raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
        if self.scheduler == "model" and self.shift is not None:
            raise ConfigError("shift is for a named scheduler; scheduler=model keeps its own")
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
    def inputs(self) -> dict[str, Any]:
        """The conditioning inputs the config gives every prompt."""
        return {name: getattr(self, name) for name in INPUTS if getattr(self, name) is not None}

    @property
    def metadata(self) -> dict[str, Any]:
        """What produced the videos (recorded beside them and by evaluation runs)."""
        d = to_dict(self)
        skip = {"negative_prompt", "seed", "device", "progress", "trust_remote_code"}
        if self.bank is not None:  # the bank folder holds the parts
            skip |= {"index", "latents", "tokens", "videos"}
        else:
            skip |= {"bank", "bank_subfolder"}
        skip |= {name for name in INPUTS if getattr(self, name) is None}
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


# --------------------------------------------------------------------------------------
# The family decides what the config leaves open
# --------------------------------------------------------------------------------------
def resolve_config(cfg: GenerationConfig, base=None) -> GenerationConfig:
    """``cfg`` with every ``None`` setting the family's or the stock pipeline's own, checked
    against the base model (its configs only: nothing loads); ``base``: a described base model
    (:func:`~dit_mem.models.base_model.describe_base_model`), read from ``cfg`` if not given."""
    from dit_mem.models.base_model import describe_base_model

    base = describe_base_model(base if base is not None else cfg.base_model)
    family = base.family
    check_inputs(base, cfg.inputs, "the config", required=False)  # (required: per video)
    stock = base.call_parameters(image=cfg.image is not None)

    def default(name: str) -> Any:
        parameter = stock.get(name)
        return (
            None if parameter is None or parameter.default is parameter.empty else parameter.default
        )

    height, width = cfg.height or default("height"), cfg.width or default("width")
    if height is None or width is None:  # the pipeline derives them (HunyuanVideo-1.5)
        height, width = family.generation.default_size(base)
    values = {
        "height": height,
        "width": width,
        "num_frames": cfg.num_frames or default("num_frames"),
        "fps": cfg.fps or family.generation.fps,
        "steps": cfg.steps or default("num_inference_steps"),
        "guidance_scale": cfg.guidance_scale,
        "max_sequence_length": cfg.max_sequence_length or default("max_sequence_length"),
        "scheduler": cfg.scheduler or "model",
        "negative_prompt": (
            family.generation.negative_prompt
            if cfg.negative_prompt is None
            else cfg.negative_prompt
        ),
    }
    if values["guidance_scale"] is None:
        guider = base.configs.get("guider", {}).get("guidance_scale")
        values["guidance_scale"] = (
            default("guidance_scale") if "guidance_scale" in stock else guider
        )
    try:
        base.check_geometry(values["num_frames"], values["height"], values["width"])
    except UserError as e:
        raise ConfigError(f"{cfg.base_model}: {e}") from None
    if values["scheduler"] != "model" and cfg.shift is None:
        latent = latent_shape(base, values["num_frames"], values["height"], values["width"])
        values["shift"] = float(family.training.flow_shift(base.folder, latent))
    return dataclasses.replace(cfg, **values)


def latent_shape(base, num_frames: int, height: int, width: int) -> list[int]:
    """``[C, T, H, W]`` of the latents the base model denoises at this geometry."""
    vae = base.vae_on_meta()
    return base.family.latents.shape(vae, num_frames, height, width)


def check_inputs(base, inputs: dict[str, Any], where: str, required: bool = True) -> None:
    """``ValueError`` for a conditioning input the base model's pipeline does not take, or (with
    ``required``) a required one missing (the option that gives it named)."""
    from dit_mem.pipeline import runner_of

    stock = base.call_parameters(image=inputs.get("image") is not None)
    for name in inputs:
        if name not in stock:
            takes = [n for n in INPUTS if n in stock]
            raise ConfigError(
                f"{where} gives {name}, but a {runner_of(base, image=True).__name__} ({base.folder}) "
                f"takes {', '.join(takes) if takes else 'no conditioning input'}"
            )
    for name in INPUTS if required else ():
        p = stock.get(name)
        if p is not None and p.default is p.empty and inputs.get(name) is None:
            option = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{where}: the {base.pipeline} of {base.folder} needs an {name}: {option} PATH "
                f"(or an '{name}' column in the prompt CSV, or {name}=PATH)"
            )


def read_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Conditioning files as the stock pipeline takes them (diffusers' own readers): images as
    RGB ``PIL`` images, a video as its frames, a mask video as grey frames."""
    from diffusers.utils import load_image, load_video

    out = {}
    for name, value in inputs.items():
        if value is None:
            continue
        paths = list(value) if isinstance(value, list | tuple) else [value]
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{name}: {path} not found")
        if name in ("image", "last_image"):
            out[name] = load_image(str(paths[0]))
        elif name == "reference_images":
            out[name] = [load_image(str(p)) for p in paths]
        else:
            frames = load_video(str(paths[0]))
            out[name] = [f.convert("L") for f in frames] if name == "mask" else frames
    return out


def settings_for(
    cfg: GenerationConfig,
    seed: int,
    no_memory: bool | None = None,
    memory_mode: str | None = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a video of ``cfg`` records it was made with (its sidecar's ``settings``)."""
    no_memory = cfg.no_memory if no_memory is None else no_memory
    given = {k: to_dict(v) for k, v in (inputs or {}).items() if v is not None}
    return {
        **cfg.metadata,
        **given,
        "no_memory": no_memory,
        "memory_mode": memory_mode or cfg.memory_mode,
        "seed": seed,
    }


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
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
    """The base model's memory flavour (its own ``from_pretrained``: everything the folder
    carries is kept), on the config's device, with the config's scheduler (:func:`resolve_config`)
    and, unless ``no_memory``, memory loaded."""
    from dit_mem.models.base_model import describe_base_model
    from dit_mem.pipeline import load_base_model
    from dit_mem.schedulers import make_scheduler

    base = describe_base_model(cfg.base_model)
    cfg = resolve_config(cfg, base)
    vae_dtype = getattr(torch, cfg.vae_dtype) if cfg.vae_dtype else None
    pipe = load_base_model(base, cfg.torch_dtype(), vae_dtype=vae_dtype)
    if cfg.scheduler != "model":
        pipe.scheduler = make_scheduler(cfg.scheduler, cfg.shift)
    pipe = pipe.to(cfg.resolved_device())
    pipe.set_progress_bar_config(disable=not cfg.progress)
    if not cfg.no_memory:
        pipe.load_memory(
            str(cfg.encoder),
            bank=load_bank(cfg),
            weight_name=cfg.encoder_weight_name,
            scale=cfg.memory_strength,
        )
    return pipe


def is_resolved(cfg: GenerationConfig) -> bool:
    return None not in (cfg.scheduler, cfg.steps, cfg.fps, cfg.num_frames, cfg.height, cfg.width)


# --------------------------------------------------------------------------------------
# One video
# --------------------------------------------------------------------------------------
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
    inputs: dict[str, Any] | None = None,
) -> GenerationResult:
    """One video for ``prompt``: retrieve, encode memory, denoise, decode (the resolved config's
    settings; ``no_memory`` / ``memory_mode`` override them for this call, ``inputs`` the
    config's conditioning inputs)."""
    cfg = cfg if is_resolved(cfg) else resolve_config(cfg)
    seed = cfg.seed if seed is None else seed
    use_memory = not (cfg.no_memory if no_memory is None else no_memory)
    mode = memory_mode or cfg.memory_mode
    if use_memory and getattr(pipe, "memory_bank", None) is None:
        raise UserError("this pipeline was loaded with no_memory=true (no bank to retrieve from)")
    given = {**cfg.inputs, **{k: v for k, v in (inputs or {}).items() if v is not None}}
    runner = runner_for(pipe, "image" in given)
    call = call_arguments(runner, cfg, seed, use_memory, mode)
    out = runner(prompt=prompt, **read_inputs(given), **call)
    check_finite_frames(out.frames[0], f"generation for {prompt!r} (seed {seed})")
    frames = (np.clip(out.frames[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
    retrieved = out.memory[0] if out.memory else RetrievalResult([], [], [])
    settings = settings_for(cfg, seed, not use_memory, mode, inputs)
    return GenerationResult(frames, prompt, seed, retrieved, settings)


def runner_for(pipe, image: bool):
    """The pipeline that runs a call: ``pipe``, or for a call with an image on a text-to-video
    Wan2.2 TI2V pipeline, its image-to-video twin on the same components (kept on ``pipe``)."""
    from dit_mem.pipeline import DiTMemPipeline, DiTMemWanImageToVideoPipeline

    if not (image and type(pipe) is DiTMemPipeline and pipe.config.get("expand_timesteps")):
        return pipe
    twin = getattr(pipe, "_image_to_video", None)
    if twin is None:
        twin = DiTMemWanImageToVideoPipeline.from_pipe(pipe)
        twin.memory_bank, twin._memory_scale = pipe.memory_bank, pipe._memory_scale
        twin.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        pipe._image_to_video = twin
    return twin


def check_finite_frames(frames: np.ndarray, what: str) -> None:
    """Never a black video that looks like a result: NaN/Inf frames are an error."""
    if not np.isfinite(frames).all():
        raise FloatingPointError(
            f"{what} produced NaN/Inf frames; try dtype=float32 or check the base model and "
            "encoder weights"
        )


def call_arguments(pipe, cfg: GenerationConfig, seed: int, use_memory: bool, mode: str) -> dict:
    """The pipeline call of one generation: the resolved config's settings, as this flavour
    takes them (a guider pipeline's scale set on its guider; LTX-Video's frame rate)."""
    from dit_mem.pipeline import SAME

    call = {
        "negative_prompt": cfg.negative_prompt,
        "height": cfg.height,
        "width": cfg.width,
        "num_frames": cfg.num_frames,
        "frame_rate": cfg.fps,
        "num_inference_steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "max_sequence_length": cfg.max_sequence_length,
        "generator": torch.Generator(device="cpu").manual_seed(seed),
        "output_type": "np",
    }
    accepted = inspect.signature(pipe._stock.__call__).parameters
    guider = getattr(pipe, "guider", None)
    if "guidance_scale" not in accepted and guider is not None and cfg.guidance_scale is not None:
        pipe.guider = guider.new(guidance_scale=cfg.guidance_scale)
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
        cfg = cfg if is_resolved(cfg) else resolve_config(cfg)
        self.pipe, self.cfg = pipe, cfg
        self.metadata = cfg.metadata

    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        return generate(self.pipe, self.cfg, prompt, seed).frames
