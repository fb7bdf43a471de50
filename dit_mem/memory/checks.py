"""Checks shared by the encoder's loaders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_mem.errors import UserError


def check_finite_state(model: nn.Module, source: Any) -> None:
    """``ValueError`` naming ``source`` if any weight or buffer of ``model`` is NaN/Inf."""
    from dit_mem.memory.tokens import is_fake

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if is_fake(tensor):  # no values (benchmarks/full_size.py): nothing to check
            continue
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{source}: the memory encoder's {name} holds NaN or infinite values")
