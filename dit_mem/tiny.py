"""Tiny random Wan stacks in diffusers layout, for tests and the offline demo.

``build_tiny_wan(folder)`` writes ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
and ``scheduler/`` exactly as a diffusers Wan checkpoint is laid out, so that the real loading
code reads them. The weights are random: what comes out is noise, by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)

# Words the demo captions and tests use; the tokenizer is trained on them (offline).
_TOKENIZER_CORPUS = [
    "a red circle moving left",
    "a green square moving right",
    "a blue triangle moving up",
    "a yellow circle moving down",
    "a magenta square moving left",
    "a cyan triangle moving right",
    "a dog runs on the beach at sunset",
    "a person walking in the city",
]


def build_tiny_components(seed: int = 0) -> dict:
    """Random tiny transformer (2 layers, 2×16), VAE, UMT5 encoder, tokenizer, Euler scheduler.

    The tokenizer knows the demo's caption words; see ``dit_mem.backbone.tiny`` for the pieces
    and for the Wan2.2 families.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dit_mem.backbone.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae

    tokenizer = tiny_tokenizer(_TOKENIZER_CORPUS * 4)
    return {
        "transformer": tiny_transformer(seed),
        "vae": tiny_vae(seed),
        "text_encoder": tiny_text_encoder(len(tokenizer), seed),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }


def build_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan model in diffusers layout to ``folder`` (skipped if complete)."""
    folder = Path(folder)
    marker = folder / "model_index.json"
    if marker.is_file():
        return folder
    parts = build_tiny_components(seed)
    for name, module in parts.items():
        module.save_pretrained(folder / name)
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "tokenizer": ["transformers", "T5Tokenizer"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    marker.write_text(json.dumps(index, indent=2))  # written last: marks the folder complete
    logger.info("wrote a tiny random Wan model to %s", folder)
    return folder
