"""Fingerprints of models: which weights made a file (a bank's latents, a token cache).

An exact hash for weights that must be bit-identical (the memory encoder of a token cache); a
dtype-robust signature for a VAE (its latents are the same whether it runs in float32 or bf16).
"""

from __future__ import annotations

import hashlib
import json

import torch

from dit_mem.errors import UserError


def weights_fingerprint(module: torch.nn.Module, legacy: bool = False) -> str:
    """SHA-256 over ``module``'s public config (not where it was loaded from) and every tensor
    of its state dict (weights and buffers), exactly as they are. Weights under accelerate's
    offload hooks are read where the hooks keep them. ``legacy``: the token caches of dit-mem
    ≤ 0.1.0 hashed the whole config, ``_name_or_path`` included."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        public = {k: v for k, v in dict(config).items() if legacy or not str(k).startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, t in sorted(_onloaded_state(module).items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


SIGNATURE = "dit-mem-weights/1"
_SAMPLES = 4  # values read per tensor, at fixed positions


def weights_signature(module: torch.nn.Module) -> dict:
    """What identifies a model's weights whatever dtype they are stored or run in (float32,
    bfloat16, float16 copies of one model agree; a hash cannot, as casts round differently):
    its class, the names and shapes of its tensors (hashed), and per floating tensor the mean
    absolute value and a few values at fixed positions. Compare with :func:`same_weights`."""
    h = hashlib.sha256(type(module).__name__.encode())
    values = []
    for name, t in sorted(_onloaded_state(module).items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        if not t.is_floating_point() or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        picks = torch.linspace(0, flat.numel() - 1, _SAMPLES).round().long()
        values.append([float(flat.abs().mean()), *(float(v) for v in flat[picks])])
    return {"format": SIGNATURE, "layout": h.hexdigest(), "values": values}


def same_weights(a: dict, b: dict, rtol: float = 2e-2) -> bool:
    """Whether two :func:`weights_signature` are of one model (up to dtype rounding: each value
    within ``rtol`` of its tensor's mean absolute value)."""
    if not (isinstance(a, dict) and isinstance(b, dict)) or a.get("layout") != b.get("layout"):
        return False
    rows_a, rows_b = a.get("values") or [], b.get("values") or []
    if len(rows_a) != len(rows_b):
        return False
    for ra, rb in zip(rows_a, rows_b, strict=True):
        scale = max(abs(ra[0]), abs(rb[0]), 1e-12)
        if any(abs(x - y) > rtol * scale for x, y in zip(ra, rb, strict=True)):
            return False
    return True


def _onloaded_state(module: torch.nn.Module) -> dict:
    state = module.state_dict()
    if any(t.is_meta for t in state.values()):
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        onloaded = get_state_dict_offloaded_model(module)
        if onloaded.keys() != state.keys():
            missing = sorted(set(state) - set(onloaded))[:3]
            raise UserError(f"the {type(module).__name__}'s weights {missing} are on 'meta' only")
        state = onloaded
    return state


def vae_fingerprint(vae: torch.nn.Module) -> dict:
    """The fingerprint of a VAE's weights (:func:`weights_signature`)."""
    return weights_signature(vae)


def row_hashes(block, start: int = 0, rows=None):
    """A 64-bit checksum of each row of a 2-d array: its bytes and its row number (``start``
    onwards, or ``rows``): a changed value, or two rows swapped, changes it. Damage detection,
    not a cryptographic hash."""
    import numpy as np

    data = np.ascontiguousarray(block)
    raw = data.view(np.uint8).reshape(len(data), -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(raw), pad), np.uint8)], axis=1)
    words = np.ascontiguousarray(raw).view(np.uint64)
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        mult = np.arange(1, words.shape[1] + 1, dtype=np.uint64) * golden | np.uint64(1)
        h = ((words ^ (words >> np.uint64(29))) * mult).sum(axis=1, dtype=np.uint64)
        where = np.arange(start, start + len(data)) if rows is None else np.asarray(rows)
        h ^= (where.astype(np.uint64) + np.uint64(1)) * golden
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (contiguous, on the CPU)."""
    return hashlib.sha256(
        t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    ).hexdigest()
