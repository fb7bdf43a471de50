"""Memory in every DiT family: Wan, LTX-Video and HunyuanVideo-1.5, each against its dense form.

The reference is the family's dense form (``Injection.dense_block`` through
``dit_mem.backbone.reference.PaperFormMemory``): the memory tokens appended after the block's own
pre-attention modulation, as queries and keys, no RoPE, outputs sliced off. The fast path must
equal it (rel. err ≤ 1e-5 in fp32, gradients to the memory tokens included), be the stock model
bit for bit without memory, and survive the runtime features diffusers users combine it with.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import types

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from dit_mem import attach_memory, detach_memory
from dit_mem.backbone import family_of, get_attachment
from dit_mem.backbone.reference import PaperFormMemory
from dit_mem.memory import MemoryTokens
from dit_mem.testing import tiny_inputs, tiny_transformer

FAMILIES = ["wan", "ltx", "hunyuan15"]
ROUTES = {
    "wan": ["auto", "lse", "joint"],
    "ltx": ["auto", "lse", "joint"],
    "hunyuan15": ["auto", "lse", "joint"],  # lse: the masked kernel, inference only
}

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def memory(batch: int = 1, seed: int = 3, tokens: torch.Tensor | None = None) -> MemoryTokens:
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([100.0, 100.0, 50.0, 50.0, 1.0, 3.0])
    if tokens is None:
        tokens = torch.randn(batch, 6, 32, generator=g)
    return MemoryTokens(tokens, counts.log().expand(tokens.shape[0], -1).clone())


def run(model, inputs, **attention_kwargs) -> torch.Tensor:
    return model(**inputs, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


def dense_reference(model):
    ref = copy.deepcopy(model)
    detach_memory(ref)
    PaperFormMemory(ref)
    return ref


def attached(family: str, **kw):
    model = tiny_transformer(family, seed=0)
    attach_memory(model, **kw)
    return model


def test_every_family_is_picked_from_the_model_class():
    assert [family_of(tiny_transformer(f)).name for f in FAMILIES] == FAMILIES
    with pytest.raises(ValueError, match="LTXVideoTransformer3DModel / HunyuanVideo15"):
        attach_memory(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------
# The stock model without memory, exactness with it
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_without_memory_and_after_detach_bit_for_bit_stock(family):
    model, inputs = tiny_transformer(family), tiny_inputs(family)
    stock_processors = [
        family_of(model).injection.attention(b).processor
        for b in family_of(model).injection.blocks(model)
    ]
    with torch.no_grad():
        stock = run(model, inputs)
        attach_memory(model)
        assert torch.equal(run(model, inputs), stock)
        assert torch.equal(run(model, inputs, memory_tokens=None), stock)
        assert torch.equal(run(model, inputs, memory_tokens=memory(), memory_strength=0), stock)
        detach_memory(model)
        assert torch.equal(run(model, inputs), stock)
    f = family_of(model)
    assert [
        f.injection.attention(b).processor for b in f.injection.blocks(model)
    ] == stock_processors
    assert "forward" not in vars(model) and all(
        "forward" not in vars(b) for b in f.injection.blocks(model)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_dense_form_on_every_route(family):
    model, inputs = tiny_transformer(family), tiny_inputs(family)
    mem = memory()
    with torch.no_grad():
        expected = run(dense_reference(model), inputs, memory_tokens=mem)
        stock = run(model, inputs)
        for route in ROUTES[family]:
            attach_memory(model, route=route)
            got = run(model, inputs, memory_tokens=mem)
            assert rel_err(got, expected) <= 1e-5, route
        assert rel_err(got, stock) > 1e-3  # memory changes the output
        doubled = run(dense_reference(model), inputs, memory_tokens=mem, memory_strength=2)
        assert rel_err(run(model, inputs, memory_tokens=mem, memory_strength=2.0), doubled) <= 1e-5
        per_row = MemoryTokens.cat([memory(seed=3), memory(seed=4)])  # one memory per row
        assert (
            rel_err(
                run(model, inputs, memory_tokens=per_row),
                run(dense_reference(model), inputs, memory_tokens=per_row),
            )
            <= 1e-5
        )


def test_hunyuan_masked_lse_route_is_inference_on_native_only(monkeypatch):
    """Its text padding mask: the lse route runs the masked kernel with its log-sum-exp (the
    padded queries see no memory, as in the dense form), without gradients, on ``native``."""
    model, inputs = attached("hunyuan15", route="lse"), tiny_inputs("hunyuan15")
    assert not bool(inputs["encoder_attention_mask_2"].all())  # padded text in the batch
    tokens = memory().tokens.requires_grad_(True)
    with pytest.raises(ValueError, match="not available here: a masked attention with gradients"):
        run(model, inputs, memory_tokens=MemoryTokens(tokens, memory().log_counts))
    monkeypatch.setattr(  # set_attention_backend also sets the active one
        _AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend
    )
    model.set_attention_backend("_native_math")
    with torch.no_grad(), pytest.raises(ValueError, match="a masked attention on '_native_math'"):
        run(model, inputs, memory_tokens=memory())


def test_hunyuan_auto_route_runs_no_padded_head_dim_without_gradients(monkeypatch):
    """``auto`` takes the lse route for inference: no joint attention (its padded head dim cost
    HunyuanVideo-1.5 5% of a step's FLOPs, benchmarks/full_size.py); joint with gradients."""
    from dit_mem.backbone import attention

    joint = []
    real = attention._joint_attention
    monkeypatch.setattr(
        attention, "_joint_attention", lambda *a, **k: joint.append(1) or real(*a, **k)
    )
    model, inputs = attached("hunyuan15"), tiny_inputs("hunyuan15")
    with torch.no_grad():
        run(model, inputs, memory_tokens=memory())
    assert joint == []
    tokens = memory().tokens.requires_grad_(True)
    run(model, inputs, memory_tokens=MemoryTokens(tokens, memory().log_counts)).sum().backward()
    assert len(joint) == 2 and tokens.grad.abs().sum() > 0  # one per block


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_to_memory_tokens_equal_dense_form(family, checkpointing):
    model = tiny_transformer(family).requires_grad_(False)
    inputs = tiny_inputs(family)
    ref = dense_reference(model)
    attach_memory(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
        ref.enable_gradient_checkpointing()
    tokens = memory().tokens

    def grads(m, dense: bool):
        leaf = tokens.clone().requires_grad_()
        mem = memory(tokens=leaf)
        out = run(m, inputs, memory_tokens=mem.dense() if dense else mem)
        (out.square().mean()).backward()
        return out.detach(), leaf.grad

    out, grad = grads(model, dense=False)
    ref_out, ref_grad = grads(ref, dense=True)
    assert rel_err(out, ref_out) <= 1e-5
    assert grad.abs().sum() > 0 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_per_token_timesteps_give_memory_the_noisiest_modulation(family):
    """Conditioning frames at t = 0 (Wan2.2 TI2V, LTX conditioning): memory takes the noisy t."""
    model, inputs = tiny_transformer(family), tiny_inputs(family)
    tokens = 3 * 4 * 4 if family == "wan" else 2 * 4 * 4
    per_token = inputs["timestep"][:, None].expand(-1, tokens).clone()
    per_token[:, :16] = 0.0
    mem = memory()
    with torch.no_grad():
        expected = run(dense_reference(model), {**inputs, "timestep": per_token}, memory_tokens=mem)
        attach_memory(model)
        got = run(model, {**inputs, "timestep": per_token}, memory_tokens=mem)
    assert rel_err(got, expected) <= 1e-5


# --------------------------------------------------------------------------------------
# Classifier-free guidance: per-branch memory, separate or batched calls
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "context", "order"),
    [
        ("ltx", "cond_uncond", ("uncond", "cond")),
        ("hunyuan15", "pred_cond_uncond", ("cond", "uncond")),
    ],
)
def test_batched_guidance_rows_get_their_branch_memory(family, context, order):
    """One call holding both branches: LTXPipeline's [uncond ; cond] under "cond_uncond"; a
    diffusers guider that stacks its conditions, [cond ; uncond]."""
    model, inputs = attached(family), tiny_inputs(family, batch=4)
    mem, other = memory(seed=3), memory(seed=4)
    rows_of = {"cond": [mem, mem], "uncond": [other, other]}
    with torch.no_grad():
        with model.cache_context(context):
            got = run(model, inputs, memory_tokens=mem, negative_memory_tokens=other)
            none = run(model, inputs, memory_tokens=mem, negative_memory_tokens=None)
            same = run(model, inputs, memory_tokens=mem)
        rows = MemoryTokens.cat([m for branch in order for m in rows_of[branch]])
        assert rel_err(got, run(model, inputs, memory_tokens=rows)) <= 1e-5
        stock, with_memory = run(model, inputs), run(model, inputs, memory_tokens=mem)
        uncond = slice(0, 2) if order[0] == "uncond" else slice(2, 4)
        cond = slice(2, 4) if order[0] == "uncond" else slice(0, 2)
        assert rel_err(none[uncond], stock[uncond]) <= 1e-6  # uncond rows: no memory
        assert rel_err(none[cond], with_memory[cond]) <= 1e-5
        assert rel_err(same, with_memory) <= 1e-6
        with model.cache_context("uncond"):
            alone = run(model, inputs, memory_tokens=mem, negative_memory_tokens=None)
        assert torch.equal(alone, stock)
    with pytest.raises(ValueError, match="needs to know which classifier-free guidance branch"):
        run(model, inputs, memory_tokens=mem, negative_memory_tokens=other)  # no context


