"""The public release's memory-bank files → a :class:`~dit_mem.bank.MemoryBank` folder.

The release (``memory_index/build_retrieve_index.py``, ``latent_processing/``) writes:

* ``labels.index``: a FAISS ``IndexFlatIP`` over gte-base-en-v1.5 CLS embeddings (L2-normalised);
* ``id_map.json``: ``{"0": "<video file>", ...}``, row → video, in index order;
* ``metadata.json``: ``[{"index", "video", "caption", "aesthetic_score", ...}, ...]``;
* ``<video id>.pt`` per video: ``torch.save({"latent": bf16 [16, 21, 60, 104], "video_id",
  "shape", "dtype"})``, the latent normalised with Wan2.1's latent mean and std.

We read JSON only (the release's loader tries ``pickle`` first; we never unpickle), and the
``.pt`` files only with ``torch.load(weights_only=True)``. ``import_release`` writes ``index/``
(our manifest, checksums, the same FAISS file), ``latents/`` (one safetensors file per video)
and ``bank.json``; it is resumable (latents already converted are kept) and refuses a target
that is a bank of something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dit_mem.bank.journal import Change, is_bank_file, refresh_manifest
from dit_mem.data.latents import FORMAT as LATENT_FORMAT
from dit_mem.data.latents import LATENT_KEY, write_latent
from dit_mem.data.latents import MANIFEST as LATENT_MANIFEST
from dit_mem.data.table import is_safe_id, source_id, video_id
from dit_mem.errors import UserError
from dit_mem.utils import folder_lock, get_logger, write_json_atomic

log = get_logger(__name__)

RELEASE_INDEX = "labels.index"
RELEASE_ID_MAP = "id_map.json"
RELEASE_METADATA = "metadata.json"
RELEASE_EMBEDDING_MODEL = "gte-base-en-v1.5"
RELEASE_EMBEDDING_DIM = 768
# Wan2.1's latent statistics, as the release's latent_processing/vae.py normalises with them.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


@dataclass
class ImportSummary:
    videos: int = 0  # rows of the index
    converted: int = 0  # latents converted in this run
    kept: int = 0  # latents converted by an earlier run
    missing: list[str] = field(default_factory=list)  # index rows without a .pt latent


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({what} of the release's memory_index/)")
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = " (it looks like a pickle: we never load those)" if raw[:1] == b"\x80" else ""
        raise UserError(f"{path}: not JSON{hint} ({e})") from None


def read_release_index(index_dir: str | Path):
    """``(faiss index, table)`` of a release ``memory_index/`` folder, checked row by row."""
    import faiss
    import pandas as pd

    index_dir = Path(index_dir)
    index_file = index_dir / RELEASE_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file} not found: not the release's memory_index/ folder")
    try:
        index = faiss.read_index(str(index_file))
    except RuntimeError as e:
        raise UserError(f"{index_file}: not a readable FAISS index ({e})") from None
    id_map = _read_json(index_dir / RELEASE_ID_MAP, "row → video")
    if not isinstance(id_map, dict | list):
        raise UserError(f"{index_dir / RELEASE_ID_MAP}: expected a mapping of rows to videos")
    videos = id_map if isinstance(id_map, list) else _rows(id_map, index_dir / RELEASE_ID_MAP)
    metadata = _read_json(index_dir / RELEASE_METADATA, "captions")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise UserError(f"{index_dir / RELEASE_METADATA}: expected a list of records")
    n = index.ntotal
    if not len(videos) == len(metadata) == n:
        raise UserError(
            f"{index_dir}: {RELEASE_INDEX} has {n} vectors, {RELEASE_ID_MAP} {len(videos)} rows, "
            f"{RELEASE_METADATA} {len(metadata)} records; they must match"
        )
    rows = []
    for i, (video, meta) in enumerate(zip(videos, metadata, strict=True)):
        if not isinstance(video, str) or not video.strip():
            raise UserError(f"{index_dir / RELEASE_ID_MAP}: row {i} has no video name")
        if meta.get("video", video) != video:
            raise UserError(
                f"{index_dir}: row {i} is {video!r} in {RELEASE_ID_MAP} but "
                f"{meta.get('video')!r} in {RELEASE_METADATA}"
            )
        vid = video_id(video)
        if not is_safe_id(vid):
            raise UserError(f"{index_dir / RELEASE_ID_MAP}: row {i}: unusable video name {video!r}")
        caption = meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise UserError(f"{index_dir / RELEASE_METADATA}: record {i} has no caption")
        extra = {k: v for k, v in meta.items() if k not in ("index", "video", "caption")}
        rows.append(
            {"id": vid, "video": video, "caption": caption, "source": source_id(vid), **extra}
        )
    table = pd.DataFrame(rows)
    dup = table["id"][table["id"].duplicated()]
    if len(dup):
        raise UserError(f"{index_dir}: {len(dup)} duplicate video id(s), e.g. {dup.iloc[0]!r}")
    return index, table


def _rows(id_map: dict, path: Path) -> list:
    try:
        keys = sorted(int(k) for k in id_map)
    except ValueError:
        raise UserError(f"{path}: keys must be row numbers") from None
    if keys != list(range(len(keys))):
        raise UserError(f"{path}: rows must be 0 … {len(keys) - 1}, each once")
    return [id_map[str(k)] if str(k) in id_map else id_map[k] for k in keys]


def read_release_latent(path: Path) -> torch.Tensor:
    """The ``latent`` of one release ``.pt`` file (``weights_only``: tensors and plain data)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for corrupt or unsafe files
        raise UserError(f"{path}: not a readable latent file ({type(e).__name__}: {e})") from None
    latent = data.get(LATENT_KEY) if isinstance(data, dict) else data
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        raise UserError(f"{path}: expected a dict with a 4-d tensor 'latent' [C, T, H, W]")
    if not bool(torch.isfinite(latent).all()):
        raise UserError(f"{path}: the latent holds NaN or infinite values")
    return latent


