"""Loading Wan2.1 base models: diffusers folders and the original release layout (tiny twins)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors.torch import save_file
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from dit_mem.models.wan import (
    ORIGINAL_T5,
    ORIGINAL_TOKENIZER,
    ORIGINAL_TRANSFORMER,
    ORIGINAL_VAE,
    PRESETS,
    detect_layout,
    load_wan_components,
    load_wan_t5,
    match_preset,
    preset_configs,
    transformer_config_from_original,
    wan_t5_to_transformers,
)
from dit_mem.testing import tiny_tokenizer, tiny_transformer

# --------------------------------------------------------------------------------------
# An independent tiny twin of Wan's own T5 encoder (wan/modules/t5.py), named as Wan names it
# --------------------------------------------------------------------------------------


class WanT5Norm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps))


class WanT5RelativeEmbedding(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int, max_dist: int):
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int):
        rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
        buckets = self.num_buckets // 2  # bidirectional
        out = (rel > 0).long() * buckets
        rel = rel.abs()
        exact = buckets // 2
        large = (
            exact
            + (
                torch.log(rel.float() / exact) / math.log(self.max_dist / exact) * (buckets - exact)
            ).long()
        )
        large = large.clamp(max=buckets - 1)
        out = out + torch.where(rel < exact, rel, large)
        return self.embedding(out).permute(2, 0, 1).unsqueeze(0)  # [1, heads, lq, lk]


class WanT5Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q, self.k, self.v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, dim, bias=False)

    def forward(self, x, mask, pos_bias):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, self.head_dim) for f in (self.q, self.k, self.v))
        attn = torch.einsum("binc,bjnc->bnij", q, k) + pos_bias  # no 1/sqrt(d) in T5
        attn = attn.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(x.dtype).min)
        attn = attn.float().softmax(-1).type_as(attn)
        return self.o(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1))


class WanT5FeedForward(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, ffn, bias=False)
        self.fc2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class WanT5Block(nn.Module):
    def __init__(self, dim, heads, head_dim, ffn, buckets, max_dist):
        super().__init__()
        self.norm1, self.norm2 = WanT5Norm(dim), WanT5Norm(dim)
        self.attn = WanT5Attention(dim, heads, head_dim)
        self.ffn = WanT5FeedForward(dim, ffn)
        self.pos_embedding = WanT5RelativeEmbedding(buckets, heads, max_dist)

    def forward(self, x, mask):
        e = self.pos_embedding(x.shape[1], x.shape[1])
        x = x + self.attn(self.norm1(x), mask, e)
        return x + self.ffn(self.norm2(x))


class WanT5Encoder(nn.Module):
    def __init__(self, vocab, dim, heads, head_dim, ffn, layers, buckets, max_dist):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            WanT5Block(dim, heads, head_dim, ffn, buckets, max_dist) for _ in range(layers)
        )
        self.norm = WanT5Norm(dim)

    def forward(self, ids, mask):
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


TINY_T5 = dict(vocab=64, dim=32, heads=4, head_dim=8, ffn=48, layers=2, buckets=8, max_dist=16)


def tiny_t5_config() -> UMT5Config:
    c = TINY_T5
    return UMT5Config(
        vocab_size=c["vocab"],
        d_model=c["dim"],
        d_kv=c["head_dim"],
        d_ff=c["ffn"],
        num_layers=c["layers"],
        num_heads=c["heads"],
        relative_attention_num_buckets=c["buckets"],
        relative_attention_max_distance=c["max_dist"],
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )


# --------------------------------------------------------------------------------------
# Original key names of the transformer and the VAE (Wan2.1's WanModel / WanVAE)
# --------------------------------------------------------------------------------------
_TRANSFORMER_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.norm2\.", ".norm3."),  # diffusers' norm2 (cross-attention) is Wan's norm3
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.scale_shift_table$", ".modulation"),
]


def transformer_to_original(state_dict):
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _TRANSFORMER_TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def wan_vae_original_keys(z_dim: int = 16) -> list[str]:
    """Parameter names of Wan2.1's WanVAE (dim_mult 1,2,4,4; 2 res blocks; no attn scales)."""
    keys: list[str] = []

    def res(prefix, shortcut=False):
        keys.extend(f"{prefix}.residual.{n}" for n in ("0.gamma", "2.weight", "2.bias", "3.gamma"))
        keys.extend(f"{prefix}.residual.6.{p}" for p in ("weight", "bias"))
        if shortcut:
            keys.extend(f"{prefix}.shortcut.{p}" for p in ("weight", "bias"))

    def conv(prefix):
        keys.extend(f"{prefix}.{p}" for p in ("weight", "bias"))

    def middle(side):
        res(f"{side}.middle.0")
        keys.append(f"{side}.middle.1.norm.gamma")
        conv(f"{side}.middle.1.to_qkv")
        conv(f"{side}.middle.1.proj")
        res(f"{side}.middle.2")

    conv("encoder.conv1")
    for i in (0, 1, 3, 4, 6, 7, 9, 10):
        res(f"encoder.downsamples.{i}", shortcut=i in (3, 6))
    for i, temporal in ((2, False), (5, True), (8, True)):
        conv(f"encoder.downsamples.{i}.resample.1")
        if temporal:
            conv(f"encoder.downsamples.{i}.time_conv")
    middle("encoder")
    keys.append("encoder.head.0.gamma")
    conv("encoder.head.2")
    conv("conv1")
    conv("conv2")
    conv("decoder.conv1")
    middle("decoder")
    for i in (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14):
        res(f"decoder.upsamples.{i}", shortcut=i == 4)
    for i, temporal in ((3, True), (7, True), (11, False)):
        conv(f"decoder.upsamples.{i}.resample.1")
        if temporal:
            conv(f"decoder.upsamples.{i}.time_conv")
    keys.append("decoder.head.0.gamma")
    conv("decoder.head.2")
    return keys


