"""A small synthetic training set on a tiny random Wan, for tests, benchmarks and smoke runs.

``make_synthetic_run(root)`` writes everything ``dit-mem train`` reads and returns a
``TrainConfig`` pointing at it:

    root/base/        tiny random Wan in diffusers layout (``dit_mem.tiny.build_tiny_wan``)
    root/latents/     LatentStore: training and memory latents [16, 5, 8, 8]
    root/train.csv    training videos (video, caption)
    root/cache/       retrieval.csv + retrieval.json: each sample's memory, written directly

The data make the target predictable from its memory: every video belongs to one of
``num_classes`` classes, its latent is the class's per-channel mean pattern plus small noise,
and a sample's memory videos are other videos of the same class (from other sources). All
captions are the same, so only the memory can tell the classes apart.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from dit_mem.training.config import TrainConfig, load_train_config
from dit_mem.training.retrieval_cache import COLUMNS, CSV_NAME, META_NAME
from dit_mem.utils import write_json_atomic, write_safetensors_atomic

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
) -> TrainConfig:
    """Write the synthetic set under ``root`` (base model reused if present); return its config."""
    from dit_mem.tiny import build_tiny_wan

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
