"""The paper's form of memory injection, as the specification (method §4, §9), for any family.

The release concatenates the 1,000 dense memory tokens to the video tokens inside every block's
self-attention, as queries *and* keys: they get the block's pre-attention norm and modulation and
the same q/k/v projections and q/k norms, no rotary embedding (identity rotation), and their
outputs are sliced off after the attention (flux's append-then-slice). Nothing else of the block
sees them. Each family writes that block plainly (:meth:`Injection.dense_block`); the fast path of
:mod:`dit_mem.backbone.injection` must equal it. Tests and ``benchmarks/memory_overhead.py``
compare against it.

    paper = PaperFormMemory(transformer)          # wraps every block (in place)
    out = transformer(..., attention_kwargs={"memory_tokens": memory, "memory_strength": 1})
    paper.remove()                                # the stock blocks back

It takes memory the way the fast path does (``attention_kwargs``; ``MemoryTokens`` are used in
their dense layout, λ must be a whole number: each token counted λ times), so the same call runs
both. With per-token timesteps the memory takes the noisiest token's modulation.
"""

from __future__ import annotations

import torch
from torch import nn

from dit_mem.backbone.families import Family, family_of
from dit_mem.errors import UserError
from dit_mem.memory.tokens import as_memory_tokens


def paper_encode(encoder, latents: torch.Tensor, generator: torch.Generator | None = None):
    """The memory encoder the paper's way: the shared attention over all 2·N·L dense tokens (the
    same draw of the video order as ``MemoryEncoder.aggregate`` in training); dense
    ``MemoryTokens`` ``[B, 2·N·L, D]``. Use as the encoder ``functools.partial(paper_encode, enc)``."""
    from dit_mem.memory.tokens import MemoryTokens

    videos = encoder.encode_videos(latents)
    if encoder.training:
        perm = torch.randperm(videos.num_videos, generator=generator)
        videos = videos.select(perm.to(videos.high.device))
    b, n, g, d = videos.high.shape
    # every distinct token its count of times (the counts are the encoder's pooling, a function
    # of shapes: taken as numbers, the dense layout needs no tensor's values)
    rows = [
        v * g + i
        for v in range(n)
        for i, c in enumerate(encoder.high_pass.counts)
        for _ in range(c)
    ]
    dense = [encoder.attention(t.reshape(b, n * g, d)[:, rows]) for t in (videos.high, videos.low)]
    return MemoryTokens.from_dense(torch.cat(dense, dim=1))


class PaperFormBlock(nn.Module):
    """A stock block run the paper's way when memory is set (else the stock block)."""

    def __init__(self, block: nn.Module, family: Family):
        super().__init__()
        self.block, self.family = block, family
        self.memory: torch.Tensor | None = None  # [Bm, L, D] dense memory tokens
        self.repeats = 1  # copies of each memory token (λ)
        self.noisy_token: torch.Tensor | None = None  # [B], per-token timesteps only

    def forward(self, *args, **kwargs):
        if self.memory is None:
            return self.block(*args, **kwargs)
        return self.family.injection.dense_block(
            self.block, self.memory, self.repeats, self.noisy_token, args, kwargs
        )


class PaperFormMemory:
    """Wraps a transformer's blocks in :class:`PaperFormBlock` (in place) until ``remove``."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.family = family_of(transformer)
        self.attribute = self.family.injection.blocks_attribute
        blocks = [PaperFormBlock(b, self.family) for b in self.family.injection.blocks(transformer)]
        setattr(transformer, self.attribute, nn.ModuleList(blocks))
        self.handle = transformer.register_forward_pre_hook(self.take_memory, with_kwargs=True)

    @property
    def blocks(self) -> list[PaperFormBlock]:
        return list(getattr(self.transformer, self.attribute))

    def take_memory(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """This call's dense memory (``memory_tokens``, ``memory_strength``), or none."""
        arguments = self.family.injection.arguments(module)
        options = arguments.get("attention_kwargs", args, kwargs) or {}
        memory, strength = options.get("memory_tokens"), options.get("memory_strength", 1)
        if memory is not None:
            memory = as_memory_tokens(memory).dense()
            if float(strength) != int(strength) or strength < 1:
                raise UserError(f"the paper's form takes λ as a whole number ≥ 1, got {strength}")
        noisy, _ = self.family.injection.noisy_token(arguments.get("timestep", args, kwargs))
        for block in self.blocks:
            block.memory, block.repeats, block.noisy_token = memory, int(strength), noisy

    def remove(self) -> None:
        self.handle.remove()
        setattr(self.transformer, self.attribute, nn.ModuleList(b.block for b in self.blocks))
