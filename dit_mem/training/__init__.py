"""Training the memory encoder against a frozen video DiT (Wan, LTX-Video, HunyuanVideo-1.5) (method §5)."""

from dit_mem.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    resolve_resume,
)
from dit_mem.training.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_train_config,
)
from dit_mem.training.loss import FlowMatchingObjective
from dit_mem.training.text_cache import TextEmbeddingCache
from dit_mem.training.trainer import TrainResult, prepare_caches, train, training_loss

__all__ = [
    "Checkpoint",
    "DataConfig",
    "FlowMatchingObjective",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TextEmbeddingCache",
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "list_checkpoints",
    "load_train_config",
    "prepare_caches",
    "read_checkpoint",
    "resolve_resume",
    "train",
    "training_loss",
]
