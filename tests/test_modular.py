"""Memory in Modular Diffusers (dit_mem.modular), against the memory pipelines.

With the same tiny components, seed and memory, each family's modular blocks with the memory
step give the output of the matching memory pipeline flavour: memory in both branches, memory
in the conditional branch only (the branch read from what the guider runs, Wan's modular loop
naming no call), and λ; without memory, the stock modular output bit for bit. Retrieval through
a bank gives the same videos and reports the same hits as ``DiTMemPipeline``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ClassifierFreeGuidance, WanPipeline
from diffusers import modular_pipelines as modular_blocks

from dit_mem import MemoryEncoder, MemoryTokens
from dit_mem.modular import MEMORY_STEP, add_memory, load_memory, unload_memory
from dit_mem.pipeline import DiTMemPipeline, flavour_of
from dit_mem.testing import pipeline_class, run_random_world, tiny_call, tiny_components

pytestmark = pytest.mark.usefixtures("one_thread")

# modular blocks of each family (diffusers 0.42), by tiny flavour
BLOCKS = {
    "wan2.1": "WanBlocks",
    "wan2.2-a14b": "Wan22Blocks",
    "ltx": "LTXAutoBlocks",
    "hunyuan15": "HunyuanVideo15AutoBlocks",
    "wan-i2v": "Wan22Image2VideoBlocks",  # the tiny I2V / VACE have one expert: boundary 0
    "wan-vace": "Wan22VaceBlocks",
}
PROMPT = "a red circle moving left"


def encoder() -> MemoryEncoder:
    torch.manual_seed(1)
    return MemoryEncoder.from_preset("tiny").eval()


def tokens() -> MemoryTokens:
    with torch.no_grad():
        return encoder()(torch.randn(1, 2, 16, 5, 8, 8, generator=torch.Generator().manual_seed(2)))


def modular(flavour: str, parts: dict, memory: bool = True):
    """The family's modular pipeline on ``parts`` (with the memory step when ``memory``)."""
    blocks = getattr(modular_blocks, BLOCKS[flavour])()
    pipe = (add_memory(blocks) if memory else blocks).init_pipeline()
    guiders = {}
    scale = tiny_call(flavour).get("guidance_scale")
    if scale is not None:  # the classic call's guidance_scale is the modular guider's
        names = [n for n in ("guider", "guider_2") if n in pipe._component_specs]
        guiders = {n: ClassifierFreeGuidance(guidance_scale=scale) for n in names}
    one_expert = {}
    if "boundary_ratio" in pipe._config_specs and parts.get("transformer_2") is None:
        one_expert = {"boundary_ratio": 0.0}  # the first expert denoises every step
    pipe.update_components(**{k: v for k, v in parts.items() if v is not None}, **guiders)
    if one_expert:
        pipe.update_components(**one_expert)
    return pipe


def classic(flavour: str, parts: dict):
    """The memory flavour on ``parts``, with the stock text settings (as the modular one)."""
    pipe = flavour_of(pipeline_class(flavour).__name__)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_modular(pipe, flavour: str, **memory):
    call = {k: v for k, v in tiny_call(flavour).items() if k != "guidance_scale"}
    if flavour == "ltx":  # its modular "latents" stay packed: compare the decoded videos
        call |= {"output": "videos", "output_type": "pt"}
    else:
        call |= {"output": "latents"}
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=PROMPT, negative_prompt="blurry", generator=generator, **call, **memory)


