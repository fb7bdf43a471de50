"""``MemoryTokens``: memory in its compact form.

The encoder's 2·N·L output tokens (L = 100 per video) are mostly copies: with the paper's grid
every video contributes one distinct vector per branch, repeated L times. Attention without
positions cannot tell copies apart, and attending to m equal keys is the same as attending to
one key whose logit is raised by log m. So memory travels as

    tokens      [B, G, D]  the distinct vectors, in dense order (high-pass groups, then low-pass)
    log_counts  [B, G]     log of how often each vector occurs in the dense layout

and ``dense()`` rebuilds the paper's layout ``[B, 2·N·L, D]`` when it is really wanted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dit_mem.errors import UserError

# Memory tokens (and normalised latents) are O(1): a value this large is broken input, and one
# that overflows in half precision inside the DiT (a NaN video, not an error).
MAX_ABS_VALUE = 1e4


@dataclass
class MemoryTokens:
    tokens: torch.Tensor
    log_counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise UserError(
                f"MemoryTokens.tokens must be [B, G, D], got {tuple(self.tokens.shape)}"
            )
        if self.log_counts.shape != self.tokens.shape[:2]:
            raise UserError(
                f"MemoryTokens.log_counts must be [B, G] = {tuple(self.tokens.shape[:2])}, "
                f"got {tuple(self.log_counts.shape)}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, tokens: torch.Tensor) -> MemoryTokens:
        """Wrap already-dense tokens ``[B, L, D]`` (every multiplicity 1)."""
        if tokens.ndim != 3:
            raise UserError(f"dense memory tokens must be [B, L, D], got {tuple(tokens.shape)}")
        return cls(tokens, tokens.new_zeros(tokens.shape[:2], dtype=torch.float32))

    @classmethod
    def cat(cls, items: list[MemoryTokens], dim: int = 0) -> MemoryTokens:
        """Concatenate along the batch (``dim=0``) or the token axis (``dim=1``)."""
        return cls(
            torch.cat([m.tokens for m in items], dim=dim),
            torch.cat([m.log_counts for m in items], dim=dim),
        )

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_distinct(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def counts(self) -> torch.Tensor:
        """Integer multiplicities ``[B, G]``."""
        return self.log_counts.float().exp().round().long()

    @property
    def num_dense_tokens(self) -> int:
        """Length of the dense layout (per batch element)."""
        return int(self.counts()[0].sum()) if self.batch_size else 0

    def dense(self) -> torch.Tensor:
        """The paper's layout ``[B, sum(counts), D]``: each vector repeated by its count."""
        counts = self.counts()
        if not bool((counts == counts[:1]).all()):
            raise UserError("dense() needs the same multiplicity pattern for every batch element")
        return torch.repeat_interleave(self.tokens, counts[0].to(self.tokens.device), dim=1)

    def attention_bias(self, strength: float = 1.0) -> torch.Tensor:
        """Additive logit bias ``[B, G]`` (float32): log-multiplicity plus log(strength).

        ``strength`` comes checked (:func:`check_memory_scale`); 0, memory off, never gets here.
        """
        bias = self.log_counts.float()
        if torch.compiler.is_compiling():  # λ may be a traced number here (checked before)
            return bias + torch.as_tensor(strength, dtype=torch.float32, device=bias.device).log()
        if strength <= 0:
            raise UserError(f"memory strength must be > 0 here (0 is memory off), got {strength}")
        return bias + math.log(strength) if strength != 1.0 else bias

    # ------------------------------------------------------------------ movement
    def to(self, *args, **kwargs) -> MemoryTokens:
        """Move/cast the vectors like ``Tensor.to``; log-counts keep float32 (device follows)."""
        tokens = self.tokens.to(*args, **kwargs)
        return MemoryTokens(tokens, self.log_counts.to(device=tokens.device, dtype=torch.float32))

    def detach(self) -> MemoryTokens:
        return MemoryTokens(self.tokens.detach(), self.log_counts.detach())

    def repeat_batch(self, times: int) -> MemoryTokens:
        """Repeat along the batch (e.g. for ``num_videos_per_prompt``)."""
        return MemoryTokens(
            self.tokens.repeat_interleave(times, dim=0),
            self.log_counts.repeat_interleave(times, dim=0),
        )


