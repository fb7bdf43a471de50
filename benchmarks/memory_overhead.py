"""What memory costs per denoising step and per training step: the paper's form vs ours (issue 7).

    python benchmarks/memory_overhead.py --device cuda --size full          # the real numbers
    python benchmarks/memory_overhead.py --device cpu --size reduced        # CPU smoke (~seconds)

Builds the real-size Wan2.1-T2V-1.3B ``WanTransformer3DModel`` from the shipped config (random
weights: speed needs no trained ones) and the paper-size ``MemoryEncoder``, and times in one
process, interleaved round by round:

1. a denoising step (one transformer forward) with no memory;
2. the paper's form: the 1,000 dense memory tokens concatenated into every block's
   self-attention as queries *and* keys, their outputs sliced off (the package's
   :class:`~dit_mem.backbone.reference.PaperFormMemory`);
3. our injection (``attach_memory``): the 10 distinct tokens as extra keys/values only, with a
   log-multiplicity bias, per route: the package's ``auto``, ``lse`` (the video attention's
   log-sum-exp merged with the memory part) and ``joint`` (one attention, bias in extra head
   channels); and two exact routes written here (:class:`AltMemoryAttnProcessor`):
   ``float-mask``, the naive one ("before": one SDPA with a float attention mask, which can
   push SDPA off its fastest kernel), and ``repeat-kv`` (the distinct keys/values repeated by
   multiplicity: mask-free at the stock head dim);
4. one training step (encoder forward, DiT forward and backward into the encoder with gradient
   checkpointing, ``FlowMatchingObjective`` loss, AdamW step): the paper's form (dense encoder
   attention + dense tokens; the release re-encodes the caption with UMT5-XXL every step) and
   ours (compact tokens, ``dit_mem.training.trainer.training_loss``) per route, with cached text
   embeddings and with the caption encoded by a UMT5 encoder of the real size every step.

``--attention-backend`` runs the DiT on another diffusers attention backend (``flash``,
``_native_cudnn``, ...): memory then goes through that backend too.

Reported: median ms over ``--repeats`` after ``--warmup`` rounds (CUDA events on GPU,
``perf_counter`` on CPU), overhead over (1) in percent, training throughput relative to the
paper's form, and peak memory per case (``torch.cuda.max_memory_allocated`` on GPU, sampled RSS
on CPU; both include every model built, so "+peak" gives the part above what was resident when
the case started). It also checks that the paper's form and ours give the same transformer
output. ``--size reduced`` shrinks depth, widths and the latent so the whole run takes seconds
on a CPU (the test suite runs it); its ratios say nothing about the full size, where the 1,000
memory tokens are 3% of 32,760 video tokens instead of 3× the 320 video tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from dit_mem.backbone import attach_memory, detach_memory
from dit_mem.backbone.families.wan import WanMemoryProcessor
from dit_mem.backbone.injection import get_attachment
from dit_mem.backbone.reference import PaperFormMemory
from dit_mem.memory import MemoryEncoder, MemoryTokens
from dit_mem.training.loss import FlowMatchingObjective
from dit_mem.training.trainer import training_loss

PACKAGE_ROUTES = ("auto", "lse", "joint")  # dit_mem.backbone.attention
ALT_ROUTES = ("float-mask", "repeat-kv")  # written here (AltMemoryAttnProcessor)
ROUTE_CHOICES = PACKAGE_ROUTES + ALT_ROUTES
DEFAULT_ROUTES = "auto,joint,float-mask,repeat-kv"
ROUTE_LABELS = {
    "auto": "auto (→ lse)",
    "lse": "lse",
    "joint": "joint",
    "float-mask": "float mask (before)",
    "repeat-kv": "repeat-kv",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """Everything whose size differs between ``full`` and ``reduced``."""

    name: str
    transformer: dict[str, Any]  # WanTransformer3DModel kwargs
    encoder: dict[str, Any]  # MemoryEncoder.from_preset("wan2.1-1.3b", **overrides)
    text_encoder: dict[str, Any]  # UMT5Config kwargs
    latent: tuple[int, int, int, int]  # [C, T, H, W] of the generated video
    memory_latent: tuple[int, int, int, int]  # [C, T, H, W] of each retrieved memory video
    text_tokens: int = 512
    caption_tokens: int = 120  # non-padding tokens of the caption (the rest is zeroed)


def _shipped_configs() -> dict[str, dict[str, Any]]:
    text = resources.files("dit_mem.loaders.configs").joinpath("wan2.1-t2v-1.3b.json").read_text()
    data = json.loads(text)
    strip = {"_class_name", "architectures", "model_type", "tokenizer_class"}
    return {k: {n: v for n, v in data[k].items() if n not in strip} for k in data if k[0] != "_"}


def get_size(name: str, latent: tuple[int, int, int] | None = None) -> Size:
    """``full``: the shipped Wan2.1-T2V-1.3B config, the paper's encoder, UMT5-XXL, 480×832×81.

    ``reduced``: 2 blocks of width 128 (4 heads × 32), an encoder of the same width, a UMT5 of
    2 layers × 384 (widths ≈ 1/12 of the real ones), latent ``[16, 5, 16, 16]`` (320 tokens).
    """
    shipped = _shipped_configs()
    if name == "full":
        size = Size(
            "full",
            transformer=shipped["transformer"],
            encoder={},
            text_encoder={**shipped["text_encoder"], "dropout_rate": 0.0},
            latent=(16, 21, 60, 104),
            memory_latent=(16, 21, 60, 104),
        )
    elif name == "reduced":
        text = {
            **shipped["text_encoder"],
            "d_model": 384,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "d_ff": 960,
            "num_heads": 6,
            "vocab_size": 21376,
            "dropout_rate": 0.0,
        }
        size = Size(
            "reduced",
            transformer={
                **shipped["transformer"],
                "num_layers": 2,
                "num_attention_heads": 4,
                "attention_head_dim": 32,
                "ffn_dim": 768,
                "text_dim": text["d_model"],
            },
            encoder={
                "conv_channels": (32, 64),
                "kernel_sizes": (3, 3),
                "strides": (1, 1),
                "dim": 128,
                "latent_shape": (5, 16, 16),
            },
            text_encoder=text,
            latent=(16, 5, 16, 16),
            memory_latent=(16, 5, 16, 16),
        )
    else:
        raise ValueError(f"unknown size {name!r}; use full or reduced")
    if latent is not None:
        size = Size(
            f"{size.name}, latent {list(latent)}",
            size.transformer,
            size.encoder,
            size.text_encoder,
            (size.latent[0], *latent),
            size.memory_latent,
        )
    return size


def video_tokens(size: Size) -> int:
    """Tokens the DiT sees for one latent (after its 1×2×2 patching)."""
    pt, ph, pw = size.transformer["patch_size"]
    _, t, h, w = size.latent
    return (t // pt) * (h // ph) * (w // pw)


# --------------------------------------------------------------------------------------
# The paper's form: dense memory tokens as queries and keys in every self-attention
# --------------------------------------------------------------------------------------
class PaperForm:
    """The package's :class:`~dit_mem.backbone.reference.PaperFormMemory`, installed on demand.

    Set ``tokens`` (dense ``[B, M, D]``) before a forward and keep them until its backward is
    done (gradient checkpointing recomputes the blocks then).
    """

    def __init__(self, transformer: WanTransformer3DModel):
        self.transformer = transformer
        self.memory: PaperFormMemory | None = None

    tokens: torch.Tensor | None = None

    @contextmanager
    def installed(self) -> Iterator[PaperForm]:
        self.memory = PaperFormMemory(self.transformer)
        try:
            yield self
        finally:
            self.memory.remove()
            self.memory = None


def paper_encode(
    encoder: MemoryEncoder, latents: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The paper's encoder output: the shared attention over all 2·N·L dense tokens."""
    videos = encoder.encode_videos(latents)
    if encoder.training:  # the same draw as MemoryEncoder.aggregate
        perm = torch.randperm(videos.num_videos, generator=generator)
        videos = videos.select(perm.to(videos.high.device))
    b, n, g, d = videos.high.shape
    counts = videos.log_counts.exp().round().long().repeat(n).to(videos.high.device)
    outs = []
    for t in (videos.high, videos.low):
        outs.append(
            encoder.attention(torch.repeat_interleave(t.reshape(b, n * g, d), counts, dim=1))
        )
    return torch.cat(outs, dim=1)  # [B, 2·N·L, D]


