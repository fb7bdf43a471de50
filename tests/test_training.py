"""Training pieces: the loss (recomputed independently), compact == dense memory in training,
the caches, the config and the checkpoint bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dit_mem.config import ConfigError
from dit_mem.memory import MemoryEncoder, MemoryTokens
from dit_mem.training import (
    FlowMatchingObjective,
    TextEmbeddingCache,
    latest_checkpoint,
    list_checkpoints,
    load_train_config,
    resolve_resume,
    training_loss,
)
from dit_mem.training.retrieval_cache import build_retrieval_cache, memory_ids_by_sample

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


YAML = REPO / "config" / "train_dit_mem.yaml"


def tiny_dit(seed: int = 0):
    from dit_mem.backbone import attach_memory
    from dit_mem.testing import tiny_transformer
    from dit_mem.training.trainer import FrozenDiT, freeze

    transformer = freeze(tiny_transformer(seed=seed))
    attach_memory(transformer)
    return FrozenDiT(transformer, torch.float32, max_text_tokens=12)


def tiny_encoder() -> MemoryEncoder:
    return MemoryEncoder.from_preset("tiny")


def batch(b: int = 1, k: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x0": torch.randn(b, 16, 5, 8, 8, generator=g),
        "memory": torch.randn(b, k, 16, 5, 8, 8, generator=g),
        "text": [{"encoder_hidden_states": t} for t in torch.randn(b, 12, 32, generator=g)],
    }


def text_tensor(data: dict) -> torch.Tensor:
    return torch.stack([t["encoder_hidden_states"] for t in data["text"]])


def loss_with_memory(dit, objective, data, generator, memory) -> torch.Tensor:
    """``training_loss``'s steps with the memory given (the draws after the encoder's)."""
    x0 = data["x0"]
    index = objective.sample_indices(x0.shape[0], generator)
    x_t, t, target = objective.prepare(x0, index, torch.randn(x0.shape, generator=generator))
    pred = dit.transformer(
        hidden_states=x_t,
        timestep=t,
        encoder_hidden_states=text_tensor(data),
        attention_kwargs={"memory_tokens": memory},
        return_dict=False,
    )[0]
    return objective.loss(pred, target, index)


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------
def test_schedule_constants():
    obj = FlowMatchingObjective()
    assert obj.sigmas[0] == 1.0 and obj.timesteps[0] == 1000.0
    assert obj.sigmas[-1].item() == pytest.approx(5 * 0.001 / (1 + 4 * 0.001), rel=1e-6)
    assert obj.weights.min().item() == pytest.approx(0.0, abs=1e-6)
    assert obj.weights.sum().item() == pytest.approx(1000.0, rel=1e-5)
    peak = obj.timesteps[obj.weights.argmax()].item()
    assert abs(peak - 500) < 2  # w peaks at t = 500
    # The noisiest tenth of the schedule (t ≥ 900; 36% of draws at shift 5) gets < 0.35 of the
    # peak weight; weighting="none" keeps every timestep at 1.
    assert obj.weights[obj.timesteps >= 900].max() < 0.35 * obj.weights.max()
    flat = FlowMatchingObjective(weighting="none")
    assert torch.equal(flat.weights, torch.ones(1000)) and torch.equal(flat.sigmas, obj.sigmas)
    with pytest.raises(ValueError, match="loss weighting must be one of"):
        FlowMatchingObjective(weighting="logit_normal")


def test_loss_matches_independent_recomputation():
    """The training loss of a fixed seed, recomputed from SPEC §5 with numpy in float64."""
    dit, enc = tiny_dit(), tiny_encoder().eval()
    data = batch(b=2)
    obj = FlowMatchingObjective()
    with torch.no_grad():
        got = training_loss(dit, enc, obj, data, torch.Generator().manual_seed(7))

        # Independent: same draws in the documented order (timestep indices [B], then noise).
        g = torch.Generator().manual_seed(7)
        idx = torch.randint(0, 1000, (2,), generator=g).numpy()
        eps = torch.randn(data["x0"].shape, generator=g).double().numpy()
        s = np.linspace(1, 0, 1001)[:-1]
        sp = 5 * s / (1 + 4 * s)
        t = 1000 * sp
        w = np.exp(-2 * ((t - 500) / 1000) ** 2)
        w = (w - w.min()) * 1000 / (w - w.min()).sum()
        x0 = data["x0"].double().numpy()
        x_t = (1 - sp[idx])[:, None, None, None, None] * x0 + sp[idx][
            :, None, None, None, None
        ] * eps
        memory = enc(data["memory"], shuffle=False)
        pred = (
            dit.transformer(
                hidden_states=torch.from_numpy(x_t).float(),
                timestep=torch.from_numpy(t[idx]).float(),
                encoder_hidden_states=text_tensor(data),
                attention_kwargs={"memory_tokens": memory},
                return_dict=False,
            )[0]
            .double()
            .numpy()
        )
        mse = ((pred - (eps - x0)) ** 2).reshape(2, -1).mean(axis=1)
        want = float((mse * w[idx]).mean())
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_compact_memory_gives_dense_loss_and_grads():
    """Training sees the same loss and encoder gradients with compact and dense memory."""
    torch.manual_seed(0)
    dit, enc = tiny_dit(), tiny_encoder().train()
    dit.transformer.enable_gradient_checkpointing()
    data = batch(b=1, k=3)
    obj = FlowMatchingObjective()
    params = [p for p in enc.parameters() if p.requires_grad]
    mem = enc(data["memory"], generator=torch.Generator().manual_seed(1))
    assert mem.num_distinct < mem.num_dense_tokens  # really compact (2·3 of 600 tokens)
    dense = MemoryTokens.from_dense(mem.dense())
    out = {}
    for name, m in (("compact", mem), ("dense", dense)):
        loss = loss_with_memory(dit, obj, data, torch.Generator().manual_seed(3), m)
        out[name] = (loss, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
    (lc, gc), (ld, gd) = out["compact"], out["dense"]
    assert lc.item() == pytest.approx(ld.item(), rel=1e-5)
    norm = math.sqrt(sum(float(g.square().sum()) for g in gc if g is not None))
    assert norm > 0  # gradients reach the encoder through the frozen DiT
    for a, b in zip(gc, gd, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * norm)
    assert all(p.grad is None and not p.requires_grad for p in dit.transformer.parameters())


# --------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------
def test_text_cache_matches_wan_pipeline_and_resumes(tmp_path):
    from dit_mem.backbone.families.wan import FAMILY as WAN
    from dit_mem.testing import tiny_pipeline

    pipe = tiny_pipeline()
    caps = ["a cat sits on a mat", "  waves &amp; a   beach ", "a red fox", "a city at night"]
    ids = ["a", "b", "c", "d"]

    def encode(captions):
        return WAN.training.encode_text(pipe, captions, 32)

    meta = {"max_tokens": 32, "streams": ["encoder_hidden_states"]}
    cache = TextEmbeddingCache(tmp_path / "text")
    assert cache.build(ids[:2], caps[:2], encode, meta, progress=False) == 2
    (tmp_path / "text" / ".tmp-shard-00009.safetensors.x").write_bytes(b"partial")  # killed write
    cache = TextEmbeddingCache(tmp_path / "text")  # reopen: resumes from the shards on disk
    assert cache.missing(ids) == ["c", "d"]
    assert cache.build(ids, caps, encode, meta, progress=False) == 2
    assert len(list((tmp_path / "text").glob("shard-*.safetensors"))) == 2
    got = TextEmbeddingCache(tmp_path / "text").load(ids, 32)
    with torch.no_grad():
        want = pipe._get_t5_prompt_embeds(caps, max_sequence_length=32, device=torch.device("cpu"))
    torch.testing.assert_close(got, want)
    n = len(pipe.tokenizer(caps[0]).input_ids)
    assert n < 32 and (got[0, n:] == 0).all() and (got[0, :n] != 0).any()  # padding zeroed
    with pytest.raises(ValueError, match="other settings"):
        cache.build(["e"], ["x"], encode, {**meta, "max_tokens": 64}, progress=False)


@pytest.mark.parametrize("flavour", ["ltx", "hunyuan15"])
def test_cached_text_gives_the_transformer_the_pipelines_prompt(flavour, tmp_path):
    """Valid rows cached, padded and masked again by the family: the transformer's output is the
    one the stock pipeline's own prompt embeddings (and masks) give."""
    from dit_mem.backbone import family_of
    from dit_mem.testing import tiny_inputs, tiny_pipeline

    pipe = tiny_pipeline(flavour)
    family = family_of(pipe.transformer)
    caps = ['a cat sits on a mat "neon"', "a red fox"]  # quoted text: a ByT5 stream too
    meta = {"max_tokens": 16, "streams": list(family.training.text_streams)}
    cache = TextEmbeddingCache(tmp_path / "text")
    cache.build(
        ["a", "b"], caps, lambda c: family.training.encode_text(pipe, c, 16), meta, progress=False
    )
    ours = family.training.text_kwargs(cache.load_texts(["a", "b"]), 16)
    with torch.no_grad():
        if flavour == "ltx":
            embeds, mask = pipe._get_t5_prompt_embeds(caps, max_sequence_length=16, device="cpu")
            stock = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        else:
            e, m, e2, m2 = pipe.encode_prompt(caps, device="cpu", batch_size=2)
            stock = dict(
                zip(
                    family.training.text_streams + family.training.text_masks,
                    (e, e2, m, m2),
                    strict=True,
                )
            )
        call = {k: v for k, v in tiny_inputs(flavour).items() if k not in stock}
        a = pipe.transformer(**call, **stock, return_dict=False)[0]
        b = pipe.transformer(**call, **ours, return_dict=False)[0]
    assert ((a - b).norm() / a.norm()).item() <= 1e-5


