"""``TrainConfig``: every setting of a training run, filled from YAML and ``key=value``.

    cfg = load_train_config("config/train_dit_mem.yaml", ["optim.lr=2e-5", "data.k=3"])

Defaults are the paper's (method §5): AdamW, lr 1e-5, weight decay 0, batch 1 per device,
k = 5, 5 epochs, bf16 mixed precision, gradient checkpointing through the frozen DiT, flow
shift 5. The resolved config is saved into the run folder and into every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dit_mem.config import ConfigError, load_config

Precision = Literal["no", "fp16", "bf16"]
Dtype = Literal["fp32", "fp16", "bf16"]
LOGGERS = ("tensorboard", "wandb")


@dataclass
class DataConfig:
    """Where the training samples, their latents and the memory bank live."""

    train_csv: Path | None = None  # OpenVid-style CSV of the training videos (id, caption)
    latent_dir: Path | None = None  # LatentStore of the training videos (and, without a bank,
    #                                 of the memory videos too: the paper's one folder)
    bank: Path | None = None  # a MemoryBank folder or Hub id: its index and latents are the memory
    bank_subfolder: str | None = None  # the bank's folder inside a Hub repository
    index_dir: Path | None = None  # without a bank: the memory bank's caption index
    trust_remote_code: str | None = None  # the one embedding model allowed to run its own code
    cache_dir: Path | None = None  # text-embedding + retrieval caches; default <output_dir>/cache
    k: int = 5  # retrieved memory videos per sample
    # Share of samples whose caption is replaced by dropped_caption (the unconditional branch's
    # text), so that memory alone is trained too: memory then counts in both CFG branches.
    caption_dropout: float = 0.0
    dropped_caption: str = ""
    max_text_tokens: int | None = None  # text length (None: the family's; Wan: 512 UMT5 tokens)
    text_batch_size: int = 8  # captions per UMT5 forward when building the cache
    retrieval_batch_size: int = 256  # prompts per retrieval query when building the cache


@dataclass
class ModelConfig:
    """The frozen backbone and the trainable memory encoder."""

    base_model_dir: Path | None = None  # a diffusers folder of any family, or the original Wan2.1
    encoder_preset: str | None = None  # dit_mem.memory.PRESETS key (None: the base model's)
    encoder_overrides: dict[Any, Any] = field(default_factory=dict)  # preset fields replaced
    # (dict[Any, Any], not dict[str, Any]: dit_mem.config keeps a key=value string verbatim
    #  for types that mention str, so {dim: 32} would not parse on the command line)
    encoder_init: Path | None = None  # start from a save_pretrained folder or the release's file
    dit_dtype: Dtype = "bf16"  # weights of the frozen DiT
    text_encoder_dtype: Dtype = "bf16"  # weights of the frozen UMT5 (cache building only)
    gradient_checkpointing: bool = True  # recompute DiT blocks in backward


@dataclass
class OptimConfig:
    """AdamW on the encoder's parameters; constant learning rate after an optional warmup."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup over this many optimizer steps
    max_grad_norm: float | None = None  # clip if set; the norm is logged either way


@dataclass
class LossConfig:
    """Flow-matching objective (method §5)."""

    num_train_timesteps: int = 1000
    flow_shift: float | None = None  # None: the family's (Wan: 5, method §5)
    weighting: Literal["wan", "none"] | None = None  # Wan's bell | uniform (None: the family's)


