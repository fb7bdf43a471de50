"""Memory tokens in the self-attention of a stock diffusers ``WanTransformer3DModel`` (SPEC §4).

``attach_memory(transformer)`` changes one instance only, and ``detach_memory`` undoes it. Memory
takes one visible path:

1. **The call.** The caller passes ``attention_kwargs={"memory_tokens": m, "memory_strength": λ}``
   (stock ``WanPipeline`` forwards ``attention_kwargs`` to both CFG branches). A forward pre-hook on
   the transformer reads them, checks them and keeps them on the :class:`MemoryAttachment` as this
   call's memory; nothing is removed from, added to or rewritten in any argument. The memory stays
   there until the next call, so gradient checkpointing can recompute blocks during backward.
2. **The block.** A forward pre-hook on each block notes the ``temb`` the block was given (read
   only), because the memory tokens need the block's modulation.
3. **The processor.** Each block's self-attention gets a :class:`MemoryAttnProcessor` (a
   ``WanAttnProcessor``). It runs inside the block's own forward, after every offloading hook
   has put the block's weights on the execution device, and there it applies the block's
   ``norm1`` and shift/scale to the memory tokens, projects them with the same q/k/v and q/k
   RMSNorm (no RoPE), and attends with the video tokens as the only queries, through the
   attention backend and context-parallel configuration diffusers gave the processor
   (:mod:`dit_mem.backbone.attention`). Without memory it is the stock processor, bit for bit.

The memory keys' logits get ``log multiplicity + log λ`` (float32). With per-token timesteps
(Wan2.2 TI2V) memory takes the modulation of the token with the largest timestep, i.e. the
current noisy timestep rather than a clean conditioning frame's ``t = 0``.

Everything that knows Wan's structure is in :class:`WanAdapter` (which blocks, where the
modulation lives, which processor to subclass); another DiT family would be another adapter.
Hooks are bound methods of module-level classes, so an attached model pickles, deep-copies and
``torch.save``-s.

Usage::

    attach_memory(pipe.transformer)                 # or attach_memory(pipe): every expert
    out = pipe(prompt, attention_kwargs={"memory_tokens": memory, "memory_strength": 1.0})
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTransformer3DModel,
    WanTransformerBlock,
)
from torch import nn

from dit_mem.backbone.attention import Route, check_route, memory_attention
from dit_mem.memory.tokens import MemoryTokens
from dit_mem.utils import get_logger

logger = get_logger(__name__)

MEMORY_TOKENS_KEY = "memory_tokens"
NEGATIVE_MEMORY_TOKENS_KEY = "negative_memory_tokens"  # the unconditional branch's, if different
MEMORY_STRENGTH_KEY = "memory_strength"
_MEMORY_KEYS = (MEMORY_TOKENS_KEY, NEGATIVE_MEMORY_TOKENS_KEY, MEMORY_STRENGTH_KEY)
_BRANCH_HOOK = "dit_mem_cfg_branch"
_ATTACHMENT_ATTR = "_dit_mem_attachment"
_EXPERT_ATTRS = ("transformer", "transformer_2")


# --------------------------------------------------------------------------------------
# What one transformer call carries
# --------------------------------------------------------------------------------------
@dataclass
class CallMemory:
    """Memory of one transformer call (validated; batch not yet broadcast)."""

    tokens: torch.Tensor  # [Bm, G, D], Bm ∈ {1, B}
    bias: torch.Tensor  # [Bm, G] float32: log multiplicity + log λ
    noisy_token: torch.Tensor | None = None  # [B] index of the noisiest token (per-token t)
    num_tokens: int | None = None  # sequence length the per-token timesteps were given for


def validate_memory(
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
    if isinstance(strength, torch.Tensor) and strength.numel() == 1:
        strength = float(strength)
    if (
        isinstance(strength, bool)
        or not isinstance(strength, int | float)
        or not math.isfinite(strength)
        or strength <= 0
    ):
        raise ValueError(f"{MEMORY_STRENGTH_KEY} must be a finite number > 0, got {strength!r}")
    return memory.tokens, memory.attention_bias(float(strength))


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """A call's argument by position or by name (read only)."""
    return args[index] if len(args) > index else kwargs.get(name)


