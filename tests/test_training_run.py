"""Whole training runs on a tiny random Wan and a synthetic set: resume, SIGKILL, learning,
bad input. (The 2-process run is ``benchmarks/train_two_processes.py``.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dit_mem.memory import MemoryEncoder
from dit_mem.testing import LATENT_SHAPE, average_loss, make_synthetic_run
from dit_mem.training import latest_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny random Wan base model, built once and copied into each test's folder."""
    from dit_mem.testing import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny") / "base")


def synthetic(root: Path, base: Path, *overrides: str, **kw):
    if not (root / "base").exists():
        shutil.copytree(base, root / "base")
    return make_synthetic_run(root, overrides=list(overrides), **kw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return MemoryEncoder.from_pretrained(str(folder)).state_dict()


# --------------------------------------------------------------------------------------
def test_resume_continues_exactly(tmp_path, base_model):
    """4 optimizer steps straight == 2 steps, resume, 2 more (accumulation 2, epoch boundary)."""
    common = ("gradient_accumulation_steps=2", "checkpoint_every=2", "log_with=tensorboard")
    straight = synthetic(
        tmp_path, base_model, f"output_dir={tmp_path / 'a'}", "max_steps=4", *common, num_train=6
    )
    res_a = train(straight)
    first = synthetic(
        tmp_path, base_model, f"output_dir={tmp_path / 'b'}", "max_steps=2", *common, num_train=6
    )
    res_b = train(first)
    with pytest.raises(ValueError, match="already has checkpoints"):
        train(first)  # a second run into the same folder must say --resume
    rest = synthetic(
        tmp_path, base_model, f"output_dir={tmp_path / 'b'}", "max_steps=4", *common, num_train=6
    )
    res_c = train(rest, resume="latest")
    assert res_a.step == res_c.step == 4 and res_b.step == 2
    assert res_a.losses == res_b.losses + res_c.losses
    a, b = weights(tmp_path / "a" / "encoder"), weights(tmp_path / "b" / "encoder")
    assert a.keys() == b.keys()
    for key in a:  # parameters and BatchNorm statistics, bit for bit
        assert torch.equal(a[key], b[key]), key
    run = tmp_path / "b"
    assert [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().split()[1:]] == [
        1,
        2,
        3,
        4,
    ]
    assert (run / "loss_curve.png").stat().st_size > 0
    from dit_mem.memory.loading import load_memory_encoder

    with pytest.raises(FileNotFoundError) as e:  # the run folder given where an encoder goes
        load_memory_encoder(run)
    assert str(e.value) == (
        f"{run} is a training run or checkpoint folder: its encoder is {run / 'encoder'}; its "
        f"latest checkpoint's encoder is {run / 'checkpoints' / 'step-000004' / 'encoder'} (step 4)"
    )
    assert any((run / "tensorboard").iterdir())
    for ckpt in ("step-000002", "step-000004"):
        assert "max_steps" in (run / "checkpoints" / ckpt / "config.yaml").read_text()
    assert "max_steps: 4" in (run / "config.yaml").read_text()


def test_sigkill_leaves_last_checkpoint_loadable(tmp_path, base_model):
    cfg = synthetic(tmp_path, base_model, num_train=6)
    args = [
        f"{k}={v}"
        for k, v in {
            "output_dir": tmp_path / "run",
            "data.train_csv": cfg.data.train_csv,
            "data.latent_dir": cfg.data.latent_dir,
            "data.index_dir": cfg.data.index_dir,
            "data.cache_dir": cfg.data.cache_dir,
            "data.k": 2,
            "data.max_text_tokens": 32,
            "model.base_model_dir": cfg.model.base_model_dir,
            "model.dit_dtype": "fp32",
            "model.encoder_overrides": "{conv_channels: [8, 16], kernel_sizes: [3, 3], strides: [1, 1], "
            "dim: 32, num_heads: 2, latent_shape: [5, 8, 8]}",
            "mixed_precision": "no",
            "max_steps": 100000,
            "checkpoint_every": 1,
            "log_with": "none",
            "progress_bar": "false",
        }.items()
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dit_mem.cli", "--log-level", "WARNING", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            ckpts = tmp_path / "run" / "checkpoints"
            if ckpts.is_dir() and len(list(ckpts.glob("step-*"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)  # mid-training, quite likely mid-checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.step >= 3
    MemoryEncoder.from_pretrained(str(latest.encoder_dir))  # readable
    resumed = synthetic(tmp_path, base_model, f"max_steps={latest.step + 1}", num_train=6)
    assert train(resumed, resume="latest").step == latest.step + 1
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_training_learns_to_use_memory(tmp_path, base_model):
    """Targets predictable only from memory: the trained encoder beats no memory and beats
    memory of the other class, on the same frozen DiT and the same (t, noise) draws.

    Measured (200 steps, lr 3e-3, 16 samples): no memory 3.309, trained memory 3.133,
    other-class memory 3.311, untrained encoder 3.279.
    """
    from dit_mem.data import LatentStore
    from dit_mem.training.data import TrainingSamples
    from dit_mem.training.loss import FlowMatchingObjective
    from dit_mem.training.retrieval_cache import memory_ids_by_sample
    from dit_mem.training.trainer import FrozenDiT, prepare_caches

    cfg = synthetic(
        tmp_path,
        base_model,
        "max_steps=200",
        "checkpoint_every=1000",
        "optim.lr=3e-3",
        num_train=16,
    )
    train(cfg)
    dit = FrozenDiT.from_pretrained(cfg.model.base_model_dir, torch.float32, 32)
    ids, retrieval, text = prepare_caches(cfg)
    store = LatentStore(cfg.data.latent_dir)
    data = TrainingSamples(
        ids,
        memory_ids_by_sample(retrieval),
        store,
        store,
        text,
        k=2,
        channels=16,
    )
    enc = MemoryEncoder.from_pretrained(str(cfg.output_dir / "encoder"))
    obj = FlowMatchingObjective()
    without = average_loss(dit, enc, obj, data, memory=False)
    with_memory = average_loss(dit, enc, obj, data, memory=True)
    data.memory = {
        v: data.memory[data.ids[(i + 1) % len(data.ids)]] for i, v in enumerate(data.ids)
    }
    other_class = average_loss(dit, enc, obj, data, memory=True)
    print(
        f"no memory {without:.4f}, memory {with_memory:.4f}, other-class memory {other_class:.4f}"
    )
    assert with_memory < without - 0.08
    assert with_memory < other_class - 0.08


# --------------------------------------------------------------------------------------
def test_missing_latents_are_skipped_and_all_missing_fails(tmp_path, base_model, caplog):
    cfg = synthetic(tmp_path, base_model, "max_steps=1", num_train=6)
    (tmp_path / "latents" / "train0_0_0to10.safetensors").unlink()
    assert train(cfg).skipped_rows == 1
    assert "skipping 1 of 6 training rows: 1 without a latent" in caplog.text
    for p in (tmp_path / "latents").glob("train*.safetensors"):
        p.unlink()
    cfg = synthetic(
        tmp_path, base_model, "max_steps=1", f"output_dir={tmp_path / 'r2'}", num_train=6
    )
    for p in (tmp_path / "latents").glob("train*.safetensors"):
        p.unlink()
    with pytest.raises(
        ValueError,
        match=r"no usable training rows of 6: 6 without their own latent in .*latents \(encode "
        r"them with `dit-mem bank build --for-training TRAIN_CSV`, or `dit-mem encode-latents`\)$",
    ):
        train(cfg)


def test_each_reason_for_no_rows_gets_its_own_advice(tmp_path):
    """Every latent exists but retrieval gave fewer than k: the advice is about k, not about
    encoding latents; a missing memory latent names the bank's latents."""
    from dit_mem.data import LatentStore
    from dit_mem.testing import write_latent_store
    from dit_mem.training.data import TrainingSamples

    x = torch.zeros(LATENT_SHAPE)
    write_latent_store(tmp_path / "lat", {v: x for v in ("a", "b", "m1", "m2")})
    store = LatentStore(tmp_path / "lat")
    two = {"a": ["m1", "m2"], "b": ["m2", "m1"]}
    with pytest.raises(ValueError) as e:
        TrainingSamples(["a", "b"], two, store, store, None, k=3, channels=LATENT_SHAPE[0])
    assert str(e.value) == (
        "no usable training rows of 2: 2 with fewer than k=3 retrieved videos (at most 2: set "
        "data.k ≤ 2, or give the index more videos)"
    )
    with pytest.raises(ValueError, match=r"1 with a retrieved video that has no latent in .*lat"):
        TrainingSamples(["a"], {"a": ["m1", "gone"]}, store, store, None, k=2, channels=16)
    assert len(TrainingSamples(["a", "b"], two, store, store, None, k=2, channels=16)) == 2


def test_memory_latent_of_wrong_shape_is_named(tmp_path, base_model):
    from dit_mem.testing import write_latent_store

    cfg = synthetic(tmp_path, base_model, "max_steps=2", num_train=6)
    bad = torch.zeros(LATENT_SHAPE[0], 5, 8, 9)
    store = tmp_path / "latents"
    manifest = (store / "manifest.json").read_text()
    write_latent_store(store, {f"bank{c}s{j}_0_0to10": bad for c in range(2) for j in range(1)})
    (store / "manifest.json").write_text(manifest)
    with pytest.raises(
        ValueError,
        match=r"bank\ds0_0_0to10.safetensors: latent of shape \[16, 5, 8, 9\], but .*manifest",
    ):
        train(cfg)


def test_caption_dropout_trains_memory_alone_and_resumes_exactly(tmp_path, base_model):
    """With data.caption_dropout some samples see the dropped caption (the unconditional
    branch's text); the draws come from the run's generator, so resuming is still exact."""
    from dit_mem.training.text_cache import DROPPED_CAPTION_KEY, TextEmbeddingCache

    common = ("data.caption_dropout=0.5", "checkpoint_every=2", "data.dropped_caption=")
    straight = synthetic(
        tmp_path, base_model, f"output_dir={tmp_path / 'a'}", "max_steps=4", *common
    )
    res_a = train(straight)
    plain = synthetic(tmp_path, base_model, f"output_dir={tmp_path / 'p'}", "max_steps=4")
    assert train(plain).losses != res_a.losses  # the dropped captions change what is learned
    first = synthetic(tmp_path, base_model, f"output_dir={tmp_path / 'b'}", "max_steps=2", *common)
    res_b = train(first)
    rest = synthetic(tmp_path, base_model, f"output_dir={tmp_path / 'b'}", "max_steps=4", *common)
    res_c = train(rest, resume="latest")
    assert res_a.losses == res_b.losses + res_c.losses
    cache = TextEmbeddingCache(straight.cache_dir / "text")
    assert DROPPED_CAPTION_KEY in cache
    assert cache.load([DROPPED_CAPTION_KEY], 32).abs().sum() > 0  # "" still has </s>
