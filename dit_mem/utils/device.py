"""Where a module computes, offloaded or not."""

from __future__ import annotations

import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of accelerate's offload hook on it or on a
    submodule (sequential CPU offload leaves its weights on ``meta``), else its weights' device."""
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device
