"""Building the caption index of a memory bank (``dit-mem build-index``, ``dit-mem bank build``).

An index folder holds

    index.faiss         FAISS index over L2-normalised caption embeddings (inner product = cosine)
    ids.arrow           one row per index row, in index order: id, video, caption, source, scores…
                        (Arrow IPC, memory-mapped: :mod:`dit_mem.data.idmap`)
    ids.lookup.npy      sorted id hashes → rows; sources.lookup.npy: the rows' source hashes
    manifest.json       embedding model, dim, pooling, kind, factory, search settings, rows,
                        recall@5, the sha256 of every file

Kinds: ``flat`` (exact ``IndexFlatIP``, the paper's choice, default), ``ivf`` (``IVF<n>,Flat``),
``hnsw`` (``HNSW<M>,Flat``) and ``pq`` (``IVF<n>,PQ<m>np``: IVF cells of product-quantised
codes in memory, 96 bytes a vector, whose top ``k_factor``·k candidates are re-ranked exactly
from the float16 vectors in ``vectors.npy``, read from disk at the candidates' rows only
(:class:`~dit_mem.retrieval.retriever.RowReader`); for 1M–100M entries), or any FAISS
``index_factory`` string (``--index-factory``). Trained kinds are trained on a sample and
filled in chunks, so memory stays bounded by the index itself. For approximate kinds the build
reports recall@5 against exact search on sampled queries. Search settings (``nprobe``,
``ef_search``, ``k_factor``) are recorded and can be changed at load. Folders of format /1 and /2 (``ids.parquet``) are still read.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import numpy as np

from dit_mem.data.idmap import ARROW_FILE, FILES, IdMap
from dit_mem.data.table import file_sha256, read_video_table, source_id
from dit_mem.errors import UserError
from dit_mem.utils import atomic_dir, get_logger, write_json_atomic

log = get_logger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw", "pq"]
KINDS = ("flat", "ivf", "hnsw", "pq")
INDEX_FILE = "index.faiss"
IDS_FILE = ARROW_FILE  # /3; ids.parquet in /1 and /2
MANIFEST = "manifest.json"
FORMAT = "dit-mem-index/3"  # /2: sha256 of index.faiss and ids.parquet; /3: ids.arrow + lookups
FORMATS = ("dit-mem-index/1", "dit-mem-index/2", FORMAT)
CHUNK = 65536  # vectors per add() and per embedding chunk: bounded memory at any bank size
TRAIN_SAMPLE = 256 * 1024  # at most this many vectors train an IVF / PQ index
RERANK_FILE = "vectors.npy"  # float16 [n, d]: exact re-ranking of pq candidates; each row checked
#                              where it is read, against ROWHASH_FILE (hashing gigabytes at every
#                              open would cost more than the search)
ROWHASH_FILE = "vectors.rowhash.npy"  # uint64 [n]: each re-rank row's checksum (row_hashes)
BLAS_THRESHOLD = 16  # batches of ≥ 16 queries use BLAS (faiss 1.15 default: 128,000 = never)
BLAS_DATABASE_BLOCK = 16384  # rows per GEMM block (default 1,024 makes BLAS no faster than SIMD)


def configure_faiss_blas(
    threshold: int = BLAS_THRESHOLD, database_block: int = BLAS_DATABASE_BLOCK
) -> None:
    """Make batched exact search use BLAS in large blocks (process-wide FAISS settings).

    Measured on 2 shared CPU cores, 64 queries, k=5 over 423k×768, 10 interleaved rounds:
    best 1.6 s with faiss's defaults vs 0.26–0.29 s with BLAS at any block size; medians under
    load from other processes 2.9 s (defaults), 6.6 s (1k-row blocks), 0.93 s (16k-row blocks).
    Workspace: at most 4,096 queries × 16,384 rows × 4 B = 256 MB.
    """
    import faiss

    faiss.cvar.distance_compute_blas_threshold = threshold
    faiss.cvar.distance_compute_blas_database_bs = database_block


def check_index_settings(
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int | None = None,
    ef_search: int | None = None,
    k_factor: int | None = None,
    pq_m: int | None = None,
) -> None:
    """``ValueError`` for settings FAISS would reject (or abort the process on: HNSW M < 2)."""
    for name, value, low in (
        ("nlist", nlist, 1),
        ("nprobe", nprobe, 1),
        ("hnsw_m", hnsw_m, 2),
        ("ef_search", ef_search, 1),
        ("k_factor", k_factor, 1),
        ("pq_m", pq_m, 1),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise UserError(f"{name} must be an integer ≥ {low}, got {value!r}")


def default_nlist(n: int) -> int:
    """IVF cell count: about 2·√n (1,300 for 423k), with at least 39 training points per cell."""
    return max(1, min(int(2 * math.sqrt(n)), n // 39))


def factory_string(
    kind: IndexKind, n: int, d: int, nlist: int | None = None, hnsw_m: int = 32, pq_m=None
) -> str:
    """The FAISS ``index_factory`` string of ``kind`` for ``n`` vectors of ``d`` dimensions."""
    if kind not in KINDS:
        raise UserError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    nlist = nlist or default_nlist(n)
    if nlist > n:
        raise UserError(f"IVF needs nlist ≤ number of vectors, got nlist={nlist}, n={n}")
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    m = pq_m or min(96, d // 4)
    if d % m:
        raise UserError(
            f"pq_m={m} must divide the embedding width {d} (codes of {m} sub-vectors); pick "
            "another --pq-m"
        )
    # np: no polysemous training (it only serves Hamming-filtered search; 3× the training time);
    # the candidates are re-ranked exactly from the float16 vectors on disk (RERANK_FILE)
    return f"IVF{nlist},PQ{m}np"


def make_index(
    vectors: np.ndarray,
    kind: IndexKind = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    seed: int = 0,
    factory: str | None = None,
    k_factor: int = 4,
    pq_m: int | None = None,
    progress: bool = False,
):
    """A FAISS inner-product index of ``kind`` (or of the ``factory`` string) holding
    ``vectors`` ``[n, d]`` (float32; a memory map works: it is read in chunks)."""
    import faiss
    from tqdm.auto import tqdm

    check_index_settings(nlist, nprobe, hnsw_m, ef_search, k_factor, pq_m)
    n, d = vectors.shape
    spec = factory or factory_string(kind, n, d, nlist=nlist, hnsw_m=hnsw_m, pq_m=pq_m)
    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"FAISS cannot build index_factory {spec!r}: {e}") from None
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, TRAIN_SAMPLE), replace=False))
        log.info("training %s on %d of %d vectors", spec, len(rows), n)
        try:
            index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
        except RuntimeError as e:
            raise UserError(f"FAISS cannot train {spec!r} on {len(rows)} vectors: {e}") from None
    configure_search(index, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
    bar = tqdm(total=n, desc="index", unit="vec", disable=not progress, dynamic_ncols=True)
    for start in range(0, n, CHUNK):
        index.add(np.ascontiguousarray(vectors[start : start + CHUNK], dtype=np.float32))
        bar.update(min(CHUNK, n - start))
    bar.close()
    return index


def search_settings(index) -> dict:
    """The search-time knobs ``index`` has (``nprobe``, ``ef_search``, ``k_factor``)."""
    import faiss

    out: dict = {}
    ivf = _ivf_of(index)
    if ivf is not None:
        out["nprobe"] = int(ivf.nprobe)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        out["ef_search"] = int(hnsw.hnsw.efSearch)
    if isinstance(index, faiss.IndexRefine):
        out["k_factor"] = int(index.k_factor)
    return out


def _ivf_of(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index):
    """The HNSW graph of ``index``: itself, its refined base, or its IVF's coarse quantiser."""
    import faiss

    for candidate in (
        index,
        getattr(index, "base_index", None),
        getattr(_ivf_of(index), "quantizer", None),
    ):
        if candidate is not None:
            candidate = faiss.downcast_index(candidate)
            if isinstance(candidate, faiss.IndexHNSW):
                return candidate
    return None


