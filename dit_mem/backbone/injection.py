"""Memory tokens in the self-attention of a stock diffusers ``WanTransformer3DModel`` (SPEC §4).

``attach_memory(transformer)`` changes one instance only, and ``detach_memory`` undoes it:

* every block's self-attention (``attn1``) gets a :class:`MemoryAttnProcessor`, a subclass of
  diffusers' ``WanAttnProcessor`` that runs the stock code unchanged when no memory is given;
* three removable hooks carry the memory from the forward call to the processors, through
  the blocks' own arguments (no shared state is read during the blocks, so gradient
  checkpointing may recompute them at any time):

  1. a forward pre-hook on the transformer takes ``memory_tokens`` / ``memory_strength`` out
     of ``attention_kwargs`` (so diffusers never sees them) and validates them;
  2. a forward hook on ``transformer.rope`` returns the rotary tables wrapped in a
     :class:`MemoryRotaryEmb` (still the ``(cos, sin)`` tuple) that also holds the memory;
     the transformer passes it to every block as ``rotary_emb``;
  3. a forward pre-hook on each block applies that block's ``norm1`` and shift/scale
     modulation to the memory tokens and hands them on, inside ``rotary_emb``, to ``attn1``.

Per block the memory tokens get the block's ``norm1`` and self-attention modulation, the same
q/k/v projections and q/k RMSNorm, no RoPE; they are extra keys and values only (video tokens
are the only queries), and their logits get ``log multiplicity + log λ`` (float32). With
per-token timesteps (Wan2.2 TI2V) memory takes the modulation of the token with the largest
timestep, i.e. the current noisy timestep rather than a clean conditioning frame's ``t = 0``.

Usage::

    attach_memory(pipe.transformer)                 # or attach_memory(pipe): every expert
    out = pipe(prompt, attention_kwargs={"memory_tokens": memory, "memory_strength": 1.0})

    # conditional branch only (our own CFG loop): give memory to the cond call only
    cond = transformer(x, t, text, attention_kwargs={"memory_tokens": memory})[0]
    uncond = transformer(x, t, negative_text)[0]    # bit-for-bit the stock model
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTransformer3DModel,
    WanTransformerBlock,
)
from torch import nn

from dit_mem.backbone.attention import BACKENDS, AttentionBackend, memory_attention
from dit_mem.memory.tokens import MemoryTokens
from dit_mem.utils import get_logger

logger = get_logger(__name__)

MEMORY_TOKENS_KEY = "memory_tokens"
MEMORY_STRENGTH_KEY = "memory_strength"
_MEMORY_KEYS = (MEMORY_TOKENS_KEY, MEMORY_STRENGTH_KEY)
_ATTACHMENT_ATTR = "_dit_mem_attachment"
_EXPERT_ATTRS = ("transformer", "transformer_2")


# --------------------------------------------------------------------------------------
# What travels with one forward call
# --------------------------------------------------------------------------------------
@dataclass
class _CallMemory:
    """Memory of one transformer forward call (validated, batch not yet broadcast)."""

    tokens: torch.Tensor  # [Bm, G, D], Bm ∈ {1, B}
    bias: torch.Tensor  # [Bm, G] float32: log multiplicity + log λ
    noisy_token: torch.Tensor | None  # [B] index of the noisiest token (per-token timesteps)
    injected_blocks: set[int] = field(default_factory=set)


@dataclass
class _BlockMemory:
    """Memory tokens after one block's ``norm1`` + modulation, ready for ``attn1``."""

    states: torch.Tensor  # [B, G, D], hidden-state dtype
    bias: torch.Tensor  # [B, G] float32


class MemoryRotaryEmb(tuple):
    """``(freqs_cos, freqs_sin)`` as diffusers passes them to blocks, plus this call's memory.

    Behaves exactly like the stock tuple (``cos, sin = rotary_emb`` works); ``call`` is the
    forward call's memory and ``block`` the current block's modulated memory tokens.
    """

    call: _CallMemory
    block: _BlockMemory | None

    def __new__(
        cls, freqs: tuple[torch.Tensor, ...], call: _CallMemory, block: _BlockMemory | None = None
    ) -> MemoryRotaryEmb:
        obj = super().__new__(cls, tuple(freqs))
        obj.call, obj.block = call, block
        return obj

    def with_block(self, block: _BlockMemory) -> MemoryRotaryEmb:
        return MemoryRotaryEmb(tuple(self), self.call, block)


