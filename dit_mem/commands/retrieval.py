"""``dit-mem build-index`` and ``dit-mem retrieve``: the memory bank's caption index."""

from __future__ import annotations

import argparse

from dit_mem.cli_types import count
from dit_mem.commands.options import add_index_options, add_trust_remote_code, index_options
from dit_mem.errors import UserError

DEFAULT_INDEX_DIR = "memory_index"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-index",
        help="embed a CSV's captions and write a FAISS index + id map + manifest",
        description="Embed the captions of an OpenVid-style CSV (columns video or video_path, "
        "caption) and write index.faiss, the id map (ids.arrow + lookups) and manifest.json to --out.",
    )
    p.add_argument("--csv", required=True, help="video table (columns: video|video_path, caption)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help=f"index folder (default: {DEFAULT_INDEX_DIR})")
    where.add_argument("--bank", default=None, help="build into this bank folder (BANK/index)")
    add_index_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    p.set_defaults(func=_build)

    r = sub.add_parser("retrieve", help="print the top-k memory videos for prompts")
    r.add_argument("prompts", nargs="+", help="one or more text prompts")
    r.add_argument("-k", type=int, default=5, help="videos per prompt (default 5)")
    r.add_argument("--index", default=None, help=f"index folder (default: {DEFAULT_INDEX_DIR})")
    r.add_argument("--bank", default=None, help="bank folder or Hub id (instead of --index)")
    r.add_argument("--model", default=None, help="embedding model (default: the manifest's)")
    add_trust_remote_code(r)
    r.add_argument(
        "--exclude",
        nargs="*",
        default=None,
        help="ids whose source videos are left out (applied to every prompt)",
    )
    r.add_argument("--nprobe", type=count(1), default=None, help="IVF cells searched")
    r.add_argument("--ef-search", type=count(1), default=None, help="HNSW search breadth")
    r.add_argument("--k-factor", type=count(1), default=None, help="pq: candidates re-ranked")
    r.set_defaults(func=_retrieve)


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dit_mem.retrieval import build_index

    if args.bank:  # a change of the bank: all or nothing, recorded
        from dit_mem.bank.build import index_part

        out = Path(args.bank) / "index"
        options = {**index_options(args), "kind": args.kind or "flat"}
        m = index_part(Path(args.bank), Path(args.csv), options, overwrite=args.overwrite)
    else:
        out = Path(args.out or DEFAULT_INDEX_DIR)
        options = {**index_options(args), "kind": args.kind or "flat"}
        m = build_index(args.csv, out, overwrite=args.overwrite, **options)
    print(
        f"index {out}: {m['rows']} captions ({m['dropped_empty_captions']} empty dropped), "
        f"{m['factory']}, {m['model']} {m['dim']}-d {m['pooling']} pooling, "
        f"recall@5 vs exact {m['recall_at_5']:.4f}"
    )
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    from dit_mem.retrieval import Retriever

    if args.bank and args.index:
        raise UserError("give --bank or --index, not both")
    search = {"nprobe": args.nprobe, "ef_search": args.ef_search, "k_factor": args.k_factor}
    if args.bank:
        from dit_mem.bank import MemoryBank

        retriever = MemoryBank.from_pretrained(
            args.bank,
            embedding_model=args.model,
            trust_remote_code=args.trust_remote_code,
            **search,
        ).retriever
    else:
        retriever = Retriever(
            args.index or DEFAULT_INDEX_DIR,
            model=args.model,
            trust_remote_code=args.trust_remote_code,
            **search,
        )
    exclude = [args.exclude] * len(args.prompts) if args.exclude else None
    for prompt, res in zip(
        args.prompts, retriever.retrieve(args.prompts, args.k, exclude), strict=True
    ):
        print(f"prompt: {prompt}")
        print(f"{'rank':>4}  {'score':>6}  {'id':<32}  caption")
        for rank, (vid, cap, score) in enumerate(
            zip(res.ids, res.captions, res.scores, strict=True), 1
        ):
            cap = cap if len(cap) <= 100 else cap[:97] + "..."
            print(f"{rank:>4}  {score:6.3f}  {vid:<32}  {cap}")
    return 0
