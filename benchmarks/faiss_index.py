"""FAISS at memory-bank scale: build time and k=5 query latency, exact vs IVF, with recall@5.

    python benchmarks/faiss_index.py                # 423k × 768 (the paper's bank, gte-base size)
    python benchmarks/faiss_index.py --n 50000      # quicker

Vectors are random and L2-normalised (float32). Two query sets of 1,000: *random* unit vectors
(no structure: the worst case for IVF) and *near-bank* queries (normalised midpoints of two bank
vectors, closer to real prompts whose neighbours sit in a few cells). Latency is the best and the
median of repeated searches (best: least disturbed by other processes); 1 query and a batch of 64. The exact index is timed with FAISS's default BLAS
threshold (128,000 in faiss 1.15: batches never use BLAS), with the threshold at 16, and with
the threshold at 16 plus 16k-row database blocks (what the Retriever sets).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def timed(fn, repeat: int) -> tuple[float, float]:
    """``(best, median)`` wall time of ``fn()`` in ms over ``repeat`` calls after a warm-up.

    The best of several runs is the figure to compare on a shared machine: other processes
    only ever add time.
    """
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return min(times), statistics.median(times)


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    return (
        sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
        / truth.size
    )


def main() -> None:
    import faiss

    from dit_mem.retrieval.index import (
        BLAS_DATABASE_BLOCK,
        configure_faiss_blas,
        default_nlist,
        make_index,
        sample_queries,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=423_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q_rand = rng.standard_normal((1000, args.dim), dtype=np.float32)
    q_rand /= np.linalg.norm(q_rand, axis=1, keepdims=True)
    q_near = sample_queries(x, 1000, seed=1)
    print(
        f"# {args.n:,} × {args.dim} float32, k={args.k}, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs"
    )

    t = time.perf_counter()
    flat = make_index(x, "flat")
    t_flat = time.perf_counter() - t
    rows = []
    default_thr = faiss.cvar.distance_compute_blas_threshold
    default_bs = faiss.cvar.distance_compute_blas_database_bs
    settings = [
        (f"flat (exact), faiss defaults (BLAS threshold {default_thr:,})", default_thr, default_bs),
        (f"flat (exact), BLAS threshold 16, database block {default_bs:,}", 16, default_bs),
        (
            f"flat (exact), BLAS threshold 16, database block {BLAS_DATABASE_BLOCK:,} (Retriever)",
            16,
            BLAS_DATABASE_BLOCK,
        ),
    ]
    for label, thr, bs in settings:
        faiss.cvar.distance_compute_blas_threshold = thr
        faiss.cvar.distance_compute_blas_database_bs = bs
        one = timed(lambda: flat.search(q_rand[:1], args.k), args.repeat)
        many = timed(lambda: flat.search(q_rand[:64], args.k), args.repeat)
        rows.append((label, t_flat, one, many, 1.0, 1.0))
    configure_faiss_blas()
    _, truth_rand = flat.search(q_rand, args.k)
    _, truth_near = flat.search(q_near, args.k)

    nlist = args.nlist or default_nlist(args.n)
    t = time.perf_counter()
    ivf = make_index(x, "ivf", nlist=nlist)
    t_ivf = time.perf_counter() - t
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        one = timed(lambda: ivf.search(q_rand[:1], args.k), args.repeat)
        many = timed(lambda: ivf.search(q_rand[:64], args.k), args.repeat)
        r_rand = recall(truth_rand, ivf.search(q_rand, args.k)[1])
        r_near = recall(truth_near, ivf.search(q_near, args.k)[1])
        rows.append((f"IVF nlist {nlist}, nprobe {nprobe}", t_ivf, one, many, r_rand, r_near))

    print(
        "| index | build s | 1 query ms best / median | 64 queries ms best / median "
        "| recall@5 random q | recall@5 near-bank q |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, build, one, many, rr, rn in rows:
        print(
            f"| {name} | {build:.1f} | {one[0]:.1f} / {one[1]:.1f} | {many[0]:.1f} / {many[1]:.1f} "
            f"| {rr:.3f} | {rn:.3f} |"
        )


if __name__ == "__main__":
    main()
