"""``dit-mem serve``: the web page (Gradio). Default: the shipped toy world, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from dit_mem.cli_types import count
from dit_mem.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="web page: what memory retrieved for a prompt, and the video without and with it",
        description="Serve the DiT-Mem page. Without --config it runs on the shipped toy world "
        "(offline, a video in about a second on CPU); with --config, on the models and bank the "
        "GenerationConfig names (the same keys as dit-mem generate; KEY=VALUE overrides win).",
    )
    p.add_argument("--config", type=Path, help="YAML of GenerationConfig keys (default: toy world)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=count(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="GenerationConfig overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from dit_mem.generation import load_generation_config
    from dit_mem.web import REAL_EXAMPLES, TOY_EXAMPLES, serve

    if importlib.util.find_spec("gradio") is None:
        raise UserError("the web page needs Gradio: pip install 'dit-mem[web]'")

    if args.config is None:
        from dit_mem.config import with_overrides
        from dit_mem.toyworld.evaluate import toy_config
        from dit_mem.toyworld.recipe import SHIPPED

        cfg = with_overrides(toy_config(SHIPPED), args.overrides)
        examples = TOY_EXAMPLES
    else:
        cfg = load_generation_config(args.config, args.overrides)
        examples = REAL_EXAMPLES
    serve(cfg, args.host, args.port, examples)
    return 0
