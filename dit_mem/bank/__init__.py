"""``MemoryBank``: a memory bank as one folder (or Hub repository), retrieval and memory tokens.

    bank = MemoryBank.from_pretrained("memory_bank/")          # or a Hub id, subfolder, revision
    hits = bank.retrieve(["a dog runs on the beach"], k=5)     # ids, captions, scores per prompt
    memory, hits = bank.memory(["a dog runs on the beach"], encoder, k=5)   # MemoryTokens [1, G, D]

Layout of a bank folder (``dit-mem bank build`` writes one from a video table, eagerly, lazily or
for training; ``build-index / encode-latents / cache-tokens --bank DIR`` build its parts;
``dit-mem bank export`` makes a token-only copy to share, ``push_to_hub`` uploads one;
``dit-mem bank import-release`` converts the release's files; every change of the folder is
all or nothing, and recorded: :mod:`dit_mem.bank.journal`)::

    bank.json      format, the parts present, counts, the history of its changes
    index/         caption index: index.faiss + id map (ids.arrow, lookups) + manifest.json
    latents/       <id>.safetensors VAE latents + manifest.json (encode-latents)
    tokens/        token cache of one memory encoder (cache-tokens), optional
    videos/        the videos (or a link to their folder): previews, and a lazy bank's source

A bank needs an index and latents or tokens. Memory comes from the token cache when it was made
by the given encoder (same weights and config, checked by fingerprint); a cache of another
encoder is refused: the latents are used instead, or, without latents, it is an error.
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_mem.bank.journal import BANK_MANIFEST, PARTS, read_manifest, wait_for_changes
from dit_mem.data.latents import LatentStore
from dit_mem.data.token_cache import TokenCache
from dit_mem.data.video import VideoDecodeError
from dit_mem.errors import UserError
from dit_mem.memory.tokens import MemoryTokens, VideoTokens
from dit_mem.retrieval.retriever import Exclusion, RetrievalResult, Retriever
from dit_mem.utils import atomic_dir, get_logger
from dit_mem.utils.device import execution_device

log = get_logger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


class NoMemory(Exception):
    """Retrieved videos turned out to have no memory (undecodable on first use)."""

    def __init__(self, ids: list[str]):
        super().__init__(f"no memory for {ids}")
        self.ids = ids


class MemoryBank:
    """A caption index plus the memory of its videos (latents and/or a token cache).

    Build one from a folder or Hub id with :meth:`from_pretrained`, or from its parts (paths or
    loaded objects): ``MemoryBank(index="memory_index", latents="latent", tokens=None)``.
    ``embedding_model`` / ``trust_remote_code`` go to the :class:`~dit_mem.retrieval.Retriever`
    (the model the index was built with; remote code only when asked for by name), and so do
    ``nprobe`` / ``ef_search`` / ``k_factor``: search settings of an approximate index (default:
    those recorded when it was built).
    """

    def __init__(
        self,
        index: str | Path | Retriever,
        latents: str | Path | LatentStore | None = None,
        tokens: str | Path | TokenCache | None = None,
        videos: str | Path | None = None,
        *,
        embedding_model: Any = None,
        trust_remote_code: str | None = None,
        device: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
    ):
        search = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor}
        if not isinstance(index, Retriever):
            index = Retriever(
                index, embedding_model, device=device, **search, trust_remote_code=trust_remote_code
            )
        self.retriever = index
        self.latents = LatentStore(latents) if isinstance(latents, str | Path) else latents
        self.tokens = TokenCache(tokens) if isinstance(tokens, str | Path) else tokens
        self.videos = Path(videos) if videos is not None else None
        if self.latents is None and self.tokens is None:
            raise UserError(
                f"memory bank {self.retriever.root}: needs latents or a token cache besides the "
                "index (dit-mem encode-latents / cache-tokens)"
            )
        if self.latents is not None:  # videos whose encoding failed have no memory: never retrieved
            failed = self.latents.failed_ids()
            if self.tokens is not None and failed:
                failed = {v for v in failed if v not in self.tokens}
            self.retriever.leave_out(failed)
        elif len(self.tokens) < len(self.retriever):  # a token-only bank: what it has tokens of
            self.retriever.leave_out(v for v in self.retriever.ids if v not in self.tokens)
        # encoder → whether the token cache was made by it (fingerprints are costly: once each)
        self._checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._vae_prints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE → print
        self._vae_copy: tuple[Any, Any] | None = None  # (the given VAE, a copy in the bank's dtype)
        # how to open this bank again (a pipeline's save_pretrained records it)
        model = self.retriever._model
        self.source: dict[str, Any] = {
            "parts": {name: str(Path(path).resolve()) for name, path in self.parts.items()},
            "embedding_model": str(Path(model).resolve())
            if isinstance(model, str | Path)
            else None,
        }

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        repo_type: str = "dataset",
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        embedding_model: Any = None,
        trust_remote_code: str | None = None,
        device: str | None = None,
        **search: int | None,
    ) -> MemoryBank:
        """Open a bank folder, or a Hub repository holding one (``repo_type`` "dataset" by default);
        ``search``: ``nprobe`` / ``ef_search`` / ``k_factor`` (see the class)."""
        from dit_mem.utils.hub import resolve_folder

        folder = resolve_folder(
            path_or_repo_id,
            subfolder=subfolder,
            revision=revision,
            repo_type=repo_type,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        if local_files_only is not True and Path(path_or_repo_id).exists():
            wait_for_changes(folder)  # a change being committed, or one a killed run left
        parts = {name: folder / name for name in PARTS if (folder / name).is_dir()}
        if "index" not in parts:
            raise FileNotFoundError(
                f"{folder} is not a memory bank folder: no index/ (expected {BANK_MANIFEST}, "
                "index/, latents/ and/or tokens/, videos/)"
            )
        read_manifest(folder)  # a damaged or foreign bank.json is an error here
        bank = cls(
            parts["index"],
            parts.get("latents"),
            parts.get("tokens"),
            parts.get("videos"),
            embedding_model=embedding_model,
            trust_remote_code=trust_remote_code,
            device=device,
            **search,
        )
        local = Path(path_or_repo_id).exists()
        bank.source["from_pretrained"] = {
            "path_or_repo_id": str(Path(path_or_repo_id).resolve()) if local else path_or_repo_id,
            "subfolder": subfolder,
            "revision": revision,
            "repo_type": repo_type,
        }
        return bank

    @classmethod
    def from_source(cls, source: dict[str, Any], **options: Any) -> MemoryBank:
        """Open a bank again from its :attr:`source` record (``options``: Hub and retrieval
        options of :meth:`from_pretrained`)."""
        options = {"embedding_model": source.get("embedding_model"), **options}
        if source.get("from_pretrained"):
            return cls.from_pretrained(**source["from_pretrained"], **options)
        parts = dict(source.get("parts") or {})
        if "index" not in parts:
            raise UserError(f"not a memory bank record: {source!r}")
        options.pop("local_files_only", None), options.pop("cache_dir", None)
        options.pop("token", None)
        return cls(parts.pop("index"), **parts, **options)

    @property
    def parts(self) -> dict[str, Path]:
        """The folder of every part this bank has."""
        out = {"index": self.retriever.root}
        if self.latents is not None:
            out["latents"] = self.latents.root
        if self.tokens is not None:
            out["tokens"] = self.tokens.root
        if self.videos is not None:
            out["videos"] = self.videos
        return out

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write this bank as one folder (parts hard-linked where the file system allows, else
        copied), in place whole or not at all."""
        folder = Path(folder)
        from dit_mem.bank.journal import describe, now
        from dit_mem.utils import write_json_atomic

        with atomic_dir(folder) as tmp:
            for name, src in self.parts.items():
                shutil.copytree(src, tmp / name, copy_function=_link_or_copy)
            record = {"op": "save", "source": self.source["parts"], "when": now()}
            write_json_atomic(tmp / BANK_MANIFEST, describe(tmp, [record]))
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload memory bank",
        create_pr: bool = False,
        include_videos: bool = False,
    ):
        """Upload this bank as a Hub dataset repository (``huggingface_hub.upload_folder``); the
        return value is the commit's. Share a token-only bank (``dit-mem bank export``): latents
        are hundreds of times bigger. Lock and temporary files stay behind, and so do the
        videos unless ``include_videos`` (their licence is not the bank owner's to give)."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            folder = self.folder
            if folder is None:  # parts from several places: one folder of links first
                folder = self.save_pretrained(Path(scratch) / "bank")
            return api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=str(folder),
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
                ignore_patterns=[".lock", "**/.lock", ".tmp-*", "**/.tmp-*", ".journal.json"]
                + [".building-*", ".building-*/**"]
                + ([] if include_videos else ["videos/*", "videos/**"]),
            )

    @property
    def folder(self) -> Path | None:
        """The bank folder holding every part (``None`` when the parts live apart)."""
        parents = {Path(path).absolute().parent for path in self.parts.values()}
        folder = parents.pop() if len(parents) == 1 else None
        return folder if folder is not None and (folder / BANK_MANIFEST).is_file() else None

    # ------------------------------------------------------------------ whose memory
    @property
    def latent_record(self) -> dict[str, Any]:
        """Whose latents the bank's memory comes from: ``family``, ``vae_class`` and
        ``vae_fingerprint`` (``None`` where a bank of an older dit-mem does not record them)."""
        if self.latents is not None:
            m = self.latents.manifest
        else:
            m = self.tokens.manifest.get("latents") or {}
        return {k: m.get(k) for k in ("family", "vae_class", "vae_fingerprint")}

    def check_serves(self, family: str, vae=None) -> None:
        """``ValueError`` naming both unless the bank's memory was made with ``family``'s latents
        (and, given ``vae``, by that very VAE): memory of another family's latents is noise."""
        from dit_mem.data.latents import check_record
        from dit_mem.utils.fingerprint import vae_fingerprint

        record, where = self.latent_record, self.retriever.root.parent
        fingerprint = None
        if vae is not None and record["vae_fingerprint"] is not None:
            if vae not in self._vae_prints:
                self._vae_prints[vae] = vae_fingerprint(vae)
            fingerprint = self._vae_prints[vae]
        check_record(record, where, family, fingerprint)

    # ------------------------------------------------------------------ retrieval
    def __len__(self) -> int:
        return len(self.retriever)

    @property
    def ids(self) -> list[str]:
        return self.retriever.ids

    @property
    def captions(self) -> list[str]:
        return self.retriever.captions

    def retrieve(
        self,
        prompts: Sequence[str],
        k: int = 5,
        exclude: Sequence[Exclusion] | None = None,
    ) -> list[RetrievalResult]:
        """Top-``k`` bank videos for each prompt (``exclude``: per prompt, ids to leave out)."""
        return self.retriever.retrieve(prompts, k=k, exclude=exclude)

    def memory(
        self,
        prompts: Sequence[str],
        encoder,
        k: int = 5,
        exclude: Sequence[Exclusion] | None = None,
        device: torch.device | str | None = None,
        vae=None,
    ) -> tuple[MemoryTokens, list[RetrievalResult]]:
        """Retrieve for ``prompts`` and encode: ``MemoryTokens [len(prompts), G, D]`` and the hits.

        Every prompt needs ``k`` hits (``ValueError`` otherwise: memory is never silently short).
        ``device``: where the encoder runs (default: its execution device, see :meth:`encode`);
        ``vae``: encodes retrieved videos that have no memory yet (a lazy bank, :meth:`encode`).
        """
        while True:  # a video found undecodable on first use is left out: k from the next hits
            hits = self.retrieve(prompts, k=k, exclude=exclude)
            for prompt, hit in zip(prompts, hits, strict=True):
                if len(hit) < k:
                    raise UserError(
                        f"retrieval found {len(hit)} of k={k} memory videos for prompt {prompt!r} "
                        f"(the bank has {len(self)} videos, {len(self.retriever.unavailable)} of "
                        "them without memory)"
                    )
            try:
                return self.encode([hit.ids for hit in hits], encoder, device=device, vae=vae), hits
            except NoMemory as e:
                self.retriever.leave_out(e.ids)

    @torch.no_grad()
    def encode(
        self,
        ids: Sequence[Sequence[str]],
        encoder,
        device: torch.device | str | None = None,
        vae=None,
    ) -> MemoryTokens:
        """Memory tokens ``[len(ids), G, D]`` of the bank videos ``ids`` (one list per prompt).

        Per video: its cached tokens (a token cache of this very encoder), else its latent, else
        (a bank built with ``--lazy``) its video file, decoded at the bank's geometry and encoded
        with ``vae``; the latent is written into the bank and reused from then on. The result
        equals an eagerly built bank's. A video with no memory and no file is an error naming it.

        The inputs go to ``device``; by default the encoder's execution device: where accelerate's
        offload hooks run it (its weights may live on ``meta`` or the CPU meanwhile), else where
        its weights are.
        """
        param = next(encoder.parameters())
        device = execution_device(encoder) if device is None else torch.device(device)
        ids = [list(group) for group in ids]
        unique = list(dict.fromkeys(v for group in ids for v in group))
        cached = self.tokens is not None and self._cache_matches(encoder)
        in_cache = [v for v in unique if v in self.tokens] if cached else []
        fresh = [v for v in unique if v not in set(in_cache)]
        self._fill(fresh, vae)
        # one route: each distinct video once, its cached tokens or its latent through the
        # encoder's per-video branches (one batch), then the shared attention per prompt
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for vid in in_cache:
            rows[vid] = tuple(t.to(device, param.dtype) for t in self.tokens.load_one(vid))
        if fresh:
            encoded = encoder.encode_videos(self.latents.load(fresh, dtype=param.dtype).to(device))
            rows |= {v: (encoded.high[0, n], encoded.low[0, n]) for n, v in enumerate(fresh)}
        log_counts = (encoded if fresh else self.tokens).log_counts.to(device)
        high, low = (
            torch.stack([torch.stack([rows[v][part] for v in group]) for group in ids])
            for part in (0, 1)
        )
        return encoder.aggregate(VideoTokens(high, low, log_counts), shuffle=False)

    def _fill(self, ids: Sequence[str], vae) -> None:
        """Encode the videos of ``ids`` that have no latent yet into the bank's latents."""
        todo = [v for v in dict.fromkeys(ids) if self.latents is None or v not in self.latents]
        if not todo:
            return
        if self.latents is None:
            raise UserError(
                f"memory bank {self.retriever.root.parent}: {len(todo)} retrieved video(s) have "
                f"no memory ({', '.join(todo[:3])}): not in its token cache, and it has no latents"
            )
        paths = {}
        for vid in todo:
            path = self.video_path(vid)
            if path is None:
                where = self.videos if self.videos is not None else "(the bank has no videos/)"
                row = self.retriever.row_of(vid) or {}
                raise FileNotFoundError(
                    f"bank video {vid!r} has no memory yet and its file "
                    f"{row.get('video') or vid + '.*'} is not in {where}: give the bank its "
                    "videos again (dit-mem bank build --add / a videos/ folder), or encode it "
                    "elsewhere (dit-mem encode-latents --bank)"
                )
            paths[vid] = path
        if vae is None:
            raise UserError(
                f"{len(todo)} retrieved bank video(s) have no memory yet ({', '.join(todo[:3])}): "
                "a lazy bank encodes them on first use with the VAE of its base model: "
                "bank.memory(..., vae=pipe.vae) (a DiTMemPipeline passes its own)"
            )
        self.latents.check_vae(vae)
        vae = self._vae_in_bank_dtype(vae)
        log.info("encoding %d bank video(s) on first use into %s", len(todo), self.latents.root)
        failed = []
        for vid, path in paths.items():
            try:
                self.latents.fill(vid, path, vae)
            except VideoDecodeError as e:  # recorded as without memory, as an eager build does
                self.latents.record_failure(vid, path, str(e))
                failed.append(vid)
        if failed:
            log.warning(
                "%d bank video(s) cannot be decoded (%s): recorded as without memory in %s; "
                "retrieval leaves them out",
                len(failed),
                ", ".join(failed[:3]),
                self.latents.root / "failures.jsonl",
            )
            raise NoMemory(failed)

    def _vae_in_bank_dtype(self, vae):
        """``vae``, or a copy in the dtype the bank's latents were encoded in (same latents)."""
        want = getattr(torch, str(self.latents.manifest.get("vae_dtype", "float32")), None)
        have = next(vae.parameters()).dtype
        if not isinstance(want, torch.dtype) or want == have:
            return vae
        if self._vae_copy is None or self._vae_copy[0] is not vae:
            if any(p.is_meta for p in vae.parameters()):
                raise UserError(
                    f"the bank's latents were encoded by a {want} VAE; the given VAE is {have} "
                    "and offloaded (weights on meta): give the VAE in "
                    f"{str(want).removeprefix('torch.')}"
                )
            import copy

            self._vae_copy = (vae, copy.deepcopy(vae).to(want))
        return self._vae_copy[1]

    def _cache_matches(self, encoder) -> bool:
        if encoder not in self._checked:
            try:
                self.tokens.check_encoder(encoder)
                self._checked[encoder] = True
            except UserError as e:
                if self.latents is None:
                    raise UserError(self._token_only_advice()) from None
                log.warning("%s; encoding the bank's latents instead", e)
                self._checked[encoder] = False
        return self._checked[encoder]

    def _token_only_advice(self) -> str:
        """Why a token-only bank cannot serve another encoder, and what to do instead."""
        from dit_mem.bank.journal import history

        source = next(
            (r.get("source") for r in history(self.tokens.root.parent) if r.get("op") == "export"),
            None,
        )
        made_by = self.tokens.manifest.get("encoder_fingerprint", "?")[:12]
        fix = (
            f"export it again from its bank with your encoder: `dit-mem bank export --bank "
            f"{source} --encoder YOUR_ENCODER --out NEW_FOLDER`"
            if source
            else "export it again, from the bank it came from, with your encoder (`dit-mem bank "
            "export --bank SOURCE --encoder YOUR_ENCODER --out NEW_FOLDER`)"
        )
        return (
            f"{self.tokens.root.parent} is a token-only bank of the memory encoder {made_by}…: its "
            f"tokens serve that encoder alone (it has no latents to encode for another); use that "
            f"encoder, or {fix}"
        )

    # ------------------------------------------------------------------ previews
    def video_path(self, vid: str) -> Path | None:
        """The bank's video file of ``vid`` (``None`` without a videos/ part or a match)."""
        if self.videos is None:
            return None
        row = self.retriever.row_of(vid)
        if row is not None and row.get("video"):
            candidate = (self.videos / str(row["video"])).resolve()
            if candidate.is_file() and candidate.is_relative_to(self.videos.resolve()):
                return candidate
        for suffix in VIDEO_SUFFIXES:
            candidate = self.videos / f"{vid}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def previews(
        self,
        ids: Sequence[str],
        num_frames: int = 8,
        size: tuple[int, int] = (120, 208),
        vae=None,
        required: bool = True,
    ) -> list[np.ndarray | None]:
        """Frames (uint8 ``[F, H, W, 3]``) of bank videos: from their files (resized to ``size``),
        else decoded from their latents with ``vae``. When neither is available (a token-only
        bank): ``ValueError``, or ``None`` for that video unless ``required``."""
        from dit_mem.data.vae import decode_latents
        from dit_mem.data.video import load_video

        out = []
        for vid in ids:
            path = self.video_path(vid)
            if path is not None:
                clip = load_video(path, num_frames, *size)
                out.append(((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy())
                continue
            if vae is None or self.latents is None or vid not in self.latents:
                if not required:
                    out.append(None)
                    continue
                raise UserError(
                    f"no preview of {vid!r}: the bank has no video file for it, and no VAE "
                    "and latents to decode one"
                )
            dtype = next(vae.parameters()).dtype
            video = decode_latents(vae, self.latents.load([vid], dtype=dtype)[0])
            frames = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().cpu().numpy()
            picks = np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round()
            out.append(frames[picks.astype(int)])
        return out


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
