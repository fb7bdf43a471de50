"""cache-dit (an optional test dependency) with memory, in either order and on a whole pipeline.

cache-dit swaps a transformer's block list for its own wrapper while forward runs: memory keeps
the blocks it attached to, so ``cache_dit.enable_cache`` before or after ``attach_memory`` gives
the same output. A memory pipeline is cached whole through cache-dit's own adapter of its family
(``cache_dit.enable_cache(pipe)`` picks adapters by class-name prefix, and ``DiTMem...`` is
not one of them): caching skips blocks (its statistics say so), the output without memory is the
stock pipeline's under the same cache bit for bit, and per-branch memory keeps its meaning
(cache-dit caches the two guidance branches apart for Wan and HunyuanVideo-1.5).
"""

from __future__ import annotations

import pytest
import torch

from dit_mem import MemoryEncoder, MemoryTokens, attach_memory
from dit_mem.testing import tiny_call, tiny_components, tiny_pipeline, tiny_transformer

cache_dit = pytest.importorskip(
    "cache_dit", reason="cache-dit is not installed (pip install cache-dit)"
)

pytestmark = pytest.mark.usefixtures("one_thread")


def config():
    """Cache every block after the first from the second step on (a threshold no residual
    change reaches), so the skip path runs."""
    return cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=10.0, max_warmup_steps=1
    )


def memory(seed: int = 1) -> MemoryTokens:
    torch.manual_seed(seed)
    with torch.no_grad():
        return MemoryEncoder.from_preset("tiny").eval()(torch.randn(1, 2, 16, 5, 8, 8))


def test_either_order_on_a_transformer_runs_the_skip_path_and_agrees():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([500.0, 730.0])
    text, mem = torch.randn(2, 7, 32, generator=g), memory()
    outputs, skipped = {}, {}
    for order in ("attach, then cache", "cache, then attach", "no memory", "stock"):
        model = tiny_transformer(seed=0)
        if order == "attach, then cache":
            attach_memory(model)
        cache_dit.enable_cache(model, cache_config=config())
        if order in ("cache, then attach", "no memory"):
            attach_memory(model)
        ran = []
        model.blocks[-1].ffn.register_forward_pre_hook(lambda m, a, ran=ran: ran.append(1))
        kwargs = {"memory_tokens": mem} if order.startswith(("attach", "cache")) else None
        with torch.no_grad():
            outputs[order] = [
                model(x, t, text, attention_kwargs=kwargs, return_dict=False)[0] for _ in range(3)
            ]
        skipped[order] = 3 - len(ran)
    assert all(n >= 1 for n in skipped.values()), skipped  # the last block was skipped
    first, second = outputs["attach, then cache"], outputs["cache, then attach"]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(outputs["no memory"], outputs["stock"], strict=True)
    )
    assert not torch.allclose(first[0], outputs["no memory"][0])  # memory is in the output


ADAPTERS = {"wan2.1": "wan_adapter", "ltx": "ltxvideo_adapter", "hunyuan15": "hunyuanvideo_adapter"}


@pytest.mark.parametrize("flavour", list(ADAPTERS))
def test_a_memory_pipeline_cached_whole_with_its_family_adapter(flavour):
    from cache_dit.caching.block_adapters import adapters

    from dit_mem.pipeline import flavour_of
    from dit_mem.testing import pipeline_class

    parts = tiny_components(flavour)
    stock_cls = pipeline_class(flavour)
    stock = tiny_pipeline(flavour, cls=stock_cls, components=parts)
    ours = tiny_pipeline(flavour, cls=flavour_of(stock_cls.__name__), components=parts)
    attach_memory(ours)
    for pipe in (stock, ours):
        cache_dit.enable_cache(getattr(adapters, ADAPTERS[flavour])(pipe), cache_config=config())

    def run(pipe, **kwargs):
        call = {**tiny_call(flavour), "num_inference_steps": 4, "output_type": "latent"}
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt="a red circle", generator=generator, **call, **kwargs).frames

    assert torch.equal(run(ours), run(stock))  # no memory: the stock pipeline under the cache
    stats = cache_dit.summary(ours)  # per cached transformer and block list
    assert stats and all(s.cached_steps == [1, 2, 3] for s in stats)
    mem = memory()
    both, none = run(ours, memory=mem), run(ours)
    assert not torch.allclose(both, none)
    if flavour != "ltx":  # guidance as two calls, cached apart: per-branch memory holds
        assert all(s.cfg_cached_steps == [1, 2, 3] for s in stats)
        assert not torch.allclose(both, run(ours, memory=mem, negative_memory=None))
