"""Argument types shared by the ``dit-mem`` subcommands (argparse reports their errors)."""

from __future__ import annotations

import argparse


def count(low: int = 1, high: int | None = None):
    """An argparse type: a whole number ≥ ``low`` (and ≤ ``high`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be ≤ {high}, got {value}")
        return value

    parse.__name__ = f"integer ≥ {low}" if high is None else f"integer in [{low}, {high}]"
    return parse
