"""UMT5 embeddings of the training captions, computed once and cached in safetensors.

The paper's code re-encodes every caption at every step with the 5.7B-parameter UMT5-XXL; the
captions never change, so we encode each one once. Embeddings follow Wan's convention
(diffusers ``WanPipeline._get_t5_prompt_embeds``): the cleaned caption is tokenized to
``max_tokens`` (512) with padding and truncation, encoded with the attention mask, and the
positions after the caption's length are zero. The cache stores only the first ``length`` rows
of each embedding (the rest are zeros by definition) and :meth:`TextEmbeddingCache.load` pads
them back.

Layout::

    text/
      meta.json                 {"max_tokens": 512, "dim": 4096, "dtype": "bfloat16", "encoder": ...}
      shard-00000.safetensors   one tensor per video id: [length, dim]
      shard-00001.safetensors   ...

Every shard is written atomically, so an interrupted build resumes from the shards on disk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dit_mem.utils import get_logger, write_json_atomic, write_safetensors_atomic
from dit_mem.utils.io import TMP_PREFIX

log = get_logger(__name__)

META = "meta.json"
# Key of the caption-dropout text (not a video id: ids never contain "/").
DROPPED_CAPTION_KEY = "dit-mem/dropped-caption"


def clean_caption(text: str) -> str:
    """Wan's prompt cleaning (HTML unescape, ftfy if installed, whitespace collapse)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


@torch.no_grad()
def encode_captions(
    tokenizer, text_encoder, captions: Sequence[str], max_tokens: int = 512
) -> list[torch.Tensor]:
    """Wan-style UMT5 embeddings, each trimmed to its caption's length: ``[length_i, dim]``."""
    inputs = tokenizer(
        [clean_caption(c) for c in captions],
        padding="max_length",
        max_length=max_tokens,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = inputs.attention_mask
    lengths = mask.gt(0).sum(dim=1).tolist()
    hidden = text_encoder(inputs.input_ids.to(device), mask.to(device)).last_hidden_state
    return [h[:n].cpu().clone() for h, n in zip(hidden, lengths, strict=True)]


def pad_embeddings(embeds: Sequence[torch.Tensor], max_tokens: int) -> torch.Tensor:
    """Stack trimmed embeddings into ``[B, max_tokens, dim]`` with zeros after each length."""
    dim = embeds[0].shape[-1]
    out = embeds[0].new_zeros(len(embeds), max_tokens, dim)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e[:max_tokens]
    return out


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
                    self._where[key] = shard

    def __contains__(self, vid: str) -> bool:
        return vid in self._where

    def __len__(self) -> int:
        return len(self._where)

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [v for v in dict.fromkeys(ids) if v not in self._where]

    def check_meta(self, meta: dict) -> None:
        """Refuse to mix embeddings made with other settings into this cache."""
        if self.meta is None:
            return
        diff = {k: (self.meta.get(k), v) for k, v in meta.items() if self.meta.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: cache {a!r} vs run {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"text-embedding cache {self.root} was built with other settings ({details}); "
                "delete it or set data.cache_dir to another folder"
            )

    def load(self, ids: Sequence[str], max_tokens: int) -> torch.Tensor:
        """``[B, max_tokens, dim]`` for ``ids`` (zeros after each caption's length)."""
        from safetensors import safe_open

        embeds = []
        for vid in ids:
            shard = self._where.get(vid)
            if shard is None:
                raise KeyError(f"no cached text embedding for id {vid!r} in {self.root}")
            with safe_open(str(shard), framework="pt") as f:
                embeds.append(f.get_tensor(vid))
        return pad_embeddings(embeds, max_tokens)

    def build(
        self,
        ids: Sequence[str],
        captions: Sequence[str],
        tokenizer,
        text_encoder,
        max_tokens: int = 512,
        batch_size: int = 8,
        shard_size: int = 256,
        encoder_name: str = "",
        progress: bool = True,
    ) -> int:
        """Encode the captions of ids not yet cached; returns how many were encoded."""
        from tqdm.auto import tqdm

        if len(ids) != len(captions):
            raise ValueError(f"{len(ids)} ids but {len(captions)} captions")
        todo = [(v, c) for v, c in dict(zip(ids, captions, strict=True)).items() if v not in self]
        if not todo:
            return 0
        dtype = next(text_encoder.parameters()).dtype
        dim = int(getattr(text_encoder.config, "d_model", 0))
        meta = {
            "max_tokens": max_tokens,
            "dim": dim,
            "dtype": str(dtype).removeprefix("torch."),
            "encoder": encoder_name,
            "convention": "Wan: prompt_clean, pad to max_tokens, mask, zero after length",
        }
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
        bar = tqdm(total=len(todo), desc="text embeddings", unit="caption", disable=not progress)
        for start in range(0, len(todo), shard_size):
            chunk = todo[start : start + shard_size]
            tensors: dict[str, torch.Tensor] = {}
            for b in range(0, len(chunk), batch_size):
                part = chunk[b : b + batch_size]
                embeds = encode_captions(tokenizer, text_encoder, [c for _, c in part], max_tokens)
                tensors.update({v: e.contiguous() for (v, _), e in zip(part, embeds, strict=True)})
                bar.update(len(part))
            shard = self.root / f"shard-{next_shard:05d}.safetensors"
            write_safetensors_atomic(shard, tensors, metadata={"count": str(len(tensors))})
            self._where.update(dict.fromkeys(tensors, shard))
            next_shard += 1
        bar.close()
        log.info("cached %d caption embeddings in %s (%d total)", len(todo), self.root, len(self))
        return len(todo)
