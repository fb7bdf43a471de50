"""What memory costs per denoising step and per training step: the paper's form vs ours.

    python benchmarks/memory_overhead.py --device cuda --size full                 # Wan2.1-1.3B
    python benchmarks/memory_overhead.py --device cuda --size full --family ltx    # LTX-Video 2B
    python benchmarks/memory_overhead.py --device cpu --size reduced               # CPU smoke

Builds a family's transformer at its real size (random weights: speed needs no trained ones;
Wan2.1-T2V-1.3B from the shipped config, LTX-Video 2B and HunyuanVideo-1.5 from the diffusers
class defaults) and the memory encoder of its preset, and times in one process, round by round:

1. a denoising step (one transformer forward, through the package's ``FrozenDiT``), no memory;
2. the paper's form (``dit_mem.backbone.reference.PaperFormMemory``): the 1,000 dense memory
   tokens in every block's attention as queries *and* keys, outputs sliced off;
3. ours (``attach_memory``): the distinct tokens as extra keys/values with a log-multiplicity
   bias, per route (``auto``, ``lse``, ``joint``; HunyuanVideo-1.5's masked attention: ``joint``);
4. a training step (``dit_mem.training.trainer.training_loss``: encoder forward, DiT forward and
   backward into the encoder with gradient checkpointing, AdamW step), ours and the paper's form
   (``reference.paper_encode`` + ``PaperFormMemory``), with cached text; for Wan also with the
   caption encoded by a UMT5-XXL-size encoder every step, as the release does.

Everything is the package's; this script holds timing and tables. Reported: median ms over
``--repeats`` after ``--warmup`` rounds (CUDA events on GPU, ``perf_counter`` on CPU), overhead
over (1), training throughput relative to the paper's form, peak memory per case (CUDA allocator
peak, or sampled RSS on CPU; "+peak" is the part above what was resident when the case started),
and checks that the paper's form equals ours on every route. ``--size reduced`` shrinks depth,
widths and latents so a CPU runs it in seconds (the tests do); its ratios say nothing about the
full size, where 1,000 memory tokens are ~3% of Wan's 32,760 video tokens.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from dit_mem.backbone import attach_memory, detach_memory
from dit_mem.backbone.families import families
from dit_mem.backbone.reference import PaperFormMemory, paper_encode
from dit_mem.memory import MemoryEncoder, MemoryTokens
from dit_mem.training.loss import FlowMatchingObjective
from dit_mem.training.trainer import FrozenDiT, training_loss

FAMILIES = {f.name: f for f in families()}
ROUTES = {
    "wan": ("auto", "lse", "joint"),
    "ltx": ("auto", "lse", "joint"),
    "hunyuan15": ("auto", "joint"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """A family's transformer, encoder and latents at one size."""

    name: str
    transformer: dict[str, Any]  # constructor kwargs (over the class defaults)
    encoder_preset: str
    encoder: dict[str, Any]  # preset fields replaced
    latent: tuple[int, int, int, int]  # [C, T, H, W] of the generated video
    text_tokens: tuple[int, ...]  # valid tokens per text stream
    text_encoder: dict[str, Any] | None = None  # Wan: UMT5 config, for "text every step"


