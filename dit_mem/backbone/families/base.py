"""What a DiT family is: the one place that knows a diffusers transformer's structure.

Memory joins the block's own self-attention (or the video stream of its joint attention) the same
way in every family (method §4, §9). A :class:`Family` is its name and model classes and four
small parts, one per kind of consumer:

* :class:`Injection` — what the attention sees: where the blocks and their attention are, which
  stock processor they run, the forward arguments the hooks read *by name* (:class:`Arguments`),
  the memory tokens' modulation in the block, the memory processor (a :class:`MemoryProcessor`)
  and the paper's dense form of one block (for the tests and benchmarks);
* :class:`LatentSpace` — its VAE's latent space (normalisation, geometry, decoding);
* :class:`Training` — its text conditioning, flow shift and prediction call;
* :class:`Generation` — the defaults a generation config leaves open.

Everything else (the call state, the exact merge, context parallelism, loaders, bank, trainer,
CLI) is family-blind and reaches a family only through these parts.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dit_mem.backbone.attention import Route, check_route, memory_attention
from dit_mem.errors import UserError

if TYPE_CHECKING:
    from dit_mem.backbone.injection import CallMemory, MemoryAttachment


class Arguments:
    """A forward's parameters by name (read only), as diffusers' ``TransformerBlockMetadata``
    reads them: a keyword if given so, else the positional slot of that parameter."""

    def __init__(self, function: Any):
        names = list(inspect.signature(function).parameters)
        self.index = {name: i - 1 for i, name in enumerate(names) if i > 0}  # skip self

    def get(self, name: str, args: tuple, kwargs: dict, default: Any = None) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self.index[name]
        return args[i] if i < len(args) else default


class _StockAttribute:
    """An attribute diffusers sets on a processor, kept on the stock processor it composes."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, processor: Any, owner: type | None = None) -> Any:
        return self if processor is None else getattr(processor.stock, self.name)

    def __set__(self, processor: Any, value: Any) -> None:
        setattr(processor.stock, self.name, value)


class MemoryProcessor:
    """Base of a family's memory processor: composes the stock processor it replaces.

    Without memory in the running call it *is* the stock processor (it calls it). The attention
    backend and context-parallel configuration diffusers sets on it are the stock processor's,
    so ``set_attention_backend`` / ``enable_parallelism`` reach both.
    """

    def __init__(self, attachment: MemoryAttachment, block: nn.Module, stock: Any, route: Route):
        check_route(route)
        self.attachment, self.block, self.stock, self.route = attachment, block, stock, route

    _attention_backend = _StockAttribute()  # set by diffusers' set_attention_backend
    _parallel_config = _StockAttribute()  # set by diffusers' enable_parallelism

    def memory_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running call's memory through this block's modulation: ``(tokens [B, G, D] in the
        hidden dtype, bias [B, G] float32)``."""
        attachment = self.attachment
        call = attachment.memory
        tokens = attachment.injection.modulate(self.block, call, attachment.temb, hidden_states)
        bias = call.bias.to(hidden_states.device).expand(hidden_states.shape[0], -1)
        return tokens, bias

    def attend(self, query, key, value, memory_key, memory_value, bias, **masks) -> torch.Tensor:
        """Queries over ``[keys ; memory keys]`` on this processor's route, backend and
        context-parallel configuration (:func:`~dit_mem.backbone.attention.memory_attention`)."""
        return memory_attention(
            query,
            key,
            value,
            memory_key,
            memory_value,
            bias,
            route=self.route,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
            **masks,
        )

    def self_attention(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        rotate: Any = None,
        rotate_heads: Any = None,
    ) -> torch.Tensor:
        """A stock self-attention with memory: the video tokens' projections, q/k norms (across
        heads) and RoPE (``rotate`` before the head split, ``rotate_heads`` after), the memory
        tokens' same projections and k norm without RoPE, the video tokens as the only queries,
        then ``to_out``."""
        memory, bias = self.memory_inputs(hidden_states)
        query, key, value = project(attn, hidden_states)
        _, memory_key, memory_value = project(attn, memory)
        query, key, memory_key = attn.norm_q(query), attn.norm_k(key), attn.norm_k(memory_key)
        if rotate is not None:
            query, key = rotate(query), rotate(key)
        query, key, value, memory_key, memory_value = (
            t.unflatten(2, (attn.heads, -1)) for t in (query, key, value, memory_key, memory_value)
        )
        if rotate_heads is not None:
            query, key = rotate_heads(query), rotate_heads(key)
        out = self.attend(query, key, value, memory_key, memory_value, bias)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))


class SelfAttentionMemoryProcessor(MemoryProcessor):
    """``attn1`` of a block with the memory tokens as extra keys/values of its self-attention;
    cross-attention and calls without memory run the stock processor."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.attachment.memory is None or encoder_hidden_states is not None:
            return self.stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        if attention_mask is not None:
            raise UserError("memory tokens only go into self-attention without a mask")
        return self.self_attention(attn, hidden_states, **self.rotations(rotary_emb))

    def rotations(self, rotary_emb: Any) -> dict[str, Any]:
        """``rotate`` / ``rotate_heads`` of :meth:`self_attention` for the call's RoPE tables."""
        return {}


