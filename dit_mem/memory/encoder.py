"""The DiT-Mem memory encoder (method §3).

    latents [B, N, C, T, H, W]                          N retrieved videos' VAE latents
      ├─ high-pass branch ─┐  per video: Conv3d → filter → ReLU → MaxPool  (×2),
      └─ low-pass  branch ─┤  adaptive pool to the configured grid, T' steps of C'·H'·W'
                           │  features pooled to L=100 tokens, Linear → D
    VideoTokens  high, low [B, N, G, D] + log_counts [G]   (G distinct tokens of the L)
      → (training) one permutation of the N videos, shared by both branches
      → shared self-attention, applied to each branch's N·L tokens separately
    MemoryTokens [B, 2·N·G, D] + log-multiplicities       .dense() → [B, 2·N·L, D]

Everything runs on the distinct tokens: pooling T' time steps up to L tokens only repeats
or blends them, so a video has at most a handful of distinct tokens, and attention over
m copies of a key equals attention over one key with log m added to its logit.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from dit_mem.errors import UserError
from dit_mem.memory.checks import check_finite_state
from dit_mem.memory.official import load_official_checkpoint
from dit_mem.memory.tokens import MemoryTokens, VideoTokens

Mode = Literal["high", "low"]


# --------------------------------------------------------------------------------------
# Presets: the fields of MemoryEncoder.__init__ that differ from its defaults (the paper's 1.3B),
# one per base model, with the DiT family it serves; latent shapes are those of a bank at the
# pipeline's default geometry.
# --------------------------------------------------------------------------------------
_BASE_MODELS: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b": {},  # the paper's encoder (released as DiT-Mem-1.3B): the defaults, 480×832×81
    "wan2.1-14b": {"dim": 5120},
    # Wan2.2: TI2V-5B has a 48-channel VAE (16× spatial); A14B keeps Wan2.1's VAE.
    "wan2.2-ti2v-5b": {"in_channels": 48, "dim": 3072, "latent_shape": (21, 30, 52)},
    "wan2.2-a14b": {"dim": 5120},
    # LTX-Video 2B: 128 latent channels (32× spatial, 8× temporal), width 32 heads × 64 = 2048.
    # The bank's latents at LTXPipeline's defaults (161 frames, 512×704: [128, 21, 16, 22]);
    # stride 2 in the first block leaves a 2×2×2 grid there (stride 4 would leave 1×1×1).
    "ltx-video-2b": {
        "in_channels": 128,
        "strides": (2, 1),
        "dim": 2048,
        "latent_shape": (21, 16, 22),
    },
    # HunyuanVideo-1.5: 32 latent channels (16× spatial, 4× temporal), width 16 heads × 128 =
    # 2048. The bank's latents at the pipeline's defaults (121 frames, 480×848: [32, 31, 30, 53]).
    "hunyuanvideo-1.5": {"in_channels": 32, "dim": 2048, "latent_shape": (31, 30, 53)},
}
PRESET_FAMILY: dict[str, str] = {
    "wan2.1-1.3b": "wan",
    "wan2.1-14b": "wan",
    "wan2.2-ti2v-5b": "wan",
    "wan2.2-a14b": "wan",
    "ltx-video-2b": "ltx",
    "hunyuanvideo-1.5": "hunyuan15",
}
# The tiny worlds' presets.
_TINY_WORLDS: dict[str, dict[str, Any]] = {
    # For tests and the offline demo: latents [16, 5, 8, 8] (17 frames at 64×64), a DiT of width 32.
    "tiny": {
        "conv_channels": (8, 16),
        "kernel_sizes": (3, 3),
        "strides": (1, 1),
        "dim": 32,
        "num_heads": 2,
        "latent_shape": (5, 8, 8),
    },
    # The toy world (dit_mem.toyworld): latents [8, 3, 8, 8] of 9×32×32 clips, a DiT of
    # width 128. One conv block: a second max-pool would empty the 3-step time axis. L = 16
    # tokens per video (measured: L = 4 gives memory too little attention mass to change the
    # colour, L = 100 drowns the 48 video tokens and harms seen prompts; benchmarks/toyworld.md).
    "toyworld": {
        "in_channels": 8,
        "tokens_per_video": 16,
        "conv_channels": (64,),
        "kernel_sizes": (3,),
        "strides": (1,),
        "dim": 128,
        "num_heads": 4,
        "latent_shape": (3, 8, 8),
    },
}
PRESETS: dict[str, dict[str, Any]] = {**_BASE_MODELS, **_TINY_WORLDS}


def preset_for(family: str, dim: int, channels: int) -> str:
    """The base-model preset of a ``family`` DiT of width ``dim`` whose VAE makes latents of
    ``channels`` channels (``ValueError`` naming the presets when none fits)."""
    for name, owner in PRESET_FAMILY.items():
        fields = get_preset(name)
        if owner == family and (fields["dim"], fields["in_channels"]) == (dim, channels):
            return name
    raise UserError(
        f"no memory encoder preset serves a {family} DiT of width {dim} with {channels}-channel "
        f"latents (presets: {', '.join(f'{n} ({f})' for n, f in PRESET_FAMILY.items())}); name "
        "one, with its fields replaced where they differ"
    )


def get_preset(name: str, **overrides) -> dict[str, Any]:
    """Every ``MemoryEncoder.__init__`` field of a named preset, some optionally replaced."""
    if name not in PRESETS:
        raise UserError(f"unknown memory encoder preset {name!r}; known: {sorted(PRESETS)}")
    fields = {k: p.default for k, p in inspect.signature(MemoryEncoder.__init__).parameters.items()}
    del fields["self"]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UserError(f"unknown memory encoder field(s) {unknown}; known: {sorted(fields)}")
    return {**fields, **PRESETS[name], **overrides}


# --------------------------------------------------------------------------------------
# Deterministic pieces: CNN geometry, filter gains, token pooling groups
# --------------------------------------------------------------------------------------
def cnn_output_shape(
    config: Mapping[str, Any], latent_thw: tuple[int, ...]
) -> tuple[int, int, int]:
    """Grid after the conv stack of an encoder ``config`` for a latent of size (T, H, W).

    ``config``: the encoder's config (or a :func:`get_preset` dict). ``ValueError`` if it vanishes.
    """
    kernels, strides, pool = config["kernel_sizes"], config["strides"], config["pool_size"]
    size = list(latent_thw)
    for i, (k, s) in enumerate(zip(kernels, strides, strict=True)):
        size = [(n + 2 * (k // 2) - k) // s + 1 for n in size]
        size = [n // pool for n in size]
        if min(size) < 1:
            raise UserError(
                f"latent of size (T, H, W) = {tuple(latent_thw)} is too small for the memory "
                f"encoder's conv stack (kernels {tuple(kernels)}, strides {tuple(strides)}, "
                f"max-pool {pool}): it vanishes after block {i + 1}"
            )
    return tuple(size)  # type: ignore[return-value]


def feature_dim(config: Mapping[str, Any]) -> int:
    """Features per time step fed to the projection: C'·H'·W' of the configured grid."""
    _, h, w = cnn_output_shape(config, config["latent_shape"])
    return config["conv_channels"][-1] * h * w


