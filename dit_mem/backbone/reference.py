"""The paper's form of memory injection, written plainly as the specification (SPEC §4).

The release concatenates the 1,000 dense memory tokens to the video tokens inside every block's
self-attention, as queries *and* keys: they get the block's ``norm1`` and shift/scale modulation
and the same q/k/v projections and q/k RMSNorm, no rotary embedding (identity rotation), and
their outputs are sliced off after the attention (flux's append-then-slice). Nothing else of the
block sees them. The fast path in :mod:`dit_mem.backbone.injection` must equal this; tests and
``benchmarks/memory_overhead.py`` compare against it.

    paper = PaperFormMemory(transformer)          # wraps every block (in place)
    paper.set_memory(memory.dense(), strength=1.0)
    out = transformer(x, t, text)                 # the paper's computation
    paper.remove()                                # the stock blocks back
"""

from __future__ import annotations

import math

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn


class PaperFormBlock(nn.Module):
    """A stock Wan block run the paper's way: ``[video ; memory]`` tokens in self-attention."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.memory: torch.Tensor | None = None  # [Bm, L, D] dense memory tokens
        self.log_strength = 0.0  # log λ added to the memory keys' logits
        self.noisy_token: torch.Tensor | None = None  # [B], per-token timesteps only

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        blk = self.block
        if self.memory is None:
            return blk(hidden_states, encoder_hidden_states, temb, rotary_emb)
        b, s, d = hidden_states.shape
        memory = self.memory.to(hidden_states.device, hidden_states.dtype).expand(b, -1, -1)
        n = memory.shape[1]
        x = torch.cat([hidden_states, memory], dim=1)  # [B, S + L, D]

        # modulation: memory rows take the (noisiest token's) timestep modulation
        if temb.ndim == 4:  # per-token timesteps (Wan2.2 TI2V): [B, S, 6, D]
            noisy = temb[torch.arange(b), self.noisy_token][:, None].expand(b, n, 6, d)
            mod = blk.scale_shift_table.unsqueeze(0) + torch.cat([temb, noisy], 1).float()
            shift, scale, gate, c_shift, c_scale, c_gate = (t.squeeze(2) for t in mod.chunk(6, 2))
            gate, c_shift, c_scale, c_gate = (t[:, :s] for t in (gate, c_shift, c_scale, c_gate))
        else:
            mod = blk.scale_shift_table + temb.float()
            shift, scale, gate, c_shift, c_scale, c_gate = mod.chunk(6, dim=1)
        normed = (blk.norm1(x.float()) * (1 + scale) + shift).type_as(x)

        # self-attention over [video ; memory]: identity rotation (cos 1, sin 0) for memory
        cos, sin = rotary_emb
        cos = torch.cat([cos, cos.new_ones(1, n, 1, cos.shape[-1])], dim=1)
        sin = torch.cat([sin, sin.new_zeros(1, n, 1, sin.shape[-1])], dim=1)
        mask = None
        if self.log_strength:
            mask = torch.zeros(1, 1, 1, s + n, device=x.device)
            mask[..., s:] = self.log_strength
        attn = WanAttnProcessor()(blk.attn1, normed, None, mask, (cos, sin))[:, :s]  # slice off

        # the rest of the block sees the video tokens only
        h = (hidden_states.float() + attn * gate).type_as(hidden_states)
        h = h + blk.attn2(blk.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)
        ff = blk.ffn((blk.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h))
        return (h.float() + ff.float() * c_gate).type_as(h)


class PaperFormMemory:
    """Wraps a Wan transformer's blocks in :class:`PaperFormBlock` (in place) until ``remove``."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        transformer.blocks = nn.ModuleList(PaperFormBlock(b) for b in transformer.blocks)

    def set_memory(
        self,
        memory: torch.Tensor | None,
        strength: float = 1.0,
        noisy_token: torch.Tensor | None = None,
    ) -> None:
        """Dense memory ``[Bm, L, D]`` for the following calls (``None``: the stock model)."""
        for block in self.transformer.blocks:
            block.memory, block.log_strength = memory, math.log(strength)
            block.noisy_token = noisy_token

    def remove(self) -> None:
        self.transformer.blocks = nn.ModuleList(b.block for b in self.transformer.blocks)
