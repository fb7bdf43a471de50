"""``dit-mem toyworld``: train and score the toy world (tiny trained Wan stack + memory).

    dit-mem toyworld train [--config FILE] [key=value ...] [--export DIR]
    dit-mem toyworld eval  [--assets DIR] [--held-out-repeats N] [--seen-repeats N]

``train`` runs VAE → base DiT (one colour held out) → memory bank → memory encoder, each
stage resumable (rerun the same command after an interruption), then prints the metric
table and writes ``<out>/manifest.json``. ``--export dit_mem/toyworld/assets`` replaces the
shipped fp16 copy that ``dit-mem demo`` uses. ``eval`` scores a trained folder (default: the
shipped assets) with and without memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dit_mem.cli_types import count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toyworld",
        help="train / score the toy world (tiny trained Wan + memory, CPU-sized)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    t = verbs.add_parser("train", help="run (or resume) every stage, evaluate, write the manifest")
    t.add_argument("--config", help="YAML config of ToyWorldConfig fields")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    t.add_argument("--export", type=Path, help="also write the fp16 asset folder here")
    t.set_defaults(func=_train)
    e = verbs.add_parser("eval", help="metric table of a trained toy world")
    e.add_argument("--assets", type=Path, help="trained folder (default: the shipped assets)")
    e.add_argument("--held-out-repeats", type=count(0), default=8)
    e.add_argument("--seen-repeats", type=count(0), default=1)
    e.add_argument("--seed", type=count(0), default=1000)
    e.add_argument("--json", type=Path, help="also write the table as JSON here")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from dit_mem.config import load_config
    from dit_mem.toyworld.recipe import ToyWorldConfig, run_recipe

    cfg = load_config(ToyWorldConfig, args.config, args.overrides)
    command = " ".join(
        [
            "dit-mem toyworld train",
            *(["--config", args.config] if args.config else []),
            *args.overrides,
        ]
    )
    run_recipe(cfg, export=args.export, command=command)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from dit_mem.toyworld.evaluate import format_table, load_toy_pipeline, metric_table
    from dit_mem.toyworld.recipe import SHIPPED

    assets = args.assets or SHIPPED
    if not (assets / "base" / "model_index.json").is_file():
        raise FileNotFoundError(f"{assets} is not a trained toy world (no base/model_index.json)")
    pipe, cfg = load_toy_pipeline(assets)
    table = metric_table(pipe, cfg, args.held_out_repeats, args.seen_repeats, args.seed)
    print(format_table(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0