def run_classic(pipe, flavour: str, **memory):
    output_type = "pt" if flavour == "ltx" else "latent"
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt=PROMPT,
        negative_prompt="blurry",
        generator=generator,
        output_type=output_type,
        **tiny_call(flavour),
        **memory,
    ).frames


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("flavour", list(BLOCKS))
def test_modular_with_memory_is_the_memory_pipeline(flavour):
    parts = tiny_components(flavour)
    stock_modular = run_modular(modular(flavour, parts, memory=False), flavour)
    pipe = modular(flavour, parts)
    assert list(pipe.blocks.sub_blocks).index(MEMORY_STEP) == (
        list(pipe.blocks.sub_blocks).index("denoise") - 1
    )
    assert torch.equal(run_modular(pipe, flavour), stock_modular)  # the step alone changes nothing
    load_memory(pipe, encoder())
    assert torch.equal(run_modular(pipe, flavour), stock_modular)  # attached, no memory: stock
    ours = classic(flavour, parts)
    ours.load_memory(encoder())
    # LTX's modular loop is the classic one up to float rounding (separate guidance calls, not
    # one batched call): memory keeps the same agreement
    tolerance = 1e-6 if flavour == "ltx" else 0.0
    assert rel(stock_modular, run_classic(ours, flavour)) <= tolerance
    mem = tokens()
    cases = {
        "memory in both branches": {"memory": mem},
        "conditional branch only": {"memory": mem, "negative_memory": "none"},
        "λ 0.5": {"memory": mem, "memory_scale": 0.5},
    }
    seen = []
    for name, memory in cases.items():
        got, want = run_modular(pipe, flavour, **memory), run_classic(ours, flavour, **memory)
        assert rel(got, want) <= tolerance, (name, rel(got, want))
        assert rel(got, stock_modular) > 1e-3, name  # memory is in the output
        seen.append(got)
    assert rel(seen[0], seen[1]) > 1e-3  # the unconditional branch had no memory
    unload_memory(pipe)
    assert torch.equal(run_modular(pipe, flavour), stock_modular)
    assert pipe.memory_encoder is None and pipe.memory_bank is None


def test_retrieval_through_a_modular_pipeline(tmp_path_factory):
    world = tmp_path_factory.mktemp("world")
    run_random_world(world, k=2, steps=2)
    ours = DiTMemPipeline.from_pretrained(world / "model")
    ours.set_progress_bar_config(disable=True)
    ours.load_memory(world / "encoder", bank=world / "bank")
    parts = {k: v for k, v in ours.components.items() if v is not None and k != "memory_encoder"}
    pipe = add_memory(modular_blocks.WanBlocks()).init_pipeline()
    pipe.update_components(**parts, guider=ClassifierFreeGuidance(guidance_scale=5.0))
    load_memory(pipe, world / "encoder", bank=world / "bank")
    prompts = ["a red circle moving right", "a blue square moving left"]
    call = {"height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 2}
    out = pipe(
        prompt=prompts,
        generator=torch.Generator().manual_seed(0),
        memory="retrieve",
        k=3,
        output=["latents", "memory_hits"],
        **call,
    )
    latents, hits = out["latents"], out["memory_hits"]
    want = ours(
        prompt=prompts,
        generator=torch.Generator().manual_seed(0),
        memory="retrieve",
        k=3,
        output_type="latent",
        guidance_scale=5.0,
        **call,
    )
    assert [h.ids for h in hits] == [h.ids for h in want.memory] and len(hits[0].ids) == 3
    assert torch.equal(latents, want.frames)


def test_clear_errors():
    parts = tiny_components("wan2.1")
    with pytest.raises(ValueError, match="SequentialPipelineBlocks"):
        add_memory(WanPipeline)
    with pytest.raises(ValueError, match="memory already"):
        add_memory(add_memory(modular_blocks.WanBlocks()))
    plain = modular_blocks.WanBlocks().init_pipeline()
    with pytest.raises(ValueError, match="no memory step"):
        load_memory(plain, encoder())
    pipe = modular("wan2.1", parts)
    with pytest.raises(ValueError, match="none loaded"):
        run_modular(pipe, "wan2.1", memory=tokens())
    load_memory(pipe, encoder())
    with pytest.raises(ValueError, match="needs a memory bank"):
        run_modular(pipe, "wan2.1", memory="retrieve")
    with pytest.raises(ValueError, match="negative_memory was given without memory"):
        run_modular(pipe, "wan2.1", negative_memory="none")
    with pytest.raises(ValueError, match="negative_memory must be"):
        run_modular(pipe, "wan2.1", memory=tokens(), negative_memory="other")
