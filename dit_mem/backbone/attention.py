"""Attention of video queries over ``[video keys ; memory keys]``, exactly, with a per-key logit bias.

Every memory key carries an additive logit bias (``log multiplicity + log λ``), shared by all
queries and heads. Video keys carry none. Two exact ways to compute it, behind one function:

``"lse"``   the video part is one mask-free SDPA kernel call that also returns the
            log-sum-exp (``torch.ops.aten`` flash/efficient kernels on CPU and CUDA: the same
            kernels plain SDPA picks, so the fast path is kept); the G memory keys are a tiny
            float32 attention; both are merged in float32 through their log-sum-exps. Forward
            only: these kernels do not differentiate their log-sum-exp output.
``"joint"`` one mask-free SDPA over the concatenated keys. The bias rides in 8 extra head
            channels: queries get ones, memory keys get the bias (split into three parts of the
            input dtype, so bf16 keeps it to ~1e-7), video keys and all values get zeros; the
            softmax scale stays 1/√head_dim. A float mask would do the same but forces a slower
            GPU kernel and would be rounded to bf16 (log 100 = 4.6052 → 4.5938). Fully
            differentiable with the stock SDPA backward, so it is the training path.
``"auto"``  ``"lse"`` when no gradient is needed and a log-sum-exp kernel is available, else
            ``"joint"``.

Tensors use diffusers' attention layout ``[B, S, H, Dh]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from dit_mem.utils import get_logger

logger = get_logger(__name__)

AttentionBackend = Literal["auto", "lse", "joint"]
BACKENDS: tuple[str, ...] = ("auto", "lse", "joint")
_BIAS_CHANNELS = 3  # hi / mid / lo parts of the bias in the input dtype

# attention function used for the "joint" backend: (q, k, v, scale) -> out, all [B, S, H, Dh]
JointAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def memory_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    memory_bias: torch.Tensor,
    *,
    backend: AttentionBackend = "auto",
    scale: float | None = None,
    joint_attention_fn: JointAttentionFn | None = None,
) -> torch.Tensor:
    """``softmax([q·kᵀ ; q·k_mᵀ + bias] · scale) · [v ; v_m]`` for video queries only.

    Args:
        query, key, value: video tokens ``[B, S, H, Dh]`` (RoPE already applied to q and k).
        memory_key, memory_value: memory tokens ``[B, G, H, Dh]`` (no RoPE).
        memory_bias: ``[B, G]`` additive logit bias of each memory key (float32 recommended);
            ``-inf`` removes a key.
        backend: ``"auto"``, ``"lse"`` or ``"joint"`` (see the module docstring).
        scale: softmax scale; default ``1/√Dh``.
        joint_attention_fn: attention used by ``"joint"`` (default: ``F.scaled_dot_product_attention``);
            the injection passes diffusers' ``dispatch_attention_fn`` so a chosen backend is kept.

    Returns:
        ``[B, S, H, Dh]`` in ``query``'s dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"memory attention backend must be one of {BACKENDS}, got {backend!r}")
    b, _, h, d = query.shape
    if memory_key.shape[0] != b or memory_key.shape[2:] != (h, d):
        raise ValueError(
            f"memory keys must be [B={b}, G, H={h}, Dh={d}], got {tuple(memory_key.shape)}"
        )
    if memory_value.shape != memory_key.shape:
        raise ValueError(
            f"memory values {tuple(memory_value.shape)} must match memory keys "
            f"{tuple(memory_key.shape)}"
        )
    if memory_bias.shape != memory_key.shape[:2]:
        raise ValueError(
            f"memory bias must be [B, G] = {tuple(memory_key.shape[:2])}, "
            f"got {tuple(memory_bias.shape)}"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value, memory_key, memory_value, memory_bias)
    )
    if backend == "lse" and needs_grad:
        raise ValueError(
            "the 'lse' memory attention backend is forward-only (the kernels' log-sum-exp has no "
            "gradient); use 'joint' or 'auto' when training"
        )
    if backend in ("auto", "lse") and not needs_grad:
        video = _video_attention_with_lse(query, key, value, scale)
        if video is not None:
            return _merge_with_memory(query, *video, memory_key, memory_value, memory_bias, scale)
        if backend == "lse":
            raise ValueError(
                f"no log-sum-exp attention kernel for {query.device.type} / {query.dtype}; "
                "use the 'joint' backend"
            )
    return _joint_attention(
        query, key, value, memory_key, memory_value, memory_bias, scale, joint_attention_fn
    )


