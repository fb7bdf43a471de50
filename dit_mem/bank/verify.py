"""``dit-mem bank verify``: every file of a bank checked in full, what is damaged, the repair.

Opening a bank checks what each read needs cheaply (the index and id map by checksum, each
re-rank row, latent file and cached token row where it is read); ``verify_bank`` reads all of
it: ``bank.json`` and its history, an interrupted change, the index (every file against its
checksum, every re-rank row against its own), the id map, every latent (checksum, shape,
values), every cached token row, the videos link. ``--repair`` mends what can be mended from
what is intact: the index rebuilt from the id map (every row in its place, captions embedded
again), damaged latents and token shards removed (then encoded again by the bank's build
command, or on first use for a lazy bank); ``--base-model`` records the VAE fingerprint of a
bank an older dit-mem made.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dit_mem.bank.journal import BANK_MANIFEST, JOURNAL, STAGING, history, read_manifest
from dit_mem.errors import UserError
from dit_mem.utils import get_logger

log = get_logger(__name__)


@dataclass
class Report:
    bank: Path
    checked: list[str] = field(default_factory=list)  # what was read and found whole
    damaged: list[str] = field(default_factory=list)  # what is not, each with its repair
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def lines(self) -> list[str]:
        out = [f"bank {self.bank}: " + ("whole" if self.ok else f"{len(self.damaged)} damaged")]
        out += [f"  ok        {c}" for c in self.checked]
        out += [f"  note      {n}" for n in self.notes]
        out += [f"  repaired  {r}" for r in self.repaired]
        out += [f"  DAMAGED   {d}" for d in self.damaged]
        return out


def verify_bank(
    bank: str | Path,
    base_model: str | Path | None = None,
    repair: bool = False,
    trust_remote_code: str | None = None,
) -> Report:
    """Check every file of the bank folder ``bank`` (see the module docstring)."""
    bank = Path(bank)
    if not bank.is_dir():
        raise FileNotFoundError(f"{bank} is not a folder")
    report = Report(bank)
    _manifest(bank, report)
    index_ok = _index(bank, report)
    if repair and not index_ok and (bank / "index" / "ids.arrow").is_file():
        _reindex(bank, report, trust_remote_code)
    _latents(bank, report, repair)
    _tokens(bank, report, repair)
    _videos(bank, report)
    if base_model is not None:
        _record_vae(bank, base_model, report)
    return report


def _repair_line(bank: Path, what: str) -> str:
    return f"`dit-mem bank verify {bank} --repair` {what}"


def _manifest(bank: Path, report: Report) -> None:
    if (bank / JOURNAL).is_file():
        report.notes.append(
            f"a change was interrupted after its commit ({JOURNAL}): the next command that opens "
            f"the bank finishes it (e.g. `dit-mem bank info {bank}`)"
        )
    leftovers = sorted(p.name for p in bank.glob(f"{STAGING}*"))
    if leftovers:
        report.notes.append(
            f"{len(leftovers)} part(s) staged by an interrupted change that never committed "
            "(the bank is as before it; the next change removes them)"
        )
    try:
        meta = read_manifest(bank)
    except ValueError as e:
        report.damaged.append(
            f"{BANK_MANIFEST}: {e}; restore it from a copy (its history lives there)"
        )
        return
    if not meta:
        report.notes.append(f"no {BANK_MANIFEST} (parts made one by one without one)")
        return
    records = meta.get("history") or []
    txs = [r.get("tx") for r in records if r.get("tx")]
    if len(set(txs)) != len(txs):
        report.damaged.append(f"{BANK_MANIFEST}: a change appears twice in the history")
    report.checked.append(f"{BANK_MANIFEST}: {len(records)} change(s) in the history")


def _index(bank: Path, report: Report) -> bool:
    """Every index file against its checksum, every re-rank row against its own."""
    from dit_mem.data.table import file_sha256
    from dit_mem.retrieval.index import MANIFEST, RERANK_FILE

    folder = bank / "index"
    if not (folder / MANIFEST).is_file():
        report.damaged.append(f"index/{MANIFEST} is missing: the bank cannot retrieve")
        return False
    manifest = json.loads((folder / MANIFEST).read_text())
    sums = manifest.get("sha256") or {}
    ok = True
    for name, want in sums.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != want:
            ok = False
            repair = (
                _repair_line(bank, "rebuilds the index from the id map")
                if name != "ids.arrow"
                else "the id map is the bank's table: rebuild the bank from its CSV(s) "
                + ", ".join(sorted({r.get("csv") for r in history(bank) if r.get("csv")}))
            )
            report.damaged.append(f"index/{name} does not match its checksum: {repair}")
    rerank = manifest.get("rerank") or {}
    if ok and rerank.get("rowhash"):
        from dit_mem.retrieval.retriever import RowReader

        hashes = np.load(folder / rerank["rowhash"], allow_pickle=False)
        reader = RowReader(folder / RERANK_FILE)  # read unchecked, checked here in chunks
        bad = 0
        for start in range(0, len(reader), 65536):
            rows = np.arange(start, min(start + 65536, len(reader)))
            values = reader[rows]
            from dit_mem.utils.fingerprint import row_hashes

            bad += int((row_hashes(values, rows=rows) != hashes[rows]).sum())
        if bad:
            ok = False
            report.damaged.append(
                f"index/{RERANK_FILE}: {bad} of {len(reader)} rows do not match their checksums: "
                + _repair_line(bank, "rebuilds the index from the id map")
            )
    if ok:
        report.checked.append(f"index: {manifest.get('rows')} rows, {manifest.get('factory')}")
    return ok


def _reindex(bank: Path, report: Report, trust_remote_code: str | None) -> None:
    from dit_mem.bank.build import reindex_from_id_map

    m = reindex_from_id_map(bank, trust_remote_code=trust_remote_code)
    report.damaged = [d for d in report.damaged if not d.startswith("index/")]
    report.repaired.append(f"index rebuilt from the id map: {m['rows']} rows, {m['factory']}")


def _latents(bank: Path, report: Report, repair: bool) -> None:
    from dit_mem.data.latents import LatentStore

    if not (bank / "latents" / "manifest.json").is_file():
        return
    store = LatentStore(bank / "latents")
    broken = []
    for vid in store.ids():
        try:
            store.load_one(vid, dtype=None)
        except (ValueError, OSError) as e:
            broken.append((vid, str(e).split(";")[0]))
    if not broken:
        report.checked.append(f"latents: {len(store.ids())} files")
        return
    builds = [r for r in history(bank) if r.get("op") == "build"]
    rerun = "rerun the bank's build (`dit-mem bank build` with its --csv, --videos, --base-model)"
    if builds and builds[0].get("memory") == "lazy":
        rerun = "a lazy bank encodes them again on first use"
    if repair:
        for vid, _ in broken:
            store.path(vid).unlink(missing_ok=True)
        report.repaired.append(f"{len(broken)} damaged latent(s) removed: {rerun}")
        return
    for vid, why in broken[:20]:
        report.damaged.append(f"latents/{vid}.safetensors: {why}")
    report.damaged.append(
        f"{len(broken)} latent(s) damaged: " + _repair_line(bank, f"removes them; then {rerun}")
    )


def _tokens(bank: Path, report: Report, repair: bool) -> None:
    from dit_mem.data.token_cache import SHARD_GLOB, TokenCache

    folder = bank / "tokens"
    if not (folder / "manifest.json").is_file():
        return
    try:
        cache = TokenCache(folder)
    except (ValueError, OSError) as e:
        report.damaged.append(f"tokens: {e}")
        return
    broken = set()
    for vid in cache.ids():
        try:
            cache.load_one(vid)
        except (ValueError, OSError):
            broken.add(cache._find(vid)[0])
    if not broken:
        report.checked.append(
            f"tokens: {len(cache)} videos in {len(list(folder.glob(SHARD_GLOB)))} shards"
        )
        return
    if repair:
        from dit_mem.data.token_cache import rewrite_index

        for shard in broken:
            (folder / shard).unlink(missing_ok=True)
        rewrite_index(folder)
        report.repaired.append(
            f"{len(broken)} damaged token shard(s) removed: their videos' memory comes from their "
            "latents; `dit-mem cache-tokens --bank BANK --encoder ENCODER` caches them again"
        )
        return
    report.damaged.append(
        f"tokens: {len(broken)} shard(s) hold damaged rows ({', '.join(sorted(broken)[:3])}): "
        + _repair_line(bank, "removes them")
    )


def _videos(bank: Path, report: Report) -> None:
    link = bank / "videos"
    if os.path.lexists(link) and not link.exists():
        report.notes.append(
            f"videos/ points to {os.readlink(link)}, which is gone: previews come from latents, and "
            "a lazy bank cannot encode; rerun the build with --videos where the videos are now"
        )


def _record_vae(bank: Path, base_model, report: Report) -> None:
    """Record the VAE fingerprint (and family) an older dit-mem did not, after checking the VAE
    is of the recorded class and latent space."""
    from dit_mem.bank.journal import Change
    from dit_mem.data.latents import MANIFEST, vae_settings
    from dit_mem.models.base_model import load_vae
    from dit_mem.utils import write_json_atomic
    from dit_mem.utils.io import read_json_mapping

    path = bank / "latents" / MANIFEST
    if not path.is_file():
        report.notes.append("no latents/: nothing to record a VAE for")
        return
    m = read_json_mapping(path)
    have = vae_settings(load_vae(base_model), m["num_frames"], m["height"], m["width"])
    for key in ("vae_class", "latent_shape", "normalization", "latents_mean", "latents_std"):
        if m.get(key) is not None and m.get(key) != have.get(key):
            raise UserError(
                f"{base_model}'s VAE is not the one this bank's latents were made with ({key} "
                f"{m.get(key)!r} → {have.get(key)!r})"
            )
    if m.get("vae_fingerprint") is not None:
        report.notes.append("the VAE fingerprint is recorded already")
        return
    with Change(bank, "record-vae") as change:
        recorded = {**m, "family": have["family"], "vae_fingerprint": have["vae_fingerprint"]}
        write_json_atomic(change.stage_file(f"latents/{MANIFEST}"), recorded)
        change.commit({"base_model": str(base_model)})
    report.repaired.append(f"recorded the VAE of {base_model} ({have['family']})")