def import_release(
    index_dir: str | Path,
    latents_dir: str | Path,
    out: str | Path,
    *,
    videos: str | Path | None = None,
    embedding_model: str | Path | None = None,
    progress: bool = True,
) -> ImportSummary:
    """Convert the release's ``memory_index/`` and ``<id>.pt`` latents into a bank at ``out``."""
    out, latents_dir = Path(out), Path(latents_dir)
    if not latents_dir.is_dir():
        raise FileNotFoundError(f"latent folder not found: {latents_dir}")
    if out.exists() and any(not is_bank_file(p.name) for p in out.iterdir()):
        raise UserError(f"{out} holds other files; import into a new folder")
    index, table = read_release_index(index_dir)  # checked before anything is written
    _check_embedding_model(index, index_dir, embedding_model)
    with folder_lock(out, "bank import-release"):
        return _import(index, table, index_dir, latents_dir, out, videos, embedding_model, progress)


def _check_embedding_model(index, index_dir, embedding_model) -> None:
    """The model recorded for retrieval must embed at the index's width."""
    from dit_mem.retrieval.embedder import declared_facts

    if embedding_model is None:
        if index.d != RELEASE_EMBEDDING_DIM:
            raise UserError(
                f"{Path(index_dir) / 'labels.index'} holds {index.d}-d vectors, but the release's "
                f"{RELEASE_EMBEDDING_MODEL} embeds at {RELEASE_EMBEDDING_DIM}-d: pass "
                "--embedding-model, the folder of the model this index was built with"
            )
        return
    if not Path(embedding_model).is_dir():
        raise FileNotFoundError(f"--embedding-model: no such folder: {embedding_model}")
    dim, _ = declared_facts(embedding_model)
    if dim is not None and dim != index.d:
        raise UserError(
            f"--embedding-model {embedding_model} embeds at {dim}-d, but "
            f"{Path(index_dir) / 'labels.index'} holds {index.d}-d vectors: give the model this "
            "index was built with"
        )


