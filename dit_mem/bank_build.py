"""``dit-mem bank build`` and ``dit-mem bank export``: a bank folder from a video table, and a
token-only copy of one to share.

    build_bank(BankBuildConfig(csv=..., videos=..., bank=..., base_model=...))      # eager
    build_bank(BankBuildConfig(..., lazy=True))           # index only: memory on first use
    build_bank(BankBuildConfig(..., for_training="train.csv"))   # what training reads
    build_bank(BankBuildConfig(csv="more.csv", ..., add=True))   # more rows, nothing rebuilt
    export_bank("bank/", encoder, "shared/")              # index + token cache + dataset card

Every mode records the geometry (frames, size, resize) and the VAE in ``latents/manifest.json``
before anything is encoded, so every later encode of the bank (``--add``, a lazy bank's first
use, ``encode-latents --bank``) makes the same latents or is refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dit_mem.utils import get_logger

log = get_logger(__name__)

CARD = "README.md"


@dataclass
class BankBuildConfig:
    """Settings of ``dit-mem bank build`` (geometry defaults: the paper's, SPEC §2)."""

    csv: Path
    bank: Path
    base_model: Path
    videos: Path | None = None  # the folder the CSV's paths start from (default: the CSV's)
    num_frames: int = 81
    height: int = 480
    width: int = 832
    resize: str = "stretch"
    backend: str = "pyav"
    vae_dtype: str = "float32"
    num_workers: int = 2
    index: dict[str, Any] = field(default_factory=dict)  # build_index keyword arguments
    tokens: str | None = None  # a memory encoder: also cache its tokens
    lazy: bool = False
    for_training: Path | None = None
    k: int = 5  # retrieved videos per training sample (--for-training)
    add: bool = False

    def __post_init__(self) -> None:
        self.latent_job()  # geometry and decoding settings checked by the latent job's rules
        if self.lazy and self.for_training is not None:
            raise ValueError("--lazy and --for-training exclude each other (lazy encodes nothing)")
        if self.lazy and self.tokens is not None:
            raise ValueError(
                "--tokens caches tokens of encoded latents; a --lazy bank has none yet (its "
                "memory is computed on first use)"
            )
        if self.add and self.for_training is not None:
            raise ValueError("--add and --for-training exclude each other")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer ≥ 1, got {self.k!r}")

    def latent_job(self):
        from dit_mem.data.latents import LatentJobConfig

        return LatentJobConfig(
            csv=Path(self.csv),
            out=Path(self.bank) / "latents",
            base_model=Path(self.base_model),
            videos=Path(self.bank) / "videos",
            num_frames=self.num_frames,
            height=self.height,
            width=self.width,
            resize=self.resize,
            backend=self.backend,
            vae_dtype=self.vae_dtype,
            num_workers=self.num_workers,
        )


@dataclass
class BuildSummary:
    videos: int = 0  # rows in the bank's index
    added: int = 0  # rows added by --add
    unchanged: int = 0  # rows of an --add CSV already in the bank
    to_encode: int = 0  # videos this build encodes (all, --for-training's selection, or 0)
    training: int = 0  # --for-training: training videos
    retrieved: int = 0  # --for-training: distinct videos retrieved for them
    encoded: int = 0
    failed: int = 0
    is_main_process: bool = True
    failures: list[str] = field(default_factory=list)


def build_bank(cfg: BankBuildConfig, vae=None, embedder=None, encoder=None) -> BuildSummary:
    """Build (or, with ``cfg.add``, extend) the bank folder ``cfg.bank``; see the module doc.

    ``vae`` / ``embedder`` / ``encoder`` may be passed in loaded (tests); otherwise they are loaded
    from ``cfg.base_model``, ``cfg.index["model"]`` and ``cfg.tokens``. The bank folder is locked
    for the whole build (a second build or ``--add`` on it is refused while one runs).
    """
    import torch

    from dit_mem.bank import build_record, write_bank_manifest
    from dit_mem.data.jobs import FolderJob, process_state
    from dit_mem.data.latents import claim_latent_folder, encode_latents
    from dit_mem.data.table import read_video_table
    from dit_mem.loaders.base_model import load_vae
    from dit_mem.utils.io import folder_lock

    bank, csv = Path(cfg.bank), Path(cfg.csv)
    table = read_video_table(csv)
    videos = Path(cfg.videos) if cfg.videos is not None else csv.parent
    resume = _check_bank_state(bank, csv, cfg.add)
    _check_videos(table, videos, cfg.lazy)
    train = read_video_table(cfg.for_training) if cfg.for_training is not None else None
    if train is not None:
        _check_videos(train, videos, lazy=False)
    state = process_state()
    summary = BuildSummary(is_main_process=state.is_main_process)
    with folder_lock(bank, "bank build") if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            _link_videos(bank, videos)
            if cfg.add:
                summary.added, summary.unchanged = add_to_index(
                    bank / "index", table, cfg.index, embedder=embedder
                )
            elif resume:
                log.info("%s: the index of this table is there; resuming the build", bank)
            else:
                from dit_mem.retrieval.index import build_index

                build_index(csv, bank / "index", embedder=embedder, **cfg.index)
        state.wait_for_everyone()
        if vae is None:
            vae = load_vae(cfg.base_model, getattr(torch, cfg.vae_dtype), state.device)
        job_cfg = cfg.latent_job()
        fix = (
            f"a bank's geometry and VAE are fixed when it is built ({bank / 'bank.json'}); "
            "give the recorded settings, or build another bank"
        )
        with FolderJob(job_cfg.out, "bank build") as job:  # the geometry, before any encoding
            claim_latent_folder(job_cfg, vae, job, fix=fix)
        rows = _rows_to_encode(cfg, table, train, summary, embedder)
        summary.to_encode = len(rows)
        if rows:
            s = encode_latents(job_cfg, vae=vae, rows=rows)
            summary.encoded, summary.failed, summary.failures = s.ok, s.failed, s.failures
        if cfg.tokens is not None:
            from dit_mem.data import build_token_cache
            from dit_mem.loaders import load_memory_encoder

            failed = set(summary.failures)
            from_latents = [r["id"] for r in rows if r["id"] not in failed]
            if from_latents:
                build_token_cache(
                    encoder if encoder is not None else load_memory_encoder(cfg.tokens),
                    bank / "latents",
                    bank / "tokens",
                    num_workers=min(cfg.num_workers, 2),
                    ids=from_latents,
                )
        if state.is_main_process:
            record = {
                "memory": "lazy" if cfg.lazy else "for-training" if train is not None else "eager",
                "csv": str(csv.resolve()),
            }
            if train is not None:
                record |= {"for_training": str(Path(cfg.for_training).resolve()), "k": cfg.k}
            if cfg.add:  # the bank's first build stays its record; each addition is listed
                first = build_record(bank) or {}
                added = {**record, "rows": summary.added}
                record = {**first, "added": [*first.get("added", []), added]}
            summary.videos = write_bank_manifest(bank, build=record).get("videos") or 0
    return summary


def _check_bank_state(bank: Path, csv: Path, add: bool) -> bool:
    """Whether this build resumes one of the same table (``ValueError`` for a bank of another
    table without ``--add``, or ``--add`` without a bank)."""
    from dit_mem.data.table import file_sha256

    if bank.exists() and not bank.is_dir():
        raise ValueError(f"{bank} exists and is not a folder")
    manifest = bank / "index" / "manifest.json"
    if add and not manifest.is_file():
        raise FileNotFoundError(
            f"{bank} is not a bank to add to (no index/); build it first with `dit-mem bank build`"
        )
    if add or not (bank / "index").exists():
        return False
    try:
        same = json.loads(manifest.read_text()).get("csv_sha256") == file_sha256(csv)
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        raise ValueError(
            f"{bank} already holds a bank of another table; add rows with `dit-mem bank build "
            "--add`, or give another --bank"
        )
    return True


def _check_videos(table, videos: Path, lazy: bool) -> None:
    """Every row's video lies inside ``videos``; for a lazy bank, it is there too."""
    if not videos.is_dir():
        raise FileNotFoundError(f"video folder not found: {videos}")
    root = videos.resolve()
    outside, missing = [], []
    for rel in table["video"].astype(str):
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            outside.append(rel)
        elif lazy and not path.is_file():
            missing.append(rel)
    if outside:
        raise ValueError(
            f"{len(outside)} video path(s) lie outside {videos} (e.g. {outside[0]!r}): a bank's "
            "video paths are relative to its --videos folder"
        )
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} video(s) of the table are not in {videos} (e.g. {missing[0]!r}): a "
            "lazy bank encodes them on first use, so they must be there"
        )