class FakeRetriever:
    def __init__(self):
        self.calls = []

    def retrieve(self, prompts, k, exclude=None):
        from dit_mem.retrieval import RetrievalResult

        self.calls.append((list(prompts), exclude))
        return [
            RetrievalResult([f"m{j}" for j in range(k)], [f"cap {j}" for j in range(k)], [0.9] * k)
            for _ in prompts
        ]


def test_retrieval_cache_excludes_own_video_and_resumes(tmp_path):
    fake = FakeRetriever()
    table = build_retrieval_cache(tmp_path, ["x1", "x2"], ["p1", "p2"], lambda: fake, 3, tmp_path)
    assert fake.calls == [(["p1", "p2"], [["x1"], ["x2"]])]
    assert len(table) == 6 and memory_ids_by_sample(table)["x2"] == ["m0", "m1", "m2"]
    table = build_retrieval_cache(
        tmp_path, ["x1", "x2", "x3"], ["p1", "p2", "p3"], lambda: fake, 3, tmp_path
    )
    assert fake.calls[-1] == (["p3"], [["x3"]]) and len(table) == 9
    logged = pd.read_csv(tmp_path / "retrieval.csv")
    assert list(logged.columns) == ["id", "rank", "memory_id", "score", "memory_caption"]
    build_retrieval_cache(tmp_path, ["x1"], ["p1"], lambda: fake, 2, tmp_path)  # other k: rebuilt
    assert fake.calls[-1] == (["p1"], [["x1"]])


