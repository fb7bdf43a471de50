"""Memory under the runtime features a diffusers user runs Wan with.

Every check gives memory to a tiny ``WanTransformer3DModel`` under one feature and compares with
the same model run plainly with memory attached and the same memory (``want``), or with the
paper's dense form where the feature changes the numbers by design.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from dit_mem import attach_memory, detach_memory
from dit_mem.backbone.reference import PaperFormMemory
from dit_mem.memory import MemoryTokens
from dit_mem.testing import tiny_pipeline, tiny_transformer

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
@pytest.mark.parametrize("to_disk", [False, True])
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


def test_accelerate_sequential_cpu_offload(call, want):
    from accelerate import cpu_offload

    model = attached()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "meta"  # weights arrive per module call
    assert torch.equal(run(model, call), want[0])


def test_pipeline_model_cpu_offload(call):
    x, t, text, memory = call

    def generate(pipe):
        return pipe(
            prompt="a red fox",
            negative_prompt="blurry",
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            attention_kwargs={"memory_tokens": memory},
        ).frames

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    attach_memory(pipe)
    expected = generate(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe), expected)


# --------------------------------------------------------------------------------------
# Context parallelism: two gloo processes
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Processors and backends
# --------------------------------------------------------------------------------------
def test_set_attn_processor_is_an_error_until_attached_again(call, want):
    model = attached()
    model.set_attn_processor(WanAttnProcessor())
    with pytest.raises(ValueError, match="set_attn_processor.*attach_memory"):
        run(model, call)
    assert torch.equal(run(model, call, memory=False), want[1])  # no memory: fine
    attach_memory(model)
    assert torch.equal(run(model, call), want[0])
    detach_memory(model)
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in model.blocks)


@pytest.mark.parametrize("backend", ["_native_math", "flex"])
def test_the_chosen_backend_computes_the_memory_attention(backend, call, paper, monkeypatch):
    """No log-sum-exp from these backends: memory goes the joint route, through dispatch."""
    name = AttentionBackendName(backend)
    original = _AttentionBackendRegistry._backends[name]
    shapes = []

    @functools.wraps(original)
    def counting(*args, **kwargs):
        shapes.append(tuple(kwargs["key"].shape))
        return original(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counting)
    # set_attention_backend also makes the backend the process-wide default; undo that after
    monkeypatch.setattr(
        _AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend
    )
    model = attached()
    model.set_attention_backend(backend)
    got = run(model, call)
    video_tokens = 3 * 4 * 4
    self_attention = [s for s in shapes if s[1] == video_tokens + 6]  # [video ; 6 memory keys]
    assert len(self_attention) == len(model.blocks)
    assert rel_err(got, paper) <= 1e-5


def test_fused_qkv(call, want):
    model = attached()
    model.fuse_qkv_projections()
    assert rel_err(run(model, call), want[0]) <= 1e-6


# --------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------
def test_pickle_torch_save_and_deepcopy(call, want):
    model = attached()
    run(model, call)  # per-call state present: it must not be saved
    copies = {
        "pickle": pickle.loads(pickle.dumps(model)),
        "deepcopy": copy.deepcopy(model),
    }
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies["torch.save"] = torch.load(buffer, weights_only=False)
    for name, other in copies.items():
        assert other._dit_mem_attachment is not model._dit_mem_attachment, name
        assert other.blocks[1].attn1.processor.block is other.blocks[1], name
        assert torch.equal(run(other, call), want[0]), name
        detach_memory(other)
        assert torch.equal(run(other, call, memory=False), want[1]), name


def test_save_pretrained_saves_the_stock_model(call, want, tmp_path):
    from diffusers import WanTransformer3DModel

    model = attached()
    model.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    assert type(loaded.blocks[0].attn1.processor) is WanAttnProcessor
    assert torch.equal(run(loaded, call, memory=False), want[1])
    attach_memory(loaded)
    assert torch.equal(run(loaded, call), want[0])


# --------------------------------------------------------------------------------------
# Casting, caching, compiling
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("storage", "tol"), [(torch.float16, 1e-3), (torch.float8_e4m3fn, 5e-2)])
def test_layerwise_casting(storage, tol, call, want):
    model = attached()
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    got = run(model, call)
    assert rel_err(got, want[0]) <= tol  # weights rounded to the storage dtype, no more
    assert rel_err(got, run(model, call, memory=False)) > 1e-2  # and memory still applies


def test_first_block_cache(call, want):
    from diffusers import FirstBlockCacheConfig

    model = attached()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never skips: exact
    with model.cache_context("cond"):
        got = run(model, call)
    assert torch.equal(got, want[0])


def test_torch_compile_fullgraph(call, want):
    model = attached()
    torch._dynamo.reset()  # other tests compiled the same code objects for other models
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert rel_err(run(compiled, call), want[0]) <= 1e-6
    assert rel_err(run(compiled, call, memory=False), want[1]) <= 1e-6


def test_compile_repeated_blocks(call, want):
    model = attached()
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    assert rel_err(run(model, call), want[0]) <= 1e-6