def _link_videos(bank: Path, videos: Path) -> None:
    """``bank/videos``: the video folder itself, or a link to it."""
    target, src = bank / "videos", videos.resolve()
    if target.exists() or target.is_symlink():
        if target.resolve() != src:
            raise ValueError(
                f"{bank}'s videos are in {target.resolve()}; --videos {videos} is another folder: "
                "put the new videos there (the table's paths are relative to it)"
            )
        return
    bank.mkdir(parents=True, exist_ok=True)
    target.symlink_to(src, target_is_directory=True)


def _rows_to_encode(cfg, table, train, summary: BuildSummary, embedder) -> list[dict]:
    """The ``{"id", "video"}`` rows this build encodes."""
    if cfg.lazy:
        return []
    rows = table[["id", "video"]].to_dict("records")
    if train is None:
        return rows
    from dit_mem.bank import MemoryBank

    bank = MemoryBank(
        _open_index(Path(cfg.bank) / "index", cfg.index, embedder), Path(cfg.bank) / "latents"
    )
    ids, captions = train["id"].tolist(), train["caption"].tolist()
    retrieved: dict[str, None] = {}
    for start in range(0, len(ids), 256):
        part = slice(start, start + 256)
        hits = bank.retrieve(captions[part], k=cfg.k, exclude=[[v] for v in ids[part]])
        for hit in hits:
            retrieved.update(dict.fromkeys(hit.ids))
    summary.training, summary.retrieved = len(ids), len(retrieved)
    by_id = {r["id"]: r for r in rows}
    by_id |= {r["id"]: r for r in train[["id", "video"]].to_dict("records") if r["id"] not in by_id}
    wanted = dict.fromkeys([*ids, *retrieved])
    return [by_id[v] for v in wanted]


