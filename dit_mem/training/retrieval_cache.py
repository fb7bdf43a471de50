"""What each training sample retrieves, computed once and kept as a CSV (also the log of it).

Every training caption is sent to the memory bank's retriever for its top ``k`` videos,
excluding the sample's own video and every clip cut from the same source video (the
``Retriever``'s ``exclude=``): otherwise the memory would simply contain the answer. The
result is written to ``retrieval.csv`` with one row per (sample, rank)::

    id, rank, memory_id, score, memory_caption

next to ``retrieval.json`` (k, index folder). A rerun with the same settings only queries the
samples not in the file yet; other settings rebuild it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from dit_mem.utils import get_logger, write_json_atomic
from dit_mem.utils.io import atomic_path

log = get_logger(__name__)

CSV_NAME = "retrieval.csv"
META_NAME = "retrieval.json"
COLUMNS = ["id", "rank", "memory_id", "score", "memory_caption"]


def _read_existing(root: Path, meta: dict) -> pd.DataFrame:
    csv, meta_file = root / CSV_NAME, root / META_NAME
    if not (csv.is_file() and meta_file.is_file()):
        return pd.DataFrame(columns=COLUMNS)
    old = json.loads(meta_file.read_text())
    if old != meta:
        log.info(
            "retrieval cache %s was built with %s, this run uses %s: rebuilding", csv, old, meta
        )
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(csv, dtype={"id": str, "memory_id": str, "memory_caption": str})


def build_retrieval_cache(
    root: str | Path,
    ids: Sequence[str],
    captions: Sequence[str],
    retriever_factory: Callable[[], object],
    k: int,
    index_dir: str | Path,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Retrieve the top ``k`` memory videos for every (id, caption) not cached yet.

    ``retriever_factory()`` returns an object with ``retrieve(prompts, k, exclude=...)``
    (``dit_mem.retrieval.Retriever``); it is only called when something is missing.
    """
    root = Path(root)
    meta = {
        "k": int(k),
        "index_dir": str(Path(index_dir).resolve()),
        "exclude": "own video and every clip of the same source video",
    }
    table = _read_existing(root, meta)
    done = set(table["id"])
    todo = [(v, c) for v, c in dict(zip(ids, captions, strict=True)).items() if v not in done]
    if not todo:
        return table
    retriever = retriever_factory()
    rows: list[dict] = []
    for start in range(0, len(todo), batch_size):
        part = todo[start : start + batch_size]
        hits = retriever.retrieve([c for _, c in part], k=k, exclude=[[v] for v, _ in part])
        for (vid, _), hit in zip(part, hits, strict=True):
            if len(hit.ids) < k:
                log.warning(
                    "sample %s: only %d of %d memory videos retrieved", vid, len(hit.ids), k
                )
            for rank, (mid, score, cap) in enumerate(
                zip(hit.ids, hit.scores, hit.captions, strict=True)
            ):
                rows.append(
                    {
                        "id": vid,
                        "rank": rank,
                        "memory_id": mid,
                        "score": float(score),
                        "memory_caption": cap,
                    }
                )
    table = pd.concat([table, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / CSV_NAME) as tmp:
        table.to_csv(tmp, index=False)
    write_json_atomic(root / META_NAME, meta)
    log.info("retrieved memory for %d training samples (%s)", len(todo), root / CSV_NAME)
    return table


def memory_ids_by_sample(table: pd.DataFrame) -> dict[str, list[str]]:
    """``{sample id: [memory ids by rank]}`` from a retrieval table."""
    table = table.sort_values(["id", "rank"], kind="stable")
    return {vid: list(group["memory_id"]) for vid, group in table.groupby("id", sort=False)}
