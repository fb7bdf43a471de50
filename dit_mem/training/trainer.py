"""Train the memory encoder against a frozen video DiT (method §5) with accelerate.

    train(load_train_config("config/train_dit_mem.yaml", overrides), resume="latest")

Stages:
  1. run folder, resolved config, checkpoint to resume from
  2. caches: retrieved memory per sample (CSV) and the family's caption embeddings (safetensors)
  3. dataset (rows with missing latents skipped with a count)
  4. frozen DiT with memory attached (eval, no grad, gradient checkpointing)
  5. trainable memory encoder + AdamW, prepared by accelerate; resume
  6. loop: encoder(memory latents) → DiT(x_t, t, text, memory) → weighted flow-matching loss;
     checkpoints every ``checkpoint_every`` optimizer steps and at the end

Randomness: the encoder is initialised from ``seed`` (identical on every process); timestep,
noise and memory-order shuffling come from this process's own generator (seeded
``seed · 1000 + rank``), dropout from torch's global RNG (seeded ``seed + rank``); both states
go into every checkpoint, so a resumed run continues the exact same sequence.
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dit_mem import checkpoint as ckpt_io
from dit_mem.backbone.injection import check_width
from dit_mem.config import ConfigError, save_config, to_dict
from dit_mem.errors import UserError
from dit_mem.training.config import TrainConfig
from dit_mem.training.data import EpochPlan, TrainingSamples, collate
from dit_mem.training.loss import FlowMatchingObjective
from dit_mem.training.metrics import MetricsLogger
from dit_mem.training.retrieval_cache import build_retrieval_cache, memory_ids_by_sample
from dit_mem.training.text_cache import DROPPED_CAPTION_KEY, TextEmbeddingCache
from dit_mem.utils import atomic_dir, folder_lock, get_logger
from dit_mem.utils.io import honour_umask

log = get_logger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CPU_BF16_NOTE = (
    ". On CPU, bf16 autocast runs Conv3d backward through oneDNN, which returned NaN weight "
    "gradients here (torch 2.13): train on CPU with mixed_precision=no"
)
# Config keys a resumed run may change without changing what it computes.
_RESUME_FREE = {
    "max_steps",
    "epochs",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "log_with",
    "wandb_project",
    "progress_bar",
    "output_dir",
}


@dataclass
class TrainResult:
    """What a finished (or stopped) run did."""

    run_dir: Path
    step: int  # optimizer steps done in total
    losses: list[float] = field(default_factory=list)  # per optimizer step, this invocation
    skipped_rows: int = 0
    last_checkpoint: Path | None = None


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------
def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients, eval mode (no dropout, fixed statistics)."""
    module.requires_grad_(False)
    return module.eval()


def build_encoder(cfg: TrainConfig):
    """The trainable encoder: from ``model.encoder_init``, or the preset (+ overrides): the named
    one, else the base model's (its family, width and latent channels)."""
    from dit_mem.memory import MemoryEncoder

    if cfg.model.encoder_init is not None:
        if cfg.model.encoder_overrides:
            raise ConfigError("set model.encoder_init or model.encoder_overrides, not both")
        return MemoryEncoder.from_path(cfg.model.encoder_init)
    overrides = {
        k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.encoder_overrides.items()
    }
    try:
        return MemoryEncoder.from_preset(encoder_preset(cfg), **overrides)
    except TypeError as e:
        raise ConfigError(f"model.encoder_overrides: {e}") from None


def encoder_preset(cfg: TrainConfig) -> str:
    """``model.encoder_preset``, or the preset of the base model; when none fits, the encoder's
    defaults if ``model.encoder_overrides`` replace fields of it, else ``ConfigError``."""
    if cfg.model.encoder_preset is not None:
        return cfg.model.encoder_preset
    from dit_mem.memory import preset_for
    from dit_mem.models.base_model import describe_base_model

    base = describe_base_model(cfg.model.base_model_dir)
    t = base.configs["transformer"]
    channels = base.family.latents.geometry(base.vae_on_meta())[0]
    try:
        return preset_for(
            base.family.name, t["num_attention_heads"] * t["attention_head_dim"], channels
        )
    except UserError as e:
        if cfg.model.encoder_overrides:  # fields replaced: of the encoder's defaults (the paper's)
            return "wan2.1-1.3b"
        raise ConfigError(f"model.encoder_preset: {e}") from None


