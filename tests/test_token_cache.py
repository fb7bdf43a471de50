"""Token cache: cached VideoTokens give the same memory tokens as encoding the latents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dit_mem.cli import main
from dit_mem.data import LatentStore, TokenCache, build_token_cache
from dit_mem.memory import MemoryEncoder
from dit_mem.utils import write_json_atomic, write_safetensors_atomic

TINY = dict(conv_channels=(8, 16), kernel_sizes=(3, 3), strides=(1, 1), dim=32, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_latents(root: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> list[str]:
    """A LatentStore folder of random bf16 latents (same layout as encode-latents writes)."""
    g = torch.Generator().manual_seed(seed)
    ids = [f"src{i // 2:03d}_{i % 2}_0to10" for i in range(n)]
    for vid in ids:
        write_safetensors_atomic(
            root / f"{vid}.safetensors",
            {"latent": torch.randn(*shape, generator=g).to(torch.bfloat16)},
        )
    write_json_atomic(root / "manifest.json", {"latent_shape": list(shape), "normalized": True})
    return ids


def encoder(latent_shape, seed: int = 0) -> MemoryEncoder:
    torch.manual_seed(seed)
    enc = MemoryEncoder.from_preset("wan2.1-1.3b", latent_shape=latent_shape, **TINY).eval()
    for m in enc.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return enc


@pytest.mark.parametrize("latent_shape", [(5, 8, 8), (12, 8, 8)])  # G = 1 and G > 1
def test_cache_equals_latents(tmp_path: Path, latent_shape) -> None:
    ids = make_latents(tmp_path / "latent", 7, (16, *latent_shape))
    enc = encoder(latent_shape)
    s = build_token_cache(
        enc, tmp_path / "latent", tmp_path / "tokens", batch_size=3, shard_size=4, num_workers=0
    )
    assert (s.encoded, s.skipped, s.total) == (7, 0, 7)
    cache = TokenCache(tmp_path / "tokens", encoder=enc)
    assert (
        len(cache) == 7 and len(list((tmp_path / "tokens").glob("tokens-r00-*.safetensors"))) == 2
    )
    pick = [ids[5], ids[0], ids[3]]
    videos = cache.load(pick)
    with torch.no_grad():
        direct = enc.encode_videos(LatentStore(tmp_path / "latent").load(pick))
        assert videos.high.shape == direct.high.shape and torch.equal(
            videos.log_counts, direct.log_counts
        )
        if latent_shape[0] > 5:
            assert videos.high.shape[2] > 1  # several distinct tokens per video
        from_cache = enc.aggregate(videos, shuffle=False)
        from_latents = enc(LatentStore(tmp_path / "latent").load(pick), shuffle=False)
    torch.testing.assert_close(from_cache.tokens, from_latents.tokens, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(from_cache.dense(), from_latents.dense(), rtol=2e-2, atol=2e-2)
    # Only bf16 rounding separates them: the un-rounded tokens agree exactly.
    torch.testing.assert_close(videos.high, direct.high.to(torch.bfloat16).float(), rtol=0, atol=0)
    batch = cache.load_batch([pick, pick[::-1]])
    assert batch.high.shape[:2] == (2, 3)


def test_resume_and_encoder_mismatch(tmp_path: Path, capsys) -> None:
    ids = make_latents(tmp_path / "latent", 6, (16, 5, 8, 8))
    enc = encoder((5, 8, 8))
    s1 = build_token_cache(
        enc, tmp_path / "latent", tmp_path / "tokens", ids=ids[:4], shard_size=3, num_workers=0
    )
    assert s1.encoded == 4
    s2 = build_token_cache(
        enc, tmp_path / "latent", tmp_path / "tokens", shard_size=3, num_workers=0
    )
    assert (s2.encoded, s2.skipped) == (2, 4)
    cache = TokenCache(tmp_path / "tokens")
    assert cache.ids() == sorted(ids)
    m = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert m["count"] == 6 and m["num_groups"] == 1 and m["dim"] == 32
    other = encoder((5, 8, 8), seed=1)
    with pytest.raises(ValueError, match="built with another memory encoder"):
        TokenCache(tmp_path / "tokens", encoder=other)
    with pytest.raises(ValueError, match="caches tokens of another memory encoder"):
        build_token_cache(other, tmp_path / "latent", tmp_path / "tokens", num_workers=0)
    with pytest.raises(FileNotFoundError, match="no cached tokens for id 'nope'"):
        cache.load(["nope"])
    with pytest.raises(FileNotFoundError, match="not a complete token cache"):
        TokenCache(tmp_path / "latent")
    # The command line: a save_pretrained folder in, the same cache out.
    enc.save_pretrained(tmp_path / "enc")
    rc = main(
        [
            "cache-tokens",
            "--encoder",
            str(tmp_path / "enc"),
            "--latents",
            str(tmp_path / "latent"),
            "--out",
            str(tmp_path / "tokens2"),
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0 and "this process cached 6 videos" in capsys.readouterr().out
    a, b = TokenCache(tmp_path / "tokens").load(ids), TokenCache(tmp_path / "tokens2").load(ids)
    assert torch.equal(a.high, b.high) and torch.equal(a.low, b.low)