# --------------------------------------------------------------------------------------
# Runtime features
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def want():
    """Per family: the plainly attached model's output with memory, and without."""
    out = {}
    with torch.no_grad():
        for family in FAMILIES:
            model, inputs = attached(family), tiny_inputs(family)
            out[family] = (run(model, inputs, memory_tokens=memory()), run(model, inputs))
    return out


@pytest.mark.parametrize("level", ["block_level", "leaf_level"])
@pytest.mark.parametrize("family", FAMILIES)
def test_group_offloading(family, level, want):
    model, inputs = attached(family), tiny_inputs(family)
    kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
    cpu = torch.device("cpu")
    model.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=level, **kwargs)
    with torch.no_grad():
        assert torch.equal(run(model, inputs, memory_tokens=memory()), want[family][0])
        assert torch.equal(run(model, inputs), want[family][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_accelerate_sequential_cpu_offload(family, want):
    from accelerate import cpu_offload

    model, inputs = attached(family), tiny_inputs(family)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "meta"  # weights arrive per module call
    with torch.no_grad():
        assert torch.equal(run(model, inputs, memory_tokens=memory()), want[family][0])


@pytest.mark.parametrize("family", ["wan", "ltx"])  # HunyuanVideo-1.5's forward is not one graph
def test_torch_compile_fullgraph(family, want):
    model, inputs = attached(family), tiny_inputs(family)
    torch._dynamo.reset()  # other tests compiled the same code objects for other models
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(run(compiled, inputs, memory_tokens=memory()), want[family][0]) <= 1e-6
        assert rel_err(run(compiled, inputs), want[family][1]) <= 1e-6
        for scale in (2.0,):  # a new λ recompiles or reuses the graph, never breaks it
            got = run(compiled, inputs, memory_tokens=memory(), memory_strength=scale)
            ref = run(model, inputs, memory_tokens=memory(), memory_strength=scale)
            assert rel_err(got, ref) <= 1e-6
        assert rel_err(ref, want[family][0]) > 1e-3  # λ mattered


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_repeated_blocks(family, want):
    model, inputs = attached(family), tiny_inputs(family)
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(run(model, inputs, memory_tokens=memory()), want[family][0]) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_pickle_torch_save_and_deepcopy(family, want):
    model, inputs = attached(family), tiny_inputs(family)
    with torch.no_grad():
        run(model, inputs, memory_tokens=memory())  # per-call state present: it must not be saved
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {
        "pickle": pickle.loads(pickle.dumps(model)),
        "deepcopy": copy.deepcopy(model),
        "torch.save": torch.load(buffer, weights_only=False),
    }
    for name, other in copies.items():
        assert get_attachment(other) is not get_attachment(model), name
        with torch.no_grad():
            assert torch.equal(run(other, inputs, memory_tokens=memory()), want[family][0]), name
        detach_memory(other)
        with torch.no_grad():
            assert torch.equal(run(other, inputs), want[family][1]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_processor_is_an_error_until_attached_again(family, want):
    model, inputs = attached(family), tiny_inputs(family)
    f = family_of(model)
    for block in f.injection.blocks(
        model
    ):  # (set_attn_processor reaches every attention; these suffice)
        f.injection.attention(block).set_processor(f.injection.stock_processors[0]())
    with pytest.raises(ValueError, match="set_attn_processor.*attach_memory"):
        run(model, inputs, memory_tokens=memory())
    attach_memory(model)
    with torch.no_grad():
        assert torch.equal(run(model, inputs, memory_tokens=memory()), want[family][0])


@pytest.mark.parametrize(
    ("family", "backend"), [*((f, "_native_math") for f in FAMILIES), ("wan", "flex")]
)
def test_the_chosen_backend_computes_the_memory_attention(family, backend, want, monkeypatch):
    """No log-sum-exp from these backends: memory goes the joint route, through dispatch."""
    name = AttentionBackendName(backend)
    original = _AttentionBackendRegistry._backends[name]
    calls = []

    @functools.wraps(original)
    def counting(*args, **kwargs):
        calls.append(tuple(kwargs["key"].shape))
        return original(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counting)
    # set_attention_backend also makes the backend the process-wide default; undo that after
    monkeypatch.setattr(
        _AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend
    )
    model, inputs = attached(family), tiny_inputs(family)
    model.set_attention_backend(backend)
    with torch.no_grad():
        got = run(model, inputs, memory_tokens=memory())
    # keys [video (+ text) ; 6 memory]: 48 + 6 (Wan), 32 + 6 (LTX), 32 + 13 + 6 (HunyuanVideo-1.5)
    keys = {"wan": 54, "ltx": 38, "hunyuan15": 51}[family]
    memory_calls = [s for s in calls if s[1] == keys]
    assert len(memory_calls) == 2  # one per block
    assert rel_err(got, want[family][0]) <= 1e-5


def test_hunyuan_context_parallelism_is_a_clear_error():
    model, inputs = attached("hunyuan15"), tiny_inputs("hunyuan15")
    for processor in model.attn_processors.values():
        processor._parallel_config = types.SimpleNamespace(context_parallel_config=object())
    with pytest.raises(NotImplementedError, match="context parallelism is not supported for Hunyu"):
        run(model, inputs, memory_tokens=memory())


@pytest.mark.parametrize(("storage", "tol"), [(torch.float16, 2e-3)])
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_casting(family, storage, tol, want):
    model, inputs = attached(family), tiny_inputs(family)
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    with torch.no_grad():
        got = run(model, inputs, memory_tokens=memory())
    assert rel_err(got, want[family][0]) <= tol


@pytest.mark.parametrize("family", FAMILIES)
def test_pyramid_attention_broadcast_per_branch_memory_by_family(family):
    """PAB reuses an attention output across calls: per-branch memory in separate guidance
    calls (Wan, HunyuanVideo-1.5; LTX-Video's modular loop) is refused by name; memory in both
    branches runs, and a second call within PAB's range reuses the first's attention."""
    from diffusers import PyramidAttentionBroadcastConfig

    model = attached(family)
    model.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=lambda: 500,
        )
    )
    inputs, mem = tiny_inputs(family, batch=1), memory()
    refused = pytest.raises(ValueError, match="cannot hold under Pyramid Attention Broadcast")
    with torch.no_grad(), model.cache_context("cond"), refused:
        run(model, inputs, memory_tokens=mem, negative_memory_tokens=None)
    fam, ran = family_of(model), []
    for block in fam.injection.blocks(model):
        fam.injection.attention(block).to_out[0].register_forward_pre_hook(
            lambda m, a: ran.append(1)
        )
    with torch.no_grad(), model.cache_context("cond"):
        run(model, inputs, memory_tokens=mem)
    computed = len(ran)
    with torch.no_grad(), model.cache_context("uncond"):
        run(model, inputs, memory_tokens=mem)
    assert (
        computed == len(fam.injection.blocks(model)) and len(ran) == computed
    )  # the second: broadcast
