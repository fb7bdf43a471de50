"""The rows of a bank's caption index, memory-mapped: ids, captions, videos, sources.

    ids.arrow          Arrow IPC file, one row per index row: id, caption, video, source, (extra
                       columns of the CSV: scores, camera motion, …); read memory-mapped, zero copy
    ids.lookup.npy     uint64 [2, n]: the ids' 64-bit hashes, sorted, and the row of each
    sources.lookup.npy uint64 [2, n]: each row's source hash, and the same hashes sorted

So a bank of 10M videos opens in about a second and holds no Python string per row: an id is
found by binary search over its hash (the row's own id is compared, so a hash collision can never
return a wrong row), and "how many rows share this source" (the leave-one-out exclusion of
training) is two binary searches. Older index folders hold ``ids.parquet``; it is read into
memory and the lookups are computed on open.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from dit_mem.errors import UserError

ARROW_FILE = "ids.arrow"
PARQUET_FILE = "ids.parquet"  # index folders of format dit-mem-index/1 and /2
ID_LOOKUP = "ids.lookup.npy"
SOURCE_LOOKUP = "sources.lookup.npy"
FILES = (ARROW_FILE, ID_LOOKUP, SOURCE_LOOKUP)


def hash64(texts: Iterable[str]) -> np.ndarray:
    """A stable 64-bit hash (BLAKE2b) of every text, as ``uint64``."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
            for t in texts
        ),
        dtype=np.uint64,
    )