def _open_index(index_dir: Path, options: dict, embedder=None):
    """The bank's index, embedding with ``embedder`` or the model (device, remote-code
    permission) this build was given."""
    from dit_mem.retrieval import Retriever

    return Retriever(
        index_dir,
        model=embedder or options.get("model"),
        device=options.get("device"),
        trust_remote_code=options.get("trust_remote_code"),
    )


def add_to_index(index_dir: Path, table, options: dict, embedder=None) -> tuple[int, int]:
    """Append ``table``'s new rows to the index at ``index_dir`` (embedded with its own model);
    rows already there (same id, caption and video) are skipped, an id with another caption or
    video is an error. Old rows keep their positions: old retrievals do not change, except
    where a new row is a better match. Returns (added, unchanged)."""
    import pandas as pd

    from dit_mem.data.table import source_id
    from dit_mem.retrieval.index import write_index_folder

    r = _open_index(index_dir, options, embedder)
    rows = r.id_map.rows_of(table["id"].tolist())
    known = [i for i, row in enumerate(rows) if row is not None]
    for i in known:
        old = r.id_map.record(rows[i])
        new = table.iloc[i]
        if (old["caption"], old.get("video")) != (new["caption"], new["video"]):
            raise ValueError(
                f"{new['id']!r} is already in the bank with another caption or video "
                f"({old['caption']!r}, {old.get('video')!r}); ids name one video: give the new "
                "one another id"
            )
    fresh = table.drop(index=table.index[known]).reset_index(drop=True)
    if fresh.empty:
        return 0, len(known)
    vectors = r.embedder.encode(
        fresh["caption"].tolist(), batch_size=options.get("batch_size", 256)
    )
    r.index.add(vectors)
    combined = pd.concat(
        [r.table, fresh.assign(source=fresh["id"].map(source_id))], ignore_index=True
    )
    manifest = dict(r.manifest)
    manifest["rows"] = int(r.index.ntotal)
    manifest["added"] = [*manifest.get("added", []), {"rows": len(fresh)}]
    manifest.pop("sha256", None)
    rerank = None if r.rerank is None else [r.rerank, vectors]  # the old rows, then the new
    write_index_folder(index_dir, r.index, combined, manifest, rerank=rerank, k_factor=r.k_factor)
    log.info("added %d rows to %s (%d already there)", len(fresh), index_dir, len(known))
    return len(fresh), len(known)


