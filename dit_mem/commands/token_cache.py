"""``dit-mem cache-tokens``: latents → per-video memory tokens with a frozen encoder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-tokens",
        help="precompute each memory video's tokens (bf16, compact) so inference needs no latents",
    )
    p.add_argument(
        "--encoder",
        required=True,
        help="memory encoder: a save_pretrained folder or the release's .safetensors",
    )
    p.add_argument("--latents", default="latent", help="latent folder (default: latent)")
    p.add_argument("--out", default="tokens", help="token cache folder (default: tokens)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=4096, help="videos per shard file")
    p.add_argument("--num-workers", type=int, default=2, help="latent-reading workers")
    p.set_defaults(func=_cache)


def _cache(args: argparse.Namespace) -> int:
    from dit_mem.data import build_token_cache
    from dit_mem.memory import MemoryEncoder

    s = build_token_cache(
        MemoryEncoder.from_path(args.encoder),
        args.latents,
        args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
    )
    msg = f"this process cached {s.encoded} videos; {s.skipped} were cached before; {s.total} in total"
    if s.bytes_per_video:
        msg += f"; {s.bytes_per_video:.0f} bytes per video"
    print(msg)
    return 0