def project(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of self-attention, fused projections or not."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def noisiest(temb: torch.Tensor, call: CallMemory) -> torch.Tensor:
    """Per-token ``temb`` ``[B, S, ...]`` reduced to each row's noisiest token, ``[B, 1, ...]``.

    Memory takes the modulation of the token with the largest timestep: the current noisy
    timestep, not a clean conditioning frame's ``t = 0`` (Wan2.2 TI2V, LTX conditioning).
    """
    if call.noisy_token is None or temb.shape[1] != call.num_tokens:
        raise NotImplementedError(
            "memory with per-token timesteps needs every token's timestep in each block "
            f"(got temb for {temb.shape[1]} tokens, timesteps for {call.num_tokens}); "
            "context parallelism with per-token timesteps is not supported"
        )
    rows = torch.arange(temb.shape[0], device=temb.device)
    return temb[rows, call.noisy_token.to(temb.device)][:, None]


class Injection:
    """What the attention sees: the models and blocks memory joins and how (one subclass per
    family)."""

    transformer_classes: ClassVar[tuple[type, ...]]
    expert_names: ClassVar[tuple[str, ...]] = ("transformer",)  # pipeline attributes of experts
    block_classes: ClassVar[tuple[type, ...]]
    stock_processors: ClassVar[tuple[type, ...]]  # what the memory processor may replace
    processor: ClassVar[type[MemoryProcessor]]
    blocks_attribute: ClassVar[str] = "transformer_blocks"
    attention_attribute: ClassVar[str] = "attn1"
    # cache_context names of one transformer call whose rows hold several CFG branches, with
    # the branches in row order (e.g. LTXPipeline's batched "cond_uncond" is [uncond ; cond])
    batched_branches: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self) -> None:
        self._forward_args: dict[type, Arguments] = {}

    def hidden_size(self, transformer: nn.Module) -> int:
        return transformer.config.num_attention_heads * transformer.config.attention_head_dim

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return list(getattr(transformer, self.blocks_attribute))

    def attention(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.attention_attribute)

    def check(self, transformer: nn.Module) -> None:
        for i, block in enumerate(self.blocks(transformer)):
            if not isinstance(block, self.block_classes):
                raise UserError(
                    f"block {i} is a {type(block).__name__}, not a stock "
                    f"{names(self.block_classes)}; cannot attach memory"
                )

    def arguments(self, module: nn.Module) -> Arguments:
        """The forward parameters of ``module``'s class, by name (cached per class)."""
        cls = type(module)
        if cls not in self._forward_args:
            self._forward_args[cls] = Arguments(cls.forward)
        return self._forward_args[cls]

    def branch_layout(self, context: str | None) -> tuple[str, ...] | None:
        """The CFG branches of a call's rows, from its ``cache_context`` name (``None``: unknown).

        A name of one branch covers every row: ``"uncond"`` / ``"pred_uncond"`` (unconditional),
        ``"cond"`` / ``"pred_cond"`` / ``"pred_cond_skip"`` (conditional, perturbed or not); a
        call holding several branches is known only by name (:attr:`batched_branches`).
        """
        if context is None:
            return None
        if context in self.batched_branches:
            return self.batched_branches[context]
        words = set(context.split("_"))
        if "uncond" in words and "cond" not in words:
            return ("uncond",)
        if "cond" in words and "uncond" not in words:
            return ("cond",)
        return None

    def noisy_token(self, timestep: Any) -> tuple[torch.Tensor | None, int | None]:
        """Per-token timesteps ``[B, S]``: index of each row's noisiest token, and S."""
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
            return timestep.argmax(dim=1), timestep.shape[1]
        return None, None

    def modulate(
        self, block: nn.Module, call: CallMemory, temb: torch.Tensor, hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """Memory tokens ``[B, G, D]`` through the block's pre-attention norm + modulation, in
        the block's own arithmetic (the video stream's, for joint attention)."""
        raise NotImplementedError

    def dense_block(
        self,
        block: nn.Module,
        memory: torch.Tensor,
        repeats: int,
        noisy: torch.Tensor | None,
        args: tuple,
        kwargs: dict,
    ) -> Any:
        """The paper's form of one block: the stock block's forward with the dense memory
        ``[B, L, D]`` appended after its pre-attention modulation, as queries and keys (no RoPE),
        each memory token counted ``repeats`` times (λ), outputs sliced off. ``noisy``: each
        row's noisiest token, for per-token timesteps."""
        raise NotImplementedError

    def block_inputs(self, block: nn.Module, args: tuple, kwargs: dict, names: str) -> list:
        """The block's forward arguments of these (space-separated) names, in this order."""
        arguments = self.arguments(block)
        return [arguments.get(name, args, kwargs) for name in names.split()]


class LatentSpace:
    """The latent space of a family's VAE (one subclass per family)."""

    vae_classes: ClassVar[tuple[type, ...]] = ()

    def normalize(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """``z`` of the VAE encoder ``[B, C, T, H, W]`` → the space the DiT denoises in."""
        raise NotImplementedError

    def denormalize(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """De-normalised latents → frames in [-1, 1] (the VAE's own ``decode``)."""
        return vae.decode(z, return_dict=False)[0]

    def geometry(self, vae: nn.Module) -> tuple[int, int, int]:
        """``(channels, temporal compression, spatial compression)`` of the VAE."""
        cfg = vae.config
        return cfg.latent_channels, cfg.temporal_compression_ratio, cfg.spatial_compression_ratio

    def record(self, vae: nn.Module) -> dict[str, Any]:
        """How latents are normalised, as a latent folder's manifest records it."""
        raise NotImplementedError

    def patch_size(self, config: dict[str, Any]) -> tuple[int, int]:
        """``(frames, pixels)`` of latent a transformer patch covers, from its config."""
        return int(config.get("patch_size_t", 1)), int(config.get("patch_size", 1))

    def shape(self, vae: nn.Module, num_frames: int, height: int, width: int) -> list[int]:
        """``[C, T, H, W]`` of a clip's latent; a user error for a size the VAE cannot take."""
        channels, t, s = self.geometry(vae)
        if (num_frames - 1) % t or height % s or width % s:
            raise UserError(
                f"the {type(vae).__name__} takes {t}k+1 frames of a height and width that are "
                f"multiples of {s}; got {num_frames} frames of {height}×{width}"
            )
        return [channels, (num_frames - 1) // t + 1, height // s, width // s]


class Training:
    """How a family trains: its text conditioning, flow shift and prediction call."""

    # the transformer arguments holding text embeddings (the first is the primary stream, whose
    # length data.max_text_tokens sets), their masks, and their widths' transformer config keys
    text_streams: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)
    text_masks: ClassVar[tuple[str, ...]] = ()
    text_dim_keys: ClassVar[tuple[str, ...]] = ("text_dim",)
    # the pipeline components that encode text (the text cache loads only these)
    text_components: ClassVar[tuple[str, ...]] = ("tokenizer", "text_encoder")
    default_max_text_tokens: ClassVar[int] = 512
    default_loss_weighting: ClassVar[str] = "none"  # dit_mem.training.loss.WEIGHTINGS

    def encode_text(self, text_model: Any, captions: Sequence[str], max_tokens: int) -> list[dict]:
        """Each caption's embeddings, as the family's pipeline (``text_model``, holding only
        :attr:`text_components`) makes them, one tensor
        ``[valid tokens, D]`` per stream of :attr:`text_streams`."""
        raise NotImplementedError

    def text_kwargs(self, texts: Sequence[dict], max_tokens: int) -> dict[str, torch.Tensor]:
        """A batch of :meth:`encode_text` results as the transformer's text arguments: masked
        streams padded to the longest, with their masks (override for unmasked text)."""
        out = {}
        for stream, mask_name in zip(self.text_streams, self.text_masks, strict=True):
            parts = [t[stream] for t in texts]
            length = max(1, max(p.shape[0] for p in parts))
            out[stream] = pad_rows(parts, length)
            out[mask_name] = torch.stack([torch.arange(length) < p.shape[0] for p in parts]).to(
                out[stream].device
            )
        return out

    def text_dims(self, transformer: nn.Module) -> dict[str, int]:
        """The width of each text stream the transformer takes."""
        keys = zip(self.text_streams, self.text_dim_keys, strict=True)
        return {stream: int(transformer.config[key]) for stream, key in keys}

    def fixed_inputs(self, base_dir: Path) -> dict[str, Any]:
        """Fixed transformer arguments of training calls, read from the base model's configs."""
        return {}

    def flow_shift(self, base_dir: Path, latent_shape: Sequence[int]) -> float:
        """The flow shift the family trains (and samples) this latent size with."""
        return float(read_config(base_dir / "scheduler" / "scheduler_config.json").get("shift", 1))

    def predict(
        self,
        transformer: nn.Module,
        x_t: torch.Tensor,
        timestep: torch.Tensor,
        text: dict[str, torch.Tensor],
        attention_kwargs: dict | None,
        fixed: dict[str, Any],
    ) -> torch.Tensor:
        """The transformer's flow prediction for latents ``x_t [B, C, T, H, W]``, same layout."""
        return transformer(
            hidden_states=x_t,
            timestep=timestep,
            attention_kwargs=attention_kwargs,
            return_dict=False,
            **text,
            **fixed,
        )[0]


class Generation:
    """The generation defaults a config leaves open (the rest is the stock pipeline's own: its
    call's defaults and its folder's scheduler)."""

    fps: ClassVar[int] = 16  # frames per second of the written video
    negative_prompt: ClassVar[str | None] = None

    def default_size(self, model: Any) -> tuple[int, int]:
        """``(height, width)`` of a generation where the stock call has no default for them
        (``model``: a described base model, :class:`~dit_mem.models.base_model.BaseModel`)."""
        raise NotImplementedError("the pipeline names its default size")


@dataclass(frozen=True, eq=False)
class Family:
    """One DiT family: its name and the parts its consumers read (one per module of
    :mod:`dit_mem.backbone.families`)."""

    name: str
    injection: Injection
    latents: LatentSpace
    training: Training
    generation: Generation = field(default_factory=Generation)
    # components the stock pipeline's __init__ reads: loaded even when a job skips them
    init_components: tuple[str, ...] = ()

    def matches(self, model: Any) -> bool:
        return isinstance(model, self.injection.transformer_classes)

    def __repr__(self) -> str:
        return f"<{self.name} family>"


def pad_rows(parts: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """``[n_i, D]`` tensors as ``[B, length, D]``, zeros after each."""
    out = parts[0].new_zeros(len(parts), length, parts[0].shape[-1])
    for i, p in enumerate(parts):
        out[i, : min(length, p.shape[0])] = p[:length]
    return out


def read_config(path: Path) -> dict[str, Any]:
    """A component's ``config.json`` / ``scheduler_config.json`` ({} if absent)."""
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def with_memory(
    hidden_states: torch.Tensor, memory: torch.Tensor, repeats: int
) -> tuple[torch.Tensor, int]:
    """``[video ; memory]`` ``[B, S + L, D]`` for the paper's form: the dense memory ``[1 | B, L,
    D]`` for every row, each token ``repeats`` times (λ: integer multiplicities), and L."""
    memory = memory.to(hidden_states).expand(hidden_states.shape[0], -1, -1)
    memory = memory.repeat_interleave(repeats, dim=1)
    return torch.cat([hidden_states, memory], dim=1), memory.shape[1]


def identity_rotation(cos: torch.Tensor, sin: torch.Tensor, n: int, dim: int) -> tuple:
    """RoPE tables extended by ``n`` positions along ``dim`` that do not rotate (cos 1, sin 0)."""
    shape = list(cos.shape)
    shape[dim] = n
    return torch.cat([cos, cos.new_ones(shape)], dim), torch.cat([sin, sin.new_zeros(shape)], dim)


def names(classes: Sequence[type]) -> str:
    return " / ".join(c.__name__ for c in classes)
