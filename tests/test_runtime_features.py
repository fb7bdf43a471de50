"""Memory under the runtime features a diffusers user runs Wan with.

Every check gives memory to a tiny ``WanTransformer3DModel`` under one feature and compares with
the same model run plainly with memory attached and the same memory (``want``), or with the
paper's dense form where the feature changes the numbers by design.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from dit_mem import attach_memory
from dit_mem.backbone.reference import PaperFormMemory
from dit_mem.memory import MemoryTokens
from dit_mem.testing import tiny_transformer

TESTS = Path(__file__).parent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def call():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    t = torch.tensor([500.0, 730.0])
    text = torch.randn(2, 7, 32, generator=g)
    counts = torch.tensor([100.0, 100.0, 50.0, 50.0, 1.0, 3.0])
    memory = MemoryTokens(torch.randn(1, 6, 32, generator=g), counts.log()[None])
    return x, t, text, memory


def run(model, call, memory: bool = True):
    x, t, text, mem = call
    kwargs = {"memory_tokens": mem} if memory else None
    with torch.no_grad():
        return model(x, t, text, attention_kwargs=kwargs, return_dict=False)[0]


def attached() -> torch.nn.Module:
    model = tiny_transformer(seed=0)
    attach_memory(model)
    return model


@pytest.fixture(scope="module")
def want(call):
    """The plainly attached model's outputs: with memory, and without."""
    model = attached()
    return run(model, call), run(model, call, memory=False)


@pytest.fixture(scope="module")
def paper(call):
    """The paper's dense form on the same weights (for features that change the numbers)."""
    model = tiny_transformer(seed=0)
    PaperFormMemory(model)
    return run(model, call)


def test_memory_changes_the_output(want):
    assert rel_err(*want) > 1e-2


# --------------------------------------------------------------------------------------
# Offloading
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["block_level", "leaf_level"])
@pytest.mark.parametrize("to_disk", [True])  # (in memory, for every family: test_families)
def test_group_offloading(level, to_disk, call, want, tmp_path):
    model = attached()
    cpu = torch.device("cpu")
    kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
    model.enable_group_offload(
        onload_device=cpu,
        offload_device=cpu,
        offload_type=level,
        offload_to_disk_path=str(tmp_path) if to_disk else None,
        **kwargs,
    )
    assert torch.equal(run(model, call), want[0])
    assert torch.equal(run(model, call, memory=False), want[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("mode", "family"), [("ulysses", "wan"), ("ring", "wan"), ("ulysses", "ltx")]
)  # LTX: stock diffusers 0.42.1 runs it under Ulysses at inference only (cp_worker.py)
def test_context_parallelism_two_processes(mode, family, tmp_path):
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(TESTS / "cp_worker.py"),
        "--mode",
        mode,
        "--family",
        family,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["memory_effect"] > 1e-2  # memory matters, so a dropped half would show
    assert result["memory"] <= 1e-5  # inference (the lse route)
    if family == "wan":
        assert result["memory_with_grad"] <= 1e-5  # training forward (the joint route)
        assert result["grad"] <= 1e-5  # the ranks' gradient shares sum to one process's gradient
    if mode == "ulysses":
        assert result["no_memory"] == 0.0


def test_fused_qkv(call, want):
    model = attached()
    model.fuse_qkv_projections()
    assert rel_err(run(model, call), want[0]) <= 1e-6


def test_save_pretrained_saves_the_stock_model(call, want, tmp_path):
    from diffusers import WanTransformer3DModel

    model = attached()
    model.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    assert type(loaded.blocks[0].attn1.processor) is WanAttnProcessor
    assert torch.equal(run(loaded, call, memory=False), want[1])
    attach_memory(loaded)
    assert torch.equal(run(loaded, call), want[0])


def test_first_block_cache_skips_and_keeps_memory(call, want):
    """FirstBlockCache computes every block on a call whose first block's residual changed, and
    skips the rest on one that did not (threshold > 0): the second identical call runs the first
    block only, and its output is the memory output still."""
    from diffusers import FirstBlockCacheConfig

    model = attached()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    ran = []
    for i, block in enumerate(model.blocks):
        block.ffn.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))  # computed
    with model.cache_context("cond"):
        first = run(model, call)
        computed = len(ran)
        second = run(model, call)
    assert torch.equal(first, want[0])  # the first call: every block, exact
    assert computed == len(model.blocks) and ran[computed:] == [0]  # the second: skipped
    assert rel_err(second, want[0]) <= 1e-6


def _pab(model):
    from diffusers import PyramidAttentionBroadcastConfig

    model.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=lambda: 500,
        )
    )


def _pab_calls(model, call, **memory):
    """Two guidance calls as separate calls (cond, then uncond), PAB's skip range 2: the
    second call reuses the first's self-attention outputs."""
    x, t, text, _ = call
    outs = []
    with torch.no_grad():
        for name in ("cond", "uncond"):
            with model.cache_context(name):
                kwargs = memory or None
                outs.append(model(x, t, text, attention_kwargs=kwargs, return_dict=False)[0])
    return outs