def _import_latents(table, latents_dir: Path, dest: Path, summary, progress: bool) -> None:
    """Convert the release's ``<id>.pt`` latents of the indexed videos into ``dest`` (the long
    part, resumable: converted files are kept) and write its manifest."""
    from tqdm.auto import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    shape = None
    old = dest / LATENT_MANIFEST
    if old.is_file():
        shape = json.loads(old.read_text()).get("latent_shape")
    for vid in tqdm(table["id"], desc="latents", unit="video", disable=not progress):
        target = dest / f"{vid}.safetensors"
        if target.is_file():
            summary.kept += 1
            continue
        source = latents_dir / f"{vid}.pt"
        if not source.is_file():
            summary.missing.append(vid)
            continue
        latent = read_release_latent(source)
        if shape is None:
            shape = list(latent.shape)
        elif list(latent.shape) != shape:
            raise UserError(f"{source}: latent shape {list(latent.shape)}, the others {shape}")
        write_latent(target, latent, vid, source)
        summary.converted += 1
    if shape is None:
        raise UserError(f"{latents_dir}: none of the {len(table)} indexed videos has a .pt latent")
    write_json_atomic(
        old,
        {
            "format": LATENT_FORMAT,
            "layout": "<id>.safetensors holding tensor 'latent' [C, T, H, W]",
            "dtype": "bfloat16",
            "latent_shape": shape,
            "num_frames": 81,
            "height": 480,
            "width": 832,
            "resize": "stretch",
            "normalized": True,
            "family": "wan",
            "vae_class": "AutoencoderKLWan",
            "normalization": "(z - latents_mean) / latents_std",
            "latents_mean": WAN21_LATENTS_MEAN,
            "latents_std": WAN21_LATENTS_STD,
            "source": f"DiT-Mem release latents ({latents_dir})",
        },
    )


def _import(
    index, table, index_dir, latents_dir: Path, out: Path, videos, embedding_model, progress
):
    from dit_mem.retrieval.embedder import declared_facts, model_name
    from dit_mem.retrieval.index import FORMAT as INDEX_FORMAT
    from dit_mem.retrieval.index import write_index_folder

    summary = ImportSummary(videos=len(table))
    _import_latents(table, latents_dir, out / "latents", summary, progress)  # resumable
    manifest = {
        "format": INDEX_FORMAT,
        "model": model_name(embedding_model) if embedding_model else RELEASE_EMBEDDING_MODEL,
        "model_path": str(Path(embedding_model).resolve()) if embedding_model else None,
        "dim": int(index.d),
        "pooling": (declared_facts(embedding_model)[1] if embedding_model else None) or "cls",
        "normalized": True,
        "metric": "inner_product",
        "kind": "flat",
        "rows": int(index.ntotal),
        "source": f"DiT-Mem release memory_index ({Path(index_dir).resolve()})",
    }
    done = out / "index" / "manifest.json"
    if done.is_file() and json.loads(done.read_text()).get("source") == manifest["source"]:
        refresh_manifest(out)  # imported before: the latents above were all it could add
    else:
        with Change(out, "import", lock=False) as change:  # the index (+ videos), one change
            write_index_folder(change.stage("index"), index, table, manifest)
            if videos is not None:
                link = change.stage("videos")
                link.symlink_to(Path(videos).resolve(), target_is_directory=True)
            record = {"index": str(Path(index_dir).resolve()), "rows": int(index.ntotal)}
            change.commit({**record, "latents": str(latents_dir.resolve())})
    if summary.missing:
        log.warning(
            "%d of %d indexed videos have no latent in %s (e.g. %s); retrieving them is an error",
            len(summary.missing),
            len(table),
            latents_dir,
            summary.missing[0],
        )
    return summary