def paper_training_loss(
    paper: PaperForm,
    encoder: MemoryEncoder,
    objective: FlowMatchingObjective,
    batch: dict,
    generator: torch.Generator,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``dit_mem.training.trainer.training_loss`` with the paper's memory (same draws, in order:
    memory permutation, timestep indices, noise). ``paper`` must be installed; its tokens stay
    set for the backward (cleared by the caller)."""
    transformer = paper.transformer
    device = next(transformer.parameters()).device
    x0 = batch["x0"].to(device, torch.float32)
    paper.tokens = paper_encode(encoder, batch["memory"].to(device), generator)
    index = objective.sample_indices(x0.shape[0], generator)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
    x_t, t, target = objective.prepare(x0, index, noise)
    pred = transformer(
        hidden_states=x_t.to(dtype),
        timestep=t,
        encoder_hidden_states=batch["text"].to(device, dtype),
        attention_kwargs={"memory_tokens": paper.tokens},
        return_dict=False,
    )[0]
    return objective.loss(pred, target, index)


# --------------------------------------------------------------------------------------
# Other exact routes for our compact tokens, written here for comparison
# --------------------------------------------------------------------------------------
class AltMemoryAttnProcessor(WanMemoryProcessor):
    """Our injection (video queries only) through one plain SDPA, by ``mode``:

    ``"float-mask"``  keys ``[video ; G memory]``, the log-multiplicity bias as a float attention
                      mask (in the query dtype, as SDPA requires): the naive route, "before".
    ``"repeat-kv"``   keys ``[video ; memory]`` with each distinct memory key/value repeated by
                      its multiplicity (the G tokens are projected once): mask-free, head dim
                      unchanged, differentiable; exact only for integer multiplicities (λ = 1).
    """

    def __init__(self, attachment, block, stock, mode: str):
        super().__init__(attachment, block, stock, "auto")
        if mode not in ALT_ROUTES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode

    def attend(self, query, key, value, memory_key, memory_value, memory_bias):
        query, key, value, memory_key, memory_value = (
            t.transpose(1, 2) for t in (query, key, value, memory_key, memory_value)
        )  # [B, H, S, Dh]
        mask = None
        if self.mode == "float-mask":
            b, s = query.shape[0], query.shape[2]
            mask = torch.cat([memory_bias.new_zeros(b, s), memory_bias], dim=1)
            mask = mask.to(query.dtype)[:, None, None, :]
        else:
            counts = memory_bias[0].exp().round()
            if not torch.allclose(counts.log(), memory_bias[0], atol=1e-4):
                raise ValueError("repeat-kv needs integer multiplicities (memory_strength 1)")
            counts = counts.long()
            memory_key = memory_key.repeat_interleave(counts, dim=2)
            memory_value = memory_value.repeat_interleave(counts, dim=2)
        out = F.scaled_dot_product_attention(
            query,
            torch.cat([key, memory_key.to(key.dtype)], dim=2),
            torch.cat([value, memory_value.to(value.dtype)], dim=2),
            attn_mask=mask,
        )
        return out.transpose(1, 2)


@contextmanager
def ours_installed(transformer: WanTransformer3DModel, route: str) -> Iterator[None]:
    """``attach_memory`` with a package route, or with :class:`AltMemoryAttnProcessor`."""
    attach_memory(transformer, route="auto" if route in ALT_ROUTES else route)
    try:
        if route in ALT_ROUTES:
            attachment = get_attachment(transformer)
            for block in transformer.blocks:
                stock = block.attn1.processor.stock
                block.attn1.set_processor(AltMemoryAttnProcessor(attachment, block, stock, route))
        yield
    finally:
        detach_memory(transformer)  # restores the stock processors


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """Peak memory of one call: CUDA allocator peak, or RSS sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


