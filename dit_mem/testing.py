"""Test scaffolding: tiny random Wan stacks, random worlds and a synthetic training set.

Nothing on the runtime path of training, generation or the toy world imports this module; the
test suite, the benchmarks and smoke runs do. Everything builds offline in seconds, and the
weights are random, so what comes out is noise by construction.

* tiny components (``tiny_transformer``, ``tiny_vae``, ``tiny_text_encoder``,
  ``tiny_tokenizer``, ``tiny_pipeline``): the real diffusers / transformers classes at toy widths,
  for the families ``"wan2.1"``, ``"wan2.2-ti2v"`` (per-token timesteps) and ``"wan2.2-a14b"``
  (two experts switched at ``boundary_ratio``);
* ``build_tiny_wan(folder)``: such a stack saved in diffusers layout, read back by the real
  loading code;
* ``run_random_world(out)``: a synthetic bank of shape clips, its real index and latents, a
  random encoder, and one generation through the pipeline;
* ``make_synthetic_run(root)``: a training set whose targets are predictable from their memory.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from dit_mem.utils import get_logger, write_json_atomic, write_safetensors_atomic

logger = get_logger(__name__)

# ======================================================================================
# Tiny random components
# ======================================================================================
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


# ======================================================================================
# A tiny Wan stack on disk and a random world around it
# ======================================================================================
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

    The tokenizer knows the demo's caption words.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

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
    from diffusers import WanPipeline

    from dit_mem.utils import atomic_dir

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    with atomic_dir(folder) as tmp:
        WanPipeline(**build_tiny_components(seed)).save_pretrained(tmp)
    logger.info("wrote a tiny random Wan model to %s", folder)
    return folder


# --------------------------------------------------------------------------------------
# A random tiny world: synthetic bank, real index and latents, random models (for tests)
# --------------------------------------------------------------------------------------
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def shape_clip(
    colour: str, shape: str, direction: str, frames: int = 17, size: int = 64
) -> np.ndarray:
    """A dark clip ``[F, size, size, 3]`` of one ``colour`` ``shape`` moving in ``direction``."""
    yy, xx = np.mgrid[0:size, 0:size]
    dx, dy = DIRECTIONS[direction]
    r = size // 8
    out = np.full((frames, size, size, 3), 16, dtype=np.uint8)
    for f in range(frames):
        travel = (f / max(frames - 1, 1) - 0.5) * (size - 4 * r)
        cx, cy = size / 2 + dx * travel, size / 2 + dy * travel
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        else:
            mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
        out[f][mask] = COLOURS[colour]
    return out


def write_bank(folder: Path, frames: int = 17, size: int = 64, videos: Path | None = None) -> Path:
    """Synthetic clips (in ``videos``, default ``folder/video``) + ``folder/memory.csv``
    (``video``, ``caption``); returns the CSV path."""
    from dit_mem.evaluation.video_io import write_mp4

    videos = videos if videos is not None else folder / "video"
    rows = []
    for i, (colour, shape, direction) in enumerate(
        (c, s, d) for c in COLOURS for s in SHAPES for d in ("left", "right")
    ):
        name = f"synth{i:03d}_0_0to1.mp4"
        path = videos / name
        if not path.is_file():
            write_mp4(path, shape_clip(colour, shape, direction, frames, size), fps=16)
        rows.append({"video": name, "caption": f"a {colour} {shape} moving {direction}"})
    csv_path = folder / "memory.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


RANDOM_WORLD_PROMPT = "a red circle moving right"


def run_random_world(
    out: str | Path = "outputs/demo", prompt: str = RANDOM_WORLD_PROMPT, k: int = 2, steps: int = 4
):
    """A random tiny Wan + a synthetic bank folder in ``out``, then one generation (each stage
    skipped if done).

    Tests use the folders it writes: ``model`` (diffusers layout), ``encoder``, and ``bank``
    (``index/``, ``latents/``, ``videos/``, ``bank.json``) from ``memory.csv``; the generated
    video is noise by construction.
    """
    from dit_mem.bank import write_bank_manifest
    from dit_mem.data import LatentJobConfig, encode_latents
    from dit_mem.generation import GenerationConfig, generate, load_pipeline
    from dit_mem.memory import MemoryEncoder
    from dit_mem.outputs import save_generation, slugify
    from dit_mem.retrieval import build_index

    out = Path(out)
    bank = out / "bank"
    csv_path = write_bank(out, videos=bank / "videos")
    logger.info(f"[1/5] memory bank videos: {bank / 'videos'} (listed in {csv_path})")

    if not (bank / "index" / "manifest.json").is_file():
        build_index(csv_path, bank / "index")
    logger.info(f"[2/5] caption index (all-MiniLM-L6-v2, FAISS inner product): {bank / 'index'}")

    model = build_tiny_wan(out / "model")
    summary = encode_latents(
        LatentJobConfig(
            csv=csv_path,
            out=bank / "latents",
            base_model=model,
            videos=bank / "videos",
            num_frames=17,
            height=64,
            width=64,
            num_workers=0,
        )
    )
    write_bank_manifest(bank)
    logger.info(f"[3/5] latents (tiny random Wan VAE): {summary.ok} new, {summary.skipped} done")

    encoder_dir = out / "encoder"
    if not (encoder_dir / "config.json").is_file():
        MemoryEncoder.from_preset("tiny").save_pretrained(encoder_dir)
    logger.info(f"[4/5] tiny random Wan model {model} and memory encoder {encoder_dir}")

    cfg = GenerationConfig(
        base_model=model,
        encoder=encoder_dir,
        bank=bank,
        k=k,
        height=64,
        width=64,
        num_frames=17,
        steps=steps,
        dtype="float32",
        device="cpu",
        progress=False,
    )
    pipe = load_pipeline(cfg)
    result = generate(pipe, cfg, prompt)
    previews = pipe.memory_bank.previews(result.retrieved.ids, vae=pipe.vae)
    paths = save_generation(result, out, slugify(prompt), previews)
    logger.info(
        f"[5/5] generated {result.frames.shape[0]} frames with {k} memory videos for {prompt!r}"
    )
    return paths


# ======================================================================================
# A synthetic training set
# ======================================================================================
LATENT_SHAPE = (16, 5, 8, 8)
TINY_ENCODER = {
    "conv_channels": [8, 16],
    "kernel_sizes": [3, 3],
    "strides": [1, 1],
    "dim": 32,
    "num_heads": 2,
    "latent_shape": [5, 8, 8],
}
CAPTION = "a person walking in the city"


def write_latent_store(folder: Path, latents: dict[str, torch.Tensor]) -> None:
    """A minimal ``LatentStore`` folder: manifest + one bf16 ``latent`` file per id."""
    from dit_mem.data.latents import FORMAT, LATENT_KEY, MANIFEST

    folder.mkdir(parents=True, exist_ok=True)
    shape = list(next(iter(latents.values())).shape)
    write_json_atomic(
        folder / MANIFEST,
        {"format": FORMAT, "latent_shape": shape, "normalized": True, "synthetic": True},
    )
    for vid, x in latents.items():
        write_safetensors_atomic(folder / f"{vid}.safetensors", {LATENT_KEY: x.to(torch.bfloat16)})


def write_retrieval_cache(cache_dir: Path, index_dir: Path, memory: dict[str, list[str]]) -> None:
    """A retrieval cache as ``build_retrieval_cache`` would leave it, for the given memory."""
    from dit_mem.training.retrieval_cache import COLUMNS, CSV_NAME, META_NAME

    rows = [
        {"id": vid, "rank": r, "memory_id": m, "score": 1.0 - 0.01 * r, "memory_caption": CAPTION}
        for vid, mids in memory.items()
        for r, m in enumerate(mids)
    ]
    cache_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(cache_dir / CSV_NAME, index=False)
    k = len(next(iter(memory.values())))
    write_json_atomic(
        cache_dir / META_NAME,
        {
            "k": k,
            "index_dir": str(Path(index_dir).resolve()),
            "exclude": "own video and every clip of the same source video",
        },
    )


def make_synthetic_run(
    root: str | Path,
    num_train: int = 8,
    num_classes: int = 2,
    memory_per_class: int = 4,
    k: int = 2,
    noise: float = 0.3,
    scale: float = 1.5,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> Any:
    """Write the synthetic set under ``root`` (base model reused if present); return its
    ``TrainConfig``."""
    from dit_mem.training.config import load_train_config

    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (num_classes, LATENT_SHAPE[0]), generator=g) * 2 - 1
    means = scale * signs.float()  # [classes, C]: class pattern, one value per channel

    def sample(c: int) -> torch.Tensor:
        x = torch.randn(LATENT_SHAPE, generator=g) * noise
        return x + means[c].view(-1, 1, 1, 1)

    latents: dict[str, torch.Tensor] = {}
    bank = {
        c: [f"bank{c}s{j}_0_0to10" for j in range(memory_per_class)] for c in range(num_classes)
    }
    for c, ids in bank.items():
        latents.update({vid: sample(c) for vid in ids})
    memory, rows = {}, []
    for i in range(num_train):
        c = i % num_classes
        vid = f"train{i}_0_0to10"
        latents[vid] = sample(c)
        perm = torch.randperm(memory_per_class, generator=g)[:k].tolist()
        memory[vid] = [bank[c][j] for j in perm]
        rows.append({"video": f"videos/{vid}.mp4", "caption": CAPTION})

    build_tiny_wan(root / "base")
    write_latent_store(root / "latents", latents)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    write_retrieval_cache(root / "cache", root / "index", memory)
    encoder = "{" + ", ".join(f"{k_}: {v}" for k_, v in TINY_ENCODER.items()) + "}"
    base = [
        f"output_dir={root / 'run'}",
        f"data.train_csv={root / 'train.csv'}",
        f"data.latent_dir={root / 'latents'}",
        f"data.index_dir={root / 'index'}",
        f"data.cache_dir={root / 'cache'}",
        f"data.k={k}",
        "data.max_text_tokens=32",
        f"model.base_model_dir={root / 'base'}",
        f"model.encoder_overrides={encoder}",
        "model.dit_dtype=fp32",
        "model.text_encoder_dtype=fp32",
        "model.gradient_checkpointing=true",
        "mixed_precision=no",
        "optim.lr=1e-3",
        "epochs=1000",
        "max_steps=4",
        "checkpoint_every=2",
        "log_with=none",
        "progress_bar=false",
        "seed=0",
    ]
    return load_train_config(None, base + list(overrides or []))
