"""Tiny random Wan stacks in diffusers layout, for tests and the offline demo.

``build_tiny_wan(folder)`` writes ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
and ``scheduler/`` exactly as a diffusers Wan checkpoint is laid out, so that the real loading
code reads them. The weights are random: what comes out is noise, by construction.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

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


def write_model_index(folder: Path, tokenizer_class: str) -> None:
    """The ``model_index.json`` of a diffusers ``WanPipeline`` folder (components as saved)."""
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "tokenizer": ["transformers", tokenizer_class],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan model in diffusers layout to ``folder`` (skipped if complete)."""
    folder = Path(folder)
    marker = folder / "model_index.json"
    if marker.is_file():
        return folder
    parts = build_tiny_components(seed)
    for name, module in parts.items():
        module.save_pretrained(folder / name)
    write_model_index(folder, "T5Tokenizer")  # written last: marks the folder complete
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


def write_bank(folder: Path, frames: int = 17, size: int = 64) -> Path:
    """Synthetic clips + ``memory.csv`` (``video``, ``caption``); returns the CSV path."""
    from dit_mem.evaluation.video_io import write_mp4

    videos = folder / "video"
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
    """A random tiny Wan + synthetic bank in ``out``, then one generation (each stage skipped if done).

    Tests use the folders it writes (``model``, ``encoder``, ``memory_index``, ``latent``,
    ``bank/video``); the generated video is noise by construction.
    """
    from dit_mem.data import LatentJobConfig, encode_latents
    from dit_mem.generation import GenerationConfig, load_generator
    from dit_mem.memory import MemoryEncoder
    from dit_mem.outputs import save_generation, slugify
    from dit_mem.retrieval import build_index

    out = Path(out)
    bank = out / "bank"
    csv_path = write_bank(bank)
    logger.info(
        f"[1/5] memory bank: {csv_path} ({sum(1 for _ in csv_path.open()) - 1} synthetic clips)"
    )

    index = out / "memory_index"
    if not (index / "manifest.json").is_file():
        build_index(csv_path, index)
    logger.info(f"[2/5] caption index (all-MiniLM-L6-v2, FAISS inner product): {index}")

    model = build_tiny_wan(out / "model")
    latents = out / "latent"
    summary = encode_latents(
        LatentJobConfig(
            csv=csv_path,
            out=latents,
            base_model=model,
            videos=bank / "video",
            num_frames=17,
            height=64,
            width=64,
            num_workers=0,
        )
    )
    logger.info(
        f"[3/5] latents (tiny random Wan VAE): {latents} ({summary.ok} new, {summary.skipped} done)"
    )

    encoder_dir = out / "encoder"
    if not (encoder_dir / "config.json").is_file():
        MemoryEncoder.from_preset("tiny").save_pretrained(encoder_dir)
    logger.info(f"[4/5] tiny random Wan model {model} and memory encoder {encoder_dir}")

    cfg = GenerationConfig(
        base_model=model,
        encoder=encoder_dir,
        index=index,
        latents=latents,
        videos=bank / "video",
        k=k,
        height=64,
        width=64,
        num_frames=17,
        steps=steps,
        dtype="float32",
        device="cpu",
        progress=False,
    )
    gen = load_generator(cfg)
    result = gen.generate(prompt)
    paths = save_generation(result, out, slugify(prompt), gen.memory_previews(result.retrieved))
    logger.info(
        f"[5/5] generated {result.frames.shape[0]} frames with {k} memory videos for {prompt!r}"
    )
    return paths
