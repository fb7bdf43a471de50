"""The memory encoder computes the paper's function (SPEC §3), compactly and deterministically."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dit_mem.memory import (
    MemoryEncoder,
    MemoryTokens,
    cnn_output_shape,
    feature_dim,
    frequency_gains,
    get_preset,
    pooling_groups,
)


def small(**kw) -> MemoryEncoder:
    """A narrow encoder with the paper's conv geometry (kernels 7/3, stride 4)."""
    cfg = dict(conv_channels=(8, 12), dim=32, num_heads=2, latent_shape=(21, 60, 104))
    cfg.update(kw)
    return MemoryEncoder.from_preset("wan2.1-1.3b", **cfg)


def dense_reference(enc: MemoryEncoder, latents: torch.Tensor) -> torch.Tensor:
    """The paper's dense computation, written independently of the compact path.

    Per branch: CNN features [B·N, T', F] → adaptive_avg_pool1d to L tokens → Linear →
    [B, N·L, D] → multi-head attention over all N·L tokens (RMSNorm q/k) → o. Then [high; low].
    """
    b, n = latents.shape[:2]
    L, d, h = enc.config.tokens_per_video, enc.config.dim, enc.config.num_heads
    attn = enc.attention

    def rms(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    outs = []
    for branch in (enc.high_pass, enc.low_pass):
        feats = branch.features(latents.flatten(0, 1))  # [B·N, T', F]
        tokens = F.adaptive_avg_pool1d(feats.transpose(1, 2), L).transpose(1, 2)
        x = branch.proj(tokens).reshape(b, n * L, d)
        q = rms(attn.q(x), attn.norm_q.weight, attn.norm_q.eps)
        k = rms(attn.k(x), attn.norm_k.weight, attn.norm_k.eps)
        v = attn.v(x)
        q, k, v = (t.view(b, n * L, h, d // h).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        outs.append(attn.o((w @ v).transpose(1, 2).reshape(b, n * L, d)))
    return torch.cat(outs, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------- geometry
def test_paper_preset_geometry_and_parameter_count(fixtures_dir):
    cfg = get_preset("wan2.1-1.3b")
    assert cnn_output_shape(cfg, cfg["latent_shape"]) == (1, 3, 6)
    assert feature_dim(cfg) == 13_824
    enc = MemoryEncoder(**cfg)
    assert enc.grid == (1, 3, 6)
    ours = sum(p.numel() for p in enc.parameters())
    release = json.loads((fixtures_dir / "official_checkpoint_keys.json").read_text())
    unused_bn = sum(math.prod(k["shape"]) for k in release["keys"] if ".bn." in k["name"])
    assert release["total_parameters"] == 78_782_976
    assert ours == 78_782_976 - unused_bn == 78_777_856


def test_other_presets():
    assert get_preset("wan2.1-14b")["dim"] == 5120
    ti2v = get_preset("wan2.2-ti2v-5b")
    assert (ti2v["in_channels"], ti2v["dim"]) == (48, 3072)
    with pytest.raises(ValueError, match="unknown memory encoder preset"):
        get_preset("wan9")
    with pytest.raises(ValueError, match="unknown memory encoder field"):
        get_preset("tiny", width=3)
    with pytest.raises(ValueError, match="not divisible"):
        MemoryEncoder.from_preset("tiny", dim=30, num_heads=4)


def test_latent_with_two_time_steps_has_two_groups_per_video():
    assert cnn_output_shape(get_preset("wan2.1-1.3b"), (41, 60, 104)) == (2, 3, 6)
    w, c = pooling_groups(2, 100)
    assert c.tolist() == [50, 50]
    w, c = pooling_groups(3, 100)  # blended windows appear as their own groups
    assert c.sum() == 100 and len(c) == 5
    assert torch.allclose(w.sum(1), torch.ones(len(c)))


# ---------------------------------------------------------------------------- filter gains
def test_filter_gains_follow_the_spec_formula():
    g = frequency_gains(5, 3, 4, 6, "high")
    assert g.shape == (5, 3, 4, 4)  # rfftn keeps 6 // 2 + 1 bins on the last axis
    # channel 0 (slope 0.7, offset -0.05) at f = 0: 0.7·0.2 − 0.05 = 0.09 → clamped to 0.2
    assert g[0, 0, 0, 0].item() == pytest.approx(0.2)
    # channel 2 (slope 1.0, offset 0) at the highest bin, f = 1: 0.2 + 0.8 = 1.0
    assert g[2, -1, -1, -1].item() == pytest.approx(1.0)
    # channel 2 at (t, h, w) bins (1/2, 1/3, 0): f = |(.5, .333, 0)| / √3
    f = math.sqrt(0.5**2 + (1 / 3) ** 2) / math.sqrt(3)
    assert g[2, 1, 1, 0].item() == pytest.approx(0.2 + 0.8 * math.sqrt(f), rel=1e-6)
    low = frequency_gains(5, 3, 4, 6, "low")
    assert low[4, 0, 0, 0].item() == pytest.approx(1.2)  # 1.3·1.2 + 0.05 → clamped
    assert low[2, 1, 1, 0].item() == pytest.approx(1.2 - 0.8 * math.sqrt(f), rel=1e-6)
    assert float(g.min()) == pytest.approx(0.2) and float(low.max()) == pytest.approx(1.2)


def test_same_input_same_output_for_any_size():
    torch.manual_seed(1)
    a = small().eval()
    torch.manual_seed(1)
    b = small().eval()
    for shape in [(21, 60, 104), (25, 36, 52), (13, 13, 13)]:
        x = torch.randn(1, 2, 16, *shape)
        ya, yb = a(x), b(x)
        assert torch.equal(ya.tokens, yb.tokens)
        assert torch.equal(ya.tokens, a(x).tokens)  # repeated call: no hidden state change


# ---------------------------------------------------------------------------- compact == dense
@torch.no_grad()
def test_compact_equals_dense_at_paper_size():
    enc = MemoryEncoder.from_preset("wan2.1-1.3b").eval()  # the real widths, fp32
    x = torch.randn(1, 2, 16, 21, 60, 104)
    mem = enc(x)
    assert mem.tokens.shape == (1, 4, 1536)  # 2 branches × 2 videos × 1 distinct vector
    assert torch.allclose(mem.log_counts, torch.full((1, 4), math.log(100)))
    dense = mem.dense()
    assert dense.shape == (1, 400, 1536)
    assert rel_err(dense, dense_reference(enc, x)) <= 1e-5


@pytest.mark.parametrize("latent_shape", [(41, 60, 104), (45, 30, 30)])
@torch.no_grad()
def test_compact_equals_dense_with_several_time_steps(latent_shape):
    enc = small(latent_shape=latent_shape).eval()
    assert enc.grid[0] in (2, 3)
    x = torch.randn(2, 3, 16, *latent_shape)
    mem = enc(x)
    dense = mem.dense()
    assert dense.shape == (2, 2 * 3 * 100, 32)
    assert rel_err(dense, dense_reference(enc, x)) <= 1e-5


@torch.no_grad()
def test_compact_equals_dense_for_latent_of_other_size():
    enc = small().eval()  # grid fixed by (21, 60, 104); this input is adaptively pooled to it
    x = torch.randn(1, 2, 16, 25, 64, 120)
    assert rel_err(enc(x).dense(), dense_reference(enc, x)) <= 1e-5


# ---------------------------------------------------------------------------- order
@torch.no_grad()
def test_eval_keeps_retrieval_order():
    enc = small().eval()
    x = torch.randn(1, 4, 16, 21, 60, 104)
    perm = torch.tensor([2, 0, 3, 1])
    a, b = enc(x), enc(x[:, perm])
    # groups are [high v0..v3, low v0..v3]: permuting the inputs permutes the groups
    idx = torch.cat([perm, perm + 4])
    assert torch.allclose(b.tokens, a.tokens[:, idx], atol=1e-6)


@torch.no_grad()
def test_training_shuffles_videos_with_one_shared_permutation():
    enc = small(dropout=0.0).train()
    x = torch.randn(1, 4, 16, 21, 60, 104)
    videos = enc.encode_videos(x)
    ordered = enc.aggregate(videos, shuffle=False)
    shuffled = enc.aggregate(videos, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(4))
    idx = torch.cat([perm, perm + 4])  # the same permutation in both branches
    assert torch.allclose(shuffled.tokens, ordered.tokens[:, idx], atol=1e-6)


# ---------------------------------------------------------------------------- save / load
def test_save_pretrained_round_trips_the_whole_state(tmp_path):
    enc = small(latent_shape=(41, 60, 104))
    enc.train()
    with torch.no_grad():
        enc(torch.randn(1, 3, 16, 41, 60, 104))  # moves the BatchNorm statistics
    bn = enc.high_pass.blocks[0].filter.norm
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_var, torch.ones(8))
    enc.eval()
    enc.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "config.json").is_file()
    back = MemoryEncoder.from_pretrained(tmp_path / "enc").eval()

    def fields(config):  # JSON stores tuples as lists
        return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k[0] != "_"}

    assert fields(back.config) == fields(enc.config)
    sa, sb = enc.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    assert any(k.endswith("running_mean") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(1, 2, 16, 41, 60, 104)
    with torch.no_grad():
        assert torch.equal(enc(x).tokens, back(x).tokens)


# ---------------------------------------------------------------------------- release checkpoint
def _release_tensors(fixtures_dir, prefix="pipe.dit_mem.", cnn_alias=False):
    keys = json.loads((fixtures_dir / "official_checkpoint_keys.json").read_text())["keys"]
    g = torch.Generator().manual_seed(0)
    out = {}
    for k in keys:
        name = k["name"]
        if cnn_alias:
            name = name.replace("conv_block1.", "cnn.0.").replace("conv_block2.", "cnn.1.")
        out[prefix + name] = torch.randn(k["shape"], generator=g) * 0.01
    return out


def test_loads_release_checkpoint_layout(tmp_path, fixtures_dir, caplog):
    tensors = _release_tensors(fixtures_dir)
    path = tmp_path / "DiT-Mem-1.3B.safetensors"
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING, logger="dit_mem"):
        enc = MemoryEncoder.from_official_checkpoint(path)
    warnings = [r for r in caplog.records if "BatchNorm running statistics" in r.getMessage()]
    assert len(warnings) == 1  # said once, not once per layer
    p = "pipe.dit_mem."
    assert torch.equal(
        enc.high_pass.blocks[0].conv.weight, tensors[p + "high_pass_module.conv_block1.conv.weight"]
    )
    assert torch.equal(
        enc.low_pass.blocks[1].filter.norm.bias,
        tensors[p + "low_pass_module.conv_block2.fft_filter.norm.bias"],
    )
    assert torch.equal(enc.low_pass.proj.weight, tensors[p + "low_pass_module.feature_proj.weight"])
    assert torch.equal(enc.attention.norm_k.weight, tensors[p + "self_attention.norm_k.weight"])
    bn = enc.high_pass.blocks[1].filter.norm
    assert torch.equal(bn.running_mean, torch.zeros(768))
    assert torch.equal(bn.running_var, torch.ones(768))
    assert not enc.training


def test_release_loader_accepts_cnn_alias_and_no_prefix(tmp_path, fixtures_dir):
    tensors = _release_tensors(fixtures_dir, prefix="", cnn_alias=True)
    path = tmp_path / "ckpt.safetensors"
    save_file(tensors, str(path))
    enc = MemoryEncoder.from_official_checkpoint(path)
    assert torch.equal(
        enc.high_pass.blocks[1].conv.bias, tensors["high_pass_module.cnn.1.conv.bias"]
    )


def test_release_loader_rejects_missing_and_misshaped_weights(tmp_path, fixtures_dir):
    tensors = _release_tensors(fixtures_dir, prefix="dit_mem.")
    missing = dict(tensors)
    del missing["dit_mem.self_attention.v.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights: attention\.v\.bias"):
        MemoryEncoder.from_official_checkpoint(tmp_path / "missing.safetensors")

    bad = dict(tensors)
    bad["dit_mem.low_pass_module.feature_proj.weight"] = torch.zeros(1536, 1000)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        ValueError, match=r"wrong shapes: low_pass\.proj\.weight: file \(1536, 1000\)"
    ):
        MemoryEncoder.from_official_checkpoint(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------- precision
@torch.no_grad()
def test_bf16_module_keeps_fft_in_float32():
    enc = small().eval()
    x = torch.randn(1, 2, 16, 21, 60, 104)
    ref = enc(x).tokens
    enc_bf16 = enc.to(torch.bfloat16)
    out = enc_bf16(x.to(torch.bfloat16))
    assert out.tokens.dtype == torch.bfloat16
    assert out.log_counts.dtype == torch.float32  # log(100) is not rounded to bf16
    assert rel_err(out.tokens.float(), ref) < 0.05


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 16, 21, 60, 104), r"must be \[B, N, C, T, H, W\]"),
        ((1, 2, 8, 21, 60, 104), "must have 16 channels"),
        ((1, 0, 16, 21, 60, 104), "N ≥ 1"),
        ((1, 2, 16, 4, 60, 104), "too small for the memory encoder's conv stack"),
    ],
)
def test_bad_latents_are_clear_errors(shape, message):
    enc = small()
    with pytest.raises(ValueError, match=message):
        enc(torch.zeros(shape))


def test_memory_tokens_validation_and_dense_layout():
    t = torch.randn(1, 2, 4)
    m = MemoryTokens(t, torch.log(torch.tensor([[3.0, 1.0]])))
    assert torch.equal(m.dense(), torch.cat([t[:, :1]] * 3 + [t[:, 1:]], dim=1))
    assert m.num_dense_tokens == 4
    with pytest.raises(ValueError, match=r"log_counts must be \[B, G\]"):
        MemoryTokens(t, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="strength must be > 0"):
        m.attention_bias(0.0)


def test_from_path_takes_a_folder_or_the_release_file(tmp_path, fixtures_dir):
    enc = small()
    enc.save_pretrained(tmp_path / "enc")
    assert isinstance(MemoryEncoder.from_path(tmp_path / "enc"), MemoryEncoder)
    save_file(_release_tensors(fixtures_dir), str(tmp_path / "DiT-Mem-1.3B.safetensors"))
    assert MemoryEncoder.from_path(tmp_path / "DiT-Mem-1.3B.safetensors").config.dim == 1536
    with pytest.raises(FileNotFoundError, match="expected a save_pretrained folder"):
        MemoryEncoder.from_path(tmp_path / "nothing.pt")
