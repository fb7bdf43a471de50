"""Training samples: target latent, retrieved memory latents and cached caption embedding.

Each sample is one training video: ``x0`` (its VAE latent ``[C, T, H, W]``), ``memory`` (the
latents of its k retrieved videos ``[k, C, T, H, W]``) and ``text`` (its UMT5 embedding
``{stream: [valid tokens, dim]}``, padded by the family when a batch is made). Rows whose latent
or memory latents are missing, or with fewer than k retrieved videos, are dropped with a count
when the dataset is built; a dataset with nothing left is an error saying which fix applies.

Order: every epoch is one permutation drawn from ``seed + epoch``; process ``i`` of ``n`` takes
positions ``i, i + n, …`` and the epoch is cut so every process gets the same number of whole
micro-batches and whole optimizer steps. The order is a pure function of (seed, epoch, rank),
so a resumed run skips exactly the micro-batches it had already done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dit_mem.errors import UserError
from dit_mem.utils import get_logger

log = get_logger(__name__)


@dataclass
class SkipCounts:
    """Rows dropped while building the dataset, by reason."""

    missing_latent: list[str] = field(default_factory=list)
    missing_memory: list[str] = field(default_factory=list)
    no_retrieval: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.missing_latent) + len(self.missing_memory) + len(self.no_retrieval)


class TrainingSamples(torch.utils.data.Dataset):
    """Latents + memory latents + text embedding per training video."""

    def __init__(
        self,
        ids: list[str],
        memory: dict[str, list[str]],
        latents,  # dit_mem.data.LatentStore of the training videos
        memory_latents,  # dit_mem.data.LatentStore of the memory bank's videos
        text,  # TextEmbeddingCache
        k: int,
        channels: int,
    ):
        self.latents, self.memory_latents, self.text = latents, memory_latents, text
        self.k, self.channels = k, channels
        self.skipped = SkipCounts()
        self.ids: list[str] = []
        self.memory: dict[str, list[str]] = {}
        for vid in ids:
            mids = memory.get(vid, [])[:k]
            if len(mids) < k:
                self.skipped.no_retrieval.append(vid)
            elif vid not in latents:
                self.skipped.missing_latent.append(vid)
            elif any(m not in memory_latents for m in mids):
                self.skipped.missing_memory.append(vid)
            else:
                self.ids.append(vid)
                self.memory[vid] = mids
        s = self.skipped
        if s.total:
            log.warning(
                "skipping %d of %d training rows: %d without a latent, %d with a missing memory "
                "latent, %d with fewer than k=%d retrieved videos (first: %s)",
                s.total,
                len(ids),
                len(s.missing_latent),
                len(s.missing_memory),
                len(s.no_retrieval),
                k,
                (s.missing_latent + s.missing_memory + s.no_retrieval)[:3],
            )
        if not self.ids:
            raise UserError(self._nothing_left(ids, memory))
        # Every latent must have its folder's shape (the manifest says it); else the first seen.
        self._shape: dict[int, tuple[int, ...] | None] = {}
        for store in (latents, memory_latents):
            shape = getattr(store, "manifest", {}).get("latent_shape")
            self._shape[id(store)] = tuple(shape) if shape else None

    def _nothing_left(self, ids: list[str], memory: dict[str, list[str]]) -> str:
        """Why no row is usable, with the fix for each reason that occurred."""
        s, k = self.skipped, self.k
        reasons = []
        if s.no_retrieval:
            most = max((len(memory.get(v, [])) for v in ids), default=0)
            reasons.append(
                f"{len(s.no_retrieval)} with fewer than k={k} retrieved videos (at most {most}: "
                f"set data.k ≤ {most}, or give the index more videos)"
                if most
                else f"{len(s.no_retrieval)} with no retrieved videos (is the index empty, or "
                "does every neighbour fall under the leave-out rule?)"
            )
        if s.missing_latent:
            reasons.append(
                f"{len(s.missing_latent)} without their own latent in {self.latents.root} "
                "(encode them with `dit-mem bank build --for-training TRAIN_CSV`, or "
                "`dit-mem encode-latents`)"
            )
        if s.missing_memory:
            reasons.append(
                f"{len(s.missing_memory)} with a retrieved video that has no latent in "
                f"{self.memory_latents.root} (encode what training reads with `dit-mem bank build "
                "--for-training TRAIN_CSV`, or every bank video with `dit-mem encode-latents`)"
            )
        return f"no usable training rows of {len(ids)}: " + "; ".join(reasons)

    def __len__(self) -> int:
        return len(self.ids)

    def _check(self, x: torch.Tensor, vid: str, role: str, store) -> None:
        if x.ndim != 4 or x.shape[0] != self.channels:
            raise UserError(
                f"{role} latent {vid!r} has shape {tuple(x.shape)}; expected [C={self.channels}, "
                f"T, H, W] ({store.path(vid)})"
            )
        expected = self._shape.get(id(store))
        if expected is None:
            self._shape[id(store)] = tuple(x.shape)
        elif tuple(x.shape) != expected:
            raise UserError(
                f"{role} latent {vid!r} has shape {tuple(x.shape)}, but the latents in "
                f"{store.root} have shape {expected} ({store.path(vid)})"
            )

    def __getitem__(self, i: int) -> dict:
        vid = self.ids[i]
        x0 = self.latents.load_one(vid, dtype=None)
        self._check(x0, vid, "training", self.latents)
        mem = []
        for mid in self.memory[vid]:
            m = self.memory_latents.load_one(mid, dtype=None)
            self._check(m, mid, f"memory (retrieved for {vid!r})", self.memory_latents)
            mem.append(m)
        text = self.text.load_texts([vid])[0]
        return {"id": vid, "x0": x0, "memory": torch.stack(mem), "text": text}


def collate(items: list[dict]) -> dict:
    """Stack samples: ``x0 [B, C, T, H, W]``, ``memory [B, k, C, T, H, W]``; ``text``: the
    samples' text streams (the frozen DiT's family pads them)."""
    shapes = {tuple(it["x0"].shape) for it in items}
    if len(shapes) > 1:
        raise UserError(
            f"training latents in one batch have different shapes {sorted(shapes)}; "
            "use batch_size=1 or latents of one size"
        )
    return {
        "ids": [it["id"] for it in items],
        "x0": torch.stack([it["x0"] for it in items]),
        "memory": torch.stack([it["memory"] for it in items]),
        "text": [it["text"] for it in items],
    }


@dataclass(frozen=True)
class EpochPlan:
    """How one epoch splits into processes, micro-batches and optimizer steps."""

    num_samples: int
    num_processes: int
    batch_size: int
    accumulation: int

    @property
    def micro_batches(self) -> int:
        """Micro-batches per process per epoch (whole optimizer steps only)."""
        per_process = self.num_samples // self.num_processes
        return (per_process // self.batch_size) // self.accumulation * self.accumulation

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return self.micro_batches // self.accumulation

    def check(self) -> None:
        if self.steps == 0:
            raise UserError(
                f"{self.num_samples} usable training samples are too few for one optimizer step "
                f"({self.num_processes} processes × batch {self.batch_size} × "
                f"{self.accumulation} accumulation steps)"
            )

    def batches(self, seed: int, epoch: int, process_index: int) -> list[list[int]]:
        """This process's micro-batches (dataset indices) for ``epoch``."""
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        mine = order[process_index :: self.num_processes]
        n = self.micro_batches * self.batch_size
        return [mine[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