# --------------------------------------------------------------------------------------
# The family adapter: everything that knows Wan's structure
# --------------------------------------------------------------------------------------
class WanAdapter:
    """Where memory goes in a diffusers ``WanTransformer3DModel`` (Wan2.1 / Wan2.2)."""

    name = "wan"
    processor_base = WanAttnProcessor

    def check(self, transformer: Any) -> None:
        if not isinstance(transformer, WanTransformer3DModel):
            raise ValueError(
                "memory attaches to a diffusers WanTransformer3DModel (or a pipeline holding one), "
                f"got {type(transformer).__name__}"
            )
        for i, block in enumerate(transformer.blocks):
            if not isinstance(block, WanTransformerBlock):
                raise ValueError(
                    f"block {i} is a {type(block).__name__}, not a stock WanTransformerBlock; "
                    "cannot attach memory"
                )

    def hidden_size(self, transformer: WanTransformer3DModel) -> int:
        return transformer.config.num_attention_heads * transformer.config.attention_head_dim

    def blocks(self, transformer: WanTransformer3DModel) -> list[WanTransformerBlock]:
        return list(transformer.blocks)

    def self_attention(self, block: WanTransformerBlock) -> nn.Module:
        return block.attn1

    def call_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """``hidden_states``, ``timestep`` and ``attention_kwargs`` of a transformer call
        (``WanTransformer3DModel.forward``'s parameters 0, 1 and 5)."""
        return {
            "hidden_states": _argument(args, kwargs, 0, "hidden_states"),
            "timestep": _argument(args, kwargs, 1, "timestep"),
            "attention_kwargs": _argument(args, kwargs, 5, "attention_kwargs"),
        }

    def block_temb(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The ``temb`` a block was called with (``WanTransformerBlock.forward``'s parameter 2)."""
        return _argument(args, kwargs, 2, "temb")

    def noisy_token(self, timestep: Any) -> tuple[torch.Tensor | None, int | None]:
        """Per-token timesteps ``[B, S]`` (Wan2.2 TI2V): index of the noisiest token, and S."""
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
            return timestep.argmax(dim=1), timestep.shape[1]
        return None, None

    def modulate(
        self,
        block: WanTransformerBlock,
        call: CallMemory,
        temb: torch.Tensor,
        hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """Memory tokens through the block's ``norm1`` and self-attention shift/scale.

        The stock block's expression for video tokens; ``temb`` is ``[B, 6, D]``, or
        ``[B, S, 6, D]`` with per-token timesteps (then the noisiest token's row is used).
        Returns ``[B, G, D]`` in the hidden-state dtype.
        """
        b = hidden_states.shape[0]
        if temb.ndim == 4:
            if call.noisy_token is None or temb.shape[1] != call.num_tokens:
                raise NotImplementedError(
                    "memory with per-token timesteps needs every token's timestep in each block "
                    f"(got temb for {temb.shape[1]} tokens, timesteps for {call.num_tokens}); "
                    "context parallelism with per-token timesteps is not supported"
                )
            rows = torch.arange(b, device=temb.device)
            temb = temb[rows, call.noisy_token.to(temb.device)]
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        tokens = call.tokens.to(device=hidden_states.device).expand(b, -1, -1)
        return (block.norm1(tokens.float()) * (1 + scale) + shift).type_as(hidden_states)


ADAPTERS: tuple[WanAdapter, ...] = (WanAdapter(),)


def adapter_for(transformer: Any) -> WanAdapter:
    for adapter in ADAPTERS:
        try:
            adapter.check(transformer)
        except ValueError:
            if adapter is ADAPTERS[-1]:
                raise
            continue
        return adapter
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------
# The attention processor
# --------------------------------------------------------------------------------------
def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs (the stock arithmetic), ``[B, S, H, Dh]``."""
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
    """``WanAttnProcessor`` for one block's self-attention, with memory tokens as extra keys/values.

    Reads the running call's memory from its :class:`MemoryAttachment`; with none it is the
    stock processor. ``route`` picks the exact attention route (:mod:`~dit_mem.backbone.attention`);
    the backend and context-parallel configuration are the ones diffusers set on the processor
    (``set_attention_backend``, ``enable_parallelism``).
    """

    def __init__(self, attachment: MemoryAttachment, block: nn.Module, route: Route = "auto"):
        super().__init__()
        check_route(route)
        self.attachment, self.block, self.route = attachment, block, route

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = self.attachment.memory
        if call is None or encoder_hidden_states is not None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        if attention_mask is not None:
            raise ValueError("memory tokens only go into self-attention without a mask")
        states = self.attachment.adapter.modulate(
            self.block, call, self.attachment.temb, hidden_states
        )
        query, key, value = _project(attn, hidden_states)
        _, memory_key, memory_value = _project(attn, states)
        query, key, memory_key = attn.norm_q(query), attn.norm_k(key), attn.norm_k(memory_key)
        query, key, value, memory_key, memory_value = (
            t.unflatten(2, (attn.heads, -1)) for t in (query, key, value, memory_key, memory_value)
        )
        if rotary_emb is not None:
            query, key = _apply_rotary(query, *rotary_emb), _apply_rotary(key, *rotary_emb)
        bias = call.bias.to(hidden_states.device).expand(hidden_states.shape[0], -1)
        out = self.attend(query, key, value, memory_key, memory_value, bias)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def attend(self, query, key, value, memory_key, memory_value, memory_bias) -> torch.Tensor:
        """The attention itself, ``[B, S, H, Dh]`` (``memory_*``: ``[B, G, H, Dh]``, ``[B, G]``)."""
        return memory_attention(
            query,
            key,
            value,
            memory_key,
            memory_value,
            memory_bias,
            route=self.route,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )


# --------------------------------------------------------------------------------------
# The attachment: per-call state and hooks of one transformer
# --------------------------------------------------------------------------------------
class MemoryAttachment:
    """Memory on one transformer: its processors, its hooks, and the running call's memory.

    ``memory`` is the current call's :class:`CallMemory` (``None``: the stock model) and ``temb``
    the ``temb`` of the block now running; both are per-call state (not pickled).
    """

    def __init__(self, transformer: nn.Module, adapter: WanAdapter, route: Route = "auto"):
        self.adapter = adapter
        self.dim = adapter.hidden_size(transformer)
        self.route: Route = route
        self.memory: CallMemory | None = None
        self.temb: torch.Tensor | None = None
        self.branch: str | None = None  # "cond" / "uncond" while track_cfg_branches is on
        self.original_processors: dict[int, Any] = {}
        self.handles = [
            transformer.register_forward_pre_hook(self.on_transformer_call, with_kwargs=True)
        ]
        for block in adapter.blocks(transformer):
            self.handles.append(
                block.register_forward_pre_hook(self.on_block_call, with_kwargs=True)
            )
        self.install_processors(transformer)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "memory": None, "temb": None, "branch": None}

    # -- processors ------------------------------------------------------------------------
    def processors(self, transformer: nn.Module) -> list[Any]:
        return [self.adapter.self_attention(b).processor for b in self.adapter.blocks(transformer)]

    def is_ours(self, processor: Any) -> bool:
        return isinstance(processor, MemoryAttnProcessor) and processor.attachment is self

    def install_processors(self, transformer: nn.Module) -> None:
        """Give every block our processor (again, where ``set_attn_processor`` replaced it)."""
        for i, block in enumerate(self.adapter.blocks(transformer)):
            attn = self.adapter.self_attention(block)
            old = attn.processor
            if self.is_ours(old):
                old.route = self.route
                continue
            if not isinstance(old, self.adapter.processor_base):
                raise ValueError(
                    f"block {i}'s self-attention uses {type(old).__name__}, not a "
                    f"{self.adapter.processor_base.__name__}; cannot attach memory"
                )
            new = MemoryAttnProcessor(self, block, self.route)
            new._attention_backend = old._attention_backend
            new._parallel_config = old._parallel_config
            self.original_processors[i] = old
            attn.set_processor(new)

    def set_route(self, route: Route, transformer: nn.Module) -> None:
        check_route(route)
        self.route = route
        self.install_processors(transformer)

    def remove(self, transformer: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        for i, block in enumerate(self.adapter.blocks(transformer)):
            attn = self.adapter.self_attention(block)
            if self.is_ours(attn.processor):
                attn.set_processor(self.original_processors[i])
        self.memory = self.temb = None

    # -- hooks (read-only) -----------------------------------------------------------------
    def on_transformer_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Take this call's memory from ``attention_kwargs`` (or none), validated."""
        self.memory = self.temb = None
        inputs = self.adapter.call_inputs(args, kwargs)
        attention_kwargs = inputs["attention_kwargs"] or {}
        given = [k for k in attention_kwargs if k.startswith("memory_")]
        if not given:
            return None
        unknown = [k for k in given if k not in _MEMORY_KEYS]
        if unknown:
            raise ValueError(f"unknown memory option(s) {unknown}; known: {list(_MEMORY_KEYS)}")
        memory = attention_kwargs.get(MEMORY_TOKENS_KEY)
        if NEGATIVE_MEMORY_TOKENS_KEY in attention_kwargs:  # per-branch memory
            if self.branch not in ("cond", "uncond"):
                raise ValueError(
                    f"{NEGATIVE_MEMORY_TOKENS_KEY} needs to know which classifier-free guidance "
                    "branch each call is: run the loop inside track_cfg_branches(pipe) (the loop "
                    "must name its calls with cache_context('cond' / 'uncond'), as WanPipeline does)"
                )
            if self.branch == "uncond":
                memory = attention_kwargs[NEGATIVE_MEMORY_TOKENS_KEY]
        if memory is None:
            return None
        processors = self.processors(module)
        replaced = [i for i, p in enumerate(processors) if not self.is_ours(p)]
        if replaced:  # e.g. set_attn_processor after attach_memory
            kind = type(processors[replaced[0]])
            raise ValueError(
                f"memory tokens were given, but the self-attention of {len(replaced)} block(s) "
                f"(first: block {replaced[0]}) no longer has the memory processor (it has "
                f"{kind.__name__}; was set_attn_processor called after attach_memory?). "
                "Call attach_memory(transformer) again to put memory back."
            )
        tokens, bias = validate_memory(
            memory,
            attention_kwargs.get(MEMORY_STRENGTH_KEY),
            inputs["hidden_states"].shape[0],
            self.dim,
        )
        noisy, num_tokens = self.adapter.noisy_token(inputs["timestep"])
        self.memory = CallMemory(tokens, bias, noisy, num_tokens)
        return None

    def on_block_call(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        """Note the block's ``temb`` for its processor (memory calls only)."""
        if self.memory is not None:
            self.temb = self.adapter.block_temb(args, kwargs)
        return None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _experts(pipe: Any) -> list[nn.Module]:
    experts = [getattr(pipe, name, None) for name in _EXPERT_ATTRS]
    experts = [e for e in experts if e is not None]
    if not experts:
        raise ValueError(
            f"{type(pipe).__name__} has no Wan transformer ({' / '.join(_EXPERT_ATTRS)})"
        )
    return experts


def get_attachment(transformer: nn.Module) -> MemoryAttachment | None:
    """The transformer's :class:`MemoryAttachment`, or ``None`` if memory is not attached."""
    return getattr(transformer, _ATTACHMENT_ATTR, None)


def attach_memory(model: nn.Module | Any, *, route: Route = "auto") -> list[nn.Module]:
    """Let a stock Wan transformer take memory tokens through ``attention_kwargs``.

    Args:
        model: a ``WanTransformer3DModel``, or a pipeline: then every expert
            (``transformer`` and, for Wan2.2 A14B, ``transformer_2``) gets memory.
        route: memory attention route, ``"auto"`` (default), ``"lse"`` or ``"joint"``.

    Returns the transformers now attached. Attaching again is harmless: it sets the route and
    puts the memory processors back where ``set_attn_processor`` replaced them. Weights are
    untouched; without memory the output is bit-for-bit the stock one.
    """
    if not isinstance(model, nn.Module):
        return [t for e in _experts(model) for t in attach_memory(e, route=route)]
    check_route(route)
    existing = get_attachment(model)
    if existing is not None:
        existing.set_route(route, model)
        return [model]
    adapter = adapter_for(model)
    setattr(model, _ATTACHMENT_ATTR, MemoryAttachment(model, adapter, route))
    logger.debug("memory attached to %d blocks (route %s)", len(adapter.blocks(model)), route)
    return [model]


def detach_memory(model: nn.Module | Any) -> None:
    """Undo :func:`attach_memory` (stock processors back, hooks removed). No-op if not attached."""
    if not isinstance(model, nn.Module):
        for expert in _experts(model):
            detach_memory(expert)
        return
    attachment = get_attachment(model)
    if attachment is None:
        return
    attachment.remove(model)
    delattr(model, _ATTACHMENT_ATTR)


def attach_memory_to_pipeline(pipe: Any, *, route: Route = "auto") -> list[str]:
    """Attach to every expert of a Wan pipeline; returns the attribute names attached."""
    attach_memory(pipe, route=route)
    return [name for name in _EXPERT_ATTRS if getattr(pipe, name, None) is not None]


def detach_memory_from_pipeline(pipe: Any) -> None:
    """Detach from every expert of a Wan pipeline."""
    detach_memory(pipe)


def is_memory_attached(transformer: nn.Module) -> bool:
    """Whether :func:`attach_memory` is in effect on this transformer."""
    return get_attachment(transformer) is not None


class _BranchState(StateManager):
    """Receives diffusers' cache contexts and tells the attachment which branch is running."""

    def __init__(self, attachment: MemoryAttachment):
        super().__init__(BaseState)
        self.attachment = attachment

    def set_context(self, context) -> None:
        super().set_context(context)
        self.attachment.branch = None if context is None else context.name


class CFGBranchTracker(ModelHook):
    """A stateful diffusers hook: the loop's ``cache_context("cond" / "uncond")`` reaches it."""

    _is_stateful = True

    def __init__(self, attachment: MemoryAttachment):
        super().__init__()
        self.state = _BranchState(attachment)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.attachment.branch = None
        return module


@contextlib.contextmanager
def track_cfg_branches(model: nn.Module | Any) -> Iterator[None]:
    """Within this block, ``attention_kwargs`` may give the unconditional branch other memory
    (``negative_memory_tokens``; ``None``: none) than the conditional one (``memory_tokens``).

    The attached transformers learn the branch of each call from the ``cache_context`` names of
    the denoising loop (stock ``WanPipeline`` names them ``"cond"`` / ``"uncond"``). The hooks
    that listen are removed on exit (an attached model pickles again).
    """
    experts = [model] if isinstance(model, nn.Module) else _experts(model)
    registries = []
    try:
        for expert in experts:
            attachment = get_attachment(expert)
            if attachment is None:
                raise ValueError("track_cfg_branches needs memory attached (attach_memory)")
            registry = HookRegistry.check_if_exists_or_initialize(expert)
            registry.register_hook(CFGBranchTracker(attachment), _BRANCH_HOOK)
            registries.append((registry, attachment))
        yield
    finally:
        for registry, attachment in registries:
            registry.remove_hook(_BRANCH_HOOK, recurse=False)
            attachment.branch = None


_SAME = object()


def memory_attention_kwargs(
    memory: MemoryTokens | None,
    strength: float = 1.0,
    attention_kwargs: dict[str, Any] | None = None,
    negative_memory: Any = _SAME,
) -> dict[str, Any] | None:
    """``attention_kwargs`` carrying ``memory`` (``None`` memory → the other kwargs only).

    ``negative_memory``: the unconditional branch's memory if it differs (``None``: none there);
    then the call must run inside :func:`track_cfg_branches`.
    """
    out = dict(attention_kwargs or {})
    if memory is not None:
        out[MEMORY_TOKENS_KEY] = memory
        out[MEMORY_STRENGTH_KEY] = strength
        if negative_memory is not _SAME:
            out[NEGATIVE_MEMORY_TOKENS_KEY] = negative_memory
    return out or None
