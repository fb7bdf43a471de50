"""Test scaffolding: one tiny config per model, tiny stacks of every family, a random world.

Nothing on the runtime path of training, generation or the toy world imports this module; the
test suite, the benchmarks and smoke runs do. Everything builds offline in seconds, and the
weights are random, so what comes out is noise by construction.

* :data:`TINY` — one tiny config per model (diffusers' own tester configs are the model), every
  DiT of width 32 so the ``"tiny"`` memory-encoder preset fits them all, every VAE taking
  17×32×32 clips (Wan: 17×64×64) to ``[16, 5, 8, 8]`` latents;
* :func:`tiny_transformer` / :func:`tiny_inputs` — one family's transformer and a forward call;
* :func:`tiny_components` / :func:`tiny_pipeline` — a whole stock pipeline of a flavour
  (``"wan2.1"``, ``"wan2.2-ti2v"``, ``"wan2.2-a14b"``, ``"ltx"``, ``"hunyuan15"``), text encoders
  and tokenizers included (the toy world's word-level tokenizer, built offline);
* :func:`build_tiny_model` — such a stack saved in diffusers layout, read back by the real loaders;
* :func:`run_random_world` — a bank of toy-world clips, its real index and latents, a random
  encoder, and one generation through the pipeline;
* :func:`make_synthetic_run` — a training set whose targets are predictable from their memory.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dit_mem.utils import get_logger, write_json_atomic

logger = get_logger(__name__)

# ======================================================================================
# One tiny config per model
# ======================================================================================
TEXT_DIM = 32
TINY: dict[str, dict[str, Any]] = {
    "wan": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": TEXT_DIM,
        "freq_dim": 32,
        "ffn_dim": 64,
        "num_layers": 2,
        "rope_max_seq_len": 64,
    },
    "ltx": {
        "in_channels": 16,
        "out_channels": 16,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "cross_attention_dim": 32,
        "num_layers": 2,
        "caption_channels": TEXT_DIM,
    },
    "hunyuan15": {
        "in_channels": 33,  # latents, conditioning latents and their mask (2 · 16 + 1)
        "out_channels": 16,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "num_refiner_layers": 1,
        "mlp_ratio": 2.0,
        "patch_size": 1,
        "patch_size_t": 1,
        "text_embed_dim": TEXT_DIM,
        "text_embed_2_dim": TEXT_DIM,
        "image_embed_dim": 12,
        "rope_axes_dim": (4, 4, 8),
        "target_size": 32,
        "task_type": "t2v",
    },
    # VAEs: [16, 5, 8, 8] latents of 17×64×64 (Wan, 8× spatial) or 17×32×32 clips (4×)
    "wan-vae": {"base_dim": 2, "num_res_blocks": 1, "z_dim": 16},
    "ltx-vae": {
        "latent_channels": 16,
        "block_out_channels": (8, 8, 8, 8),
        "decoder_block_out_channels": (8, 8, 8, 8),
        "layers_per_block": (1, 1, 1, 1, 1),
        "decoder_layers_per_block": (1, 1, 1, 1, 1),
        "spatio_temporal_scaling": (True, True, False, False),
        "decoder_spatio_temporal_scaling": (True, True, False, False),
        "decoder_inject_noise": (False,) * 5,
        "upsample_residual": (False,) * 4,
        "upsample_factor": (1,) * 4,
        "timestep_conditioning": False,
        "patch_size": 1,
        "patch_size_t": 1,
        "encoder_causal": True,
        "decoder_causal": False,
    },
    "hunyuan15-vae": {
        "latent_channels": 16,
        "block_out_channels": (32, 32),
        "layers_per_block": 1,
        "spatial_compression_ratio": 4,
        "temporal_compression_ratio": 4,
        "downsample_match_channel": False,
        "upsample_match_channel": False,
    },
    "t5": {"d_model": TEXT_DIM, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    "qwen2.5-vl-text": {
        "hidden_size": TEXT_DIM,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
    },
}
# LTX-Video's scheduler config (shift from the token count)
LTX_SCHEDULER = {
    "use_dynamic_shifting": True,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
}
FLAVOURS: tuple[str, ...] = (
    "wan2.1",  # WanPipeline, text to video
    "wan2.2-ti2v",  # WanPipeline, per-token timesteps (expand_timesteps)
    "wan2.2-a14b",  # WanPipeline, two experts switched at boundary_ratio
    "wan-i2v",  # WanImageToVideoPipeline, image latents concatenated (in_channels 36)
    "wan2.2-ti2v-i2v",  # WanImageToVideoPipeline, first frame given, per-token timesteps
    "wan-vace",  # WanVACEPipeline (WanVACETransformer3DModel)
    "ltx",  # LTXPipeline
    "hunyuan15",  # HunyuanVideo15Pipeline (with its guider)
)
FAMILY_OF_FLAVOUR = {f: "wan" for f in FLAVOURS if f.startswith("wan")}
# Geometry of a tiny generation per family (frames, height, width): [16, 5, 8, 8] latents
TINY_GEOMETRY = {"wan": (17, 64, 64), "ltx": (17, 32, 32), "hunyuan15": (17, 32, 32)}
# the command-line clip size of tiny Wan latents (encode-latents, bank build), one worker
TINY_CLIP_ARGS = ("--num-frames", "17", "--height", "64", "--width", "64", "--num-workers", "0")
# Words the tests' prompts and captions use, besides the toy world's (one tokenizer for all)
_WORDS = (
    "the of and in on at to with is blurry dark dog runs beach sunset person walking city night "
    "cat sits mat next window fox jumps over sleeping snow waves roll onto sandy street cars "
    "neon lights rides bicycle through park monkey dance"
)
WORDS = tuple(_WORDS.split())


def family_of_flavour(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown tiny flavour {flavour!r}; known: {FLAVOURS}")
    return FAMILY_OF_FLAVOUR.get(flavour, flavour)


def tiny_transformer(family: str = "wan", seed: int = 0, **overrides):
    """A family's transformer at its tiny config (float32, eval)."""
    from dit_mem.backbone.families import families

    cls = {f.name: f.injection.transformer_classes[0] for f in families()}[family]
    torch.manual_seed(seed)
    return cls(**{**TINY[family], **overrides}).eval()


