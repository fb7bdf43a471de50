"""Subcommands of ``dit-mem``; each module exposes ``register(subparsers)``."""
