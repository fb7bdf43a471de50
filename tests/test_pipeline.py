"""The generation pipeline: stock Wan behaviour without memory, memory per CFG branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from dit_mem import attach_memory
from dit_mem.memory import MemoryEncoder
from dit_mem.pipeline import (
    WAN_NEGATIVE_PROMPT,
    DiTMemPipeline,
    make_scheduler,
    set_paper_timesteps,
)
from dit_mem.testing import build_tiny_components

CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def parts():
    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def memory():
    torch.manual_seed(1)
    enc = MemoryEncoder.from_preset("tiny").eval()
    with torch.no_grad():
        return enc(torch.randn(1, 2, 16, 5, 8, 8))


def pipe_of(cls, parts, scheduler):
    return cls(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        transformer=parts["transformer"],
        vae=parts["vae"],
        scheduler=scheduler,
    )


def run(pipe, **kw):
    args = {**CALL, **kw}
    return pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **args)


def test_paper_schedule():
    s = make_scheduler("flow-euler", shift=5.0)
    set_paper_timesteps(s, 4)
    sig = np.linspace(1, 0, 5)[:-1]
    assert torch.allclose(s.sigmas[:-1], torch.tensor(5 * sig / (1 + 4 * sig), dtype=torch.float32))
    assert s.sigmas[-1] == 0
    assert torch.allclose(s.timesteps, 1000 * s.sigmas[:-1])


def test_without_memory_equals_stock_wan_pipeline(parts):
    """UniPC schedules the same way in both, so outputs must be identical."""
    stock = run(
        pipe_of(WanPipeline, parts, make_scheduler("unipc")),
        negative_prompt=WAN_NEGATIVE_PROMPT,
        output_type="np",
    ).frames
    ours_pipe = pipe_of(DiTMemPipeline, parts, make_scheduler("unipc"))
    attach_memory(ours_pipe.transformer)
    try:
        ours = run(ours_pipe, output_type="np", progress=False)
    finally:
        from dit_mem import detach_memory

        detach_memory(ours_pipe.transformer)
    assert np.array_equal(stock, ours)


def test_memory_changes_the_video_and_cond_only_differs(parts, memory):
    pipe = pipe_of(DiTMemPipeline, parts, FlowMatchEulerDiscreteScheduler(shift=5.0))
    attach_memory(pipe.transformer)
    from dit_mem import detach_memory

    try:
        base = run(pipe, output_type="latent", progress=False)
        both = run(pipe, memory=memory, output_type="latent", progress=False)
        cond = run(pipe, memory=memory, memory_mode="cond", output_type="latent", progress=False)
        strong = run(pipe, memory=memory, memory_strength=4.0, output_type="latent", progress=False)
        again = run(pipe, memory=memory, output_type="latent", progress=False)
    finally:
        detach_memory(pipe.transformer)
    assert torch.equal(both, again)  # deterministic
    for other in (base, cond, strong):
        assert not torch.allclose(both, other)


def test_bad_arguments(parts, memory):
    pipe = pipe_of(DiTMemPipeline, parts, FlowMatchEulerDiscreteScheduler(shift=5.0))
    with pytest.raises(ValueError, match="memory_mode must be 'both' or 'cond'"):
        run(pipe, memory=memory, memory_mode="uncond")
    with pytest.raises(ValueError, match="num_frames must be 1 \\+ a multiple of 4"):
        run(pipe, num_frames=6)
