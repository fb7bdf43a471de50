"""Memory tokens in the self-attention of a stock diffusers video DiT (method §4, §9), any family.

``attach_memory(model_or_pipeline)`` changes those instances only, and ``detach_memory`` undoes
it; the family (:mod:`dit_mem.backbone.families`) is picked from the model's class. Memory takes
one visible path, through diffusers' own hook registry (named hooks that own their state, as
``hooks/first_block_cache.py`` does):

1. **The call.** The caller passes ``attention_kwargs={"memory_tokens": m, "memory_strength": λ}``
   (stock pipelines forward ``attention_kwargs`` to every transformer call). The transformer's
   hook ``dit_mem.memory`` reads them by name, checks them and keeps them on the
   :class:`MemoryAttachment` as this call's :class:`CallMemory`; no argument is changed. It is
   stateful: the denoising loop's ``cache_context`` names ("cond", "uncond", "cond_uncond",
   "pred_uncond", ...) reach it, so ``negative_memory_tokens`` can go to the unconditional rows
   only, in separate or batched CFG calls.
2. **The block.** Each block's hook ``dit_mem.memory_block`` notes the block's ``temb`` (by name,
   read only): the memory tokens need the block's modulation.
3. **The processor.** Each block's attention gets its family's memory processor. It runs inside
   the block's own forward, after every offloading hook has put the block's weights in place,
   modulates the memory tokens there, projects them with the same q/k/v and q/k norms (no RoPE)
   and attends through the attention backend and context-parallel configuration diffusers gave
   the stock processor (:mod:`dit_mem.backbone.attention`). Without memory it calls the stock
   processor itself: the output is the stock model's, bit for bit.

The memory keys' logits get ``log multiplicity + log λ`` (float32). The hooks' forward wrappers
are module-level functions, so an attached model pickles, deep-copies and ``torch.save``-s.

Usage::

    attach_memory(pipe)                              # or attach_memory(pipe.transformer)
    out = pipe(prompt, attention_kwargs={"memory_tokens": memory, "memory_strength": 1.0})
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
from torch import nn

from dit_mem.backbone.attention import Route, check_route
from dit_mem.backbone.families import Family, family_of
from dit_mem.backbone.families.base import names
from dit_mem.errors import UserError
from dit_mem.memory.tokens import MemoryTokens, as_memory_tokens, check_memory_scale
from dit_mem.utils import get_logger

logger = get_logger(__name__)

MEMORY_TOKENS_KEY = "memory_tokens"
NEGATIVE_MEMORY_TOKENS_KEY = "negative_memory_tokens"  # the unconditional rows', if different
MEMORY_STRENGTH_KEY = "memory_strength"
# a callable saying which guidance branch the running call is ("cond" / "uncond"), asked at each
# call: a loop that does not name its calls with cache_context (Wan's modular denoise) hands it
# over, read from what its guider runs (dit_mem.modular)
MEMORY_BRANCH_KEY = "memory_branch"
_MEMORY_KEYS = (
    MEMORY_TOKENS_KEY,
    NEGATIVE_MEMORY_TOKENS_KEY,
    MEMORY_STRENGTH_KEY,
    MEMORY_BRANCH_KEY,
)
HOOK = "dit_mem.memory"
BLOCK_HOOK = "dit_mem.memory_block"
PAB_HOOK = "pyramid_attention_broadcast"  # the name diffusers registers its hook under
_ATTACHMENT_ATTR = "_dit_mem_attachment"


# --------------------------------------------------------------------------------------
# What one transformer call carries
# --------------------------------------------------------------------------------------
@dataclass
class CallMemory:
    """Memory of one transformer call (checked; batch 1 or the call's)."""

    tokens: torch.Tensor  # [Bm, G, D]
    bias: torch.Tensor  # [Bm, G] float32: log multiplicity + log λ (−inf: no memory in that row)
    noisy_token: torch.Tensor | None = None  # [B] index of the noisiest token (per-token t)
    num_tokens: int | None = None  # sequence length the per-token timesteps were given for


def check_width(dim: int, transformer: nn.Module, what: str = "memory encoder width") -> None:
    """``ValueError`` unless memory of width ``dim`` fits the DiT's hidden size."""
    width = family_of(transformer).injection.hidden_size(transformer)
    if dim != width:
        raise UserError(
            f"{what} {dim} does not match the DiT's hidden size {width} (use the memory encoder "
            "of this backbone)"
        )


def _rows(memory: MemoryTokens | None, rows: int, dim: int, name: str) -> MemoryTokens | None:
    """Checked memory of one block of rows (batch 1 or ``rows``)."""
    if memory is None:
        return None
    memory = as_memory_tokens(memory, name)
    if memory.dim != dim:
        raise UserError(
            f"memory tokens have dim {memory.dim} but the transformer's hidden size is {dim}"
        )
    if memory.batch_size not in (1, rows):
        raise UserError(
            f"memory batch {memory.batch_size} does not match the transformer batch {rows} "
            "(give one memory per batch element, or batch 1 to share it)"
        )
    return memory


def combine_rows(parts: list[MemoryTokens | None], rows: int, strength: float) -> CallMemory | None:
    """One ``CallMemory`` for consecutive row blocks of ``rows`` rows, each with its own memory.

    A block without memory gets zero tokens at logit bias −inf (they take no attention weight);
    blocks with fewer distinct tokens are padded the same way.
    """
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(parts) == 1:
        return CallMemory(present[0].tokens, present[0].attention_bias(strength))
    ref = present[0].tokens
    width = max(p.num_distinct for p in present)
    tokens, biases = [], []
    for part in parts:
        t = ref.new_zeros(rows, width, ref.shape[-1])
        b = torch.full((rows, width), float("-inf"), device=ref.device)
        if part is not None:
            g = part.num_distinct
            t[:, :g] = part.tokens.to(t)
            b[:, :g] = part.attention_bias(strength).to(b.device)
        tokens.append(t)
        biases.append(b)
    return CallMemory(torch.cat(tokens), torch.cat(biases))


# --------------------------------------------------------------------------------------
# Hooks (diffusers' registry), with forward wrappers that pickle
# --------------------------------------------------------------------------------------
def _hooked_forward(module: nn.Module, fn_ref: Any, *args, **kwargs):
    """What diffusers' ``HookRegistry`` wraps a forward in, as a module-level function."""
    args, kwargs = fn_ref.pre_forward(module, *args, **kwargs)
    return fn_ref.post_forward(module, fn_ref.forward(*args, **kwargs))


def _register(module: nn.Module, hook: ModelHook, name: str) -> HookRegistry:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    # the registry's own wrapper is a closure, which pickle cannot name: the same call through
    # a module-level function (a later hook wraps this one as it would have wrapped diffusers')
    ref = hook.fn_ref
    module.forward = functools.update_wrapper(
        functools.partial(_hooked_forward, module, ref), ref.forward
    )
    return registry


def _unregister(module: nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    forward = vars(module).get("forward")
    if getattr(forward, "__func__", None) is type(module).forward and forward.__self__ is module:
        del module.forward  # the registry put the plain bound method back as an attribute


class CallContext(StateManager):
    """The name of the running ``cache_context`` ("cond", "uncond", ...): diffusers hands it to
    every stateful hook's state manager through ``StateManager.set_context``."""

    def __init__(self):
        super().__init__(BaseState)
        self.name: str | None = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name

    def reset(self, *args, **kwargs) -> None:
        super().reset(*args, **kwargs)
        self.name = None


class MemoryHook(ModelHook):
    """The transformer's hook: takes each call's memory, and hears the loop's cache contexts."""

    _is_stateful = True

    def __init__(self, attachment: MemoryAttachment):
        super().__init__()
        self.attachment = attachment
        self.contexts = CallContext()

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        self.attachment.begin_call(module, args, kwargs, self.contexts.name)
        return args, kwargs

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.attachment.memory = self.attachment.temb = None
        return module


class BlockMemoryHook(ModelHook):
    """A block's hook: notes the ``temb`` it was called with, for its memory processor."""

    def __init__(self, attachment: MemoryAttachment):
        super().__init__()
        self.attachment = attachment

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        attachment = self.attachment
        if attachment.memory is not None:
            attachment.temb = attachment.injection.arguments(module).get("temb", args, kwargs)
        return args, kwargs


# --------------------------------------------------------------------------------------
# The attachment: per-call state, hooks and processors of one transformer
# --------------------------------------------------------------------------------------
class MemoryAttachment:
    """Memory on one transformer: its family, hooks, processors and the running call's memory.

    ``memory`` is the current call's :class:`CallMemory` (``None``: the stock model) and ``temb``
    the ``temb`` of the block now running; both are per-call state (not pickled).
    """

    def __init__(self, transformer: nn.Module, family: Family, route: Route = "auto"):
        self.family = family
        self.dim = self.injection.hidden_size(transformer)
        self.route: Route = route
        self.memory: CallMemory | None = None
        self.temb: torch.Tensor | None = None
        self.original_processors: dict[int, Any] = {}
        # the blocks as attached: a cache that wraps the block list later (cache-dit swaps it
        # while forward runs) leaves the same blocks running, and these are they
        self.blocks: list[nn.Module] = list(self.injection.blocks(transformer))
        # read the signatures now, not inside a compiled graph
        self.injection.arguments(transformer)
        registry = _register(transformer, MemoryHook(self), HOOK)
        for block in self.blocks:
            self.injection.arguments(block)
            _register(block, BlockMemoryHook(self), BLOCK_HOOK)
        registry.invalidate_child_registries_cache()
        self.install_processors()

    @property
    def injection(self):
        """What the attention sees, of this attachment's family."""
        return self.family.injection

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "memory": None, "temb": None}

    # -- processors ------------------------------------------------------------------------
    def attentions(self) -> list[nn.Module]:
        """The attention modules of the blocks memory was attached to."""
        return [self.injection.attention(b) for b in self.blocks]

    def is_ours(self, processor: Any) -> bool:
        return isinstance(processor, self.injection.processor) and processor.attachment is self

    def install_processors(self) -> None:
        """Give every block the memory processor (again, where ``set_attn_processor`` replaced it)."""
        for i, (block, attn) in enumerate(zip(self.blocks, self.attentions(), strict=True)):
            old = attn.processor
            if self.is_ours(old):
                old.route = self.route
                continue
            if not isinstance(old, self.injection.stock_processors):
                raise UserError(
                    f"block {i}'s attention uses {type(old).__name__}, not a "
                    f"{names(self.injection.stock_processors)}; cannot "
                    "attach memory"
                )
            self.original_processors[i] = old
            attn.set_processor(self.injection.processor(self, block, old, self.route))

    def set_route(self, route: Route) -> None:
        check_route(route)
        self.route = route
        self.install_processors()

    def remove(self, transformer: nn.Module) -> None:
        for i, attn in enumerate(self.attentions()):
            if self.is_ours(attn.processor):
                attn.set_processor(self.original_processors[i])
        for block in self.blocks:
            _unregister(block, BLOCK_HOOK)
        _unregister(transformer, HOOK)
        self.memory = self.temb = None

    # -- one call --------------------------------------------------------------------------
    def begin_call(self, module: nn.Module, args: tuple, kwargs: dict, context: str | None) -> None:
        """Take this call's memory from ``attention_kwargs`` (or none), checked."""
        self.memory = self.temb = None
        arguments = self.injection.arguments(module)
        attention_kwargs = arguments.get("attention_kwargs", args, kwargs) or {}
        given = [k for k in attention_kwargs if "memory" in k]
        if not given:
            return
        unknown = [k for k in given if k not in _MEMORY_KEYS]
        if unknown:
            raise UserError(f"unknown memory option(s) {unknown}; known: {list(_MEMORY_KEYS)}")
        strength = attention_kwargs.get(MEMORY_STRENGTH_KEY, 1.0)
        if not torch.compiler.is_compiling():  # a traced λ is checked where it entered
            strength = check_memory_scale(strength)
        memory = (attention_kwargs.get(MEMORY_TOKENS_KEY), MEMORY_TOKENS_KEY)
        branch = attention_kwargs.get(MEMORY_BRANCH_KEY)
        if branch is not None:  # what the loop's guider runs now decides, not a name
            context = branch()
            if context not in ("cond", "uncond"):
                raise UserError(
                    f"{MEMORY_BRANCH_KEY}() must say 'cond' or 'uncond', got {context!r}"
                )
        layout = self.injection.branch_layout(context)
        if NEGATIVE_MEMORY_TOKENS_KEY in attention_kwargs:
            if layout is None:
                raise UserError(
                    f"{NEGATIVE_MEMORY_TOKENS_KEY} needs to know which classifier-free guidance "
                    "branch each call is: the denoising loop must name its calls with "
                    "cache_context('cond' / 'uncond'), as stock diffusers pipelines do "
                    f"(this call's context: {context!r})"
                )
            negative = (attention_kwargs[NEGATIVE_MEMORY_TOKENS_KEY], NEGATIVE_MEMORY_TOKENS_KEY)
            given_parts = [negative if branch == "uncond" else memory for branch in layout]
            if len(layout) == 1 and negative[0] is not memory[0]:
                self.check_no_broadcast()
        else:
            given_parts = [memory] * len(layout or ("cond",))
        if strength == 0 or all(m is None for m, _ in given_parts):
            return  # memory off (λ = 0) or none for these rows: the stock model
        self.check_processors()
        batch = arguments.get("hidden_states", args, kwargs).shape[0]
        if batch % len(given_parts):
            raise UserError(
                f"a call of {batch} rows cannot hold the {len(given_parts)} guidance branches "
                f"{layout} of cache_context {context!r}"
            )
        rows = batch // len(given_parts)
        parts = [_rows(m, rows, self.dim, name) for m, name in given_parts]
        call = combine_rows(parts, rows, strength)
        if call is None:
            return
        call.noisy_token, call.num_tokens = self.injection.noisy_token(
            arguments.get("timestep", args, kwargs)
        )
        self.memory = call

    def check_no_broadcast(self) -> None:
        """``ValueError`` if Pyramid Attention Broadcast caches a memory attention: it keeps one
        output per attention module across calls, so with guidance as separate calls the
        unconditional call would reuse the conditional call's attention, its memory included."""
        for i, attn in enumerate(self.attentions()):
            registry = getattr(attn, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(PAB_HOOK) is not None:
                raise UserError(
                    "memory per guidance branch (negative_memory / negative_memory_tokens) cannot "
                    f"hold under Pyramid Attention Broadcast (on block {i}'s attention): it keeps "
                    "one attention output per module and reuses it in the next call, so the "
                    "unconditional call would get the conditional call's memory. Use the same "
                    "memory in both branches, or a cache that keeps a state per branch "
                    "(FirstBlockCache, TaylorSeer, MagCache)"
                )

    def check_processors(self) -> None:
        processors = [attn.processor for attn in self.attentions()]
        replaced = [i for i, p in enumerate(processors) if not self.is_ours(p)]
        if replaced:  # e.g. set_attn_processor after attach_memory
            kind = type(processors[replaced[0]])
            raise UserError(
                f"memory tokens were given, but the attention of {len(replaced)} block(s) "
                f"(first: block {replaced[0]}) no longer has the memory processor (it has "
                f"{kind.__name__}; was set_attn_processor called after attach_memory?). "
                "Call attach_memory(transformer) again to put memory back."
            )


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def experts(pipe: Any) -> list[nn.Module]:
    """The transformers of a pipeline that memory goes into (Wan2.2 A14B: both experts)."""
    first = getattr(pipe, "transformer", None)
    if first is None:
        raise UserError(f"{type(pipe).__name__} holds no transformer to attach memory to")
    family = family_of(first)
    found = [getattr(pipe, name, None) for name in family.injection.expert_names]
    return [e for e in found if e is not None]


def get_attachment(transformer: nn.Module) -> MemoryAttachment | None:
    """The transformer's :class:`MemoryAttachment`, or ``None`` if memory is not attached."""
    return getattr(transformer, _ATTACHMENT_ATTR, None)


def attach_memory(model: nn.Module | Any, *, route: Route = "auto") -> list[nn.Module]:
    """Let a stock diffusers video DiT take memory tokens through ``attention_kwargs``.

    Args:
        model: a transformer of a supported family (``WanTransformer3DModel``,
            ``WanVACETransformer3DModel``, ``LTXVideoTransformer3DModel``,
            ``HunyuanVideo15Transformer3DModel``), or a pipeline: then every expert
            (``transformer`` and, for Wan2.2 A14B, ``transformer_2``) gets memory.
        route: memory attention route, ``"auto"`` (default), ``"lse"`` or ``"joint"``.

    Returns the transformers now attached. Attaching again is harmless: it sets the route and
    puts the memory processors back where ``set_attn_processor`` replaced them. Weights are
    untouched; without memory the output is bit-for-bit the stock one.
    """
    if not isinstance(model, nn.Module):
        return [t for e in experts(model) for t in attach_memory(e, route=route)]
    check_route(route)
    existing = get_attachment(model)
    if existing is not None:
        existing.set_route(route)
        return [model]
    family = family_of(model)
    family.injection.check(model)
    setattr(model, _ATTACHMENT_ATTR, MemoryAttachment(model, family, route))
    logger.debug(
        "memory attached to %d %s blocks (route %s)",
        len(family.injection.blocks(model)),
        family.name,
        route,
    )
    return [model]


def detach_memory(model: nn.Module | Any) -> None:
    """Undo :func:`attach_memory` (stock processors back, hooks removed). No-op if not attached."""
    if not isinstance(model, nn.Module):
        for expert in experts(model):
            detach_memory(expert)
        return
    attachment = get_attachment(model)
    if attachment is None:
        return
    attachment.remove(model)
    delattr(model, _ATTACHMENT_ATTR)
