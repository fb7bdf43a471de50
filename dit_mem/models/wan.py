"""The original Wan2.1 release layout, read into the parts of its diffusers twin.

A folder in the release layout (``Wan-AI/Wan2.1-T2V-1.3B``) holds
``diffusion_pytorch_model.safetensors`` (or its shards + ``.index.json``), ``Wan2.1_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth`` and the tokenizer in ``google/umt5-xxl/``. The transformer goes
through diffusers' ``from_single_file`` with the diffusers configs shipped in
``dit_mem/models/configs/`` (picked from the folder's ``config.json``, or given with
``config_dir=``/``preset=``); the VAE file is renamed with diffusers' own
``convert_wan_vae_to_diffusers`` and loaded strictly; the T5 file is Wan's own encoder-only
UMT5-XXL, mapped here onto transformers' ``UMT5EncoderModel``. A diffusers folder is not read
here: :func:`dit_mem.pipeline.load_base_model` loads either layout as a pipeline.

``.pth`` files are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dit_mem.errors import UserError
from dit_mem.utils import get_logger

logger = get_logger(__name__)

COMPONENTS: tuple[str, ...] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PRESETS: tuple[str, ...] = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")

ORIGINAL_TRANSFORMER = "diffusion_pytorch_model.safetensors"
ORIGINAL_TRANSFORMER_INDEX = "diffusion_pytorch_model.safetensors.index.json"
ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"


# --------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------
@dataclass
class WanComponents:
    """Loaded parts (those not asked for are ``None``) and the layout they came from."""

    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler_config: dict[str, Any] | None = None
    layout: str = ""


# --------------------------------------------------------------------------------------
# Wan's T5 file <-> transformers UMT5EncoderModel
# --------------------------------------------------------------------------------------
# (Wan key pattern, transformers key template); {i} is the block index
_T5_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    (
        "blocks.{i}.pos_embedding.embedding.weight",
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
)
_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # the same tensor as shared.weight


def load_tensors_file(path: Path) -> Any:
    """A ``.pth`` of the release, with ``torch.load(weights_only=True)`` (no code runs); a file
    that is damaged or holds anything but tensors and plain data is an error naming it."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a plain file of tensors ({first})") from None


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_WAN_TO_HF = [(_compile(w), h) for w, h in _T5_KEY_TABLE]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.group(1)) if match.groups() else template
    return None


def wan_t5_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's ``models_t5_umt5-xxl-enc-*.pth`` keys → ``UMT5EncoderModel`` keys (strict)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new = _rename(key, _WAN_TO_HF)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise UserError(f"not a Wan UMT5 encoder state dict; unknown keys: {unknown[:8]}")
    if "shared.weight" in out:
        out[_TIED_EMBEDDING] = out["shared.weight"]
    return out


