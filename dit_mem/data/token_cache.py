"""Token cache: each memory video's per-branch tokens, precomputed with a frozen encoder.

With the encoder frozen, ``MemoryEncoder.encode_videos`` maps every video to its tokens
independently of the other retrieved videos; only ``aggregate`` (shuffle + shared attention)
mixes them. So generation can skip latents entirely:

    cache = TokenCache("tokens/")
    videos = cache.load(["vid_a", "vid_b", ...])       # VideoTokens [1, N, G, D]
    memory = encoder.eval().aggregate(videos)           # == encoder(LatentStore(...).load(ids))

Layout (bf16 safetensors shards, a few thousand videos each):

    tokens/
      manifest.json                  encoder fingerprint + config, G, D, log_counts, latent settings
      index.parquet                  id → (shard, row)
      tokens-r<rank>-<k>.safetensors high [n, G, D], low [n, G, D]; metadata "ids" (JSON list)

With the paper's grid G = 1, so a video costs 2·1536·2 bytes = 6 KiB instead of a 4.2 MB latent.
``build_token_cache`` is resumable (ids already in a shard are skipped) and shards across
``accelerate`` processes like the latent job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit_mem.data.idmap import Column, hash64
from dit_mem.data.latents import LatentStore
from dit_mem.errors import UserError
from dit_mem.memory.tokens import VideoTokens, check_plausible
from dit_mem.utils import get_logger, write_json_atomic, write_safetensors_atomic
from dit_mem.utils.device import execution_device
from dit_mem.utils.io import TMP_PREFIX, atomic_path, read_json_mapping

log = get_logger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.parquet"
FORMAT = "dit-mem-token-cache/1"
SHARD_GLOB = "tokens-r*-*.safetensors"
_SHARD_NAME = re.compile(r"tokens-r\d+-\d+\.safetensors")


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's config and every tensor of its state dict (weights + stats),
    exactly as they are (:func:`~dit_mem.utils.fingerprint.weights_fingerprint`)."""
    from dit_mem.utils.fingerprint import weights_fingerprint

    return weights_fingerprint(encoder)


def _shard_ids(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["ids"])


