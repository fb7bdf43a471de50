"""The samplers generation chooses from by config (``GenerationConfig.scheduler``).

* ``"flow-euler"``: :class:`PaperEulerScheduler`, the paper's sampler (method §6): Euler steps of
  flow matching on σ = linspace(1, 0, N + 1)[:-1], shifted by ``shift`` (5), ending at σ = 0.
  That is DiffSynth's ``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)``, which
  the release sampled with; diffusers' stock Euler spaces its N steps from σ = 1 to σ_min instead.
* ``"unipc"``: Wan's own default, diffusers' ``UniPCMultistepScheduler`` with flow sigmas.
* ``"euler"``: diffusers' stock ``FlowMatchEulerDiscreteScheduler`` with ``shift``.
* ``"model"``: the base model's own scheduler (its ``scheduler/`` config); the default for the
  families other than Wan (``Family.default_scheduler``).

The schedule lives in the scheduler object; the pipeline's loop is stock ``WanPipeline``'s.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from dit_mem.errors import UserError

SchedulerKind = Literal["flow-euler", "unipc", "euler", "model"]
SCHEDULERS: tuple[str, ...] = ("flow-euler", "unipc", "euler", "model")


class PaperEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler on the paper's σ grid: ``linspace(1, 0, N + 1)[:-1]``, then shifted.

    Everything else (``step``, the shift, the terminal σ = 0) is diffusers' own Euler scheduler;
    only the grid of a plain ``set_timesteps(N)`` differs. Explicit ``sigmas`` / ``timesteps``
    are used as given.
    """

    def set_timesteps(
        self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None
    ):
        if sigmas is None and timesteps is None:
            if num_inference_steps is None or num_inference_steps < 1:
                raise UserError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(
            num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps
        )


def make_scheduler(kind: SchedulerKind = "flow-euler", shift: float = 5.0):
    """The scheduler ``kind`` with flow ``shift`` (``ValueError`` for anything else)."""
    if kind == "flow-euler":
        return PaperEulerScheduler(num_train_timesteps=1000, shift=shift)
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if kind == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
    raise UserError(
        f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS[:-1])} (or 'model': "
        "the base model's own, when a pipeline is loaded)"
    )
