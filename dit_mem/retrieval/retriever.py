"""``Retriever``: top-k memory videos for text prompts (method §1, step 1).

    retriever = Retriever("memory_index/")               # model from the manifest
    [res] = retriever.retrieve(["a red fox in snow"], k=5)
    res.ids, res.captions, res.scores

Training excludes the training video itself and every clip cut from the same source video:

    retriever.retrieve(captions, k=5, exclude=batch_ids)  # one id (or list of ids) per prompt
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_mem.data.idmap import ARROW_FILE, PARQUET_FILE, IdMap, hash64
from dit_mem.data.idmap import FILES as ID_MAP_FILES
from dit_mem.data.table import file_sha256, is_safe_id, source_id, video_id
from dit_mem.errors import UserError
from dit_mem.retrieval.embedder import Embedder, load_embedder, model_name
from dit_mem.retrieval.index import (
    FORMATS,
    INDEX_FILE,
    MANIFEST,
    RERANK_FILE,
    configure_faiss_blas,
    configure_search,
    rerank_search,
)
from dit_mem.utils import get_logger

log = get_logger(__name__)


@dataclass
class RetrievalResult:
    """Top-k memory videos for one prompt, best first."""

    ids: list[str]
    captions: list[str]
    scores: list[float]  # cosine similarity of prompt and caption

    def __len__(self) -> int:
        return len(self.ids)

    def records(self) -> list[dict]:
        """``[{"rank", "id", "caption", "score"}, ...]``, best first (what sidecars record)."""
        return [
            {"rank": i + 1, "id": vid, "caption": cap, "score": score}
            for i, (vid, cap, score) in enumerate(
                zip(self.ids, self.captions, self.scores, strict=True)
            )
        ]


Exclusion = str | Iterable[str] | None


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise UserError(f"{path}: not an index manifest (format {FORMATS[-1]})")
    for key, kind in (("rows", int), ("dim", int), ("model", str)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise UserError(f"{path}: {key!r} must be a {kind.__name__}")
    return manifest


class Retriever:
    """Caption index of a memory bank + the embedding model it was built with.

    ``model``: ``None`` loads the model named in the manifest (its recorded folder; a relative
    path is taken relative to the index folder); a name/folder or a loaded :class:`Embedder`
    must match the manifest's model name and dimension (``ValueError`` otherwise).
    ``trust_remote_code`` names a model whose own code may run (see :func:`load_embedder`).
    ``nprobe`` / ``ef_search`` override the IVF / HNSW search settings. The index and id map
    must match the checksums in the manifest.
    """

    def __init__(
        self,
        index_dir: str | Path,
        model: str | Path | Embedder | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str | None = None,
        trust_remote_code: str | None = None,
        k_factor: int | None = None,
    ):
        import faiss

        self.root = Path(index_dir)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} not found: {self.root} is not a complete index folder"
            )
        self.manifest = _read_manifest(manifest)
        ids_files = ID_MAP_FILES if (self.root / ARROW_FILE).is_file() else (PARQUET_FILE,)
        rowhash = (self.manifest.get("rerank") or {}).get("rowhash")
        checked = (MANIFEST, INDEX_FILE, *ids_files, *((rowhash,) if rowhash else ()))
        paths = {name: self.root / name for name in checked}
        for p in paths.values():
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} not found: {self.root} is not a complete index folder"
                )
        self._verify_checksums(paths)
        try:
            self.index = faiss.read_index(str(paths[INDEX_FILE]))
        except RuntimeError as e:
            raise UserError(f"{paths[INDEX_FILE]}: not a readable FAISS index ({e})") from None
        self.id_map = IdMap.open(self.root)
        n_index, n_ids, n_manifest = self.index.ntotal, len(self.id_map), self.manifest["rows"]
        if not n_index == n_ids == n_manifest:
            raise UserError(
                f"{self.root}: index/id-map row mismatch: {INDEX_FILE} has {n_index} vectors, "
                f"{ids_files[0]} has {n_ids} rows, {MANIFEST} says {n_manifest}; rebuild the index"
            )
        if self.index.d != self.manifest["dim"]:
            raise UserError(
                f"{paths[INDEX_FILE]}: vectors are {self.index.d}-d but {MANIFEST} says "
                f"{self.manifest['dim']}-d; rebuild the index"
            )
        self.ids, self.captions = self.id_map.ids, self.id_map.captions
        bad = self.id_map.unsafe_ids(is_safe_id)
        if bad:
            raise UserError(
                f"{paths[ids_files[0]]}: {len(bad)} id(s) are not plain file names (e.g. "
                f"{bad[0]!r}); ids name files inside the bank's folders"
            )
        self.unavailable: np.ndarray = np.zeros(0, np.int64)  # rows never returned (no memory)
        self._model = self._model_source(model)  # checked now, loaded when first needed
        self._device, self._trust_remote_code = device, trust_remote_code
        self._embedder: Embedder | None = model if isinstance(model, Embedder) else None
        search = {
            "nprobe": self.manifest.get("nprobe"),
            "ef_search": self.manifest.get("ef_search"),
            **(self.manifest.get("search") or {}),
        }
        given = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor}
        search |= {k: v for k, v in given.items() if v is not None}
        configure_search(self.index, **search)
        self.rerank = self._open_rerank()  # exact re-ranking of an IVF-PQ index's candidates
        self.k_factor = search.get("k_factor") or 4
        configure_faiss_blas()

    def _open_rerank(self):
        """The float16 vectors of a ``pq`` index, read row by row (None if the index has none);
        checked by size and shape, not hashed (gigabytes)."""
        record = self.manifest.get("rerank")
        if not record:
            return None
        path = self.root / RERANK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {self.root} is not a complete index folder")
        if path.stat().st_size != record.get("bytes"):
            raise UserError(
                f"{path} does not match the size in {self.root / MANIFEST}: the folder was "
                "changed after it was written; rebuild the index"
            )
        hashes = None
        if record.get("rowhash"):
            hashes = np.load(self.root / record["rowhash"], allow_pickle=False)
        else:
            log.warning(
                "%s: written by an older dit-mem, its rows unchecked; rebuild the index to have "
                "them verified (`dit-mem bank build ... --reindex`)",
                path,
            )
        try:
            vectors = RowReader(path, hashes)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable vector file ({e})") from None
        if vectors.dtype != np.float16 or vectors.shape != (self.index.ntotal, self.index.d):
            raise UserError(
                f"{path}: expected float16 [{self.index.ntotal}, {self.index.d}], got "
                f"{vectors.dtype} {list(vectors.shape)}"
            )
        return vectors

    @property
    def table(self):
        """The id map as a pandas DataFrame (every row in memory: for small banks and tools)."""
        return self.id_map.table.to_pandas()

    def _verify_checksums(self, paths: dict[str, Path]) -> None:
        sums = self.manifest.get("sha256")
        if sums is None:
            log.warning(
                "%s: written by an older dit-mem, without checksums; rebuild it with "
                "`dit-mem build-index --overwrite` to have the files verified",
                self.root,
            )
            return
        for name in paths:
            if name != MANIFEST and sums.get(name) != file_sha256(paths[name]):
                raise UserError(
                    f"{paths[name]} does not match the checksum in {paths[MANIFEST]}: the folder "
                    "was changed after it was written (or only partly replaced); rebuild the index"
                )

    def _model_source(self, model) -> str | Path | Embedder | None:
        """Which model embeds the prompts (``None``: the bundled default); checked, not loaded."""
        want_name = self.manifest["model"]
        if isinstance(model, Embedder):
            self._check_embedder(model)
            return model
        if model is not None:
            if model_name(model) != want_name:
                fix = ""
                if str(self.manifest.get("source", "")).startswith("DiT-Mem release"):
                    fix = (
                        "; if the manifest is wrong, import the release again with "
                        "`dit-mem bank import-release ... --embedding-model FOLDER`"
                    )
                raise UserError(
                    f"{self.root / MANIFEST}: the index was built with embedding model "
                    f"{want_name!r}, not {model_name(model)!r}{fix}"
                )
            return model
        if want_name == model_name(None):
            return None
        recorded = self.manifest.get("model_path")
        path = Path(recorded) if recorded else None
        if path is not None and not path.is_absolute():
            path = self.root / path
        if path is None or not path.is_dir():
            raise UserError(
                f"{self.root / MANIFEST}: the index was built with {want_name}"
                + (f" from {recorded}, which is not there" if recorded else "")
                + "; pass the model folder explicitly (--embedding-model / embedding_model=)"
            )
        return path

    def _check_embedder(self, emb: Embedder) -> None:
        want_name, want_dim = self.manifest["model"], self.manifest["dim"]
        if emb.name != want_name or emb.dim != want_dim:
            raise UserError(
                f"{self.root / MANIFEST}: the index was built with {want_name!r} ({want_dim}-d); "
                f"the given model is {emb.name!r} ({emb.dim}-d)"
            )

    @property
    def embedder(self) -> Embedder:
        """The embedding model (loaded on first use: a cached retrieval needs none)."""
        if self._embedder is None:
            emb = load_embedder(
                self._model, device=self._device, trust_remote_code=self._trust_remote_code
            )
            self._check_embedder(emb)
            self._embedder = emb
        return self._embedder

    def leave_out(self, ids) -> None:
        """Never return these bank videos (besides those left out before): they have no memory
        (their encoding failed)."""
        rows = [r for r in self.id_map.rows_of(list(ids)) if r is not None]
        self.unavailable = np.union1d(self.unavailable, np.asarray(rows, np.int64))

    def row_of(self, vid: str) -> dict | None:
        """The id map's row of bank video ``vid`` (``None`` if it is not in the bank)."""
        i = self.id_map.row_of(vid)
        return None if i is None else self.id_map.record(i)

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ search
    def embed(self, prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised prompt embeddings ``[len(prompts), dim]``."""
        return self.embedder.encode(list(prompts), batch_size=batch_size)

    def retrieve(
        self,
        prompts: Sequence[str],
        k: int = 5,
        exclude: Sequence[Exclusion] | None = None,
        batch_size: int = 256,
    ) -> list[RetrievalResult]:
        """Top-``k`` videos for each prompt (one batched embedding + one batched search).

        ``exclude``: one entry per prompt (an id, a list of ids, or None). Every bank video
        whose source (OpenVid: the YouTube id in ``<youtube_id>_<n>_<start>to<end>``) equals
        that of an excluded id is dropped, the excluded ids themselves included.
        """
        if isinstance(prompts, str):
            raise UserError("retrieve() takes a list of prompts, not a single string")
        if not prompts:
            return []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"prompt {i} is empty (retrieval needs text)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"k must be an integer ≥ 1, got {k!r}")
        return self.search(self.embed(prompts, batch_size=batch_size), k, exclude)

    def search(
        self, queries: np.ndarray, k: int = 5, exclude: Sequence[Exclusion] | None = None
    ) -> list[RetrievalResult]:
        """Like :meth:`retrieve`, for precomputed normalised query vectors ``[Q, dim]``."""
        if k < 1:
            raise UserError(f"k must be ≥ 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise UserError(f"queries must be [Q, {self.index.d}], got {queries.shape}")
        if exclude is None:
            banned: list[set[str]] = [set() for _ in range(len(queries))]
        else:
            if isinstance(exclude, str) or len(exclude) != len(queries):
                raise UserError(
                    "exclude needs one entry (an id, a list of ids, or None) per prompt: "
                    f"got {'a string' if isinstance(exclude, str) else len(exclude)} for "
                    f"{len(queries)} prompts"
                )
            banned = [self._banned_sources(e) for e in exclude]
        # Ask FAISS for enough neighbours that k survive the exclusions.
        extra = max(self.id_map.count_sources(b) if b else 0 for b in banned)
        fetch = min(k + extra + len(self.unavailable), self.index.ntotal)
        if self.rerank is not None:
            scores, rows = rerank_search(self.index, self.rerank, queries, fetch, self.k_factor)
        else:
            scores, rows = self.index.search(queries, fetch)
        ok = rows >= 0
        if len(self.unavailable):
            ok &= ~np.isin(rows, self.unavailable)
        row_sources = self.id_map.source_hashes(np.where(ok, rows, 0))
        results = []
        for q, q_banned in enumerate(banned):
            keep = ok[q]
            if q_banned:
                keep = keep & ~np.isin(row_sources[q], hash64(sorted(q_banned)))
            picked = rows[q][keep][:k]
            results.append(
                RetrievalResult(
                    ids=self.ids.take(picked),
                    captions=self.captions.take(picked),
                    scores=[float(x) for x in scores[q][keep][:k]],
                )
            )
        return results

    def _banned_sources(self, entry: Exclusion) -> set[str]:
        """Sources to drop for one prompt; ids may be given as ids or as file names
        (``abc_1_0to5.mp4``, as a CSV's ``video`` column holds them)."""
        if entry is None:
            return set()
        ids = [entry] if isinstance(entry, str) else [str(v) for v in entry]
        rows = self.id_map.rows_of(ids)
        return {
            source_id(v if r is not None else video_id(v)) for v, r in zip(ids, rows, strict=True)
        }


class RowReader:
    """Rows of a ``.npy`` matrix read with ``pread`` at the rows asked for: a search touches
    k_factor·k rows of a file of gigabytes, and nothing of the file is mapped into the process
    (what the operating system caches stays its own, shared and reclaimable)."""

    def __init__(self, path: str | Path, hashes: np.ndarray | None = None):
        self.path, self.hashes = str(path), hashes
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2 or dtype.hasobject:
            raise UserError(f"{path}: not a C-ordered 2-d numeric array")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = shape[1] * dtype.itemsize
        want = self.offset + shape[0] * self.row_bytes
        if os.path.getsize(path) != want:
            raise UserError(f"{path}: {os.path.getsize(path)} bytes, expected {want}")
        if hashes is not None and hashes.shape != (shape[0],):
            raise UserError(f"{path}: {len(hashes)} row checksums for {shape[0]} rows")
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """The rows ``rows`` (sorted int array: runs of consecutive rows are one read)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        buf = out.reshape(-1).view(np.uint8)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            start = self.offset + int(rows[i]) * self.row_bytes
            size = (j - i) * self.row_bytes
            data = os.pread(self._fd, size, start)
            if len(data) != size:
                raise UserError(f"{self.path}: short read at row {int(rows[i])}")
            buf[i * self.row_bytes : j * self.row_bytes] = np.frombuffer(data, np.uint8)
            i = j
        if self.hashes is not None:
            self.check(rows, out)
        return out

    def check(self, rows: np.ndarray, values: np.ndarray) -> None:
        """``ValueError`` naming the first row whose bytes do not match its checksum."""
        from dit_mem.utils.fingerprint import row_hashes

        bad = np.flatnonzero(row_hashes(values, rows=rows) != self.hashes[rows])
        if len(bad):
            raise UserError(
                f"{self.path}: row {int(rows[bad[0]])} is damaged ({len(bad)} of the {len(rows)} "
                "rows read do not match their checksums); rebuild the index: `dit-mem bank build "
                "... --reindex` (or `dit-mem bank verify BANK` for the whole file)"
            )

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getstate__(self) -> dict:  # pickled and copied by path: the copy opens the file again
        return {"path": self.path, "hashes": self.hashes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state.get("hashes"))
