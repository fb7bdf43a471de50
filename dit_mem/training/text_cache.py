"""Text embeddings of the training captions, computed once and cached in safetensors.

The paper's code re-encodes every caption at every step with the 5.7B-parameter UMT5-XXL; the
captions never change, so we encode each one once, the way the family's pipeline encodes a
prompt (:meth:`dit_mem.backbone.families.base.Training.encode_text`; Wan: cleaned caption padded
to ``max_tokens``, encoded with its mask). The cache keeps only each caption's valid rows of
each text stream; the family pads them back for the transformer (Wan: zeros to ``max_tokens``;
LTX-Video and HunyuanVideo-1.5: to the longest in the batch, with masks).

Layout::

    text/
      meta.json                 {"max_tokens": 512, "streams": [...], "encoder": ..., ...}
      shard-00000.safetensors   per id: the first stream as "<id>", others as "<id>::<stream>"
      shard-00001.safetensors   ...

Every shard is written atomically, so an interrupted build resumes from the shards on disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dit_mem.backbone.families.base import pad_rows
from dit_mem.errors import UserError
from dit_mem.utils import get_logger, write_json_atomic, write_safetensors_atomic
from dit_mem.utils.io import TMP_PREFIX, changed_settings, refuse_other_settings

log = get_logger(__name__)

META = "meta.json"
# Key of the caption-dropout text (not a video id: ids never contain "/").
DROPPED_CAPTION_KEY = "dit-mem/dropped-caption"
STREAM_SEPARATOR = "::"
Encode = Callable[[list[str]], list[dict[str, torch.Tensor]]]


class TextEmbeddingCache:
    """Read/write access to a folder of cached caption embeddings keyed by video id."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._where: dict[str, Path] = {}
        self.meta: dict | None = None
        if (self.root / META).is_file():
            self.meta = json.loads((self.root / META).read_text())
        self._scan()

    def _scan(self) -> None:
        from safetensors import safe_open

        self._where.clear()
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.glob("shard-*.safetensors")):
            if shard.name.startswith(TMP_PREFIX):
                continue
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if STREAM_SEPARATOR not in key:
                        self._where[key] = shard

    def __contains__(self, vid: str) -> bool:
        return vid in self._where

    def __len__(self) -> int:
        return len(self._where)

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [v for v in dict.fromkeys(ids) if v not in self._where]

    def check_meta(self, meta: dict) -> None:
        """Refuse to mix embeddings made with other settings into this cache."""
        if self.meta is not None:
            refuse_other_settings(
                f"text-embedding cache {self.root}",
                "embeddings",
                changed_settings(self.meta, meta, keys=meta),
                "delete it or set data.cache_dir to another folder",
            )

    @property
    def streams(self) -> list[str]:
        return list((self.meta or {}).get("streams", ["encoder_hidden_states"]))

    def load_texts(self, ids: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Each id's valid rows per stream, ``{stream: [n, D]}``."""
        from safetensors import safe_open

        out = []
        for vid in ids:
            shard = self._where.get(vid)
            if shard is None:
                raise KeyError(f"no cached text embedding for id {vid!r} in {self.root}")
            first, *others = self.streams
            with safe_open(str(shard), framework="pt") as f:
                text = {first: f.get_tensor(vid)}
                text.update({s: f.get_tensor(f"{vid}{STREAM_SEPARATOR}{s}") for s in others})
            out.append(text)
        return out

    def load(self, ids: Sequence[str], max_tokens: int) -> torch.Tensor:
        """The first stream of ``ids`` as ``[B, max_tokens, dim]``, zeros after each caption."""
        first = self.streams[0]
        return pad_rows([t[first] for t in self.load_texts(ids)], max_tokens)

    def build(
        self,
        ids: Sequence[str],
        captions: Sequence[str],
        encode: Encode,
        meta: dict,
        batch_size: int = 8,
        shard_size: int = 256,
        progress: bool = True,
    ) -> int:
        """Encode (``encode(captions)``: one ``{stream: [n, D]}`` per caption) the captions of
        ids not yet cached; ``meta`` (settings, with the ``streams``) must match the cache's.
        Returns how many were encoded."""
        from tqdm.auto import tqdm

        if len(ids) != len(captions):
            raise UserError(f"{len(ids)} ids but {len(captions)} captions")
        todo = [(v, c) for v, c in dict(zip(ids, captions, strict=True)).items() if v not in self]
        if not todo:
            return 0
        self.check_meta(meta)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.meta is None:
            write_json_atomic(self.root / META, meta)
            self.meta = meta
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        next_shard = 1 + max(
            (int(p.stem.split("-")[1]) for p in self.root.glob("shard-*.safetensors")), default=-1
        )
        first = self.streams[0]
        bar = tqdm(total=len(todo), desc="text embeddings", unit="caption", disable=not progress)
        for start in range(0, len(todo), shard_size):
            chunk = todo[start : start + shard_size]
            tensors: dict[str, torch.Tensor] = {}
            for b in range(0, len(chunk), batch_size):
                part = chunk[b : b + batch_size]
                for (vid, _), text in zip(part, encode([c for _, c in part]), strict=True):
                    for stream, value in text.items():
                        key = vid if stream == first else f"{vid}{STREAM_SEPARATOR}{stream}"
                        tensors[key] = value.contiguous()
                bar.update(len(part))
            shard = self.root / f"shard-{next_shard:05d}.safetensors"
            write_safetensors_atomic(shard, tensors, metadata={"count": str(len(chunk))})
            self._where.update(dict.fromkeys((v for v, _ in chunk), shard))
            next_shard += 1
        bar.close()
        log.info("cached %d caption embeddings in %s (%d total)", len(todo), self.root, len(self))
        return len(todo)