def test_retrieval_cache_with_real_retriever_drops_same_source(tmp_path):
    """End to end with the memory bank's Retriever: own clip and same-source clips excluded."""
    from dit_mem.retrieval import Retriever, build_index

    bank = pd.DataFrame(
        {
            "video": [
                "fox_1_0to5.mp4",
                "fox_2_5to9.mp4",
                "dog_1_0to5.mp4",
                "cat_1_0to5.mp4",
                "sea_1_0to5.mp4",
            ],
            "caption": [
                "a red fox in the snow",
                "a red fox runs in snow",
                "a dog in the snow",
                "a cat on a sofa",
                "waves on a beach",
            ],
        }
    )
    bank.to_csv(tmp_path / "bank.csv", index=False)
    build_index(tmp_path / "bank.csv", tmp_path / "index", recall_queries=0)
    table = build_retrieval_cache(
        tmp_path / "cache",
        ["fox_1_0to5"],
        ["a red fox in the snow"],
        lambda: Retriever(tmp_path / "index"),
        2,
        tmp_path / "index",
    )
    got = memory_ids_by_sample(table)["fox_1_0to5"]
    assert len(got) == 2 and not any(m.startswith("fox_") for m in got)
    assert got[0] == "dog_1_0to5"


# --------------------------------------------------------------------------------------
# Config and command line
# --------------------------------------------------------------------------------------
def test_yaml_has_paper_settings_and_command_line_wins():
    cfg = load_train_config(YAML)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.batch_size, cfg.data.k, cfg.epochs) == (
        1e-5,
        0.0,
        1,
        5,
        5,
    )
    assert cfg.mixed_precision == "bf16" and cfg.model.gradient_checkpointing
    # what the family knows is left to it (resolved for a run: test_front_doors, train cells)
    assert cfg.loss.flow_shift is None and cfg.data.max_text_tokens is None
    assert cfg.loss.weighting is None and cfg.model.encoder_preset is None
    cfg = load_train_config(YAML, ["optim.lr=2e-5", "data.k=3", "mixed_precision=no"])
    assert (cfg.optim.lr, cfg.data.k, cfg.mixed_precision) == (2e-5, 3, "no")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key optim.lrr"),
        ("bogus=1", "unknown config key bogus"),
        ("log_with=mlflow", "unknown logger 'mlflow'"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps must be"),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(YAML, [override])


def test_cli_prints_resolved_config_and_names_unknown_keys(capsys):
    from dit_mem.cli import main

    run = ["train", "--config", str(YAML), "--print-config"]
    assert main([*run, "optim.lr=3e-5", "--set", "data.k=4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-05" in out and "k: 4" in out
    assert main([*run, "optim.nope=1"]) == 2
    assert "unknown config key optim.nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Checkpoint bookkeeping
# --------------------------------------------------------------------------------------
def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    from dit_mem.checkpoint import checkpoint_name, write_state_file

    path = root / "checkpoints" / checkpoint_name(step)
    (path / "encoder").mkdir(parents=True)
    (path / "accelerate").mkdir()
    if complete:
        write_state_file(path, {"step": step})
    return path


def test_latest_skips_temporary_and_incomplete_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path, 2)
    good = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)  # no trainer_state.json
    (tmp_path / "checkpoints" / ".tmp-step-000008" / "encoder").mkdir(parents=True)
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 4]
    assert resolve_resume("latest", tmp_path).path == good
    assert resolve_resume(tmp_path, tmp_path).path == good  # a run folder
    assert resolve_resume(good, tmp_path).step == 4


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume(tmp_path / "nowhere", tmp_path)
    broken = _fake_checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        resolve_resume(broken, tmp_path)


def test_non_finite_gradient_stops_training_with_a_clear_error():
    from dit_mem.training.trainer import _check_finite

    _check_finite(torch.tensor(1.5), torch.tensor(0.3), 7, cpu_bf16=False)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .* at optimizer step 7"):
        _check_finite(torch.tensor(float("nan")), torch.tensor(0.3), 7, cpu_bf16=False)
    with pytest.raises(FloatingPointError, match="mixed_precision=no"):
        _check_finite(torch.tensor(float("inf")), torch.tensor(0.3), 7, cpu_bf16=True)


def test_wandb_asked_for_but_missing_is_a_clear_error(tmp_path):
    from dit_mem.training.metrics import MetricsLogger

    pytest.importorskip("matplotlib")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="wandb is not installed"):
            MetricsLogger(tmp_path, True, ("wandb",))
    else:
        pytest.skip("wandb is installed")
