"""HunyuanVideo-1.5: memory in the video stream of every dual-stream block's joint attention.

A ``HunyuanVideo15TransformerBlock`` normalises and modulates each stream with its own
``AdaLayerNormZero`` (``norm1`` for video, ``norm1_context`` for text, both from ``temb``
``[B, D]``) and runs one attention over ``[video ; text]``: per-head q/k RMSNorm, RoPE on the
video part only, a boolean mask that lets a query and a key meet only when both are valid (the
text padding), then ``to_out`` / ``to_add_out`` per stream. Memory joins the *video stream*:
the joint sequence is ``[video ; memory ; text]`` in the paper's form, memory tokens get the
video stream's modulation, projections and q/k norms, no RoPE, and every valid query (video and
text) sees them. The fast path keeps the video and text queries, with the memory keys appended
to the masked attention (the ``"joint"`` route). The model has no ``_cp_plan``: memory under
context parallelism is an error, never a silently wrong result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLHunyuanVideo15
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideo15TransformerBlock,
)

from dit_mem.backbone.families import base
from dit_mem.errors import UserError

VISION_TOKENS = 729  # HunyuanVideo15Pipeline's vision_num_semantic_tokens (zeros for text to video)


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(2, (attn.heads, -1))


class HunyuanVideo15MemoryProcessor(base.MemoryProcessor):
    """The joint attention of one HunyuanVideo-1.5 block, memory in its video stream."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attachment.memory is None:
            return self.stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        if self._parallel_config is not None:
            raise NotImplementedError(
                "memory under context parallelism is not supported for HunyuanVideo-1.5 (diffusers "
                "gives HunyuanVideo15Transformer3DModel no _cp_plan); run it without parallelism"
            )
        if encoder_hidden_states is None:
            raise UserError("HunyuanVideo-1.5 memory needs the block's text stream")
        memory, bias = self.memory_inputs(hidden_states)
        # video stream: projections, per-head q/k norm, RoPE (memory: the same, no RoPE)
        query, key, value = (
            _heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        memory_key = attn.norm_k(_heads(attn, attn.to_k(memory)))
        memory_value = _heads(attn, attn.to_v(memory))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # text stream
        text_query, text_key, text_value = (
            _heads(attn, f(encoder_hidden_states))
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query, key = torch.cat([query, text_query], 1), torch.cat([key, text_key], 1)
        value = torch.cat([value, text_value], 1)
        # a query and a key meet only when both are valid; valid queries see the memory
        b, s = query.shape[:2]
        if attention_mask is None:
            valid = query.new_ones(b, s, dtype=torch.bool)
        else:
            valid = F.pad(attention_mask, (s - attention_mask.shape[1], 0), value=True).bool()
        mask = valid[:, None, None, :] & valid[:, None, :, None]
        out = self.attend(
            query,
            key,
            value,
            memory_key,
            memory_value,
            bias,
            attention_mask=mask,
            memory_visible=valid,
        )
        out = out.flatten(2, 3).to(query.dtype)
        n = encoder_hidden_states.shape[1]
        video, text = out[:, :-n], out[:, -n:]
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(text)


class HunyuanVideo15Injection(base.Injection):
    transformer_classes = (HunyuanVideo15Transformer3DModel,)
    block_classes = (HunyuanVideo15TransformerBlock,)
    stock_processors = (HunyuanVideo15AttnProcessor2_0,)
    processor = HunyuanVideo15MemoryProcessor
    attention_attribute = "attn"
    # a diffusers guider that batches its conditions stacks them in its input order [cond ; uncond]
    batched_branches = {"pred_cond_uncond": ("cond", "uncond")}

    def modulate(self, block, call, temb, hidden_states):
        b = hidden_states.shape[0]
        tokens = call.tokens.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return block.norm1(tokens.expand(b, -1, -1), emb=temb)[0]

    def dense_block(self, block, memory, repeats, noisy, args, kwargs):
        hidden_states, encoder_hidden_states, temb, mask, freqs = self.block_inputs(
            block, args, kwargs, "hidden_states encoder_hidden_states temb attention_mask freqs_cis"
        )
        s = hidden_states.shape[1]
        x, n = base.with_memory(hidden_states, memory, repeats)  # [B, S + L, D]

        # each stream's modulation; memory takes the video stream's
        normed, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        text, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )

        # joint attention over [video ; memory ; text]: memory not rotated, and valid in the mask
        # (the processor pads the text mask with True for the video stream); outputs sliced off
        rotation = base.identity_rotation(*freqs, n, dim=0)
        attn, text_attn = HunyuanVideo15AttnProcessor2_0()(block.attn, normed, text, mask, rotation)
        attn = attn[:, :s]

        # the rest of the block sees the video and text tokens only
        h = hidden_states + attn * gate.unsqueeze(1)
        c = encoder_hidden_states + text_attn * c_gate.unsqueeze(1)
        h_ff = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        c_ff = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        h = h + gate_mlp.unsqueeze(1) * block.ff(h_ff)
        c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(c_ff)
        return h, c


class HunyuanVideo15Latents(base.LatentSpace):
    """HunyuanVideo15Pipeline scales by the VAE's ``scaling_factor``."""

    vae_classes = (AutoencoderKLHunyuanVideo15,)

    def normalize(self, vae, z):
        return z * vae.config.scaling_factor

    def denormalize(self, vae, x):
        return x / vae.config.scaling_factor

    def record(self, vae):
        return {
            "normalization": "z * scaling_factor",
            "scaling_factor": float(vae.config.scaling_factor),
        }


class HunyuanVideo15Training(base.Training):
    """Qwen2.5-VL and ByT5 streams with masks; the scheduler's shift; zero image conditioning."""

    text_streams = ("encoder_hidden_states", "encoder_hidden_states_2")
    text_masks = ("encoder_attention_mask", "encoder_attention_mask_2")
    text_dim_keys = ("text_embed_dim", "text_embed_2_dim")
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    default_max_text_tokens = 1000  # HunyuanVideo15Pipeline's tokenizer_max_length

    @torch.no_grad()
    def encode_text(self, text_model, captions, max_tokens):
        text_model.tokenizer_max_length = max_tokens
        device = next(text_model.text_encoder.parameters()).device
        embeds, mask, embeds_2, mask_2 = text_model.encode_prompt(
            prompt=list(captions), device=device, batch_size=len(captions)
        )
        return [
            {
                "encoder_hidden_states": e[m.bool()].cpu().clone(),
                "encoder_hidden_states_2": e2[m2.bool()].cpu().clone(),
            }
            for e, m, e2, m2 in zip(embeds, mask, embeds_2, mask_2, strict=True)
        ]

    def predict(self, transformer, x_t, timestep, text, attention_kwargs, fixed):
        # text to video: zero conditioning latents and mask, zero image embeddings (the pipeline's)
        b, _, t, h, w = x_t.shape
        hidden = torch.cat([x_t, torch.zeros_like(x_t), x_t.new_zeros(b, 1, t, h, w)], dim=1)
        image = x_t.new_zeros(b, VISION_TOKENS, transformer.config.image_embed_dim)
        fixed = fixed | {"image_embeds": image}
        timestep = timestep.to(x_t.dtype)  # as its pipeline does (its time embedder does not cast)
        return super().predict(transformer, hidden, timestep, text, attention_kwargs, fixed)


class HunyuanVideo15Generation(base.Generation):
    fps = 24  # HunyuanVideo-1.5's frame rate

    def default_size(self, model):
        """HunyuanVideo15Pipeline's own: the transformer's target size at 16:9."""
        from diffusers.pipelines.hunyuan_video1_5.image_processor import (
            HunyuanVideo15ImageProcessor,
        )

        _, _, spatial = model.family.latents.geometry(model.vae_on_meta())
        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=spatial)
        target = model.configs["transformer"].get("target_size", 640)
        return processor.calculate_default_height_width(9, 16, target)


FAMILY = base.Family(
    "hunyuan15",
    HunyuanVideo15Injection(),
    HunyuanVideo15Latents(),
    HunyuanVideo15Training(),
    HunyuanVideo15Generation(),
    init_components=("vae",),  # HunyuanVideo15Pipeline.__init__ reads its VAE's config
)
