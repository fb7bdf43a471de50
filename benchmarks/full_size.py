"""Every preset at its real size, on fake tensors: shapes, dtypes, devices and exact FLOPs.

    python benchmarks/full_size.py --preset all [--device cpu|cuda] [--json OUT]
    python benchmarks/full_size.py --preset wan2.1-1.3b --device cuda

PyTorch's fake tensors carry shapes, dtypes and devices through a whole model without weights
or memory; ``torch.utils.flop_counter`` counts the FLOPs of every op it sees. For each encoder
preset: the real transformer config of its base model (diffusers' names), the preset's memory
encoder, bf16, at the preset's geometry (its latent shape, the pipeline's text length), and

* one denoising forward: no memory; our memory (k = 5, the compact tokens, as the pipeline
  gives them); the paper's dense form (1,000 memory tokens as queries and keys);
* one training step: the encoder forward, the frozen DiT's forward and backward into the
  encoder, gradient checkpointing on (as config/train_dit_mem.yaml sets it), ours and the
  paper's form (the encoder's shared attention over the 1,000 dense tokens too);
* the memory encoder forward on k = 5 retrieved latents.

Attention kernels the counter lacks get a FLOP formula here (PyTorch's CPU flash kernel with its
log-sum-exp, forward and backward), so no route looks cheaper by being invisible; a test checks
every op that runs is counted. ``--device cuda`` fakes a CUDA device (no GPU needed): the CUDA
branches of the memory routes (flash with log-sum-exp) are taken. Any shape, dtype or device
error exits 1 naming the preset and the module. The last table is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

K = 5

# --------------------------------------------------------------------------------------
# FLOP formulas the counter lacks
# --------------------------------------------------------------------------------------
_REGISTERED = False


def register_missing_formulas() -> None:
    """The CPU flash kernel (what SDPA and our lse route run on CPU), forward and backward."""
    global _REGISTERED
    if _REGISTERED:
        return
    aten = torch.ops.aten

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _cpu_flash(query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _cpu_flash_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(
            grad_out.shape, query.shape, key.shape, value.shape
        )

    _REGISTERED = True


# --------------------------------------------------------------------------------------
# The presets at their real size
# --------------------------------------------------------------------------------------
def _wan_config(name: str) -> dict:
    """The shipped Wan2.1 transformer config (``dit_mem/models/configs``)."""
    from dit_mem.models.wan import preset_configs

    return {k: v for k, v in preset_configs(name)["transformer"].items() if not k.startswith("_")}


@dataclass
class Preset:
    name: str  # the encoder preset
    family: str  # dit_mem family name
    cls: str  # the diffusers transformer class
    config: dict  # its real config (diffusers' names)
    text: dict[str, tuple[int, int]]  # text stream → (tokens, width): the pipeline's length
    experts: int = 1
    fixed: dict = field(default_factory=dict)
    label: str | None = None  # the row's name where it is not the encoder preset's

    @property
    def row(self) -> str:
        return self.label or self.name


def tiny_presets() -> dict[str, Preset]:
    """The same runs on the test suite's tiny models (``tests/test_benchmarks.py``)."""
    from dit_mem.testing import TEXT_DIM, TINY

    text = {"encoder_hidden_states": (16, TEXT_DIM)}
    return {
        "tiny-wan": Preset(
            "tiny", "wan", "WanTransformer3DModel", TINY["wan"], text, label="tiny-wan"
        ),
        "tiny-ltx": Preset(
            "tiny",
            "ltx",
            "LTXVideoTransformer3DModel",
            TINY["ltx"],
            text,
            fixed={"rope_interpolation_scale": (4 / 25, 4, 4)},
            label="tiny-ltx",
        ),
        "tiny-hunyuan15": Preset(
            "tiny",
            "hunyuan15",
            "HunyuanVideo15Transformer3DModel",
            TINY["hunyuan15"],
            {"encoder_hidden_states": (6, TEXT_DIM), "encoder_hidden_states_2": (4, TEXT_DIM)},
            label="tiny-hunyuan15",
        ),
    }