def vae_to_original(state_dict):
    """Invert diffusers' own conversion on this key set (checked to cover every key)."""
    original = wan_vae_original_keys()
    ids = convert_wan_vae_to_diffusers({k: i for i, k in enumerate(original)})
    assert set(ids) == set(state_dict), set(ids) ^ set(state_dict)
    return {original[ids[k]]: v for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------
# Tests: the T5 key table
# --------------------------------------------------------------------------------------
def test_t5_mapping_matches_wan_encoder_forward(tmp_path):
    torch.manual_seed(0)
    wan = WanT5Encoder(**TINY_T5).eval()
    path = tmp_path / ORIGINAL_T5
    torch.save(wan.state_dict(), path)  # the release's format: a plain state dict

    model = load_wan_t5(path, tiny_t5_config(), torch.float32)
    ids = torch.randint(3, TINY_T5["vocab"], (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = wan(ids, mask)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.shape == expected.shape
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


# transformers' UMT5EncoderModel key → Wan's T5 key (the table in ENVIRONMENT-NOTES, written
# independently of the package's own)
_HF_TO_WAN = [
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight",
        r"blocks.\1.attn.\2.weight",
    ),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight",
        r"blocks.\1.ffn.gate.0.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
]


def transformers_t5_to_wan(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key == "encoder.embed_tokens.weight":  # tied to shared.weight
            continue
        for pattern, template in _HF_TO_WAN:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            raise AssertionError(f"no Wan name for {key}")
    return out


def test_t5_mapping_covers_every_key_both_ways():
    text = {k: v for k, v in preset_configs("wan2.1-t2v-1.3b")["text_encoder"].items()}
    with torch.device("meta"):
        xxl = UMT5EncoderModel(UMT5Config(**text))
    hf = xxl.state_dict()
    wan = transformers_t5_to_wan(hf)
    assert len(wan) == 2 + 24 * 10  # embedding, final norm, 10 tensors per block
    assert set(wan_t5_to_transformers(wan)) == set(hf)
    assert wan["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert wan["blocks.0.ffn.gate.0.weight"].shape == (10240, 4096)
    with pytest.raises(ValueError, match="unknown keys"):
        wan_t5_to_transformers({**wan, "blocks.0.attn.extra.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------
# Tests: whole base models in both layouts
# --------------------------------------------------------------------------------------
def _tiny_vae():
    torch.manual_seed(2)
    return AutoencoderKLWan(base_dim=4, num_res_blocks=2, z_dim=16).eval()


def _write_original(folder, transformer, vae, wan_t5, tokenizer):
    folder.mkdir(parents=True, exist_ok=True)
    original = transformer_to_original(transformer.state_dict())
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert set(converted) == set(transformer.state_dict())  # our inverse is exact
    save_file({k: v.contiguous() for k, v in original.items()}, folder / ORIGINAL_TRANSFORMER)
    torch.save(vae_to_original(vae.state_dict()), folder / ORIGINAL_VAE)
    torch.save(wan_t5.state_dict(), folder / ORIGINAL_T5)
    tokenizer.save_pretrained(folder / ORIGINAL_TOKENIZER)
    cfg = transformer.config
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "dim": cfg.num_attention_heads * cfg.attention_head_dim,
                "eps": 1e-6,
                "ffn_dim": cfg.ffn_dim,
                "freq_dim": cfg.freq_dim,
                "in_dim": cfg.in_channels,
                "model_type": "t2v",
                "num_heads": cfg.num_attention_heads,
                "num_layers": cfg.num_layers,
                "out_dim": cfg.out_channels,
                "text_len": 512,
                "text_dim": cfg.text_dim,
            }
        )
    )


def _config_dir(folder, transformer_config, vae):
    for name, cfg in {
        "transformer": transformer_config,
        "vae": dict(vae.config),
        "text_encoder": tiny_t5_config().to_dict(),
    }.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(cfg))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(preset_configs("wan2.1-t2v-1.3b")["scheduler"])
    )


def test_original_layout_loads_tiny_twins(tmp_path):
    transformer = tiny_transformer(text_dim=TINY_T5["dim"])
    vae = _tiny_vae()
    torch.manual_seed(1)
    wan_t5 = WanT5Encoder(**TINY_T5).eval()
    tokenizer = tiny_tokenizer()
    base = tmp_path / "Wan2.1-T2V-tiny"
    _write_original(base, transformer, vae, wan_t5, tokenizer)

    translated = transformer_config_from_original(json.loads((base / "config.json").read_text()))
    assert all(
        json.dumps(transformer.config[k]) == json.dumps(v)
        for k, v in translated.items()
        if k[0] != "_"
    )
    assert match_preset(translated) is None  # tiny: the configs must be given
    with pytest.raises(ValueError, match="config_dir"):
        load_wan_components(base, torch.float32)
    configs = tmp_path / "configs"
    _config_dir(configs, translated, vae)

    assert detect_layout(base) == "original"
    parts = load_wan_components(base, torch.float32, config_dir=configs)
    assert parts.layout == "original"
    loaded_transformer, loaded_vae = parts.transformer, parts.vae
    text_encoder, loaded_tokenizer, scheduler = (
        parts.text_encoder,
        parts.tokenizer,
        parts.scheduler_config,
    )
    assert scheduler["_class_name"] == "UniPCMultistepScheduler"

    x = torch.randn(1, 16, 2, 8, 8)
    t = torch.tensor([300.0])
    text = torch.randn(1, 5, TINY_T5["dim"])
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    ids = torch.randint(3, TINY_T5["vocab"], (1, 9))
    mask = torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(
            loaded_transformer(x, t, text, return_dict=False)[0],
            transformer(x, t, text, return_dict=False)[0],
        )
        latent = vae.encode(video).latent_dist.mean
        assert torch.equal(loaded_vae.encode(video).latent_dist.mean, latent)
        assert torch.allclose(
            text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
            wan_t5(ids, mask),
            atol=1e-5,
        )
    assert loaded_tokenizer("a red fox").input_ids == tokenizer("a red fox").input_ids

    # a subset, in bf16
    only = load_wan_components(
        base, torch.bfloat16, components=("transformer",), config_dir=configs
    )
    assert only.text_encoder is None and only.transformer.dtype == torch.bfloat16


def test_diffusers_layout_loads_through_its_pipeline_and_clear_errors(tmp_path):
    """A diffusers folder loads through the flavour's from_pretrained (everything its
    model_index.json carries kept); the release-layout reader points there, and names what
    each layout needs."""
    from dit_mem.models.base_model import describe_base_model
    from dit_mem.pipeline import load_base_model
    from dit_mem.testing import build_tiny_model

    folder = build_tiny_model(tmp_path / "a14b", "wan2.2-a14b")
    base = describe_base_model(folder)
    assert (base.layout, base.pipeline, base.experts, base.boundary_ratio) == (
        "diffusers",
        "WanPipeline",
        ("transformer", "transformer_2"),
        0.875,
    )
    pipe = load_base_model(base, torch.float32, skip=("text_encoder", "tokenizer", "vae"))
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    assert pipe.text_encoder is None and pipe.vae is None
    with pytest.raises(ValueError, match="is a diffusers folder: load it with its pipeline"):
        load_wan_components(folder, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither a diffusers Wan folder.*Wan2.1_VAE\.pth"):
        load_wan_components(tmp_path / "empty", torch.float32)
    with pytest.raises(ValueError, match="does not exist"):
        load_wan_components(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown components"):
        load_wan_components(folder, components=("unet",))


@pytest.mark.parametrize(
    ("preset", "dim", "heads", "layers", "ffn"),
    [("wan2.1-t2v-1.3b", 1536, 12, 30, 8960), ("wan2.1-t2v-14b", 5120, 40, 40, 13824)],
)
def test_shipped_configs_match_the_release(preset, dim, heads, layers, ffn):
    release_config = {  # the original release's config.json
        "_class_name": "WanModel",
        "dim": dim,
        "eps": 1e-06,
        "ffn_dim": ffn,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": heads,
        "num_layers": layers,
        "out_dim": 16,
        "text_len": 512,
    }
    assert match_preset(transformer_config_from_original(release_config)) == preset
    configs = preset_configs(preset)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(configs["transformer"])
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(
        {"wan2.1-t2v-1.3b": 1.42, "wan2.1-t2v-14b": 14.29}[preset], abs=0.01
    )
    assert configs["text_encoder"]["d_model"] == 4096 and configs["vae"]["z_dim"] == 16
    assert set(PRESETS) == {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b"}
