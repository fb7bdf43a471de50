"""``dit-mem encode-latents``: videos → normalised Wan-VAE latents (one file per video).

Multi-GPU: ``accelerate launch --num_processes 8 -m dit_mem.cli encode-latents ...``;
process i encodes rows i::n. Re-running resumes.
"""

from __future__ import annotations

import argparse

from dit_mem.cli_types import count
from dit_mem.commands.options import add_video_options, video_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode-latents",
        help="decode videos and encode them with the Wan VAE into bf16 latents (resumable)",
    )
    p.add_argument("--csv", required=True, help="video table (column video or video_path)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="latent folder (default: latent)")
    where.add_argument("--bank", default=None, help="encode into this bank folder (BANK/latents)")
    add_video_options(p)
    p.add_argument(
        "--limit", type=count(1), default=None, help="only the first N rows (smoke runs)"
    )
    p.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when videos failed (they are recorded in failures.jsonl and the bank "
        "keeps them out of retrieval); by default a job with failed videos exits 1",
    )
    p.set_defaults(func=_encode)


def _encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dit_mem.data import LatentJobConfig, encode_latents

    out = Path(args.bank) / "latents" if args.bank else Path(args.out or "latent")
    cfg = LatentJobConfig(
        csv=Path(args.csv),
        out=out,
        base_model=Path(args.base_model),
        videos=Path(args.videos) if args.videos else None,
        **video_options(args),
        limit=args.limit,
    )
    s = encode_latents(cfg)
    if args.bank and s.is_main_process:
        from dit_mem.bank.build import record_encoding

        record_encoding(Path(args.bank), s.ok, s.failed, Path(args.csv).resolve())
    print(f"encoded {s.ok}, skipped {s.skipped} (already done), failed {s.failed}")
    return failures_exit(s.failed, out / "failures.jsonl", args.allow_failures)


def failures_exit(failed: int, record, allowed: bool) -> int:
    """Exit status of a job that could not encode ``failed`` videos: 1, unless allowed."""
    import sys

    if not failed:
        return 0
    print(
        f"{failed} video(s) could not be encoded (see {record}); they have no memory and "
        "retrieval leaves them out. Fix or remove them and run again (finished videos are kept)"
        + (", or accept them with --allow-failures" if not allowed else ""),
        file=sys.stderr,
    )
    return 0 if allowed else 1
