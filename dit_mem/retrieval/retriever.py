"""``Retriever``: top-k memory videos for text prompts (SPEC §1, step 1).

    retriever = Retriever("memory_index/")               # model from the manifest
    [res] = retriever.retrieve(["a red fox in snow"], k=5)
    res.ids, res.captions, res.scores

Training excludes the training video itself and every clip cut from the same source video:

    retriever.retrieve(captions, k=5, exclude=batch_ids)  # one id (or list of ids) per prompt
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_mem.data.table import source_id
from dit_mem.retrieval.embedder import Embedder, load_embedder, model_name
from dit_mem.retrieval.index import (
    IDS_FILE,
    INDEX_FILE,
    MANIFEST,
    configure_faiss_blas,
    configure_search,
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


Exclusion = str | Iterable[str] | None


class Retriever:
    """Caption index of a memory bank + the embedding model it was built with.

    ``model``: ``None`` loads the model named in the manifest; a name/folder or a loaded
    :class:`Embedder` must match the manifest's model name and dimension (``ValueError``
    otherwise). ``nprobe`` / ``ef_search`` override the IVF / HNSW search settings.
    """

    def __init__(
        self,
        index_dir: str | Path,
        model: str | Path | Embedder | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str | None = None,
    ):
        import faiss
        import pandas as pd

        self.root = Path(index_dir)
        paths = {name: self.root / name for name in (MANIFEST, INDEX_FILE, IDS_FILE)}
        for p in paths.values():
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} not found: {self.root} is not a complete index folder"
                )
        self.manifest: dict = json.loads(paths[MANIFEST].read_text())
        self.index = faiss.read_index(str(paths[INDEX_FILE]))
        self.table = pd.read_parquet(paths[IDS_FILE])
        n_index, n_ids, n_manifest = self.index.ntotal, len(self.table), self.manifest["rows"]
        if not n_index == n_ids == n_manifest:
            raise ValueError(
                f"{self.root}: index/id-map row mismatch: {INDEX_FILE} has {n_index} vectors, "
                f"{IDS_FILE} has {n_ids} rows, {MANIFEST} says {n_manifest}; rebuild the index"
            )
        if self.index.d != self.manifest["dim"]:
            raise ValueError(
                f"{paths[INDEX_FILE]}: vectors are {self.index.d}-d but {MANIFEST} says "
                f"{self.manifest['dim']}-d; rebuild the index"
            )
        self.embedder = self._load_model(model, device)
        configure_search(
            self.index,
            nprobe=nprobe if nprobe is not None else self.manifest.get("nprobe"),
            ef_search=ef_search if ef_search is not None else self.manifest.get("ef_search"),
        )
        configure_faiss_blas()
        self.ids: list[str] = self.table["id"].astype(str).tolist()
        self.captions: list[str] = self.table["caption"].astype(str).tolist()
        self.sources: list[str] = self.table["source"].astype(str).tolist()
        self._source_size = Counter(self.sources)

    def _load_model(self, model: str | Path | Embedder | None, device: str | None) -> Embedder:
        want_name, want_dim = self.manifest["model"], self.manifest["dim"]
        if model is None:
            path = self.manifest.get("model_path")
            source = None if want_name == model_name(None) else path
            if source is not None and not Path(source).is_dir():
                raise ValueError(
                    f"{self.root / MANIFEST}: the index was built with {want_name} from {path}, "
                    "which is not there any more; pass the model folder explicitly"
                )
            emb = load_embedder(source, device=device)
        elif isinstance(model, Embedder):
            emb = model
        else:
            if model_name(model) != want_name:
                raise ValueError(
                    f"{self.root / MANIFEST}: the index was built with embedding model "
                    f"{want_name!r}, not {model_name(model)!r}"
                )
            emb = load_embedder(model, device=device)
        if emb.name != want_name or emb.dim != want_dim:
            raise ValueError(
                f"{self.root / MANIFEST}: the index was built with {want_name!r} ({want_dim}-d); "
                f"the given model is {emb.name!r} ({emb.dim}-d)"
            )
        return emb

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
            raise ValueError("retrieve() takes a list of prompts, not a single string")
        if not prompts:
            return []
        return self.search(self.embed(prompts, batch_size=batch_size), k, exclude)

    def search(
        self, queries: np.ndarray, k: int = 5, exclude: Sequence[Exclusion] | None = None
    ) -> list[RetrievalResult]:
        """Like :meth:`retrieve`, for precomputed normalised query vectors ``[Q, dim]``."""
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must be [Q, {self.index.d}], got {queries.shape}")
        if exclude is None:
            banned: list[set[str]] = [set() for _ in range(len(queries))]
        else:
            if isinstance(exclude, str) or len(exclude) != len(queries):
                raise ValueError(
                    "exclude needs one entry (an id, a list of ids, or None) per prompt: "
                    f"got {'a string' if isinstance(exclude, str) else len(exclude)} for "
                    f"{len(queries)} prompts"
                )
            banned = [self._banned_sources(e) for e in exclude]
        # Ask FAISS for enough neighbours that k survive the exclusions.
        extra = max(sum(self._source_size.get(s, 0) for s in b) for b in banned)
        fetch = min(k + extra, self.index.ntotal)
        scores, rows = self.index.search(queries, fetch)
        results = []
        for q_scores, q_rows, q_banned in zip(scores, rows, banned, strict=True):
            keep = [
                (int(r), float(s))
                for r, s in zip(q_rows, q_scores, strict=True)
                if r >= 0 and self.sources[r] not in q_banned
            ][:k]
            results.append(
                RetrievalResult(
                    ids=[self.ids[r] for r, _ in keep],
                    captions=[self.captions[r] for r, _ in keep],
                    scores=[s for _, s in keep],
                )
            )
        return results

    @staticmethod
    def _banned_sources(entry: Exclusion) -> set[str]:
        if entry is None:
            return set()
        ids = [entry] if isinstance(entry, str) else list(entry)
        return {source_id(str(v)) for v in ids}
