"""``DiTMemPipeline``: stock ``WanPipeline`` plus memory, the way diffusers add-ons are used.

    pipe = DiTMemPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    pipe.load_memory("checkpoint/DiT-Mem-1.3B.safetensors", bank="memory_bank/")
    out = pipe("a dog runs on the beach", memory="retrieve")    # out.frames, out.memory

``__call__`` takes the installed ``WanPipeline.__call__``'s whole signature, and runs it: the
loop, the scheduler, guidance, callbacks and outputs are stock diffusers. Memory adds
``memory`` (``"retrieve"``, a ``MemoryTokens``, or ``None``), ``negative_memory`` (the
unconditional branch's memory: by default the same, as in the paper; ``None`` for the
conditional branch only), ``memory_scale`` (λ) and ``k``. Without memory the call is stock
``WanPipeline``'s, bit for bit.
"""

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from transformers import AutoTokenizer, UMT5EncoderModel

from dit_mem.backbone.injection import (
    MEMORY_STRENGTH_KEY,
    MEMORY_TOKENS_KEY,
    NEGATIVE_MEMORY_TOKENS_KEY,
    get_attachment,
    track_cfg_branches,
)
from dit_mem.loaders import MemoryLoaderMixin, check_memory_scale
from dit_mem.memory.encoder import MemoryEncoder
from dit_mem.memory.tokens import MemoryTokens
from dit_mem.retrieval.retriever import RetrievalResult
from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)

# Wan2.1's standard negative prompt (``sample_neg_prompt`` in Wan's shared config).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

RETRIEVE = "retrieve"


class _Same:
    """The default of ``negative_memory``: the conditional branch's memory."""

    def __repr__(self) -> str:
        return "SAME"


SAME = _Same()
_STOCK_CALL = inspect.signature(WanPipeline.__call__)


@dataclass
class DiTMemPipelineOutput(WanPipelineOutput):
    """``WanPipelineOutput`` plus what memory was retrieved for each prompt (``None``: none).

    ``to_tuple()`` (and ``return_dict=False``) gives ``(frames,)``, or ``(frames, memory)``.
    """

    memory: list[RetrievalResult] | None = None


