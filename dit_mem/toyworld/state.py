"""Resumable training state for the toy-world stages, in safetensors + JSON (no pickles).

``save_state`` writes the model(s), the optimizer moments and the step atomically;
``load_state`` puts them back, so a stage killed at any moment resumes from its last save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dit_mem.utils import write_json_atomic, write_safetensors_atomic

STATE = "state.safetensors"
META = "state.json"


def save_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict | None = None,
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().clone()  # tied weights: one copy each
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).contiguous().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(folder / STATE, tensors)
    # the JSON is written second: a state.json always describes a complete tensor file
    write_json_atomic(folder / META, {"step": step, **(extra or {})})


def load_state(
    folder: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
) -> dict | None:
    """Restore what :func:`save_state` wrote; returns its JSON (with ``step``) or None."""
    from safetensors.torch import load_file

    if not (folder / META).is_file() or not (folder / STATE).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    tensors = load_file(str(folder / STATE))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return meta
