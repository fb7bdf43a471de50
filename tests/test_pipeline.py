"""The front door: DiTMemPipeline (stock WanPipeline's call + memory), load_memory, MemoryBank."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from dit_mem import MemoryBank, MemoryEncoder, MemoryTokens
from dit_mem.backbone import get_attachment
from dit_mem.pipeline import SAME, DiTMemPipeline, DiTMemPipelineOutput
from dit_mem.schedulers import PaperEulerScheduler, make_scheduler
from dit_mem.testing import run_random_world, tiny_components, tiny_pipeline

CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture
def parts():
    return tiny_components(seed=0)  # fresh per test: load_memory changes the transformer


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> Path:
    """A tiny random Wan, a synthetic bank folder and a tiny encoder (dit_mem.testing)."""
    out = tmp_path_factory.mktemp("world")
    run_random_world(out, k=2, steps=2)
    return out


def make(cls, parts, kind="unipc"):
    pipe = cls(**{**parts, "scheduler": make_scheduler(kind)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt="a red circle moving left", seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kw})


def memory_of(batch: int, seed: int = 1) -> MemoryTokens:
    torch.manual_seed(seed)
    enc = MemoryEncoder.from_preset("tiny").eval()
    with torch.no_grad():
        return enc(torch.randn(batch, 2, 16, 5, 8, 8))


# --------------------------------------------------------------------------------------
# Stock parity
# --------------------------------------------------------------------------------------
def test_call_signature_is_stock_wan_plus_memory():
    stock = inspect.signature(WanPipeline.__call__).parameters
    ours = inspect.signature(DiTMemPipeline.__call__).parameters
    for name, param in stock.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
    extra = [n for n in ours if n not in stock]
    assert extra == ["memory", "negative_memory", "memory_scale", "k"]
    assert ours["negative_memory"].default is SAME


@pytest.mark.parametrize("kind", ["unipc", "flow-euler", "euler"])
def test_without_memory_bit_identical_to_stock_wan(parts, kind):
    steps: list[tuple] = []

    def callback(pipe, i, t, kwargs):
        steps.append((i, float(t), kwargs["latents"].sum().item()))
        return {"latents": kwargs["latents"] * 0.999}

    args = dict(
        negative_prompt=["blurry", "dark"],
        num_videos_per_prompt=2,
        output_type="pt",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        max_sequence_length=64,
    )
    prompts = ["a red circle moving left", "a blue square moving up"]
    stock = run(make(WanPipeline, parts, kind), prompts, **args).frames
    stock_steps, steps[:] = list(steps), []
    ours = make(DiTMemPipeline, parts, kind)
    out = run(ours, prompts, **args)
    assert isinstance(out, DiTMemPipelineOutput) and out.memory is None
    assert torch.equal(out.frames, stock) and steps == stock_steps
    # attached (memory loaded) but no memory given: still stock, bit for bit
    ours.load_memory(MemoryEncoder.from_preset("tiny"))
    steps[:] = []
    assert torch.equal(run(ours, prompts, **args).frames, stock) and steps == stock_steps
    tuple_out = run(ours, prompts, **{**args, "return_dict": False})
    assert isinstance(tuple_out, tuple) and len(tuple_out) == 1
    assert torch.equal(tuple_out[0], stock)


def test_prompt_embeds_and_latent_output_as_stock(parts):
    stock, ours = make(WanPipeline, parts), make(DiTMemPipeline, parts)
    with torch.no_grad():
        cond, uncond = stock.encode_prompt("a red circle", "blurry", max_sequence_length=32)
    kw = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="latent")
    want = stock(generator=torch.Generator().manual_seed(0), **CALL, **kw).frames
    got = ours(generator=torch.Generator().manual_seed(0), **CALL, **kw).frames
    assert torch.equal(got, want)


def test_paper_scheduler_grid():
    s = make_scheduler("flow-euler", shift=5.0)
    assert isinstance(s, PaperEulerScheduler)
    s.set_timesteps(4)
    sig = np.linspace(1, 0, 5)[:-1]
    assert torch.allclose(s.sigmas[:-1], torch.tensor(5 * sig / (1 + 4 * sig), dtype=torch.float32))
    assert s.sigmas[-1] == 0 and torch.allclose(s.timesteps, 1000 * s.sigmas[:-1])
    stock = make_scheduler("euler", shift=5.0)
    stock.set_timesteps(4)
    assert not torch.allclose(stock.sigmas, s.sigmas)  # the paper's grid is not diffusers' default
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("ddim")


# --------------------------------------------------------------------------------------
# Memory through the call
# --------------------------------------------------------------------------------------
@pytest.fixture
def attached():
    pipe = make(DiTMemPipeline, tiny_components(seed=0), "flow-euler")
    pipe.load_memory(MemoryEncoder.from_preset("tiny"))
    return pipe


def test_memory_batches_broadcast_like_prompts(attached):
    prompts = ["a red circle moving left", "a blue square moving up"]
    per_prompt = memory_of(2)
    kw = dict(num_videos_per_prompt=2, output_type="latent")
    a = run(attached, prompts, memory=per_prompt, **kw).frames
    b = run(attached, prompts, memory=per_prompt.repeat_batch(2), **kw).frames
    assert torch.equal(a, b)  # one per prompt == one per video, prompt-major
    shared = MemoryTokens(per_prompt.tokens[:1], per_prompt.log_counts[:1])
    c = run(attached, prompts, memory=shared, **kw).frames
    d = run(attached, prompts, memory=shared.repeat_batch(4), **kw).frames
    assert torch.allclose(c, d, atol=1e-6) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="batch 3; expected 1 .* 2 .* or 4"):
        run(attached, prompts, memory=memory_of(3), **kw)


def test_negative_memory_decides_the_unconditional_branch(attached):
    """Per call of the transformer: which branch ran with which memory."""
    seen: list[tuple[str | None, int | None]] = []

    hook = attached.transformer._diffusers_hook.get_hook("dit_mem.memory")

    def record(module, args, output):  # after the call: the memory it ran with
        memory, context = get_attachment(module).memory, hook.contexts._context
        seen.append((context.name, None if memory is None else int(memory.tokens[0, 0, 0] * 1e4)))

    attached.transformer.register_forward_hook(record)
    mem, other = memory_of(1, seed=1), memory_of(1, seed=2)
    key = {int(m.tokens[0, 0, 0] * 1e4): name for m, name in ((mem, "mem"), (other, "other"))}
    for negative, expected in ((SAME, {"mem"}), (None, {None}), (other, {"other"})):
        seen.clear()
        run(attached, memory=mem, negative_memory=negative, output_type="latent")
        assert len(seen) == 2 * CALL["num_inference_steps"]
        cond = {key.get(m) for b, m in seen[0::2]}
        uncond = {key.get(m) for b, m in seen[1::2]}
        assert cond == {"mem"} and uncond == expected, (negative, cond, uncond)
        assert {b for b, _ in seen} == {"cond", "uncond"}
    assert hook.contexts._context is None  # the loop's context ends with the call


def test_memory_scale_and_outputs(attached):
    mem = memory_of(1)
    base = run(attached, output_type="latent").frames
    one = run(attached, memory=mem, output_type="latent").frames
    two = run(attached, memory=mem, memory_scale=2.0, output_type="latent").frames
    attached.set_memory_scale(2.0)
    two_again = run(attached, memory=mem, output_type="latent").frames
    assert torch.equal(two, two_again) and not torch.equal(one, two) and not torch.equal(base, one)
    attached.set_memory_scale(0)  # memory off, as an IP-Adapter scale of 0
    assert torch.equal(run(attached, memory=mem, output_type="latent").frames, base)
    assert torch.equal(
        run(attached, memory=mem, memory_scale=0.0, output_type="latent").frames, base
    )
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="memory scale"):
            run(attached, memory=mem, memory_scale=bad)


def test_memory_input_errors(parts, attached):
    plain = make(DiTMemPipeline, parts)
    with pytest.raises(ValueError, match="none loaded: call pipe.load_memory"):
        run(plain, memory=memory_of(1))
    with pytest.raises(ValueError, match="no memory is attached"):
        run(plain, attention_kwargs={"memory_tokens": memory_of(1)})
    with pytest.raises(ValueError, match="needs a memory bank"):
        run(attached, memory="retrieve")
    with pytest.raises(ValueError, match="must be 'retrieve'"):
        run(attached, memory="recall")
    with pytest.raises(ValueError, match="negative_memory was given without memory"):
        run(attached, negative_memory=memory_of(1))
    nan = memory_of(1)
    nan.tokens[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(attached, memory=nan)
    huge = memory_of(1)  # finite, but far beyond any encoder's output: NaN frames otherwise
    huge.tokens[0, 0, 0] = 1e20
    for given in (huge, huge.tokens):
        with pytest.raises(ValueError, match=r"memory holds values up to 1e\+20 \(> 10000\)"):
            run(attached, memory=given)
    with pytest.raises(ValueError, match=r"values up to 1e\+20"):
        run(attached, attention_kwargs={"memory_tokens": huge})
    with pytest.raises(ValueError, match="not also in attention_kwargs"):
        run(attached, memory=memory_of(1), attention_kwargs={"memory_tokens": memory_of(1)})
    with pytest.raises(TypeError):
        run(attached, memroy=memory_of(1))  # a typo is an error, as in stock


def test_load_memory_and_unload_give_back_the_stock_pipeline(parts):
    pipe = make(DiTMemPipeline, parts)
    stock = run(pipe, output_type="latent").frames
    stock_processors = [b.attn1.processor for b in pipe.transformer.blocks]
    with pytest.raises(ValueError, match="width 1536 does not match the DiT's hidden size 32"):
        pipe.load_memory(MemoryEncoder.from_preset("wan2.1-1.3b"))
    assert pipe.memory_encoder is None and get_attachment(pipe.transformer) is None
    pipe.load_memory(MemoryEncoder.from_preset("tiny"), scale=1.5)
    assert pipe.memory_encoder is not None and "memory_encoder" in pipe.components
    assert not torch.equal(run(pipe, memory=memory_of(1), output_type="latent").frames, stock)
    pipe.unload_memory()
    assert pipe.memory_encoder is None and pipe.memory_bank is None
    assert [b.attn1.processor for b in pipe.transformer.blocks] == stock_processors
    assert all(type(p) is WanAttnProcessor for p in stock_processors)
    assert torch.equal(run(pipe, output_type="latent").frames, stock)


@pytest.mark.parametrize("family", ["wan2.2-ti2v", "wan2.2-a14b"])
def test_wan22_families_take_memory_in_every_expert(family):
    stock = tiny_pipeline(family)
    stock.set_progress_bar_config(disable=True)
    ours = DiTMemPipeline.from_pipe(stock)  # diffusers carries components and config over
    ours.set_progress_bar_config(disable=True)
    base = run(ours, output_type="latent").frames
    assert torch.equal(base, run(stock, output_type="latent").frames)
    ours.load_memory(MemoryEncoder.from_preset("tiny"))
    experts = [t for t in (ours.transformer, ours.transformer_2) if t is not None]
    assert all(get_attachment(t) is not None for t in experts)
    mem = memory_of(1)
    got = run(ours, memory=mem, output_type="latent").frames
    via_kwargs = run(stock, attention_kwargs={"memory_tokens": mem}, output_type="latent").frames
    assert torch.equal(got, via_kwargs) and not torch.equal(got, base)


# --------------------------------------------------------------------------------------
# Retrieval through the pipeline, the bank, Hub ids
# --------------------------------------------------------------------------------------
def test_retrieve_with_the_loaded_bank(world):
    pipe = DiTMemPipeline.from_pretrained(world / "model")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe.load_memory(world / "encoder", bank=world / "bank")
    prompts = ["a red circle moving right", "a blue square moving left"]
    out = run(pipe, prompts, memory="retrieve", k=3, output_type="latent")
    assert [len(hit.ids) for hit in out.memory] == [3, 3]
    assert out.memory[0].captions[0] == "a red circle moving right"
    assert all(c in pipe.memory_bank.captions for hit in out.memory for c in hit.captions)
    tokens, hits = pipe.memory_bank.memory(prompts, pipe.memory_encoder, k=3)
    assert [h.ids for h in hits] == [h.ids for h in out.memory]
    same = run(pipe, prompts, memory=tokens, output_type="latent").frames
    assert torch.equal(same, out.frames)
    with pytest.raises(ValueError, match="found 24 of k=30"):
        run(pipe, prompts, memory="retrieve", k=30)
    with pytest.raises(ValueError, match="k must be an integer"):
        run(pipe, prompts, memory="retrieve", k=0)


def test_bank_save_and_load_round_trip(world, tmp_path):
    bank = MemoryBank.from_pretrained(world / "bank")
    assert set(bank.parts) == {"index", "latents", "videos"} and len(bank) == 24
    copy = bank.save_pretrained(tmp_path / "copy")
    assert json.loads((copy / "bank.json").read_text())["parts"] == ["index", "latents", "videos"]
    again = MemoryBank.from_pretrained(copy)
    prompts = ["a green square moving left"]
    assert [h.ids for h in again.retrieve(prompts, 4)] == [h.ids for h in bank.retrieve(prompts, 4)]
    encoder = MemoryEncoder.from_pretrained(world / "encoder").eval()
    assert torch.equal(
        again.memory(prompts, encoder, 2)[0].tokens, bank.memory(prompts, encoder, 2)[0].tokens
    )
    previews = again.previews(again.retrieve(prompts, 2)[0].ids, num_frames=4)
    assert [p.shape for p in previews] == [(4, 120, 208, 3)] * 2
    with pytest.raises(FileNotFoundError, match="not a memory bank folder"):
        MemoryBank.from_pretrained(world / "model")
    with pytest.raises(FileNotFoundError, match="not a Hub id"):
        MemoryBank.from_pretrained(tmp_path / "nowhere")


def test_save_pretrained_with_memory_comes_back_with_it(world, tmp_path):
    """The encoder, λ, the route and the bank (a reference in memory.json) survive a save and a
    load: the reloaded pipeline makes the same video; a bank that moved is a clear error."""
    pipe = DiTMemPipeline.from_pretrained(world / "model")
    pipe.set_progress_bar_config(disable=True)
    bank = tmp_path / "bank"
    shutil.copytree(world / "bank", bank)
    pipe.load_memory(world / "encoder", bank=bank, scale=2.0, route="joint")
    want = run(pipe, memory="retrieve", k=2, output_type="latent")
    pipe.save_pretrained(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "memory.json").read_text())
    assert record["scale"] == 2.0 and record["route"] == "joint" and record["attached"]
    assert record["bank"]["from_pretrained"]["path_or_repo_id"] == str(bank.resolve())
    again = DiTMemPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    assert get_attachment(again.transformer).route == "joint" and again._memory_scale == 2.0
    got = run(again, memory="retrieve", k=2, output_type="latent")
    assert [h.ids for h in got.memory] == [h.ids for h in want.memory]
    torch.testing.assert_close(got.frames, want.frames, rtol=0, atol=0)
    # the bank moved: say so, and how to give one
    bank.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"memory\.json: the memory bank it names cannot"):
        DiTMemPipeline.from_pretrained(tmp_path / "saved")
    other = DiTMemPipeline.from_pretrained(tmp_path / "saved", memory_bank=tmp_path / "moved")
    assert len(other.memory_bank) == 24 and get_attachment(other.transformer) is not None
    none = DiTMemPipeline.from_pretrained(tmp_path / "saved", memory_bank=None)
    assert none.memory_bank is None and get_attachment(none.transformer) is not None
    # unloaded memory is saved as none
    none.unload_memory()
    none.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "memory.json").exists()
    plain = DiTMemPipeline.from_pretrained(tmp_path / "saved")
    assert plain.memory_encoder is None and get_attachment(plain.transformer) is None


REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(hub: Path, repo_id: str, folder: Path, repo_type: str = "model") -> None:
    """``folder`` as a Hub repository in the local cache layout (offline use, no network)."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    repo = hub / f"{kind}--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def hf_home(world, tmp_path) -> Path:
    home = tmp_path / "hf"
    hub_cache(home / "hub", "toy/wan-tiny", world / "model")
    hub_cache(home / "hub", "toy/dit-mem-tiny", world / "encoder")
    packed = tmp_path / "packed"
    (packed / "banks").mkdir(parents=True)
    shutil.copytree(world / "bank", packed / "banks" / "synthetic")
    hub_cache(home / "hub", "toy/memory", packed, repo_type="dataset")
    return home


