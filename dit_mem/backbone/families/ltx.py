"""LTX-Video: memory in every ``LTXVideoTransformerBlock``'s ``attn1`` (self-attention).

An LTX block computes ``x + gate · attn1(norm1(x) · (1 + scale) + shift, RoPE)`` with RMSNorm
``norm1`` (no affine) and adaLN-single modulation ``scale_shift_table [6, D] + temb`` (``temb``
``[B, S_t, 6·D]``: S_t = 1 with one timestep per sample, S_t = S with per-token timesteps, as
the conditioning pipelines give), then cross-attention ``attn2`` to the text, then the FFN. The
attention normalises q and k with RMSNorm across all heads and rotates them (RoPE on the whole
width, before the head split). Memory tokens get ``norm1`` and the self-attention shift/scale in
the block's own dtype, the same projections and q/k norms, no RoPE; video tokens are the only
queries. The model has a ``_cp_plan``: under context parallelism the video tokens are split and
every rank holds the whole memory (:mod:`dit_mem.backbone.attention` counts it once).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from diffusers import AutoencoderKLLTXVideo
from diffusers.models.transformers.transformer_ltx import (
    LTXVideoAttnProcessor,
    LTXVideoTransformer3DModel,
    LTXVideoTransformerBlock,
    apply_rotary_emb,
)

from dit_mem.backbone.families import base

FRAME_RATE = 25  # LTXPipeline's default frame_rate (its RoPE interpolation depends on it)


class LTXMemoryProcessor(base.SelfAttentionMemoryProcessor):
    """``attn1`` of one LTX block: RoPE on the whole width, before the head split."""

    def rotations(self, rotary_emb):
        return {} if rotary_emb is None else {"rotate": partial(apply_rotary_emb, freqs=rotary_emb)}


def _modulation(block, temb: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, S_t, 6, D]``: the block's ``scale_shift_table`` + ``temb``, as the block adds them."""
    table = block.scale_shift_table
    return table[None, None].to(temb.device) + temb.reshape(batch, temb.size(1), table.shape[0], -1)


class LTXInjection(base.Injection):
    transformer_classes = (LTXVideoTransformer3DModel,)
    block_classes = (LTXVideoTransformerBlock,)
    stock_processors = (LTXVideoAttnProcessor,)
    processor = LTXMemoryProcessor
    # LTXPipeline runs both guidance branches in one call, rows [uncond ; cond]
    batched_branches = {"cond_uncond": ("uncond", "cond")}

    def modulate(self, block, call, temb, hidden_states):
        b = hidden_states.shape[0]
        if temb.shape[1] > 1:  # per-token timesteps
            temb = base.noisiest(temb, call)
        shift, scale = _modulation(block, temb, b).unbind(dim=2)[:2]  # [B, 1, D]
        tokens = call.tokens.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return block.norm1(tokens.expand(b, -1, -1)) * (1 + scale) + shift

    def dense_block(self, block, memory, repeats, noisy, args, kwargs):
        names = "hidden_states encoder_hidden_states temb image_rotary_emb encoder_attention_mask"
        hidden_states, text, temb, rotary, text_mask = self.block_inputs(block, args, kwargs, names)
        b, s, d = hidden_states.shape
        x, n = base.with_memory(hidden_states, memory, repeats)  # [B, S + L, D]

        # modulation: memory rows take the (noisiest token's) timestep modulation
        shift, scale, gate, c_shift, c_scale, c_gate = _modulation(block, temb, b).unbind(dim=2)
        if temb.shape[1] > 1:  # per-token timesteps: [B, S, D] each
            rows = torch.arange(b)
            shift, scale = (
                torch.cat([t, t[rows, noisy][:, None].expand(b, n, d)], 1) for t in (shift, scale)
            )
        normed = block.norm1(x) * (1 + scale) + shift

        # self-attention over [video ; memory], memory not rotated; outputs sliced off
        rotation = base.identity_rotation(*rotary, n, dim=1)
        attn = LTXVideoAttnProcessor()(block.attn1, normed, None, None, rotation)[:, :s]

        # the rest of the block sees the video tokens only
        h = hidden_states + attn * gate
        h = h + block.attn2(
            h,
            encoder_hidden_states=text,
            image_rotary_emb=None,
            attention_mask=text_mask,
        )
        return h + block.ff(block.norm2(h) * (1 + c_scale) + c_shift) * c_gate


