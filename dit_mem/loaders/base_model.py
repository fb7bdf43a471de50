"""Base models: one way to read and load a base model folder, for every front door.

    base = describe_base_model("model/Wan2.2-T2V-A14B-Diffusers")   # configs only, no weights
    base.family, base.flavour, base.boundary_ratio, base.check_geometry(81, 480, 832)
    pipe = load_base_model(base, torch.bfloat16)                     # the memory flavour
    pipe = load_base_model(base, torch.bfloat16, skip=("text_encoder", "tokenizer"))

A diffusers folder loads through its flavour's own ``from_pretrained`` (picked from
``model_index.json``), so everything the folder carries is kept: both experts and
``boundary_ratio`` of Wan2.2 A14B, ``expand_timesteps`` of Wan2.2 TI2V, its scheduler. The
original Wan2.1 release layout (:mod:`dit_mem.loaders.wan`) becomes the same pipeline as its
diffusers twin. Generation, training (its frozen DiT and text encoders) and the latent job (its
VAE) all load here; ``skip`` leaves components out (they are ``None``).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dit_mem.loaders.wan import (
    COMPONENTS as WAN_COMPONENTS,
)
from dit_mem.loaders.wan import (
    ORIGINAL_VAE,
    detect_layout,
    load_original_vae,
    load_wan_components,
    original_configs,
)
from dit_mem.utils import get_logger

logger = get_logger(__name__)

INDEX = "model_index.json"


@dataclass
class BaseModel:
    """What a base model folder is, read from its configs alone (nothing loaded)."""

    folder: Path
    layout: str  # "diffusers" or "original" (the Wan2.1 release)
    pipeline: str  # the stock pipeline class model_index.json names ("WanPipeline" for original)
    index: dict[str, Any] = field(default_factory=dict)  # model_index.json ({} for original)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # transformer, vae, scheduler

    @cached_property
    def family(self):
        from dit_mem.backbone.families import family_of_class_name

        return family_of_class_name(self.configs["transformer"].get("_class_name"), self.folder)

    @property
    def flavour(self) -> type:
        from dit_mem.pipeline import flavour_of

        return flavour_of(self.pipeline)

    @property
    def expand_timesteps(self) -> bool:
        return bool(self.index.get("expand_timesteps", False))

    @property
    def boundary_ratio(self) -> float | None:
        return self.index.get("boundary_ratio")

    @property
    def experts(self) -> tuple[str, ...]:
        """The transformer components the folder holds (Wan2.2 A14B: two)."""
        names = ("transformer", "transformer_2")
        return tuple(n for n in names if n == "transformer" or _present(self.index.get(n)))

    def call_parameters(self, image: bool = False) -> dict[str, inspect.Parameter]:
        """The stock ``__call__``'s parameters of the pipeline that runs a call (with an image,
        a text-to-video Wan2.2 TI2V folder runs as image-to-video)."""
        return dict(inspect.signature(self.runner(image)._stock.__call__).parameters)

    def runner(self, image: bool = False) -> type:
        """The memory flavour that runs a call; ``image``: the call has an image."""
        from dit_mem.pipeline import DiTMemPipeline, DiTMemWanImageToVideoPipeline

        if image and self.flavour is DiTMemPipeline and self.expand_timesteps:
            return DiTMemWanImageToVideoPipeline
        return self.flavour

    def default_geometry(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of a clip at the stock pipeline's defaults (Wan2.1:
        81×480×832, the paper's; LTX-Video 161×512×704; HunyuanVideo-1.5 121 at its target size)."""
        stock = self.call_parameters()
        frames, height, width = (stock[k].default for k in ("num_frames", "height", "width"))
        if height is None or width is None:
            height, width = self.family.default_size(self)
        return frames, height, width

    def vae_on_meta(self):
        """The VAE built from its config on the meta device (its geometry, no weights)."""
        config = self.configs["vae"]
        classes = {c.__name__: c for c in self.family.vae_classes}
        cls = classes.get(config.get("_class_name"), self.family.vae_classes[0])
        with torch.device("meta"):
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})

    def check_geometry(self, num_frames: int, height: int, width: int) -> None:
        """``ValueError`` for a clip size this model cannot generate (its VAE's compression and
        the transformer's patch: Wan2.1 4k+1 frames of multiples of 16; LTX-Video 8k+1 of 32)."""
        _, t, s = self.family.latent_geometry(self.vae_on_meta())
        pt, ps = self.family.patch_size(self.configs["transformer"])
        if (num_frames - 1) % t or ((num_frames - 1) // t + 1) % pt:
            raise ValueError(
                f"num_frames must be {t}k+1 for this {self.family.name} model (e.g. {8 * t + 1}), "
                f"got {num_frames}"
            )
        if height % (s * ps) or width % (s * ps):
            raise ValueError(
                f"height and width must be multiples of {s * ps} for this {self.family.name} "
                f"model, got {height}×{width}"
            )

    def scheduler_config(self) -> dict[str, Any]:
        return self.configs.get("scheduler", {})


def _present(entry: Any) -> bool:
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is not None


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None


def describe_base_model(source: str | Path | BaseModel, **hub: Any) -> BaseModel:
    """Read a base model folder (or a Hub id, downloaded like ``from_pretrained`` does): its
    layout, pipeline, family and component configs. ``ValueError`` / ``FileNotFoundError`` name
    what is missing."""
    if isinstance(source, BaseModel):
        return source
    from dit_mem.utils.hub import resolve_folder

    folder = resolve_folder(str(source), **hub)
    if (folder / INDEX).is_file():
        index = _read(folder / INDEX)
        configs = {}
        for name in ("transformer", "vae"):
            path = folder / name / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{folder} has no {name}/config.json")
            configs[name] = _read(path)
        for name, file in (
            ("scheduler", "scheduler_config.json"),
            ("guider", "guider_config.json"),
        ):
            path = folder / name / file
            configs[name] = _read(path) if path.is_file() else {}
        base = BaseModel(folder, "diffusers", str(index.get("_class_name")), index, configs)
    else:
        detect_layout(folder, ("transformer", "vae"))  # the original Wan2.1 layout, or an error
        configs = original_configs(folder)
        base = BaseModel(folder, "original", "WanPipeline", {}, configs)
    base.flavour  # noqa: B018  (a pipeline we have no memory flavour for is an error here)
    base.family  # noqa: B018
    return base


def clip_size(source, num_frames=None, height=None, width=None) -> tuple[int, int, int]:
    """The clip size latents are made at: the one given, else the base model's default (Wan:
    81×480×832, the paper's, method §2), checked against its VAE's rule before the VAE loads. A
    VAE alone says no size: a Wan VAE's default is the paper's; another's must be given."""
    given = (num_frames, height, width)
    try:
        base = describe_base_model(source)
    except (OSError, ValueError):
        base = None
    if base is not None:
        size = tuple(g or d for g, d in zip(given, base.default_geometry(), strict=True))
        base.family.latent_shape(base.vae_on_meta(), *size)  # the VAE's rule, before it loads
        return size  # type: ignore[return-value]
    vae = _vae_on_meta(Path(source))
    if None in given and type(vae).__name__ != "AutoencoderKLWan":
        raise ValueError(
            f"{source} is not a base model folder: give the clip size (--num-frames, --height, "
            "--width; the paper's: 81, 480, 832)"
        )
    size = tuple(g or d for g, d in zip(given, (81, 480, 832), strict=True))
    if vae is not None:
        from dit_mem.backbone.families import family_of_vae

        family_of_vae(vae).latent_shape(vae, *size)
    return size  # type: ignore[return-value]


def _vae_on_meta(path: Path):
    """A VAE folder's (or a base folder's vae/) VAE on the meta device (a Wan ``.pth``: Wan2.1's
    VAE); ``None`` when ``path`` says no VAE class."""
    if path.suffix in (".pth", ".pt") or (path / ORIGINAL_VAE).is_file():
        from diffusers import AutoencoderKLWan

        with torch.device("meta"):
            return AutoencoderKLWan()
    for config in (path / "config.json", path / "vae" / "config.json"):
        if config.is_file():
            cls = _vae_class(config)
            if cls is not None:
                data = _read(config)
                with torch.device("meta"):
                    return cls.from_config({k: v for k, v in data.items() if not k.startswith("_")})
    return None


def family_of_folder(source: str | Path):
    """The DiT family of a base model folder, from its configs."""
    return describe_base_model(source).family


def load_base_model(
    source: str | Path | BaseModel,
    dtype: torch.dtype = torch.bfloat16,
    *,
    skip: tuple[str, ...] = (),
    vae_dtype: torch.dtype | None = None,
):
    """The base model as its memory flavour (see the module docstring).

    ``skip``: components left out (``None``); ``vae_dtype``: the VAE's dtype (default ``dtype``).
    """
    base = describe_base_model(source)
    skip = tuple(c for c in skip if c not in base.family.init_components)
    if base.layout == "diffusers":
        dtypes = dtype if vae_dtype is None else {"default": dtype, "vae": vae_dtype}
        return base.flavour.from_pretrained(
            base.folder, dtype=dtypes, **dict.fromkeys(skip), memory_bank=None
        )
    wanted = [c for c in WAN_COMPONENTS if c not in skip]
    parts = load_wan_components(base.folder, dtype, components=wanted, vae_dtype=vae_dtype or dtype)
    scheduler = None
    if "scheduler" not in skip:
        import diffusers

        config = parts.scheduler_config
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    components = {k: getattr(parts, k) for k in ("tokenizer", "text_encoder", "transformer", "vae")}
    return base.flavour(**components, scheduler=scheduler)


def load_transformers(source: str | Path | BaseModel, dtype: torch.dtype = torch.bfloat16):
    """``(experts, base)``: the base model's transformer(s), frozen (Wan2.2 A14B: two)."""
    base = describe_base_model(source)
    skip = tuple(c for c in component_names(base) if c not in base.experts)
    pipe = load_base_model(base, dtype, skip=skip)
    experts = [getattr(pipe, name).eval().requires_grad_(False) for name in base.experts]
    return experts, base


def component_names(base: BaseModel) -> tuple[str, ...]:
    if base.layout == "original":
        return WAN_COMPONENTS
    return tuple(k for k, v in base.index.items() if not k.startswith("_") and _present(v))


def vae_classes() -> dict[str, type]:
    """The families' VAE classes by name."""
    from dit_mem.backbone.families import families

    return {c.__name__: c for f in families() for c in f.vae_classes}


def _vae_class(config: Path) -> type | None:
    return vae_classes().get(_read(config).get("_class_name"))


def load_vae(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
):
    """The VAE of a base model folder (either layout), a VAE folder (``config.json`` + weights)
    or the release's ``Wan2.1_VAE.pth`` itself (``config``: another Wan VAE config); eval and
    frozen."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in (".pth", ".pt", ".ckpt"):
            raise ValueError(f"{path}: expected a Wan2.1 VAE .pth file or a model folder")
        kind, vae = "original Wan2.1", load_original_vae(path, config, dtype)
    elif not path.is_dir():
        raise FileNotFoundError(f"base model not found: {path}")
    elif (path / "config.json").is_file() and _vae_class(path / "config.json"):
        cls = _vae_class(path / "config.json")
        kind, vae = cls.__name__, cls.from_pretrained(path, dtype=dtype)
    elif (path / "vae" / "config.json").is_file() and _vae_class(path / "vae" / "config.json"):
        cls = _vae_class(path / "vae" / "config.json")  # a diffusers folder's VAE component
        kind, vae = cls.__name__, cls.from_pretrained(path, subfolder="vae", dtype=dtype)
    elif (path / ORIGINAL_VAE).is_file():
        kind, vae = "original Wan2.1", load_original_vae(path / ORIGINAL_VAE, config, dtype)
    else:
        raise ValueError(
            f"{path}: no VAE found; expected a diffusers folder with vae/config.json or a VAE "
            f"folder with config.json ({', '.join(vae_classes())}), or {ORIGINAL_VAE}"
        )
    logger.info("loaded VAE (%s) from %s", kind, path)
    return vae.to(device).eval().requires_grad_(False)
