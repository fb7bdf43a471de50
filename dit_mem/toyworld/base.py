"""Stage 2: the toy world's base model, a real (tiny) Wan stack trained from scratch.

* tokenizer: word-level over the toy vocabulary (pad 0, eos 1, unk 2 as in UMT5), saved as a
  ``tokenizer.json`` that ``AutoTokenizer`` loads;
* text encoder: a 2-layer ``UMT5EncoderModel`` (d_model 64);
* transformer: a ``WanTransformer3DModel`` (patch 1×2×2, 4 layers, 4 heads × 32, FFN 256).

Text encoder and transformer are trained jointly with Wan's flow-matching objective (the same
:class:`~dit_mem.training.loss.FlowMatchingObjective` the memory encoder is trained with) on
latents of the stage-1 VAE, with 10% of captions dropped to "" for classifier-free guidance and
an EMA of the weights. One colour (:data:`~dit_mem.toyworld.world.HELD_OUT`) never appears: the
base model cannot draw it, which is what memory has to fix. The result is a diffusers Wan
folder that stock ``WanPipeline`` runs unchanged.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit_mem.toyworld.state import load_state, save_state
from dit_mem.toyworld.world import (
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    Clip,
    concepts,
    parse_caption,
    render,
)
from dit_mem.utils import atomic_dir, get_logger

log = get_logger(__name__)

TEXT_DIM = 64
MAX_TOKENS = 16  # caption length the base model is trained and run with
SPECIAL = ["<pad>", "</s>", "<unk>"]


@dataclass
class BaseStageConfig:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # Share of captions whose colour word is replaced by an out-of-vocabulary word (read as
    # <unk>), so the base model learns that an unknown colour word says nothing about colour.
    colour_dropout: float = 0.0
    held_out_word: bool = True  # False: the tokenizer does not know the held-out colour's word
    clips_per_concept: int = 64  # training clips per seen concept (encoded once)
    save_every: int = 250
    seed: int = 0


UNKNOWN_WORD = "something"  # not in the vocabulary: one <unk> token


def build_tokenizer(held_out_word: bool = True, extra_words: tuple[str, ...] = ()):
    """Word-level ``PreTrainedTokenizerFast``: every toy-world word (without the held-out
    colour's unless ``held_out_word``) and ``extra_words``, ``</s>`` appended; other words read
    as ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    colours = [c for c in COLOURS if held_out_word or c != HELD_OUT]
    words = ["a", "moving", *colours, *SHAPES, *DIRECTIONS]
    words += [w for w in dict.fromkeys(extra_words) if w not in words and w not in SPECIAL]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(vocab_size: int, seed: int = 0, d_model: int = TEXT_DIM):
    """A 2-layer ``UMT5EncoderModel`` of width ``d_model`` (the real one's structure: gated GELU,
    a relative-position bias per layer)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    return UMT5EncoderModel(config).eval()


def build_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=8,
        out_channels=8,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        rope_max_seq_len=64,
    )


def embed_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Wan's prompt embedding (as ``WanPipeline._get_t5_prompt_embeds``): zeros after the caption."""
    from dit_mem.backbone.families.wan import FAMILY

    inputs = FAMILY.training.tokenize(tokenizer, captions, MAX_TOKENS)
    mask = inputs.attention_mask
    hidden = text_encoder(inputs.input_ids, mask).last_hidden_state
    return hidden * mask[..., None].to(hidden.dtype)


@torch.no_grad()
def encode_clips(vae, clip_list: list[Clip], batch_size: int = 64) -> torch.Tensor:
    """Normalised latents ``[N, 8, 3, 8, 8]`` (``(mode − mean) / std``, as Wan's DiT sees them)."""
    from dit_mem.data.vae import encode_frames
    from dit_mem.toyworld.vae import to_tensor

    return torch.cat(
        [
            encode_frames(vae, to_tensor([render(c) for c in clip_list[i : i + batch_size]]))
            for i in range(0, len(clip_list), batch_size)
        ]
    )


def seen_concepts() -> list[tuple[str, str, str]]:
    return [c for c in concepts() if c[0] != HELD_OUT]


def _training_latents(work: Path, vae, cfg: BaseStageConfig):
    """``(latents, captions)`` of the seen concepts' training clips: encoded once, cached
    (atomic safetensors)."""
    from dit_mem.toyworld.world import clips

    cache = work / "latents.safetensors"
    train_clips = clips(seen_concepts(), cfg.clips_per_concept, seed=cfg.seed + 1)
    captions = [c.caption for c in train_clips]
    if cache.is_file():
        from safetensors.torch import load_file

        return load_file(str(cache))["latents"], captions
    from dit_mem.utils import write_safetensors_atomic

    t = time.time()
    latents = encode_clips(vae, train_clips)
    write_safetensors_atomic(cache, {"latents": latents})
    log.info("encoded %d training clips in %.1f s", len(train_clips), time.time() - t)
    return latents, captions


def _draw_caption(rng, cfg: BaseStageConfig, caption: str, colourless: str) -> str:
    """A training caption: dropped (unconditional), without its colour, or whole."""
    draw = rng.random()
    if draw < cfg.caption_dropout:
        return ""
    if draw < cfg.caption_dropout + cfg.colour_dropout:
        return colourless
    return caption


@torch.no_grad()
def _ema_update(pairs, decay: float) -> None:
    for ema, live in pairs:
        for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
            pe.lerp_(pl, 1 - decay)


def train_base(out: Path, vae_dir: Path, cfg: BaseStageConfig, progress: bool = True) -> Path:
    """Train (or resume) tokenizer + UMT5 + Wan DiT into the diffusers folder ``out/base``."""
    from diffusers import AutoencoderKLWan
    from tqdm.auto import tqdm

    from dit_mem.training.loss import FlowMatchingObjective

    final = out / "base"
    if (final / "model_index.json").is_file():
        log.info("base model: %s exists, skipping", final)
        return final
    work = out / "work" / "base"
    work.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()

    latents, captions = _training_latents(work, vae, cfg)

    tokenizer = build_tokenizer(cfg.held_out_word)
    colourless = [
        f"a {UNKNOWN_WORD} {shape} moving {direction}"
        for _, shape, direction in map(parse_caption, captions)
    ]
    text_encoder = build_text_encoder(len(tokenizer), cfg.seed)
    transformer = build_transformer(cfg.seed)
    ema_text, ema_dit = copy.deepcopy(text_encoder).eval(), copy.deepcopy(transformer).eval()
    for m in (ema_text, ema_dit):
        m.requires_grad_(False)
    params = list(text_encoder.parameters()) + list(transformer.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    modules = {"text": text_encoder, "dit": transformer, "ema_text": ema_text, "ema_dit": ema_dit}
    meta = load_state(work, modules, optimizer)
    step = meta["step"] if meta else 0
    if meta:
        log.info("base model: resuming at step %d", step)
    objective = FlowMatchingObjective(shift=5.0)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    rng = np.random.default_rng([cfg.seed, step])
    text_encoder.train()
    transformer.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="base DiT", disable=not progress)
    t0, losses = time.time(), []
    while step < cfg.steps:
        idx = rng.integers(0, len(latents), cfg.batch_size)
        x0 = latents[idx]
        caps = [_draw_caption(rng, cfg, captions[i], colourless[i]) for i in idx]
        text = embed_text(tokenizer, text_encoder, caps)
        index = objective.sample_indices(len(idx), gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t, t, target = objective.prepare(x0, index, noise)
        pred = transformer(
            hidden_states=x_t, timestep=t, encoder_hidden_states=text, return_dict=False
        )[0]
        loss = objective.loss(pred, target, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(((ema_text, text_encoder), (ema_dit, transformer)), decay)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(work, modules, optimizer, step)
            log.info("base step %d: loss %.4f (last 50)", step, float(np.mean(losses[-50:])))
    bar.close()
    log.info("base model trained: %.1f min this run", (time.time() - t0) / 60)
    write_base_folder(final, tokenizer, ema_text, ema_dit, vae, {"steps": cfg.steps})
    return final


def write_base_folder(folder: Path, tokenizer, text_encoder, transformer, vae, record):
    """A diffusers ``WanPipeline`` folder, written to a temp folder and renamed into place."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