def load_wan_t5(path: str | Path, config: Any, torch_dtype: torch.dtype = torch.bfloat16):
    """Wan's T5 encoder file as a transformers ``UMT5EncoderModel`` (``config``: a ``UMT5Config``)."""
    from transformers import UMT5EncoderModel

    state_dict = load_tensors_file(Path(path))
    converted = wan_t5_to_transformers(state_dict)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise UserError(
            f"{path}: T5 weights do not fit the UMT5 config: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    shapes = model.state_dict()
    wrong = [k for k, v in converted.items() if v.shape != shapes[k].shape]
    if wrong:
        raise UserError(
            f"{path}: shape mismatch for {wrong[:4]} (e.g. {tuple(converted[wrong[0]].shape)} vs "
            f"{tuple(shapes[wrong[0]].shape)}): wrong config for these weights?"
        )
    converted = {k: v.to(torch_dtype) for k, v in converted.items()}
    converted[_TIED_EMBEDDING] = converted["shared.weight"]
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------
def preset_configs(preset: str) -> dict[str, dict[str, Any]]:
    """Diffusers configs (transformer, vae, text_encoder, scheduler) of a shipped preset."""
    if preset not in PRESETS:
        raise UserError(f"unknown Wan preset {preset!r}; known: {PRESETS}")
    text = resources.files("dit_mem.models.configs").joinpath(f"{preset}.json").read_text()
    data = json.loads(text)
    return {k: data[k] for k in ("transformer", "vae", "text_encoder", "scheduler")}


def transformer_config_from_original(config: dict[str, Any]) -> dict[str, Any]:
    """The original release's ``config.json`` (``WanModel``) as a diffusers transformer config."""
    try:
        dim, heads = int(config["dim"]), int(config["num_heads"])
        out = {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(config.get("patch_size", (1, 2, 2))),
            "num_attention_heads": heads,
            "attention_head_dim": dim // heads,
            "in_channels": int(config["in_dim"]),
            "out_channels": int(config["out_dim"]),
            "text_dim": int(config.get("text_dim", 4096)),
            "freq_dim": int(config["freq_dim"]),
            "ffn_dim": int(config["ffn_dim"]),
            "num_layers": int(config["num_layers"]),
            "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
            "qk_norm": "rms_norm_across_heads",
            "eps": float(config.get("eps", 1e-6)),
        }
    except KeyError as err:
        raise UserError(f"original Wan config.json lacks {err}") from None
    if config.get("model_type", "t2v") != "t2v":
        raise UserError(
            f"only Wan text-to-video models load here, got {config.get('model_type')!r}"
        )
    return out


def match_preset(transformer_config: dict[str, Any]) -> str | None:
    """The shipped preset with this transformer shape, if any."""
    keys = ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim", "in_channels")
    for preset in PRESETS:
        shipped = preset_configs(preset)["transformer"]
        if all(shipped[k] == transformer_config.get(k) for k in keys):
            return preset
    return None


def _write_config_dir(folder: Path, configs: dict[str, dict[str, Any]]) -> None:
    for name, cfg in configs.items():
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (sub / file).write_text(json.dumps(cfg, indent=2))


def _read_config_dir(folder: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for name in ("transformer", "vae", "text_encoder", "scheduler"):
        file = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if file.is_file():
            configs[name] = json.loads(file.read_text())
    return configs


# --------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------
def _diffusers_missing(base: Path, wanted: Sequence[str]) -> list[str]:
    files = {
        "transformer": "transformer/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "tokenizer": "tokenizer/",
        "scheduler": "scheduler/scheduler_config.json",
    }
    return [files[c] for c in wanted if not (base / files[c].rstrip("/")).exists()]


def _original_missing(base: Path, wanted: Sequence[str]) -> list[str]:
    missing = []
    if "transformer" in wanted and not (
        (base / ORIGINAL_TRANSFORMER).is_file() or (base / ORIGINAL_TRANSFORMER_INDEX).is_file()
    ):
        missing.append(f"{ORIGINAL_TRANSFORMER} (or its shards and {ORIGINAL_TRANSFORMER_INDEX})")
    if "vae" in wanted and not (base / ORIGINAL_VAE).is_file():
        missing.append(ORIGINAL_VAE)
    if "text_encoder" in wanted and not (base / ORIGINAL_T5).is_file():
        missing.append(ORIGINAL_T5)
    if "tokenizer" in wanted and not (base / ORIGINAL_TOKENIZER).is_dir():
        missing.append(f"{ORIGINAL_TOKENIZER}/")
    return missing


def detect_layout(base_model_dir: str | Path, components: Sequence[str] = COMPONENTS) -> str:
    """``"diffusers"`` or ``"original"``; ValueError listing what each layout needs otherwise."""
    base = Path(base_model_dir)
    if not base.is_dir():
        raise UserError(f"base model folder {base} does not exist")
    wanted = [c for c in components if c != "scheduler"]
    diffusers_missing = _diffusers_missing(base, components)
    if not diffusers_missing:
        return "diffusers"
    original_missing = _original_missing(base, wanted)
    if not original_missing:
        return "original"
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in base.iterdir())[:20]
    raise UserError(
        f"{base} is neither a diffusers Wan folder (missing: {', '.join(diffusers_missing)}) "
        f"nor the original Wan2.1 release layout (missing: {', '.join(original_missing)}); "
        f"found: {', '.join(present) or 'nothing'}"
    )


# --------------------------------------------------------------------------------------
# The release's VAE file
# --------------------------------------------------------------------------------------
def load_original_vae(pth: Path, config: dict[str, Any] | None, dtype: torch.dtype):
    """The release's ``Wan2.1_VAE.pth``, renamed with diffusers' own converter, loaded strictly.

    ``config``: the ``AutoencoderKLWan`` config (default: the shipped Wan2.1 one).
    """
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = load_tensors_file(pth)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{pth}: not a plain state dict of tensors")
    state = convert_wan_vae_to_diffusers(state)
    config = config if config is not None else preset_configs(PRESETS[0])["vae"]
    vae = AutoencoderKLWan.from_config({k: v for k, v in config.items() if k != "_class_name"})
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise UserError(
            f"{pth}: does not match the Wan2.1 VAE; missing keys {missing[:3]} "
            f"({len(missing)}), unexpected keys {unexpected[:3]} ({len(unexpected)}), "
            f"wrong shapes {wrong[:3]} ({len(wrong)})"
        )
    vae.load_state_dict(state, strict=True)
    return (vae.to(dtype=dtype) if dtype != torch.float32 else vae).eval()


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _original_transformer_weights(base: Path) -> str | dict[str, torch.Tensor]:
    single = base / ORIGINAL_TRANSFORMER
    if single.is_file():
        return str(single)
    from safetensors.torch import load_file

    index = json.loads((base / ORIGINAL_TRANSFORMER_INDEX).read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(base / shard))
    return state


def original_configs(
    base: Path, config_dir: str | Path | None = None, preset: str | None = None
) -> dict[str, dict[str, Any]]:
    """Diffusers configs (transformer, vae, text_encoder, scheduler) of an original-layout folder:
    ``config_dir``'s, a shipped ``preset``'s, or the preset its ``config.json`` describes."""
    if config_dir is not None:
        configs = _read_config_dir(Path(config_dir))
        if not configs:
            raise UserError(f"config_dir {config_dir} holds no <component>/config.json")
        return configs
    if preset is None:
        original = base / "config.json"
        if not original.is_file():
            raise UserError(
                f"{base} has no config.json; pass preset= (one of {PRESETS}) or config_dir="
            )
        transformer = transformer_config_from_original(json.loads(original.read_text()))
        preset = match_preset(transformer)
        if preset is None:
            raise UserError(
                f"{original} describes no shipped Wan2.1 model ({PRESETS}); pass config_dir= "
                "with diffusers configs for transformer/, vae/, text_encoder/, scheduler/"
            )
        logger.info("original Wan layout in %s: %s", base, preset)
    return preset_configs(preset)


def load_wan_components(
    base_model_dir: str | Path,
    torch_dtype: torch.dtype = torch.bfloat16,
    *,
    components: Sequence[str] = COMPONENTS,
    vae_dtype: torch.dtype = torch.float32,
    config_dir: str | Path | None = None,
    preset: str | None = None,
) -> WanComponents:
    """Load the parts of an original Wan2.1 release folder (a diffusers folder loads through
    its pipeline's ``from_pretrained``: :func:`dit_mem.pipeline.load_base_model`).

    Args:
        base_model_dir: the folder.
        torch_dtype: dtype of transformer and text encoder.
        components: which of ``COMPONENTS`` to load (the others come back as ``None``).
        vae_dtype: dtype of the VAE (float32 by default, as Wan decodes).
        config_dir: a folder with diffusers configs (``transformer/config.json``, ``vae/``,
            ``text_encoder/``, ``scheduler/``) to use instead of the shipped ones (e.g. for other
            model sizes or tiny test twins).
        preset: a shipped config set (``PRESETS``) instead of reading the folder's ``config.json``.
    """
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise UserError(f"unknown components {sorted(unknown)}; known: {COMPONENTS}")
    base = Path(base_model_dir)
    if detect_layout(base, components) != "original":
        raise UserError(
            f"{base} is a diffusers folder: load it with its pipeline's from_pretrained "
            "(dit_mem.pipeline.load_base_model)"
        )
    parts = _load_original(base, torch_dtype, vae_dtype, components, config_dir, preset)
    parts.layout = "original"
    return parts


def _load_original(
    base: Path,
    torch_dtype: torch.dtype,
    vae_dtype: torch.dtype,
    components: Sequence[str],
    config_dir: str | Path | None,
    preset: str | None,
) -> WanComponents:
    from diffusers import WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config

    configs = original_configs(base, config_dir, preset)
    needed = [c for c in components if c != "tokenizer"]
    absent = [c for c in needed if c not in configs]
    if absent:
        raise UserError(f"no config for {absent} (config_dir={config_dir})")
    parts = WanComponents()
    with tempfile.TemporaryDirectory(prefix="dit-mem-wan-config-") as tmp:
        _write_config_dir(Path(tmp), configs)
        if "transformer" in components:
            parts.transformer = WanTransformer3DModel.from_single_file(
                _original_transformer_weights(base),
                config=tmp,
                subfolder="transformer",
                dtype=torch_dtype,
                local_files_only=True,
            )
    if "vae" in components:
        parts.vae = load_original_vae(base / ORIGINAL_VAE, configs["vae"], vae_dtype)
    if "text_encoder" in components:
        text_config = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
        parts.text_encoder = load_wan_t5(base / ORIGINAL_T5, UMT5Config(**text_config), torch_dtype)
    if "tokenizer" in components:
        parts.tokenizer = AutoTokenizer.from_pretrained(base / ORIGINAL_TOKENIZER)
    if "scheduler" in components:
        parts.scheduler_config = configs["scheduler"]
    return parts