def check_config(config: Mapping[str, Any]) -> None:
    """``ValueError`` for an inconsistent encoder config."""
    n = len(config["conv_channels"])
    if not (len(config["kernel_sizes"]) == len(config["strides"]) == n) or n == 0:
        raise UserError(
            "conv_channels, kernel_sizes and strides need one entry per conv block, got "
            f"{config['conv_channels']}, {config['kernel_sizes']}, {config['strides']}"
        )
    if config["dim"] % config["num_heads"]:
        raise UserError(f"dim {config['dim']} is not divisible by num_heads {config['num_heads']}")
    if len(config["latent_shape"]) != 3:
        raise UserError(f"latent_shape must be (T, H, W), got {config['latent_shape']}")
    cnn_output_shape(config, config["latent_shape"])


@functools.lru_cache(maxsize=64)
def frequency_gains(
    channels: int, t: int, h: int, w: int, mode: Mode, clamp: tuple[float, float] = (0.2, 1.2)
) -> torch.Tensor:
    """Real filter gains ``[C, t, h, w//2+1]`` for an rfftn over (T, H, W) (method §3).

    f = |(f_t, f_h, f_w)| / √3 with each axis ``linspace(0, 1, bins)``; base curve
    0.2 + 0.8√f (high) or 1.2 − 0.8√f (low); channel c: ·linspace(0.7, 1.3, C)[c]
    + linspace(−0.05, 0.05, C)[c], clamped. A pure function of its arguments, cached: always
    a real CPU tensor, even when first asked for under a fake-tensor mode or a default device
    (else a later real call would get the cached fake or meta one).
    """
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.device("cpu"):
        return _compute_gains(channels, t, h, w, mode, clamp)