@dataclass
class FrozenDiT:
    """The frozen DiT of a run, as training calls it: the transformer (memory attached), its
    family, the dtype it runs in, the text length, the family's fixed call arguments and, for a
    model of two experts (Wan2.2 A14B), the second expert and the timestep from which down it
    runs (the pipeline's ``boundary_ratio`` · 1000)."""

    transformer: torch.nn.Module
    dtype: torch.dtype = torch.float32
    max_text_tokens: int = 512
    fixed: dict = field(default_factory=dict)
    transformer_2: torch.nn.Module | None = None
    boundary: float | None = None

    def __post_init__(self) -> None:
        from dit_mem.backbone import family_of

        self.family = family_of(self.transformer)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [t for t in (self.transformer, self.transformer_2) if t is not None]

    @classmethod
    def from_pretrained(
        cls, base_dir: Path, dtype: torch.dtype, max_text_tokens: int | None = None
    ):
        """The base model's transformer(s), frozen, with memory attached."""
        from dit_mem.backbone import attach_memory
        from dit_mem.models.base_model import describe_base_model
        from dit_mem.pipeline import load_transformers

        base = describe_base_model(base_dir)
        check_text_to_video(base)
        experts, _ = load_transformers(base, dtype)
        for expert in experts:
            attach_memory(expert)
        boundary = None
        if len(experts) > 1:
            if base.boundary_ratio is None:
                raise ConfigError(f"{base_dir}: two experts but no boundary_ratio in {base.folder}")
            boundary = base.boundary_ratio * 1000
        dit = cls(experts[0], dtype, fixed={}, transformer_2=experts[1:2] and experts[1] or None)
        dit.boundary = boundary
        dit.max_text_tokens = max_text_tokens or dit.family.training.default_max_text_tokens
        dit.fixed = dit.family.training.fixed_inputs(Path(base.folder))
        return dit

    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, texts: list[dict], memory
    ) -> torch.Tensor:
        device = next(self.transformer.parameters()).device
        text = self.family.training.text_kwargs(texts, self.max_text_tokens)
        text = {
            k: v.to(device, self.dtype) if v.is_floating_point() else v.to(device)
            for k, v in text.items()
        }
        kwargs = None if memory is None else {"memory_tokens": memory.to(self.dtype)}
        x_t = x_t.to(self.dtype)
        if self.transformer_2 is None:
            return self.family.training.predict(self.transformer, x_t, t, text, kwargs, self.fixed)
        # two experts, as WanPipeline switches them: the first from the boundary up
        high = t >= self.boundary
        out = None
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            if not rows.any():
                continue
            part = self.family.training.predict(
                expert, x_t[rows], t[rows], _rows(text, rows), _rows(kwargs, rows), self.fixed
            )
            out = part.new_empty((x_t.shape[0], *part.shape[1:])) if out is None else out
            out[rows] = part
        return out


def check_text_to_video(base) -> None:
    """Training conditions on text alone: image-to-video and control models are refused."""
    if base.pipeline in ("WanImageToVideoPipeline", "WanVACEPipeline"):
        raise ConfigError(
            f"model.base_model_dir: {base.folder} is a {base.pipeline}; dit-mem train trains the "
            "memory encoder against a text-to-video model (memory joins the same blocks: the "
            "encoder of the text-to-video model of the same size serves this one)"
        )


def _rows(batch: dict | None, rows: torch.Tensor) -> dict | None:
    """The rows ``rows`` of every batched argument (memory of batch 1 is shared)."""
    from dit_mem.memory import MemoryTokens

    if batch is None:
        return None
    out = {}
    for key, value in batch.items():
        if isinstance(value, MemoryTokens):
            keep = value.batch_size == 1
            out[key] = value if keep else MemoryTokens(value.tokens[rows], value.log_counts[rows])
        else:
            out[key] = value[rows.to(value.device)]
    return out