@dataclass
class TrainConfig:
    """A training run: data, model, optimizer, objective and the loop around them."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    output_dir: Path = Path("runs/dit-mem-wan2.1-1.3b")  # the run folder
    seed: int = 42
    epochs: int = 5
    max_steps: int | None = None  # stop after this many optimizer steps (all epochs if null)
    batch_size: int = 1  # per device
    gradient_accumulation_steps: int = 1
    # "no" | "fp16" | "bf16"; YAML reads a bare `no` as false, which means "no" here too.
    mixed_precision: Precision | bool = "bf16"
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int | None = None  # keep only the newest N complete checkpoints
    log_every: int = 1  # optimizer steps between logged rows
    log_with: str = "tensorboard"  # comma list of tensorboard, wandb; "none" for CSV only
    wandb_project: str = "dit-mem"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        elif self.mixed_precision is True:
            raise ConfigError("mixed_precision must be no, fp16 or bf16, got true")
        positive = {
            "data.k": self.data.k,
            "data.text_batch_size": self.data.text_batch_size,
            "data.retrieval_batch_size": self.data.retrieval_batch_size,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "checkpoint_every": self.checkpoint_every,
            "log_every": self.log_every,
            "loss.num_train_timesteps": self.loss.num_train_timesteps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be ≥ 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be ≥ 1 or null, got {self.max_steps}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be ≥ 1 or null, got {self.keep_checkpoints}")
        o = self.optim
        for key, value in (("optim.lr", o.lr), ("optim.eps", o.eps)):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key} must be a finite number > 0, got {value}")
        if not math.isfinite(o.weight_decay) or o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be ≥ 0, got {o.weight_decay}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must both be in [0, 1), got {list(o.betas)}")
        if o.max_grad_norm is not None and (
            not math.isfinite(o.max_grad_norm) or o.max_grad_norm <= 0
        ):
            raise ConfigError(
                f"optim.max_grad_norm must be a finite number > 0, or null for no clipping; got "
                f"{o.max_grad_norm} (a negative norm would turn the update around)"
            )
        if self.optim.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be ≥ 0, got {self.optim.warmup_steps}")
        if not 0.0 <= self.data.caption_dropout < 1.0:
            raise ConfigError(
                f"data.caption_dropout must be in [0, 1), got {self.data.caption_dropout}"
            )
        if self.loss.flow_shift is not None and (
            not math.isfinite(self.loss.flow_shift) or self.loss.flow_shift <= 0
        ):
            raise ConfigError(f"loss.flow_shift must be > 0, got {self.loss.flow_shift}")
        if self.data.max_text_tokens is not None and self.data.max_text_tokens < 1:
            raise ConfigError(f"data.max_text_tokens must be ≥ 1, got {self.data.max_text_tokens}")
        self.loggers  # noqa: B018  (validates log_with)

    @property
    def loggers(self) -> tuple[str, ...]:
        """The experiment trackers asked for in ``log_with`` (CSV is always written)."""
        names = tuple(n.strip() for n in self.log_with.split(",") if n.strip())
        if names in ((), ("none",)):
            return ()
        unknown = [n for n in names if n not in LOGGERS]
        if unknown:
            raise ConfigError(
                f"log_with: unknown logger {unknown[0]!r}; use a comma list of {', '.join(LOGGERS)} "
                "or 'none'"
            )
        return names

    @property
    def cache_dir(self) -> Path:
        return self.data.cache_dir or self.output_dir / "cache"

    def require_paths(self) -> None:
        """Raise naming every path a training run needs but the config leaves empty."""
        missing = [
            name
            for name, value in (
                ("data.train_csv", self.data.train_csv),
                ("data.latent_dir", self.data.latent_dir),
                ("data.bank (or data.index_dir)", self.data.bank or self.data.index_dir),
                ("model.base_model_dir", self.model.base_model_dir),
            )
            if value is None
        ]
        if missing:
            raise ConfigError(
                f"training needs {', '.join(missing)}: set them in the YAML or as key=value"
            )
        from dit_mem.utils.hub import is_repo_id

        checks = [
            ("data.train_csv", self.data.train_csv, Path.is_file),
            ("data.latent_dir", self.data.latent_dir, Path.is_dir),
            ("model.base_model_dir", self.model.base_model_dir, Path.exists),
            ("model.encoder_init", self.model.encoder_init, Path.exists),
        ]
        if self.data.bank is None and not (self.cache_dir / "retrieval.csv").is_file():
            checks.append(("data.index_dir", self.data.index_dir, Path.is_dir))  # else not read
        if self.data.bank is not None and not is_repo_id(str(self.data.bank)):
            checks.append(("data.bank", self.data.bank, Path.is_dir))
        for key, path, exists in checks:
            if path is not None and not exists(Path(path)):
                raise ConfigError(f"{key}: {path} does not exist")


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides (the command line wins)."""
    return load_config(TrainConfig, path, overrides)
