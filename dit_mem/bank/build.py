"""Every change of a bank folder: build (eager, lazy, for training), rerun, ``--add``,
``--reindex``, a relink of its videos, its parts one by one, token caching, export and push.

    build_bank(BankBuildConfig(csv=..., videos=..., bank=..., base_model=...))      # eager
    build_bank(BankBuildConfig(..., lazy=True))           # index only: memory on first use
    build_bank(BankBuildConfig(..., for_training="train.csv"))   # what training reads
    build_bank(BankBuildConfig(csv="more.csv", ..., add=True))   # more rows, nothing rebuilt
    build_bank(BankBuildConfig(..., reindex=True, index={"kind": "hnsw"}))  # another index
    export_bank("bank/", encoder, "shared/")              # index + token cache + dataset card

Each run first checks everything it will need (the table, the video paths, the base model, its
VAE against the bank's, the geometry, the index settings against the bank's) and writes nothing
before; then every change is one :class:`~dit_mem.bank.journal.Change`: committed whole, with
one history record, or not at all, whatever moment a process is killed at. Latents are then
encoded one file at a time (resumable), and the run's encoding is recorded when it ends.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dit_mem.bank.journal import Change, history, is_bank_file, refresh_manifest
from dit_mem.errors import UserError
from dit_mem.utils import get_logger

log = get_logger(__name__)

CARD = "README.md"


@dataclass
class BankBuildConfig:
    """Settings of ``dit-mem bank build``. Geometry ``None``: the base model's default (Wan:
    81×480×832, the paper's, method §2)."""

    csv: Path
    bank: Path
    base_model: Path
    videos: Path | None = None  # the folder the CSV's paths start from (default: the CSV's)
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    resize: str = "stretch"
    backend: str = "pyav"
    vae_dtype: str = "float32"
    num_workers: int = 2
    index: dict[str, Any] = field(default_factory=dict)  # build_index keyword arguments
    tokens: str | None = None  # a memory encoder: also cache its tokens
    lazy: bool = False
    for_training: Path | None = None
    k: int | None = None  # retrieved videos per training sample (--for-training; default 5)
    add: bool = False
    reindex: bool = False  # rebuild the index (another --kind / --index-factory)

    def __post_init__(self) -> None:
        if self.lazy and self.for_training is not None:
            raise UserError("--lazy and --for-training exclude each other (lazy encodes nothing)")
        if self.lazy and self.tokens is not None:
            raise UserError(
                "--tokens caches tokens of encoded latents; a --lazy bank has none yet (its "
                "memory is computed on first use)"
            )
        if self.add and self.for_training is not None:
            raise UserError("--add and --for-training exclude each other")
        if self.add and self.reindex:
            raise UserError("--add keeps the index's rows and appends; --reindex rebuilds it: one")
        if self.k is not None and self.for_training is None:
            raise UserError(
                "-k is the videos retrieved per training sample: it needs --for-training"
            )
        if self.k is not None and (
            isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1
        ):
            raise UserError(f"k must be an integer ≥ 1, got {self.k!r}")

    def latent_job(self, geometry: tuple[int, int, int]):
        from dit_mem.data.latents import LatentJobConfig

        frames, height, width = geometry
        return LatentJobConfig(
            csv=Path(self.csv),
            out=Path(self.bank) / "latents",
            base_model=Path(self.base_model),
            videos=Path(self.bank) / "videos",
            num_frames=frames,
            height=height,
            width=width,
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
    latents: int = 0  # latents the bank holds after the run
    is_main_process: bool = True
    failures: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # the history records this run appended


@dataclass
class _Plan:
    """What a build will do, decided (and checked) before anything is written."""

    table: Any
    videos: Path
    geometry: tuple[int, int, int]
    train: Any = None
    new: bool = False  # no bank yet
    relink: bool = False  # the bank's videos are elsewhere: the new folder replaces them
    index: dict[str, Any] = field(default_factory=dict)  # build_index options for a new index


# --------------------------------------------------------------------------------------
# Checks (nothing written)
# --------------------------------------------------------------------------------------
def check_video_paths(table, videos: Path, lazy: bool) -> None:
    """Every row's video path stays inside ``videos`` as written (no ``..``, not absolute); a
    symbolic link inside it is followed wherever it points (a Hub snapshot is a farm of them).
    For a lazy bank the files must be there too."""
    if not videos.is_dir():
        raise FileNotFoundError(f"video folder not found: {videos}")
    outside, missing = [], []
    for rel in table["video"].astype(str):
        parts = Path(os.path.normpath(rel)).parts
        if Path(rel).is_absolute() or (parts and parts[0] == ".."):
            outside.append(rel)
        elif lazy and not (videos / rel).is_file():
            missing.append(rel)
    if outside:
        raise UserError(
            f"{len(outside)} video path(s) of the table leave {videos} (e.g. {outside[0]!r}): a "
            "bank's video paths are relative to its --videos folder (a symbolic link inside it "
            "may point anywhere)"
        )
    if missing:
        dangling = [m for m in missing if (videos / m).is_symlink()]
        hint = f" ({len(dangling)} are symbolic links to nothing)" if dangling else ""
        raise FileNotFoundError(
            f"{len(missing)} video(s) of the table are not in {videos}{hint} (e.g. "
            f"{missing[0]!r}): a lazy bank encodes them on first use, so they must be there"
        )


def _geometry(cfg: BankBuildConfig) -> tuple[int, int, int]:
    """The clip size latents are made at: the config's, else the base model's default."""
    from dit_mem.models.base_model import clip_size

    return clip_size(cfg.base_model, cfg.num_frames, cfg.height, cfg.width)


def _plan(cfg: BankBuildConfig, vae) -> _Plan:
    """Check everything this build needs against the bank as it is; nothing is written."""
    from dit_mem.data.latents import claimable
    from dit_mem.data.table import file_sha256, read_video_table

    bank, csv = Path(cfg.bank), Path(cfg.csv)
    if bank.exists() and not bank.is_dir():
        raise UserError(f"{bank} exists and is not a folder")
    table = read_video_table(csv)
    videos = Path(cfg.videos) if cfg.videos is not None else csv.parent
    check_video_paths(table, videos, cfg.lazy)
    train = read_video_table(cfg.for_training) if cfg.for_training is not None else None
    if train is not None:
        check_video_paths(train, videos, lazy=False)
    geometry = _geometry(cfg)
    plan = _Plan(table, videos, geometry, train)
    index_manifest = bank / "index" / "manifest.json"
    plan.new = not index_manifest.is_file()
    if plan.new:
        if cfg.add:
            raise FileNotFoundError(
                f"{bank} is not a bank to add to (no index/); build it first with `dit-mem bank "
                "build` (without --add)"
            )
        if cfg.reindex:
            raise FileNotFoundError(f"{bank} has no index to rebuild; build it first")
        if bank.is_dir():
            strangers = [p.name for p in bank.iterdir() if not is_bank_file(p.name)]
            if strangers:
                raise UserError(
                    f"{bank} holds files that are not a bank's ({', '.join(strangers[:3])}); give "
                    "a new or empty folder"
                )
        plan.index = {"kind": "flat", **{k: v for k, v in cfg.index.items() if v is not None}}
    else:
        recorded = json.loads(index_manifest.read_text())
        same = recorded.get("csv_sha256") == file_sha256(csv) or any(
            r.get("csv_sha256") == file_sha256(csv) for r in history(bank)
        )
        if not (cfg.add or same):
            raise UserError(
                f"{bank} already holds a bank of another table; add rows with `dit-mem bank build "
                "--add`, or give another --bank"
            )
        _check_index_settings(bank, recorded, cfg)
        plan.relink = _videos_moved(bank, videos)
    if train is not None and cfg.k is not None:
        rows = len(table) if plan.new else recorded["rows"]  # type: ignore[possibly-undefined]
        if cfg.k >= rows:
            raise UserError(
                f"-k {cfg.k} with a bank of {rows} videos: a training sample retrieves k others "
                f"(its own left out); give -k < {rows}"
            )
    if vae is not None:  # the latents this bank holds must be this VAE's, at this geometry
        job = cfg.latent_job(geometry)
        claimable(job, vae, fix=_FIX.format(bank=bank / "bank.json"))
    return plan


_FIX = (
    "a bank's geometry and VAE are fixed when it is built ({bank}); give the recorded settings "
    "(`dit-mem bank info`), or build another bank"
)


def _check_index_settings(bank: Path, recorded: dict, cfg: BankBuildConfig) -> None:
    """A rerun naming another index kind or factory is refused unless ``--reindex``."""
    kind, factory = cfg.index.get("kind"), cfg.index.get("factory")
    other = (kind is not None and kind != recorded.get("kind")) or (
        factory is not None and factory != recorded.get("factory")
    )
    if other and not cfg.reindex:
        wanted = f"--index-factory {factory}" if factory else f"--kind {kind}"
        raise UserError(
            f"{bank} has a {recorded.get('factory')} index ({recorded.get('kind')}); {wanted} asks "
            f"for another: add --reindex to rebuild the index (its {recorded.get('rows')} captions "
            "embedded again), or leave the option off"
        )


def _asks_for_another_index(bank: Path, cfg: BankBuildConfig) -> bool:
    recorded = json.loads((bank / "index" / "manifest.json").read_text())
    kind, factory = cfg.index.get("kind"), cfg.index.get("factory")
    if factory is not None:
        return factory != recorded.get("factory")
    return kind is None or kind != recorded.get("kind")  # no kind named: rebuild as it is


def _videos_moved(bank: Path, videos: Path) -> bool:
    """Whether ``videos`` is another folder than the bank's (a repair or a move: relinked)."""
    link = bank / "videos"
    if not os.path.lexists(link):
        return True
    return link.resolve() != videos.resolve()


# --------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------
def build_bank(cfg: BankBuildConfig, vae=None, embedder=None, encoder=None) -> BuildSummary:
    """Build (or resume, extend, re-index) the bank folder ``cfg.bank``; see the module doc.

    ``vae`` / ``embedder`` / ``encoder`` may be passed in loaded (tests); otherwise they are loaded
    from ``cfg.base_model``, ``cfg.index["model"]`` and ``cfg.tokens``. The main process holds the
    bank's lock for the whole run (a second build on it is refused while one runs).
    """
    import torch

    from dit_mem.bank.journal import locked
    from dit_mem.data.folder_job import process_state
    from dit_mem.models.base_model import load_vae

    state = process_state()
    if vae is None:
        vae = load_vae(cfg.base_model, getattr(torch, cfg.vae_dtype), state.device)
    if cfg.tokens is not None and encoder is None:
        from dit_mem.memory.loading import load_memory_encoder

        encoder = load_memory_encoder(cfg.tokens)
    plan = _plan(cfg, vae)
    bank = Path(cfg.bank)
    summary = BuildSummary(is_main_process=state.is_main_process)
    main = state.is_main_process
    with locked(bank, "bank build"):
        if main:
            _change_index(cfg, plan, vae, embedder, summary)
        state.wait_for_everyone()
        rows = _rows_to_encode(cfg, plan, summary, embedder)
        summary.to_encode = len(rows)
        if rows:
            from dit_mem.data.latents import encode_latents

            s = encode_latents(cfg.latent_job(plan.geometry), vae=vae, rows=rows)
            summary.encoded, summary.failed, summary.failures = s.ok, s.failed, s.failures
        if main and (summary.encoded or summary.failed):
            with Change(bank, "encode", lock=False) as change:
                mode = "for-training" if plan.train is not None else "eager"
                record = {"memory": mode, "encoded": summary.encoded, "failed": summary.failed}
                change.commit({**record, "csv": str(Path(cfg.csv).resolve())})
                summary.changes.append("encode")
        if cfg.tokens is not None:
            failed = set(summary.failures)
            ids = [r["id"] for r in rows if r["id"] not in failed]
            if ids:
                cache_tokens(bank, encoder, ids=ids, num_workers=min(cfg.num_workers, 2))
        if main:
            from dit_mem.data import LatentStore

            manifest = refresh_manifest(bank)
            summary.videos = manifest.get("videos") or 0
            summary.latents = len(LatentStore(bank / "latents").ids())
    return summary


def _change_index(cfg: BankBuildConfig, plan: _Plan, vae, embedder, summary: BuildSummary):
    """The index changes of this run, each one committed change: a new bank, rows added, a new
    index, the videos relinked."""
    from dit_mem.data.table import file_sha256

    bank, csv = Path(cfg.bank), Path(cfg.csv)
    csv_record = {"csv": str(csv.resolve()), "csv_sha256": file_sha256(csv)}
    if plan.new:
        from dit_mem.data.latents import latent_manifest
        from dit_mem.retrieval.index import build_index
        from dit_mem.utils import write_json_atomic

        with Change(bank, "build", lock=False) as change:
            m = build_index(csv, change.stage("index"), embedder=embedder, **plan.index)
            latents = change.stage("latents")
            latents.mkdir()
            job = cfg.latent_job(plan.geometry)
            write_json_atomic(latents / "manifest.json", latent_manifest(job, vae))
            change.stage("videos").symlink_to(plan.videos.resolve(), target_is_directory=True)
            memory = "lazy" if cfg.lazy else "for-training" if plan.train is not None else "eager"
            change.commit(
                {
                    "memory": memory,
                    **csv_record,
                    "rows": m["rows"],
                    "index": m["factory"],
                    "videos": str(plan.videos.resolve()),
                    "geometry": list(plan.geometry),
                    "base_model": str(cfg.base_model),
                    **(
                        {"for_training": str(cfg.for_training), "k": cfg.k}
                        if plan.train is not None
                        else {}
                    ),
                }
            )
            summary.changes.append("build")
        return
    if plan.relink:
        _relink(bank, plan, summary)
    if cfg.reindex and _asks_for_another_index(bank, cfg):
        reindex(bank, cfg.index, embedder=embedder)
        summary.changes.append("reindex")
    elif cfg.reindex:
        log.info("%s: the index is of the kind asked for already; nothing to rebuild", bank)
    if cfg.add:
        summary.added, summary.unchanged = add_to_index(
            bank, plan.table, cfg.index, csv_record, embedder=embedder
        )
        if summary.added:
            summary.changes.append("add")
    elif not cfg.reindex:
        log.info("%s: the index of this table is there; resuming the build", bank)


def _relink(bank: Path, plan: _Plan, summary: BuildSummary) -> None:
    """Point the bank's videos at another folder (videos moved, or the first folder was wrong:
    the videos that failed are encoded again from the new one)."""
    link = bank / "videos"
    old = str(link.resolve()) if os.path.lexists(link) else None
    with Change(bank, "relink", lock=False) as change:
        change.stage("videos").symlink_to(plan.videos.resolve(), target_is_directory=True)
        change.commit({"from": old, "to": str(plan.videos.resolve())})
    log.info("%s: videos now in %s (were in %s)", bank, plan.videos.resolve(), old)
    summary.changes.append("relink")


def _rows_to_encode(cfg, plan: _Plan, summary: BuildSummary, embedder) -> list[dict]:
    """The ``{"id", "video"}`` rows this build encodes."""
    if cfg.lazy:
        return []
    rows = plan.table[["id", "video"]].to_dict("records")
    if plan.train is None:
        return rows
    from dit_mem.bank import MemoryBank

    train, k = plan.train, cfg.k or 5
    bank = MemoryBank(
        _open_index(Path(cfg.bank) / "index", cfg.index, embedder), Path(cfg.bank) / "latents"
    )
    ids, captions = train["id"].tolist(), train["caption"].tolist()
    retrieved: dict[str, None] = {}
    for start in range(0, len(ids), 256):
        part = slice(start, start + 256)
        hits = bank.retrieve(captions[part], k=k, exclude=[[v] for v in ids[part]])
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


# --------------------------------------------------------------------------------------
# Index changes
# --------------------------------------------------------------------------------------
def add_to_index(bank: Path, table, options: dict, record: dict, embedder=None) -> tuple[int, int]:
    """Append ``table``'s new rows to the bank's index (embedded with its own model), as one
    change; rows already there (same id, caption and video) are skipped, an id with another
    caption or video is an error. Old rows keep their positions: old retrievals do not change,
    except where a new row is a better match. Returns (added, unchanged)."""
    import pandas as pd

    from dit_mem.data.table import source_id
    from dit_mem.retrieval.index import write_index_folder

    index_dir = bank / "index"
    r = _open_index(index_dir, options, embedder)
    rows = r.id_map.rows_of(table["id"].tolist())
    known = [i for i, row in enumerate(rows) if row is not None]
    for i in known:
        old = r.id_map.record(rows[i])
        new = table.iloc[i]
        if (old["caption"], old.get("video")) != (new["caption"], new["video"]):
            raise UserError(
                f"{new['id']!r} is already in the bank with another caption or video "
                f"({old['caption']!r}, {old.get('video')!r}); ids name one video: give the new "
                "one another id"
            )
    fresh = table.drop(index=table.index[known]).reset_index(drop=True)
    if fresh.empty:
        return 0, len(known)
    vectors = r.embedder.encode(
        fresh["caption"].tolist(), batch_size=options.get("batch_size") or 256
    )
    r.index.add(vectors)
    combined = pd.concat(
        [r.table, fresh.assign(source=fresh["id"].map(source_id))], ignore_index=True
    )
    manifest = dict(r.manifest)
    start, end = int(manifest["rows"]), int(r.index.ntotal)
    manifest["rows"] = end
    manifest.pop("sha256", None)
    rerank = None if r.rerank is None else [r.rerank, vectors]  # the old rows, then the new
    with Change(bank, "add", lock=False) as change:
        staged = change.stage("index")
        write_index_folder(staged, r.index, combined, manifest, rerank=rerank, k_factor=r.k_factor)
        first, last = fresh["id"].iloc[0], fresh["id"].iloc[-1]
        change.commit({**record, "rows": [start, end], "added": len(fresh), "ids": [first, last]})
    log.info("added %d rows to %s (%d already there)", len(fresh), index_dir, len(known))
    return len(fresh), len(known)


def reindex(bank: Path, options: dict, embedder=None) -> dict:
    """Rebuild the bank's index as ``options`` say (another kind or factory), every row kept in
    its place, its captions embedded again with the bank's model; one change."""
    r = _open_index(bank / "index", options, embedder)
    loading = ("model", "device", "trust_remote_code")
    settings = {k: v for k, v in options.items() if v is not None and k not in loading}
    if "factory" not in settings:
        settings.setdefault("kind", r.manifest.get("kind"))
    record = {"from": r.manifest.get("factory")}
    return _rebuild_index(bank, r.table, r.embedder, r.manifest, settings, record, lock=False)


def reindex_from_id_map(bank: Path, trust_remote_code: str | None = None) -> dict:
    """The index rebuilt from the bank's id map alone (its own checksums intact), with the
    recorded kind and embedding model: the repair of damaged index files; one change."""
    from dit_mem.data.idmap import FILES, IdMap
    from dit_mem.data.table import file_sha256
    from dit_mem.retrieval.embedder import load_embedder
    from dit_mem.retrieval.index import MANIFEST

    folder = bank / "index"
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in FILES:
        if file_sha256(folder / name) != (manifest.get("sha256") or {}).get(name):
            raise UserError(f"{folder / name} is damaged too: rebuild the bank from its table")
    table = IdMap.open(folder).table.to_pandas()
    emb = load_embedder(manifest.get("model_path"), trust_remote_code=trust_remote_code)
    kind = manifest.get("kind")
    settings = {"factory": manifest["factory"]} if kind == "factory" else {"kind": kind}
    record = {"repair": "index rebuilt from the id map"}
    return _rebuild_index(bank, table, emb, manifest, settings, record, lock=True)


def _rebuild_index(bank, table, embedder, manifest, settings, record, lock: bool) -> dict:
    """The bank's index built again from its rows (``table``), as one ``reindex`` change."""
    from dit_mem.retrieval.index import build_index_from_table

    source = {"csv": manifest.get("csv"), "csv_sha256": manifest.get("csv_sha256")}
    with Change(bank, "reindex", lock=lock) as change:
        staged = change.stage("index")
        m = build_index_from_table(table, staged, embedder, **source, **settings)
        change.commit({**record, "index": m["factory"], "rows": m["rows"]})
    return m


# --------------------------------------------------------------------------------------
# Parts one by one (build-index / encode-latents / cache-tokens --bank)
# --------------------------------------------------------------------------------------
def index_part(bank: Path, csv: Path, options: dict, overwrite: bool = False) -> dict:
    """``dit-mem build-index --bank``: the bank's index from ``csv``, as one change."""
    from dit_mem.data.table import file_sha256
    from dit_mem.retrieval.index import build_index

    if (bank / "index").exists() and not overwrite:
        raise UserError(
            f"{bank / 'index'} already holds an index; pass --overwrite to replace it (or "
            "`dit-mem bank build --reindex` to rebuild it from the bank's own rows)"
        )
    with Change(bank, "index") as change:
        m = build_index(csv, change.stage("index"), **options)
        change.commit(
            {
                "csv": str(Path(csv).resolve()),
                "csv_sha256": file_sha256(csv),
                "rows": m["rows"],
                "index": m["factory"],
            }
        )
    return m


def record_encoding(bank: Path, encoded: int, failed: int, csv: Path | None) -> None:
    """``encode-latents --bank``: the latents it wrote (each file atomic), recorded."""
    if not (encoded or failed):
        refresh_manifest(bank)
        return
    with Change(bank, "encode") as change:
        change.commit({"encoded": encoded, "failed": failed, "csv": str(csv) if csv else None})


def cache_tokens(bank: Path, encoder, ids: list[str] | None = None, **options) -> Any:
    """The bank's token cache of ``encoder`` (of ``ids``, else of every latent): a new cache is
    built beside the bank and put in place as one change; an existing one of this encoder is
    extended in place (shards and its table are each written whole) and the run recorded."""
    from dit_mem.data import build_token_cache
    from dit_mem.data.token_cache import encoder_fingerprint

    tokens = bank / "tokens"
    fingerprint = encoder_fingerprint(encoder)
    if (tokens / "manifest.json").is_file():
        s = build_token_cache(encoder, bank / "latents", tokens, ids=ids, **options)
        if s.is_main_process and s.encoded:
            with Change(bank, "tokens", lock=False) as change:
                change.commit({"encoder": fingerprint, "cached": s.encoded, "total": s.total})
        return s
    building = bank / ".building-tokens"  # kept across a killed run: the job resumes there
    s = build_token_cache(encoder, bank / "latents", building, ids=ids, **options)
    if s.is_main_process:
        (building / ".lock").unlink(missing_ok=True)
        with Change(bank, "tokens", lock=False) as change:
            os.rename(building, change.stage("tokens"))
            change.commit({"encoder": fingerprint, "cached": s.encoded, "total": s.total})
    return s


# --------------------------------------------------------------------------------------
# Export and push: a token-only bank to share
# --------------------------------------------------------------------------------------
def export_bank(bank, encoder, out: str | Path, license: str | None = None) -> dict:
    """Write ``out``: the bank's index and ``encoder``'s token cache of every bank video (no
    latents, no videos) + ``bank.json`` + a ``README.md`` dataset card; whole or not at all.

    The token cache is the bank's own when it was made by ``encoder``, else computed from the
    bank's latents. Videos without memory (failed encodes) stay left out; a video with neither
    tokens nor a latent (a lazy bank not yet filled) is an error that says how to fill it.
    Returns the card's facts (counts, bytes per video).
    """
    from dit_mem.bank import MemoryBank
    from dit_mem.bank.journal import describe, now
    from dit_mem.data import build_token_cache
    from dit_mem.data.token_cache import SHARD_GLOB, encoder_fingerprint
    from dit_mem.utils import atomic_dir, write_json_atomic

    if not isinstance(bank, MemoryBank):
        bank = MemoryBank.from_pretrained(bank)
    out = Path(out)
    if out.exists():
        raise UserError(
            f"{out} exists; export writes a new folder (to upload an export again: "
            f"`dit-mem bank push {out} REPO_ID`)"
        )
    source = [Path(p).resolve() for p in bank.parts.values()]
    target = out.resolve()
    if any(target.is_relative_to(p) or p.is_relative_to(target) for p in source):
        raise UserError(
            f"--out {out} lies inside the bank it exports (or holds it): give a folder outside"
        )
    left_out = set(bank.retriever.ids.take(bank.retriever.unavailable))  # no memory: failed
    ids = [v for v in bank.ids if v not in left_out]
    if not ids:
        raise UserError(f"{bank.retriever.root.parent}: no bank video has memory to export")
    own = bank.tokens is not None and bank._cache_matches(encoder)
    untokened = [v for v in ids if v not in bank.tokens] if own else ids
    latents = bank.latents if bank.latents is not None else ()
    lacking = [v for v in untokened if v not in latents]
    if lacking:
        raise UserError(
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
        tokens = json.loads((tmp / "tokens" / "manifest.json").read_text())
        index_bytes = sum(p.stat().st_size for p in (tmp / "index").iterdir())
        token_bytes = sum(p.stat().st_size for p in (tmp / "tokens").glob(SHARD_GLOB))
        facts = {
            "videos": len(ids),
            "left_out": len(bank) - len(ids),
            "encoder_fingerprint": encoder_fingerprint(encoder),
            "embedding_model": bank.retriever.manifest.get("model"),
            "index": bank.retriever.manifest.get("factory") or bank.retriever.manifest["kind"],
            "geometry": (bank.latents.manifest if bank.latents is not None else {}).get(
                "latent_shape"
            ),
            "settings": _settings(bank),
            "num_groups": tokens["num_groups"],
            "dim": tokens["dim"],
            "index_bytes": index_bytes,
            "token_bytes": token_bytes,
            "bytes_per_video": round((index_bytes + token_bytes) / len(ids), 1),
            "license": license,
        }
        (tmp / CARD).write_text(dataset_card(facts))
        record = {"op": "export", "source": str(bank.retriever.root.parent.resolve()), **facts}
        write_json_atomic(tmp / "bank.json", describe(tmp, [{**record, "when": now()}]))
    return facts


def push_bank(folder: str | Path, repo_id: str, **options) -> Any:
    """``dit-mem bank push``: upload a bank folder (an export) to the Hub; a failure to reach the
    Hub is one line that says how to retry."""
    from dit_mem.bank import MemoryBank

    try:
        return MemoryBank.from_pretrained(folder).push_to_hub(repo_id, **options)
    except Exception as e:  # huggingface_hub raises many kinds (offline, connection, auth, HTTP)
        if not _network_error(e):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConnectionError(
            f"could not upload {folder} to the Hub repository {repo_id} ({type(e).__name__}: "
            f"{first}); nothing is lost: push it again with `dit-mem bank push {folder} {repo_id}`"
        ) from None


def _network_error(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    kinds = (OSError, OfflineModeIsEnabled, HfHubHTTPError)
    names = {"ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError", "TimeoutException"}
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, kinds) or type(seen).__name__ in names:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _settings(bank) -> dict | None:
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
| latent geometry | {geometry.get("num_frames")} frames of {geometry.get("height")}×{geometry.get("width")} \\
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
