"""CPU time of one memory-encoder forward at the paper size, compact vs dense attention.

    python benchmarks/memory_encoder_forward.py [--videos 5] [--repeats 3] [--dtype float32]

The CNN branches are the same in both forms; the shared attention runs either on the
2·N distinct vectors with log-multiplicity bias (ours) or on the 2·N·100 dense tokens
(the paper's form). Both are timed end to end and the attention alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dit_mem.memory import MemoryEncoder, MemoryTokens


def dense_aggregate(enc: MemoryEncoder, videos) -> torch.Tensor:
    """The paper's form: every branch's N·100 tokens through the shared attention."""
    b, n, g, d = videos.high.shape
    counts = videos.log_counts.exp().round().long().repeat(n)
    outs = []
    for t in (videos.high, videos.low):
        dense = torch.repeat_interleave(t.reshape(b, n * g, d), counts, dim=1)
        outs.append(enc.attention(dense))
    return torch.cat(outs, dim=1)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--videos", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--preset", default="wan2.1-1.3b")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    enc = MemoryEncoder.from_preset(args.preset).eval().to(dtype)
    shape = (1, args.videos, enc.config.in_channels, *enc.config.latent_shape)
    x = torch.randn(shape, dtype=dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, input {list(shape)}"
    )

    with torch.no_grad():
        videos = enc.encode_videos(x)
        compact = enc.aggregate(videos)
        dense = dense_aggregate(enc, videos)
        err = ((compact.dense().float() - dense.float()).norm() / dense.float().norm()).item()
        rows = {
            "CNN branches (shared by both)": timed(lambda: enc.encode_videos(x), args.repeats),
            "attention, compact (ours)": timed(lambda: enc.aggregate(videos), args.repeats),
            "attention, dense (paper)": timed(lambda: dense_aggregate(enc, videos), args.repeats),
            "forward, compact (ours)": timed(lambda: enc(x), args.repeats),
            "forward, dense (paper)": timed(
                lambda: dense_aggregate(enc, enc.encode_videos(x)), args.repeats
            ),
        }
    assert isinstance(compact, MemoryTokens)
    print(
        f"compact tokens {tuple(compact.tokens.shape)} vs dense {tuple(dense.shape)}; rel. diff {err:.2e}"
    )
    print("| part | median ms |\n|---|---:|")
    for name, sec in rows.items():
        print(f"| {name} | {sec * 1e3:.1f} |")


if __name__ == "__main__":
    main()
