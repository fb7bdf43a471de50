"""Wan (2.1, 2.2 TI2V / A14B, I2V, VACE): memory in every ``WanTransformerBlock``'s ``attn1``.

A Wan block computes ``x + gate · attn1(modulate(norm1(x), shift, scale), RoPE)``, then
cross-attention to the text, then the FFN (``temb`` ``[B, 6, D]``, or ``[B, S, 6, D]`` with
per-token timesteps). Memory tokens get ``norm1`` and the self-attention shift/scale (float32, as
the block computes them), the same q/k/v projections and q/k RMSNorm, no RoPE; the video tokens
are the only queries. ``WanVACETransformer3DModel``: memory joins the main ``blocks`` (the video
stream); the VACE control blocks stay stock.
"""

from __future__ import annotations

from functools import partial

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTransformer3DModel,
    WanTransformerBlock,
)
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel

from dit_mem.backbone.families import base
from dit_mem.errors import UserError

# Wan2.1's standard negative prompt (``sample_neg_prompt`` in Wan's shared config).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs (the stock arithmetic), ``[B, S, H, Dh]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class WanMemoryProcessor(base.SelfAttentionMemoryProcessor):
    """``attn1`` of one Wan block: RoPE after the head split."""

    def rotations(self, rotary_emb):
        if rotary_emb is None:
            return {}
        return {"rotate_heads": partial(apply_rotary, cos=rotary_emb[0], sin=rotary_emb[1])}


class WanInjection(base.Injection):
    transformer_classes = (WanTransformer3DModel, WanVACETransformer3DModel)
    expert_names = ("transformer", "transformer_2")  # Wan2.2 A14B: two experts
    block_classes = (WanTransformerBlock,)
    stock_processors = (WanAttnProcessor,)
    processor = WanMemoryProcessor
    blocks_attribute = "blocks"

    def modulate(self, block, call, temb, hidden_states):
        b = hidden_states.shape[0]
        if temb.ndim == 4:  # per-token timesteps [B, S, 6, D]
            temb = base.noisiest(temb, call)[:, 0]
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        tokens = call.tokens.to(device=hidden_states.device).expand(b, -1, -1)
        return (block.norm1(tokens.float()) * (1 + scale) + shift).type_as(hidden_states)

    def dense_block(self, block, memory, repeats, noisy, args, kwargs):
        hidden_states, encoder_hidden_states, temb, rotary_emb = self.block_inputs(
            block, args, kwargs, "hidden_states encoder_hidden_states temb rotary_emb"
        )
        b, s, d = hidden_states.shape
        x, n = base.with_memory(hidden_states, memory, repeats)  # [B, S + L, D]

        # modulation: memory rows take the (noisiest token's) timestep modulation
        if temb.ndim == 4:  # per-token timesteps (Wan2.2 TI2V): [B, S, 6, D]
            rows = temb[torch.arange(b), noisy][:, None].expand(b, n, 6, d)
            mod = block.scale_shift_table.unsqueeze(0) + torch.cat([temb, rows], 1).float()
            shift, scale, gate, c_shift, c_scale, c_gate = (t.squeeze(2) for t in mod.chunk(6, 2))
            gate, c_shift, c_scale, c_gate = (t[:, :s] for t in (gate, c_shift, c_scale, c_gate))
        else:
            mod = block.scale_shift_table + temb.float()
            shift, scale, gate, c_shift, c_scale, c_gate = mod.chunk(6, dim=1)
        normed = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)

        # self-attention over [video ; memory], memory not rotated; outputs sliced off
        rotation = base.identity_rotation(*rotary_emb, n, dim=1)
        attn = WanAttnProcessor()(block.attn1, normed, None, None, rotation)[:, :s]

        # the rest of the block sees the video tokens only
        h = (hidden_states.float() + attn * gate).type_as(hidden_states)
        h = h + block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)
        ff = block.ffn((block.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h))
        return (h.float() + ff.float() * c_gate).type_as(h)


class WanLatents(base.LatentSpace):
    """``(z - latents_mean) / latents_std`` per channel, as WanPipeline normalises."""

    vae_classes = (AutoencoderKLWan,)

    def normalize(self, vae, z):
        mean, std = _stats(vae, z)
        return (z - mean) / std

    def denormalize(self, vae, x):
        mean, std = _stats(vae, x)
        return x * std + mean

    def geometry(self, vae):
        cfg = vae.config
        return cfg.z_dim, cfg.scale_factor_temporal or 4, cfg.scale_factor_spatial or 8

    def patch_size(self, config):
        t, h, _ = config.get("patch_size", (1, 2, 2))
        return int(t), int(h)

    def record(self, vae):
        mean, std = (s.flatten().tolist() for s in _stats(vae, torch.zeros(())))
        return {
            "normalization": "(z - latents_mean) / latents_std",
            "latents_mean": [round(float(v), 6) for v in mean],
            "latents_std": [round(float(v), 6) for v in std],
        }


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` of a Wan VAE's latent space, shaped for ``[B, C, T, H, W]``."""
    cfg = vae.config
    if cfg.latents_mean is None or cfg.latents_std is None:
        raise UserError("the VAE config has no latents_mean/latents_std to normalise with")
    return tuple(
        torch.tensor(s, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
        for s in (cfg.latents_mean, cfg.latents_std)
    )


class WanTraining(base.Training):
    """Method §5: UMT5 text, zeros after the caption, no mask; flow shift 5; Wan's weighting."""

    default_loss_weighting = "wan"

    @staticmethod
    def tokenize(tokenizer, captions, max_tokens: int):
        """Wan's prompt tokens (``WanPipeline._get_t5_prompt_embeds``): each cleaned caption
        padded to ``max_tokens``, with its attention mask."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return tokenizer(
            [prompt_clean(c) for c in captions],
            padding="max_length",
            max_length=max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode_text(self, text_model, captions, max_tokens):
        """Wan's convention: the tokens of :meth:`tokenize`, encoded with their mask; the valid
        rows."""
        tokenizer, text_encoder = text_model.tokenizer, text_model.text_encoder
        inputs = self.tokenize(tokenizer, captions, max_tokens)
        device = next(text_encoder.parameters()).device
        mask = inputs.attention_mask
        hidden = text_encoder(inputs.input_ids.to(device), mask.to(device)).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [
            {"encoder_hidden_states": h[:n].cpu().clone()}
            for h, n in zip(hidden, lengths, strict=True)
        ]

    def text_kwargs(self, texts, max_tokens):
        # Wan's DiT sees max_tokens rows, zeros after each caption (no mask)
        return {
            "encoder_hidden_states": base.pad_rows(
                [t["encoder_hidden_states"] for t in texts], max_tokens
            )
        }

    def flow_shift(self, base_dir, latent_shape):
        return 5.0  # the paper trains with shift 5 (the diffusers folder's UniPC samples with 3)


class WanGeneration(base.Generation):
    fps = 16
    negative_prompt = WAN_NEGATIVE_PROMPT


FAMILY = base.Family("wan", WanInjection(), WanLatents(), WanTraining(), WanGeneration())