# --------------------------------------------------------------------------------------
# The attention processor
# --------------------------------------------------------------------------------------
def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs, ``x [B, S, H, Dh]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


def _project(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of self-attention, fused projections or not."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


class MemoryAttnProcessor(WanAttnProcessor):
    """``WanAttnProcessor`` for self-attention with memory tokens as extra keys/values.

    Without memory in ``rotary_emb`` it calls the stock processor, so the output is
    bit-for-bit diffusers'. ``backend`` picks the exact attention kernel route
    (see :mod:`dit_mem.backbone.attention`).
    """

    def __init__(self, backend: AttentionBackend = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"memory attention backend must be one of {BACKENDS}, got {backend!r}")
        self.backend: AttentionBackend = backend

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        memory = getattr(rotary_emb, "block", None)
        if memory is None:
            if isinstance(rotary_emb, MemoryRotaryEmb):
                rotary_emb = tuple(rotary_emb)
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("memory tokens only go into self-attention without a mask")

        query, key, value = _project(attn, hidden_states)
        _, mem_key, mem_value = _project(attn, memory.states)
        query, key, mem_key = attn.norm_q(query), attn.norm_k(key), attn.norm_k(mem_key)
        query, key, value, mem_key, mem_value = (
            t.unflatten(2, (attn.heads, -1)) for t in (query, key, value, mem_key, mem_value)
        )
        query, key = _apply_rotary(query, *rotary_emb), _apply_rotary(key, *rotary_emb)

        def joint_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
            return dispatch_attention_fn(q, k, v, scale=scale, backend=self._attention_backend)

        out = memory_attention(
            query,
            key,
            value,
            mem_key,
            mem_value,
            memory.bias,
            backend=self.backend,
            joint_attention_fn=joint_fn,
        )
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


# --------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------
def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _with_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


def _validate_memory(
    memory: Any, strength: Any, batch_size: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check user input; returns ``(tokens [Bm, G, D], bias [Bm, G] float32)``."""
    if isinstance(memory, torch.Tensor):
        if memory.ndim != 3:
            raise ValueError(
                f"{MEMORY_TOKENS_KEY} as a tensor must be dense tokens [B, L, D], got "
                f"{tuple(memory.shape)}"
            )
        memory = MemoryTokens.from_dense(memory)
    if not isinstance(memory, MemoryTokens):
        raise ValueError(
            f"{MEMORY_TOKENS_KEY} must be a MemoryTokens (or a dense [B, L, D] tensor), "
            f"got {type(memory).__name__}"
        )
    if memory.dim != dim:
        raise ValueError(
            f"memory tokens have dim {memory.dim} but the transformer's hidden size is {dim}"
        )
    if memory.batch_size not in (1, batch_size):
        raise ValueError(
            f"memory batch {memory.batch_size} does not match the transformer batch {batch_size} "
            "(give one memory per batch element, or batch 1 to share it)"
        )
    if memory.num_distinct == 0:
        raise ValueError("memory tokens are empty (G = 0); pass no memory instead")
    if strength is None:
        strength = 1.0
    if isinstance(strength, torch.Tensor):
        strength = float(strength)
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength <= 0:
        raise ValueError(f"{MEMORY_STRENGTH_KEY} must be a finite number > 0, got {strength!r}")
    return memory.tokens, memory.attention_bias(float(strength))


class _Attachment:
    """Hooks and saved processors of one attached transformer."""

    def __init__(self, transformer: WanTransformer3DModel, backend: AttentionBackend):
        self.dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.pending: _CallMemory | None = None  # set by the transformer hook, taken by rope's
        self.current: _CallMemory | None = None  # the running call's memory, for a final check
        self.original_processors: list[Any] = []
        self.handles: list[Any] = []
        for block in transformer.blocks:
            old = block.attn1.processor
            new = MemoryAttnProcessor(backend)
            new._attention_backend = old._attention_backend
            new._parallel_config = old._parallel_config
            self.original_processors.append(old)
            block.attn1.set_processor(new)
        self.handles.append(
            transformer.register_forward_pre_hook(self.transformer_pre_hook, with_kwargs=True)
        )
        self.handles.append(transformer.register_forward_hook(self.transformer_hook))
        self.handles.append(transformer.rope.register_forward_hook(self.rope_hook))
        for i, block in enumerate(transformer.blocks):
            hook = self._block_hook(i)
            self.handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))

    def set_backend(self, backend: AttentionBackend, transformer: WanTransformer3DModel) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"memory attention backend must be one of {BACKENDS}, got {backend!r}")
        for block in transformer.blocks:
            block.attn1.processor.backend = backend

    def remove(self, transformer: WanTransformer3DModel) -> None:
        for handle in self.handles:
            handle.remove()
        for block, old in zip(transformer.blocks, self.original_processors, strict=True):
            block.attn1.set_processor(old)
        self.pending = self.current = None

    # -- 1. transformer: take memory out of attention_kwargs --------------------------------
    def transformer_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self.pending = self.current = None
        attention_kwargs = _arg(args, kwargs, 5, "attention_kwargs")
        if not attention_kwargs or not any(k.startswith("memory_") for k in attention_kwargs):
            return None
        unknown = [k for k in attention_kwargs if k.startswith("memory_") and k not in _MEMORY_KEYS]
        if unknown:
            raise ValueError(f"unknown memory option(s) {unknown}; known: {list(_MEMORY_KEYS)}")
        rest = {k: v for k, v in attention_kwargs.items() if k not in _MEMORY_KEYS}
        args, kwargs = _with_arg(args, kwargs, 5, "attention_kwargs", rest or None)
        memory = attention_kwargs.get(MEMORY_TOKENS_KEY)
        if memory is None:
            if attention_kwargs.get(MEMORY_STRENGTH_KEY) is not None:
                logger.debug("%s given without %s: ignored", MEMORY_STRENGTH_KEY, MEMORY_TOKENS_KEY)
            return args, kwargs
        hidden_states = _arg(args, kwargs, 0, "hidden_states")
        timestep = _arg(args, kwargs, 1, "timestep")
        tokens, bias = _validate_memory(
            memory, attention_kwargs.get(MEMORY_STRENGTH_KEY), hidden_states.shape[0], self.dim
        )
        noisy = None
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:  # per-token (Wan2.2 TI2V)
            noisy = timestep.argmax(dim=1)
        self.pending = self.current = _CallMemory(tokens, bias, noisy)
        return args, kwargs

    def transformer_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        call, self.pending, self.current = self.current, None, None
        if call is not None and not call.injected_blocks:  # never a silent run without memory
            raise RuntimeError(
                "memory tokens were given but no block received them (was RoPE's output "
                "rebuilt by another hook, e.g. context parallelism?)"
            )

    # -- 2. rope: the call's memory joins the rotary tables ---------------------------------
    def rope_hook(self, module: nn.Module, args: tuple, output: Any):
        call, self.pending = self.pending, None
        if call is None:
            return None
        if not (isinstance(output, tuple) and len(output) == 2):
            raise RuntimeError(
                f"unexpected RoPE output {type(output).__name__}; memory cannot be attached"
            )
        return MemoryRotaryEmb(output, call)

    # -- 3. blocks: norm1 + modulation of the memory tokens ----------------------------------
    def _block_hook(self, index: int):
        def hook(block: WanTransformerBlock, args: tuple, kwargs: dict):
            rotary = _arg(args, kwargs, 3, "rotary_emb")
            if not isinstance(rotary, MemoryRotaryEmb):
                return None
            hidden_states = _arg(args, kwargs, 0, "hidden_states")
            temb = _arg(args, kwargs, 2, "temb")
            states, bias = modulate_memory(block, rotary.call, hidden_states, temb)
            rotary.call.injected_blocks.add(index)
            return _with_arg(
                args, kwargs, 3, "rotary_emb", rotary.with_block(_BlockMemory(states, bias))
            )

        return hook


def modulate_memory(
    block: WanTransformerBlock, call: _CallMemory, hidden_states: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory tokens through ``block.norm1`` and its self-attention shift/scale.

    Same expression as the stock block applies to video tokens; ``temb`` is ``[B, 6, D]``,
    or ``[B, S, 6, D]`` with per-token timesteps (then the noisiest token's row is used).
    Returns ``(states [B, G, D] in the hidden dtype, bias [B, G] float32)``.
    """
    b = hidden_states.shape[0]
    if temb.ndim == 4:
        if call.noisy_token is None:
            raise ValueError("per-token modulation without per-token timesteps")
        temb = temb[torch.arange(b, device=temb.device), call.noisy_token.to(temb.device)]
    shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    tokens = call.tokens.to(device=hidden_states.device, dtype=hidden_states.dtype)
    tokens = tokens.expand(b, -1, -1)
    states = (block.norm1(tokens.float()) * (1 + scale) + shift).type_as(hidden_states)
    return states, call.bias.to(hidden_states.device).expand(b, -1)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _experts(pipe: Any) -> list[WanTransformer3DModel]:
    experts = [getattr(pipe, name, None) for name in _EXPERT_ATTRS]
    experts = [e for e in experts if e is not None]
    if not experts:
        raise ValueError(
            f"{type(pipe).__name__} has no Wan transformer ({' / '.join(_EXPERT_ATTRS)})"
        )
    return experts


def _check_transformer(transformer: Any) -> WanTransformer3DModel:
    if not isinstance(transformer, WanTransformer3DModel):
        raise ValueError(
            "memory attaches to a diffusers WanTransformer3DModel (or a pipeline holding one), "
            f"got {type(transformer).__name__}"
        )
    for i, block in enumerate(transformer.blocks):
        processor = block.attn1.processor
        if not isinstance(block, WanTransformerBlock) or not isinstance(
            processor, WanAttnProcessor
        ):
            raise ValueError(
                f"block {i} is not a stock Wan block with a WanAttnProcessor "
                f"({type(block).__name__}, {type(processor).__name__}); cannot attach memory"
            )
    return transformer


def attach_memory(
    model: WanTransformer3DModel | Any, *, backend: AttentionBackend = "auto"
) -> list[WanTransformer3DModel]:
    """Let a stock Wan transformer take memory tokens through ``attention_kwargs``.

    Args:
        model: a ``WanTransformer3DModel``, or a pipeline: then every expert
            (``transformer`` and, for Wan2.2 A14B, ``transformer_2``) gets memory.
        backend: memory attention route, ``"auto"`` (default), ``"lse"`` or ``"joint"``.

    Returns the transformers now attached. Attaching twice is harmless (the backend is
    updated). Weights are untouched; without memory the output is bit-for-bit the stock one.
    """
    if not isinstance(model, nn.Module):
        return [t for e in _experts(model) for t in attach_memory(e, backend=backend)]
    if backend not in BACKENDS:
        raise ValueError(f"memory attention backend must be one of {BACKENDS}, got {backend!r}")
    existing: _Attachment | None = getattr(model, _ATTACHMENT_ATTR, None)
    if existing is not None:
        existing.set_backend(backend, model)
        return [model]
    transformer = _check_transformer(model)
    setattr(transformer, _ATTACHMENT_ATTR, _Attachment(transformer, backend))
    logger.debug("memory attached to %d blocks (backend %s)", len(transformer.blocks), backend)
    return [transformer]


def detach_memory(model: WanTransformer3DModel | Any) -> None:
    """Undo :func:`attach_memory` (stock processors back, hooks removed). No-op if not attached."""
    if not isinstance(model, nn.Module):
        for expert in _experts(model):
            detach_memory(expert)
        return
    attachment: _Attachment | None = getattr(model, _ATTACHMENT_ATTR, None)
    if attachment is None:
        return
    attachment.remove(model)
    delattr(model, _ATTACHMENT_ATTR)


def attach_memory_to_pipeline(pipe: Any, *, backend: AttentionBackend = "auto") -> list[str]:
    """Attach to every expert of a Wan pipeline; returns the attribute names attached."""
    attach_memory(pipe, backend=backend)
    return [name for name in _EXPERT_ATTRS if getattr(pipe, name, None) is not None]


def detach_memory_from_pipeline(pipe: Any) -> None:
    """Detach from every expert of a Wan pipeline."""
    detach_memory(pipe)


def is_memory_attached(transformer: nn.Module) -> bool:
    """Whether :func:`attach_memory` is in effect on this transformer."""
    return getattr(transformer, _ATTACHMENT_ATTR, None) is not None


def memory_attention_kwargs(
    memory: MemoryTokens | None,
    strength: float = 1.0,
    attention_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """``attention_kwargs`` carrying ``memory`` (``None`` memory → the other kwargs only)."""
    out = dict(attention_kwargs or {})
    if memory is not None:
        out[MEMORY_TOKENS_KEY] = memory
        out[MEMORY_STRENGTH_KEY] = strength
    return out or None
