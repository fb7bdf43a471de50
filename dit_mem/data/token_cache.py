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

import hashlib
import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dit_mem.data.latents import LatentStore, process_state
from dit_mem.memory.tokens import VideoTokens, check_plausible
from dit_mem.utils import get_logger, write_json_atomic, write_safetensors_atomic
from dit_mem.utils.io import TMP_PREFIX, atomic_path, folder_lock, read_json_mapping

log = get_logger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.parquet"
FORMAT = "dit-mem-token-cache/1"
SHARD_GLOB = "tokens-r*-*.safetensors"
_SHARD_NAME = re.compile(r"tokens-r\d+-\d+\.safetensors")


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's config and every tensor of its state dict (weights + stats)."""
    h = hashlib.sha256()
    config = getattr(encoder, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        import pandas as pd

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
            raise ValueError(f"{manifest}: not a complete token cache ({FORMAT})")
        for key in ("num_groups", "dim"):
            if not isinstance(m.get(key), int) or isinstance(m.get(key), bool) or m[key] < 1:
                raise ValueError(f"{manifest}: {key!r} must be a positive integer")
        log_counts = m.get("log_counts")
        if not isinstance(log_counts, list) or len(log_counts) != m["num_groups"]:
            raise ValueError(f"{manifest}: 'log_counts' must list one value per group")
        self.log_counts = torch.tensor(log_counts, dtype=torch.float32)
        if not bool(torch.isfinite(self.log_counts).all()):
            raise ValueError(f"{manifest}: 'log_counts' holds NaN or infinite values")
        try:
            table = pd.read_parquet(index)
        except (OSError, ValueError) as e:
            raise ValueError(f"{index}: not a readable parquet table ({e})") from None
        missing = [c for c in ("id", "shard", "row") if c not in table.columns]
        if missing:
            raise ValueError(f"{index}: missing column(s) {missing}")
        bad = [s for s in set(table["shard"].astype(str)) if not _SHARD_NAME.fullmatch(s)]
        if bad:
            raise ValueError(f"{index}: {bad[0]!r} is not a shard file name of this folder")
        self._where = dict(
            zip(
                table["id"].astype(str),
                zip(table["shard"].astype(str), table["row"].astype(int), strict=True),
                strict=True,
            )
        )
        self._handles: dict[str, object] = {}
        if encoder is not None:
            self.check_encoder(encoder)

    def check_encoder(self, encoder: torch.nn.Module) -> None:
        fp = encoder_fingerprint(encoder)
        if fp != self.manifest["encoder_fingerprint"]:
            raise ValueError(
                f"{self.root / MANIFEST}: the token cache was built with another memory encoder "
                f"(fingerprint {self.manifest['encoder_fingerprint'][:12]}…, given {fp[:12]}…); "
                "rebuild it with `dit-mem cache-tokens`"
            )

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, vid: str) -> bool:
        return vid in self._where

    def ids(self) -> list[str]:
        return sorted(self._where)

    def _handle(self, shard: str):
        from safetensors import SafetensorError, safe_open

        if shard not in self._handles:
            path = self.root / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (listed in {self.root / INDEX})")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: unreadable token shard ({e})") from None
        return self._handles[shard]

    def load_one(self, vid: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(high, low)`` of one video, each ``[G, D]`` bf16."""
        from safetensors import SafetensorError

        if vid not in self._where:
            raise FileNotFoundError(f"no cached tokens for id {vid!r} in {self.root}")
        shard, row = self._where[vid]
        f = self._handle(shard)
        path = self.root / shard
        try:
            n = f.get_slice("high").get_shape()[0]
            if not 0 <= row < n:
                raise ValueError(f"{path}: row {row} of {vid!r} is outside the shard ({n} rows)")
            high, low = (f.get_slice(k)[row : row + 1][0] for k in ("high", "low"))
        except SafetensorError as e:
            raise ValueError(f"{path}: unreadable token shard ({e})") from None
        want = (self.manifest["num_groups"], self.manifest["dim"])
        for part in (high, low):
            if tuple(part.shape) != want:
                raise ValueError(
                    f"{path}: tokens of {vid!r} are {list(part.shape)}, not {list(want)}"
                )
            check_plausible(part, path, f"cached tokens of {vid!r}")
        return high, low

    def load(
        self,
        ids: list[str],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> VideoTokens:
        """``VideoTokens`` (high/low ``[1, N, G, D]``, log_counts ``[G]``) for ``ids``."""
        if not ids:
            raise ValueError("TokenCache.load needs at least one id")
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
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be ≥ {low}, got {value}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be ≥ 0, got {num_workers}")
    state = process_state()
    store = LatentStore(latents)
    out = Path(out)
    # one job per folder: the main process holds out/.lock until the job ends
    with folder_lock(out, "cache-tokens") if state.is_main_process else nullcontext():
        return _build_token_cache(
            encoder, store, out, state, batch_size, shard_size, num_workers, ids
        )


def _build_token_cache(
    encoder, store, out: Path, state, batch_size, shard_size, num_workers, ids
) -> CacheSummary:
    import pandas as pd
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    encoder = encoder.eval().to(state.device)
    fingerprint = encoder_fingerprint(encoder)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = read_json_mapping(manifest_path)
        if old.get("encoder_fingerprint") != fingerprint:
            raise ValueError(
                f"{manifest_path}: this folder caches tokens of another memory encoder "
                "(fingerprint differs); use another --out folder"
            )
    if state.is_main_process:
        for p in out.glob(f"{TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
        if not manifest_path.is_file():  # claim the folder for this encoder before writing shards
            write_json_atomic(
                manifest_path,
                {"format": FORMAT, "encoder_fingerprint": fingerprint, "complete": False},
            )
    state.wait_for_everyone()

    wanted = store.ids() if ids is None else list(ids)
    if not wanted:
        raise ValueError(f"{store.root}: no latents to cache")
    done = _scan_shards(out)
    missing = [v for v in wanted if v not in done]
    pending = missing[state.process_index :: state.num_processes]  # this process's share
    summary = CacheSummary(
        skipped=len(wanted) - len(missing),
        total=len(wanted),
        is_main_process=state.is_main_process,
    )
    prefix = f"tokens-r{state.process_index:02d}-"
    existing = [int(p.stem[len(prefix) :]) for p in out.glob(f"{prefix}*.safetensors")]
    next_shard = max(existing, default=-1) + 1

    buf_ids: list[str] = []
    buf_high: list[torch.Tensor] = []
    buf_low: list[torch.Tensor] = []
    log_counts: torch.Tensor | None = None

    def flush() -> None:
        nonlocal next_shard
        if not buf_ids:
            return
        write_safetensors_atomic(
            out / f"{prefix}{next_shard:06d}.safetensors",
            {"high": torch.cat(buf_high), "low": torch.cat(buf_low)},
            metadata={"ids": json.dumps(buf_ids)},
        )
        next_shard += 1
        buf_ids.clear(), buf_high.clear(), buf_low.clear()

    loader = torch.utils.data.DataLoader(
        _LatentDataset(store, pending), batch_size=batch_size, num_workers=num_workers
    )
    bar = tqdm(total=len(pending), desc=f"tokens[{state.process_index}]", unit="video")
    pos = 0
    with torch.no_grad():
        for lat in loader:  # [b, C, T, H, W]
            vt = encoder.encode_videos(lat[:, None].to(state.device))  # [b, 1, G, D]
            log_counts = vt.log_counts.cpu()
            buf_ids.extend(pending[pos : pos + lat.shape[0]])
            buf_high.append(vt.high[:, 0].to(torch.bfloat16).cpu())
            buf_low.append(vt.low[:, 0].to(torch.bfloat16).cpu())
            pos += lat.shape[0]
            summary.encoded += lat.shape[0]
            bar.update(lat.shape[0])
            if len(buf_ids) >= shard_size:
                flush()
        flush()
    bar.close()
    state.wait_for_everyone()

    if state.is_main_process:
        where = _scan_shards(out)
        if log_counts is None:  # nothing new: probe one latent for G
            with torch.no_grad():
                log_counts = encoder.encode_videos(
                    store.load([wanted[0]], dtype=None).to(state.device)
                ).log_counts.cpu()
        shard_bytes = sum(p.stat().st_size for p in out.glob(SHARD_GLOB))
        summary.bytes_per_video = shard_bytes / max(len(where), 1)
        first = next(iter(where.values()))
        from safetensors import safe_open

        with safe_open(str(out / first[0]), framework="pt") as f:
            g, d = f.get_slice("high").get_shape()[1:]
        table = pd.DataFrame(
            {
                "id": list(where),
                "shard": [s for s, _ in where.values()],
                "row": [r for _, r in where.values()],
            }
        )
        with atomic_path(out / INDEX) as tmp:
            table.to_parquet(tmp, index=False)
        write_json_atomic(
            manifest_path,
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
                "bytes_per_video": round(summary.bytes_per_video, 1),
                "latents": {
                    k: store.manifest.get(k)
                    for k in (
                        "latent_shape",
                        "normalized",
                        "num_frames",
                        "height",
                        "width",
                        "resize",
                    )
                },
            },
        )
        log.info(
            "token cache %s: %d videos, %.0f bytes per video (%d encoded by process 0 in this run, %d cached before)",
            out,
            len(where),
            summary.bytes_per_video,
            summary.encoded,
            summary.skipped,
        )
    state.wait_for_everyone()
    return summary
