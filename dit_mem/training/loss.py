"""The flow-matching training objective of Wan2.1 as DiT-Mem trains with it (method §5).

s   = linspace(1, 0, 1001)[:-1]            1000 sigmas, 1 → 0.001
s'  = shift·s / (1 + (shift − 1)·s)        shift 5
t   = 1000·s'                              the timestep the DiT sees
i   ~ uniform{0, …, 999}                   one index per sample
x_t = (1 − s'_i)·x0 + s'_i·ε,   target = ε − x0
loss = mean((pred − target)²) · w(t_i),    w ∝ exp(−2·((t − 500)/1000)²),
                                           shifted to min 0, scaled to sum 1000

``weighting="none"`` keeps every timestep at weight 1 (the shifted bell gives the noisiest
timesteps, t → 1000, almost no weight: where a small model decides a clip's colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_mem.errors import UserError

WEIGHTINGS = ("wan", "none")


@dataclass
class FlowMatchingObjective:
    """Timesteps, noising, target and weighted loss of Wan's flow-matching training."""

    num_train_timesteps: int = 1000
    shift: float = 5.0
    weighting: str = "wan"  # "wan" (the bell above) | "none" (uniform)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"loss weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.num_train_timesteps < 2:
            raise UserError(f"num_train_timesteps must be ≥ 2, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise UserError(f"flow shift must be > 0, got {self.shift}")
        n = self.num_train_timesteps
        s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        sigmas = self.shift * s / (1 + (self.shift - 1) * s)
        timesteps = sigmas * 1000
        w = torch.exp(-2 * ((timesteps - n / 2) / n) ** 2)
        w = w - w.min() if self.weighting == "wan" else torch.ones_like(w)
        self.sigmas = sigmas.float()  # [n], s'
        self.timesteps = timesteps.float()  # [n], t = 1000·s'
        self.weights = (w * (n / w.sum())).float()  # [n], sums to n

    def sample_indices(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform timestep indices ``[B]`` (int64, on the generator's device)."""
        device = generator.device if generator is not None else "cpu"
        return torch.randint(
            0, self.num_train_timesteps, (batch_size,), generator=generator, device=device
        )

    def prepare(
        self, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, target)`` for clean latents ``x0 [B, ...]``, indices ``[B]`` and noise."""
        if noise.shape != x0.shape:
            raise UserError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(x0.shape)}")
        index = index.to("cpu")
        sigma = self.sigmas[index].to(x0.device, torch.float32)
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
        x0, noise = x0.float(), noise.float()
        x_t = (1 - sigma) * x0 + sigma * noise
        return x_t, self.timesteps[index].to(x0.device), noise - x0

    def loss(self, pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (float32) times the timestep weight, averaged over the batch."""
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # [B]
        w = self.weights[index.to("cpu")].to(mse.device)
        return (mse * w).mean()
