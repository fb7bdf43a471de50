"""``dit-mem demo``: memory on the shipped toy world (tiny trained Wan stack), offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from dit_mem.cli_types import count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline demo: a tiny trained Wan learns a colour it never saw from memory",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    p.add_argument(
        "--prompt",
        action="append",
        help="toy-world prompt 'a <colour> <shape> moving <direction>' (repeatable)",
    )
    p.add_argument("--assets", type=Path, help="trained toy world (default: the shipped one)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument(
        "--table-repeats",
        type=count(0),
        default=2,
        help="held-out prompts per concept in the metric table (0: no table)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dit_mem.demo import HELD_OUT_PROMPT, SEEN_PROMPT, run_demo

    prompts = tuple(args.prompt) if args.prompt else (HELD_OUT_PROMPT, SEEN_PROMPT)
    run_demo(args.out, args.assets, prompts, args.seed, args.table_repeats)
    return 0
