"""Stage 4: the toy world's memory encoder, trained by the real ``dit-mem train`` code path.

The encoder is :class:`~dit_mem.memory.MemoryEncoder` at the ``toyworld`` preset (same
architecture as the paper's, smaller numbers); the frozen DiT is the stage-2 base model with
memory attached by :func:`~dit_mem.backbone.attach_memory`; the samples are the bank's clips,
each with its k nearest *other* bank clips (same-source exclusion) as memory. Nothing here is
toy-specific except the settings: this builds a :class:`~dit_mem.training.TrainConfig` and calls
:func:`~dit_mem.training.train`, resuming from the run's latest checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dit_mem.utils import atomic_dir, atomic_path, get_logger

log = get_logger(__name__)


@dataclass
class MemoryStageConfig:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    k: int = 2
    checkpoint_every: int = 500
    seed: int = 0
    tokens_per_video: int | None = None  # replaces the toyworld preset's L when set
    # Share of samples trained with the empty caption (the toy world's unconditional text), so
    # the encoder also learns to speak to the unconditional branch (memory in both branches).
    caption_dropout: float = 0.0
    loss_weighting: str = "wan"  # "none": every timestep counts (see FlowMatchingObjective)
    # Variants for the generalisation question (benchmarks/toyworld.md), off by default:
    train_colours: list[str] | None = None  # only these colours' clips are training samples
    mask_colour: bool = False  # the DiT reads captions without their colour word

    @property
    def is_variant(self) -> bool:
        """Training samples differ from the bank's CSV (written by ``_write_variant_samples``)."""
        return self.train_colours is not None or self.mask_colour


def memory_train_config(
    out: Path, base_dir: Path, bank_dir: Path, cfg: MemoryStageConfig, progress=True
):
    from dit_mem.toyworld.base import MAX_TOKENS
    from dit_mem.training import load_train_config

    train_csv = out / "work" / "memory_train.csv" if cfg.is_variant else bank_dir / "bank.csv"
    extra = []
    if cfg.tokens_per_video is not None:
        extra.append(f"model.encoder_overrides={{tokens_per_video: {cfg.tokens_per_video}}}")
    return load_train_config(
        None,
        [
            *extra,
            f"data.train_csv={train_csv}",
            f"data.latent_dir={bank_dir / 'latents'}",  # the samples are the bank's own clips
            f"data.bank={bank_dir}",
            f"data.k={cfg.k}",
            f"data.caption_dropout={cfg.caption_dropout}",
            f"loss.weighting={cfg.loss_weighting}",
            f"data.max_text_tokens={MAX_TOKENS}",
            "data.text_batch_size=64",
            f"model.base_model_dir={base_dir}",
            "model.encoder_preset=toyworld",
            "model.dit_dtype=fp32",
            "model.text_encoder_dtype=fp32",
            "model.gradient_checkpointing=false",
            f"optim.lr={cfg.lr}",
            f"output_dir={out / 'work' / 'memory'}",
            f"seed={cfg.seed}",
            "epochs=100000",
            f"max_steps={cfg.steps}",
            f"batch_size={cfg.batch_size}",
            "mixed_precision=no",
            f"checkpoint_every={cfg.checkpoint_every}",
            "keep_checkpoints=2",
            "log_every=50",
            "log_with=none",
            f"progress_bar={'true' if progress else 'false'}",
        ],
    )


def train_memory(
    out: Path, base_dir: Path, bank_dir: Path, cfg: MemoryStageConfig, progress=True
) -> Path:
    """Train (or resume) the memory encoder; the result is copied to ``out/encoder``."""
    from dit_mem.checkpoint import latest_checkpoint
    from dit_mem.training import train

    final = out / "encoder"
    if (final / "config.json").is_file():
        log.info("memory encoder: %s exists, skipping", final)
        return final
    tcfg = memory_train_config(out, base_dir, bank_dir, cfg, progress)
    if cfg.is_variant:
        _write_variant_samples(tcfg, bank_dir / "bank.csv", cfg)
    run_dir = Path(tcfg.output_dir)
    resume = "latest" if latest_checkpoint(run_dir) is not None else None
    train(tcfg, resume=resume)
    encoder_dir = run_dir / "encoder"
    if not (encoder_dir / "config.json").is_file():
        raise RuntimeError(f"training finished without writing {encoder_dir}")
    with atomic_dir(final) as tmp:
        shutil.copytree(encoder_dir, tmp, dirs_exist_ok=True)
        shutil.copy2(run_dir / "config.yaml", tmp / "train_config.yaml")
    return final


def _write_variant_samples(tcfg, bank_csv: Path, cfg: MemoryStageConfig) -> None:
    """The training CSV of a variant run, and its retrieval cache built from the *true* captions.

    The trainer retrieves with a sample's caption and conditions the DiT on the same caption;
    with ``mask_colour`` the DiT must read a caption without its colour word while retrieval
    still sees the real one, so the retrieval cache is written first (the trainer reuses it).
    """
    import pandas as pd

    from dit_mem.bank import MemoryBank
    from dit_mem.toyworld.world import parse_caption
    from dit_mem.training.retrieval_cache import build_retrieval_cache

    table = pd.read_csv(bank_csv, dtype=str)
    parsed = [parse_caption(c) for c in table["caption"]]
    keep = [cfg.train_colours is None or p[0] in cfg.train_colours for p in parsed]
    table, parsed = table[keep], [p for p, k in zip(parsed, keep, strict=True) if k]
    build_retrieval_cache(
        tcfg.cache_dir,
        table["video"].tolist(),
        table["caption"].tolist(),
        lambda: MemoryBank.from_pretrained(tcfg.data.bank),
        k=tcfg.data.k,
        index_dir=tcfg.data.bank / "index",
    )
    if cfg.mask_colour:
        table = table.assign(caption=[f"a {shape} moving {d}" for _, shape, d in parsed])
    with atomic_path(tcfg.data.train_csv) as tmp:
        table.to_csv(tmp, index=False)