class DiTMemPipeline(WanPipeline, MemoryLoaderMixin):
    """``WanPipeline`` with DiT-Mem's memory (see the module docstring)."""

    _optional_components = [*WanPipeline._optional_components, "memory_encoder"]
    model_cpu_offload_seq = "text_encoder->memory_encoder->transformer->transformer_2->vae"

    # (no ``from __future__ import annotations`` here: diffusers' ``from_pipe`` and loaders read
    # these annotations as classes)
    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: WanTransformer3DModel | None = None,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        memory_encoder: MemoryEncoder | None = None,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )
        self.register_modules(memory_encoder=memory_encoder)

    @torch.no_grad()
    def __call__(
        self,
        *args,
        memory: str | MemoryTokens | torch.Tensor | None = None,
        negative_memory: Any = SAME,
        memory_scale: float | None = None,
        k: int = 5,
        **kwargs,
    ) -> DiTMemPipelineOutput | tuple:
        """Stock ``WanPipeline.__call__`` (every argument), with memory.

        Args:
            memory: ``"retrieve"`` (the top-``k`` videos of the loaded bank for each prompt,
                encoded by the loaded encoder), ``MemoryTokens`` (batch 1, one per prompt, or one
                per video), a dense ``[B, L, D]`` tensor, or ``None`` (the stock pipeline).
            negative_memory: the unconditional branch's memory; by default the same (the paper),
                ``None`` for the conditional branch only, or other ``MemoryTokens``.
            memory_scale: λ for this call (default: :meth:`set_memory_scale`'s, 1).
            k: videos to retrieve per prompt.

        Returns a :class:`DiTMemPipelineOutput` (``frames``, ``memory``: what was retrieved).
        """
        call = _STOCK_CALL.bind(self, *args, **kwargs).arguments
        del call["self"]
        user_kwargs = dict(call.get("attention_kwargs") or {})
        given = [key for key in user_kwargs if "memory" in key]
        if memory is None:
            if negative_memory is not SAME and negative_memory is not None:
                raise ValueError("negative_memory was given without memory")
            if given and not self._memory_attached():
                raise ValueError(
                    f"attention_kwargs carry {given}, but no memory is attached to this pipeline: "
                    "call pipe.load_memory(...) (or dit_mem.attach_memory(pipe)) first"
                )
            return self._output(super().__call__(**call), None, call)
        if given:
            raise ValueError(f"give memory as memory=..., not also in attention_kwargs ({given})")
        if not self._memory_attached():
            raise ValueError(
                "memory was given, but this pipeline has none loaded: call "
                "pipe.load_memory(encoder, bank=...) first (or dit_mem.attach_memory(pipe) "
                "to pass MemoryTokens)"
            )

        # 1. memory for each prompt: retrieved, or given; broadcast like the prompts
        batch, per_prompt = self._batch_size(call), call.get("num_videos_per_prompt") or 1
        hits = None
        if isinstance(memory, str):
            if memory != RETRIEVE:
                raise ValueError(
                    f"memory must be {RETRIEVE!r}, MemoryTokens or None, got {memory!r}"
                )
            memory, hits = self._retrieve(call, k)
        memory = self._prepare(memory, batch, per_prompt, "memory")
        if negative_memory is SAME or negative_memory is None:
            negative = negative_memory
        elif isinstance(negative_memory, str):
            raise ValueError("negative_memory must be MemoryTokens, None or the default (same)")
        else:
            negative = self._prepare(negative_memory, batch, per_prompt, "negative_memory")
        scale = self._memory_scale if memory_scale is None else check_memory_scale(memory_scale)

        # 2. the stock call, memory in attention_kwargs (both branches, or per branch)
        attention_kwargs = {**user_kwargs, MEMORY_TOKENS_KEY: memory, MEMORY_STRENGTH_KEY: scale}
        if negative is SAME:
            output = super().__call__(**{**call, "attention_kwargs": attention_kwargs})
        else:
            attention_kwargs[NEGATIVE_MEMORY_TOKENS_KEY] = negative
            with track_cfg_branches(self):
                output = super().__call__(**{**call, "attention_kwargs": attention_kwargs})
        return self._output(output, hits, call)

    # ------------------------------------------------------------------ pieces of __call__
    def _memory_attached(self) -> bool:
        experts = [t for t in (self.transformer, getattr(self, "transformer_2", None)) if t]
        return bool(experts) and all(get_attachment(t) is not None for t in experts)

    @staticmethod
    def _batch_size(call: dict) -> int:
        prompt = call.get("prompt")
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        embeds = call.get("prompt_embeds")
        if embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        return embeds.shape[0]

    def _retrieve(self, call: dict, k: int) -> tuple[MemoryTokens, list[RetrievalResult]]:
        if self.memory_bank is None or getattr(self, "memory_encoder", None) is None:
            raise ValueError(
                'memory="retrieve" needs a memory bank and encoder: pipe.load_memory(encoder, '
                "bank=...)"
            )
        prompt = call.get("prompt")
        if prompt is None:
            raise ValueError('memory="retrieve" needs the prompt text (not only prompt_embeds)')
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer ≥ 1, got {k!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.memory_bank.memory(prompts, self.memory_encoder, k=k)

    def _prepare(self, memory: Any, batch: int, per_prompt: int, name: str) -> MemoryTokens:
        """Check, broadcast over ``num_videos_per_prompt`` and cast to the transformer."""
        if isinstance(memory, torch.Tensor):
            if memory.ndim != 3:
                raise ValueError(f"{name} as a tensor must be dense tokens [B, L, D]")
            memory = MemoryTokens.from_dense(memory)
        if not isinstance(memory, MemoryTokens):
            raise ValueError(
                f"{name} must be MemoryTokens, a dense [B, L, D] tensor, {RETRIEVE!r} or None, "
                f"got {type(memory).__name__}"
            )
        if not bool(
            torch.isfinite(memory.tokens).all() and torch.isfinite(memory.log_counts).all()
        ):
            raise ValueError(f"{name} holds NaN or infinite values")
        if memory.batch_size == batch and per_prompt > 1:
            memory = memory.repeat_batch(per_prompt)  # prompt-major, as the prompt embeddings
        elif memory.batch_size not in (1, batch * per_prompt):
            raise ValueError(
                f"{name} has batch {memory.batch_size}; expected 1 (shared), {batch} (one per "
                f"prompt) or {batch * per_prompt} (one per video)"
            )
        model = self.transformer if self.transformer is not None else self.transformer_2
        return memory.to(device=self._execution_device, dtype=model.dtype)

    @staticmethod
    def _output(output, hits, call: dict):
        if not call.get("return_dict", True):
            return tuple(output) if hits is None else (*output, hits)
        return DiTMemPipelineOutput(frames=output.frames, memory=hits)


def _signature() -> inspect.Signature:
    """``WanPipeline.__call__``'s parameters, then the memory ones (for ``help`` and tooling)."""
    stock = list(_STOCK_CALL.parameters.values())
    ours = [
        p
        for name, p in inspect.signature(DiTMemPipeline.__call__).parameters.items()
        if name in ("memory", "negative_memory", "memory_scale", "k")
    ]
    return _STOCK_CALL.replace(parameters=[*stock, *ours])


DiTMemPipeline.__call__.__signature__ = _signature()
