"""One real transformer block per family at its full sequence length, on CPU: our memory path
against a float64 oracle (the paper's dense form), and the block's time with and without memory.

    python benchmarks/full_size_block.py --preset wan2.1-1.3b [--frames T] [--repeats 3]
    python benchmarks/full_size_block.py --preset all

For each preset (``benchmarks/full_size.py``'s): the base model's real transformer config with
one block, random weights (seeded), the preset's memory encoder (random weights), k = 5 random
retrieved latents and random latents at the preset's geometry (``--frames`` shortens the latent
frames of the denoised video; say so where you do). Then

* the oracle: the same weights in float64, the memory encoder the paper's way (its shared
  attention over the 1,000 dense tokens) and the block the paper's way (the dense tokens as
  queries and keys);
* ours in float32 and in bfloat16 (the pipeline's compact tokens and memory attention), and the
  paper's form in bfloat16 too: relative error ``‖out − oracle‖ / ‖oracle‖``. The bf16 rows
  run the block in bf16 on the encoder's float32 tokens cast to bf16 (CPU bf16 convolutions
  take many minutes at these sizes; the block is what is compared);
* time of one forward in float32 without and with memory, interleaved, median of ``--repeats``.

Prints a Markdown table; ``--json OUT`` writes the rows. The last table is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import full_size  # benchmarks/full_size.py (this folder is on sys.path when a script here runs)
import torch

HERE = Path(__file__).resolve().parent


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def run(preset, frames: int | None = None, repeats: int = 3, seed: int = 0) -> dict:
    """The errors and times of one block of ``preset`` (a ``full_size.Preset``)."""
    import diffusers

    from dit_mem import attach_memory, detach_memory
    from dit_mem.backbone import family_of
    from dit_mem.backbone.reference import PaperFormMemory, paper_encode
    from dit_mem.memory import MemoryEncoder

    torch.manual_seed(seed)
    cls = getattr(diffusers, preset.cls)
    model = cls.from_config({**preset.config, "num_layers": 1}).eval().requires_grad_(False)
    encoder = MemoryEncoder.from_preset(preset.name).eval().requires_grad_(False)
    family = family_of(model)
    c, (t, h, w) = encoder.config.in_channels, encoder.config.latent_shape
    x = torch.randn(1, c, frames or t, h, w)
    memory_latents = torch.randn(1, full_size.K, c, t, h, w)
    texts = [{s: torch.randn(n, d) for s, (n, d) in preset.text.items()}]
    text = family.training.text_kwargs(texts, max(n for n, _ in preset.text.values()))
    timestep = torch.tensor([500.0])

    def forward(m, dtype, memory=None):
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in text.items()}
        kwargs = None if memory is None else {"memory_tokens": memory}
        return family.training.predict(m, x.to(dtype), timestep, cast, kwargs, preset.fixed)

    row = {"preset": preset.row, "latent": [frames or t, h, w]}
    with torch.no_grad():
        # the oracle: float64, the paper's encoder and block
        model64, encoder64 = copy.deepcopy(model).double(), copy.deepcopy(encoder).double()
        dense64 = paper_encode(encoder64, memory_latents.double()).tokens
        paper = PaperFormMemory(model64)
        start = time.perf_counter()
        oracle = forward(model64, torch.float64, dense64)
        row["oracle_s"] = time.perf_counter() - start
        paper.remove()
        del model64, encoder64
        row["tokens"] = {"video": _video_tokens(model, x), "memory_dense": dense64.shape[1]}

        attach_memory(model)
        memory32 = encoder(memory_latents)
        row["tokens"]["memory_distinct"] = memory32.num_distinct
        row["err_fp32"] = _relative(forward(model, torch.float32, memory32), oracle)

        # bf16: the block in bf16; the encoder's tokens from float32, cast (CPU bf16
        # convolutions take minutes at these sizes, and the block is what is compared here)
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        memory16 = memory32.to(torch.bfloat16)
        attach_memory(model16)
        row["err_bf16"] = _relative(forward(model16, torch.bfloat16, memory16), oracle)
        detach_memory(model16)
        dense16 = paper_encode(encoder, memory_latents).tokens.to(torch.bfloat16)
        paper16 = PaperFormMemory(model16)
        row["err_bf16_paper"] = _relative(forward(model16, torch.bfloat16, dense16), oracle)
        paper16.remove()
        del model16, oracle

        times: dict[str, list[float]] = {"none": [], "memory": []}
        for _ in range(repeats):  # interleaved
            for name, memory in (("none", None), ("memory", memory32)):
                start = time.perf_counter()
                forward(model, torch.float32, memory)
                times[name].append(time.perf_counter() - start)
    row["times_s"] = times
    row["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    row["overhead_pct"] = 100 * (row["median_s"]["memory"] / row["median_s"]["none"] - 1)
    return row


def _video_tokens(model, x: torch.Tensor) -> int:
    """Video tokens after the family's patch embedding."""
    cfg = model.config
    patch = cfg.get("patch_size", 1)
    if isinstance(patch, list | tuple):
        pt, ph, pw = patch
    else:
        pt, ph, pw = cfg.get("patch_size_t", 1) or 1, patch, patch
    t, h, w = x.shape[2:]
    return (t // pt) * (h // ph) * (w // pw)


def table(rows: list[dict]) -> str:
    header = "preset,latent T×H×W,video tokens,rel. err fp32 (ours),rel. err bf16 (ours),"
    header += "rel. err bf16 (paper form),s / block no memory,s / block memory,overhead"
    cells = [
        [r["preset"], "×".join(map(str, r["latent"])), f"{r['tokens']['video']:,}"]
        + [f"{r[k]:.2e}" for k in ("err_fp32", "err_bf16", "err_bf16_paper")]
        + [f"{r['median_s'][k]:.2f}" for k in ("none", "memory")]
        + [f"{r['overhead_pct']:+.2f}%"]
        for r in rows
    ]
    return full_size.markdown(header.split(","), 2, cells)


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting with to() is for loaded weights
    fs = full_size
    every = {**fs.presets(), **fs.tiny_presets()}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="all", choices=[*every, "all", "tiny"])
    p.add_argument("--frames", type=int, default=None, help="latent frames of the denoised video")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    groups = {
        "all": ["wan2.1-1.3b", "ltx-video-2b", "hunyuanvideo-1.5"],  # one per family
        "tiny": list(fs.tiny_presets()),
    }
    rows = []
    for name in groups.get(args.preset, [args.preset]):
        rows.append(run(every[name], args.frames, args.repeats))
        print(f"{name}: done", file=sys.stderr, flush=True)
        if args.json:  # after each preset: a long run keeps what it has
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            tmp.replace(args.json)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