def test_pyramid_attention_broadcast_refuses_per_branch_memory(call):
    """PAB keeps one attention output per module across calls: memory only in the conditional
    branch would silently be in both. A loud refusal, naming PAB and what to do instead."""
    mem = call[3]
    model = attached()
    _pab(model)
    for negative in (None, MemoryTokens(mem.tokens.flip(1), mem.log_counts)):
        with pytest.raises(ValueError, match="cannot hold under Pyramid Attention Broadcast"):
            _pab_calls(model, call, memory_tokens=mem, negative_memory_tokens=negative)
    # the same memory in both branches is what PAB computes: it runs and its skip path runs
    model, ran = attached_with_pab(), []
    for block in model.blocks:
        block.attn1.to_q.register_forward_pre_hook(lambda m, a: ran.append(1))
    x, t, text, _ = call
    both = {"memory_tokens": mem, "negative_memory_tokens": mem}
    with torch.no_grad(), model.cache_context("cond"):
        cond = model(x, t, text, attention_kwargs=both, return_dict=False)[0]
    computed = len(ran)
    with torch.no_grad(), model.cache_context("uncond"):
        model(x, t, text, attention_kwargs=both, return_dict=False)
    assert computed > 0 and len(ran) == computed  # the second call computed no self-attention
    plain = attached()
    with torch.no_grad():
        expected = plain(call[0], call[1], call[2], attention_kwargs={"memory_tokens": mem})
    assert torch.equal(cond, expected.sample)


def attached_with_pab():
    model = attached()
    _pab(model)
    return model


def test_pyramid_attention_broadcast_without_memory_is_stock(call):
    """No memory given: the attached model under PAB equals the stock model under PAB, bit for
    bit, skipped calls included."""
    stock = tiny_transformer(seed=0)
    _pab(stock)
    assert all(
        torch.equal(a, b)
        for a, b in zip(_pab_calls(attached_with_pab(), call), _pab_calls(stock, call), strict=True)
    )


STEPS = 6


def _cache_config(name: str):
    """Each cache of diffusers.hooks set so that its skip path runs within six steps."""
    import diffusers

    if name == "taylorseer":  # Wan's blocks by name (its default patterns name no Wan module)
        return diffusers.TaylorSeerCacheConfig(
            cache_interval=2,
            disable_cache_before_step=1,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"blocks\.\d+"],
        )
    if name == "magcache":
        return diffusers.MagCacheConfig(
            threshold=10.0, max_skip_steps=2, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS
        )
    if name == "seacache":
        return diffusers.SeaCacheConfig(threshold=10.0, max_consecutive_cached=2)
    return diffusers.FirstBlockCacheConfig(threshold=10.0)


def _guided_loop(model, call, kwargs, steps: int = STEPS):
    """A denoising loop's transformer calls, guidance as two named calls a step (as Wan's and
    HunyuanVideo-1.5's pipelines make them), with the step information SeaCache reads."""
    x, _, text, _ = call
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 - 150 * i])
            for name in ("cond", "uncond"):
                step = {"step_index": i, "sigma": 1.0 - i / steps, "num_inference_steps": steps}
                with model.cache_context(name, **step):
                    out = model(x[:1] + 0.01 * i, t, text[:1], attention_kwargs=kwargs)
                    outs.append(out.sample)
    return outs


@pytest.mark.parametrize("cache", ["firstblock", "taylorseer", "magcache", "seacache"])
def test_caches_skip_keep_per_branch_memory_and_are_stock_without_it(call, cache):
    """Under each cache: the skip path runs (the last block's attention computes in fewer calls
    than were made), the attached model without memory is the stock model under the same cache
    bit for bit, and memory per branch holds (each cache keeps a state per ``cache_context``):
    with ``negative_memory_tokens=None`` the conditional calls are those of memory in both
    branches, bit for bit, and every unconditional call differs."""
    mem = call[3]
    outputs, computed = {}, {}
    for mode, kwargs in (
        ("stock", None),
        ("no memory", None),
        ("both", {"memory_tokens": mem}),
        ("cond only", {"memory_tokens": mem, "negative_memory_tokens": None}),
    ):
        model = tiny_transformer(seed=0) if mode == "stock" else attached()
        model.enable_cache(_cache_config(cache))
        ran = []
        model.blocks[-1].attn1.to_out[0].register_forward_pre_hook(
            lambda m, a, ran=ran: ran.append(1)
        )
        outputs[mode], computed[mode] = _guided_loop(model, call, kwargs), len(ran)
    assert all(n < 2 * STEPS for n in computed.values()), computed
    assert computed["stock"] == computed["no memory"]
    assert all(map(torch.equal, outputs["stock"], outputs["no memory"]))
    both, cond_only = outputs["both"], outputs["cond only"]
    assert all(map(torch.equal, both[0::2], cond_only[0::2]))
    assert all(rel_err(a, b) > 0.05 for a, b in zip(both[1::2], cond_only[1::2], strict=True))
