"""``dit-mem demo``: the whole DiT-Mem path offline, on a fresh install, in about a minute.

1. write a few synthetic clips (coloured shapes moving) with captions, as a memory bank CSV;
2. build a real FAISS index of the captions with the bundled all-MiniLM-L6-v2 model;
3. encode the clips to latents with a tiny *random* Wan VAE (the real encoding job);
4. write a tiny *random* Wan model (transformer, UMT5 text encoder, tokenizer) in diffusers
   layout and a tiny memory encoder, and load them with the real loaders;
5. generate one video with memory, writing the mp4, its JSON and a contact sheet.

The weights are random, so the generated video is noise: the demo shows the machinery,
not the quality. With real weights the same command line is ``dit-mem generate``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)

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


DEMO_PROMPT = "a red circle moving right"


def run_demo(
    out: str | Path = "outputs/demo", prompt: str = DEMO_PROMPT, k: int = 2, steps: int = 4
):
    """Run every stage (each skipped if already done) and return the written paths."""
    from dit_mem.data import LatentJobConfig, encode_latents
    from dit_mem.generation import GenerationConfig, load_generator
    from dit_mem.memory import MemoryEncoder
    from dit_mem.outputs import save_generation, slugify
    from dit_mem.retrieval import build_index
    from dit_mem.tiny import build_tiny_wan

    out = Path(out)
    bank = out / "bank"
    csv_path = write_bank(bank)
    print(f"[1/5] memory bank: {csv_path} ({sum(1 for _ in csv_path.open()) - 1} synthetic clips)")

    index = out / "memory_index"
    if not (index / "manifest.json").is_file():
        build_index(csv_path, index)
    print(f"[2/5] caption index (all-MiniLM-L6-v2, FAISS inner product): {index}")

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
    print(
        f"[3/5] latents (tiny random Wan VAE): {latents} ({summary.ok} new, {summary.skipped} done)"
    )

    encoder_dir = out / "encoder"
    if not (encoder_dir / "config.json").is_file():
        MemoryEncoder.from_preset("tiny").save_pretrained(encoder_dir)
    print(f"[4/5] tiny random Wan model {model} and memory encoder {encoder_dir}")

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
    print(f"[5/5] generated {result.frames.shape[0]} frames with {k} memory videos for {prompt!r}")
    print("\nretrieved memory:")
    for i, (vid, cap, score) in enumerate(
        zip(result.retrieved.ids, result.retrieved.captions, result.retrieved.scores, strict=True)
    ):
        print(f"  {i + 1}. {score:.3f}  {vid}  {cap}")
    print(
        f"\nvideo:         {paths['video']}\nsettings:      {paths['json']}\ncontact sheet: {paths['sheet']}"
    )
    print(
        "\nNOTE: every model weight in this demo is random, so the video is noise. It shows the\n"
        "whole path (retrieval, latents, memory encoder, injection, denoising, decoding) offline.\n"
        "With real weights:\n"
        "  dit-mem generate --prompt 'a dog runs on the beach' base_model=model/Wan2.1-T2V-1.3B \\\n"
        "      encoder=checkpoint/DiT-Mem-1.3B.safetensors index=memory_index latents=latent"
    )
    return paths
