"""Loading the public release's memory encoder checkpoint (``DiT-Mem-1.3B.safetensors``).

The release stores 38 parameter tensors (method §7): names may carry a ``pipe.dit_mem.`` or
``dit_mem.`` prefix; each conv block is reachable as ``conv_block{i}`` or ``cnn.{i-1}``; every
block has an unused ``bn`` (skipped). There are no filter gains (ours are a deterministic
function) and no BatchNorm running statistics (defaults are used, and we say so once).
Missing or mis-shaped weights are errors that name the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dit_mem.errors import UserError
from dit_mem.memory.checks import check_finite_state
from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)

_PREFIXES = ("pipe.dit_mem.", "dit_mem.")
_BRANCHES = {"high_pass_module": "high_pass", "low_pass_module": "low_pass"}


def official_to_ours(name: str) -> str | None:
    """Map one release key to our state-dict key; ``None`` for tensors we do not use."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name.startswith("self_attention."):
        return "attention." + name[len("self_attention.") :]
    head, _, rest = name.partition(".")
    if head not in _BRANCHES:
        return name  # unknown: reported as unexpected by the caller
    branch = _BRANCHES[head]
    if rest.startswith("feature_proj."):
        return f"{branch}.proj.{rest[len('feature_proj.') :]}"
    m = re.match(r"(?:conv_block(\d+)|cnn\.(\d+))\.(.*)", rest)
    if m is None:
        return f"{branch}.{rest}"
    block = int(m.group(1)) - 1 if m.group(1) else int(m.group(2))
    tail = m.group(3)
    if tail.startswith("bn."):
        return None  # registered but never used by the release's forward
    if tail.startswith("fft_filter.norm."):
        tail = "filter.norm." + tail[len("fft_filter.norm.") :]
    elif tail.startswith("fft_filter."):
        return None  # random gains of the release: ours are deterministic
    return f"{branch}.blocks.{block}.{tail}"


def _config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Config overrides of the 1.3B encoder (the class defaults) read off the checkpoint's shapes."""
    convs = sorted(
        (k for k in shapes if re.fullmatch(r"high_pass\.blocks\.\d+\.conv\.weight", k)),
        key=lambda k: int(k.split(".")[2]),
    )
    if len(convs) != 2 or "attention.q.weight" not in shapes:
        return {}  # the default; the shape check below names what does not fit
    conv_shapes = [shapes[k] for k in convs]
    return {
        "in_channels": conv_shapes[0][1],
        "conv_channels": tuple(s[0] for s in conv_shapes),
        "kernel_sizes": tuple(s[2] for s in conv_shapes),
        "dim": shapes["attention.q.weight"][0],
    }


def load_official_checkpoint(
    cls,
    path: str | Path,
    config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Build ``cls`` (a ``MemoryEncoder``) and fill it from a release-layout safetensors file.

    ``config``: ``cls`` keyword arguments (default: the 1.3B encoder, widths read off the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: the official checkpoint is a .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                ours = official_to_ours(name)
                if ours is None:
                    skipped.append(name)
                    continue
                if ours in tensors:
                    continue  # the same tensor under both conv_block / cnn names
                tensors[ours] = f.get_tensor(name)
    except SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None

    cfg = dict(config or _config_from_shapes({k: tuple(v.shape) for k, v in tensors.items()}))
    model = cls(**cfg)
    expected = model.state_dict()

    unexpected = sorted(k for k in tensors if k not in expected)
    mis_shaped = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    bn_stats = {
        k for k in expected if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    missing = sorted(k for k in expected if k not in tensors and k not in bn_stats)
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing)}")
    if mis_shaped:
        problems.append(f"wrong shapes: {'; '.join(mis_shaped)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if problems:
        raise UserError(
            f"{path} does not fit a memory encoder {dict(model.config)}:\n  "
            + "\n  ".join(problems)
        )

    absent_stats = sorted(k for k in bn_stats if k not in tensors)
    if absent_stats:
        logger.warning(
            "%s has no BatchNorm running statistics (%d tensors, as in the public release); "
            "using the defaults (mean 0, variance 1)",
            path.name,
            len(absent_stats),
        )
    if skipped:
        logger.info("ignored %d unused tensors of the release (e.g. %s)", len(skipped), skipped[0])
    model.load_state_dict(tensors, strict=False)  # the only keys left out are the BN stats
    check_finite_state(model, path)
    if torch_dtype is not None:
        model = torch.nn.Module.to(model, torch_dtype)  # skips ModelMixin's spurious warning
    return model.eval()
