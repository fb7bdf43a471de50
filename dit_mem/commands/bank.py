"""``dit-mem bank``: build, inspect, verify, share a memory bank folder; import the release's.

    dit-mem bank build --csv CSV --videos DIR --bank BANK --base-model M [--lazy | --for-training
        CSV | --add | --reindex --kind KIND] [--tokens ENCODER]
    dit-mem bank info BANK                      # parts, counts, the history of its changes
    dit-mem bank verify BANK [--base-model M]   # every file in full; what is damaged, the repair
    dit-mem bank export --bank BANK --encoder E --out DIR [--push-to-hub REPO]
    dit-mem bank push DIR REPO_ID               # (again) upload a bank folder
    dit-mem bank import-release --index memory_index --latents video_latents --out BANK

A bank folder is also built part by part with ``dit-mem build-index --bank BANK``,
``encode-latents --bank BANK`` and ``cache-tokens --bank BANK``. Every change is all or
nothing, and recorded (:mod:`dit_mem.bank.journal`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dit_mem.cli_types import count
from dit_mem.commands.options import (
    add_index_options,
    add_trust_remote_code,
    add_video_options,
    index_options,
    video_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bank", help="memory bank folders: build, info, verify, export, push, import the release's"
    )
    cmds = p.add_subparsers(dest="bank_command", metavar="ACTION", required=True)

    for add in (_add_build, _add_export, _add_push, _add_verify, _add_info, _add_import):
        add(cmds)


def _add_build(cmds: argparse._SubParsersAction) -> None:
    build = cmds.add_parser(
        "build",
        help="a bank folder from a video table: caption index + latents (or lazily, or only what "
        "training reads), resumable",
        description="Build a bank folder from a video table: the caption index and the latents of "
        "every video (default), or the index only with memory computed on first use (--lazy), or "
        "only the videos training reads (--for-training); --add adds rows to a bank.",
    )
    build.add_argument(
        "--csv", required=True, help="video table (columns: video|video_path, caption)"
    )
    build.add_argument("--bank", required=True, type=Path, help="the bank folder")
    add_video_options(build)
    add_index_options(build)
    mode = build.add_mutually_exclusive_group()
    mode.add_argument(
        "--lazy",
        action="store_true",
        help="index + video paths only: a retrieved video is encoded on first use and kept",
    )
    mode.add_argument(
        "--for-training",
        type=Path,
        default=None,
        metavar="CSV",
        help="encode only the training videos of CSV and the videos retrieved for them",
    )
    build.add_argument(
        "-k", type=count(1), default=None, help="--for-training: videos per sample (default 5)"
    )
    build.add_argument("--add", action="store_true", help="add the table's rows to the bank")
    build.add_argument(
        "--reindex",
        action="store_true",
        help="rebuild the bank's index (another --kind / --index-factory): every row kept, its "
        "captions embedded again",
    )
    build.add_argument("--tokens", default=None, metavar="ENCODER", help="also cache its tokens")
    build.add_argument(
        "--allow-failures", action="store_true", help="exit 0 even when videos failed"
    )
    build.set_defaults(func=_build)


def _add_export(cmds: argparse._SubParsersAction) -> None:
    export = cmds.add_parser(
        "export",
        help="a token-only copy of a bank (index + token cache + dataset card) to share",
    )
    export.add_argument("--bank", required=True, help="bank folder or Hub id")
    export.add_argument("--encoder", required=True, help="the memory encoder of the tokens")
    export.add_argument("--out", required=True, type=Path, help="the new folder")
    export.add_argument("--license", default=None, help="the card's licence field")
    export.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="then upload it")
    export.set_defaults(func=_export)


def _add_push(cmds: argparse._SubParsersAction) -> None:
    push = cmds.add_parser("push", help="upload a bank folder (an export) to a Hub dataset repo")
    push.add_argument("folder", type=Path, help="the bank folder (e.g. what bank export wrote)")
    push.add_argument("repo_id", help="the Hub dataset repository (user/name)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.set_defaults(func=_push)


def _add_verify(cmds: argparse._SubParsersAction) -> None:
    verify = cmds.add_parser(
        "verify",
        help="check every file of a bank in full; say what is damaged and how to repair it",
    )
    verify.add_argument("bank", type=Path, help="the bank folder")
    verify.add_argument(
        "--base-model",
        default=None,
        help="record this base model's VAE for a bank made before dit-mem recorded it",
    )
    verify.add_argument(
        "--repair",
        action="store_true",
        help="mend what is damaged from what is intact (the index from the id map; damaged "
        "latents and token shards removed, to be encoded again)",
    )
    add_trust_remote_code(verify)
    verify.set_defaults(func=_verify)


def _add_info(cmds: argparse._SubParsersAction) -> None:
    info = cmds.add_parser("info", help="what a bank folder holds")
    info.add_argument("bank", help="bank folder or Hub id")
    info.add_argument("--subfolder", default=None, help="the bank's folder in a Hub repository")
    info.set_defaults(func=_info)


def _add_import(cmds: argparse._SubParsersAction) -> None:
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
    from dit_mem.bank.journal import history

    bank = MemoryBank.from_pretrained(args.bank, subfolder=args.subfolder)
    manifest = bank.retriever.manifest
    print(f"bank {args.bank}: {len(bank)} videos")
    print(
        f"  index    {bank.retriever.root}: {manifest.get('kind', '?')}, "
        f"{manifest['model']} {manifest['dim']}-d"
    )
    if bank.latents is not None:
        m = bank.latents.manifest
        have = len(bank.latents.ids())
        print(
            f"  latents  {bank.latents.root}: {have} of {len(bank)} videos, shape "
            f"{m.get('latent_shape')} ({m.get('num_frames')} frames of {m.get('height')}×"
            f"{m.get('width')}, {m.get('resize')}, {m.get('family', 'wan')} VAE)"
        )
        records = history(bank.folder) if bank.folder is not None else []
        if records and records[0].get("memory") == "lazy":
            print("           lazy: the others are encoded on first use from videos/")
    if len(bank.retriever.unavailable):
        missing = sorted(bank.retriever.ids.take(bank.retriever.unavailable))
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
    records = history(bank.folder) if bank.folder is not None else []
    if records:
        print(f"  history  ({len(records)} changes)")
        shown = ("memory", "rows", "added", "encoded", "failed", "index", "from", "to", "cached")
        for r in records:
            facts = ", ".join(f"{k} {r[k]}" for k in shown if r.get(k) is not None)
            print(f"    {r.get('when', '?')}  {r.get('op')}: {facts}")
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


def _build(args: argparse.Namespace) -> int:
    from dit_mem.bank.build import BankBuildConfig, build_bank
    from dit_mem.commands.latents import failures_exit

    cfg = BankBuildConfig(
        csv=Path(args.csv),
        bank=args.bank,
        base_model=Path(args.base_model),
        videos=Path(args.videos) if args.videos else None,
        **video_options(args),
        index=index_options(args),
        tokens=args.tokens,
        lazy=args.lazy,
        for_training=args.for_training,
        k=args.k,
        add=args.add,
        reindex=args.reindex,
    )
    s = build_bank(cfg)
    if not s.is_main_process:
        return 0
    what = f"bank {args.bank}: {s.videos} videos"
    if args.add:
        what += f" ({s.added} added, {s.unchanged} already there)"
    print(what)
    if args.lazy:
        print(
            f"  lazy: {s.latents} of {s.videos} videos have latents; each other retrieved video is "
            "encoded on first use and kept"
        )
    elif args.for_training:
        share = s.to_encode / max(s.videos, 1)
        print(
            f"  for training: {s.to_encode} of {s.videos} bank videos to encode ({share:.1%}): "
            f"{s.training} training videos and {s.retrieved} distinct videos retrieved for them "
            f"at k={args.k or 5} (own source left out, as training does); train with "
            f"data.bank={args.bank} data.latent_dir={args.bank / 'latents'}"
        )
    if s.to_encode:
        print(
            f"  latents: {s.encoded} encoded, {s.to_encode - s.encoded - s.failed} already there, "
            f"{s.failed} failed"
        )
    return failures_exit(s.failed, args.bank / "latents" / "failures.jsonl", args.allow_failures)


def _export(args: argparse.Namespace) -> int:
    from dit_mem.bank.build import export_bank
    from dit_mem.memory.loading import load_memory_encoder

    encoder = load_memory_encoder(args.encoder).eval()
    f = export_bank(args.bank, encoder, args.out, license=args.license)
    print(
        f"exported {args.out}: {f['videos']} videos ({f['left_out']} without memory left out), "
        f"index {f['index_bytes']:,} B + tokens {f['token_bytes']:,} B = "
        f"{f['bytes_per_video']:,} B per video"
    )
    if args.push_to_hub:
        _push_and_say(args.out, args.push_to_hub)
    return 0


def _push_and_say(folder, repo_id: str, **options) -> None:
    from dit_mem.bank.build import push_bank

    commit = push_bank(folder, repo_id, **options)
    print(f"pushed {folder} to {getattr(commit, 'commit_url', repo_id)}")


def _push(args: argparse.Namespace) -> int:
    _push_and_say(args.folder, args.repo_id, private=args.private or None)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dit_mem.bank.verify import verify_bank

    report = verify_bank(
        args.bank,
        base_model=args.base_model,
        repair=args.repair,
        trust_remote_code=args.trust_remote_code,
    )
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1