def test_load_memory_from_hub_ids_offline(world, hf_home):
    cache = hf_home / "hub"
    pipe = DiTMemPipeline.from_pretrained(world / "model")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_memory(
        "toy/dit-mem-tiny",
        bank="toy/memory",
        bank_subfolder="banks/synthetic",
        cache_dir=cache,
        local_files_only=True,
    )
    assert len(pipe.memory_bank) == 24
    out = run(pipe, "a red circle moving right", memory="retrieve", k=2, output_type="latent")
    assert out.memory[0].captions[0] == "a red circle moving right"
    with pytest.raises(FileNotFoundError, match="toy/absent"):
        pipe.load_memory("toy/absent", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="no folder 'banks/other'"):
        MemoryBank.from_pretrained(
            "toy/memory", subfolder="banks/other", cache_dir=cache, local_files_only=True
        )


def test_generate_command_with_hub_ids_in_a_temporary_hf_home(
    hf_home, tmp_path, monkeypatch, capsys
):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    cmd = [
        *(sys.executable, "-m", "dit_mem.cli", "generate", "--prompt", "a red circle moving right"),
        *("--out", str(out), "base_model=toy/wan-tiny", "encoder=toy/dit-mem-tiny"),
        *("bank=toy/memory", "bank_subfolder=banks/synthetic", "k=2", "height=64", "width=64"),
        *("num_frames=17", "steps=2", "dtype=float32", "device=cpu", "progress=false"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sidecar = json.loads((out / "a_red_circle_moving_right.json").read_text())
    assert sidecar["retrieved"][0]["caption"] == "a red circle moving right"
    # the refusals, in this process (huggingface_hub reads its cache and offline mode at call
    # time: the same temporary HF_HOME)
    from huggingface_hub import constants

    from dit_mem.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = cmd[3:]
    argv[argv.index("bank=toy/memory")] = "bank=toy/absent"
    assert main(argv) == 2  # out is taken
    assert "other settings (bank differ" in capsys.readouterr().err
    argv[argv.index(str(out))] = str(tmp_path / "out2")
    assert main(argv) == 2
    assert "toy/absent" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()  # nothing written for a run that could not start