def get_size(family: str, name: str) -> Size:
    """``full``: the real models (Wan2.1-T2V-1.3B at 480×832×81; LTX-Video 2B at 512×704×161;
    HunyuanVideo-1.5 at 480×848×121), the family's encoder preset. ``reduced``: 2 blocks of width
    128, an encoder of that width, small latents, a 2-layer UMT5 of width 384."""
    from dit_mem.models.wan import preset_configs

    if family == "wan":
        shipped = preset_configs("wan2.1-t2v-1.3b")
        strip = {"_class_name", "_diffusers_version", "architectures", "model_type"}
        transformer = {k: v for k, v in shipped["transformer"].items() if k not in strip}
        text = {k: v for k, v in shipped["text_encoder"].items() if k not in strip}
        text |= {"dropout_rate": 0.0}
        full = Size("full", transformer, "wan2.1-1.3b", {}, (16, 21, 60, 104), (120,), text)
    elif family == "ltx":
        full = Size("full", {}, "ltx-video-2b", {}, (128, 21, 16, 22), (60,))
    else:
        full = Size("full", {}, "hunyuanvideo-1.5", {}, (32, 31, 30, 53), (120, 10))
    if name == "full":
        return full
    if name != "reduced":
        raise ValueError(f"unknown size {name!r}; use full or reduced")
    small = {"num_layers": 2, "num_attention_heads": 4, "attention_head_dim": 32}
    c = full.latent[0]
    if family == "wan":
        transformer = {**full.transformer, **small, "ffn_dim": 768, "text_dim": 384}
        text = {**full.text_encoder, "d_model": 384, "num_layers": 2, "num_decoder_layers": 2}
        text |= {"d_ff": 960, "num_heads": 6, "vocab_size": 21376}
    elif family == "ltx":
        transformer, text = {**small, "cross_attention_dim": 128, "caption_channels": 64}, None
    else:
        transformer = {**small, "num_refiner_layers": 1, "rope_axes_dim": (8, 12, 12)}
        transformer |= {"text_embed_dim": 64, "text_embed_2_dim": 32, "image_embed_dim": 32}
        text = None
    encoder = {"conv_channels": (32, 64), "kernel_sizes": (3, 3), "strides": (1, 1), "dim": 128}
    encoder |= {"latent_shape": (5, 16, 16)}
    return Size(
        "reduced",
        transformer,
        full.encoder_preset,
        encoder,
        (c, 5, 16, 16),
        (16, 4)[: len(full.text_tokens)],
        text,
    )


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
# Models and inputs
# --------------------------------------------------------------------------------------
def build_dit(family: str, size: Size, device: torch.device, dtype: torch.dtype) -> FrozenDiT:
    """A random-weight transformer of ``size`` (initialised on ``device``), frozen, cast like
    ``from_pretrained(dtype=...)`` (``_keep_in_fp32_modules`` stay float32)."""
    cls = FAMILIES[family].injection.transformer_classes[0]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**size.transformer)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not keep.intersection(name.split(".")):
            t.data = t.data.to(dtype)
    model.requires_grad_(False).eval()
    max_tokens = 512 if family == "wan" else max(size.text_tokens)
    return FrozenDiT(model, dtype, max_text_tokens=max_tokens)


def build_encoder(size: Size, device: torch.device) -> MemoryEncoder:
    """The family's encoder (float32 weights, as trained under bf16 autocast)."""
    torch.manual_seed(1)
    with torch.device(device):
        return MemoryEncoder.from_preset(size.encoder_preset, **size.encoder).eval()


