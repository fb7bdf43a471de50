"""Memory in the stock pipelines of every family and Wan task, one import away.

Each flavour (``DiTMemPipeline`` for ``WanPipeline``, ``DiTMemWanImageToVideoPipeline``,
``DiTMemWanVACEPipeline``, ``DiTMemLTXPipeline``, ``DiTMemHunyuanVideo15Pipeline``) must take its
stock pipeline's whole call, be that pipeline bit for bit without memory, give every transformer
call the memory (the same as the stock pipeline with memory attached by hand), keep
``negative_memory=None`` out of the unconditional rows (separate calls, LTX's batched CFG and the
HunyuanVideo-1.5 guider's calls alike), and be picked from ``model_index.json``.
"""

from __future__ import annotations

import inspect
from typing import get_type_hints

import pytest
import torch

from dit_mem import MemoryEncoder, MemoryTokens, attach_memory
from dit_mem.backbone import get_attachment
from dit_mem.pipeline import (
    SAME,
    DiTMemPipeline,
    DiTMemPipelineOutput,
    flavour_of,
)
from dit_mem.testing import (
    build_tiny_model,
    pipeline_class,
    tiny_call,
    tiny_components,
    tiny_pipeline,
)

FLAVOURS = ["wan2.1", "wan-i2v", "wan2.2-ti2v-i2v", "wan-vace", "ltx", "hunyuan15"]
PROMPT = "a red circle moving left"

pytestmark = pytest.mark.usefixtures("one_thread")


def pipes(flavour: str):
    """The stock pipeline and its memory flavour, on the same tiny components."""
    parts = tiny_components(flavour)
    stock_cls = pipeline_class(flavour)
    return [
        tiny_pipeline(flavour, cls=cls, components=parts)
        for cls in (stock_cls, flavour_of(stock_cls.__name__))
    ]


def generate(pipe, flavour: str, **kwargs):
    call = {**tiny_call(flavour), "output_type": "latent", **kwargs}
    call.setdefault("negative_prompt", "blurry")
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call).frames