class LTXLatents(base.LatentSpace):
    """LTXPipeline's ``_normalize_latents`` / ``_denormalize_latents``."""

    vae_classes = (AutoencoderKLLTXVideo,)

    @staticmethod
    def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        mean, std = (t.view(1, -1, 1, 1, 1).to(like) for t in (vae.latents_mean, vae.latents_std))
        return mean, std, float(vae.config.scaling_factor)

    def normalize(self, vae, z):
        mean, std, scaling = self._stats(vae, z)
        return (z - mean) * scaling / std

    def denormalize(self, vae, x):
        mean, std, scaling = self._stats(vae, x)
        return x * std / scaling + mean

    def decode(self, vae, z):
        # VAEs with timestep conditioning (LTX-Video 0.9.1+) decode at timestep 0 here
        temb = None
        if vae.config.timestep_conditioning:
            temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        return vae.decode(z, temb, return_dict=False)[0]

    def geometry(self, vae):
        return (
            vae.config.latent_channels,
            vae.temporal_compression_ratio,
            vae.spatial_compression_ratio,
        )

    def record(self, vae):
        return {
            "normalization": "(z - latents_mean) * scaling_factor / latents_std",
            "latents_mean": [round(float(v), 6) for v in vae.latents_mean],
            "latents_std": [round(float(v), 6) for v in vae.latents_std],
            "scaling_factor": float(vae.config.scaling_factor),
        }


class LTXTraining(base.Training):
    """T5 text with its mask; LTXPipeline's sequence-length shift; packed latents."""

    text_masks = ("encoder_attention_mask",)
    text_dim_keys = ("caption_channels",)
    default_max_text_tokens = 128  # LTXPipeline's max_sequence_length

    @torch.no_grad()
    def encode_text(self, text_model, captions, max_tokens):
        device = next(text_model.text_encoder.parameters()).device
        embeds, mask = text_model._get_t5_prompt_embeds(
            prompt=list(captions), max_sequence_length=max_tokens, device=device
        )
        return [
            {"encoder_hidden_states": e[m].cpu().clone()} for e, m in zip(embeds, mask, strict=True)
        ]

    def fixed_inputs(self, base_dir):
        cfg = base.read_config(base_dir / "vae" / "config.json")
        with torch.device("meta"):  # the VAE's compression ratios, no weights
            vae = AutoencoderKLLTXVideo.from_config(cfg)
        spatial = vae.spatial_compression_ratio
        return {
            "rope_interpolation_scale": (vae.temporal_compression_ratio / FRAME_RATE,)
            + (spatial,) * 2
        }

    def flow_shift(self, base_dir, latent_shape):
        """LTXPipeline's shift: ``exp(mu)`` of the latent's token count (dynamic shifting)."""
        cfg = base.read_config(base_dir / "scheduler" / "scheduler_config.json")
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        tokens = math.prod(latent_shape[1:])
        short, long = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        low, high = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        slope = (high - low) / (long - short)
        return math.exp(tokens * slope + low - slope * short)

    def predict(self, transformer, x_t, timestep, text, attention_kwargs, fixed):
        from diffusers import LTXPipeline

        cfg = transformer.config
        b, _, t, h, w = x_t.shape
        frames, height, width = t // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size
        packed = LTXPipeline._pack_latents(x_t, cfg.patch_size, cfg.patch_size_t)
        size = {"num_frames": frames, "height": height, "width": width}
        out = super().predict(transformer, packed, timestep, text, attention_kwargs, fixed | size)
        return LTXPipeline._unpack_latents(
            out, frames, height, width, cfg.patch_size, cfg.patch_size_t
        )


class LTXGeneration(base.Generation):
    fps = FRAME_RATE


FAMILY = base.Family("ltx", LTXInjection(), LTXLatents(), LTXTraining(), LTXGeneration())
