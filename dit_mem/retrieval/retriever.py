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

from dit_mem.data.table import file_sha256, is_safe_id, source_id, video_id
from dit_mem.retrieval.embedder import Embedder, load_embedder, model_name
from dit_mem.retrieval.index import (
    FORMATS,
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
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise ValueError(f"{path}: not an index manifest (format {FORMATS[-1]})")
    for key, kind in (("rows", int), ("dim", int), ("model", str)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ValueError(f"{path}: {key!r} must be a {kind.__name__}")
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
        self.manifest = _read_manifest(paths[MANIFEST])
        self._verify_checksums(paths)
        try:
            self.index = faiss.read_index(str(paths[INDEX_FILE]))
        except RuntimeError as e:
            raise ValueError(f"{paths[INDEX_FILE]}: not a readable FAISS index ({e})") from None
        try:
            self.table = pd.read_parquet(paths[IDS_FILE])
        except (OSError, ValueError) as e:
            raise ValueError(f"{paths[IDS_FILE]}: not a readable parquet id map ({e})") from None
        missing = [c for c in ("id", "caption") if c not in self.table.columns]
        if missing:
            raise ValueError(f"{paths[IDS_FILE]}: missing column(s) {missing}")
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
        self.ids: list[str] = self.table["id"].astype(str).tolist()
        bad = [v for v in self.ids if not is_safe_id(v)]
        if bad:
            raise ValueError(
                f"{paths[IDS_FILE]}: {len(bad)} id(s) are not plain file names (e.g. {bad[0]!r}); "
                "ids name files inside the bank's folders"
            )
        self.captions: list[str] = self.table["caption"].astype(str).tolist()
        sources = self.table["source"] if "source" in self.table.columns else self.table["id"]
        self.sources: list[str] = sources.astype(str).tolist()
        self._source_size = Counter(self.sources)
        self._row = {vid: i for i, vid in enumerate(self.ids)}
        self.unavailable: set[int] = set()  # rows never returned (bank videos without memory)
        self._model = self._model_source(model)  # checked now, loaded when first needed
        self._device, self._trust_remote_code = device, trust_remote_code
        self._embedder: Embedder | None = model if isinstance(model, Embedder) else None
        configure_search(
            self.index,
            nprobe=nprobe if nprobe is not None else self.manifest.get("nprobe"),
            ef_search=ef_search if ef_search is not None else self.manifest.get("ef_search"),
        )
        configure_faiss_blas()

    def _verify_checksums(self, paths: dict[str, Path]) -> None:
        sums = self.manifest.get("sha256")
        if sums is None:
            log.warning(
                "%s: written by an older dit-mem, without checksums; rebuild it with "
                "`dit-mem build-index --overwrite` to have the files verified",
                self.root,
            )
            return
        for name in (INDEX_FILE, IDS_FILE):
            if sums.get(name) != file_sha256(paths[name]):
                raise ValueError(
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
                raise ValueError(
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
            raise ValueError(
                f"{self.root / MANIFEST}: the index was built with {want_name}"
                + (f" from {recorded}, which is not there" if recorded else "")
                + "; pass the model folder explicitly (--embedding-model / embedding_model=)"
            )
        return path

    def _check_embedder(self, emb: Embedder) -> None:
        want_name, want_dim = self.manifest["model"], self.manifest["dim"]
        if emb.name != want_name or emb.dim != want_dim:
            raise ValueError(
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
        """Never return these bank videos (they have no memory: their encoding failed)."""
        self.unavailable = {self._row[v] for v in ids if v in self._row}

    def row_of(self, vid: str) -> dict | None:
        """The id map's row of bank video ``vid`` (``None`` if it is not in the bank)."""
        i = self._row.get(vid)
        return None if i is None else self.table.iloc[i].to_dict()

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
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} is empty (retrieval needs text)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer ≥ 1, got {k!r}")
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
        fetch = min(k + extra + len(self.unavailable), self.index.ntotal)
        scores, rows = self.index.search(queries, fetch)
        results = []
        for q_scores, q_rows, q_banned in zip(scores, rows, banned, strict=True):
            keep = [
                (int(r), float(s))
                for r, s in zip(q_rows, q_scores, strict=True)
                if r >= 0 and self.sources[r] not in q_banned and int(r) not in self.unavailable
            ][:k]
            results.append(
                RetrievalResult(
                    ids=[self.ids[r] for r, _ in keep],
                    captions=[self.captions[r] for r, _ in keep],
                    scores=[s for _, s in keep],
                )
            )
        return results

    def _banned_sources(self, entry: Exclusion) -> set[str]:
        """Sources to drop for one prompt; ids may be given as ids or as file names
        (``abc_1_0to5.mp4``, as a CSV's ``video`` column holds them)."""
        if entry is None:
            return set()
        ids = [entry] if isinstance(entry, str) else list(entry)
        return {source_id(v if v in self._row else video_id(v)) for v in map(str, ids)}
