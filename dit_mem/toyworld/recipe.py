"""``dit-mem toyworld train``: the whole toy world, from nothing to shipped assets.

    VAE (stage 1) → base DiT + UMT5 + tokenizer, one colour held out (stage 2)
      → memory bank: latents + caption index (stage 3)
      → memory encoder via ``dit-mem train`` (stage 4) → metric table → fp16 export

Every stage writes its result atomically and is skipped when present; the training stages
checkpoint as they go, so an interrupted run resumes where it stopped. The resolved config,
the metric table, the timings and the library versions go into ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dit_mem.toyworld.base import BaseStageConfig, train_base
from dit_mem.toyworld.evaluate import (
    ToyGenerationSettings,
    format_table,
    load_toy_pipeline,
    metric_table,
)
from dit_mem.toyworld.memory import MemoryStageConfig, train_memory
from dit_mem.toyworld.memory_bank import BankStageConfig, build_bank
from dit_mem.toyworld.vae import VAEStageConfig, train_vae
from dit_mem.utils import atomic_dir, folder_lock, get_logger, write_json_atomic

log = get_logger(__name__)

SHIPPED = Path(__file__).parent / "assets"  # the trained toy world that `dit-mem demo` uses


@dataclass
class ToyWorldConfig:
    out: Path = Path("runs/toyworld")
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    base: BaseStageConfig = field(default_factory=BaseStageConfig)
    bank: BankStageConfig = field(default_factory=BankStageConfig)
    memory: MemoryStageConfig = field(default_factory=MemoryStageConfig)
    generation: ToyGenerationSettings = field(default_factory=ToyGenerationSettings)
    eval_held_out_repeats: int = 8  # held-out prompts: 12 concepts × this
    eval_seen_repeats: int = 1  # seen prompts: 60 concepts × this
    eval_seed: int = 1000
    threads: int | None = None  # torch threads (default: all cores)
    progress: bool = True


def versions() -> dict[str, str]:
    import diffusers
    import faiss
    import sentence_transformers
    import transformers

    import dit_mem

    return {
        "dit_mem": dit_mem.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "faiss": faiss.__version__,
    }


def export_assets(out: Path, dest: Path) -> Path:
    """Copy the trained toy world to ``dest`` with weights in fp16 (the shipped form)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from dit_mem.memory import MemoryEncoder

    base = out / "base"

    def half(module):  # nn.Module.to: storage only, every loader casts back to float32
        return torch.nn.Module.to(module, torch.float16)

    with atomic_dir(dest) as tmp:
        half(WanTransformer3DModel.from_pretrained(base / "transformer")).save_pretrained(
            tmp / "base" / "transformer"
        )
        half(AutoencoderKLWan.from_pretrained(base / "vae")).save_pretrained(tmp / "base" / "vae")
        half(UMT5EncoderModel.from_pretrained(base / "text_encoder")).save_pretrained(
            tmp / "base" / "text_encoder"
        )
        AutoTokenizer.from_pretrained(base / "tokenizer").save_pretrained(
            tmp / "base" / "tokenizer"
        )
        shutil.copytree(base / "scheduler", tmp / "base" / "scheduler")
        shutil.copy2(base / "model_index.json", tmp / "base" / "model_index.json")
        half(MemoryEncoder.from_pretrained(out / "encoder")).save_pretrained(tmp / "encoder")
        shutil.copytree(out / "bank", tmp / "bank")
        if (out / "manifest.json").is_file():
            shutil.copy2(out / "manifest.json", tmp / "manifest.json")
    return dest


def run_recipe(cfg: ToyWorldConfig, export: Path | None = None, command: str | None = None) -> dict:
    """Run every stage (skipping finished ones), evaluate, write the manifest; returns it.

    One run per folder: ``out/.lock`` is held until the recipe ends."""
    with folder_lock(cfg.out, "toyworld train"):
        return _run_recipe(cfg, export, command)


def _run_recipe(cfg: ToyWorldConfig, export: Path | None, command: str | None) -> dict:
    from dit_mem.config import save_config, to_dict

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    save_config(cfg, out / "config.yaml")
    times: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str):
        start = time.time()
        yield
        times[name] = round(time.time() - start, 1)

    with timed("vae_s"):
        vae_dir = train_vae(out, cfg.vae, cfg.progress)
    with timed("base_s"):
        base_dir = train_base(out, vae_dir, cfg.base, cfg.progress)
    with timed("bank_s"):
        bank_dir = build_bank(out, vae_dir, cfg.bank)
    with timed("memory_s"):
        train_memory(out, base_dir, bank_dir, cfg.memory, cfg.progress)
    with timed("eval_s"):
        pipe, gen_cfg = load_toy_pipeline(out, cfg.generation)
        table = metric_table(
            pipe, gen_cfg, cfg.eval_held_out_repeats, cfg.eval_seen_repeats, cfg.eval_seed
        )
    print(format_table(table))
    previous = {}
    if (out / "manifest.json").is_file():
        previous = json.loads((out / "manifest.json").read_text()).get("stage_seconds", {})
    manifest = {
        "format": "dit-mem-toyworld/1",
        "command": command or f"dit-mem toyworld train out={out}",
        "config": to_dict(cfg),
        "versions": versions(),
        "stage_seconds": {**previous, **{k: v for k, v in times.items() if v > 1.0}},
        "threads": torch.get_num_threads(),
        "metrics": table,
        "training_records": {
            name: json.loads(p.read_text())
            for name, p in (
                ("vae", vae_dir / "training.json"),
                ("base", base_dir / "training.json"),
            )
            if p.is_file()
        },
    }
    write_json_atomic(out / "manifest.json", manifest)
    if export is not None:
        export_assets(out, Path(export))
        log.info("exported fp16 assets to %s", export)
    return manifest