@dataclass
class Case:
    """One timed thing: ``run()`` inside ``setup()``; ``group`` is ``inference`` or ``training``."""

    key: str
    label: str
    group: str
    run: Callable[[], Any]
    setup: Callable[[], Any] = nullcontext
    times_ms: list[float] = field(default_factory=list)
    peak: int = 0
    peak_above_start: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else math.nan


def _time_once(case: Case, device: torch.device, record: bool) -> None:
    with case.setup(), _Peak(device) as peak:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.run()
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            case.run()
            ms = (time.perf_counter() - t0) * 1e3
    if record:
        case.times_ms.append(ms)
        case.peak = max(case.peak, peak.peak)
        case.peak_above_start = max(case.peak_above_start, peak.peak - peak.start)


def time_cases(cases: list[Case], device: torch.device, warmup: int, repeats: int) -> None:
    """Round-robin: every round runs each case once, so drift hits all cases alike."""
    for round_ in range(warmup + repeats):
        for case in cases:
            _time_once(case, device, record=round_ >= warmup)


# --------------------------------------------------------------------------------------
# Building the models and inputs
# --------------------------------------------------------------------------------------
def build_transformer(size: Size, device: torch.device, dtype: torch.dtype):
    """Random-weight ``WanTransformer3DModel`` of ``size`` (initialised on ``device``), frozen.

    Cast like ``from_pretrained(torch_dtype=dtype)``: the ``_keep_in_fp32_modules`` (rope, time
    embedder, modulation tables, norms) stay float32.
    """
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**size.transformer)
    keep = set(model._keep_in_fp32_modules or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not keep.intersection(name.split(".")):
            t.data = t.data.to(dtype)
    return model.requires_grad_(False).eval()


def build_encoder(size: Size, device: torch.device) -> MemoryEncoder:
    """The paper-size encoder (float32 weights, as trained under bf16 autocast)."""
    torch.manual_seed(1)
    with torch.device(device):
        return MemoryEncoder.from_preset("wan2.1-1.3b", **size.encoder).eval()


def build_text_encoder(size: Size, device: torch.device, dtype: torch.dtype):
    """A random UMT5 encoder (UMT5-XXL at ``full``), frozen."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(2)
    with torch.device(device):
        model = UMT5EncoderModel._from_config(UMT5Config(**size.text_encoder), dtype=dtype)
    return model.requires_grad_(False).eval()


def caption_inputs(size: Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``[1, text_tokens]`` of one padded caption."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, size.text_encoder["vocab_size"], (1, size.text_tokens), generator=g)
    mask = torch.zeros(1, size.text_tokens, dtype=torch.long)
    mask[:, : size.caption_tokens] = 1
    return (ids * mask).to(device), mask.to(device)


def encode_caption(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's convention: encode with the mask, zero the padding positions."""
    with torch.no_grad():
        hidden = text_encoder(ids, mask).last_hidden_state
    return hidden * mask[..., None].to(hidden.dtype)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
@dataclass
class Result:
    """What a run measured (``main``'s return value)."""

    header: list[str]
    cases: dict[str, Case]
    checks: dict[str, float]
    table: str


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def format_table(cases: list[Case], device: torch.device) -> str:
    """Markdown: median ms, overhead over (1) / throughput relative to the paper's training step
    (the first case of each group), peak memory."""
    mem = "peak alloc GiB" if device.type == "cuda" else "peak RSS GiB"
    lines = [
        f"| case | median ms | vs reference | {mem} | +peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    ref: dict[str, Case] = {}
    for c in cases:  # the first case of each group is its reference
        ref.setdefault(c.group, c)
    for c in cases:
        base = ref.get(c.group)
        if base is None or c is base:
            rel = "reference"
        elif c.group == "inference":
            rel = f"{(c.median_ms / base.median_ms - 1) * 100:+.2f}%"
        else:
            rel = f"{base.median_ms / c.median_ms:.2f}× throughput"
        lines.append(
            f"| {c.label} | {c.median_ms:.2f} | {rel} | {_gib(c.peak)} | {_gib(c.peak_above_start)} |"
        )
    return "\n".join(lines)


def summary_lines(cases: dict[str, Case]) -> list[str]:
    """The targets in one place: overheads over (1), ours vs the paper at the same text mode."""
    lines = []
    none = cases.get("none")
    for key in ("paper", "ours-auto", "ours-lse"):
        if none and key in cases:
            pct = (cases[key].median_ms / none.median_ms - 1) * 100
            lines.append(f"overhead per denoising step, {cases[key].label}: {pct:+.2f}%")
    for ours, paper in (("train-ours", "train-paper-cached"), ("train-ours-umt5", "train-paper")):
        if ours in cases and paper in cases:
            ratio = cases[paper].median_ms / cases[ours].median_ms
            lines.append(
                f"training throughput, {cases[ours].label} / {cases[paper].label}: {ratio:.2f}×"
            )
    if "train-ours" in cases and "train-paper" in cases:
        ratio = cases["train-paper"].median_ms / cases["train-ours"].median_ms
        lines.append(f"training throughput, ours (cached text) / paper as released: {ratio:.2f}×")
    return lines


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=("full", "reduced"), default="full")
    ap.add_argument(
        "--latent",
        default=None,
        help="T,H,W of the video latent instead of the size's (e.g. 5,30,52 for a CPU run at full width)",
    )
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--k", type=int, default=5, help="retrieved memory videos")
    ap.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="DiT dtype (default: bf16 on GPU, fp32 on CPU)",
    )
    ap.add_argument(
        "--routes",
        default=DEFAULT_ROUTES,
        help=f"memory routes, a comma list of {', '.join(ROUTE_CHOICES)} (or 'all'); the first "
        "is used for training",
    )
    ap.add_argument(
        "--attention-backend",
        default=None,
        help="diffusers attention backend of the DiT (set_attention_backend), e.g. flash, "
        "_native_cudnn; default: the active one (native)",
    )
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-text-encoder", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return _validate_args(ap.parse_args(argv))


