"""The first run on a GPU, in one command: Wan2.1-1.3B at 81×480×832, bf16, random weights.

    python benchmarks/gpu_check.py [--json OUT]          # one H100 / H200, a few minutes
    python benchmarks/gpu_check.py --tiny                # the same code on CPU (the test suite)

In one process, on the device:

* time per denoising step (median of ``--repeats`` after a warm-up, synchronised) and peak
  memory, with no memory, our memory (k = 5, the compact tokens) and the paper's dense form, on
  the attention backends ``native`` and ``flash`` (where flash-attn is installed);
* one training step (memory encoder forward, the frozen DiT forward and backward into the
  encoder, gradient checkpointing on), ours and the paper's form: time and peak memory;
* correctness at full size: our memory path against the dense form in float32 (TF32 off), the
  relative error of the whole model's output, and the lse and joint routes against each other.

Random weights are enough for time, memory and the equality of two forms of one computation;
nothing is downloaded. Prints a Markdown table and the device; ``--json OUT`` writes it all.
Record what it printed in benchmarks/README.md with the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import full_size  # benchmarks/full_size.py (this folder is on sys.path when a script here runs)
import torch

HERE = Path(__file__).resolve().parent


def backends(device: torch.device) -> list[str]:
    """``native``, and ``flash`` where its package is installed (it needs CUDA)."""
    from diffusers.models import attention_dispatch

    found = ["native"]
    if device.type == "cuda" and attention_dispatch._CAN_USE_FLASH_ATTN:
        found.append("flash")
    return found


class Clock:
    """Synchronised wall time and peak memory of a call on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn, repeats: int, warmup: int = 1) -> dict:
        for _ in range(warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return {"median_s": statistics.median(times), "times_s": times, "peak_gib": peak / 2**30}


def build(preset, device: torch.device, dtype: torch.dtype, seed: int = 0):
    import diffusers

    from dit_mem.backbone import family_of
    from dit_mem.memory import MemoryEncoder

    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, preset.cls).from_config(preset.config)
        encoder = MemoryEncoder.from_preset(preset.name)
    model = model.to(dtype).eval().requires_grad_(False)
    encoder = encoder.to(dtype)
    c, (t, h, w) = encoder.config.in_channels, encoder.config.latent_shape
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    family = family_of(model)
    texts = [{s: torch.randn(n, d, generator=g) for s, (n, d) in preset.text.items()}]
    text = family.training.text_kwargs(texts, max(n for n, _ in preset.text.values()))
    io = {
        "x": torch.randn(1, c, t, h, w, generator=g),
        "memory_latents": torch.randn(1, full_size.K, c, t, h, w, generator=g),
        "text": text,
        "t": torch.tensor([500.0]),
    }
    io = {k: _to(v, device, dtype) for k, v in io.items()}
    return model, encoder, family, io


def _to(value, device, dtype):
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    if value.is_floating_point() and value.ndim > 1:
        return value.to(device, dtype)
    return value.to(device)


def run(preset, device: torch.device, repeats: int) -> dict:
    result: dict = {"preset": preset.row, "device": _describe(device), "steps": {}, "train": {}}
    timings(preset, device, repeats, result)  # its bf16 model is freed when it returns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["correctness"] = correctness(preset, device)
    return result


def timings(preset, device: torch.device, repeats: int, result: dict) -> None:
    """Steps and training steps in bf16, into ``result``."""
    from dit_mem import attach_memory, detach_memory
    from dit_mem.backbone.reference import PaperFormMemory, paper_encode

    clock = Clock(device)
    model, encoder, family, io = build(preset, device, torch.bfloat16)

    def forward(kwargs=None):
        return family.training.predict(model, io["x"], io["t"], io["text"], kwargs, preset.fixed)

    with torch.no_grad():
        encoder.eval()
        memory = encoder(io["memory_latents"])
        dense = paper_encode(encoder, io["memory_latents"]).tokens
    for backend in backends(device):
        model.set_attention_backend(backend)
        with torch.no_grad():
            rows = {"none": clock.measure(forward, repeats)}
            attach_memory(model)
            rows["ours"] = clock.measure(lambda: forward({"memory_tokens": memory}), repeats)
            detach_memory(model)
            paper = PaperFormMemory(model)
            rows["paper"] = clock.measure(lambda: forward({"memory_tokens": dense}), repeats)
            paper.remove()
        result["steps"][backend] = rows
    model.set_attention_backend("native")

    model.enable_gradient_checkpointing()
    encoder.train().requires_grad_(True)

    def ours_step():
        attach_memory(model)
        loss = forward({"memory_tokens": encoder(io["memory_latents"])}).float().square().mean()
        loss.backward()
        detach_memory(model)
        encoder.zero_grad(set_to_none=True)

    def paper_step():
        paper = PaperFormMemory(model)
        mem = paper_encode(encoder, io["memory_latents"]).tokens
        loss = forward({"memory_tokens": mem}).float().square().mean()
        loss.backward()
        paper.remove()
        encoder.zero_grad(set_to_none=True)

    result["train"]["ours"] = clock.measure(ours_step, max(1, repeats - 1))
    result["train"]["paper"] = clock.measure(paper_step, max(1, repeats - 1))


def correctness(preset, device: torch.device) -> dict:
    """Whole model in float32, TF32 off: ours (lse and joint) against the dense form."""
    from dit_mem import attach_memory, detach_memory
    from dit_mem.backbone.reference import PaperFormMemory, paper_encode

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model, encoder, family, io = build(preset, device, torch.float32)
        encoder.eval()

        def forward(kwargs=None):
            return family.training.predict(
                model, io["x"], io["t"], io["text"], kwargs, preset.fixed
            )

        with torch.no_grad():
            memory = encoder(io["memory_latents"])
            dense = paper_encode(encoder, io["memory_latents"]).tokens
            paper = PaperFormMemory(model)
            want = forward({"memory_tokens": dense}).double()
            paper.remove()
            got = {}
            for route in ("lse", "joint"):
                attach_memory(model, route=route)
                got[route] = forward({"memory_tokens": memory}).double()
                detach_memory(model)
            stock = forward().double()
        norm = want.norm()
        return {
            "rel_err_lse": float((got["lse"] - want).norm() / norm),
            "rel_err_joint": float((got["joint"] - want).norm() / norm),
            "memory_changes_output": float((stock - want).norm() / norm),
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}"


def table(result: dict) -> str:
    lines = [
        f"device: {result['device']}; preset {result['preset']}",
        "",
        "| call | backend | s / call | peak GiB |",
        "|---|---|---:|---:|",
    ]
    for backend, rows in result["steps"].items():
        for name, r in rows.items():
            lines.append(
                f"| step, {name} | {backend} | {r['median_s']:.3f} | {r['peak_gib']:.1f} |"
            )
    for name, r in result["train"].items():
        lines.append(
            f"| training step, {name} | native | {r['median_s']:.3f} | {r['peak_gib']:.1f} |"
        )
    c = result["correctness"]
    lines += [
        "",
        f"float32 against the dense form: lse {c['rel_err_lse']:.2e}, joint {c['rel_err_joint']:.2e} "
        f"(memory moves the output by {c['memory_changes_output']:.2e})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the test suite's tiny Wan, on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    fs = full_size
    if args.tiny:
        preset, device = fs.tiny_presets()["tiny-wan"], torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here (run --tiny on CPU)", file=sys.stderr)
            return 2
        preset, device = fs.presets()["wan2.1-1.3b"], torch.device("cuda")
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    result = run(preset, device, args.repeats)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
