"""``dit-mem demo``: the whole path offline with tiny random models."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end demo (synthetic bank, real index, tiny random Wan + encoder)",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    p.add_argument("--prompt", default=None, help="prompt to generate")
    p.add_argument("-k", type=int, default=2, help="memory videos to retrieve")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dit_mem.demo import DEMO_PROMPT, run_demo

    run_demo(args.out, prompt=args.prompt or DEMO_PROMPT, k=args.k, steps=args.steps)
    return 0
