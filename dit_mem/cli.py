"""The ``dit-mem`` command line.

Each subcommand lives in its own module under ``dit_mem.commands`` and exposes
``register(subparsers)``, which adds a parser whose ``func(args)`` runs the command. Heavy
imports (torch, diffusers, faiss) happen inside ``func`` so ``dit-mem --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dit_mem import __version__
from dit_mem.errors import user_errors
from dit_mem.utils.logging import setup_logging

# Modules under dit_mem.commands, in the order their subcommands are listed in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "serve",
    "generate",
    "encoder",
    "evaluate",
    "retrieval",
    "latents",
    "token_cache",
    "bank",
    "train",
    "toyworld",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit-mem",
        description="DiT-Mem: retrieve reference videos, encode them into memory tokens, "
        "and guide a frozen video DiT (Wan, LTX-Video, HunyuanVideo-1.5) with them.",
    )
    parser.add_argument("--version", action="version", version=f"dit-mem {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"dit_mem.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # KEY=VALUE overrides may come after options too (`--prompt x k=3 --out o seed=1`)
        strays = [a for a in rest if a.startswith("-") or "=" not in a]
        if strays or not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"unrecognized arguments: {' '.join(strays or rest)}")
        args.overrides += rest
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    level = args.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        parser.error(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level}")
    setup_logging(level)
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        # User errors: one clear line, no traceback. Bugs still raise.
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"dit-mem {args.command}: error: {message or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dit-mem {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        print(
            f"dit-mem {args.command}: internal error (a bug in dit-mem, not in your input): "
            "please report it with the traceback below",
            file=sys.stderr,
        )
        raise


if __name__ == "__main__":
    sys.exit(main())
