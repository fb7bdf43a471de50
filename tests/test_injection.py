"""Memory injection into a stock diffusers Wan transformer (SPEC §4).

The reference is the paper's dense form (``dit_mem.backbone.reference``): the 1,000 memory tokens
concatenated to the video tokens as extra queries *and* keys inside every block's self-attention
(RoPE on video tokens only), their outputs sliced off. The runtime features diffusers users
combine memory with (offloading, context parallelism, backends, compile, ...) are in
``test_runtime_features.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from dit_mem import attach_memory, detach_memory
from dit_mem.backbone import get_attachment, memory_attention
from dit_mem.backbone.reference import PaperFormMemory
from dit_mem.memory import MemoryEncoder, MemoryTokens
from dit_mem.testing import tiny_pipeline, tiny_transformer

DIM = 32  # 2 heads × 16


# --------------------------------------------------------------------------------------
# The paper's dense form (dit_mem.backbone.reference), on a copy of the model
# --------------------------------------------------------------------------------------
def dense_reference(transformer):
    """A copy of ``transformer`` that takes memory the paper's way (dense tokens as queries and
    keys, ``attention_kwargs`` as the fast path)."""
    ref = copy.deepcopy(transformer)
    detach_memory(ref)
    PaperFormMemory(ref)
    return ref


def is_memory_attached(model) -> bool:
    return get_attachment(model) is not None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
def tiny_encoder(latent_shape=(4, 8, 8)) -> MemoryEncoder:
    torch.manual_seed(1)
    enc = MemoryEncoder.from_preset(
        "wan2.1-1.3b",
        conv_channels=(8, 16),
        kernel_sizes=(3, 3),
        strides=(1, 1),
        dim=DIM,
        num_heads=2,
        latent_shape=latent_shape,
    )
    return enc.eval()


def inputs(batch: int = 2, frames: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, 8, 8, generator=g)
    t = torch.tensor([500.0, 730.0][:batch])
    text = torch.randn(batch, 7, 32, generator=g)
    return x, t, text


def random_memory(batch: int = 1, seed: int = 3) -> MemoryTokens:
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([100.0, 100.0, 50.0, 50.0, 1.0, 3.0])
    return MemoryTokens(
        torch.randn(batch, 6, DIM, generator=g), counts.log().expand(batch, -1).clone()
    )


def run(model, x, t, text, **attention_kwargs):
    return model(x, t, text, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


# --------------------------------------------------------------------------------------
# No memory: bit-for-bit the stock model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_token", [False, True])
def test_attached_without_memory_and_detached_are_bit_exact(per_token):
    model = tiny_transformer()
    x, t, text = inputs()
    if per_token:  # Wan2.2 TI2V-style timesteps [B, S]
        t = t[:, None].expand(-1, 3 * 4 * 4).clone()
        t[:, :16] = 0.0
    stock_processors = [b.attn1.processor for b in model.blocks]
    with torch.no_grad():
        stock = run(model, x, t, text)
        attach_memory(model)
        assert is_memory_attached(model)
        for kwargs in ({}, {"memory_tokens": None}, {"scale": 1.0}):
            assert torch.equal(run(model, x, t, text, **kwargs), stock)
        detach_memory(model)
        assert torch.equal(run(model, x, t, text), stock)
    assert not is_memory_attached(model)
    assert [b.attn1.processor for b in model.blocks] == stock_processors
    hooks = [model._forward_pre_hooks, model._forward_hooks, model.rope._forward_hooks]
    hooks += [b._forward_pre_hooks for b in model.blocks]
    assert all(len(h) == 0 for h in hooks)
    registries = [getattr(m, "_diffusers_hook", None) for m in [model, *model.blocks]]
    assert all(r is None or not r.hooks for r in registries)  # diffusers' registry: no hook left
    assert "forward" not in vars(model)
    assert all("forward" not in vars(b) for b in model.blocks)


def test_no_memory_with_gradient_checkpointing_is_bit_exact():
    model = tiny_transformer()
    x, t, text = inputs()
    stock = run(model, x, t, text)
    attach_memory(model)
    model.enable_gradient_checkpointing()
    assert torch.equal(run(model, x, t, text), stock)


# --------------------------------------------------------------------------------------
# Exactness against the dense form
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["auto", "lse", "joint"])
@pytest.mark.parametrize("latent_shape", [(4, 8, 8), (8, 8, 8)])  # grid T' = 1 and T' = 2
def test_equals_dense_form_inference(route, latent_shape):
    model = tiny_transformer()
    enc = tiny_encoder(latent_shape)
    x, t, text = inputs()
    with torch.no_grad():
        memory = enc(torch.randn(1, 5, 16, *latent_shape))
        dense = memory.dense()
        assert dense.shape[1] == 1000
        expected = run(dense_reference(model), x, t, text, memory_tokens=dense)
        attach_memory(model, route=route)
        got = run(model, x, t, text, memory_tokens=memory)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, run(model, x, t, text)) > 1e-3  # memory changes the output


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("route", ["auto", "lse", "joint"])  # auto: lse (merge with a backward)
def test_training_equals_dense_form_and_grads_reach_encoder(route, checkpointing):
    model = tiny_transformer().requires_grad_(False)
    enc = tiny_encoder()
    x, t, text = inputs()
    latents = torch.randn(1, 5, 16, 4, 8, 8)
    ref = dense_reference(model)
    attach_memory(model, route=route)
    if checkpointing:
        model.enable_gradient_checkpointing()
        ref.enable_gradient_checkpointing()

    def encoder_grads(forward):
        enc.zero_grad()
        out = forward()
        (out.square().mean()).backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    def ours():
        return run(model, x, t, text, memory_tokens=enc(latents, shuffle=False))

    def paper():
        return run(ref, x, t, text, memory_tokens=enc(latents, shuffle=False).dense())

    out, grads = encoder_grads(ours)
    ref_out, ref_grads = encoder_grads(paper)
    assert rel_err(out, ref_out) <= 1e-5
    assert len(grads) == len(ref_grads) == len(list(enc.parameters()))
    for g, rg in zip(grads, ref_grads, strict=True):
        assert g.abs().sum() > 0
        assert rel_err(g, rg) <= 1e-4


def test_strength_is_log_lambda_on_memory_logits():
    model = tiny_transformer()
    memory = random_memory()
    x, t, text = inputs()
    with torch.no_grad():
        expected = run(dense_reference(model), x, t, text, memory_tokens=memory, memory_strength=2)
        attach_memory(model)
        got = run(model, x, t, text, memory_tokens=memory, memory_strength=2.0)
        # λ = 2 is also every multiplicity doubled
        doubled = MemoryTokens(memory.tokens, memory.log_counts + math.log(2.0))
        got_doubled = run(model, x, t, text, memory_tokens=doubled)
        plain = run(model, x, t, text, memory_tokens=memory)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got_doubled, got) <= 1e-5
    assert rel_err(plain, got) > 1e-4


def test_cond_only_memory_in_our_cfg_loop():
    """Our pipeline gives memory to the cond call only: uncond stays the stock model."""
    model = tiny_transformer()
    memory = random_memory()
    x, t, cond_text = inputs()
    uncond_text = torch.randn_like(cond_text)
    with torch.no_grad():
        stock_uncond = run(model, x, t, uncond_text)
        expected_cond = run(dense_reference(model), x, t, cond_text, memory_tokens=memory.dense())
        attach_memory(model)
        cond = run(model, x, t, cond_text, memory_tokens=memory, memory_strength=1.0)
        uncond = run(model, x, t, uncond_text, memory_tokens=None)
    assert torch.equal(uncond, stock_uncond)
    assert rel_err(cond, expected_cond) <= 1e-5


def test_memory_batch_one_broadcasts_and_per_sample_memory():
    model = tiny_transformer()
    attach_memory(model)
    x, t, text = inputs()
    m1 = random_memory(seed=3)
    m2 = random_memory(seed=4)
    with torch.no_grad():
        shared = run(model, x, t, text, memory_tokens=m1)
        repeated = run(model, x, t, text, memory_tokens=m1.repeat_batch(2))
        both = run(model, x, t, text, memory_tokens=MemoryTokens.cat([m1, m2]))
        second = run(model, x[1:], t[1:], text[1:], memory_tokens=m2)
    assert torch.allclose(shared, repeated, atol=1e-6)
    assert torch.allclose(both[:1], shared[:1], atol=1e-6)
    assert torch.allclose(both[1:], second, atol=1e-5)


def test_bf16_memory_logits_keep_log_counts():
    """bf16 model: the memory bias is not rounded to bf16 (log 100 = 4.6052, bf16 4.5938)."""
    model = tiny_transformer().to(torch.bfloat16)
    memory = random_memory()
    x, t, text = inputs()
    x, text = x.bfloat16(), text.bfloat16()
    with torch.no_grad():
        attach_memory(model, route="lse")
        lse = run(model, x, t, text, memory_tokens=memory)
        attach_memory(model, route="joint")
        joint = run(model, x, t, text, memory_tokens=memory)
    assert lse.dtype == torch.bfloat16
    assert rel_err(joint.float(), lse.float()) < 2e-2


# --------------------------------------------------------------------------------------
# Wan2.2 shapes
# --------------------------------------------------------------------------------------
def test_ti2v_per_token_timesteps_use_the_noisy_modulation():
    model = tiny_transformer()
    memory = random_memory()
    x, t, text = inputs()
    s = 3 * 4 * 4
    per_token = t[:, None].expand(-1, s).clone()
    per_token[:, :16] = 0.0  # first latent frame: clean conditioning (t = 0)
    with torch.no_grad():  # the reference finds the noisiest token itself (16: after the first)
        expected = run(dense_reference(model), x, per_token, text, memory_tokens=memory.dense())
        attach_memory(model)
        got = run(model, x, per_token, text, memory_tokens=memory)
        # all tokens at the same t: same as the plain (Wan2.1-style) timestep
        flat = run(model, x, t[:, None].expand(-1, s), text, memory_tokens=memory)
        plain = run(model, x, t, text, memory_tokens=memory)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(flat, plain) <= 1e-5


def _pipeline_latents(pipe, **kwargs):
    out = pipe(
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kwargs,
    )
    return out.frames


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2-ti2v", "wan2.2-a14b"])
def test_stock_wan_pipeline_carries_memory(family):
    pipe = tiny_pipeline(family)
    memory = random_memory()
    pipe.set_progress_bar_config(disable=True)
    experts = [n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]
    stock = _pipeline_latents(pipe, prompt="a red fox jumps", negative_prompt="blurry")
    with torch.no_grad():  # the same text embeddings, computed once
        cond, uncond = pipe.encode_prompt("a red fox jumps", "blurry", max_sequence_length=512)
    prompts = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    assert torch.equal(_pipeline_latents(pipe, **prompts), stock)

    # the paper's dense form in every expert, through the same stock pipeline
    originals = {n: getattr(pipe, n) for n in experts}
    for n in experts:
        setattr(pipe, n, dense_reference(originals[n]))
    expected = _pipeline_latents(
        pipe, **prompts, attention_kwargs={"memory_tokens": memory.dense()}
    )
    for n in experts:
        setattr(pipe, n, originals[n])

    assert attach_memory(pipe) == [getattr(pipe, n) for n in experts]
    calls = {n: 0 for n in experts}  # every expert runs, with memory (cond and uncond)
    for n in experts:

        def count(module, args, kwargs, name=n):
            calls[name] += "memory_tokens" in (kwargs.get("attention_kwargs") or {})

        getattr(pipe, n).register_forward_pre_hook(count, with_kwargs=True, prepend=True)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _pipeline_latents(pipe, **prompts, attention_kwargs={"memory_tokens": memory})
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    assert all(c >= 2 for c in calls.values()), calls
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, stock) > 1e-4

    detach_memory(pipe)
    assert torch.equal(_pipeline_latents(pipe, **prompts), stock)


def test_pipeline_model_cpu_offload():
    pipe = tiny_pipeline()
    attach_memory(pipe)
    prompts = {"prompt": "a red fox", "negative_prompt": "blurry"}
    expected = _pipeline_latents(
        pipe, **prompts, attention_kwargs={"memory_tokens": random_memory()}
    )
    pipe.enable_model_cpu_offload(device="cpu")
    got = _pipeline_latents(pipe, **prompts, attention_kwargs={"memory_tokens": random_memory()})
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------
# The attention function and input checks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_attention_backends_agree_with_float64(dtype):
    g = torch.Generator().manual_seed(0)
    b, s, gm, h, d = 2, 37, 5, 3, 16
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    mk, mv = (torch.randn(b, gm, h, d, generator=g) for _ in range(2))
    bias = torch.log(torch.tensor([100.0, 100.0, 1.0, 7.0, 50.0])).expand(b, -1)
    keys = torch.cat([k, mk], dim=1).double()
    logits = torch.einsum("bshd,bthd->bhst", q.double(), keys) / math.sqrt(d)
    logits[..., s:] += bias.double()[:, None, None, :]
    ref = torch.einsum("bhst,bthd->bshd", logits.softmax(-1), torch.cat([v, mv], 1).double())
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    outs = {}
    for route in ("lse", "joint", "auto"):
        outs[route] = memory_attention(*(t.to(dtype) for t in (q, k, v, mk, mv)), bias, route=route)
        assert outs[route].dtype == dtype
        assert rel_err(outs[route].double(), ref) <= tol
    assert rel_err(outs["lse"].double(), outs["joint"].double()) <= tol


@pytest.mark.parametrize("route", ["lse", "joint"])
def test_memory_attention_gradients_agree_with_float64(route):
    """Every input's gradient, both routes: the lse route's backward is the kernel's backward with
    the merged output and log-sum-exp plus the memory part; joint is autograd through SDPA."""
    g = torch.Generator().manual_seed(1)
    b, s, gm, h, d = 2, 29, 4, 2, 16
    leaves = [torch.randn(b, s, h, d, generator=g) for _ in range(3)]
    leaves += [torch.randn(b, gm, h, d, generator=g) for _ in range(2)]
    leaves.append(torch.log(torch.tensor([100.0, 1.0, 7.0, 50.0])).expand(b, -1).clone())
    upstream = torch.randn(b, s, h, d, generator=g)

    def reference(q, k, v, mk, mv, bias):
        logits = torch.einsum("bshd,bthd->bhst", q, torch.cat([k, mk], 1)) / math.sqrt(d)
        logits = torch.cat([logits[..., :s], logits[..., s:] + bias[:, None, None, :]], -1)
        return torch.einsum("bhst,bthd->bshd", logits.softmax(-1), torch.cat([v, mv], 1))

    ref_in = [t.double().requires_grad_() for t in leaves]
    ref_grads = torch.autograd.grad(reference(*ref_in), ref_in, upstream.double())
    ours_in = [t.clone().requires_grad_() for t in leaves]
    out = memory_attention(*ours_in, route=route)
    grads = torch.autograd.grad(out, ours_in, upstream)
    assert rel_err(out.double(), reference(*ref_in).detach()) <= 1e-6
    for name, got, want in zip(("q", "k", "v", "mk", "mv", "bias"), grads, ref_grads, strict=True):
        assert rel_err(got.double(), want) <= 1e-5, name


def test_lse_route_says_where_it_is_unavailable():
    from diffusers.models.attention_dispatch import attention_backend

    q = torch.randn(1, 4, 2, 8)
    mk = torch.randn(1, 3, 2, 8)
    bias = torch.zeros(1, 3)
    with attention_backend("_native_math"), pytest.raises(ValueError, match="no log-sum-exp"):
        memory_attention(q, q, q, mk, mk, bias, route="lse")
    with attention_backend("_native_math"):  # auto falls back to joint
        auto = memory_attention(q, q, q, mk, mk, bias)
    assert rel_err(auto, memory_attention(q, q, q, mk, mk, bias, route="lse")) <= 1e-6


def test_bad_inputs_raise_clear_errors():
    model = tiny_transformer()
    attach_memory(model)
    x, t, text = inputs()
    cases = [
        (MemoryTokens(torch.randn(1, 4, 8), torch.zeros(1, 4)), "hidden size is 32"),
        (torch.randn(4, DIM), r"\[B, L, D\]"),
        (random_memory(batch=3), "batch 3"),
        ("memory", "must be a MemoryTokens"),
        (MemoryTokens(torch.randn(1, 0, DIM), torch.zeros(1, 0)), "empty"),
    ]
    for memory, match in cases:
        with pytest.raises(ValueError, match=match):
            run(model, x, t, text, memory_tokens=memory)
    with pytest.raises(ValueError, match="finite number ≥ 0"):
        run(model, x, t, text, memory_tokens=random_memory(), memory_strength=-1.0)
    with pytest.raises(ValueError, match="unknown memory option"):
        run(model, x, t, text, memory_tokens=random_memory(), memory_strenght=2.0)
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        attach_memory(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="route"):
        attach_memory(model, route="flash")
    # a failed call leaves nothing behind: the next call without memory is the stock model
    detach_memory(model)
    stock = run(model, x, t, text)
    attach_memory(model)
    with pytest.raises(ValueError):
        run(model, x, t, text, memory_tokens=random_memory(batch=3))
    assert torch.equal(run(model, x, t, text), stock)