def tiny_inputs(family: str = "wan", batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one forward of :func:`tiny_transformer` (two timesteps, a padded
    text for the families that take a mask)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([500.0, 730.0, 260.0, 900.0][:batch])
    if family == "wan":
        return {
            "hidden_states": torch.randn(batch, 16, 3, 8, 8, generator=g),
            "timestep": t,
            "encoder_hidden_states": torch.randn(batch, 7, TEXT_DIM, generator=g),
        }
    mask = torch.ones(batch, 6)
    mask[-1, 4:] = 0  # the last row's text is padded
    if family == "ltx":
        return {
            "hidden_states": torch.randn(batch, 2 * 4 * 4, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, TEXT_DIM, generator=g),
            "timestep": t,
            "encoder_attention_mask": mask.bool(),
            "num_frames": 2,
            "height": 4,
            "width": 4,
        }
    mask_2 = torch.ones(batch, 4)
    mask_2[0, 2:] = 0
    return {
        "hidden_states": torch.randn(batch, 33, 2, 4, 4, generator=g),
        "timestep": t,
        "encoder_hidden_states": torch.randn(batch, 6, TEXT_DIM, generator=g),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(batch, 4, TEXT_DIM, generator=g),
        "encoder_attention_mask_2": mask_2,
        "image_embeds": torch.zeros(batch, 3, 12),
    }


def tiny_vae(family: str = "wan", seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo15, AutoencoderKLLTXVideo, AutoencoderKLWan

    cls = {
        "wan": AutoencoderKLWan,
        "ltx": AutoencoderKLLTXVideo,
        "hunyuan15": AutoencoderKLHunyuanVideo15,
    }[family]
    torch.manual_seed(seed)
    vae = cls(**TINY[f"{family}-vae"]).eval()
    if family == "ltx":  # encode and decode whole clips, as the tiny tester does
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return vae


def tiny_tokenizer():
    """The toy world's word-level tokenizer, knowing the tests' words too."""
    from dit_mem.toyworld.base import build_tokenizer

    return build_tokenizer(extra_words=WORDS)


def _t5(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, dropout_rate=0.0, **TINY["t5"])
    return T5EncoderModel(config).eval()


# A chat template of the Qwen family's shape (system, user, then the assistant's turn)
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_components(flavour: str = "wan2.1", seed: int = 0) -> dict[str, Any]:
    """The components of a tiny stock pipeline of ``flavour`` (its class: :func:`tiny_pipeline`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = family_of_flavour(flavour)
    tokenizer = tiny_tokenizer()
    parts: dict[str, Any] = {
        "transformer": _flavour_transformer(flavour, seed),
        "vae": tiny_vae(family, seed),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }
    if family == "wan":
        from dit_mem.toyworld.base import build_text_encoder

        parts["text_encoder"] = build_text_encoder(len(tokenizer), seed, d_model=TEXT_DIM)
        if flavour == "wan2.2-a14b":
            parts |= {"transformer_2": tiny_transformer("wan", seed + 1), "boundary_ratio": 0.875}
        elif flavour in ("wan2.2-ti2v", "wan2.2-ti2v-i2v"):
            parts["expand_timesteps"] = True
        if flavour in ("wan-i2v", "wan2.2-ti2v-i2v"):
            parts |= {"image_encoder": None, "image_processor": None}
    elif family == "ltx":
        parts["text_encoder"] = _t5(len(tokenizer), seed)
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER)
    else:
        from diffusers.guiders import ClassifierFreeGuidance
        from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

        from dit_mem.toyworld.base import build_tokenizer

        chat = build_tokenizer(extra_words=(*WORDS, "<|im_start|>", "<|im_end|>", "system", "user"))
        chat.chat_template, chat.model_max_length = _CHAT_TEMPLATE, 4096
        torch.manual_seed(seed)
        config = Qwen2_5_VLTextConfig(
            vocab_size=len(chat), bos_token_id=None, eos_token_id=1, **TINY["qwen2.5-vl-text"]
        )
        byt5 = ByT5Tokenizer()
        parts |= {
            "tokenizer": chat,
            "text_encoder": Qwen2_5_VLTextModel(config).eval(),
            "tokenizer_2": byt5,
            "text_encoder_2": _t5(len(byt5), seed),
            "guider": ClassifierFreeGuidance(guidance_scale=5.0),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        }
    return parts


def _flavour_transformer(flavour: str, seed: int):
    family = family_of_flavour(flavour)
    if flavour == "wan-i2v":  # latents + mask + image latents
        return tiny_transformer("wan", seed, in_channels=36)
    if flavour == "wan-vace":
        from diffusers import WanVACETransformer3DModel

        torch.manual_seed(seed)
        config = {**TINY["wan"], "num_layers": 3, "vace_layers": [0, 2], "vace_in_channels": 96}
        return WanVACETransformer3DModel(**config).eval()
    return tiny_transformer(family, seed)


def pipeline_class(flavour: str):
    from diffusers import (
        HunyuanVideo15Pipeline,
        LTXPipeline,
        WanImageToVideoPipeline,
        WanPipeline,
        WanVACEPipeline,
    )

    if flavour in ("wan-i2v", "wan2.2-ti2v-i2v"):
        return WanImageToVideoPipeline
    if flavour == "wan-vace":
        return WanVACEPipeline
    family = family_of_flavour(flavour)
    return {"wan": WanPipeline, "ltx": LTXPipeline, "hunyuan15": HunyuanVideo15Pipeline}[family]


def tiny_pipeline(
    flavour: str = "wan2.1", seed: int = 0, cls=None, components: dict | None = None
) -> Any:
    """A stock diffusers pipeline (or ``cls``, e.g. a memory flavour) of tiny random components
    (or the given ``components``)."""
    pipe = (cls or pipeline_class(flavour))(**(components or tiny_components(flavour, seed)))
    if flavour == "hunyuan15":  # the tiny chat template's prefix, not Qwen's 108 tokens
        prefix = pipe.tokenizer.apply_chat_template(
            [[{"role": "system", "content": pipe.system_message}, {"role": "user", "content": ""}]],
            tokenize=True,
        )
        pipe.prompt_template_encode_start_idx = len(prefix[0]) - 4
        pipe.tokenizer_max_length = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call(flavour: str = "wan2.1", steps: int = 2) -> dict[str, Any]:
    """Call arguments of a tiny generation (its geometry, ``steps`` steps, CFG on; an image or a
    control video where the flavour takes one)."""
    from PIL import Image

    frames, height, width = TINY_GEOMETRY[family_of_flavour(flavour)]
    call = {"height": height, "width": width, "num_frames": frames, "num_inference_steps": steps}
    if flavour != "hunyuan15":  # the guider holds its scale
        call["guidance_scale"] = 5.0
    if flavour in ("ltx", "wan-i2v", "wan2.2-ti2v-i2v", "wan-vace"):
        call["max_sequence_length"] = 16
    if flavour in ("wan-i2v", "wan2.2-ti2v-i2v"):
        call["image"] = Image.new("RGB", (width, height), (200, 40, 40))
    if flavour == "wan-vace":
        call["video"] = [Image.new("RGB", (width, height), (40, 40, 200))] * frames
        call["mask"] = [Image.new("L", (width, height), 0)] * frames
    return call


def build_tiny_model(folder: str | Path, flavour: str = "wan2.1", seed: int = 0) -> Path:
    """Write a tiny random stack of ``flavour`` in diffusers layout (skipped if complete)."""
    from dit_mem.utils import atomic_dir

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    with atomic_dir(folder) as tmp:
        pipeline_class(flavour)(**tiny_components(flavour, seed)).save_pretrained(tmp)
    logger.info("wrote a tiny random %s model to %s", flavour, folder)
    return folder


def build_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random Wan2.1 model in diffusers layout (:func:`build_tiny_model`)."""
    return build_tiny_model(folder, "wan2.1", seed)


# ======================================================================================
# A random world: toy-world clips as a bank, real index and latents, random models
# ======================================================================================
def write_bank(folder: Path, videos: Path | None = None) -> Path:
    """Toy-world clips of two shapes moving left or right in every colour (in ``videos``,
    default ``folder/video``) + ``folder/memory.csv`` (``video``, ``caption``); returns the CSV."""
    from dit_mem.evaluation.video_io import write_mp4
    from dit_mem.toyworld.world import COLOURS, Clip, render

    videos = videos if videos is not None else folder / "video"
    rows = []
    for i, (colour, shape, direction) in enumerate(
        (c, s, d) for c in COLOURS for s in ("circle", "square") for d in ("left", "right")
    ):
        name = f"synth{i:03d}_0_0to1.mp4"
        path = videos / name
        clip = Clip(colour, shape, direction)
        if not path.is_file():
            write_mp4(path, render(clip), fps=16)
        rows.append({"video": name, "caption": clip.caption})
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
    """A random tiny Wan + a bank folder of toy-world clips in ``out``, then one generation
    (each stage skipped if done).

    Tests use the folders it writes: ``model`` (diffusers layout), ``encoder``, and ``bank``
    (``index/``, ``latents/``, ``videos/``, ``bank.json``) from ``memory.csv``; the generated
    video is noise by construction.
    """
    from dit_mem.bank.build import BankBuildConfig, build_bank
    from dit_mem.generation import GenerationConfig, generate, load_pipeline
    from dit_mem.memory import MemoryEncoder
    from dit_mem.outputs import save_generation, slugify

    out = Path(out)
    bank = out / "bank"
    csv_path = write_bank(out, videos=out / "video")
    logger.info(f"[1/5] memory bank videos: {out / 'video'} (listed in {csv_path})")

    model = build_tiny_wan(out / "model")
    size = dict(zip(("num_frames", "height", "width"), TINY_GEOMETRY["wan"], strict=True))
    cfg = BankBuildConfig(csv_path, bank, model, videos=out / "video", num_workers=0, **size)
    summary = build_bank(cfg)
    logger.info(f"[2/5] caption index (all-MiniLM-L6-v2, FAISS inner product): {bank / 'index'}")
    logger.info(
        f"[3/5] latents (tiny random Wan VAE): {summary.encoded} new, {summary.latents} in all"
    )

    encoder_dir = out / "encoder"
    if not (encoder_dir / "config.json").is_file():
        MemoryEncoder.from_preset("tiny").save_pretrained(encoder_dir)
    logger.info(f"[4/5] tiny random Wan model {model} and memory encoder {encoder_dir}")

    run = {"k": k, "steps": steps, "dtype": "float32", "device": "cpu", "progress": False}
    cfg = GenerationConfig(base_model=model, encoder=encoder_dir, bank=bank, **run, **size)
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
LATENT_SHAPE = (16, 5, 8, 8)  # what the "tiny" encoder preset is configured for
CAPTION = "a person walking in the city"


def write_latent_store(folder: Path, latents: dict[str, torch.Tensor]) -> None:
    """A minimal ``LatentStore`` folder: manifest + one bf16 ``latent`` file per id."""
    from dit_mem.data.latents import FORMAT, MANIFEST, write_latent

    folder.mkdir(parents=True, exist_ok=True)
    shape = list(next(iter(latents.values())).shape)
    write_json_atomic(
        folder / MANIFEST,
        {"format": FORMAT, "latent_shape": shape, "normalized": True, "synthetic": True},
    )
    for vid, x in latents.items():
        write_latent(folder / f"{vid}.safetensors", x, vid)


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
    flavour: str = "wan2.1",
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

    base = "base" if flavour == "wan2.1" else f"base-{flavour}"
    build_tiny_model(root / base, flavour)
    write_latent_store(root / "latents", latents)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    write_retrieval_cache(root / "cache", root / "index", memory)
    settings = [
        f"output_dir={root / 'run'}",
        f"data.train_csv={root / 'train.csv'}",
        f"data.latent_dir={root / 'latents'}",
        f"data.index_dir={root / 'index'}",
        f"data.cache_dir={root / 'cache'}",
        f"data.k={k}",
        "data.max_text_tokens=32",
        f"model.base_model_dir={root / base}",
        "model.encoder_preset=tiny",
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
    return load_train_config(None, settings + list(overrides or []))


@torch.no_grad()
def average_loss(dit, encoder, objective, dataset, memory: bool, draws: int = 4) -> float:
    """Mean training loss over ``draws`` (timestep, noise) draws per sample, encoder in eval mode;
    the draws depend only on the seed, so with and without memory see the same noised inputs."""
    from dit_mem.training.data import collate

    encoder.eval()
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(draws):
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            tokens = encoder(batch["memory"], shuffle=False) if memory else None
            index = objective.sample_indices(1, generator)
            noise = torch.randn(batch["x0"].shape, generator=generator)
            x_t, t, target = objective.prepare(batch["x0"], index, noise)
            pred = dit(x_t, t, batch["text"], tokens)
            losses.append(objective.loss(pred, target, index).item())
    return sum(losses) / len(losses)


def generate_in_browser(
    url: str, prompt: str, screenshot: Path, profile: Path, size: tuple[int, int] = (1280, 1600)
) -> None:
    """Open the web page in headless Chromium (Debian's ``chromium`` and ``chromedriver``), type
    ``prompt``, press Generate, wait for both videos and the retrieved memory, save the page."""
    import shutil
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    videos, memory = "#without video[src], #with video[src]", "#memory"
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 180)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, videos)) == 2)
        wait.until(lambda d: f"{prompt} (" in d.find_element(By.CSS_SELECTOR, memory).text)
        time.sleep(2)  # let the videos show a frame
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