def _validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Derive defaults and reject bad combinations before anything is built."""
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    names = ROUTE_CHOICES if args.routes == "all" else args.routes.split(",")
    unknown = [n for n in names if n not in ROUTE_CHOICES]
    if unknown or not names:
        raise SystemExit(f"--routes: unknown {unknown}; choose from {ROUTE_CHOICES}")
    args.routes = list(dict.fromkeys(names))
    if args.attention_backend is not None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        known = [b.value for b in AttentionBackendName]
        if args.attention_backend not in known:
            raise SystemExit(f"--attention-backend: unknown {args.attention_backend!r}; {known}")
    if args.latent is not None:
        args.latent = tuple(int(x) for x in args.latent.split(","))
        if len(args.latent) != 3:
            raise SystemExit("--latent is T,H,W")
    if args.repeats < 1 or args.warmup < 0 or args.k < 1:
        raise SystemExit("--repeats ≥ 1, --warmup ≥ 0, --k ≥ 1")
    return args


def main(args: argparse.Namespace) -> Result:
    """Build, check, time, print the table; returns everything measured."""
    import diffusers
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    size = get_size(args.size, args.latent)
    use_amp = device.type == "cuda" and dtype != torch.float32  # as accelerate's bf16 training

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if use_amp else nullcontext()

    # 1. models and inputs ---------------------------------------------------------------
    transformer = build_transformer(size, device, dtype)
    if args.attention_backend is not None:
        transformer.set_attention_backend(args.attention_backend)
    encoder = build_encoder(size, device)
    text_encoder = None
    if not (args.skip_training or args.skip_text_encoder):
        text_encoder = build_text_encoder(size, device, dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, *size.latent, generator=g).to(device, dtype)
    memory_latents = torch.randn(1, args.k, *size.memory_latent, generator=g).to(device)
    text = torch.randn(1, size.text_tokens, size.transformer["text_dim"], generator=g)
    text[:, size.caption_tokens :] = 0
    text = text.to(device, dtype)
    timestep = torch.tensor([500.0], device=device)
    with torch.no_grad(), autocast():
        memory: MemoryTokens = encoder(memory_latents).to(dtype)  # same for every step
    dense = memory.dense()
    paper = PaperForm(transformer)

    header = [
        f"device: {_device_name(device)}",
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        f"size {size.name}: DiT {size.transformer['num_layers']} layers × width "
        f"{size.transformer['num_attention_heads'] * size.transformer['attention_head_dim']} "
        f"({sum(p.numel() for p in transformer.parameters()) / 1e6:.1f} M params, {args.dtype}), "
        f"latent {list(size.latent)} → {video_tokens(size):,} video tokens; encoder "
        f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M params, k={args.k}: "
        f"{dense.shape[1]:,} dense / {memory.num_distinct} distinct memory tokens; text "
        f"{size.text_tokens} tokens"
        + (
            f"; UMT5 {size.text_encoder['num_layers']} layers × {size.text_encoder['d_model']} "
            f"({sum(p.numel() for p in text_encoder.parameters()) / 1e9:.2f} B params)"
            if text_encoder is not None
            else ""
        ),
        f"medians of {args.repeats} after {args.warmup} warm-up round(s), "
        + ("CUDA events" if device.type == "cuda" else "perf_counter")
        + f"; attention backend {args.attention_backend or 'native (default)'}",
    ]

    # 2. inference cases: (1) none, (2) paper, (3) ours per route --------------------------
    @torch.no_grad()
    def forward(attention_kwargs=None) -> torch.Tensor:
        return transformer(x, timestep, text, attention_kwargs=attention_kwargs, return_dict=False)[
            0
        ]

    def paper_forward() -> torch.Tensor:
        return forward({"memory_tokens": dense})

    ours_kwargs = {"memory_tokens": memory, "memory_strength": 1.0}
    cases = [
        Case("none", "(1) no memory", "inference", forward),
        Case(
            "paper",
            f"(2) paper: {dense.shape[1]:,} dense tokens as queries + keys",
            "inference",
            paper_forward,
            paper.installed,
        ),
    ]
    for route in args.routes:
        cases.append(
            Case(
                f"ours-{route}",
                f"(3) ours, {ROUTE_LABELS[route]}",
                "inference",
                lambda: forward(ours_kwargs),
                lambda r=route: ours_installed(transformer, r),
            )
        )

    # correctness: paper form == ours (every route), and memory does change the output
    with paper.installed():
        out_paper = forward({"memory_tokens": dense})
    out_none = forward()
    checks = {"memory effect (rel. diff none vs paper)": _rel_diff(out_none, out_paper)}
    for route in args.routes:
        with ours_installed(transformer, route):
            checks[f"paper vs ours {route} (rel. diff)"] = _rel_diff(
                forward(ours_kwargs), out_paper
            )
    checks["outputs finite"] = float(bool(out_paper.isfinite().all() and out_none.isfinite().all()))
    del out_paper, out_none

    # 3. training cases ---------------------------------------------------------------------
    train_cases: list[Case] = []
    if not args.skip_training:
        transformer.enable_gradient_checkpointing()
        objective = FlowMatchingObjective()
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, weight_decay=0.0)
        generator = torch.Generator().manual_seed(5)
        ids, mask = caption_inputs(size, device)
        # every route trains (auto: lse with its backward where the backend has one, else joint)
        train_routes = [r for r in args.routes if not (r == "lse" and "auto" in args.routes)]
        train_route = train_routes[0]

        def text_for(step_text: bool) -> torch.Tensor:
            return encode_caption(text_encoder, ids, mask) if step_text else text

        def paper_loss(batch: dict) -> torch.Tensor:
            return paper_training_loss(paper, encoder, objective, batch, generator, dtype)

        def ours_loss(batch: dict) -> torch.Tensor:
            return training_loss(transformer, encoder, objective, batch, generator, dtype)

        def step(loss_fn, step_text: bool) -> Callable[[], None]:
            def run() -> None:
                batch = {"x0": x, "memory": memory_latents, "text": text_for(step_text)}
                with autocast():
                    loss = loss_fn(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                paper.tokens = None

            return run

        @contextmanager
        def training(install):
            encoder.train()
            try:
                with install():
                    yield
            finally:
                encoder.eval()

        def ours_setup(route: str = train_route):
            return ours_installed(transformer, route)

        name = ROUTE_LABELS[train_route]
        variants = [  # (key, label, loss, install, UMT5 every step)
            ("train-paper", "(4) paper form, UMT5 every step (as released)", paper_loss,
             paper.installed, True),
            ("train-paper-cached", "(4) paper form, cached text", paper_loss, paper.installed,
             False),
            ("train-ours", f"(4) ours, {name}, cached text", ours_loss, ours_setup, False),
            ("train-ours-umt5", f"(4) ours, {name}, UMT5 every step", ours_loss, ours_setup, True),
        ]  # fmt: skip
        for route in train_routes[1:]:
            variants.append(
                (
                    f"train-ours-{route}",
                    f"(4) ours, {ROUTE_LABELS[route]}, cached text",
                    ours_loss,
                    lambda r=route: ours_setup(r),
                    False,
                )
            )
        for key, label, loss_fn, install, step_text in variants:
            if step_text and text_encoder is None:
                continue
            train_cases.append(
                Case(
                    key, label, "training", step(loss_fn, step_text), lambda i=install: training(i)
                )
            )

    # 4. time, report -----------------------------------------------------------------------
    time_cases(cases, device, args.warmup, args.repeats)
    time_cases(train_cases, device, args.warmup, args.repeats)
    all_cases = cases + train_cases
    table = format_table(all_cases, device)
    by_key = {c.key: c for c in all_cases}
    print("\n".join(header))
    print("checks: " + ", ".join(f"{k} = {v:.2e}" for k, v in checks.items()))
    print(table)
    print("\n".join(summary_lines(by_key)))
    return Result(header, by_key, checks, table)


if __name__ == "__main__":
    main(parse_args())