def _compute_gains(channels, t, h, w, mode, clamp) -> torch.Tensor:
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) for n in (t, h, w // 2 + 1)]
    gt, gh, gw = torch.meshgrid(*axes, indexing="ij")
    f = torch.sqrt(gt**2 + gh**2 + gw**2) / math.sqrt(3.0)
    if mode == "high":
        base = 0.2 + 0.8 * torch.sqrt(f)
    elif mode == "low":
        base = 1.2 - 0.8 * torch.sqrt(f)
    else:
        raise UserError(f"filter mode must be 'high' or 'low', got {mode!r}")
    slope = torch.linspace(0.7, 1.3, channels, dtype=torch.float64).view(-1, 1, 1, 1)
    offset = torch.linspace(-0.05, 0.05, channels, dtype=torch.float64).view(-1, 1, 1, 1)
    return (slope * base + offset).clamp(*clamp).float()


@functools.lru_cache(maxsize=64)
def pooling_windows(in_len: int, out_len: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Adaptive average pooling ``in_len → out_len`` as distinct windows and their counts:
    output token i averages ``[floor(i·n/L), ceil((i+1)·n/L))``; equal consecutive windows form
    one group (numbers: a function of the shapes alone)."""
    windows: list[tuple[int, int]] = []
    counts: list[int] = []
    for i in range(out_len):
        win = ((i * in_len) // out_len, -((-(i + 1) * in_len) // out_len))
        if windows and windows[-1] == win:
            counts[-1] += 1
        else:
            windows.append(win)
            counts.append(1)
    return windows, counts


def pooling_groups(in_len: int, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pooling_windows` as ``(weights [G, in_len], counts [G])``."""
    windows, counts = pooling_windows(in_len, out_len)
    weights = torch.zeros(len(windows), in_len)
    for g, (a, b) in enumerate(windows):
        weights[g, a:b] = 1.0 / (b - a)
    return weights, torch.tensor(counts, dtype=torch.long)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------
class FrequencyFilter(nn.Module):
    """``y = BatchNorm3d(x + Dropout(irfftn(rfftn(x) · gains)))``, FFT in float32."""

    def __init__(self, channels: int, mode: Mode, dropout: float, clamp, grid: tuple[int, ...]):
        super().__init__()
        self.channels, self.mode, self.clamp = channels, mode, tuple(clamp)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.BatchNorm3d(channels)
        # Gains for the configured grid; other sizes are computed from the same function.
        gains = frequency_gains(channels, *grid, mode, self.clamp)
        self.register_buffer("gains", gains.clone(), persistent=False)

    def _gains(self, t: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        if self.gains.shape[1:] == (t, h, w // 2 + 1):
            return self.gains.float()
        return frequency_gains(self.channels, t, h, w, self.mode, self.clamp).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h, w = x.shape[-3:]
        spec = torch.fft.rfftn(x.float(), dim=(-3, -2, -1), norm="ortho")
        filtered = torch.fft.irfftn(
            spec * self._gains(t, h, w, x.device), s=(t, h, w), dim=(-3, -2, -1), norm="ortho"
        )
        return self.norm(x + self.dropout(filtered.to(x.dtype)))


class ConvBlock(nn.Module):
    """Conv3d → frequency filter → ReLU → MaxPool3d."""

    def __init__(self, c_in, c_out, kernel, stride, pool, mode, dropout, clamp, grid):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        self.filter = FrequencyFilter(c_out, mode, dropout, clamp, grid)
        self.pool = nn.MaxPool3d(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.filter(self.conv(x))))


class MemoryBranch(nn.Module):
    """One frequency branch: conv stack → fixed grid → L tokens (as distinct groups) → Linear."""

    def __init__(self, cfg: Mapping[str, Any], mode: Mode):
        super().__init__()
        self.mode = mode
        self.grid = cnn_output_shape(cfg, cfg["latent_shape"])
        self.tokens_per_video = cfg["tokens_per_video"]
        blocks, c_in, size = [], cfg["in_channels"], list(cfg["latent_shape"])
        for c_out, k, s in zip(
            cfg["conv_channels"], cfg["kernel_sizes"], cfg["strides"], strict=True
        ):
            size = [(n + 2 * (k // 2) - k) // s + 1 for n in size]  # grid the filter sees
            blocks.append(
                ConvBlock(
                    c_in,
                    c_out,
                    k,
                    s,
                    cfg["pool_size"],
                    mode,
                    cfg["dropout"],
                    cfg["gain_clamp"],
                    size,
                )
            )
            size = [n // cfg["pool_size"] for n in size]
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(feature_dim(cfg), cfg["dim"])
        weights, counts = pooling_groups(self.grid[0], self.tokens_per_video)
        self.register_buffer("pool_weights", weights.clone(), persistent=False)
        self.register_buffer("log_counts", counts.float().log(), persistent=False)
        # the same, as numbers (what shape-only code reads: a fake tensor has no values)
        self.counts = tuple(pooling_windows(self.grid[0], self.tokens_per_video)[1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, T, H, W]`` → per-time-step features ``[M, T', C'·H'·W']``."""
        for block in self.blocks:
            x = block(x)
        if tuple(x.shape[2:]) != self.grid:
            x = F.adaptive_avg_pool3d(x, self.grid)
        return x.permute(0, 2, 1, 3, 4).flatten(2)  # (channel, height, width) per step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, T, H, W]`` → distinct tokens ``[M, G, D]`` (multiplicities: ``log_counts``)."""
        feats = self.features(x)
        pooled = torch.einsum("gt,mtf->mgf", self.pool_weights.to(feats.dtype), feats)
        return self.proj(pooled)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, normalised in float32 (as Wan does), with a weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class SharedAttention(nn.Module):
    """Multi-head self-attention, no positions, RMSNorm on q and k, optional key-logit bias."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, S, D]``; ``key_bias [B, S]`` is added to every query's logit for that key."""
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, h, S, D/h], float32
            return t.float().view(b, s, self.num_heads, d // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.norm_q(self.q(x))), heads(self.norm_k(self.k(x))), heads(self.v(x))
        mask = None if key_bias is None else key_bias.float()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # float32: exact bias
        return self.o(out.transpose(1, 2).reshape(b, s, d).to(x.dtype))


class MemoryEncoder(ModelMixin, ConfigMixin):
    """Retrieved videos' latents → memory tokens for a Wan DiT (method §3).

    Build from a preset with ``MemoryEncoder.from_preset("wan2.1-1.3b")``; save and load with
    ``save_pretrained`` / ``from_pretrained`` (weights, BatchNorm statistics and config);
    load the public release with ``MemoryEncoder.from_official_checkpoint(path)``.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,  # VAE latent channels
        conv_channels: tuple[int, ...] = (512, 768),  # width of each Conv3d block
        kernel_sizes: tuple[int, ...] = (7, 3),  # padding is kernel // 2
        strides: tuple[int, ...] = (4, 1),
        pool_size: int = 2,  # MaxPool3d after every block
        tokens_per_video: int = 100,  # L
        dim: int = 1536,  # D: the DiT's hidden size
        num_heads: int = 8,  # heads of the shared attention
        dropout: float = 0.5,  # dropout on the filtered signal (training only)
        latent_shape: tuple[int, int, int] = (21, 60, 104),  # fixes the CNN output grid
        gain_clamp: tuple[float, float] = (0.2, 1.2),  # range of the filter gains
        norm_eps: float = 1e-6,  # RMSNorm eps on q and k
    ):
        super().__init__()
        fields = {
            "in_channels": in_channels,
            "conv_channels": tuple(conv_channels),
            "kernel_sizes": tuple(kernel_sizes),
            "strides": tuple(strides),
            "pool_size": pool_size,
            "tokens_per_video": tokens_per_video,
            "dim": dim,
            "num_heads": num_heads,
            "dropout": dropout,
            "latent_shape": tuple(latent_shape),
            "gain_clamp": tuple(gain_clamp),
            "norm_eps": norm_eps,
        }
        check_config(fields)
        self.high_pass = MemoryBranch(fields, "high")
        self.low_pass = MemoryBranch(fields, "low")
        self.attention = SharedAttention(dim, num_heads, norm_eps)

    @property
    def grid(self) -> tuple[int, int, int]:
        """CNN output grid (T', H', W') at the configured latent shape."""
        return self.high_pass.grid

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> MemoryEncoder:
        return cls(**get_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> MemoryEncoder:
        """diffusers' ``from_pretrained``; weights or statistics that are NaN/Inf are an error."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        check_finite_state(model, pretrained_model_name_or_path)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained``; the files get the umask's mode (safetensors writes
        0o600, which would keep a shared encoder from other users)."""
        from dit_mem.utils.io import honour_umask

        super().save_pretrained(save_directory, *args, **kwargs)
        honour_umask(save_directory)

    @classmethod
    def from_path(cls, path) -> MemoryEncoder:
        """A ``save_pretrained`` folder, or the release's ``DiT-Mem-1.3B.safetensors`` file."""
        from pathlib import Path

        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained(path)
        if path.suffix == ".safetensors" and path.is_file():
            return cls.from_official_checkpoint(path)
        raise FileNotFoundError(
            f"memory encoder not found: {path} (expected a save_pretrained folder or "
            "the release's DiT-Mem-1.3B.safetensors)"
        )

    @classmethod
    def from_official_checkpoint(cls, path, config: Mapping[str, Any] | None = None, **kw):
        """Load the public release's ``DiT-Mem-1.3B.safetensors`` (see ``official.py``)."""
        return load_official_checkpoint(cls, path, config=config, **kw)

    # ------------------------------------------------------------------ forward
    def check_latents(self, latents: torch.Tensor) -> None:
        cfg = self.config
        if latents.ndim != 6:
            raise UserError(
                "memory latents must be [B, N, C, T, H, W] (N retrieved videos), got shape "
                f"{tuple(latents.shape)}"
            )
        b, n, c = latents.shape[:3]
        if n == 0 or b == 0:
            raise UserError(f"memory latents need B ≥ 1 and N ≥ 1 videos, got B={b}, N={n}")
        if c != cfg.in_channels:
            raise UserError(
                f"memory latents must have {cfg.in_channels} channels (dim 2 of [B, N, C, T, H, W]), "
                f"got {c}"
            )
        cnn_output_shape(cfg, tuple(latents.shape[3:]))  # raises if too small

    def encode_videos(self, latents: torch.Tensor) -> VideoTokens:
        """Per-video tokens of both branches, before the shared attention."""
        self.check_latents(latents)
        b, n = latents.shape[:2]
        x = latents.flatten(0, 1).to(self.dtype)  # [B·N, C, T, H, W]
        high = self.high_pass(x)
        low = self.low_pass(x)
        g = high.shape[1]
        return VideoTokens(
            high.view(b, n, g, -1), low.view(b, n, g, -1), self.high_pass.log_counts.clone()
        )

    def aggregate(
        self,
        videos: VideoTokens,
        shuffle: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> MemoryTokens:
        """Shuffle videos (training), then the shared attention over each branch's tokens."""
        if shuffle is None:
            shuffle = self.training
        if shuffle:
            perm = torch.randperm(videos.num_videos, generator=generator)
            videos = videos.select(perm.to(videos.high.device))
        b, n, g, d = videos.high.shape
        log_counts = videos.log_counts.to(videos.high.device).float().repeat(n).expand(b, n * g)
        outs = [
            self.attention(t.reshape(b, n * g, d), log_counts) for t in (videos.high, videos.low)
        ]
        return MemoryTokens(torch.cat(outs, dim=1), torch.cat([log_counts, log_counts], dim=1))

    def forward(
        self,
        latents: torch.Tensor,
        shuffle: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> MemoryTokens:
        """``latents [B, N, C, T, H, W]`` → ``MemoryTokens`` (dense: ``[B, 2·N·L, D]``)."""
        return self.aggregate(self.encode_videos(latents), shuffle=shuffle, generator=generator)