def presets() -> dict[str, Preset]:
    wan_14b = _wan_config("wan2.1-t2v-14b")
    ti2v = {
        **_wan_config("wan2.1-t2v-1.3b"),
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "in_channels": 48,
        "out_channels": 48,
        "ffn_dim": 14336,
        "num_layers": 30,
    }
    return {
        "wan2.1-1.3b": Preset(
            "wan2.1-1.3b",
            "wan",
            "WanTransformer3DModel",
            _wan_config("wan2.1-t2v-1.3b"),
            {"encoder_hidden_states": (512, 4096)},
        ),
        "wan2.1-14b": Preset(
            "wan2.1-14b",
            "wan",
            "WanTransformer3DModel",
            wan_14b,
            {"encoder_hidden_states": (512, 4096)},
        ),
        "wan2.2-ti2v-5b": Preset(
            "wan2.2-ti2v-5b",
            "wan",
            "WanTransformer3DModel",
            ti2v,
            {"encoder_hidden_states": (512, 4096)},
        ),
        "wan2.2-a14b": Preset(  # two experts; one runs per step
            "wan2.2-a14b",
            "wan",
            "WanTransformer3DModel",
            wan_14b,
            {"encoder_hidden_states": (512, 4096)},
            experts=2,
        ),
        "ltx-video-2b": Preset(  # LTXVideoTransformer3DModel's defaults are LTX-Video 2B's
            "ltx-video-2b",
            "ltx",
            "LTXVideoTransformer3DModel",
            {},
            {"encoder_hidden_states": (128, 4096)},
            fixed={"rope_interpolation_scale": (8 / 25, 32, 32)},
        ),
        "hunyuanvideo-1.5": Preset(  # the class defaults are HunyuanVideo-1.5's (480p, 54 layers)
            "hunyuanvideo-1.5",
            "hunyuan15",
            "HunyuanVideo15Transformer3DModel",
            {"task_type": "t2v"},
            {"encoder_hidden_states": (1000, 3584), "encoder_hidden_states_2": (256, 1472)},
        ),
    }


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------
class Stage(Exception):
    """An error at full size, naming the preset, the part and the module that raised it."""