def configure_search(
    index, nprobe: int | None = None, ef_search: int | None = None, k_factor: int | None = None
) -> None:
    """Set the search-time knobs an index has: IVF ``nprobe``, HNSW ``ef_search`` (the graph
    itself or an IVF's HNSW coarse quantiser), a refine step's ``k_factor``; no-op for flat."""
    import faiss

    check_index_settings(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
    ivf = _ivf_of(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = nprobe
    hnsw = _hnsw_of(index)
    if ef_search is not None and hnsw is not None:
        hnsw.hnsw.efSearch = ef_search
    if k_factor is not None and isinstance(index, faiss.IndexRefine):
        index.k_factor = k_factor


def sample_queries(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Query vectors near the data: normalised midpoints of random pairs of bank vectors."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), size=(2, n))
    q = vectors[a] + vectors[b]
    q /= np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12)
    return q.astype(np.float32)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product of ``queries`` over ``vectors`` (scores, rows), in chunks of
    :data:`CHUNK` rows: a memory-mapped bank of any size is never loaded whole."""
    import faiss

    k = min(k, len(vectors))
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    for start in range(0, len(vectors), CHUNK):
        chunk = np.ascontiguousarray(vectors[start : start + CHUNK], dtype=np.float32)
        s, i = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_s, best_i


def rerank_search(index, vectors, queries: np.ndarray, k: int, k_factor: int):
    """Top-``k`` (scores, rows) per query: ``index``'s ``k_factor``·k candidates re-scored
    exactly against ``vectors`` (an array, memory map or ``RowReader``: read only at the
    candidates' rows)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    fetch = min(index.ntotal, k * k_factor)
    _, cand = index.search(queries, fetch)
    rows = np.where(cand >= 0, cand, 0)
    uniq, inv = np.unique(rows, return_inverse=True)
    table = np.asarray(vectors[uniq], dtype=np.float32)  # sorted rows: one pass over the map
    inv = inv.reshape(rows.shape)
    scores = np.stack([table[inv[q]] @ queries[q] for q in range(len(queries))])
    scores[cand < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)


def recall_at_k(
    index, vectors: np.ndarray, queries: np.ndarray, k: int = 5, k_factor: int | None = None
) -> float:
    """Fraction of the exact top-k (inner product over ``vectors``) that ``index`` returns
    (re-ranked from ``vectors`` with ``k_factor``, when given)."""
    _, truth = exact_search(vectors, queries, k)
    if k_factor:
        _, found = rerank_search(index, vectors, queries, truth.shape[1], k_factor)
    else:
        _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), truth.shape[1])
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
    return hits / truth.size


def write_index_folder(
    out: Path, index, table, manifest: dict, rerank=None, k_factor: int = 4
) -> None:
    """Write ``index.faiss``, the id map (``ids.arrow`` + lookups) and ``manifest.json`` (with
    every file's sha256) into a temporary folder, then put it in place of ``out`` whole: a
    reader sees the old index or the new one, never a mix.

    ``rerank``: the vectors (an array or a list of arrays, in row order) to store as
    :data:`RERANK_FILE` (float16), from which the retriever re-ranks ``k_factor`` · k candidates
    of an approximate index exactly; read from disk at the candidates' rows only.
    """
    import faiss

    if "source" not in table.columns:
        table = table.assign(source=table["id"].map(source_id))
    with atomic_dir(out) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        IdMap.write(tmp, table)
        manifest = {**manifest, "format": FORMAT, "search": search_settings(index)}
        if rerank is not None:
            parts = rerank if isinstance(rerank, list | tuple) else [rerank]
            n, d = sum(len(p) for p in parts), parts[0].shape[1]
            if n != index.ntotal:
                raise UserError(f"{n} re-rank vectors for an index of {index.ntotal}")
            from dit_mem.utils.fingerprint import row_hashes

            dest = np.lib.format.open_memmap(tmp / RERANK_FILE, "w+", np.float16, (n, d))
            hashes = np.empty(n, np.uint64)
            at = 0
            for part in parts:
                for start in range(0, len(part), CHUNK):
                    chunk = np.asarray(part[start : start + CHUNK], dtype=np.float32)
                    dest[at : at + len(chunk)] = chunk
                    hashes[at : at + len(chunk)] = row_hashes(dest[at : at + len(chunk)], at)
                    at += len(chunk)
            dest.flush()
            del dest
            np.save(tmp / ROWHASH_FILE, hashes)
            size = (tmp / RERANK_FILE).stat().st_size
            manifest["rerank"] = {
                "file": RERANK_FILE,
                "dtype": "float16",
                "bytes": size,
                "rowhash": ROWHASH_FILE,
            }
            manifest["search"]["k_factor"] = k_factor
        checked = (INDEX_FILE, *FILES, *((ROWHASH_FILE,) if rerank is not None else ()))
        manifest["sha256"] = {name: file_sha256(tmp / name) for name in checked}
        write_json_atomic(tmp / MANIFEST, manifest)


def embed_captions(emb, captions: list[str], batch_size: int, scratch: Path | None = None):
    """Normalised embeddings ``[n, dim]`` of ``captions``, embedded :data:`CHUNK` at a time; above
    four chunks into a memory map in ``scratch`` (the caller removes it) instead of memory."""
    from tqdm.auto import tqdm

    n = len(captions)
    if n <= 4 * CHUNK or scratch is None:
        return emb.encode(captions, batch_size=batch_size, progress=True)
    scratch.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(scratch / "embeddings.npy", "w+", np.float32, (n, emb.dim))
    for start in tqdm(range(0, n, CHUNK), desc="embed", unit="chunk", dynamic_ncols=True):
        out[start : start + CHUNK] = emb.encode(captions[start : start + CHUNK], batch_size)
    out.flush()
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    present = sorted(p.name for p in out.iterdir())
    known = (INDEX_FILE, "ids.parquet", *FILES, RERANK_FILE, ROWHASH_FILE, MANIFEST)
    foreign = [n for n in present if n not in known]
    if foreign:
        raise UserError(
            f"{out} holds files that are not an index ({', '.join(foreign[:5])}); the index "
            "folder is replaced as a whole, so give it a folder of its own"
        )
    if present and not overwrite:
        raise UserError(
            f"{out} already holds an index ({', '.join(present)}); pass --overwrite to replace it"
        )


def build_index(
    csv: str | Path,
    out: str | Path,
    model: str | Path | None = None,
    kind: IndexKind = "flat",
    batch_size: int = 256,
    overwrite: bool = False,
    device: str | None = None,
    embedder=None,
    trust_remote_code: str | None = None,
    **settings,
) -> dict:
    """Embed the captions of ``csv`` and write an index folder at ``out``; returns the manifest.

    ``settings``: :func:`build_index_from_table`'s (``nlist``, ``nprobe``, ``hnsw_m``,
    ``ef_search``, ``factory``, ``k_factor``, ``pq_m``, ``recall_queries``). Everything is read
    and computed before anything is written; the folder is then written whole
    (:func:`write_index_folder`), and an existing index is only replaced with ``overwrite=True``.
    """
    from dit_mem.retrieval.embedder import load_embedder

    out = Path(out)
    if kind not in KINDS:
        raise UserError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_index_settings(
        settings.get("nlist"),
        settings.get("nprobe"),
        settings.get("hnsw_m"),
        settings.get("ef_search"),
        settings.get("k_factor"),
        settings.get("pq_m"),
    )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    _check_out(out, overwrite)
    table = read_video_table(csv)
    emb = embedder
    if emb is None:
        emb = load_embedder(model, device=device, trust_remote_code=trust_remote_code)
    return build_index_from_table(
        table,
        out,
        emb,
        kind=kind,
        batch_size=batch_size,
        csv=str(Path(csv).resolve()),
        csv_sha256=file_sha256(csv),
        **settings,
    )


def _manifest(index, emb, kind, factory, spec, hnsw_m, table, recall: float) -> dict:
    """An index folder's manifest: the embedding model, the index and its search settings."""
    import faiss

    settings = search_settings(index)
    ivf = _ivf_of(index)
    return {
        "format": FORMAT,
        "model": emb.name,
        "model_path": str(Path(emb.path).resolve()),
        "dim": emb.dim,
        "pooling": emb.pooling,
        "normalized": True,
        "metric": "inner_product",
        "kind": kind if factory is None else "factory",
        "factory": spec,
        "nlist": int(ivf.nlist) if ivf is not None else None,
        "nprobe": settings.get("nprobe"),
        "hnsw_m": hnsw_m if kind == "hnsw" and factory is None else None,
        "ef_search": settings.get("ef_search"),
        "k_factor": settings.get("k_factor"),
        "rows": int(index.ntotal),
        "dropped_empty_captions": int(table.attrs.get("dropped_empty_captions", 0)),
        "csv": None,
        "csv_sha256": None,
        "recall_at_5": round(recall, 4),
        "faiss_version": faiss.__version__,
    }


def build_index_from_table(
    table,
    out: str | Path,
    emb,
    kind: IndexKind = "flat",
    nlist: int | None = None,
    nprobe: int | None = 16,
    hnsw_m: int | None = 32,
    ef_search: int | None = 128,
    batch_size: int = 256,
    recall_queries: int = 1000,
    factory: str | None = None,
    k_factor: int | None = 4,
    pq_m: int | None = None,
    csv: str | None = None,
    csv_sha256: str | None = None,
) -> dict:
    """The index folder ``out`` of a video table's captions, embedded with ``emb``."""
    import shutil

    nprobe, hnsw_m, ef_search = nprobe or 16, hnsw_m or 32, ef_search or 128
    k_factor = k_factor or 4
    if kind not in KINDS:
        raise UserError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_index_settings(nlist, nprobe, hnsw_m, ef_search, k_factor, pq_m)
    if (
        isinstance(recall_queries, bool)
        or not isinstance(recall_queries, int)
        or recall_queries < 0
    ):
        raise UserError(f"recall_queries must be an integer ≥ 0, got {recall_queries!r}")
    out = Path(out)
    spec = factory or factory_string(kind, len(table), emb.dim, nlist, hnsw_m, pq_m)
    reranked = kind == "pq" and factory is None  # candidates re-ranked from RERANK_FILE

    scratch = out.parent / f".tmp-embed-{out.name}"
    try:
        t0 = time.perf_counter()
        vectors = embed_captions(emb, table["caption"].tolist(), batch_size, scratch)
        t_embed = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = make_index(
            vectors, kind, nlist, nprobe, hnsw_m, ef_search, factory=spec, k_factor=k_factor
        )
        t_build = time.perf_counter() - t0
        recall = 1.0
        if spec != "Flat" and recall_queries > 0:
            configure_faiss_blas()
            queries = sample_queries(vectors, min(recall_queries, len(vectors)))
            rerank = k_factor if reranked else None
            recall = recall_at_k(index, vectors, queries, k=5, k_factor=rerank)
            log.info("%s index: recall@5 vs exact = %.4f on %d queries", spec, recall, len(queries))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise

    meta = table.assign(source=table["id"].map(source_id))
    manifest = _manifest(index, emb, kind, factory, spec, hnsw_m, table, recall)
    manifest |= {"csv": csv, "csv_sha256": csv_sha256}
    manifest["seconds"] = {"embed": round(t_embed, 2), "build": round(t_build, 2)}
    rerank = vectors if reranked else None
    try:
        write_index_folder(out, index, meta, manifest, rerank=rerank, k_factor=k_factor)
    finally:
        del vectors
        shutil.rmtree(scratch, ignore_errors=True)
    log.info(
        "wrote %s: %d captions, %s index, %s (%d-d, %s pooling)",
        out,
        manifest["rows"],
        spec,
        emb.name,
        emb.dim,
        emb.pooling,
    )
    return manifest