def build_text_encoder(size: Size, device: torch.device, dtype: torch.dtype):
    """A random UMT5 encoder (UMT5-XXL at ``full``), frozen."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(2)
    with torch.device(device):
        model = UMT5EncoderModel._from_config(UMT5Config(**size.text_encoder), dtype=dtype)
    return model.requires_grad_(False).eval()


def texts(dit: FrozenDiT, size: Size, device: torch.device) -> list[dict]:
    """One caption's text streams: random valid rows of each stream's width."""
    g = torch.Generator().manual_seed(3)
    dims = dit.family.training.text_dims(dit.transformer)
    return [
        {
            s: torch.randn(n, dims[s], generator=g).to(device)
            for s, n in zip(dims, size.text_tokens, strict=True)
        }
    ]


def video_tokens(dit: FrozenDiT, size: Size) -> int:
    cfg = dit.transformer.config
    patch = cfg.get("patch_size", 1)
    pt, ph, pw = (
        patch if isinstance(patch, list | tuple) else (cfg.get("patch_size_t", 1), patch, patch)
    )
    _, t, h, w = size.latent
    return (t // pt) * (h // ph) * (w // pw)


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


def format_table(cases: list[Case], device: torch.device) -> str:
    """Markdown: median ms, overhead over (1) / throughput relative to the paper's training step
    (the first case of each group), peak memory."""
    mem = "peak alloc GiB" if device.type == "cuda" else "peak RSS GiB"
    lines = [
        f"| case | median ms | vs reference | {mem} | +peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    ref: dict[str, Case] = {}
    for c in cases:
        ref.setdefault(c.group, c)
    for c in cases:
        base = ref[c.group]
        if c is base:
            rel = "reference"
        elif c.group == "inference":
            rel = f"{(c.median_ms / base.median_ms - 1) * 100:+.2f}%"
        else:
            rel = f"{base.median_ms / c.median_ms:.2f}× throughput"
        gib = f"{c.peak / 2**30:.2f} | {c.peak_above_start / 2**30:.2f}"
        lines.append(f"| {c.label} | {c.median_ms:.2f} | {rel} | {gib} |")
    return "\n".join(lines)


def summary_lines(cases: dict[str, Case]) -> list[str]:
    """The targets in one place: overheads over (1), ours vs the paper at the same text mode."""
    lines = []
    none = cases.get("none")
    for key in ("paper", "ours-auto", "ours-lse", "ours-joint"):
        if none and key in cases:
            pct = (cases[key].median_ms / none.median_ms - 1) * 100
            lines.append(f"overhead per denoising step, {cases[key].label}: {pct:+.2f}%")
    for ours, paper in (("train-ours", "train-paper-cached"), ("train-ours-umt5", "train-paper")):
        if ours in cases and paper in cases:
            ratio = cases[paper].median_ms / cases[ours].median_ms
            lines.append(
                f"training throughput, {cases[ours].label} / {cases[paper].label}: {ratio:.2f}×"
            )
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
    ap.add_argument("--family", choices=tuple(FAMILIES), default="wan")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=("full", "reduced"), default="full")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--k", type=int, default=5, help="retrieved memory videos")
    ap.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    ap.add_argument(
        "--routes", default=None, help="memory routes, a comma list (default: all of the family's)"
    )
    ap.add_argument(
        "--attention-backend", default=None, help="diffusers attention backend of the DiT"
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
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    known = ROUTES[args.family]
    names = list(known) if args.routes in (None, "all") else args.routes.split(",")
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--routes: unknown {unknown} for {args.family}; choose from {known}")
    args.routes = list(dict.fromkeys(names))
    if args.attention_backend is not None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        backends = [b.value for b in AttentionBackendName]
        if args.attention_backend not in backends:
            raise SystemExit(f"--attention-backend: unknown {args.attention_backend!r}; {backends}")
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
    size = get_size(args.family, args.size)
    use_amp = device.type == "cuda" and dtype != torch.float32  # as accelerate's bf16 training

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if use_amp else nullcontext()

    # 1. models and inputs ---------------------------------------------------------------
    dit = build_dit(args.family, size, device, dtype)
    transformer = dit.transformer
    if args.attention_backend is not None:
        transformer.set_attention_backend(args.attention_backend)
    encoder = build_encoder(size, device)
    text_encoder = None
    if size.text_encoder and not (args.skip_training or args.skip_text_encoder):
        text_encoder = build_text_encoder(size, device, dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, *size.latent, generator=g).to(device)
    memory_latents = torch.randn(
        1, args.k, size.latent[0], *encoder.config.latent_shape, generator=g
    ).to(device)
    text = texts(dit, size, device)
    timestep = torch.tensor([500.0], device=device)
    with torch.no_grad(), autocast():
        memory: MemoryTokens = encoder(memory_latents)  # the same for every step
    dense = MemoryTokens.from_dense(memory.dense())

    @contextmanager
    def paper_form():
        paper = PaperFormMemory(transformer)
        try:
            yield
        finally:
            paper.remove()

    @contextmanager
    def ours(route: str):
        attach_memory(transformer, route=route)
        try:
            yield
        finally:
            detach_memory(transformer)

    params = sum(p.numel() for p in transformer.parameters())
    header = [
        f"device: {_device_name(device)}",
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        f"family {args.family}, size {size.name}: {type(transformer).__name__} "
        f"({params / 1e6:.1f} M params, {args.dtype}), latent {list(size.latent)} → "
        f"{video_tokens(dit, size):,} video tokens; encoder {size.encoder_preset} "
        f"({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M params), k={args.k}: "
        f"{dense.num_distinct:,} dense / {memory.num_distinct} distinct memory tokens",
        f"medians of {args.repeats} after {args.warmup} warm-up round(s), "
        + ("CUDA events" if device.type == "cuda" else "perf_counter")
        + f"; attention backend {args.attention_backend or 'native (default)'}",
    ]

    # 2. inference cases: (1) none, (2) paper, (3) ours per route --------------------------
    @torch.no_grad()
    def step(mem=None) -> torch.Tensor:
        return dit(x, timestep, text, mem)

    cases = [
        Case("none", "(1) no memory", "inference", step),
        Case("paper", f"(2) paper: {dense.num_distinct:,} dense tokens as queries + keys", "inference",
             lambda: step(dense), paper_form),
    ]  # fmt: skip
    for route in args.routes:
        label = (
            "(3) ours, auto (→ lse)"
            if route == "auto" and args.family != "hunyuan15"
            else f"(3) ours, {route}"
        )
        cases.append(
            Case(f"ours-{route}", label, "inference", lambda: step(memory), lambda r=route: ours(r))
        )

    # correctness: the paper's form == ours on every route, and memory changes the output
    with paper_form():
        out_paper = step(dense)
    out_none = step()
    checks = {"memory effect (rel. diff none vs paper)": _rel_diff(out_none, out_paper)}
    for route in args.routes:
        with ours(route):
            checks[f"paper vs ours {route} (rel. diff)"] = _rel_diff(step(memory), out_paper)
    checks["outputs finite"] = float(bool(out_paper.isfinite().all() and out_none.isfinite().all()))
    del out_paper, out_none

    # 3. training cases ---------------------------------------------------------------------
    train_cases: list[Case] = []
    if not args.skip_training:
        transformer.enable_gradient_checkpointing()
        objective = FlowMatchingObjective()  # (the shift does not change the time of a step)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, weight_decay=0.0)
        generator = torch.Generator().manual_seed(5)
        caption = None
        if text_encoder is not None:
            vocab = size.text_encoder["vocab_size"]
            ids = torch.randint(3, vocab, (1, 512), generator=g)
            mask = torch.zeros(1, 512, dtype=torch.long)
            mask[:, : size.text_tokens[0]] = 1
            caption = ((ids * mask).to(device), mask.to(device))

        def batch_text(every_step: bool) -> list[dict]:
            if not every_step:
                return text
            with torch.no_grad():  # the release re-encodes the caption with UMT5 every step
                hidden = text_encoder(*caption).last_hidden_state
            return [{"encoder_hidden_states": hidden[0, : size.text_tokens[0]]}]

        def train_step(model_encoder, every_step: bool) -> Callable[[], None]:
            def run() -> None:
                batch = {"x0": x, "memory": memory_latents, "text": batch_text(every_step)}
                with autocast():
                    loss = training_loss(dit, model_encoder, objective, batch, generator)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return run

        @contextmanager
        def training(install):
            encoder.train()
            try:
                with install():
                    yield
            finally:
                encoder.eval()

        paper_encoder = functools.partial(paper_encode, encoder)
        route = args.routes[0]
        name = "auto (→ lse)" if route == "auto" and args.family != "hunyuan15" else route
        variants = [  # (key, label, encoder, install, text every step)
            ("train-paper", "(4) paper form, UMT5 every step (as released)", paper_encoder, paper_form, True),
            ("train-paper-cached", "(4) paper form, cached text", paper_encoder, paper_form, False),
            ("train-ours", f"(4) ours, {name}, cached text", encoder, lambda: ours(route), False),
            ("train-ours-umt5", f"(4) ours, {name}, UMT5 every step", encoder, lambda: ours(route), True),
        ]  # fmt: skip
        for key, label, enc, install, every_step in variants:
            if every_step and text_encoder is None:
                continue
            train_cases.append(
                Case(
                    key,
                    label,
                    "training",
                    train_step(enc, every_step),
                    lambda i=install: training(i),
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
