"""Video queries over ``[video keys ; memory keys]``, exactly, through diffusers' attention backends.

Every memory key carries an additive logit bias (``log multiplicity + log λ``), shared by all
queries and heads; video keys carry none. The video attention itself always runs on the attention
backend the user chose for the model (``set_attention_backend``, the ``attention_backend`` context,
or the default ``native``), with its context-parallel configuration. Two exact routes:

``"lse"``   The video part is one mask-free call of the backend that also returns the
            log-sum-exp, at the stock head dim; the G memory keys are a tiny float32 attention;
            both are merged in float32 through their log-sum-exps (as diffusers' ring attention
            merges its partial results). Under context parallelism the backend's log-sum-exp is
            already the global one of each local query, so the merge stays exact. Gradients: an
            autograd function whose backward runs the backend's own backward kernel with the
            *merged* output and log-sum-exp (the ring-attention identity) and the memory part in
            float32; available where diffusers exposes the backend's kernel pair (``native`` on
            CPU and CUDA fp16/bf16, ``_native_flash``, ``flash``, ``flash_hub``, ``_flash_3_hub``,
            ``_native_cudnn``) and without context parallelism.
``"joint"`` One mask-free call over the concatenated keys, the bias carried in 8 extra head
            channels: queries get ones, memory keys the bias (split in three parts of the input
            dtype, so bf16 keeps it to ~1e-7), video keys and all values zeros. A float mask
            would do the same but is rounded to bf16 and pushes GPU kernels off their fast
            path. Under context parallelism every rank appends the memory keys and their bias is
            lowered by ``log P`` (P ranks hold a copy each), so they count once. Differentiable
            wherever the backend is.
``"auto"``  ``"lse"`` where the backend gives a log-sum-exp (and, when gradients are needed,
            its backward); else ``"joint"``. A masked attention (HunyuanVideo-1.5's joint
            attention with its text padding mask) takes ``"lse"`` without gradients on the
            ``native`` backend without context parallelism (the masked kernel SDPA itself
            would run: CPU flash, CUDA memory-efficient, each with its log-sum-exp; the queries
            the mask hides from the memory get none of it); else ``"joint"``, the mask
            extended to the memory keys. The joint route pads the head dim (128 → 136), which
            costs HunyuanVideo-1.5 about 5% more FLOPs per step than the lse route.

Tensors use diffusers' attention layout ``[B, S, H, Dh]``; log-sum-exps ``[B, S, H]`` float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.models import attention_dispatch as dispatch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

from dit_mem.errors import UserError
from dit_mem.utils import get_logger

logger = get_logger(__name__)

Route = Literal["auto", "lse", "joint"]
ROUTES: tuple[str, ...] = ("auto", "lse", "joint")
_BIAS_CHANNELS = 3  # hi / mid / lo parts of the bias in the input dtype

# Backends whose diffusers function returns ``(out, lse)`` for ``return_lse=True`` (diffusers
# 0.42.x, as pyproject.toml bounds it; tests/test_dependencies.py checks the private names read here).
_LSE_BACKENDS = frozenset(
    {
        "flash",
        "flash_hub",
        "flash_varlen_hub",
        "flash_4_hub",
        "_flash_3",
        "_flash_3_hub",
        "_flash_3_varlen_hub",
        "_native_cudnn",
        "aiter_fa2_hub",
        "sage",
        "sage_hub",
    }
)
# Backends whose forward/backward kernel pair diffusers exposes for its templated attention,
# with the ring-attention override of ``out`` / ``lse`` in the backward.
_DIFFUSERS_OP_PAIRS = {
    "_native_flash": ("_native_flash_attention_forward_op", "_native_flash_attention_backward_op"),
    "flash": ("_flash_attention_forward_op", "_flash_attention_backward_op"),
    "flash_hub": ("_flash_attention_hub_forward_op", "_flash_attention_hub_backward_op"),
    "_flash_3_hub": ("_flash_attention_3_hub_forward_op", "_flash_attention_3_hub_backward_op"),
    "_native_cudnn": ("_cudnn_attention_forward_op", "_cudnn_attention_backward_op"),
}


def check_route(route: str) -> None:
    if route not in ROUTES:
        raise UserError(f"memory attention route must be one of {ROUTES}, got {route!r}")


def resolve_backend(backend: Any) -> str:
    """The backend name a processor's ``_attention_backend`` stands for (``None``: the active one)."""
    if backend is None:
        backend, _ = dispatch._AttentionBackendRegistry.get_active_backend()
    return AttentionBackendName(backend).value


