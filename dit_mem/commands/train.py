"""``dit-mem train``: train the memory encoder (method §5) under accelerate.

    dit-mem train --config config/train_dit_mem.yaml [key=value ...] [--resume latest|PATH]
    accelerate launch --num_processes 8 -m dit_mem.cli train --config ...   (many GPUs)

Settings come from the dataclass defaults, then the YAML file, then the ``key=value``
overrides (positional or ``--set key=value``; the command line wins). Nested keys use dots:
``optim.lr=2e-5``, ``data.k=3``. An unknown key is an error that names it.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the memory encoder against a frozen video DiT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (e.g. config/train_dit_mem.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable; same as a positional KEY=VALUE)",
    )
    p.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue from the newest complete checkpoint of output_dir ('latest'), a run "
        "folder, or a checkpoint folder",
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the retrieval and text-embedding caches, then stop",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import yaml

    from dit_mem.config import to_dict
    from dit_mem.training import load_train_config, prepare_caches, train

    cfg = load_train_config(args.config, [*args.overrides, *args.set_overrides])
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.prepare_only:
        cfg.require_paths()
        ids, _, text = prepare_caches(cfg)
        print(f"caches ready in {cfg.cache_dir}: {len(ids)} training rows, {len(text)} embeddings")
        return 0
    result = train(cfg, resume=args.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    print(
        f"trained to step {result.step}; run folder {result.run_dir}"
        + (f"; last checkpoint {result.last_checkpoint}" if result.last_checkpoint else "")
    )
    return 0