# --------------------------------------------------------------------------------------
# "lse": mask-free video kernel + tiny memory attention, merged through log-sum-exp
# --------------------------------------------------------------------------------------
def _video_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Video-only attention ``[B, S, H, Dh]`` and its log-sum-exp ``[B, S, H]`` (float32).

    Uses the aten kernels behind ``F.scaled_dot_product_attention``; ``None`` where none
    applies (then the caller falls back to ``"joint"``).
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, Dh]
    s = q.shape[2]
    aten = torch.ops.aten
    try:
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, scale=scale
            )
        elif q.device.type == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16):
                try:
                    out, lse = aten._scaled_dot_product_flash_attention(
                        q, k, v, 0.0, False, False, scale=scale
                    )[:2]
                except RuntimeError:  # e.g. head dim or GPU not supported by flash
                    out, lse = aten._scaled_dot_product_efficient_attention(
                        q, k, v, None, True, 0.0, False, scale=scale
                    )[:2]
            else:
                out, lse = aten._scaled_dot_product_efficient_attention(
                    q, k, v, None, True, 0.0, False, scale=scale
                )[:2]
        else:
            return None
    except (RuntimeError, NotImplementedError) as err:
        logger.debug("no log-sum-exp kernel (%s); using the joint memory attention", err)
        return None
    lse = lse[..., :s]  # the efficient kernel pads the sequence dim of its log-sum-exp
    return out.transpose(1, 2), lse.transpose(1, 2).float()


def _merge_with_memory(
    query: torch.Tensor,
    video_out: torch.Tensor,
    video_lse: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    memory_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Add the memory keys to a finished video attention, exactly, in float32."""
    logits = torch.einsum("bshd,bghd->bshg", query.float(), memory_key.float()) * scale
    logits = logits + memory_bias.float()[:, None, None, :]  # [B, S, H, G]
    memory_lse = torch.logsumexp(logits, dim=-1)  # [B, S, H]
    total_lse = torch.logaddexp(video_lse, memory_lse)
    memory_probs = torch.exp(logits - total_lse.unsqueeze(-1))  # already weighted by memory share
    memory_probs = torch.nan_to_num(memory_probs, nan=0.0)  # all-(-inf) memory rows
    out = torch.exp(video_lse - total_lse).unsqueeze(-1) * video_out.float()
    out = out + torch.einsum("bshg,bghd->bshd", memory_probs, memory_value.float())
    return out.to(query.dtype)


# --------------------------------------------------------------------------------------
# "joint": one mask-free SDPA over [video ; memory] keys, bias carried in extra channels
# --------------------------------------------------------------------------------------
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


def _joint_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    memory_bias: torch.Tensor,
    scale: float,
    attention_fn: JointAttentionFn | None,
) -> torch.Tensor:
    b, s, h, d = query.shape
    g = memory_key.shape[1]
    dtype = query.dtype
    extra = -(-(d + _BIAS_CHANNELS) // 8) * 8 - d  # pad head dim to a multiple of 8 (flash)

    # bias / scale, split so that the parts sum to it in float32 even in bf16
    target = memory_bias.float() / scale  # [B, G]
    parts, rest = [], target
    for _ in range(_BIAS_CHANNELS):
        part = rest.to(dtype)
        parts.append(part)
        rest = rest - part.float()
    bias_channels = torch.stack(parts, dim=-1)[:, :, None, :].expand(b, g, h, _BIAS_CHANNELS)
    bias_channels = torch.nan_to_num(bias_channels, neginf=torch.finfo(dtype).min)

    def pad(x: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[1]
        zeros = x.new_zeros(b, n, h, extra - (0 if head is None else head.shape[-1]))
        return torch.cat([x, zeros] if head is None else [x, head, zeros], dim=-1)

    q = pad(query, query.new_ones(b, s, h, _BIAS_CHANNELS))
    k = torch.cat([pad(key), pad(memory_key.to(dtype), bias_channels)], dim=1)
    v = torch.cat([pad(value), pad(memory_value.to(dtype))], dim=1)
    out = (attention_fn or _sdpa)(q, k, v, scale)
    return out[..., :d]