def _scan_shards(root: Path) -> dict[str, tuple[str, int]]:
    """id → (shard file name, row) over every complete shard."""
    where: dict[str, tuple[str, int]] = {}
    for shard in sorted(root.glob(SHARD_GLOB)):
        if shard.name.startswith(TMP_PREFIX):
            continue
        for row, vid in enumerate(_shard_ids(shard)):
            where[vid] = (shard.name, row)
    return where


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
class TokenCache:
    """Read access to a folder written by ``dit-mem cache-tokens``.

    ``TokenCache(root, encoder=enc)`` also checks that ``enc`` is the encoder the cache was
    built with (same config and weights), raising ``ValueError`` otherwise.
    """

    def __init__(self, root: str | Path, encoder: torch.nn.Module | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.root = Path(root)
        manifest, index = self.root / MANIFEST, self.root / INDEX
        for p in (manifest, index):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} not found: {self.root} is not a complete token cache "
                    "(run `dit-mem cache-tokens`; an interrupted run resumes)"
                )
        self.manifest: dict = read_json_mapping(manifest)
        m = self.manifest
        if m.get("format") != FORMAT or not m.get("complete"):
            raise UserError(f"{manifest}: not a complete token cache ({FORMAT})")
        for key in ("num_groups", "dim"):
            if not isinstance(m.get(key), int) or isinstance(m.get(key), bool) or m[key] < 1:
                raise UserError(f"{manifest}: {key!r} must be a positive integer")
        log_counts = m.get("log_counts")
        if not isinstance(log_counts, list) or len(log_counts) != m["num_groups"]:
            raise UserError(f"{manifest}: 'log_counts' must list one value per group")
        self.log_counts = torch.tensor(log_counts, dtype=torch.float32)
        if not bool(torch.isfinite(self.log_counts).all()):
            raise UserError(f"{manifest}: 'log_counts' holds NaN or infinite values")
        try:
            table = pq.read_table(str(index))
        except (OSError, ValueError, pa.ArrowInvalid) as e:
            raise UserError(f"{index}: not a readable parquet table ({e})") from None
        missing = [c for c in ("id", "shard", "row") if c not in table.column_names]
        if missing:
            raise UserError(f"{index}: missing column(s) {missing}")
        shards = table.column("shard").cast(pa.string()).dictionary_encode().combine_chunks()
        self._shards = [str(s) for s in shards.dictionary.to_pylist()]
        bad = [s for s in self._shards if not _SHARD_NAME.fullmatch(s)]
        if bad:
            raise UserError(f"{index}: {bad[0]!r} is not a shard file name of this folder")
        # id → (shard, row) without a Python object per video: sorted 64-bit id hashes, the
        # shard and row of each (a hash collision is caught: the shard's own id list is checked)
        self._ids = Column(table.column("id").cast(pa.string()))
        hashes = hash64(self._ids)
        order = np.argsort(hashes, kind="stable")
        self._hash = hashes[order]
        self._shard = shards.indices.to_numpy(zero_copy_only=False).astype(np.int32)[order]
        self._row = table.column("row").to_numpy().astype(np.int64)[order]
        self._shard_ids: dict[str, list[str]] = {}
        self._handles: dict[str, object] = {}
        if encoder is not None:
            self.check_encoder(encoder)

    def check_encoder(self, encoder: torch.nn.Module) -> None:
        from dit_mem.utils.fingerprint import weights_fingerprint

        fp, recorded = encoder_fingerprint(encoder), self.manifest["encoder_fingerprint"]
        if fp != recorded and weights_fingerprint(encoder, legacy=True) != recorded:
            raise UserError(
                f"{self.root / MANIFEST}: the token cache was built with another memory encoder "
                f"(fingerprint {self.manifest['encoder_fingerprint'][:12]}…, given {fp[:12]}…); "
                "rebuild it with `dit-mem cache-tokens`"
            )

    def __len__(self) -> int:
        return len(self._hash)

    def _find(self, vid: str) -> tuple[str, int] | None:
        """(shard, row) of ``vid``, checked against the shard's own id list."""
        if not isinstance(vid, str):
            return None
        key = hash64([vid])[0]
        lo = int(np.searchsorted(self._hash, key, side="left"))
        hi = int(np.searchsorted(self._hash, key, side="right"))
        for j in range(lo, hi):
            shard, row = self._shards[self._shard[j]], int(self._row[j])
            listed = self._listed(shard)
            if not 0 <= row < len(listed):
                raise UserError(
                    f"{self.root / shard}: row {row} of {vid!r} is outside the shard "
                    f"({len(listed)} rows; {self.root / INDEX} is corrupt)"
                )
            if listed[row] == vid:
                return shard, row
            if hi - lo == 1:  # no other id shares its hash: the index points elsewhere
                raise UserError(
                    f"{self.root / INDEX} puts {vid!r} at row {row} of {shard}, which holds "
                    f"{listed[row]!r}: the index is corrupt; rebuild it with `dit-mem cache-tokens`"
                )
        return None

    def _listed(self, shard: str) -> list[str]:
        if shard not in self._shard_ids:
            try:
                listed = json.loads((self._handle(shard).metadata() or {})["ids"])
            except (KeyError, TypeError, ValueError):
                raise UserError(
                    f"{self.root / shard}: unreadable token shard (no id list in its metadata)"
                ) from None
            if not isinstance(listed, list):
                raise UserError(f"{self.root / shard}: unreadable token shard (ids not a list)")
            self._shard_ids[shard] = listed
        return self._shard_ids[shard]

    def __contains__(self, vid: str) -> bool:
        return self._find(vid) is not None

    def ids(self) -> list[str]:
        return sorted(self._ids)

    def _handle(self, shard: str):
        from safetensors import SafetensorError, safe_open

        if shard not in self._handles:
            path = self.root / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (listed in {self.root / INDEX})")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{path}: unreadable token shard ({e})") from None
        return self._handles[shard]

    def load_one(self, vid: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(high, low)`` of one video, each ``[G, D]`` bf16."""
        from safetensors import SafetensorError

        found = self._find(vid)
        if found is None:
            raise FileNotFoundError(f"no cached tokens for id {vid!r} in {self.root}")
        shard, row = found
        f = self._handle(shard)
        path = self.root / shard
        try:
            n = f.get_slice("high").get_shape()[0]
            if not 0 <= row < n:
                raise UserError(f"{path}: row {row} of {vid!r} is outside the shard ({n} rows)")
            high, low = (f.get_slice(k)[row : row + 1][0] for k in ("high", "low"))
            names = set(f.keys())  # (shards of dit-mem ≤ 0.1 have no row checksums)
            recorded = f.get_slice("rowhash")[row : row + 1] if "rowhash" in names else None
        except SafetensorError as e:
            raise UserError(f"{path}: unreadable token shard ({e})") from None
        if recorded is not None and not torch.equal(
            token_row_hashes(high[None], low[None], rows=[row]), recorded
        ):
            raise UserError(
                f"{path}: the tokens of {vid!r} (row {row}) are damaged; cache them again: "
                f"delete {path.name} and rerun `dit-mem cache-tokens` (`dit-mem bank verify BANK` "
                "lists every damaged file)"
            )
        want = (self.manifest["num_groups"], self.manifest["dim"])
        for part in (high, low):
            if tuple(part.shape) != want:
                raise UserError(
                    f"{path}: tokens of {vid!r} are {list(part.shape)}, not {list(want)}"
                )
            check_plausible(part, path, f"cached memory of {vid!r}")
        return high, low

    def load(
        self,
        ids: list[str],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> VideoTokens:
        """``VideoTokens`` (high/low ``[1, N, G, D]``, log_counts ``[G]``) for ``ids``."""
        if not ids:
            raise UserError("TokenCache.load needs at least one id")
        pairs = [self.load_one(v) for v in ids]
        high = torch.stack([h for h, _ in pairs])[None].to(device=device, dtype=dtype)
        low = torch.stack([lo for _, lo in pairs])[None].to(device=device, dtype=dtype)
        return VideoTokens(high, low, self.log_counts.to(high.device))

    def load_batch(self, batch: list[list[str]], **kw) -> VideoTokens:
        """``VideoTokens`` with ``[B, N, G, D]`` for B lists of N ids each."""
        items = [self.load(ids, **kw) for ids in batch]
        return VideoTokens(
            torch.cat([v.high for v in items]),
            torch.cat([v.low for v in items]),
            items[0].log_counts,
        )


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------
@dataclass
class CacheSummary:
    encoded: int = 0  # by this process in this run
    skipped: int = 0  # already cached when the run started (all processes)
    total: int = 0  # ids asked for
    bytes_per_video: float = 0.0  # shard bytes / cached videos (main process only)
    is_main_process: bool = True


class _LatentDataset(torch.utils.data.Dataset):
    def __init__(self, store: LatentStore, ids: list[str]):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store.load_one(self.ids[i])


def build_token_cache(
    encoder,
    latents: str | Path,
    out: str | Path,
    batch_size: int = 16,
    shard_size: int = 4096,
    num_workers: int = 2,
    ids: list[str] | None = None,
) -> CacheSummary:
    """Encode every latent in ``latents`` (or just ``ids``) into a token cache at ``out``.

    The encoder runs in eval mode (no dropout, BatchNorm running statistics) on this process's
    accelerator; process i of n takes ids i::n. Re-running skips cached ids; a cache built
    with another encoder is an error.
    """
    from dit_mem.data.folder_job import FolderJob

    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1)):
        if value < low:
            raise UserError(f"{name} must be ≥ {low}, got {value}")
    if num_workers < 0:
        raise UserError(f"num_workers must be ≥ 0, got {num_workers}")
    store = LatentStore(latents)
    channels = store.shape[0] if store.shape else None
    if channels is not None and channels != encoder.config.in_channels:
        m = store.manifest
        raise UserError(
            f"{store.root} holds {channels}-channel latents of a {m.get('family', '?')} VAE "
            f"({m.get('vae_class', '?')}); the memory encoder takes "
            f"{encoder.config.in_channels}-channel latents: use the encoder of that base model"
        )
    wanted = store.ids() if ids is None else list(ids)
    if not wanted:
        raise UserError(f"{store.root}: no latents to cache")
    with FolderJob(out, "cache-tokens") as job:
        encoder = encoder.eval().to(job.device)
        fingerprint = encoder_fingerprint(encoder)

        def compare(old: dict) -> None:
            if old.get("encoder_fingerprint") != fingerprint:
                raise UserError(
                    f"{job.out / MANIFEST}: this folder caches tokens of another memory encoder "
                    "(fingerprint differs); use another --out folder"
                )

        # claim the folder for this encoder before writing shards
        job.claim(
            {"format": FORMAT, "encoder_fingerprint": fingerprint, "complete": False}, compare
        )
        done = _scan_shards(job.out)
        missing = [v for v in wanted if v not in done]
        summary = CacheSummary(skipped=len(wanted) - len(missing), total=len(wanted))
        summary.is_main_process = job.is_main
        with torch.no_grad():
            summary.encoded = _encode_share(
                encoder, store, job, job.share(missing), batch_size, shard_size, num_workers
            )
        job.wait()
        if job.is_main:
            summary.bytes_per_video = _finish_cache(encoder, store, job.out, fingerprint, wanted[0])
            log.info(
                "token cache %s: %.0f bytes per video (%d encoded by process 0 in this run, %d "
                "cached before)",
                job.out,
                summary.bytes_per_video,
                summary.encoded,
                summary.skipped,
            )
        job.wait()
    return summary


def token_row_hashes(high: torch.Tensor, low: torch.Tensor, rows=None) -> torch.Tensor:
    """Each row's checksum (both branches' bytes and the row number) as int64 ``[n]``."""
    from dit_mem.utils.fingerprint import row_hashes

    both = torch.cat([high.flatten(1), low.flatten(1)], dim=1).contiguous().view(torch.int16)
    return torch.from_numpy(row_hashes(both.numpy(), rows=rows).view(np.int64))


class _ShardWriter:
    """This process's next shards ``tokens-r<rank>-<k>.safetensors``, ``shard_size`` videos each."""

    def __init__(self, out: Path, rank: int, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.prefix = f"tokens-r{rank:02d}-"
        existing = [
            int(p.stem[len(self.prefix) :]) for p in out.glob(f"{self.prefix}*.safetensors")
        ]
        self.next = max(existing, default=-1) + 1
        self.ids: list[str] = []
        self.high: list[torch.Tensor] = []
        self.low: list[torch.Tensor] = []

    def add(self, ids: list[str], high: torch.Tensor, low: torch.Tensor) -> None:
        self.ids += ids
        self.high.append(high.to(torch.bfloat16).cpu())
        self.low.append(low.to(torch.bfloat16).cpu())
        if len(self.ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        high, low = torch.cat(self.high), torch.cat(self.low)
        write_safetensors_atomic(
            self.out / f"{self.prefix}{self.next:06d}.safetensors",
            {"high": high, "low": low, "rowhash": token_row_hashes(high, low)},
            metadata={"ids": json.dumps(self.ids)},
        )
        self.next += 1
        self.ids, self.high, self.low = [], [], []


def _encode_share(encoder, store, job, pending: list[str], batch_size, shard_size, workers) -> int:
    """Encode ``pending`` latents into this process's shards; returns how many."""
    loader = torch.utils.data.DataLoader(
        _LatentDataset(store, pending), batch_size=batch_size, num_workers=workers
    )
    shards = _ShardWriter(job.out, job.rank, shard_size)
    bar = job.bar(len(pending))
    pos = 0
    for lat in loader:  # [b, C, T, H, W]
        vt = encoder.encode_videos(lat[:, None].to(job.device))  # [b, 1, G, D]
        shards.add(pending[pos : pos + lat.shape[0]], vt.high[:, 0], vt.low[:, 0])
        pos += lat.shape[0]
        bar.update(lat.shape[0])
    shards.flush()
    bar.close()
    return pos


def _write_index(out: Path, where: dict) -> None:
    """``index.parquet``: each cached id's shard and row."""
    import pandas as pd

    table = pd.DataFrame(
        {
            "id": list(where),
            "shard": [s for s, _ in where.values()],
            "row": [r for _, r in where.values()],
        }
    )
    with atomic_path(out / INDEX) as tmp:
        table.to_parquet(tmp, index=False)


def rewrite_index(out: Path) -> int:
    """``index.parquet`` (and the manifest's count) of the shards a cache holds now (after
    damaged shards were removed); returns the count."""
    where = _scan_shards(out)
    _write_index(out, where)
    manifest = read_json_mapping(out / MANIFEST)
    write_json_atomic(out / MANIFEST, {**manifest, "count": len(where)})
    return len(where)


def _finish_cache(encoder, store, out: Path, fingerprint: str, probe: str) -> float:
    """The main process: ``index.parquet`` over every shard, the complete manifest; returns the
    bytes per cached video."""
    from safetensors import safe_open

    where = _scan_shards(out)
    with torch.no_grad():  # G and the log-multiplicities, from one latent
        log_counts = encoder.encode_videos(
            store.load([probe], dtype=None).to(execution_device(encoder))
        ).log_counts.cpu()
    bytes_per_video = sum(p.stat().st_size for p in out.glob(SHARD_GLOB)) / max(len(where), 1)
    first = next(iter(where.values()))
    with safe_open(str(out / first[0]), framework="pt") as f:
        g, d = f.get_slice("high").get_shape()[1:]
    _write_index(out, where)
    latent_keys = ("latent_shape", "normalized", "num_frames", "height", "width", "resize")
    latent_keys += ("family", "vae_class", "vae_fingerprint")  # whose latents (bank.check_serves)
    write_json_atomic(
        out / MANIFEST,
        {
            "format": FORMAT,
            "complete": True,
            "encoder_fingerprint": fingerprint,
            "encoder_config": {
                k: v for k, v in dict(encoder.config).items() if not k.startswith("_")
            },
            "num_groups": int(g),
            "dim": int(d),
            "log_counts": [float(v) for v in log_counts],
            "dtype": "bfloat16",
            "count": len(where),
            "bytes_per_video": round(bytes_per_video, 1),
            "latents": {k: store.manifest.get(k) for k in latent_keys},
        },
    )
    return bytes_per_video
