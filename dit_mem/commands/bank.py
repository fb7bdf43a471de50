"""``dit-mem bank``: inspect a memory bank folder, import the release's files into one.

    dit-mem bank info BANK
    dit-mem bank import-release --index memory_index --latents video_latents --out BANK \\
        [--videos video] [--embedding-model model/gte-base-en-v1.5]

A bank folder is built part by part with ``dit-mem build-index --bank BANK``,
``encode-latents --bank BANK`` and ``cache-tokens --bank BANK``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bank", help="memory bank folders: info, import the release's files")
    cmds = p.add_subparsers(dest="bank_command", metavar="ACTION", required=True)

    info = cmds.add_parser("info", help="what a bank folder holds")
    info.add_argument("bank", help="bank folder or Hub id")
    info.add_argument("--subfolder", default=None, help="the bank's folder in a Hub repository")
    info.set_defaults(func=_info)

    imp = cmds.add_parser(
        "import-release",
        help="convert the release's memory_index/ (labels.index, id_map.json, metadata.json) and "
        "<id>.pt latents into a bank folder",
    )
    imp.add_argument("--index", required=True, type=Path, help="the release's memory_index/")
    imp.add_argument("--latents", required=True, type=Path, help="folder of <id>.pt latents")
    imp.add_argument("--out", required=True, type=Path, help="the bank folder to write")
    imp.add_argument("--videos", type=Path, default=None, help="video folder (previews; linked)")
    imp.add_argument(
        "--embedding-model",
        type=Path,
        default=None,
        help="local gte-base-en-v1.5 folder the index was built with (recorded for retrieval)",
    )
    imp.add_argument("--no-progress", action="store_true")
    imp.set_defaults(func=_import)


def _info(args: argparse.Namespace) -> int:
    from dit_mem.bank import MemoryBank

    bank = MemoryBank.from_pretrained(args.bank, subfolder=args.subfolder)
    manifest = bank.retriever.manifest
    print(f"bank {args.bank}: {len(bank)} videos")
    print(
        f"  index    {bank.retriever.root}: {manifest.get('kind', '?')}, "
        f"{manifest['model']} {manifest['dim']}-d"
    )
    if bank.latents is not None:
        m = bank.latents.manifest
        print(f"  latents  {bank.latents.root}: shape {m.get('latent_shape')}")
    if bank.retriever.unavailable:
        missing = sorted(bank.retriever.ids[r] for r in bank.retriever.unavailable)
        print(
            f"  without memory: {len(missing)} videos whose encoding failed (retrieval leaves them "
            f"out; see {bank.latents.root / 'failures.jsonl'}): {', '.join(missing[:5])}"
            + (" …" if len(missing) > 5 else "")
        )
    if bank.tokens is not None:
        m = bank.tokens.manifest
        print(
            f"  tokens   {bank.tokens.root}: {m.get('count')} videos, encoder "
            f"{str(m.get('encoder_fingerprint'))[:12]}…"
        )
    if bank.videos is not None:
        print(f"  videos   {bank.videos}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from dit_mem.release import import_release

    s = import_release(
        args.index,
        args.latents,
        args.out,
        videos=args.videos,
        embedding_model=args.embedding_model,
        progress=not args.no_progress,
    )
    print(
        f"bank {args.out}: {s.videos} videos indexed, {s.converted} latents converted, "
        f"{s.kept} kept from an earlier run, {len(s.missing)} without a latent"
    )
    return 0