# --------------------------------------------------------------------------------------
# Export: a token-only bank to share
# --------------------------------------------------------------------------------------
def export_bank(bank, encoder, out: str | Path, license: str | None = None) -> dict:
    """Write ``out``: the bank's index and ``encoder``'s token cache of every bank video (no
    latents, no videos) + ``bank.json`` + a ``README.md`` dataset card; whole or not at all.

    The token cache is the bank's own when it was made by ``encoder``, else computed from the
    bank's latents. Videos without memory (failed encodes) stay left out; a video with neither
    tokens nor a latent (a lazy bank not yet filled) is an error that says how to fill it.
    Returns the card's facts (counts, bytes per video).
    """
    from dit_mem.bank import MemoryBank, write_bank_manifest
    from dit_mem.data import build_token_cache
    from dit_mem.data.token_cache import SHARD_GLOB, encoder_fingerprint
    from dit_mem.utils import atomic_dir

    if not isinstance(bank, MemoryBank):
        bank = MemoryBank.from_pretrained(bank)
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; export writes a new folder")
    left_out = set(bank.retriever.ids.take(bank.retriever.unavailable))  # no memory: failed
    ids = [v for v in bank.ids if v not in left_out]
    if not ids:
        raise ValueError(f"{bank.retriever.root.parent}: no bank video has memory to export")
    own = bank.tokens is not None and bank._cache_matches(encoder)
    untokened = [v for v in ids if v not in bank.tokens] if own else ids
    latents = bank.latents if bank.latents is not None else ()
    lacking = [v for v in untokened if v not in latents]
    if lacking:
        raise ValueError(
            f"{len(lacking)} of {len(ids)} bank videos have no latent or tokens yet (e.g. "
            f"{lacking[0]!r}; a lazy bank fills them on first use): encode them first with "
            "`dit-mem encode-latents --bank BANK --csv ...` (or build with `--tokens`)"
        )
    with atomic_dir(out) as tmp:
        shutil.copytree(bank.retriever.root, tmp / "index")
        if own and not untokened:
            shutil.copytree(bank.tokens.root, tmp / "tokens", ignore=shutil.ignore_patterns(".*"))
        else:
            if own:
                log.info("the token cache lacks some videos: caching all from the latents")
            build_token_cache(encoder, bank.latents.root, tmp / "tokens", num_workers=0, ids=ids)
            (tmp / "tokens" / ".lock").unlink(missing_ok=True)
        manifest = write_bank_manifest(tmp)
        tokens = json.loads((tmp / "tokens" / "manifest.json").read_text())
        index_bytes = sum(p.stat().st_size for p in (tmp / "index").iterdir())
        token_bytes = sum(p.stat().st_size for p in (tmp / "tokens").glob(SHARD_GLOB))
        facts = {
            "videos": len(ids),
            "left_out": len(bank) - len(ids),
            "encoder_fingerprint": encoder_fingerprint(encoder),
            "embedding_model": manifest.get("embedding_model"),
            "index": bank.retriever.manifest.get("factory") or bank.retriever.manifest["kind"],
            "geometry": (bank.latents.manifest if bank.latents is not None else {}).get(
                "latent_shape"
            ),
            "settings": _geometry(bank),
            "num_groups": tokens["num_groups"],
            "dim": tokens["dim"],
            "index_bytes": index_bytes,
            "token_bytes": token_bytes,
            "bytes_per_video": round((index_bytes + token_bytes) / len(ids), 1),
            "license": license,
        }
        (tmp / CARD).write_text(dataset_card(facts))
        write_bank_manifest(tmp, build={"exported": facts})
    return facts


def _geometry(bank) -> dict | None:
    if bank.latents is None:
        return None
    m = bank.latents.manifest
    keys = ("num_frames", "height", "width", "resize", "family", "vae_class", "vae_dtype")
    return {k: m.get(k) for k in keys}


def dataset_card(f: dict) -> str:
    """A Hub dataset card (``README.md``) for an exported bank."""
    geometry = f["settings"] or {}
    license_line = f"license: {f['license']}\n" if f.get("license") else "license: other\n"
    return f"""---
{license_line}tags:
- dit-mem
- memory-bank
- video-generation
---

# DiT-Mem memory bank (token-only)

A memory bank for dit-mem (DiT-Mem, arXiv 2511.19229): a caption index and the memory tokens of
{f["videos"]:,} videos for one memory encoder. No latents, no videos.

| | |
|---|---|
| videos | {f["videos"]:,} ({f["left_out"]} without memory left out) |
| memory encoder (fingerprint) | `{f["encoder_fingerprint"]}` |
| tokens per video | {f["num_groups"]} distinct × {f["dim"]}-d per branch, bf16 |
| caption embedding model | {f["embedding_model"]} |
| index | `{f["index"]}` |
| latent geometry | {geometry.get("num_frames")} frames of {geometry.get("height")}×{geometry.get("width")} \
({geometry.get("resize")}), {geometry.get("family")} VAE, latent {f["geometry"]} |
| size | index {f["index_bytes"]:,} B + tokens {f["token_bytes"]:,} B = {f["bytes_per_video"]:,} B per video |

The tokens are only valid with the encoder whose fingerprint is above (a bank refuses another):

```python
from dit_mem import DiTMemPipeline
pipe = DiTMemPipeline.from_pretrained("<base model>")
pipe.load_memory("<encoder>", bank="<this repository>")
video = pipe("a prompt", memory="retrieve", k=5).frames[0]
```

License: {f.get("license") or "to be filled in by the bank's owner (the videos' own terms apply)"}.
"""