class ModuleTrail:
    """The innermost module running when an error is raised (``where``: its qualified name)."""

    def __init__(self):
        self.names: dict[int, str] = {}
        self.stack: list[str] = []
        self.where: str | None = None

    @contextlib.contextmanager
    def watching(self, roots: dict[str, torch.nn.Module]):
        from torch.nn.modules import module as nn_module

        for root, model in roots.items():
            for name, sub in model.named_modules():
                self.names.setdefault(id(sub), f"{root}.{name}" if name else root)

        def enter(module, args):
            name = self.names.get(id(module))
            if name is not None:
                self.stack.append(name)
                self.where = name

        def leave(module, args, out):
            if self.names.get(id(module)) is not None and self.stack:
                self.stack.pop()
                self.where = self.stack[-1] if self.stack else None

        handles = [
            nn_module.register_module_forward_pre_hook(enter),
            nn_module.register_module_forward_hook(leave),
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def build(preset: Preset, device: str):
    """The transformer and the memory encoder on fake tensors, bf16, on ``device``."""
    import diffusers

    from dit_mem.memory import MemoryEncoder

    cls = getattr(diffusers, preset.cls)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = cls.from_config(preset.config).eval().requires_grad_(False)
        encoder = MemoryEncoder.from_preset(preset.name)
    finally:
        torch.set_default_dtype(torch.float32)
    if device != "cpu":
        for module in (model, encoder):
            _move_fake(module, device)
    return model, encoder


def _move_fake(module: torch.nn.Module, device: str) -> None:
    """Fake tensors on ``device`` in place of every weight and buffer: ``.to("cuda")`` needs a
    CUDA build even for fake tensors, an empty tensor on a fake CUDA device does not (the
    weights have no values either way)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                new = torch.empty(p.shape, dtype=p.dtype, device=device)
                sub._parameters[name] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def inputs(preset: Preset, encoder, family, device: str) -> dict:
    """The latents being denoised, the retrieved latents, the text and a timestep."""
    cfg = encoder.config
    c, (t, h, w) = cfg.in_channels, cfg.latent_shape
    bf = {"dtype": torch.bfloat16, "device": device}
    texts = [{s: torch.randn(n, d, **bf) for s, (n, d) in preset.text.items()}]
    tokens = max(n for n, _ in preset.text.values())
    return {
        "x": torch.randn(1, c, t, h, w, **bf),
        "memory_latents": torch.randn(1, K, c, t, h, w, **bf),
        "text": {k: v for k, v in family.training.text_kwargs(texts, tokens).items()},
        "t": torch.tensor([500.0], device=device),
    }


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Every op that runs (to check that each compute op has a FLOP formula)."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


COMPUTE = ("mm", "conv", "attention", "einsum", "bmm", "matmul")  # op names that do the work


@contextlib.contextmanager
def text_to_video_branch():
    """HunyuanVideo-1.5's forward branches on ``torch.all(image_embeds == 0)`` (text to video):
    a value fake tensors do not have. The answer for that one call is given (True: the family
    feeds zero image embeddings for text to video); every other op runs as it is."""
    import diffusers.models.transformers.transformer_hunyuan_video15 as module

    from dit_mem.memory.tokens import is_fake

    real = module.torch

    class Torch:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def all(x, *args, **kwargs):
            return True if is_fake(x) else real.all(x, *args, **kwargs)

    module.torch = Torch()
    try:
        yield
    finally:
        module.torch = real


class KnownMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """Boolean masks whose values the benchmark knows (its text is full length: every token
    valid; HunyuanVideo-1.5 makes its image mask of zeros for text to video), carried through
    the ops that keep them, so that indexing with them has the shape it has in a real run (a fake
    tensor has no values to count). Seeded with ``known[tensor] = True | False`` (all of it)."""

    KEEP = (
        "_to_copy",
        "view",
        "select",
        "slice",
        "expand",
        "unsqueeze",
        "clone",
        "alias",
        "detach",
        "lift_fresh",
        "lift_fresh_copy",
    )

    def __init__(self):
        super().__init__()
        self.values: dict[int, tuple[torch.Tensor, bool]] = {}  # id → (tensor kept alive, value)

    def set(self, tensor: torch.Tensor, value: bool) -> None:
        self.values[id(tensor)] = (tensor, value)

    def get(self, tensor) -> bool | None:
        entry = self.values.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return None if entry is None or entry[0] is not tensor else entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "index" and len(args) > 1 and isinstance(args[1], list | tuple):
            mask = args[1][0] if len(args[1]) == 1 else None
            value = self.get(mask)
            if value is not None:
                x = args[0]
                if value:  # every row: the tensor itself
                    return torch.ops.aten.clone(x)
                return x.new_empty((0, *x.shape[mask.ndim :]))
        out = func(*args, **kwargs)
        first = self.get(args[0]) if args else None
        if name in ("zeros", "zeros_like", "new_zeros"):
            self.set(out, False)
        elif name in ("ones", "ones_like", "new_ones"):
            self.set(out, True)
        elif first is not None and name == "unbind":
            for part in out:
                self.set(part, first)
        elif first is not None and name in ("bitwise_not", "logical_not"):
            self.set(out, not first)
        elif first is not None and name in self.KEEP and isinstance(out, torch.Tensor):
            self.set(out, first)
        return out


@contextlib.contextmanager
def recorded_memory_attention():
    """The memory attention calls the model makes, as ``(q shape, key shape, memory key shape,
    dtype, masked)`` (to run the same calls on a fake CUDA device: :func:`cuda_routes`)."""
    from dit_mem.backbone.families import base

    real = base.memory_attention
    calls: list[tuple] = []

    def record(query, key, value, memory_key, memory_value, bias, **kwargs):
        masked = (
            kwargs.get("attention_mask") is not None or kwargs.get("memory_visible") is not None
        )
        shapes = (tuple(query.shape), tuple(key.shape), tuple(memory_key.shape))
        calls.append((*shapes, str(query.dtype).removeprefix("torch."), masked))
        return real(query, key, value, memory_key, memory_value, bias, **kwargs)

    base.memory_attention = record
    try:
        yield calls
    finally:
        base.memory_attention = real


class _Context:
    """An autograd ctx stand-in (the engine cannot run on a fake CUDA device)."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def cuda_routes(call: tuple, device: str = "cuda") -> dict:
    """One recorded memory attention call on fake ``device`` tensors, inference and training
    (forward and backward): the ops it ran and its FLOPs. PyTorch without CUDA fakes a CUDA
    device for dispatched ops but not for Python indexing, ``copy_`` or ``contiguous`` (they
    take a CUDA device guard), so whole models cannot run there; the memory attention can."""
    from dit_mem.backbone.attention import (
        _MemoryMerge,
        kernel_pair,
        memory_attention,
        resolve_backend,
    )

    q_shape, k_shape, m_shape, dtype, masked = call
    dtype = getattr(torch, dtype)
    register_missing_formulas()
    row: dict = {}
    with FakeTensorMode(allow_non_fake_inputs=True), fake_cuda_methods():
        q, k, v = (
            torch.randn(sh, dtype=dtype, device=device) for sh in (q_shape, k_shape, k_shape)
        )
        mk, mv = (torch.randn(m_shape, dtype=dtype, device=device) for _ in range(2))
        bias = torch.zeros(m_shape[:2], device=device)
        masks = {}
        if masked:
            b, s = q_shape[:2]
            masks = {
                "attention_mask": torch.ones(b, 1, s, k_shape[1], dtype=torch.bool, device=device),
                "memory_visible": torch.ones(b, s, dtype=torch.bool, device=device),
            }
        tensors = (q, k, v, mk, mv, bias)

        def inference():
            with torch.no_grad():
                out = memory_attention(*tensors, **masks)
            row["inference_output"] = [list(out.shape), str(out.dtype), str(out.device)]

        def training():  # the lse route's autograd Function, forward and backward by hand
            pair = kernel_pair(resolve_backend(None), q)
            ctx = _Context()
            scale = 1 / math.sqrt(q_shape[-1])
            with torch.no_grad():
                out = _MemoryMerge.forward(ctx, *tensors, scale, pair)
                grads = _MemoryMerge.backward(ctx, torch.ones_like(out))
            row["training_output"] = [list(out.shape), str(out.dtype), str(out.device)]
            row["training_grads"] = [list(g.shape) for g in grads if g is not None]

        runs = {"inference": inference}
        if not masked:  # a masked attention takes the joint route, which autograd drives
            runs["training"] = training
        for name, run in runs.items():
            seen: set = set()
            row[f"{name}_tflops"] = count(run, seen) / 1e12
            row[f"{name}_ops"] = sorted(
                str(op) for op in seen if any(w in str(op) for w in COMPUTE)
            )
            missing = uncounted(seen)
            if missing:
                raise Stage(f"memory attention on {device}: ops without a FLOP formula: {missing}")
    return row


@contextlib.contextmanager
def fake_cuda_methods():
    """PyTorch built without CUDA fakes a CUDA device for dispatched ops, but four Tensor methods
    take a CUDA device guard in C++ before they dispatch (indexing, item assignment, ``copy_``,
    ``contiguous``, ``to``, ``~``) and fail there. For fake CUDA tensors only, they are routed to
    the same aten ops (``select``, ``slice``, ``unsqueeze``, ``index_select``, ``copy_``, ``clone``,
    ``_to_copy``, ``index``, ``bitwise_not``); anything
    else (indexing with tensors) keeps the method and fails as it would."""
    from dit_mem.memory.tokens import is_fake

    aten = torch.ops.aten
    names = ("__getitem__", "__setitem__", "copy_", "contiguous", "to", "__invert__")
    methods = {n: getattr(torch.Tensor, n) for n in names}

    def ours(x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == "cuda" and is_fake(x)

    def basic(x, index):
        index = index if isinstance(index, tuple) else (index,)
        lists = [i for i in index if isinstance(i, list)]
        if len(lists) > 1 or any(not isinstance(j, int) for i in lists for j in i):
            return None
        if not all(i is None or i is Ellipsis or isinstance(i, int | slice | list) for i in index):
            return None
        if Ellipsis in index:
            at = index.index(Ellipsis)
            used = sum(i is not None for i in index) - 1
            index = index[:at] + (slice(None),) * (x.ndim - used) + index[at + 1 :]
        dim = 0
        for i in index:
            if i is None:
                x, dim = aten.unsqueeze.default(x, dim), dim + 1
            elif isinstance(i, int):
                x = aten.select.int(x, dim, i)
            elif isinstance(i, list):  # one list of positions: index_select
                rows = torch.tensor(i, dtype=torch.long, device=x.device)
                x, dim = aten.index_select.default(x, dim, rows), dim + 1
            else:
                x = aten.slice.Tensor(x, dim, i.start, i.stop, i.step or 1)
                dim += 1
        return x

    def getitem(x, index):
        if ours(x) and isinstance(index, torch.Tensor):  # a mask or positions: aten.index
            return aten.index.Tensor(x, [index])
        out = basic(x, index) if ours(x) else None
        return methods["__getitem__"](x, index) if out is None else out

    def setitem(x, index, value):
        view = basic(x, index) if ours(x) else None
        if view is None:
            return methods["__setitem__"](x, index, value)
        if isinstance(value, torch.Tensor):
            aten.copy_.default(view, value)
        else:
            aten.fill_.Scalar(view, value)

    def copy_(x, src, non_blocking=False):
        if ours(x):
            return aten.copy_.default(x, src, non_blocking)
        return methods["copy_"](x, src, non_blocking)

    def contiguous(x, memory_format=torch.contiguous_format):
        if ours(x) and not x.is_contiguous(memory_format=memory_format):
            return aten.clone.default(x, memory_format=memory_format)
        return methods["contiguous"](x, memory_format=memory_format)

    def to(x, *args, **kwargs):
        if not ours(x):
            return methods["to"](x, *args, **kwargs)
        copy = kwargs.pop("copy", False)
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        device = x.device if device is None else torch.device(device)
        dtype = x.dtype if dtype is None else dtype
        if device.type == "cuda" and dtype == x.dtype and memory_format is None and not copy:
            return x
        return aten._to_copy.default(x, dtype=dtype, device=device)

    def invert(x):
        return aten.bitwise_not.default(x) if ours(x) else methods["__invert__"](x)

    replaced = {
        "__invert__": invert,
        "__getitem__": getitem,
        "__setitem__": setitem,
        "copy_": copy_,
        "contiguous": contiguous,
        "to": to,
    }
    for name, fn in replaced.items():
        setattr(torch.Tensor, name, fn)
    try:
        yield
    finally:
        for name, fn in methods.items():
            setattr(torch.Tensor, name, fn)


def count(fn, seen: set | None = None) -> int:
    """FLOPs of ``fn``; the ops it ran are added to ``seen``."""
    ops = _Ops()
    with FlopCounterMode(display=False) as fc, ops:
        fn()
    if seen is not None:
        seen |= ops.seen
    return fc.get_total_flops()


def uncounted(ops: set) -> list[str]:
    """Compute ops that ran without a FLOP formula (they would make a route look cheaper)."""
    known = set(flop_counter.flop_registry)
    return sorted(str(op) for op in ops if any(w in str(op) for w in COMPUTE) and op not in known)


def run_preset(preset: Preset, device: str = "cpu", fake: bool = True) -> dict:
    """FLOPs of every call at full size (see the module docstring). ``fake=False`` runs the
    same calls on real tensors (the tiny presets: the test that fake tensors count the same)."""
    from dit_mem import attach_memory, detach_memory
    from dit_mem.backbone import family_of
    from dit_mem.backbone.reference import PaperFormMemory, paper_encode

    register_missing_formulas()
    row: dict = {"preset": preset.row, "device": device}
    trail = ModuleTrail()
    seen: set = set()
    part = "construction"
    try:
        masks = KnownMasks()
        faking = (
            (
                FakeTensorMode(allow_non_fake_inputs=True),
                text_to_video_branch(),
                masks,
                *([fake_cuda_methods()] if device == "cuda" else []),
            )
            if fake
            else ()
        )
        with contextlib.ExitStack() as stack:
            for context in faking:
                stack.enter_context(context)
            model, encoder = build(preset, device)
            stack.enter_context(trail.watching({"transformer": model, "memory_encoder": encoder}))
            family = family_of(model)
            io = inputs(preset, encoder, family, device)
            text = {k: v.to(device) for k, v in io["text"].items()}
            for key, value in text.items():
                if "mask" in key:  # full-length text: every token valid
                    masks.set(value, True)

            def forward(kwargs=None):
                return family.training.predict(model, io["x"], io["t"], text, kwargs, preset.fixed)

            part = "memory encoder forward"
            with torch.no_grad():
                encoder.eval()
                row["encoder_tflops"] = count(lambda: encoder(io["memory_latents"]), seen) / 1e12
                memory = encoder(io["memory_latents"])
                dense = paper_encode(encoder, io["memory_latents"]).tokens
            row["memory_tokens"] = {"distinct": memory.num_distinct, "dense": dense.shape[1]}

            part = "forward, no memory"
            with torch.no_grad():
                row["tflops_none"] = count(forward, seen) / 1e12
                part = "forward, our memory"
                attach_memory(model)
                out = None

                def ours():
                    nonlocal out
                    out = forward({"memory_tokens": memory})

                with recorded_memory_attention() as calls:
                    row["tflops_memory"] = count(ours, seen) / 1e12
                row["memory_attention"] = sorted({c for c in calls})
                row["output"] = [list(out.shape), str(out.dtype), str(out.device)]
                detach_memory(model)
                part = "forward, the paper's dense form"
                paper = PaperFormMemory(model)
                paper.handle.remove()  # its memory set here as numbers allow (fake: no values)
                for block in paper.blocks:
                    block.memory, block.repeats = dense, 1
                row["tflops_paper"] = count(forward, seen) / 1e12
                paper.remove()

            if device == "cuda":  # autograd's engine takes a CUDA device guard (see the docstring)
                part = "memory attention on fake CUDA"
                row["cuda_memory_attention"] = [cuda_routes(c) for c in row["memory_attention"]]
                return finish(row, seen, preset, device)
            part = "training step, our memory"
            model.enable_gradient_checkpointing()
            encoder.train()
            attach_memory(model)

            def step(encode):
                mem = encode()
                loss = forward({"memory_tokens": mem}).float().square().mean()
                loss.backward()

            row["train_tflops_memory"] = (
                count(lambda: step(lambda: encoder(io["memory_latents"])), seen) / 1e12
            )
            detach_memory(model)
            part = "training step, the paper's dense form"
            paper = PaperFormMemory(model)
            paper.handle.remove()

            def paper_step():
                mem = paper_encode(encoder, io["memory_latents"]).tokens
                for block in paper.blocks:
                    block.memory, block.repeats = mem, 1
                loss = forward().float().square().mean()
                loss.backward()

            row["train_tflops_paper"] = count(paper_step, seen) / 1e12
    except Stage:
        raise
    except Exception as e:  # a shape, dtype or device error at full size: name where
        where = f" in {trail.where}" if trail.where else ""
        raise Stage(f"{preset.row} ({device}): {part}{where}: {type(e).__name__}: {e}") from e
    return finish(row, seen, preset, device)


def finish(row: dict, seen: set, preset: Preset, device: str) -> dict:
    missing = uncounted(seen)
    if missing:
        raise Stage(f"{preset.row} ({device}): ops ran without a FLOP formula: {missing}")
    row["ops"] = sorted(str(op) for op in seen if any(w in str(op) for w in COMPUTE))
    row["overhead_memory_pct"] = 100 * (row["tflops_memory"] / row["tflops_none"] - 1)
    row["overhead_paper_pct"] = 100 * (row["tflops_paper"] / row["tflops_none"] - 1)
    if "train_tflops_memory" in row:
        row["train_paper_over_ours"] = row["train_tflops_paper"] / row["train_tflops_memory"]
    return row


def markdown(header: list[str], numeric_from: int, rows: list[list[str]]) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return "\n".join(f"| {' | '.join(cells)} |" for cells in [header, align, *rows])


def table(rows: list[dict]) -> str:
    """TFLOP per call; a fake CUDA run has no training columns (its memory attention's training
    step is in the JSON)."""

    def cell(r: dict, key: str, fmt: str) -> str:
        return "—" if r.get(key) is None else format(r[key], fmt)

    header = "preset,device,TFLOP none,TFLOP ours,ours over none,TFLOP paper,paper over none,"
    header += "train TFLOP ours,train TFLOP paper,train paper / ours,encoder TFLOP"
    cells = [
        [r["preset"], r["device"], f"{r['tflops_none']:.4g}", f"{r['tflops_memory']:.4g}"]
        + [f"+{r['overhead_memory_pct']:.3f}%", f"{r['tflops_paper']:.4g}"]
        + [f"+{r['overhead_paper_pct']:.1f}%", cell(r, "train_tflops_memory", ".4g")]
        + [cell(r, "train_tflops_paper", ".4g"), cell(r, "train_paper_over_ours", ".2f")]
        + [f"{r['encoder_tflops']:.4g}"]
        for r in rows
    ]
    return markdown(header.split(","), 2, cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = {**presets(), **tiny_presets()}
    names = list(presets())
    p.add_argument("--preset", default="all", choices=[*every, "all", "tiny"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    groups = {"all": names, "tiny": list(tiny_presets())}
    chosen = groups.get(args.preset, [args.preset])
    rows = []
    for name in chosen:
        t = time.time()
        try:
            row = run_preset(every[name], args.device)
        except Stage as e:
            print(f"full_size: {e}", file=sys.stderr)
            return 1
        row["preset"], row["seconds"] = name, round(time.time() - t, 1)
        rows.append(row)
        print(f"{name}: {row['seconds']} s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({r["preset"]: r for r in rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
