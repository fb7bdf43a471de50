"""Memory-bank latents: the ``encode-latents`` job and the ``LatentStore`` that reads them.

Layout of a latent folder (one file per video: a killed or re-sharded run resumes by file
existence alone, and a reader opens exactly the N files it needs):

    latent/
      manifest.json            settings (frames, size, resize, VAE stats, normalisation, shape)
      <id>.safetensors         tensor ``latent`` bf16 [C, T, H, W], e.g. [16, 21, 60, 104]
      failures.jsonl           one JSON line per video that could not be encoded (appended)

Latents are the mode of the VAE's posterior, normalised as the family's pipeline normalises them
(Wan: ``(z - latents_mean) / latents_std``; :mod:`dit_mem.data.vae`): what the DiT (and therefore
the memory encoder) consumes; the manifest records how.

The job shards rows across ``accelerate`` processes (process i of n takes rows i::n), skips
ids whose file exists, writes every file atomically, and logs a corrupt or missing video to
``failures.jsonl`` instead of stopping.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dit_mem.data.table import is_safe_id, read_video_table
from dit_mem.errors import UserError
from dit_mem.memory.tokens import check_plausible
from dit_mem.utils import get_logger, write_safetensors_atomic
from dit_mem.utils.io import (
    TMP_PREFIX,
    changed_settings,
    read_json_mapping,
    refuse_other_settings,
)

log = get_logger(__name__)

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
LATENT_KEY = "latent"
FORMAT = "dit-mem-latents/1"
# Settings that must agree between a folder's manifest and a run that adds to it.
_COMPARED = (
    "num_frames",
    "height",
    "width",
    "resize",
    "normalized",
    "latent_shape",
    "distribution",
    "vae_class",
    "normalization",
    "latents_mean",
    "latents_std",
    "scaling_factor",
    "family",
    "vae_fingerprint",
)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
class LatentStore:
    """Read access to a latent folder written by ``dit-mem encode-latents``.

    >>> store = LatentStore("latent/")
    >>> x = store.load(["vid_a", "vid_b"])   # [1, N, C, T, H, W] bf16, ready for MemoryEncoder
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} not found: {self.root} is not a latent folder written by "
                "`dit-mem encode-latents` (the manifest says how latents were normalised)"
            )
        self.manifest: dict = read_json_mapping(manifest)
        shape = self.manifest.get("latent_shape")
        if shape is not None and (
            not isinstance(shape, list)
            or len(shape) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise UserError(f"{manifest}: latent_shape must be [C, T, H, W], got {shape!r}")
        self.shape: tuple[int, ...] | None = tuple(shape) if shape else None

    def path(self, vid: str) -> Path:
        if not is_safe_id(vid):
            raise UserError(f"{vid!r} is not a video id (ids are plain file names)")
        return self.root / f"{vid}.safetensors"

    def __contains__(self, vid: str) -> bool:
        return is_safe_id(vid) and self.path(vid).is_file()

    def failed_ids(self) -> set[str]:
        """Ids the latent job could not encode (``failures.jsonl``) and that still have no latent:
        videos without memory, which retrieval leaves out."""
        path = self.root / FAILURES
        if not path.is_file():
            return set()
        failed = set()
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                vid = json.loads(line).get("id")
            except (ValueError, AttributeError):
                continue  # a torn last line of a killed job
            if isinstance(vid, str) and vid not in self:
                failed.add(vid)
        return failed

    def ids(self) -> list[str]:
        """Sorted ids of every complete latent in the folder."""
        return sorted(
            p.name[: -len(".safetensors")]
            for p in self.root.glob("*.safetensors")
            if not p.name.startswith(TMP_PREFIX)
        )

    def load_one(self, vid: str, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
        """One latent ``[C, T, H, W]`` (stored bf16; cast to ``dtype`` unless None)."""
        from safetensors import SafetensorError, safe_open

        from dit_mem.utils.fingerprint import tensor_sha256

        path = self.path(vid)
        if not path.is_file():
            raise FileNotFoundError(
                f"no latent for id {vid!r} in {self.root} ({path.name} missing)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                x, recorded = f.get_tensor(LATENT_KEY), (f.metadata() or {}).get("sha256")
        except (SafetensorError, KeyError, OSError) as e:
            raise UserError(f"{path}: unreadable latent file ({e})") from e
        if recorded is not None and recorded != tensor_sha256(x):
            raise UserError(
                f"{path}: damaged (its bytes do not match the checksum written with it); delete "
                "it and encode it again (`dit-mem bank verify BANK` lists every damaged file)"
            )
        if self.shape is not None and tuple(x.shape) != self.shape:
            raise UserError(
                f"{path}: latent of shape {list(x.shape)}, but {self.root / MANIFEST} says "
                f"{list(self.shape)}"
            )
        if not x.is_floating_point():
            raise UserError(f"{path}: latent of dtype {x.dtype}, expected floating point")
        check_plausible(x, path, "latent")
        return x if dtype is None else x.to(dtype)

    def load(
        self,
        ids: list[str],
        dtype: torch.dtype | None = torch.bfloat16,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Latents of ``ids`` stacked as ``[1, N, C, T, H, W]`` (the memory encoder's input)."""
        if not ids:
            raise UserError("LatentStore.load needs at least one id")
        xs = [self.load_one(v, dtype) for v in ids]
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            raise UserError(f"latents of {ids} in {self.root} have different shapes: {shapes}")
        out = torch.stack(xs)[None]
        return out if device is None else out.to(device)

    def load_batch(self, batch: list[list[str]], **kw) -> torch.Tensor:
        """``[B, N, C, T, H, W]`` for B lists of N ids each."""
        return torch.cat([self.load(ids, **kw) for ids in batch])

    # ------------------------------------------------------------------ filling (lazy banks)
    def check_vae(self, vae) -> None:
        """``ValueError`` unless ``vae`` is the VAE this folder's latents were made with (family,
        class, normalisation, latent shape at the recorded geometry)."""
        m = self.manifest
        missing = [k for k in ("num_frames", "height", "width") if not isinstance(m.get(k), int)]
        if missing:
            raise UserError(f"{self.root / MANIFEST}: no {', '.join(missing)} recorded")
        have = vae_settings(vae, m["num_frames"], m["height"], m["width"])
        changes = vae_changes(m, have, _VAE_KEYS, self.root)
        if changes:
            details = "; ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changes.items())
            raise UserError(
                f"{self.root}: a foreign VAE: the bank's latents were made with another VAE "
                f"({', '.join(changes)} differ: {details}); give the VAE of the bank's base model "
                f"({m.get('vae')})"
            )

    def record_failure(self, vid: str, video: str | Path, error: str) -> None:
        """``vid`` could not be encoded: it has no memory (one line in ``failures.jsonl``)."""
        record = {"id": vid, "video": str(video), "error": error}
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        append_failure(self.root / FAILURES, record)

    def fill(self, vid: str, video: str | Path, vae) -> torch.Tensor:
        """Decode ``video`` at the geometry this folder records, encode it with ``vae`` (checked
        by :meth:`check_vae` first), write ``<vid>.safetensors`` atomically; returns the latent.

        The same tensor ``encode-latents`` writes for the same video (its metadata names the
        file it was read from). Processes filling the same id at once each write a whole file;
        the last rename wins, and all are equal.
        """
        from dit_mem.data.vae import encode_frames
        from dit_mem.data.video import load_video

        m = self.manifest
        frames = load_video(
            video,
            m["num_frames"],
            m["height"],
            m["width"],
            resize=m.get("resize", "stretch"),
            backend=m.get("backend", "pyav"),
        )
        z = encode_frames(vae, frames[None])[0].to(torch.bfloat16).cpu()  # (no_grad inside)
        check_plausible(z, video, "latent")
        write_latent(self.path(vid), z, vid, video)
        return z


# --------------------------------------------------------------------------------------
# The encoding job
# --------------------------------------------------------------------------------------
@dataclass
class LatentJobConfig:
    """Settings of ``dit-mem encode-latents`` (defaults: the paper, method §2)."""

    csv: Path
    out: Path
    base_model: Path
    videos: Path | None = None  # root of relative paths in the CSV; default: the CSV's folder
    num_frames: int | None = None  # None: the base model's default (Wan: 81×480×832, method §2)
    height: int | None = None
    width: int | None = None
    resize: str = "stretch"  # "stretch" (paper) or "crop"
    backend: str = "pyav"  # "pyav" or "decord"
    vae_dtype: str = "float32"
    num_workers: int = 2  # decoding processes per GPU process
    limit: int | None = None  # only the first `limit` rows (smoke runs)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be ≥ 1 (or none), got {self.limit}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be ≥ 0, got {self.num_workers}")
        from dit_mem.models.base_model import clip_size

        # None: the base model's default; the VAE's own rule (Wan: 4k+1 frames, multiples of 8)
        # is checked by its family when the VAE is there (latent_manifest), before any encoding
        size = clip_size(self.base_model, self.num_frames, self.height, self.width)
        self.num_frames, self.height, self.width = size
        for name in ("num_frames", "height", "width"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.resize not in ("stretch", "crop"):
            raise UserError(f"resize must be 'stretch' or 'crop', got {self.resize!r}")
        if self.backend not in ("pyav", "decord"):
            raise UserError(f"backend must be 'pyav' or 'decord', got {self.backend!r}")
        if self.vae_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(
                f"vae_dtype must be float32, bfloat16 or float16, got {self.vae_dtype!r}"
            )


@dataclass
class JobSummary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    is_main_process: bool = True


# What a VAE must agree on to add latents to a folder (a lazy bank's fills included).
_VAE_KEYS = ("latent_shape", "family", "vae_class", "normalization", "latents_mean")
_VAE_KEYS += ("latents_std", "scaling_factor", "vae_fingerprint")
# How to record the VAE fingerprint a bank made before dit-mem 0.2 lacks
RECORD_VAE = "dit-mem bank verify {bank} --base-model BASE_MODEL"


def vae_settings(vae, num_frames: int, height: int, width: int) -> dict:
    """The VAE's part of a latent manifest: its family, class, weights' fingerprint,
    normalisation, latent shape."""
    from dit_mem.backbone.families import family_of_vae
    from dit_mem.utils.fingerprint import vae_fingerprint

    family = family_of_vae(vae)
    return {
        "latent_shape": family.latents.shape(vae, num_frames, height, width),
        "family": family.name,
        "vae_class": type(vae).__name__,
        "vae_fingerprint": vae_fingerprint(vae),
        **family.latents.record(vae),
    }


def check_record(record: dict, where: Any, family: str | None = None, vae=None) -> None:
    """``ValueError`` naming both unless latents recorded as ``record`` (a latent manifest, or
    a bank's ``latent_record``) are of ``family`` and, given, made by the VAE whose fingerprint
    is ``vae`` (:func:`~dit_mem.utils.fingerprint.vae_fingerprint`): memory made from another
    family's latents, or another VAE's, is noise."""
    from dit_mem.utils.fingerprint import same_weights

    keys = unrecorded(record, ("family", "vae_fingerprint"), where)
    if family is not None and "family" in keys and record["family"] != family:
        raise UserError(
            f"{where} holds latents of a {record['family']} VAE ({record.get('vae_class')}); this "
            f"model is of the {family} family: use latents made with this base model "
            "(dit-mem bank build --base-model ...)"
        )
    recorded = record.get("vae_fingerprint") if "vae_fingerprint" in keys else None
    if vae is not None and recorded is not None and not same_weights(recorded, vae):
        raise UserError(
            f"{where} was encoded by another {record.get('vae_class')} (the VAE weights it "
            "records differ from this model's): use latents made with this base model's VAE"
        )


def vae_changes(old: dict, new: dict, keys: tuple[str, ...], where: Any) -> dict:
    """The settings of ``keys`` that differ between a latent manifest and a VAE's
    (:func:`changed_settings`), the weights compared by fingerprint, dtype rounding aside."""
    from dit_mem.utils.fingerprint import same_weights

    keys = unrecorded(old, keys, where)
    changes = changed_settings(old, new, keys=[k for k in keys if k != "vae_fingerprint"])
    if "vae_fingerprint" in keys and not same_weights(
        old["vae_fingerprint"], new["vae_fingerprint"]
    ):
        changes["vae weights"] = ("recorded", "another VAE's")
    return changes


def unrecorded(old: dict, keys: tuple[str, ...], where: Any) -> tuple[str, ...]:
    """``keys`` less those a manifest made before they were recorded lacks (a warning says how to
    record them): an old bank stays usable."""
    missing = [k for k in ("family", "vae_fingerprint") if k in keys and old.get(k) is None]
    if missing:
        log.warning(
            "%s records no %s (made by an older dit-mem): another VAE cannot be told from its "
            "own; record it with `%s`",
            where,
            " or ".join(missing),
            RECORD_VAE.format(bank=Path(where).parent if Path(where).name == "latents" else where),
        )
    return tuple(k for k in keys if k not in missing)


def latent_manifest(cfg: LatentJobConfig, vae) -> dict:
    """The ``manifest.json`` of a latent folder made by ``vae`` at ``cfg``'s geometry."""
    settings = vae_settings(vae, cfg.num_frames, cfg.height, cfg.width)
    return {
        "format": FORMAT,
        "layout": "<id>.safetensors holding tensor 'latent' [C, T, H, W]",
        "dtype": "bfloat16",
        "latent_shape": settings.pop("latent_shape"),
        "num_frames": cfg.num_frames,
        "height": cfg.height,
        "width": cfg.width,
        "resize": cfg.resize,
        "backend": cfg.backend,
        "frame_sampling": "floor(linspace(0, n-1, F)); shorter clips repeat the last frame",
        "pixel_range": [-1.0, 1.0],
        "distribution": "mode",
        "normalized": True,
        **settings,
        "vae": str(cfg.base_model),
        "vae_dtype": cfg.vae_dtype,
    }


def write_latent(path: Path, z: torch.Tensor, vid: str, video: Any = None) -> None:
    """One latent file, written whole, with the checksum of its bytes (checked when read)."""
    from dit_mem.utils.fingerprint import tensor_sha256

    z = z.to(torch.bfloat16).cpu().contiguous()
    meta = {"id": vid, "sha256": tensor_sha256(z), **({"video": str(video)} if video else {})}
    write_safetensors_atomic(path, {LATENT_KEY: z}, metadata=meta)


def append_failure(path: Path, record: dict) -> None:
    """Append one JSON line; a single O_APPEND write, so concurrent processes never interleave."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class _VideoDataset(torch.utils.data.Dataset):
    """Decodes rows in worker processes; a bad video becomes an error record, not an exception."""

    def __init__(self, rows: list[dict], root: Path, cfg: LatentJobConfig):
        self.rows, self.root, self.cfg = rows, root, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from dit_mem.data.video import VideoDecodeError, load_video

        row = self.rows[i]
        path = Path(row["video"])
        path = path if path.is_absolute() else self.root / path
        item = {"id": row["id"], "video": str(path)}
        try:
            item["frames"], item["source"] = load_video(
                path,
                self.cfg.num_frames,
                self.cfg.height,
                self.cfg.width,
                resize=self.cfg.resize,  # type: ignore[arg-type]
                backend=self.cfg.backend,  # type: ignore[arg-type]
                with_source=True,
            )
        except VideoDecodeError as e:
            item["error"] = str(e)
        except Exception as e:  # anything else about one video must not stop the run
            item["error"] = f"{path}: cannot load video ({type(e).__name__}: {e})"
        return item


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def encode_latents(cfg: LatentJobConfig, vae=None, rows: list[dict] | None = None) -> JobSummary:
    """Run the latent job for this process's share of the rows; returns its counts.

    ``vae`` may be passed in (tests); otherwise it is loaded from ``cfg.base_model`` onto this
    process's accelerator. ``rows`` (``{"id", "video"}`` each): encode these instead of the CSV's
    (``bank build --for-training`` / ``--add``). Safe to re-run: complete files are skipped; a
    second job on the same folder is refused while one runs.
    """
    from dit_mem.data.folder_job import FolderJob

    if rows is None:
        table = read_video_table(cfg.csv, require_caption=False)
        rows = table[["id", "video"]].to_dict("records")
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    root = Path(cfg.videos) if cfg.videos is not None else Path(cfg.csv).parent
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    with FolderJob(cfg.out, "encode-latents") as job:
        return _encode_share(cfg, vae, job, rows, root)


def claim_latent_folder(cfg: LatentJobConfig, vae, job, fix: str = "use another --out folder"):
    """Write ``cfg.out``'s manifest (a new folder) or check it against this run's settings and
    VAE (``ValueError`` "already holds latents made with other settings")."""
    manifest = latent_manifest(cfg, vae)
    job.claim(manifest, lambda old: _compare(old, manifest, job.out, fix))
    return manifest


def claimable(cfg: LatentJobConfig, vae, fix: str) -> dict:
    """``cfg.out``'s latents could be added to by this run (its settings and VAE), checked
    without writing anything; returns the manifest this run makes."""
    manifest = latent_manifest(cfg, vae)
    path = Path(cfg.out) / MANIFEST
    if path.is_file():
        _compare(read_json_mapping(path), manifest, Path(cfg.out), fix)
    return manifest


def _compare(old: dict, new: dict, where: Path, fix: str) -> None:
    refuse_other_settings(where, "latents", vae_changes(old, new, _COMPARED, where), fix)


def _encode_share(cfg: LatentJobConfig, vae, job, rows: list[dict], root: Path) -> JobSummary:
    from dit_mem.models.base_model import load_vae

    if vae is None:
        vae = load_vae(cfg.base_model, dtype=getattr(torch, cfg.vae_dtype), device=job.device)
    out = job.out
    claim_latent_folder(cfg, vae, job)
    rows = job.share(rows)
    todo = [r for r in rows if not (out / f"{r['id']}.safetensors").is_file()]
    summary = JobSummary(skipped=len(rows) - len(todo), is_main_process=job.is_main)
    log.info(
        "process %d: %d videos, %d already done, %d to encode",
        job.rank,
        len(rows),
        summary.skipped,
        len(todo),
    )
    loader = torch.utils.data.DataLoader(
        _VideoDataset(todo, root, cfg),
        batch_size=None,
        num_workers=cfg.num_workers,
        worker_init_fn=_worker_init if cfg.num_workers else None,
        prefetch_factor=2 if cfg.num_workers else None,
    )
    bar = job.bar(len(rows), summary.skipped)
    bar.set_postfix(ok=0, skip=summary.skipped, fail=0)
    warned = False
    for item in loader:
        if "source" in item and not warned:
            warned = _warn_geometry(cfg, item["id"], item["source"])
        error = item.get("error") or _encode_one(vae, item, out)
        if error is None:
            summary.ok += 1
        else:
            summary.failed += 1
            summary.failures.append(item["id"])
            log.warning("skipping %s: %s", item["id"], error)
            record = {"id": item["id"], "video": item["video"], "error": error}
            record |= {"process": job.rank, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            append_failure(out / FAILURES, record)
        bar.update(1)
        bar.set_postfix(ok=summary.ok, skip=summary.skipped, fail=summary.failed)
    bar.close()
    log.info(
        "process %d: %d encoded, %d skipped (already done), %d failed%s",
        job.rank,
        summary.ok,
        summary.skipped,
        summary.failed,
        f" (see {out / FAILURES})" if summary.failed else "",
    )
    return summary


def _warn_geometry(cfg: LatentJobConfig, vid: str, source) -> bool:
    """Warn (once a job) when the geometry is far from a clip's own: frames repeated to fill
    ``num_frames`` or frames upscaled, which cost the full geometry per clip for nothing."""
    padded = cfg.num_frames - source.frames
    scale = max(cfg.height / source.height, cfg.width / source.width)
    if padded <= 0 and scale <= 1.5:
        return False
    log.warning(
        "%s: a clip of %d frames of %d×%d is encoded at %d frames of %d×%d (%d frames repeated, "
        "%.1f× upscaled): every clip costs the full geometry; set --num-frames / --height / "
        "--width near the videos' own (the toy world: 9 frames of 32×32)",
        vid,
        source.frames,
        source.height,
        source.width,
        cfg.num_frames,
        cfg.height,
        cfg.width,
        max(padded, 0),
        scale,
    )
    return True


def _encode_one(vae, item: dict, out: Path) -> str | None:
    """Encode one decoded video into ``out/<id>.safetensors``; the error, if it fails."""
    from dit_mem.data.vae import encode_frames

    try:
        z = encode_frames(vae, item["frames"][None])[0]
        write_latent(out / f"{item['id']}.safetensors", z, item["id"], item["video"])
    except (RuntimeError, ValueError, OSError) as e:  # e.g. out of memory on one video
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"{item['video']}: encoding failed ({type(e).__name__}: {e})"
    return None