def context_parallel_copies(parallel_config: Any) -> int:
    """How many ranks hold a copy of every memory key under ``parallel_config`` (1: none)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return 1
    return int(cp.ring_degree) * int(cp.ulysses_degree)


# --------------------------------------------------------------------------------------
# Kernel pairs in diffusers' templated-attention protocol
# --------------------------------------------------------------------------------------
def cpu_flash_forward_op(
    ctx,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config: Any = None,
):
    """PyTorch's CPU flash kernel (what SDPA runs on CPU) with its log-sum-exp, model layout
    (a boolean ``attn_mask`` forward only: rows it hides entirely give 0 with a log-sum-exp of 0,
    as SDPA gives)."""
    if enable_gqa or dropout_p or (attn_mask is not None and _save_ctx):
        raise UserError("the CPU flash kernel pair takes no GQA or dropout, a mask forward only")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=_additive(attn_mask, q.dtype), scale=scale
    )
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
    return (out, lse) if return_lse else out


def cpu_flash_backward_op(
    ctx,
    grad_out: torch.Tensor,
    *args,
    query: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    **kwargs,
):
    """Backward of :func:`cpu_flash_forward_op`; ``out``/``lse`` may be overridden (ring identity)."""
    saved = dict(zip(("query", "key", "value", "out", "lse"), ctx.saved_tensors, strict=True))
    given = {"query": query, "key": key, "value": value, "out": out, "lse": lse}
    t = {name: saved[name] if given[name] is None else given[name] for name in saved}
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.transpose(1, 2),
        t["query"].transpose(1, 2),
        t["key"].transpose(1, 2),
        t["value"].transpose(1, 2),
        t["out"].to(t["query"].dtype).transpose(1, 2),
        t["lse"].float().transpose(1, 2).contiguous(),
        0.0,
        ctx.is_causal,
        scale=ctx.scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def cuda_efficient_forward_op(
    ctx,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config: Any = None,
):
    """PyTorch's memory-efficient CUDA kernel with its log-sum-exp (forward only; any dtype; a
    boolean ``attn_mask`` as its additive bias, as SDPA passes it)."""
    if _save_ctx:
        raise NotImplementedError("the efficient-attention kernel pair here is forward-only")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    bias = _additive(attn_mask, q.dtype)
    if bias is not None:  # the kernel wants the bias rows 16-aligned (SDPA pads them the same)
        n = k.shape[2]
        bias = torch.nn.functional.pad(bias, (0, -n % 16))[..., :n]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q,
        k,
        v,
        None if bias is None else bias.expand(*q.shape[:3], k.shape[2]),
        True,
        dropout_p,
        is_causal,
        scale=scale,
    )[:2]
    out, lse = out.transpose(1, 2), lse.narrow(-1, 0, q.shape[2]).transpose(1, 2)  # lse is padded
    return (out, lse) if return_lse else out


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the additive float mask the kernels take (0 kept, −inf hidden)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def masked_lse_kernel(backend: Any, query: torch.Tensor):
    """The forward kernel that gives a masked attention's log-sum-exp here (the one SDPA would
    run with the mask), or ``None``: ``native`` only (a masked memory attention never runs under
    context parallelism: :func:`memory_attention` refuses it first)."""
    if resolve_backend(backend) != "native":
        return None
    if query.device.type == "cpu":
        return cpu_flash_forward_op
    return cuda_efficient_forward_op if query.device.type == "cuda" else None


@dataclass(frozen=True)
class KernelPair:
    """A backend's kernels in diffusers' templated-attention protocol."""

    forward: Any
    backward: Any | None  # None: forward only


def kernel_pair(backend: str, query: torch.Tensor) -> KernelPair | None:
    """The kernel pair behind ``backend`` for this device and dtype, if there is one."""
    half = query.dtype in (torch.float16, torch.bfloat16)
    if backend == "native":  # SDPA: the same kernels it would pick, called with their lse
        if query.device.type == "cpu":
            return KernelPair(cpu_flash_forward_op, cpu_flash_backward_op)
        if query.device.type == "cuda":
            if half:
                backend = "_native_flash"
            else:
                return KernelPair(cuda_efficient_forward_op, None)
    names = _DIFFUSERS_OP_PAIRS.get(backend)
    if names is None:
        return None
    forward, backward = (getattr(dispatch, n, None) for n in names)
    return KernelPair(forward, backward) if forward is not None else None


class _SavedTensors:
    """A stand-in for an autograd ctx, so a kernel pair can be driven from inside our Function."""

    saved_tensors: tuple[torch.Tensor, ...] = ()

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


# --------------------------------------------------------------------------------------
# One attention call on the chosen backend
# --------------------------------------------------------------------------------------
def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    backend: Any = None,
    parallel_config: Any = None,
    scale: float | None = None,
    return_lse: bool = False,
    attn_mask: torch.Tensor | None = None,
):
    """Plain attention on ``backend`` (``None``: the active one), with ``parallel_config``
    (``attn_mask``: a boolean ``[B, 1 | H, S, Sk]`` mask, without a log-sum-exp).

    ``return_lse=True`` returns ``(out, lse [B, S, H])``; ``ValueError`` where the backend has
    no log-sum-exp. Calls go through ``dispatch_attention_fn``, except where diffusers' own path
    cannot return what is asked (``native`` with a log-sum-exp or with ring attention, and
    ``_native_flash`` with a log-sum-exp outside context parallelism): there the same kernels
    are driven through diffusers' templated attention.
    """
    name = resolve_backend(backend)
    if attn_mask is not None:
        return dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, scale=scale, backend=AttentionBackendName(name)
        )
    pair = kernel_pair(name, query) if name in ("native", "_native_flash") else None
    if pair is not None and parallel_config is not None and pair.backward is not None:
        return dispatch._templated_context_parallel_attention(
            query,
            key,
            value,
            None,
            0.0,
            False,
            scale,
            False,
            return_lse,
            forward_op=pair.forward,
            backward_op=pair.backward,
            _parallel_config=parallel_config,
        )
    if pair is not None and return_lse and parallel_config is None:
        return pair.forward(
            None, query, key, value, None, 0.0, False, scale, False, True, _save_ctx=False
        )
    if return_lse and not has_lse(name, query, parallel_config):
        raise UserError(f"attention backend {name!r} returns no log-sum-exp here")
    out = dispatch_attention_fn(
        query,
        key,
        value,
        scale=scale,
        attention_kwargs={"return_lse": True} if return_lse else None,
        backend=AttentionBackendName(name),
        parallel_config=parallel_config,
    )
    if return_lse:
        out, lse = out[0], out[1]
        return out, (lse.squeeze(-1) if lse.ndim == 4 else lse)
    return out


def has_lse(backend: Any, query: torch.Tensor, parallel_config: Any = None) -> bool:
    """Whether :func:`attend` can return a log-sum-exp for ``backend`` here."""
    name = resolve_backend(backend)
    if name in ("native", "_native_flash"):
        pair = kernel_pair(name, query)
        return pair is not None and (parallel_config is None or pair.backward is not None)
    return name in _LSE_BACKENDS


# --------------------------------------------------------------------------------------
# The memory attention
# --------------------------------------------------------------------------------------
def _check_memory_shapes(query, memory_key, memory_value, memory_bias) -> None:
    b, _, h, d = query.shape
    if memory_key.shape[0] != b or memory_key.shape[2:] != (h, d):
        raise UserError(
            f"memory keys must be [B={b}, G, H={h}, Dh={d}], got {tuple(memory_key.shape)}"
        )
    if memory_value.shape != memory_key.shape:
        raise UserError(
            f"memory values {tuple(memory_value.shape)} must match memory keys "
            f"{tuple(memory_key.shape)}"
        )
    if memory_bias.shape != memory_key.shape[:2]:
        raise UserError(
            f"memory bias must be [B, G] = {tuple(memory_key.shape[:2])}, "
            f"got {tuple(memory_bias.shape)}"
        )


def _masked_memory_attention(
    tensors, scale, route, backend, needs_grad, attention_mask, memory_visible
) -> torch.Tensor:
    """:func:`memory_attention` with a key mask or queries that do not all see the memory: the
    backend's masked kernel with its log-sum-exp (inference, where it has one), else one joint
    attention over ``[video ; memory]`` keys with the mask extended to the memory keys."""
    query, key, value, memory_key, memory_value, memory_bias = tensors
    kernel = None if route == "joint" or needs_grad else masked_lse_kernel(backend, query)
    if kernel is not None:
        out, lse = kernel(
            None, query, key, value, attention_mask, 0.0, False, scale, False, True, _save_ctx=False
        )
        return merge_memory(
            query, out, lse, memory_key, memory_value, memory_bias, scale, memory_visible
        )[0]
    if route == "lse":
        raise UserError(
            "the 'lse' memory route is not available here: a masked attention "
            + ("with gradients" if needs_grad else f"on {resolve_backend(backend)!r}")
        )
    mask = _memory_mask(attention_mask, memory_visible, query, key, memory_key)
    return _joint_attention(*tensors, scale, backend, None, mask)


def memory_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    memory_bias: torch.Tensor,
    *,
    route: Route = "auto",
    backend: Any = None,
    parallel_config: Any = None,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    memory_visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax([q·kᵀ ; q·k_mᵀ + bias] · scale) · [v ; v_m]`` for the video queries only.

    Args:
        query, key, value: video tokens ``[B, S, H, Dh]`` (RoPE already applied to q and k); under
            context parallelism, this rank's share of the sequence.
        memory_key, memory_value: memory tokens ``[B, G, H, Dh]`` (no RoPE), whole on every rank.
        memory_bias: ``[B, G]`` additive logit bias of each memory key (float32 recommended).
        route: ``"auto"``, ``"lse"`` or ``"joint"`` (module docstring).
        backend: diffusers attention backend (``None``: the active one).
        parallel_config: the processor's ``_parallel_config`` (context parallelism) or ``None``.
        scale: softmax scale; default ``1/√Dh``.
        attention_mask: boolean ``[B, 1 | H, S, Sk]``, which keys each query may see (a joint
            attention's text padding); then the ``"joint"`` route, without context parallelism.
        memory_visible: boolean ``[B, S]``, which queries see the memory keys (default: all).

    Returns ``[B, S, H, Dh]`` in ``query``'s dtype.
    """
    check_route(route)
    _check_memory_shapes(query, memory_key, memory_value, memory_bias)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    tensors = (query, key, value, memory_key, memory_value, memory_bias)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if attention_mask is not None or memory_visible is not None:
        if parallel_config is not None:
            raise UserError("memory in a masked attention does not run under context parallelism")
        return _masked_memory_attention(
            tensors, scale, route, backend, needs_grad, attention_mask, memory_visible
        )
    if route != "joint":
        lse_reason = _lse_unavailable(backend, parallel_config, query, needs_grad)
        if lse_reason is None:
            if needs_grad:
                pair = kernel_pair(resolve_backend(backend), query)
                return _MemoryMerge.apply(*tensors, scale, pair)
            out, lse = attend(
                query,
                key,
                value,
                backend=backend,
                parallel_config=parallel_config,
                scale=scale,
                return_lse=True,
            )
            return merge_memory(query, out, lse, memory_key, memory_value, memory_bias, scale)[0]
        if route == "lse":
            raise UserError(f"the 'lse' memory route is not available here: {lse_reason}")
    return _joint_attention(*tensors, scale, backend, parallel_config)