def is_fake(x: torch.Tensor) -> bool:
    """Whether ``x`` is a fake tensor (shape, dtype and device only, no values)."""
    from torch._subclasses.fake_tensor import is_fake as fake

    return fake(x)


def check_memory_scale(scale: Any) -> float:
    """λ as a float; ``ValueError`` unless it is a finite number ≥ 0 (0: memory off, as an
    IP-Adapter scale of 0 turns that add-on off)."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise UserError(f"memory scale must be a number, got {scale!r}")
    if not math.isfinite(scale) or scale < 0:
        raise UserError(f"memory scale must be a finite number ≥ 0, got {scale!r}")
    return float(scale)


def check_plausible(x: torch.Tensor, where: Any, what: str) -> None:
    """``ValueError`` naming ``where`` if ``x`` holds NaN/Inf or values beyond ±1e4. A fake
    tensor (shapes without values: benchmarks/full_size.py) has no values to check; every real
    tensor is checked."""
    if is_fake(x):
        return
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{where}: the {what} holds NaN or infinite values")
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak > MAX_ABS_VALUE:
        raise UserError(f"{where}: the {what} holds values up to {peak:.3g} (> {MAX_ABS_VALUE:g})")


def as_memory_tokens(memory: Any, name: str = "memory") -> MemoryTokens:
    """User memory (``MemoryTokens`` or dense ``[B, L, D]`` tokens) as checked ``MemoryTokens``.

    The one check wherever memory enters (the pipeline's ``memory=``, the transformer's
    ``attention_kwargs``): the type, non-empty, finite, and plausible in size. Inside a
    ``torch.compile`` trace the values are not read (that would break the graph): there they
    were checked where they entered, outside the compiled model.
    """
    if isinstance(memory, torch.Tensor):
        if memory.ndim != 3:
            raise UserError(
                f"{name} as a tensor must be dense tokens [B, L, D], got {tuple(memory.shape)}"
            )
        memory = MemoryTokens.from_dense(memory)
    if not isinstance(memory, MemoryTokens):
        raise UserError(
            f"{name} must be a MemoryTokens (or a dense [B, L, D] tensor), "
            f"got {type(memory).__name__}"
        )
    if memory.num_distinct == 0:
        raise UserError(f"{name} is empty (G = 0); pass no memory instead")
    if not torch.compiler.is_compiling():
        check_plausible(memory.tokens, name, "memory")
        if not is_fake(memory.log_counts) and not bool(torch.isfinite(memory.log_counts).all()):
            raise UserError(f"{name}: the log-multiplicities hold NaN or infinite values")
    return memory


@dataclass
class VideoTokens:
    """Per-video tokens of both branches before the shared attention (what the token cache stores).

    high, low   [B, N, G, D]  distinct vectors of each retrieved video, in pooling order
    log_counts  [G]           log multiplicity of each group within one video's L tokens
    """

    high: torch.Tensor
    low: torch.Tensor
    log_counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.high.ndim != 4 or self.high.shape != self.low.shape:
            raise UserError(
                f"VideoTokens.high/low must both be [B, N, G, D], got {tuple(self.high.shape)} "
                f"and {tuple(self.low.shape)}"
            )
        if self.log_counts.shape != self.high.shape[2:3]:
            raise UserError(
                f"VideoTokens.log_counts must be [G] = [{self.high.shape[2]}], "
                f"got {tuple(self.log_counts.shape)}"
            )

    @property
    def num_videos(self) -> int:
        return self.high.shape[1]

    def to(self, *args, **kwargs) -> VideoTokens:
        """Move/cast the vectors like ``Tensor.to``; log-counts keep float32 (device follows)."""
        high, low = self.high.to(*args, **kwargs), self.low.to(*args, **kwargs)
        return VideoTokens(high, low, self.log_counts.to(device=high.device, dtype=torch.float32))

    def select(self, index: torch.Tensor) -> VideoTokens:
        """Reorder/select videos along N (e.g. a training-time permutation)."""
        return VideoTokens(self.high[:, index], self.low[:, index], self.log_counts)
