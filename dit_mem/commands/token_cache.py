"""``dit-mem cache-tokens``: latents → per-video memory tokens with a frozen encoder."""

from __future__ import annotations

import argparse

from dit_mem.errors import UserError


def read_manifest_failures(bank) -> list[str]:
    from dit_mem.bank.journal import read_manifest

    return list(read_manifest(bank).get("without_memory") or [])


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
    p.add_argument("--latents", default=None, help="latent folder (default: latent)")
    p.add_argument("--out", default=None, help="token cache folder (default: tokens)")
    p.add_argument(
        "--bank", default=None, help="cache into this bank folder (BANK/latents → BANK/tokens)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=4096, help="videos per shard file")
    p.add_argument("--num-workers", type=int, default=2, help="latent-reading workers")
    p.set_defaults(func=_cache)


def _cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dit_mem.data import build_token_cache
    from dit_mem.memory.loading import load_memory_encoder

    if args.bank and (args.latents or args.out):
        raise UserError("give --bank, or --latents and --out, not both")
    bank = Path(args.bank) if args.bank else None
    options = {
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "num_workers": args.num_workers,
    }
    encoder = load_memory_encoder(args.encoder)
    if bank is not None:  # a change of the bank: all or nothing, recorded
        from dit_mem.bank.build import cache_tokens
        from dit_mem.bank.journal import locked

        with locked(bank, "cache-tokens"):
            s = cache_tokens(bank, encoder, **options)
        failed = read_manifest_failures(bank) if s.is_main_process else []
        if failed:
            print(
                f"{len(failed)} bank video(s) have no latent (their encoding failed, see "
                f"{bank / 'latents' / 'failures.jsonl'}): no tokens; retrieval leaves them out"
            )
    else:
        s = build_token_cache(encoder, args.latents or "latent", args.out or "tokens", **options)
    msg = f"this process cached {s.encoded} videos; {s.skipped} were cached before; {s.total} in total"
    if s.bytes_per_video:
        msg += f"; {s.bytes_per_video:.0f} bytes per video"
    print(msg)
    return 0