def _lse_unavailable(backend, parallel_config, query, needs_grad) -> str | None:
    """Why the ``"lse"`` route cannot run (``None`` if it can)."""
    name = resolve_backend(backend)
    if not has_lse(name, query, parallel_config):
        return f"attention backend {name!r} returns no log-sum-exp on {query.device.type}"
    if needs_grad:
        if parallel_config is not None:
            return "gradients through the merge are not available under context parallelism"
        pair = kernel_pair(name, query)
        if pair is None or pair.backward is None:
            return f"no backward kernel of {name!r} that takes the merged log-sum-exp"
    return None


def merge_memory(
    query: torch.Tensor,
    video_out: torch.Tensor,
    video_lse: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    memory_bias: torch.Tensor,
    scale: float,
    memory_visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the memory keys to a finished video attention, in float32 (``memory_visible``:
    boolean ``[B, S]``, the queries that see them; default all).

    Returns the merged output (``query``'s dtype) and the merged log-sum-exp ``[B, S, H]``.
    """
    logits = torch.einsum("bshd,bghd->bshg", query.float(), memory_key.float()) * scale
    logits = logits + memory_bias.float()[:, None, None, :]  # [B, S, H, G]
    if memory_visible is not None:
        logits = logits.masked_fill(~memory_visible.bool()[:, :, None, None], -math.inf)
    total_lse = torch.logaddexp(video_lse.float(), torch.logsumexp(logits, dim=-1))
    memory_probs = torch.exp(logits - total_lse.unsqueeze(-1))  # already weighted by memory share
    out = torch.exp(video_lse.float() - total_lse).unsqueeze(-1) * video_out.float()
    out = out + torch.einsum("bshg,bghd->bshd", memory_probs, memory_value.float())
    return out.to(query.dtype), total_lse


class _MemoryMerge(torch.autograd.Function):
    """The ``"lse"`` route with gradients (no context parallelism).

    Backward: the video keys' part is the backend's own backward kernel given the merged output
    and log-sum-exp (``P = exp(S − L)`` and ``D = rowsum(dO ∘ O)`` are then those of the whole
    attention, exactly as ring attention drives it per key chunk); the memory keys' part is
    written out in float32.
    """

    @staticmethod
    def forward(ctx, query, key, value, memory_key, memory_value, memory_bias, scale, pair):
        inner = _SavedTensors()
        q, k, v = query.detach(), key.detach(), value.detach()  # the kernels record no graph
        video_out, video_lse = pair.forward(
            inner, q, k, v, None, 0.0, False, scale, False, True, _save_ctx=True
        )
        out, lse = merge_memory(
            query, video_out, video_lse, memory_key, memory_value, memory_bias, scale
        )
        ctx.inner, ctx.pair, ctx.scale = inner, pair, scale
        ctx.save_for_backward(query, key, value, memory_key, memory_value, memory_bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, memory_key, memory_value, memory_bias, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = ctx.pair.backward(
            ctx.inner, grad_out, query=query, key=key, value=value, out=out, lse=lse
        )[:3]
        g, o, q = grad_out.float(), out.float(), query.float()
        logits = torch.einsum("bshd,bghd->bshg", q, memory_key.float()) * ctx.scale
        probs = torch.exp(logits + memory_bias.float()[:, None, None, :] - lse.unsqueeze(-1))
        d_logits = probs * (
            torch.einsum("bshd,bghd->bshg", g, memory_value.float()) - (g * o).sum(-1, keepdim=True)
        )
        dq = dq.float() + torch.einsum("bshg,bghd->bshd", d_logits, memory_key.float()) * ctx.scale
        d_memory_key = torch.einsum("bshg,bshd->bghd", d_logits, q) * ctx.scale
        d_memory_value = torch.einsum("bshg,bshd->bghd", probs, g)
        d_bias = d_logits.sum(dim=(1, 2))
        return (
            dq.to(query.dtype),
            dk.to(key.dtype),
            dv.to(value.dtype),
            d_memory_key.to(memory_key.dtype),
            d_memory_value.to(memory_value.dtype),
            d_bias.to(memory_bias.dtype),
            None,
            None,
        )


def _memory_mask(attention_mask, memory_visible, query, key, memory_key) -> torch.Tensor:
    """Boolean ``[B, 1 | H, S, Sk + G]``: the video keys' mask, then the memory keys'."""
    b, s, h = query.shape[:3]
    if attention_mask is None:
        attention_mask = query.new_ones(b, 1, s, key.shape[1], dtype=torch.bool)
    if memory_visible is None:
        memory_visible = query.new_ones(b, s, dtype=torch.bool)
    heads = attention_mask.shape[1]
    memory = memory_visible.bool()[:, None, :, None].expand(b, heads, s, memory_key.shape[1])
    return torch.cat([attention_mask.bool().expand(b, heads, s, key.shape[1]), memory], dim=-1)


def _joint_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    memory_bias: torch.Tensor,
    scale: float,
    backend: Any,
    parallel_config: Any,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    b, s, h, d = query.shape
    g = memory_key.shape[1]
    dtype = query.dtype
    extra = -(-(d + _BIAS_CHANNELS) // 8) * 8 - d  # pad the head dim to a multiple of 8

    # (bias − log P) / scale, split so that the parts sum to it in float32 even in bf16
    bias = memory_bias.float() - math.log(context_parallel_copies(parallel_config))
    parts, rest = [], bias / scale
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
    if context_parallel_copies(parallel_config) > 1:
        # Ulysses' backward reshapes key gradients like query gradients: G idle queries make the
        # local query and key lengths equal (their outputs are dropped, so they get no gradient)
        q = torch.cat([q, q.new_zeros(b, g, h, q.shape[-1])], dim=1)
    out = attend(
        q, k, v, backend=backend, parallel_config=parallel_config, scale=scale, attn_mask=attn_mask
    )
    return out[:, :s, :, :d]