class Column(Sequence):
    """One text column of the id map as a read-only sequence of ``str`` (no copy of the rest)."""

    def __init__(self, array):
        self._array = array  # pyarrow ChunkedArray
        self._chunks = array.chunks
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._array[j].as_py() for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._array[i % n].as_py()

    def __iter__(self) -> Iterator[str]:
        for chunk in self._array.chunks:
            yield from chunk.to_pylist()

    def tolist(self) -> list[str]:
        return self._array.to_pylist()

    def take(self, rows) -> list[str]:
        """The values at ``rows`` (an int array), in that order: each read from its chunk in
        place (``ChunkedArray.take`` would first join every chunk: 50 ms at 10M rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[chunk]
        return [
            self._chunks[c][i].as_py() for c, i in zip(chunk.tolist(), local.tolist(), strict=True)
        ]


class IdMap:
    """The id map of an index folder (see the module docstring)."""

    def __init__(self, table, id_lookup: np.ndarray, source_lookup: np.ndarray):
        self.table = table  # pyarrow.Table
        self._id_lookup, self._source_lookup = id_lookup, source_lookup
        self.ids = Column(table.column("id"))
        self.captions = Column(table.column("caption"))
        self.sources = Column(table.column("source"))

    # ------------------------------------------------------------------ files
    @staticmethod
    def lookups(ids: Sequence[str], sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        id_hash = hash64(ids)
        order = np.argsort(id_hash, kind="stable")
        source_hash = hash64(sources)
        return (
            np.stack([id_hash[order], order.astype(np.uint64)]),
            np.stack([source_hash, np.sort(source_hash)]),
        )

    @classmethod
    def write(cls, folder: str | Path, table) -> None:
        """``table`` (pandas or pyarrow; columns id, caption, source, …) as the three files."""
        import pyarrow as pa

        folder = Path(folder)
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        from dit_mem.utils.io import atomic_path

        # each file written whole and renamed into place: a reader that has the old files
        # memory-mapped keeps reading them (a file truncated under a map would not be)
        ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
        id_lookup, source_lookup = cls.lookups(ids, sources)
        with (
            atomic_path(folder / ARROW_FILE) as tmp,
            pa.OSFile(str(tmp), "wb") as sink,
            pa.ipc.new_file(sink, table.schema) as writer,
        ):
            writer.write_table(table, max_chunksize=1 << 20)
        for name, lookup in ((ID_LOOKUP, id_lookup), (SOURCE_LOOKUP, source_lookup)):
            with atomic_path(folder / name) as tmp, open(tmp, "wb") as f:
                np.save(f, lookup)

    @classmethod
    def open(cls, folder: str | Path) -> IdMap:
        """The id map of ``folder``: ``ids.arrow`` memory-mapped, or an older ``ids.parquet``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(folder)
        if (folder / ARROW_FILE).is_file():
            path = folder / ARROW_FILE
            try:
                table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            except (pa.ArrowInvalid, OSError) as e:
                raise UserError(f"{path}: not a readable Arrow id map ({e})") from None
            lookups = []
            for name in (ID_LOOKUP, SOURCE_LOOKUP):
                try:
                    lookup = np.load(folder / name, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise UserError(f"{folder / name}: not a readable lookup ({e})") from None
                if lookup.dtype != np.uint64 or lookup.shape != (2, table.num_rows):
                    raise UserError(
                        f"{folder / name}: expected uint64 [2, {table.num_rows}], got "
                        f"{lookup.dtype} {list(lookup.shape)}"
                    )
                lookups.append(lookup)
            n = table.num_rows
            if n and int(lookups[0][1].max()) >= n:
                raise UserError(f"{folder / ID_LOOKUP}: rows outside the id map ({n} rows)")
            _check_columns(table, path)
            return cls(table, *lookups)
        path = folder / PARQUET_FILE
        try:
            table = pq.read_table(str(path))
        except (OSError, ValueError, pa.ArrowInvalid) as e:
            raise UserError(f"{path}: not a readable parquet id map ({e})") from None
        if "source" not in table.column_names and "id" in table.column_names:
            from dit_mem.data.table import source_id

            sources = [source_id(v) for v in table.column("id").to_pylist()]
            table = table.append_column("source", pa.array(sources, pa.string()))
        _check_columns(table, path)
        table = table.set_column(
            table.column_names.index("id"), "id", table.column("id").cast(pa.string())
        )
        return cls(
            table, *cls.lookups(table.column("id").to_pylist(), table.column("source").to_pylist())
        )

    def unsafe_ids(self, is_safe) -> list[str]:
        """Ids that cannot name a file (empty, ``.``/``..``, a separator or NUL), at Arrow speed;
        ``is_safe`` confirms each candidate."""
        import pyarrow.compute as pc

        ids = self.table.column("id")
        bad = pc.or_(pc.match_substring_regex(ids, r"[/\\\x00]|^\.{0,2}$"), pc.is_null(ids))
        return [v for v in pc.filter(ids, bad).to_pylist() if not v or not is_safe(v)]

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return self.table.num_rows

    def rows_of(self, ids: Sequence[str]) -> list[int | None]:
        """The row of each id (``None`` where the id is not in the map)."""
        hashes, rows = self._id_lookup[0], self._id_lookup[1]
        keys = hash64(ids)
        left = np.searchsorted(hashes, keys, side="left")
        right = np.searchsorted(hashes, keys, side="right")
        out: list[int | None] = []
        for vid, lo, hi in zip(ids, left.tolist(), right.tolist(), strict=True):
            found = None
            for j in range(lo, hi):  # one candidate, unless two ids share a 64-bit hash
                row = int(rows[j])
                if self.ids[row] == vid:
                    found = row
                    break
            out.append(found)
        return out

    def row_of(self, vid: str) -> int | None:
        return self.rows_of([vid])[0]

    def __contains__(self, vid: object) -> bool:
        return isinstance(vid, str) and self.row_of(vid) is not None

    def source_hashes(self, rows: np.ndarray) -> np.ndarray:
        """The source hash of each row (``rows`` an int array)."""
        return np.asarray(self._source_lookup[0][rows])

    def count_sources(self, sources: Iterable[str]) -> int:
        """How many rows belong to any of ``sources``."""
        keys = hash64(list(set(sources)))
        ordered = self._source_lookup[1]
        left = np.searchsorted(ordered, keys, side="left")
        right = np.searchsorted(ordered, keys, side="right")
        return int((right - left).sum())

    def record(self, row: int) -> dict:
        """Every column of one row."""
        return self.table.slice(row, 1).to_pylist()[0]


def _check_columns(table, path: Path) -> None:
    missing = [c for c in ("id", "caption", "source") if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}")
