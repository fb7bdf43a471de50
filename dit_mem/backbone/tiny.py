"""Tiny random Wan components that build offline in well under a second.

For tests and the offline demo only: the weights are random, so outputs are noise. Shapes follow
the real families (``"wan2.1"``; ``"wan2.2-ti2v"``: per-token timesteps, ``expand_timesteps``;
``"wan2.2-a14b"``: two experts switched at ``boundary_ratio``) at toy widths.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch

Family = Literal["wan2.1", "wan2.2-ti2v", "wan2.2-a14b"]
FAMILIES: tuple[str, ...] = ("wan2.1", "wan2.2-ti2v", "wan2.2-a14b")

TINY_TEXT_DIM = 32
_CAPTIONS = (
    "a red fox jumps over a sleeping dog in the snow",
    "waves roll onto a sandy beach at sunset",
    "a cat sits on a mat next to a window",
    "a city street at night with cars and neon lights",
    "a person rides a bicycle through a green park",
)


def tiny_transformer(
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    in_channels: int = 16,
    text_dim: int = TINY_TEXT_DIM,
):
    """A ``WanTransformer3DModel`` of ``num_layers`` blocks, ``heads × head_dim`` wide (float32)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        rope_max_seq_len=64,
    )
    return model.eval()


def tiny_vae(seed: int = 0, z_dim: int = 16):
    """An ``AutoencoderKLWan`` with base_dim 2 (temporal ×4, spatial ×8 like the real one)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=2, num_res_blocks=1, z_dim=z_dim).eval()


def tiny_text_encoder(
    vocab_size: int, seed: int = 0, d_model: int = TINY_TEXT_DIM, d_kv: int = 8, d_ff: int = 64
):
    """A 2-layer ``UMT5EncoderModel`` with the real model's structure (gated GELU, per-layer bias)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    return UMT5EncoderModel(config).eval()


def tiny_tokenizer(texts: tuple[str, ...] | list[str] = _CAPTIONS, vocab_size: int = 64):
    """A ``T5Tokenizer`` (Unigram, trained on ``texts``); pad 0, eos 1, unk 2 as in UMT5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(list(texts), trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_pipeline(family: Family = "wan2.1", seed: int = 0) -> Any:
    """A stock diffusers ``WanPipeline`` of tiny random components for ``family``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny Wan family {family!r}; known: {FAMILIES}")
    tokenizer = tiny_tokenizer()
    kwargs: dict[str, Any] = {}
    if family == "wan2.2-a14b":
        kwargs = {"transformer_2": tiny_transformer(seed + 1), "boundary_ratio": 0.875}
    elif family == "wan2.2-ti2v":
        kwargs = {"expand_timesteps": True}
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), seed),
        vae=tiny_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=tiny_transformer(seed),
        **kwargs,
    )