def memory(seed: int = 1) -> MemoryTokens:
    torch.manual_seed(seed)
    enc = MemoryEncoder.from_preset("tiny").eval()
    with torch.no_grad():
        return enc(torch.randn(1, 2, 16, 5, 8, 8))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_call_signature_is_stock_plus_memory(flavour):
    stock_cls = pipeline_class(flavour)
    stock = inspect.signature(stock_cls.__call__).parameters
    ours = inspect.signature(flavour_of(stock_cls.__name__).__call__).parameters
    assert list(ours)[: len(stock)] == list(stock)
    assert all(ours[n].default == p.default for n, p in stock.items())
    assert list(ours)[len(stock) :] == ["memory", "negative_memory", "memory_scale", "k"]
    assert ours["negative_memory"].default is SAME


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_flavour_is_a_written_subclass_with_the_stock_components(flavour):
    """Each flavour is a ``class`` statement (grep and go-to-definition find it) whose
    ``__init__`` takes the stock's components, same names, order, defaults and types (diffusers
    reads them with ``get_type_hints``), then ``memory_encoder``."""
    stock_cls = pipeline_class(flavour)
    ours_cls = flavour_of(stock_cls.__name__)
    assert inspect.getsource(ours_cls).startswith(f"class {ours_cls.__name__}(")
    stock = inspect.signature(stock_cls.__init__).parameters
    ours = inspect.signature(ours_cls.__init__).parameters
    assert list(ours) == [*stock, "memory_encoder"]
    assert all(ours[n].default == p.default for n, p in stock.items())
    hints = get_type_hints(ours_cls.__init__)
    assert {n: hints[n] for n in get_type_hints(stock_cls.__init__)} == get_type_hints(
        stock_cls.__init__
    )
    assert "memory_encoder" in ours_cls._optional_components
    assert ours_cls.model_cpu_offload_seq.index("memory_encoder") < (
        ours_cls.model_cpu_offload_seq.index("transformer")
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_without_memory_bit_identical_to_stock_and_memory_reaches_every_call(flavour):
    stock, ours = pipes(flavour)
    want = generate(stock, flavour)
    out = ours(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call(flavour))
    assert isinstance(out, DiTMemPipelineOutput) and out.memory is None
    assert torch.equal(generate(ours, flavour), want)
    ours.load_memory(MemoryEncoder.from_preset("tiny"))
    assert torch.equal(generate(ours, flavour), want)  # attached, no memory given

    mem = memory()
    got = generate(ours, flavour, memory=mem)
    attach_memory(stock)  # the stock pipeline, memory by hand in attention_kwargs
    by_hand = generate(stock, flavour, attention_kwargs={"memory_tokens": mem})
    assert torch.equal(got, by_hand)
    assert not torch.equal(got, want)
    assert torch.equal(generate(ours, flavour, memory=mem, memory_scale=0), want)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_negative_memory_none_reaches_only_the_unconditional_rows(flavour):
    _, ours = pipes(flavour)
    ours.load_memory(MemoryEncoder.from_preset("tiny"))
    seen: list[tuple[str, list[bool]]] = []
    hook = ours.transformer._diffusers_hook.get_hook("dit_mem.memory")

    def record(module, args, output):  # after each call: which rows had memory
        call, context = get_attachment(module).memory, hook.contexts._context
        rows = [] if call is None else torch.isfinite(call.bias).any(dim=1).tolist()
        seen.append((context.name, rows))

    ours.transformer.register_forward_hook(record)
    generate(ours, flavour, memory=memory(), negative_memory=None)
    assert seen
    for name, rows in seen:
        if name == "cond_uncond":  # LTX: one call, rows [uncond ; cond]
            assert rows == [False, True], rows
        elif "uncond" in name:
            assert rows == [], name  # no memory at all: the stock model
        else:
            assert rows in ([True], [True, True]) or rows == [True] * len(rows), (name, rows)
    assert any("uncond" in name for name, _ in seen)


@pytest.mark.parametrize("flavour", ["wan-vace", "ltx", "hunyuan15"])
def test_from_pretrained_picks_the_flavour(flavour, tmp_path):
    folder = build_tiny_model(tmp_path / flavour, flavour)
    pipe = DiTMemPipeline.from_pretrained(folder)
    assert type(pipe) is flavour_of(pipeline_class(flavour).__name__)
    assert pipe.memory_encoder is None and "memory_encoder" in pipe._optional_components


def test_ltx_memory_per_prompt_and_per_video_in_batched_guidance():
    _, ours = pipes("ltx")
    ours.load_memory(MemoryEncoder.from_preset("tiny"))
    per_prompt = MemoryTokens.cat([memory(1), memory(2)])
    call = {"num_videos_per_prompt": 2, "negative_prompt": ["blurry", "dark"]}
    prompts = [PROMPT, "a blue square moving up"]

    def run(m):
        return ours(
            prompt=prompts,
            memory=m,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **tiny_call("ltx"),
            **call,
        ).frames

    a, b = run(per_prompt), run(per_prompt.repeat_batch(2))
    assert torch.equal(a, b)  # one per prompt == one per video, prompt-major
    with pytest.raises(ValueError, match="batch 3; expected 1 .* 2 .* or 4"):
        run(MemoryTokens.cat([memory(1)] * 3))


def test_base_models_know_every_flavour():
    """dit_mem.models reads a folder's pipeline without importing dit_mem.pipeline: its table of
    stock pipelines and the flavours agree, name for name."""
    from dit_mem.models.base_model import STOCK_PIPELINES
    from dit_mem.pipeline import FLAVOURS as BY_NAME

    assert set(STOCK_PIPELINES) == set(BY_NAME)
    assert all(BY_NAME[n]._stock.__name__ == stock for n, stock in STOCK_PIPELINES.items())
    assert all(BY_NAME[f.__name__] is f for f in BY_NAME.values())  # a saved flavour's own name
