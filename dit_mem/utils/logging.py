"""Package logging: one named logger tree (``dit_mem.*``), configured once by the CLI."""

from __future__ import annotations

import logging

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """Return the logger for a module (``__name__``), under the ``dit_mem`` tree."""
    if not name.startswith("dit_mem"):
        name = f"dit_mem.{name}"
    return logging.getLogger(name)


def setup_logging(level: int | str = logging.INFO, file: str | None = None) -> None:
    """Configure the ``dit_mem`` logger for command-line use (stderr, optional file)."""
    root = logging.getLogger("dit_mem")
    root.setLevel(level)
    root.handlers.clear()
    handler: logging.Handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    if file is not None:
        fh = logging.FileHandler(file)
        fh.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(fh)
    root.propagate = False
