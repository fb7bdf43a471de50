"""Memory in Modular Diffusers: one step that puts memory before the denoise loop.

    from diffusers.modular_pipelines import WanBlocks
    from dit_mem.modular import add_memory, load_memory

    blocks = add_memory(WanBlocks())                   # the family's blocks, memory before denoise
    pipe = blocks.init_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    pipe.load_components(torch_dtype=torch.bfloat16)
    load_memory(pipe, "checkpoint/DiT-Mem-1.3B.safetensors", bank="memory_bank/")
    videos, hits = pipe(prompt="a dog runs on the beach", memory="retrieve",
                        output=["videos", "memory_hits"])

:class:`MemoryStep` takes ``memory`` (``"retrieve"``, ``MemoryTokens``, a dense tensor or
``None``), ``negative_memory`` (not given: the same; ``"none"`` or memory of its own for the
unconditional branch: a modular input of ``None`` means "not given"), ``memory_scale`` (λ) and ``k``, and hands the denoiser
``attention_kwargs`` with the memory, through the same :func:`dit_mem.pipeline.memory_call` as
every memory pipeline; what was retrieved is the state's ``memory_hits``. Which guidance branch a
transformer call is comes from what the pipeline's guider runs at that moment (its
``is_conditional``; of two guiders, as Wan2.2's, the one set for the running step), so
``negative_memory`` holds in every loop that runs its branches through a guider.
"""

from __future__ import annotations

import copy
from typing import Any

from diffusers.modular_pipelines import (
    ModularPipelineBlocks,
    PipelineState,
    SequentialPipelineBlocks,
)
from diffusers.modular_pipelines.modular_pipeline_utils import (
    ComponentSpec,
    InputParam,
    OutputParam,
)

from dit_mem.backbone.injection import MEMORY_BRANCH_KEY
from dit_mem.bank import MemoryBank
from dit_mem.errors import UserError
from dit_mem.loaders import memory_parts
from dit_mem.memory.encoder import MemoryEncoder
from dit_mem.memory.tokens import check_memory_scale
from dit_mem.pipeline import SAME, memory_call

MEMORY_STEP = "memory"  # the step's name among the blocks
GUIDERS = ("guider", "guider_2")  # the guider components a family's loop may run


class GuidanceBranch:
    """Which branch the running transformer call is, read from the guider that runs it: the
    guider set for the latest step (Wan2.2's loop switches guiders by step; the memory step sets
    every guider to step -1 before the loop), conditional while it prepares its conditional
    batch."""

    def __init__(self, guiders: list[Any]):
        self.guiders = guiders

    def __call__(self) -> str:
        def step(guider) -> int:
            value = guider.get_state().get("step")
            return -1 if value is None else int(value)

        running = max(self.guiders, key=step)
        return "cond" if running.is_conditional else "uncond"


class MemoryStep(ModularPipelineBlocks):
    """Memory for the denoiser: retrieved from the bank or given, in ``attention_kwargs``."""

    model_name = None

    @property
    def description(self) -> str:
        return (
            "DiT-Mem: the memory of each prompt (retrieved from memory_bank and encoded by "
            "memory_encoder, or given as MemoryTokens) handed to the denoiser in attention_kwargs"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec("memory_encoder", MemoryEncoder, description="the memory encoder"),
            ComponentSpec("memory_bank", MemoryBank, description="the bank to retrieve from"),
        ]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("prompt", description="the prompt text (retrieval reads it)"),
            InputParam("prompt_embeds", description="the batch, without prompt text"),
            InputParam("num_videos_per_prompt", default=1),
            InputParam(
                "memory", description='"retrieve", MemoryTokens, a [B, L, D] tensor or None'
            ),
            InputParam(
                "negative_memory",
                description="the unconditional branch's: MemoryTokens, 'none' (no memory), or "
                "not given (None): the same as memory",
            ),
            InputParam("memory_scale", default=1.0, description="λ: 0 turns memory off"),
            InputParam("k", default=5, description="videos to retrieve per prompt"),
            InputParam("attention_kwargs"),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam("attention_kwargs", dict, description="with the memory in it"),
            OutputParam("memory_hits", list, description="what was retrieved (None: given)"),
        ]

    def __call__(self, components, state: PipelineState):
        block = self.get_block_state(state)
        memory, scale = block.memory, check_memory_scale(block.memory_scale)
        kwargs, block.memory_hits = memory_call(
            components,
            memory,
            SAME if block.negative_memory is None else block.negative_memory,
            scale,
            block.k,
            prompt=block.prompt,
            prompt_embeds=block.prompt_embeds,
            per_prompt=block.num_videos_per_prompt or 1,
            attention_kwargs=block.attention_kwargs,
            load_hint="dit_mem.modular.load_memory(pipe, encoder, bank=...)",
        )
        guiders = [g for g in (getattr(components, n, None) for n in GUIDERS) if g is not None]
        if memory is not None and scale != 0 and guiders:  # memory given: tell its branch
            kwargs[MEMORY_BRANCH_KEY] = GuidanceBranch(guiders)
            for guider in guiders:  # a state from an earlier call must not look like this one's
                guider.set_state(step=-1, num_inference_steps=0, timestep=None)
        block.attention_kwargs = kwargs
        self.set_block_state(state, block)
        return components, state


def add_memory(blocks: SequentialPipelineBlocks) -> SequentialPipelineBlocks:
    """A copy of a family's modular blocks with :class:`MemoryStep` just before ``denoise``."""
    if not isinstance(blocks, SequentialPipelineBlocks):
        raise UserError(
            f"add_memory takes a family's SequentialPipelineBlocks (e.g. WanBlocks()), got "
            f"{type(blocks).__name__}"
        )
    names = list(blocks.sub_blocks)
    if MEMORY_STEP in names:
        raise UserError(f"these blocks have memory already (a {MEMORY_STEP!r} step)")
    if "denoise" not in names:
        raise UserError(f"no 'denoise' step among {names}: memory goes right before it")
    with_memory = copy.deepcopy(blocks)
    with_memory.sub_blocks.insert(MEMORY_STEP, MemoryStep(), names.index("denoise"))
    return with_memory


def load_memory(pipe, encoder: Any, bank: Any = None, *, route: str = "auto", **options) -> None:
    """Load a memory encoder (and a bank) into a modular pipeline built with
    :func:`add_memory`, and attach memory to its transformer(s): what
    ``DiTMemPipeline.load_memory`` does (same arguments but ``scale``: give ``memory_scale`` to
    the call)."""
    from dit_mem.backbone.injection import attach_memory

    if "memory_encoder" not in getattr(pipe, "_component_specs", {}):
        raise UserError(
            "this modular pipeline has no memory step: build it from add_memory(blocks)"
        )
    model, bank = memory_parts(pipe, encoder, bank, **options)
    pipe.update_components(memory_encoder=model, memory_bank=bank)
    attach_memory(pipe, route=route)


def unload_memory(pipe) -> None:
    """Detach memory from the pipeline's transformer(s) and drop its encoder and bank."""
    from dit_mem.backbone.injection import detach_memory

    detach_memory(pipe)
    for name in ("memory_encoder", "memory_bank"):
        setattr(pipe, name, None)
