"""Base models: one way to read and load a base model folder, for every front door.

    base = describe_base_model("model/Wan2.2-T2V-A14B-Diffusers")   # configs only, no weights
    base.family, base.stock_pipeline, base.boundary_ratio, base.check_geometry(81, 480, 832)
    vae = load_vae(base.folder)                                      # the latent job's VAE

What a folder is (its layout, stock pipeline, family, configs, clip sizes) and its VAE are read
here, below every pipeline: the bank, the latent job and the data loaders use them without
importing a pipeline. Loading the folder as a pipeline is :func:`dit_mem.pipeline.load_base_model`
(the flavour's own ``from_pretrained``); the original Wan2.1 release layout is
:mod:`dit_mem.models.wan`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dit_mem.errors import UserError
from dit_mem.models.wan import COMPONENTS as WAN_COMPONENTS
from dit_mem.models.wan import ORIGINAL_VAE, detect_layout, load_original_vae, original_configs
from dit_mem.utils import get_logger

logger = get_logger(__name__)

INDEX = "model_index.json"

# model_index.json's "_class_name" → the stock diffusers pipeline it runs as (a saved memory
# pipeline names its flavour; dit_mem.pipeline.FLAVOURS has one flavour for each)
_STOCK = ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline", "LTXPipeline")
_STOCK += ("HunyuanVideo15Pipeline",)
STOCK_PIPELINES: dict[str, str] = {name: name for name in _STOCK} | {
    "DiTMemPipeline" if name == "WanPipeline" else f"DiTMem{name}": name for name in _STOCK
}


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
    def stock_pipeline(self) -> type:
        """The stock diffusers pipeline class the folder runs as (``UserError`` if none of ours)."""
        import diffusers

        if self.pipeline not in STOCK_PIPELINES:
            known = ", ".join(sorted(_STOCK))
            raise UserError(
                f"{self.folder}: no memory pipeline for {self.pipeline!r}; supported: {known}"
            )
        return getattr(diffusers, STOCK_PIPELINES[self.pipeline])

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

    def stock_runner(self, image: bool = False) -> type:
        """The stock pipeline that runs a call; ``image``: the call has an image (a
        text-to-video Wan2.2 TI2V folder runs it as image-to-video)."""
        import diffusers

        stock = self.stock_pipeline
        if image and stock is diffusers.WanPipeline and self.expand_timesteps:
            return diffusers.WanImageToVideoPipeline
        return stock

    def call_parameters(self, image: bool = False) -> dict[str, inspect.Parameter]:
        """The stock ``__call__``'s parameters of the pipeline that runs a call."""
        return dict(inspect.signature(self.stock_runner(image).__call__).parameters)

    def default_geometry(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of a clip at the stock pipeline's defaults (Wan2.1:
        81×480×832, the paper's; LTX-Video 161×512×704; HunyuanVideo-1.5 121 at its target size)."""
        stock = self.call_parameters()
        frames, height, width = (stock[k].default for k in ("num_frames", "height", "width"))
        if height is None or width is None:
            height, width = self.family.generation.default_size(self)
        return frames, height, width

    def vae_on_meta(self):
        """The VAE built from its config on the meta device (its geometry, no weights)."""
        config = self.configs["vae"]
        classes = {c.__name__: c for c in self.family.latents.vae_classes}
        cls = classes.get(config.get("_class_name"), self.family.latents.vae_classes[0])
        with torch.device("meta"):
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})

    def check_geometry(self, num_frames: int, height: int, width: int) -> None:
        """``ValueError`` for a clip size this model cannot generate (its VAE's compression and
        the transformer's patch: Wan2.1 4k+1 frames of multiples of 16; LTX-Video 8k+1 of 32)."""
        _, t, s = self.family.latents.geometry(self.vae_on_meta())
        pt, ps = self.family.latents.patch_size(self.configs["transformer"])
        if (num_frames - 1) % t or ((num_frames - 1) // t + 1) % pt:
            raise UserError(
                f"num_frames must be {t}k+1 for this {self.family.name} model (e.g. {8 * t + 1}), "
                f"got {num_frames}"
            )
        if height % (s * ps) or width % (s * ps):
            raise UserError(
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
        raise UserError(f"{path}: not a readable JSON config ({e})") from None


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
    base.stock_pipeline  # noqa: B018  (a pipeline we have no memory flavour for: an error here)
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
        base.family.latents.shape(base.vae_on_meta(), *size)  # the VAE's rule, before it loads
        return size  # type: ignore[return-value]
    vae = _vae_on_meta(Path(source))
    if None in given and type(vae).__name__ != "AutoencoderKLWan":
        raise UserError(
            f"{source} is not a base model folder: give the clip size (--num-frames, --height, "
            "--width; the paper's: 81, 480, 832)"
        )
    size = tuple(g or d for g, d in zip(given, (81, 480, 832), strict=True))
    if vae is not None:
        from dit_mem.backbone.families import family_of_vae

        family_of_vae(vae).latents.shape(vae, *size)
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


def component_names(base: BaseModel) -> tuple[str, ...]:
    if base.layout == "original":
        return WAN_COMPONENTS
    return tuple(k for k, v in base.index.items() if not k.startswith("_") and _present(v))


def vae_classes() -> dict[str, type]:
    """The families' VAE classes by name."""
    from dit_mem.backbone.families import families

    return {c.__name__: c for f in families() for c in f.latents.vae_classes}


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
            raise UserError(f"{path}: expected a Wan2.1 VAE .pth file or a model folder")
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
        raise UserError(
            f"{path}: no VAE found; expected a diffusers folder with vae/config.json or a VAE "
            f"folder with config.json ({', '.join(vae_classes())}), or {ORIGINAL_VAE}"
        )
    logger.info("loaded VAE (%s) from %s", kind, path)
    return vae.to(device).eval().requires_grad_(False)
