"""The private parts of diffusers this package reads, checked where it reads them.

``pyproject.toml`` bounds diffusers to the versions these tests ran on (0.42.x). A newer
diffusers that moves or reshapes one of these fails here, by name, before anything else does.
"""

from __future__ import annotations

import importlib
import inspect

import diffusers
import pytest

from dit_mem.backbone.attention import _DIFFUSERS_OP_PAIRS

# (module, symbol, where dit_mem uses it)
PRIVATE = [
    (
        "diffusers.models.attention_dispatch",
        "_AttentionBackendRegistry",
        "backbone/attention.py: the active backend",
    ),
    (
        "diffusers.models.attention_dispatch",
        "_templated_context_parallel_attention",
        "backbone/attention.py: native + ring with a log-sum-exp",
    ),
    *[
        (
            "diffusers.models.attention_dispatch",
            op,
            f"backbone/attention.py: the {backend!r} kernel pair",
        )
        for backend, ops in _DIFFUSERS_OP_PAIRS.items()
        for op in ops
    ],
    (
        "diffusers.hooks.hooks",
        "HookFunctionReference",
        "backbone/injection.py: picklable hook wrappers",
    ),
    (
        "diffusers.pipelines.ltx.pipeline_ltx",
        "LTXPipeline._pack_latents",
        "families/ltx.py: training",
    ),
    (
        "diffusers.pipelines.ltx.pipeline_ltx",
        "LTXPipeline._unpack_latents",
        "families/ltx.py: training",
    ),
    (
        "diffusers.pipelines.ltx.pipeline_ltx",
        "LTXPipeline._get_t5_prompt_embeds",
        "families/ltx.py: text cache",
    ),
    ("diffusers.pipelines.wan.pipeline_wan", "prompt_clean", "families/wan.py: text cache"),
]


@pytest.mark.parametrize(("module", "symbol", "user"), PRIVATE, ids=[p[1] for p in PRIVATE])
def test_private_symbol_is_where_it_is_read(module, symbol, user):
    obj = importlib.import_module(module)
    for part in symbol.split("."):
        obj = getattr(obj, part, None)
        assert obj is not None, (
            f"diffusers {diffusers.__version__} has no {module}.{symbol} (read by dit_mem/{user}); "
            "re-check that code against this diffusers before widening the bound in pyproject.toml"
        )


def test_private_protocols_have_the_shapes_we_drive():
    from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
    from diffusers.models import attention_dispatch as dispatch
    from torch import nn

    active = dispatch._AttentionBackendRegistry.get_active_backend()
    assert isinstance(active, tuple) and len(active) == 2, "get_active_backend() → (name, fn)"
    params = inspect.signature(dispatch._templated_context_parallel_attention).parameters
    for name in ("forward_op", "backward_op", "_parallel_config"):
        assert name in params, f"_templated_context_parallel_attention lost {name!r}"
    # the hook registry: a registered hook's fn_ref, the state manager's context setter
    module = nn.Linear(2, 2)
    hook = ModelHook()
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, "probe")
    for name in ("pre_forward", "forward", "post_forward"):
        assert callable(getattr(hook.fn_ref, name, None)), f"HookFunctionReference.{name} moved"
    assert "set_context" in vars(StateManager), "StateManager.set_context moved"
    assert hasattr(HookRegistry, "invalidate_child_registries_cache")
