"""Training a memory encoder against a frozen LTX-Video or HunyuanVideo-1.5 DiT (tiny stacks).

The family decides the flow-matching objective (LTX-Video: the shift its pipeline samples the
latent's token count with; HunyuanVideo-1.5: its scheduler's shift; both unweighted), the text
conditioning (cached as the pipeline encodes prompts) and the latent normalisation; the loop,
caches, checkpoints and resume are the family-blind trainer's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dit_mem.memory import MemoryEncoder
from dit_mem.testing import LTX_SCHEDULER, average_loss, make_synthetic_run, tiny_vae
from dit_mem.training import train

pytestmark = pytest.mark.usefixtures("one_thread")
FLAVOURS = ["ltx", "hunyuan15"]


def synthetic(tmp_path: Path, flavour: str, *overrides: str, num_train: int = 8):
    return make_synthetic_run(
        tmp_path, flavour=flavour, num_train=num_train, overrides=list(overrides)
    )


@torch.no_grad()
def average_losses(cfg) -> dict[str, float]:
    """Mean loss with no memory, the trained memory and the other class's memory, on the same
    (t, noise) draws per sample."""
    from dit_mem.data import LatentStore
    from dit_mem.training.data import TrainingSamples
    from dit_mem.training.retrieval_cache import memory_ids_by_sample
    from dit_mem.training.trainer import FrozenDiT, prepare_caches, training_objective

    dit = FrozenDiT.from_pretrained(cfg.model.base_model_dir, torch.float32, 32)
    ids, retrieval, text = prepare_caches(cfg)
    store = LatentStore(cfg.data.latent_dir)
    data = TrainingSamples(ids, memory_ids_by_sample(retrieval), store, store, text, 2, 16)
    encoder = MemoryEncoder.from_pretrained(str(cfg.output_dir / "encoder")).eval()
    objective = training_objective(cfg, dit)

    def mean(memory: bool) -> float:
        return average_loss(dit, encoder, objective, data, memory)

    out = {"none": mean(False), "memory": mean(True)}
    data.memory = {
        v: data.memory[data.ids[(i + 1) % len(data.ids)]] for i, v in enumerate(data.ids)
    }
    out["other class"] = mean(True)
    return out


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_training_learns_to_use_memory(flavour, tmp_path):
    """Targets predictable only from memory. Measured (80 steps, lr 6e-3, 16 samples):
    LTX-Video no memory 3.844, memory 3.609, other-class 3.879; HunyuanVideo-1.5 3.640, 3.478,
    3.708 (200 steps at lr 3e-3 gave the same to 0.01)."""
    cfg = synthetic(
        tmp_path, flavour, "max_steps=80", "checkpoint_every=1000", "optim.lr=6e-3", num_train=16
    )
    train(cfg)
    losses = average_losses(cfg)
    print(flavour, losses)
    assert losses["memory"] < losses["none"] - 0.08
    assert losses["memory"] < losses["other class"] - 0.08


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_resume_continues_exactly(flavour, tmp_path):
    straight = train(synthetic(tmp_path, flavour, f"output_dir={tmp_path / 'a'}", "max_steps=4"))
    first = train(synthetic(tmp_path, flavour, f"output_dir={tmp_path / 'b'}", "max_steps=2"))
    rest = synthetic(tmp_path, flavour, f"output_dir={tmp_path / 'b'}", "max_steps=4")
    assert straight.losses == first.losses + train(rest, resume="latest").losses


def test_each_family_trains_with_its_own_flow_settings(tmp_path):
    from dit_mem.training.trainer import FrozenDiT, training_objective

    got = {}
    for flavour in ("wan2.1", "ltx", "hunyuan15"):
        cfg = synthetic(tmp_path / flavour, flavour)
        dit = FrozenDiT.from_pretrained(cfg.model.base_model_dir, torch.float32, 32)
        objective = training_objective(cfg, dit)
        got[flavour] = (objective.shift, objective.weighting)
    # LTX-Video: exp(mu) for the latent's 5·8·8 = 320 tokens, as LTXPipeline shifts its sigmas
    slope = (LTX_SCHEDULER["max_shift"] - LTX_SCHEDULER["base_shift"]) / (4096 - 1024)
    mu = 320 * slope + LTX_SCHEDULER["base_shift"] - 1024 * slope
    assert got["wan2.1"] == (5.0, "wan")  # SPEC §5
    assert got["ltx"][1] == "none" and got["ltx"][0] == pytest.approx(math.exp(mu), rel=1e-6)
    assert got["hunyuan15"] == (7.0, "none")  # its scheduler's shift


@pytest.mark.parametrize("family", ["wan", "ltx", "hunyuan15"])
def test_latents_are_normalised_as_the_family_pipeline_does(family):
    from diffusers import LTXPipeline

    from dit_mem.data import decode_latents, encode_frames

    vae = tiny_vae(family)
    frames = (
        torch.rand(1, 3, 17, 64 if family == "wan" else 32, 64 if family == "wan" else 32) * 2 - 1
    )
    with torch.no_grad():
        z = vae.encode(frames).latent_dist.mode()
        got = encode_frames(vae, frames)
        if family == "wan":
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            want = (z - mean) / std
        elif family == "ltx":
            want = LTXPipeline._normalize_latents(
                z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
            )
        else:
            want = z * vae.config.scaling_factor
        torch.testing.assert_close(got, want)
        assert got.shape[1:] == (16, 5, 8, 8)
        video = decode_latents(vae, got)  # the pipeline's map before decoding, then decode
        if family == "wan":
            back = got * std + mean
        elif family == "ltx":
            back = LTXPipeline._denormalize_latents(
                got, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
            )
        else:
            back = got / vae.config.scaling_factor
        expected = vae.decode(back, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(video, expected, rtol=0, atol=0)


def test_encode_latents_with_an_ltx_base_model(tmp_path):
    """The latent job with any family's VAE: its geometry rules and its normalisation recorded."""
    from dit_mem.cli import main
    from dit_mem.data import LatentStore
    from dit_mem.testing import build_tiny_model, write_bank

    csv = write_bank(tmp_path, videos=tmp_path / "videos")
    model = build_tiny_model(tmp_path / "ltx", "ltx")
    args = [
        "encode-latents",
        "--csv",
        str(csv),
        "--videos",
        str(tmp_path / "videos"),
        "--base-model",
        str(model),
    ]
    out = tmp_path / "latents"
    geometry = [
        "--num-frames",
        "17",
        "--height",
        "32",
        "--width",
        "32",
        "--num-workers",
        "0",
        "--limit",
        "2",
    ]
    assert main([*args, "--out", str(out), *geometry]) == 0
    store = LatentStore(out)
    assert (
        store.manifest["family"] == "ltx" and store.manifest["vae_class"] == "AutoencoderKLLTXVideo"
    )
    assert store.manifest["latent_shape"] == [16, 5, 8, 8] and len(store.ids()) == 2
    assert "scaling_factor" in store.manifest
    from diffusers import AutoencoderKLLTXVideo

    from dit_mem.backbone.families.ltx import FAMILY

    with torch.device("meta"):  # LTX-Video's real VAE: 8× in time, 32× in space
        real = AutoencoderKLLTXVideo()
    assert FAMILY.latents.shape(real, 161, 512, 704) == [128, 21, 16, 22]
    with pytest.raises(
        ValueError, match="takes 8k\\+1 frames of a height and width that are multiples of 32"
    ):
        FAMILY.latents.shape(real, 85, 480, 832)