def training_loss(
    dit: FrozenDiT,
    encoder,
    objective: FlowMatchingObjective,
    batch: dict,
    generator: torch.Generator,
    caption_dropout: float = 0.0,
    dropped_text: dict | None = None,
) -> torch.Tensor:
    """One micro-batch: memory tokens, noised latents, DiT prediction, weighted loss.

    The draws from ``generator`` are, in order: the memory-order permutation (inside the
    encoder, training mode only), timestep indices ``[B]``, noise like ``x0``, and, with
    ``caption_dropout`` > 0, which samples' captions become ``dropped_text`` (the unconditional
    branch's text: there the DiT must read the memory alone).
    """
    device = next(dit.transformer.parameters()).device
    x0 = batch["x0"].to(device, torch.float32)
    memory = encoder(batch["memory"].to(device), generator=generator)
    index = objective.sample_indices(x0.shape[0], generator)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
    x_t, t, target = objective.prepare(x0, index, noise)
    texts = list(batch["text"])
    if caption_dropout > 0:
        drop = (torch.rand(x0.shape[0], generator=generator) < caption_dropout).tolist()
        texts = [dropped_text if d else text for text, d in zip(texts, drop, strict=True)]
    return objective.loss(dit(x_t, t, texts, memory), target, index)


def resolve_train_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with what it leaves ``None`` decided by the base model's family: the text length,
    the flow shift (at the training latents' size) and weighting, the encoder preset."""
    import dataclasses

    from dit_mem.data import LatentStore
    from dit_mem.models.base_model import describe_base_model

    base = describe_base_model(cfg.model.base_model_dir)
    check_text_to_video(base)
    family = base.family
    data, model, loss = cfg.data, cfg.model, cfg.loss
    if data.max_text_tokens is None:
        data = dataclasses.replace(data, max_text_tokens=family.training.default_max_text_tokens)
    if model.encoder_preset is None and model.encoder_init is None:
        model = dataclasses.replace(model, encoder_preset=encoder_preset(cfg))
    if loss.weighting is None:
        loss = dataclasses.replace(loss, weighting=family.training.default_loss_weighting)
    if loss.flow_shift is None:
        store = LatentStore(cfg.data.latent_dir)
        shape = store.shape or tuple(store.load_one(store.ids()[0]).shape)
        loss = dataclasses.replace(
            loss, flow_shift=float(family.training.flow_shift(base.folder, shape))
        )
    return dataclasses.replace(cfg, data=data, model=model, loss=loss)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant."""
    warm = cfg.optim.warmup_steps
    return cfg.optim.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)


def _check_resume_config(cfg: TrainConfig, ckpt: ckpt_io.Checkpoint) -> None:
    import yaml

    path = ckpt.path / "config.yaml"
    if not path.is_file():
        return
    from dit_mem.utils.io import changed_settings

    old, new = yaml.safe_load(path.read_text()), to_dict(cfg)
    changed = changed_settings(old, new, ignore=_RESUME_FREE, keep_whole={"encoder_overrides"})
    if changed:
        log.warning(
            "resuming %s with settings that differ from the checkpoint's: %s",
            ckpt.path,
            ", ".join(f"{k} ({a!r} → {b!r})" for k, (a, b) in changed.items()),
        )


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Run (or continue) training as ``cfg`` says; returns the run's summary.

    The config and its paths are checked before anything loads or is written; the main process
    holds ``<output_dir>/.lock`` for the whole run, so two runs never share a folder.
    """
    from accelerate import Accelerator

    cfg.require_paths()
    cfg = resolve_train_config(cfg)  # the family's settings where the config leaves them open
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    lock = folder_lock(cfg.output_dir, "train") if accelerator.is_main_process else nullcontext()
    with lock:
        return _train(cfg, resume, accelerator)


def _train(cfg: TrainConfig, resume, accelerator) -> TrainResult:
    from accelerate.utils import set_seed

    rank, main, device = accelerator.process_index, accelerator.is_main_process, accelerator.device
    if device.type == "cpu" and cfg.mixed_precision == "bf16" and main:
        log.warning("bf16 mixed precision on CPU: %s", _CPU_BF16_NOTE.removeprefix(". On CPU, "))
    if not main:  # progress, metrics and INFO messages come from the main process only
        logging.getLogger("dit_mem").setLevel(logging.WARNING)

    # 1. run folder, config, resume point; 2. caches and the frozen DiT; 3. data
    run_dir = Path(cfg.output_dir)
    resume_ckpt = _start_run(cfg, resume, accelerator, run_dir)
    dit, encoder, dataset, text_cache = _build_data(cfg, accelerator)
    plan = EpochPlan(
        len(dataset), accelerator.num_processes, cfg.batch_size, cfg.gradient_accumulation_steps
    )
    plan.check()
    total_steps = plan.steps * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # 4. frozen DiT on the device; 5. encoder, optimizer, resume
    _place_frozen_dit(cfg, dit, encoder, device)
    encoder.train()
    optimizer = torch.optim.AdamW(
        encoder.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    encoder, optimizer = accelerator.prepare(encoder, optimizer)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    set_seed(cfg.seed + rank)  # dropout (global RNG), different per process
    step = 0
    if resume_ckpt is not None:
        try:
            accelerator.load_state(str(resume_ckpt.accelerate_dir))
            ckpt_io.load_rng_state(resume_ckpt.rng_file(rank), generator)
        except Exception as e:  # torch / safetensors raise many kinds for a damaged file
            raise UserError(ckpt_io.damaged_message(resume_ckpt, run_dir, e)) from e
        step = resume_ckpt.step
        log.info("resumed from %s (step %d)", resume_ckpt.path, step)
    result = TrainResult(
        run_dir,
        step,
        skipped_rows=dataset.skipped.total,
        last_checkpoint=resume_ckpt.path if resume_ckpt else None,
    )
    if main:
        log.info(
            "training %d samples (%d skipped) on %d process(es): %d steps/epoch, %d steps in all, "
            "from step %d; %d trainable parameters",
            len(dataset),
            dataset.skipped.total,
            accelerator.num_processes,
            plan.steps,
            total_steps,
            step,
            sum(p.numel() for p in encoder.parameters() if p.requires_grad),
        )

    # 6. the loop
    loop = _Loop(cfg, accelerator, dit, encoder, optimizer, dataset, text_cache, generator)
    loop.run(plan, step, total_steps, result)
    _check_ranks_agree(accelerator, encoder, run_dir)
    if main:
        _write_final_encoder(accelerator.unwrap_model(encoder), run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _start_run(cfg: TrainConfig, resume, accelerator, run_dir: Path):
    """The checkpoint to resume from (``None``: a new run), checked; the run folder and its
    resolved config written by the main process."""
    resume_ckpt = ckpt_io.resolve_resume(resume, run_dir) if resume is not None else None
    if resume_ckpt is None and ckpt_io.latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"{run_dir} already has checkpoints; continue it with --resume latest, or set "
            "output_dir to a new run folder"
        )
    if resume_ckpt is not None:
        _check_resume_config(cfg, resume_ckpt)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temporaries(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return resume_ckpt


def _build_data(cfg: TrainConfig, accelerator):
    """``(dit, encoder, dataset, text_cache)``: the caches (the main process builds them, the
    others then read them), the frozen DiT, the seeded encoder and the training samples."""
    from dit_mem.data import LatentStore

    bank = open_bank(cfg) if cfg.data.bank is not None else None
    if bank is not None and bank.latents is None:
        raise ConfigError(f"data.bank {cfg.data.bank}: the bank has no latents to train with")
    ids, retrieval, text_cache = prepare_caches(cfg, accelerator, bank)
    dit = FrozenDiT.from_pretrained(
        cfg.model.base_model_dir, DTYPES[cfg.model.dit_dtype], cfg.data.max_text_tokens
    )
    encoder = _seeded(cfg.seed, build_encoder, cfg)
    training_latents = LatentStore(cfg.data.latent_dir)
    check_latents(dit, training_latents, bank)
    dataset = TrainingSamples(
        ids,
        memory_ids_by_sample(retrieval),
        training_latents,
        bank.latents if bank is not None else training_latents,
        text_cache,
        k=cfg.data.k,
        channels=encoder.config.in_channels,
    )
    return dit, encoder, dataset, text_cache


def _place_frozen_dit(cfg: TrainConfig, dit, encoder, device) -> None:
    """Every expert on the device, checked against the encoder's width, checkpointed if asked."""
    for expert in dit.experts:
        expert.to(device)
        try:
            check_width(encoder.config.dim, expert)
        except UserError as e:
            raise ConfigError(f"model.encoder_preset: {e}") from None
        if cfg.model.gradient_checkpointing:
            expert.enable_gradient_checkpointing()


class _Loop:
    """The optimisation loop: accumulation, clipping, the learning-rate schedule, metrics and
    checkpoints, resumable at any step."""

    def __init__(self, cfg, accelerator, dit, encoder, optimizer, dataset, text_cache, generator):
        self.cfg, self.accelerator, self.dit = cfg, accelerator, dit
        self.encoder, self.optimizer, self.dataset = encoder, optimizer, dataset
        self.generator = generator
        self.objective = training_objective(cfg, dit)
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.dropped_text = None
        if cfg.data.caption_dropout > 0:
            self.dropped_text = text_cache.load_texts([DROPPED_CAPTION_KEY])[0]
        device = accelerator.device
        self.cpu_bf16 = device.type == "cpu" and cfg.mixed_precision == "bf16"

    def run(self, plan: EpochPlan, step: int, total_steps: int, result: TrainResult) -> None:
        from tqdm.auto import tqdm

        cfg, accelerator = self.cfg, self.accelerator
        main = accelerator.is_main_process
        run_dir = Path(cfg.output_dir)
        metrics = MetricsLogger(
            run_dir,
            main,
            cfg.loggers,
            resume_step=step,
            config=to_dict(cfg),
            wandb_project=cfg.wandb_project,
        )
        bar = tqdm(
            total=total_steps,
            initial=step,
            desc="train",
            unit="step",
            disable=not (main and cfg.progress_bar),
            dynamic_ncols=True,
        )
        rank = accelerator.process_index
        try:
            while step < total_steps:
                epoch, done_in_epoch = divmod(step, plan.steps)
                batches = plan.batches(cfg.seed, epoch, rank)[done_in_epoch * plan.accumulation :]
                step_losses: list[torch.Tensor] = []
                for indices in batches:
                    stepped = self.micro_step(indices, step, step_losses)
                    if stepped is None:
                        continue
                    lr, grad_norm = stepped
                    step += 1
                    losses = torch.stack(step_losses).mean()[None]
                    mean_loss = accelerator.gather(losses).mean().item()
                    step_losses = []
                    result.losses.append(mean_loss)
                    result.step = step
                    bar.update(1)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch)
                    if step % cfg.log_every == 0 or step == total_steps:
                        metrics.log(step, epoch, mean_loss, lr, float(grad_norm))
                    if step % cfg.checkpoint_every == 0 or step == total_steps:
                        result.last_checkpoint = save_checkpoint(
                            accelerator, self.encoder, self.generator, cfg, step, epoch
                        )
                    if step >= total_steps:
                        break
        finally:
            bar.close()
            metrics.close()

    def micro_step(self, indices, step: int, step_losses: list):
        """One micro-batch forward and backward; ``(lr, grad_norm)`` when the optimizer stepped
        (the last micro-batch of an accumulation), else ``None``."""
        cfg, accelerator = self.cfg, self.accelerator
        batch = collate([self.dataset[i] for i in indices])
        stepped = None
        with accelerator.accumulate(self.encoder):
            with accelerator.autocast():
                loss = training_loss(
                    self.dit,
                    self.encoder,
                    self.objective,
                    batch,
                    self.generator,
                    caption_dropout=cfg.data.caption_dropout,
                    dropped_text=self.dropped_text,
                )
            accelerator.backward(loss)
            step_losses.append(loss.detach())
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(
                    self.params, cfg.optim.max_grad_norm or math.inf
                )
                _check_finite(grad_norm, loss, step + 1, self.cpu_bf16)
                lr = _lr_at(cfg, step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                stepped = (lr, grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return stepped


def _check_finite(grad_norm, loss: torch.Tensor, step: int, cpu_bf16: bool) -> None:
    """Stop (before the optimizer step) on a NaN/inf gradient instead of corrupting the encoder."""
    if math.isfinite(float(grad_norm)):
        return
    raise FloatingPointError(
        f"non-finite gradient norm ({float(grad_norm)}) at optimizer step {step} (loss "
        f"{loss.item():.4g}); the encoder was not updated and the last checkpoint is intact"
        + (_CPU_BF16_NOTE if cpu_bf16 else "")
    )


def check_latents(dit: FrozenDiT, training, bank) -> None:
    """The training latents and the bank's memory are of the DiT's family and of one VAE."""
    from dit_mem.data.latents import check_record

    where = f"data.latent_dir {training.root}"
    try:
        check_record(training.manifest, where, dit.family.name)
        if bank is not None:
            bank.check_serves(dit.family.name)
            theirs = bank.latent_record["vae_fingerprint"]
            if theirs is not None:
                check_record(training.manifest, where, vae=theirs)
    except UserError as e:
        raise ConfigError(str(e)) from None


def open_bank(cfg: TrainConfig):
    """The memory bank training retrieves from: ``data.bank``, or ``data.index_dir`` with the
    memory latents in ``data.latent_dir`` (the paper's one folder). Opened only when needed: a
    complete retrieval cache needs no index."""
    from dit_mem.bank import MemoryBank

    code = cfg.data.trust_remote_code
    if cfg.data.bank is not None:
        return MemoryBank.from_pretrained(
            str(cfg.data.bank), subfolder=cfg.data.bank_subfolder, trust_remote_code=code
        )
    return MemoryBank(cfg.data.index_dir, cfg.data.latent_dir, trust_remote_code=code)


def prepare_caches(cfg: TrainConfig, accelerator=None, bank=None):
    """Build (or complete) the retrieval and text-embedding caches of ``cfg``'s training set.

    Returns ``(ids, retrieval table, TextEmbeddingCache)``. With several processes the main
    process builds while the others wait, then they read.
    """
    import contextlib

    from dit_mem.data import read_video_table

    table = read_video_table(cfg.data.train_csv)
    ids, captions = table["id"].astype(str).tolist(), table["caption"].astype(str).tolist()
    texts = dict(zip(ids, captions, strict=True))
    if cfg.data.caption_dropout > 0:  # the unconditional branch's text, cached like a caption
        texts[DROPPED_CAPTION_KEY] = cfg.data.dropped_caption
    main = accelerator is None or accelerator.is_main_process
    first = (
        accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    )
    with first:
        retrieval = _retrieval(cfg, ids, captions, bank)
        text_cache = TextEmbeddingCache(cfg.cache_dir / "text")
        if text_cache.missing(list(texts)):
            if not main:
                raise RuntimeError(
                    "text-embedding cache incomplete after the main process built it"
                )
            from dit_mem.models.base_model import component_names, describe_base_model
            from dit_mem.pipeline import load_base_model

            device = accelerator.device if accelerator is not None else torch.device("cpu")
            base = describe_base_model(cfg.model.base_model_dir)
            family = base.family
            keep = family.training.text_components
            text_model = load_base_model(
                base,
                DTYPES[cfg.model.text_encoder_dtype],
                skip=tuple(c for c in component_names(base) if c not in keep),
            ).to(device)
            for name in keep:
                module = getattr(text_model, name)
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False).eval()
            max_tokens = cfg.data.max_text_tokens or family.training.default_max_text_tokens
            text_cache.build(
                list(texts),
                list(texts.values()),
                lambda captions: family.training.encode_text(text_model, captions, max_tokens),
                meta={
                    "max_tokens": max_tokens,
                    "streams": list(family.training.text_streams),
                    "dtype": cfg.model.text_encoder_dtype,
                    "encoder": str(base.folder),
                    "convention": f"{family.name}: the pipeline's prompt encoding, valid rows",
                },
                batch_size=cfg.data.text_batch_size,
                progress=cfg.progress_bar,
            )
            del text_model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return ids, retrieval, text_cache


def training_objective(cfg: TrainConfig, dit: FrozenDiT) -> FlowMatchingObjective:
    """The flow-matching objective of the run: the config's shift and weighting, where it leaves
    them open the family's as :func:`resolve_train_config` decides them (Wan: shift 5 and Wan's
    weighting, method §5; LTX-Video: its sequence-length shift)."""
    if cfg.loss.flow_shift is None or cfg.loss.weighting is None:
        cfg = resolve_train_config(cfg)
    shift, weighting = cfg.loss.flow_shift, cfg.loss.weighting
    log.info("flow matching: shift %.4g, %s weighting (%s)", shift, weighting, dit.family.name)
    return FlowMatchingObjective(cfg.loss.num_train_timesteps, shift, weighting)


def _seeded(seed: int, fn, *args):
    """Run ``fn`` under a fixed global seed (same initial weights on every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def _retrieval(cfg: TrainConfig, ids: list[str], captions: list[str], bank=None):
    return build_retrieval_cache(
        cfg.cache_dir,
        ids,
        captions,
        (lambda: bank) if bank is not None else (lambda: open_bank(cfg)),
        k=cfg.data.k,
        index_dir=bank.retriever.root if bank is not None else cfg.data.index_dir,
        batch_size=cfg.data.retrieval_batch_size,
    )


def save_checkpoint(
    accelerator, encoder, generator, cfg: TrainConfig, step: int, epoch: int
) -> Path:
    """Write ``checkpoints/step-XXXXXX`` atomically (temporary folder, then rename)."""
    root = Path(cfg.output_dir) / ckpt_io.CHECKPOINTS
    name = ckpt_io.checkpoint_name(step)
    tmp, final = root / f"{ckpt_io.TMP_PREFIX}{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    ckpt_io.save_rng_state(
        tmp / "rng" / f"rank-{accelerator.process_index:05d}.safetensors", generator
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(encoder).save_pretrained(str(tmp / "encoder"))
        save_config(cfg, tmp / "config.yaml")
        ckpt_io.write_state_file(
            tmp, {"step": step, "epoch": epoch, "num_processes": accelerator.num_processes}
        )
        honour_umask(tmp)
        if final.exists():  # a re-run of the same step after a resume from an older checkpoint
            shutil.rmtree(final)
        tmp.rename(final)
        ckpt_io.prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _check_ranks_agree(accelerator, encoder, run_dir: Path) -> None:
    """Every process must end with the same parameters; writes ``rank_agreement.json``."""
    from dit_mem.utils import write_json_atomic

    params = [p.detach().double().flatten() for p in accelerator.unwrap_model(encoder).parameters()]
    flat = torch.cat(params)
    fingerprint = torch.stack(
        [flat.sum(), flat.square().sum(), flat[:: max(1, flat.numel() // 64)].sum()]
    )
    every = accelerator.gather(fingerprint.to(accelerator.device)[None]).cpu().view(-1, 3)
    agree = bool((every == every[:1]).all())
    if accelerator.is_main_process:
        write_json_atomic(
            run_dir / "rank_agreement.json",
            {
                "num_processes": accelerator.num_processes,
                "identical": agree,
                "fingerprints": every.tolist(),
            },
        )
    if not agree:
        raise RuntimeError(f"processes ended with different encoder parameters: {every.tolist()}")
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        log.info("encoder parameters identical on all %d processes", accelerator.num_processes)


def _write_final_encoder(encoder, run_dir: Path) -> None:
    """``<run>/encoder``: the last weights as a save_pretrained folder (replaced atomically)."""
    with atomic_dir(run_dir / "encoder") as tmp:
        encoder.save_pretrained(str(tmp))
